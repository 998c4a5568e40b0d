"""The front door against a real `broker serve` process: hostile input, size caps, throttling
of failed authentication with summarised audit, token kinds, and production's transport rules.

The broker trusts ``127.0.0.2`` as a reverse proxy, so a test that connects from that address
and sends ``X-Forwarded-For`` speaks for a client address of its own choosing; from
``127.0.0.1`` the header is ignored (as it would be from any untrusted peer).
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from broker.store import Database, repo
from tests.oidc.tokens import b64, forge
from tests.replicas.cluster import GRANT, ID_TOKEN, Cluster, base_config, scope_folder, wait_until
from tests.support.issuer import TestIssuer

pytestmark = pytest.mark.integration

ACCESS_TOKEN = "urn:ietf:params:oauth:token-type:access_token"
WINDOW = 20
PER_ADDRESS = 5


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory, issuer: TestIssuer) -> Iterator[Cluster]:
    base = tmp_path_factory.mktemp("front-door")
    config = base_config(
        database_url=f"sqlite:///{base / 'broker.db'}",
        issuer=issuer,
        scopes_dir=scope_folder(base),
        issuers=[
            issuer.issuer_config(
                claims={"roles": "broker_roles"},
                access_tokens={"audiences": ["https://api.example"]},
                # A pattern that backtracks exponentially in Python's re, on a claim the
                # token's holder chooses.
                trust={
                    "any": [
                        {"claim": "team", "regex": "(a+)+b"},
                        {"claim": "sub", "regex": "[A-Za-z0-9._:/@-]{1,128}"},
                    ]
                },
            )
        ],
        http={"trusted_proxies": ["127.0.0.2"]},
        auth_limits={"per_address": PER_ADDRESS, "window": WINDOW, "flush_interval": 0.2},
    )
    nodes = Cluster(base, config, count=1, migrate=True)
    try:
        nodes.start()
    except Exception:
        print(nodes.logs())
        nodes.stop()
        raise
    yield nodes
    nodes.stop()


@pytest.fixture(scope="module")
def store(node: Cluster) -> Iterator[Database]:
    db = Database(node.config["database_url"])
    yield db
    db.dispose()


def via_proxy(node: Cluster) -> httpx.Client:
    """A client connecting from the trusted proxy's address."""
    transport = httpx.HTTPTransport(local_address="127.0.0.2")
    return httpx.Client(base_url=node.urls[0], transport=transport, timeout=30)


def new_address() -> str:
    """A client address no other test uses (TEST-NET-2, 198.51.100.0/24, by a random host)."""
    return f"198.51.{uuid.uuid4().int % 250 + 1}.{uuid.uuid4().int % 250 + 1}"


def exchange(
    client: httpx.Client, token: str, address: str | None = None, kind: str = ID_TOKEN
) -> httpx.Response:
    headers = {"X-Forwarded-For": address} if address else {}
    form = {"grant_type": GRANT, "subject_token_type": kind, "subject_token": token}
    return client.post("/oauth2/token", data=form, headers=headers)


def events(store: Database, name: str) -> list[dict[str, Any]]:
    with store.read() as conn:
        return repo.audit_events(conn, name=name, limit=100_000)


def at_window_start(margin: float = 8.0) -> None:
    """Wait, if needed, until at least ``margin`` seconds of the current window remain."""
    wait_until(lambda: WINDOW - time.time() % WINDOW > margin, timeout=WINDOW + 5, interval=0.2)


# --- 1. hostile input ----------------------------------------------------------------------


