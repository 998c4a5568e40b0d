"""Credential backends, one module each, behind the small :class:`~broker.backends.base.Backend` interface."""
