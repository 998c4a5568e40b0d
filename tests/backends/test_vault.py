"""The Vault backend against the real OpenBao (token and database engines, real PostgreSQL)."""

from __future__ import annotations

import secrets
import time
from pathlib import Path

import psycopg
import pytest

from broker.backends.base import MintOutcomeUnknown, RevokeRef
from broker.backends.vault import VaultBackend
from broker.devstack.processes import free_port
from broker.domain.scope import VaultDatabaseBackend, VaultTokenBackend
from broker.domain.vault_policies import vault_policy_name
from broker.errors import InvalidRequest, ScopeMisconfigured, ServiceUnavailable
from broker.settings import VaultSettings
from tests.backends.helpers import mint_request, planned
from tests.support.issuer import TestIssuer
from tests.support.services import OpenBao

pytestmark = pytest.mark.integration

KV_READ = VaultTokenBackend(type="vault_token", policies=["kv-read"])


@pytest.fixture
def cluster() -> str:
    return "t" + secrets.token_hex(4)


@pytest.fixture
def vault(openbao: OpenBao, cluster: str) -> VaultBackend:
    return VaultBackend(openbao.vault_settings(), cluster=cluster)


def lookup(openbao: OpenBao, token: str) -> dict[str, object] | None:
    with openbao.client() as root:
        resp = root.post("/v1/auth/token/lookup", json={"token": token})
    return resp.json()["data"] if resp.status_code == 200 else None


def works(openbao: OpenBao, token: str, path: str = "/v1/secret/data/demo/hello") -> int:
    with openbao.client(token) as client:
        return client.get(path).status_code


def test_child_token_carries_exactly_the_template_limits(
    openbao: OpenBao, vault: VaultBackend, cluster: str
) -> None:
    """Policies, TTL = explicit max TTL, use count, not renewable, orphan, metadata naming the
    cluster, task and credential; parameters (even ones named like token flags) change nothing."""
    request = mint_request(
        KV_READ,
        ttl=600,
        max_uses=3,
        cluster=cluster,
        params={"ttl": 99_999, "renewable": True, "policies": ["root"], "period": "768h"},
    )
    minted = vault.mint(planned(vault, request))
    token = minted.secret["token"]
    info = lookup(openbao, token)
    assert info is not None
    assert "kv-read" in info["policies"]  # type: ignore[operator]
    assert "root" not in info["policies"]  # type: ignore[operator]
    assert 0 < int(info["ttl"]) <= 600  # type: ignore[call-overload]
    assert info["explicit_max_ttl"] == 600
    assert info["num_uses"] == 3
    assert info["renewable"] is False
    assert info["orphan"] is True
    assert info.get("period") in (None, 0)
    assert info["meta"] == {
        "broker_cluster": cluster,
        "broker_task": request.task_id,
        "broker_credential": request.credential_id,
        "broker_role": "credential",
        "broker_scope": "test-scope",
        "broker_subject": "agent-1",
    }
    assert minted.handle == info["accessor"]
    assert minted.expires_at <= time.time() + 600
    assert minted.env == {"VAULT_ADDR": openbao.addr, "VAULT_TOKEN": token}
    assert token not in repr(minted)
    # Within scope, outside scope, and the use count: the third use is the last.
    assert works(openbao, token) == 200
    assert works(openbao, token, "/v1/secret/data/private/key") == 403
    assert works(openbao, token) == 200
    assert works(openbao, token) == 403


def test_root_sudo_and_unknown_policies_are_refused_before_anything_exists(
    openbao: OpenBao, vault: VaultBackend, cluster: str
) -> None:
    """``root`` is refused by the plan; a policy granting ``sudo`` and a policy that does not exist
    are refused at mint time as a misconfigured scope, the cause (naming the policy) kept for the
    admin only; no token is created for any of them."""
    with openbao.client() as root:
        resp = root.put(
            "/v1/sys/policies/acl/sneaky",
            json={"policy": 'path "sys/*" { capabilities = ["read", "sudo"] }'},
        )
        assert resp.status_code == 204
    with pytest.raises(InvalidRequest) as refused:
        vault.plan(mint_request(VaultTokenBackend(type="vault_token", policies=["root"])))
    assert refused.value.code == "forbidden_policy"
    for name, cause in (("sneaky", "grants sudo"), ("no-such-policy", "has no policy named")):
        request = mint_request(
            VaultTokenBackend(type="vault_token", policies=["kv-read", name]), cluster=cluster
        )
        with pytest.raises(ScopeMisconfigured) as misconfigured:
            vault.mint(planned(vault, request))
        assert misconfigured.value.code == "scope_misconfigured"
        assert cause in (misconfigured.value.internal or "")
        assert name in (misconfigured.value.internal or "")
        assert name not in misconfigured.value.detail
    assert list(vault.inventory(cluster)) == []