def hostile_tokens(issuer: TestIssuer) -> list[tuple[str, str]]:
    """(token, expected code) of many shapes; see bench/hostile_input.py for the full corpus."""
    key = issuer.keys[0]
    head = {"alg": "ES256", "kid": key.kid}
    now = int(time.time())
    claims = {"iss": issuer.url, "sub": "hostile", "aud": "broker", "iat": now, "exp": now + 300}
    nested: Any = 1
    for _ in range(15):
        nested = [nested, nested] if isinstance(nested, int) else [nested]
    return [
        ("x" * 20_000, "token_too_large"),
        ("." * 5000, "malformed_token"),
        (b64('"' + '\\"' * 5000) + "." + b64("{}") + ".", "malformed_token"),
        (b64("[" * 5000) + ".e30.", "malformed_token"),
        (b64(head) + "." + b64("{" + '"a":{' * 2000) + ".x", "malformed_token"),
        ("eyJ" + "A" * 12_000 + ".e30.e30", "malformed_token"),
        (b64(head) + "." + b64(claims) + "." + b64(b"\x00" * 64), "invalid_signature"),
        (forge({**head, "typ": "at+jwt"}, claims, key=key), "wrong_token_type"),
        (forge(head, {**claims, "deep": nested, "team": "a" * 3000 + "!"}, key=key), "ok"),
        (
            forge(head, {**claims, "sub": "a" * 1000 + "!", "team": "a" * 3000}, key=key),
            "untrusted_token",
        ),
    ]


def test_hostile_tokens_are_refused_while_healthz_answers(
    node: Cluster, issuer: TestIssuer
) -> None:
    """Each hostile token gets its own refusal (or, for the valid one with a pathological
    trust-rule input, a session), from 8 threads at once, while /healthz keeps answering
    throughout on another connection."""
    corpus = hostile_tokens(issuer)
    health: list[int] = []
    done = threading.Event()

    def poll() -> None:
        with httpx.Client(base_url=node.urls[0], timeout=10) as client:
            while not done.is_set():
                health.append(client.get("/healthz").status_code)

    def flood(results: list[tuple[str, str]]) -> None:
        with via_proxy(node) as client:
            for token, _ in corpus:
                resp = exchange(client, token, new_address())
                results.append((token, "ok" if resp.status_code == 200 else resp.json()["code"]))

    poller = threading.Thread(target=poll)
    poller.start()
    outcomes: list[list[tuple[str, str]]] = [[] for _ in range(8)]
    threads = [threading.Thread(target=flood, args=(out,)) for out in outcomes]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    done.set()
    poller.join(30)
    expected = dict(corpus)
    for out in outcomes:
        assert [code for _, code in out] == [expected[t] for t, _ in out]
        assert len(out) == len(corpus)
    assert health and set(health) == {200}


# --- 2. size caps ---------------------------------------------------------------------------


def raw(node: Cluster, data: bytes, *, keep_sending: bytes = b"", rounds: int = 0) -> bytes:
    """Send ``data`` on a plain socket through the trusted proxy's address for a fresh client
    (so refusals here spend no other test's budget), then ``keep_sending`` up to ``rounds``
    times while no answer has arrived; return what the broker answered."""
    port = int(node.urls[0].rsplit(":", 1)[1])
    line, _, rest = data.partition(b"\r\n")
    data = line + b"\r\nX-Forwarded-For: " + new_address().encode() + b"\r\n" + rest
    with socket.create_connection(
        ("127.0.0.1", port), timeout=10, source_address=("127.0.0.2", 0)
    ) as sock:
        sock.sendall(data)
        sock.settimeout(0.05)
        answer = b""
        for _ in range(rounds):
            try:
                answer = sock.recv(65536)
                break
            except TimeoutError:
                sock.sendall(keep_sending)
        sock.settimeout(10)
        while b"\r\n\r\n" not in answer:
            chunk = sock.recv(65536)
            if not chunk:
                break
            answer += chunk
        head, _, body = answer.partition(b"\r\n\r\n")
        length = next(
            (
                int(h.split(b":")[1])
                for h in head.split(b"\r\n")
                if h.lower().startswith(b"content-length")
            ),
            0,
        )
        while len(body) < length:
            chunk = sock.recv(65536)
            if not chunk:
                break
            body += chunk
        return head + b"\r\n\r\n" + body


def problem_of(answer: bytes) -> tuple[int, dict[str, Any], bytes]:
    head, _, body = answer.partition(b"\r\n\r\n")
    status = int(head.split(b" ")[1])
    assert b"application/problem+json" in head.lower()
    return status, json.loads(body), head


