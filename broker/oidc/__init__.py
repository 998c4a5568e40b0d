"""OIDC ID token verification against configured trusted issuers."""