#: Spellings whose normal form the broker computes; OpenBao is the oracle.
POLICY_SPELLINGS = [
    "ROOT",
    " Root ",
    "\u00a0root\u3000",
    "\u2028KV-Read\u2029",
    "\u212av-write",
    "\u0130",
    "\u03a3\u03a3",
    "\u1e9e",
    "\x1croot",
    "\u200broot",
    "A\u0301B\t",
]


def test_policy_names_normalise_as_openbao_does(openbao: OpenBao) -> None:
    """The broker's ``vault_policy_name`` gives, for each spelling, exactly the policy name the
    real OpenBao puts on a token created with it (trimmed and lowercased the way Go does)."""
    with openbao.client() as root:
        for spelling in POLICY_SPELLINGS:
            resp = root.post(
                "/v1/auth/token/create",
                json={"policies": [spelling], "no_default_policy": True, "ttl": "60s"},
            )
            assert resp.status_code == 200, resp.text
            auth = resp.json()["auth"]
            assert auth["policies"] == [vault_policy_name(spelling)], ascii(spelling)
            root.post("/v1/auth/token/revoke-accessor", json={"accessor": auth["accessor"]})


def test_forbidden_policies_are_refused_in_any_spelling_vault_accepts(
    openbao: OpenBao, cluster: str
) -> None:
    """With ``forbidden_policies: [kv-write]``, the plan refuses ``KV-Write`` and ``ROOT`` (the
    token role would have granted kv-write), vetting refuses them too, and an allowed policy in
    capitals mints a token whose policy is the normalised name that was vetted."""
    vault = VaultBackend(openbao.vault_settings(forbidden_policies=[" KV-Write"]), cluster=cluster)
    for spelling in ("kv-write", "KV-Write", "ROOT", "Root"):
        spec = VaultTokenBackend(type="vault_token", policies=["kv-read", spelling])
        with pytest.raises(InvalidRequest) as refused:
            vault.plan(mint_request(spec, cluster=cluster))
        assert refused.value.code == "forbidden_policy"
        with pytest.raises(InvalidRequest) as refused:
            vault.vet_policy(spelling)
        assert refused.value.code == "forbidden_policy"
    minted = vault.mint(
        planned(
            vault,
            mint_request(
                VaultTokenBackend(type="vault_token", policies=["KV-Read"]), cluster=cluster
            ),
        )
    )
    info = lookup(openbao, minted.secret["token"])
    assert info is not None
    assert info["policies"] == ["default", "kv-read"]
    assert minted.details["policies"] == ["default", "kv-read"]
    vault.revoke(RevokeRef("c", "t", minted.kind, minted.handle))
    assert lookup(openbao, minted.secret["token"]) is None


def test_a_missing_policy_is_not_remembered_and_the_token_role_is_checked(
    openbao: OpenBao, vault: VaultBackend, cluster: str
) -> None:
    """A mint naming a policy OpenBao lacks fails as misconfigured; once the admin writes the
    policy the very next mint gets past that check (the "not found" answer was not cached) and
    fails on the token role, which does not allow it yet; once the role allows it, it mints."""
    name = f"kv-team-{secrets.token_hex(3)}"
    spec = VaultTokenBackend(type="vault_token", policies=[name])
    with pytest.raises(ScopeMisconfigured) as first:
        vault.mint(planned(vault, mint_request(spec, cluster=cluster)))
    assert f"no policy named {name!r}" in (first.value.internal or "")
    with openbao.client() as root:
        assert (
            root.put(
                f"/v1/sys/policies/acl/{name}",
                json={"policy": 'path "secret/data/demo/*" { capabilities = ["read"] }'},
            ).status_code
            == 204
        )
        with pytest.raises(ScopeMisconfigured) as second:
            vault.mint(planned(vault, mint_request(spec, cluster=cluster)))
        assert "allowed policies" in (second.value.internal or "")
        assert "token role 'broker-child'" in (second.value.internal or "")
        role = root.get("/v1/auth/token/roles/broker-child").json()["data"]
        try:
            assert (
                root.post(
                    "/v1/auth/token/roles/broker-child",
                    json={"allowed_policies": [*role["allowed_policies"], name]},
                ).status_code
                == 204
            )
            minted = vault.mint(planned(vault, mint_request(spec, cluster=cluster)))
            assert name in minted.details["policies"]
            vault.revoke(RevokeRef("crd", "tsk", minted.kind, minted.handle))
        finally:
            root.post(
                "/v1/auth/token/roles/broker-child",
                json={"allowed_policies": role["allowed_policies"]},
            )