def test_a_declared_oversized_body_is_refused_unread(node: Cluster) -> None:
    """Content-Length above the token endpoint's cap: 413 problem+json at once, although not
    one byte of the body was sent."""
    request = (
        b"POST /oauth2/token HTTP/1.1\r\nHost: b\r\n"
        b"Content-Type: application/x-www-form-urlencoded\r\n"
        b"Content-Length: 1000000000\r\n\r\n"
    )
    status, body, _ = problem_of(raw(node, request))
    assert (status, body["code"], body["error"]) == (413, "payload_too_large", "invalid_request")


def test_a_chunked_body_is_cut_off_at_the_cap(node: Cluster) -> None:
    """A chunked body (no Content-Length) is counted while it streams: 413 once it passes the
    cap, while the client is still sending (it never gets to send its 100th chunk)."""
    request = (
        b"POST /v1/tasks HTTP/1.1\r\nHost: b\r\nContent-Type: application/json\r\n"
        b"Authorization: Bearer brk_sess_nothing\r\nTransfer-Encoding: chunked\r\n\r\n"
    )
    chunk = b"4000\r\n" + b" " * 0x4000 + b"\r\n"  # 16 KiB of whitespace
    status, body, _ = problem_of(raw(node, request, keep_sending=chunk, rounds=100))
    assert (status, body["code"]) == (413, "payload_too_large")


def test_large_json_and_form_bodies(node: Cluster, issuer: TestIssuer) -> None:
    """A task request over 64 KiB is 413 before the session or the JSON is looked at; a form
    over 32 KiB on the token endpoint likewise; one under the cap is read as usual."""
    with via_proxy(node) as client:
        resp = client.post(
            "/v1/tasks",
            content=b'{"scope": "x", "purpose": "' + b"a" * 70_000 + b'"}',
            headers={"Content-Type": "application/json", "X-Forwarded-For": new_address()},
        )
        assert (resp.status_code, resp.json()["code"]) == (413, "payload_too_large")
        resp = client.post(
            "/oauth2/token",
            content=b"subject_token=" + b"a" * 40_000,
            headers={
                "Content-Type": "application/x-www-form-urlencoded",
                "X-Forwarded-For": new_address(),
            },
        )
        assert (resp.status_code, resp.json()["code"]) == (413, "payload_too_large")
        token = issuer.token("big-form-ok", padding="p" * 10_000)
        assert exchange(client, token, new_address()).status_code == 200


def test_headers_are_bounded(node: Cluster) -> None:
    """Too many header lines, or too many bytes of them, are 431 problem+json; a head far
    beyond the cap is cut off by the server before the application sees it (400)."""
    many = b"".join(b"X-H%d: v\r\n" % i for i in range(80))
    status, body, _ = problem_of(
        raw(node, b"GET /healthz HTTP/1.1\r\nHost: b\r\n" + many + b"\r\n")
    )
    assert (status, body["code"]) == (431, "headers_too_large")
    big = b"X-Big: " + b"v" * 17_000 + b"\r\n"
    status, body, _ = problem_of(raw(node, b"GET /healthz HTTP/1.1\r\nHost: b\r\n" + big + b"\r\n"))
    assert (status, body["code"]) == (431, "headers_too_large")
    huge = b"X-Huge: " + b"v" * 200_000 + b"\r\n"
    answer = raw(node, b"GET /healthz HTTP/1.1\r\nHost: b\r\n" + huge + b"\r\n")
    assert answer.split(b" ")[1] == b"400"


# --- 3. throttling and summaries ----------------------------------------------------------


