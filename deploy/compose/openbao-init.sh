#!/bin/sh
# Provision the compose stack's OpenBao the way docs/backends.md describes: the broker's policy,
# the agents' example policies, two orphan token roles, and the broker's own periodic token.
# Idempotent: safe to run on every `docker compose up`.
set -eu

until bao status >/dev/null 2>&1; do sleep 1; done

bao policy write kv-read - <<'HCL'
path "secret/data/demo/*" { capabilities = ["read"] }
path "secret/metadata/demo/*" { capabilities = ["read", "list"] }
HCL
bao policy write kv-write - <<'HCL'
path "secret/data/demo/*" { capabilities = ["create", "update", "read"] }
HCL
bao policy write broker-leases - <<'HCL'
path "+/creds/*" { capabilities = ["read"] }
HCL
bao policy write broker - <<'HCL'
path "auth/token/create/broker-child" { capabilities = ["update"] }
path "auth/token/create/broker-lease" { capabilities = ["update"] }
path "auth/token/revoke-accessor" { capabilities = ["update"] }
path "auth/token/lookup-accessor" { capabilities = ["update"] }
path "auth/token/roles/*" { capabilities = ["read"] }
path "auth/token/accessors" { capabilities = ["list", "sudo"] }
path "auth/token/lookup-self" { capabilities = ["read"] }
path "auth/token/renew-self" { capabilities = ["update"] }
path "sys/policies/acl/*" { capabilities = ["read"] }
path "sys/leases/revoke" { capabilities = ["update"] }
path "sys/leases/lookup" { capabilities = ["update"] }
path "sys/leases/lookup/database/creds/*" { capabilities = ["list", "sudo"] }
path "sys/leases/renew" { capabilities = ["update"] }
path "database/creds/*" { capabilities = ["read"] }
path "database/roles/*" { capabilities = ["read"] }
path "database/config/*" { capabilities = ["read"] }
path "sys/audit-hash/*" { capabilities = ["update"] }
HCL

bao write auth/token/roles/broker-child \
    allowed_policies=kv-read,kv-write disallowed_policies=root,broker,broker-leases \
    orphan=true renewable=false token_type=service token_explicit_max_ttl=43200
bao write auth/token/roles/broker-lease \
    allowed_policies=broker-leases disallowed_policies=root,broker \
    orphan=true renewable=false token_type=service token_explicit_max_ttl=43200

if ! bao token lookup "$BROKER_VAULT_TOKEN" >/dev/null 2>&1; then
  bao token create -id="$BROKER_VAULT_TOKEN" -policy=broker -orphan -period=24h \
      -display-name=broker >/dev/null
fi
bao kv put -mount=secret demo/hello value=world >/dev/null
echo "openbao provisioned for the broker"