def test_revocation_by_accessor_kills_the_token_and_is_idempotent(
    openbao: OpenBao, vault: VaultBackend, cluster: str
) -> None:
    """After revoke the token is rejected; revoking again (already gone) succeeds."""
    request = mint_request(KV_READ, cluster=cluster)
    minted = vault.mint(planned(vault, request))
    ref = RevokeRef(request.credential_id, request.task_id, minted.kind, minted.handle)
    vault.revoke(ref)
    assert lookup(openbao, minted.secret["token"]) is None
    assert works(openbao, minted.secret["token"]) == 403
    vault.revoke(ref)


def test_inventory_and_handle_less_revocation_use_the_metadata(
    openbao: OpenBao, vault: VaultBackend, cluster: str
) -> None:
    """The orphan scan sees this cluster's tokens only; a revocation without a handle (a mint whose
    answer was lost) finds the token by its credential id."""
    mine = mint_request(KV_READ, cluster=cluster)
    minted = vault.mint(planned(vault, mine))
    other = VaultBackend(openbao.vault_settings(), cluster=cluster + "x")
    theirs = other.mint(planned(other, mint_request(KV_READ, cluster=cluster + "x")))
    objects = list(vault.inventory(cluster))
    assert [(o.credential_id, o.handle, o.role) for o in objects] == [
        (mine.credential_id, minted.handle, "credential")
    ]
    assert objects[0].expires_at is not None and objects[0].expires_at <= time.time() + 900
    vault.revoke(RevokeRef(mine.credential_id, mine.task_id, "vault_token", None))
    assert lookup(openbao, minted.secret["token"]) is None
    assert lookup(openbao, theirs.secret["token"]) is not None


def test_an_unreachable_vault_is_a_clean_503(cluster: str) -> None:
    """Nothing listens: mint and health raise ServiceUnavailable (not an unknown outcome)."""
    backend = VaultBackend(
        VaultSettings(addr=f"http://127.0.0.1:{free_port()}", token="x", timeout=2),
        cluster=cluster,
    )
    request = mint_request(KV_READ, cluster=cluster)
    with pytest.raises(ServiceUnavailable) as down:
        backend.mint(planned(backend, request))
    assert down.value.code == "backend_unavailable"
    assert not isinstance(down.value, MintOutcomeUnknown)
    with pytest.raises(ServiceUnavailable):
        backend.health()


# --- dynamic database credentials ----------------------------------------------------------


def role_exists(bao: OpenBao, username: str) -> bool:
    assert bao.database is not None
    with psycopg.connect(bao.database.admin_url) as conn:
        row = conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (username,)).fetchone()
    return row is not None


def wait_gone(bao: OpenBao, username: str) -> bool:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if not role_exists(bao, username):
            return True
        time.sleep(0.05)
    return False


def denied(conn: psycopg.Connection[tuple[object, ...]], sql: str) -> bool:
    try:
        conn.execute(sql)
    except psycopg.errors.InsufficientPrivilege:
        conn.rollback()
        return True
    conn.rollback()
    return False


@pytest.fixture
def db_vault(openbao_db: OpenBao, cluster: str) -> VaultBackend:
    return VaultBackend(openbao_db.vault_settings(), cluster=cluster)