def test_failed_exchanges_are_throttled_per_address(
    node: Cluster, issuer: TestIssuer, store: Database
) -> None:
    """Five failures from one address are answered 400; then that address gets 429 with
    Retry-After (problem+json), even with a valid token; another address is unaffected; the
    address a client names itself in X-Forwarded-For (from an untrusted peer) is not believed."""
    at_window_start()
    victim = new_address()
    bad = issuer.token("throttled", aud="someone-else")
    with via_proxy(node) as proxy, httpx.Client(base_url=node.urls[0], timeout=30) as direct:
        codes = [exchange(proxy, bad, victim).status_code for _ in range(PER_ADDRESS)]
        assert codes == [400] * PER_ADDRESS
        resp = exchange(proxy, issuer.token("throttled"), victim)
        assert resp.status_code == 429
        assert resp.headers["content-type"].startswith("application/problem+json")
        assert resp.json()["code"] == "too_many_failures"
        assert 1 <= int(resp.headers["retry-after"]) <= WINDOW
        assert exchange(proxy, issuer.token("throttled"), new_address()).status_code == 200
        # From 127.0.0.1 the header is ignored: this is 127.0.0.1's request, not the victim's.
        assert exchange(direct, issuer.token("spoofer"), victim).status_code == 200


def test_bad_session_tokens_count_too(node: Cluster, issuer: TestIssuer) -> None:
    """Bad bearer tokens spend the same budget: after five, the address's next request is 429
    before its session token is looked at, even a valid one."""
    at_window_start()
    address = new_address()
    with via_proxy(node) as proxy:
        session = exchange(proxy, issuer.token("bearer-flood"), address).json()["access_token"]
        for i in range(PER_ADDRESS):
            resp = proxy.get(
                "/v1/sessions/current",
                headers={"Authorization": f"Bearer brk_sess_{i}", "X-Forwarded-For": address},
            )
            assert resp.status_code == 401
        resp = proxy.get(
            "/v1/sessions/current",
            headers={"Authorization": f"Bearer {session}", "X-Forwarded-For": address},
        )
        assert (resp.status_code, resp.json()["code"]) == (429, "too_many_failures")


def test_a_flood_is_audited_as_first_events_and_summaries(
    node: Cluster, issuer: TestIssuer, store: Database
) -> None:
    """Forty bad tokens from one address: the first invalid one and the first 429 are audited
    in full; after the window, one summary per reason counts the rest (4 more refusals and 35
    more 429s), and a valid session from another address is still its own event."""
    at_window_start()
    address = new_address()
    bad = issuer.token("flooder", aud="someone-else")
    with via_proxy(node) as proxy:
        codes = [exchange(proxy, bad, address).status_code for _ in range(40)]
        assert codes == [400] * PER_ADDRESS + [429] * (40 - PER_ADDRESS)
        sub = f"after-flood-{uuid.uuid4().hex[:6]}"
        assert exchange(proxy, issuer.token(sub), new_address()).status_code == 200

    def mine(name: str) -> list[dict[str, Any]]:
        return [
            e for e in events(store, name) if e["attributes"].get("broker.auth.source") == address
        ]

    full = mine("broker.auth.failure")
    assert sorted(e["attributes"]["broker.auth.reason"] for e in full) == [
        "audience_mismatch",
        "rate_limited",
    ]
    summaries = wait_until(
        lambda: (
            len(mine("broker.auth.failure_summary")) == 2 and mine("broker.auth.failure_summary")
        ),
        timeout=2 * WINDOW + 10,
        what="the flood's summaries",
    )
    counts = {
        e["attributes"]["broker.auth.reason"]: e["attributes"]["broker.auth.count"]
        for e in summaries
    }
    assert counts == {"audience_mismatch": PER_ADDRESS - 1, "rate_limited": 40 - PER_ADDRESS - 1}
    starts = [e for e in events(store, "broker.session.start") if e["actor_subject"] == sub]
    assert len(starts) == 1


# --- 7. token kinds -----------------------------------------------------------------------


def test_access_tokens_and_id_tokens_do_not_mix(
    node: Cluster, issuer: TestIssuer, store: Database
) -> None:
    """An at+jwt token is refused as an ID token; as an access token (the issuer accepts them,
    with their own audience) it opens a session recorded as such; an ID token sent as an
    access token is refused."""
    key = issuer.keys[0]
    now = int(time.time())
    sub = f"api-client-{uuid.uuid4().hex[:6]}"
    claims = {
        "iss": issuer.url,
        "sub": sub,
        "aud": "https://api.example",
        "iat": now,
        "exp": now + 300,
    }
    at = forge({"alg": "ES256", "kid": key.kid, "typ": "at+jwt"}, claims, key=key)
    with via_proxy(node) as proxy:
        resp = exchange(proxy, at, new_address())
        assert (resp.status_code, resp.json()["code"]) == (400, "wrong_token_type")
        assert exchange(proxy, at, new_address(), ACCESS_TOKEN).status_code == 200
        resp = exchange(proxy, issuer.token(sub), new_address(), ACCESS_TOKEN)
        assert (resp.status_code, resp.json()["code"]) == (400, "wrong_token_type")
    (start,) = [e for e in events(store, "broker.session.start") if e["actor_subject"] == sub]
    assert start["attributes"]["broker.subject_token.kind"] == "access_token"