def test_readonly_login_reads_and_does_nothing_more_then_is_gone(
    openbao_db: OpenBao, db_vault: VaultBackend
) -> None:
    """The minted user selects from demo.items and is refused writes, DDL and other schemas; its
    lease and VALID UNTIL never exceed the task's TTL; revoking the lease ends its session and
    drops it."""
    request = mint_request(
        VaultDatabaseBackend(type="vault_database", mount="database", role="readonly"), ttl=300
    )
    minted = db_vault.mint(planned(db_vault, request))
    user = minted.secret["username"]
    assert minted.kind == "vault_lease"
    assert minted.handle.startswith("database/creds/readonly/")
    assert minted.details["ttl"] <= 300
    assert minted.expires_at <= time.time() + 300
    env = minted.env
    assert env["PGUSER"] == user and env["PGPASSWORD"] == minted.secret["password"]
    assert env["PGHOST"] == "127.0.0.1" and env["PGPORT"] == "5432"
    assert env["PGDATABASE"] == openbao_db.database.name  # type: ignore[union-attr]
    assert env["DATABASE_URL"].startswith(f"postgresql://{user}:")
    assert minted.secret["password"] not in repr(minted)
    with psycopg.connect(openbao_db.database.admin_url) as admin:  # type: ignore[union-attr]
        valid_until = admin.execute(
            "SELECT extract(epoch FROM rolvaliduntil) FROM pg_roles WHERE rolname = %s", (user,)
        ).fetchone()
    assert valid_until is not None and float(valid_until[0]) <= time.time() + 300 + 5

    conn = psycopg.connect(env["DATABASE_URL"])
    # (other tests share this database and may change the rows, not the first two ids)
    assert conn.execute("SELECT id FROM demo.items WHERE id <= 2 ORDER BY id").fetchall() == [
        (1,),
        (2,),
    ]
    conn.rollback()
    assert denied(conn, "INSERT INTO demo.items VALUES (3, 'third')")
    assert denied(conn, "DELETE FROM demo.items")
    assert denied(conn, "CREATE TABLE demo.mine (x int)")
    assert denied(conn, "SELECT * FROM public.secrets")

    db_vault.revoke(
        RevokeRef(
            request.credential_id, request.task_id, minted.kind, minted.handle, minted.details
        )
    )
    assert wait_gone(openbao_db, user)
    with pytest.raises(psycopg.OperationalError):
        conn.execute("SELECT 1")  # its session was ended too
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(env["DATABASE_URL"], connect_timeout=3)
    # Already gone: revoking again succeeds.
    db_vault.revoke(
        RevokeRef(
            request.credential_id, request.task_id, minted.kind, minted.handle, minted.details
        )
    )


def test_readwrite_login_writes_but_cannot_drop(
    openbao_db: OpenBao, db_vault: VaultBackend
) -> None:
    """The readwrite role inserts and deletes rows but owns nothing: no DROP, no DDL."""
    request = mint_request(
        VaultDatabaseBackend(type="vault_database", mount="database", role="readwrite"), ttl=300
    )
    minted = db_vault.mint(planned(db_vault, request))
    with psycopg.connect(minted.env["DATABASE_URL"]) as conn:
        conn.execute(
            "INSERT INTO demo.items VALUES (%s, 'temp')", (1000 + secrets.randbelow(10**6),)
        )
        conn.execute("DELETE FROM demo.items WHERE name = 'temp'")
        conn.commit()
        assert denied(conn, "DROP TABLE demo.items")
        assert denied(conn, "SELECT * FROM public.secrets")
    db_vault.revoke(
        RevokeRef(
            request.credential_id, request.task_id, minted.kind, minted.handle, minted.details
        )
    )
    assert wait_gone(openbao_db, minted.secret["username"])


def test_the_lease_owner_carries_the_metadata_and_revoking_it_drops_the_user(
    openbao_db: OpenBao, db_vault: VaultBackend, cluster: str
) -> None:
    """After a crash the broker knows no lease id: the orphan scan finds the broker-internal
    token that owns the lease, and revoking it revokes the lease and drops the user."""
    request = mint_request(
        VaultDatabaseBackend(type="vault_database", mount="database", role="readonly"),
        ttl=300,
        cluster=cluster,
    )
    minted = db_vault.mint(planned(db_vault, request))
    owners = [o for o in db_vault.inventory(cluster) if o.credential_id == request.credential_id]
    assert [o.role for o in owners] == ["lease_owner"]
    assert owners[0].handle == minted.details["lease_owner_accessor"]
    db_vault.revoke(
        RevokeRef(request.credential_id, request.task_id, "vault_token", owners[0].handle)
    )
    assert wait_gone(openbao_db, minted.secret["username"])


# --- the broker's own identity -------------------------------------------------------------


def bao_write(bao: OpenBao, path: str, body: dict[str, object]) -> dict[str, object]:
    with bao.client() as root:
        resp = root.post(f"/v1/{path}", json=body)
        assert resp.status_code in (200, 204), resp.text
        return resp.json() if resp.status_code == 200 else {}


def test_approle_login_mints_and_logs_in_again_before_expiry(
    openbao: OpenBao, cluster: str
) -> None:
    """With AppRole the broker logs in itself, mints, and logs in again once two thirds of its
    token's TTL have passed; what it minted before survives (orphan tokens)."""
    mount = "approle-" + cluster
    bao_write(openbao, f"sys/auth/{mount}", {"type": "approle"})
    bao_write(
        openbao, f"auth/{mount}/role/broker", {"token_policies": ["broker"], "token_ttl": "60s"}
    )
    with openbao.client() as root:
        role_id = root.get(f"/v1/auth/{mount}/role/broker/role-id").json()["data"]["role_id"]
        secret_id = root.post(f"/v1/auth/{mount}/role/broker/secret-id").json()["data"]["secret_id"]
    now = [time.time()]
    backend = VaultBackend(
        openbao.vault_settings(
            auth_method="approle",
            token=None,
            auth_mount=mount,
            role_id=role_id,
            secret_id=secret_id,
        ),
        cluster=cluster,
        clock=lambda: now[0],
    )
    first = backend.mint(planned(backend, mint_request(KV_READ, cluster=cluster)))
    generation = backend.auth.generation
    assert generation == 1
    now[0] += 45  # past two thirds of 60 s
    backend.maintain()
    assert backend.auth.generation == generation + 1
    second = backend.mint(planned(backend, mint_request(KV_READ, cluster=cluster)))
    assert works(openbao, first.secret["token"]) == 200
    assert works(openbao, second.secret["token"]) == 200


def test_jwt_login_reads_the_token_file_each_time(
    openbao: OpenBao, issuer: TestIssuer, tmp_path: Path, cluster: str
) -> None:
    """JWT auth (a Kubernetes projected token, say): the broker logs in with the JWT in a file,
    and reads the file again at each login."""
    mount = "jwt-" + cluster
    bao_write(openbao, f"sys/auth/{mount}", {"type": "jwt"})
    bao_write(openbao, f"auth/{mount}/config", {"jwks_url": f"{issuer.url}/jwks"})
    bao_write(
        openbao,
        f"auth/{mount}/role/broker",
        {
            "role_type": "jwt",
            "bound_audiences": [issuer.audience],
            "user_claim": "sub",
            "bound_subject": "system:serviceaccount:broker:broker",
            "token_policies": ["broker"],
            "token_ttl": "120s",
        },
    )
    jwt_file = tmp_path / "token"
    jwt_file.write_text(issuer.token("system:serviceaccount:broker:broker"))
    backend = VaultBackend(
        openbao.vault_settings(
            auth_method="jwt", token=None, auth_mount=mount, jwt_role="broker", jwt_file=jwt_file
        ),
        cluster=cluster,
    )
    minted = backend.mint(planned(backend, mint_request(KV_READ, cluster=cluster)))
    assert works(openbao, minted.secret["token"]) == 200
    # The file is re-read at the next login: a token for another subject is refused by OpenBao,
    # and the broker keeps its still-valid token meanwhile (and says so).
    jwt_file.write_text(issuer.token("someone-else"))
    backend.auth._renew_at = 0.0  # due now
    backend.maintain()
    assert backend.auth.last_error == "InvalidRequest"
    assert backend.auth.generation == 1
    still = backend.mint(planned(backend, mint_request(KV_READ, cluster=cluster)))
    assert works(openbao, still.secret["token"]) == 200


def test_a_renewable_broker_token_is_renewed_before_it_expires(
    openbao: OpenBao, cluster: str
) -> None:
    """Token auth: once two thirds of the token's TTL have passed, the broker renews it."""
    with openbao.client() as root:
        created = root.post(
            "/v1/auth/token/create-orphan",
            json={"policies": ["broker"], "ttl": "90s", "renewable": True},
        ).json()["auth"]
    now = [time.time()]
    backend = VaultBackend(
        openbao.vault_settings(token=created["client_token"]),
        cluster=cluster,
        clock=lambda: now[0],
    )
    backend.maintain()  # looks the token up and schedules the renewal
    assert not lookup(openbao, created["client_token"]).get("last_renewal")  # type: ignore[union-attr]
    now[0] += 61
    backend.maintain()
    assert lookup(openbao, created["client_token"]).get("last_renewal")  # type: ignore[union-attr]