# --- 9. production transport ---------------------------------------------------------------


def production_config(base: Path, **overrides: Any) -> dict[str, Any]:
    key = base / "signing-key.pem"
    if not key.exists():
        pem = ec.generate_private_key(ec.SECP256R1()).private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        key.write_bytes(pem)
    config: dict[str, Any] = {
        "dev_mode": False,
        "public_url": "https://broker.example.com",
        "database_url": f"sqlite:///{base / 'broker.db'}",
        "scopes_dir": str(scope_folder(base)),
        "signing_key_file": str(key),
        "issuers": [{"name": "corp", "issuer": "https://idp.example.com", "audiences": ["broker"]}],
        "log_level": "warning",
    }
    config.update(overrides)
    return config


@pytest.mark.parametrize(
    ("overrides", "named"),
    [
        ({"vault": {"addr": "http://vault.example.com:8200", "token": "t"}}, "vault.addr"),
        (
            {"vault": {"addr": "https://vault.example.com", "token": "t", "verify_tls": False}},
            "vault.verify_tls",
        ),
        ({"otlp": {"endpoint": "http://collector.example.com:4318"}}, "otlp.endpoint"),
        ({"otlp": {"endpoint": "collector.example.com:4317", "protocol": "grpc"}}, "otlp.endpoint"),
        ({"aws": {"endpoint_url": "http://sts.example.com"}}, "aws.endpoint_url"),
        (
            {
                "webhooks": [
                    {"name": "chat", "url": "http://hooks.example.com/x", "secret": "s" * 20}
                ]
            },
            "webhooks[chat].url",
        ),
        ({"http": {"trusted_proxies": ["0.0.0.0/0"]}}, "http.trusted_proxies"),
    ],
)
def test_production_refuses_unsafe_transport_at_start(
    tmp_path: Path, overrides: dict[str, Any], named: str
) -> None:
    """`broker serve` outside dev mode with plain http to a non-loopback host, TLS checks off,
    or every address trusted as a proxy: it exits at once with a message naming the setting."""
    config = tmp_path / "broker.yaml"
    config.write_text(json.dumps(production_config(tmp_path, **overrides)))
    env = {"BROKER_CONFIG": str(config), "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    result = subprocess.run(
        [sys.executable, "-m", "broker", "serve", "--port", "1"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 2, result.stderr
    assert named in result.stderr
    assert "refusing insecure configuration outside dev mode" in result.stderr


def test_production_serves_no_api_docs_unless_asked(tmp_path: Path) -> None:
    """A sound production configuration starts; /docs, /redoc and /openapi.json are not served;
    with http.public_docs they are, and plain http to a host named in plain_http_hosts is
    accepted (the explicit acknowledgement)."""
    for public, status in ((False, 404), (True, 200)):
        base = tmp_path / f"docs-{public}"
        base.mkdir()
        config = production_config(
            base,
            http={"public_docs": public},
            otlp={"endpoint": "http://otel-collector.internal:4318"},
            plain_http_hosts=["otel-collector.internal"],
        )
        nodes = Cluster(base, config, count=1, migrate=True)
        try:
            nodes.start(wait="/healthz")
            with httpx.Client(base_url=nodes.urls[0], timeout=10) as client:
                for path in ("/docs", "/redoc", "/openapi.json"):
                    assert client.get(path).status_code == status, path
        except Exception:
            print(nodes.logs())
            raise
        finally:
            nodes.stop()
