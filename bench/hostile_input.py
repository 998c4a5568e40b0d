"""What hostile input costs: refusal times over a corpus of hostile tokens, bodies and heads,
next to a valid token's, and /healthz latency while 8 clients flood hostile tokens.

Run: ``.venv/bin/python -m bench.hostile_input [--rounds 30] [--flood-seconds 15]``.

1. **In process**: the real verifier (keys over real HTTP from a test issuer, trust rules with a
   pattern that backtracks exponentially in Python's ``re`` and a CEL rule) verifies each
   hostile token ``rounds`` times; median and worst per shape, next to a valid token's. The
   nesting check the verifier used before (quadratic on quote soup) is timed beside it.
2. **Over HTTP** against a real ``broker serve`` (SQLite, dev mode): each hostile token, body
   and request head, ``rounds`` times from fresh client addresses (so every refusal does the
   full work, none is short-cut by throttling); median and worst per shape.
3. **Flood**: 8 client threads send hostile tokens as fast as the broker answers, each from its
   own address (throttled after 30 failures: the common case) and then each request from a
   fresh address (a distributed flood: every refusal verified and audited as a first), while
   a ninth polls ``/healthz``; its p50/p95/p99/max.

Prints tables and writes ``bench/results/hostile_input.json``; the load average is recorded
before and after (other work on the machine inflates every figure).
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import json
import os
import re
import secrets
import socket
import statistics
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

from broker.errors import BrokerError
from broker.oidc.jose import MalformedInput, strict_json
from broker.oidc.verifier import TokenVerifier
from broker.settings import IssuerConfig
from tests.oidc.tokens import b64, forge
from tests.replicas.cluster import GRANT, ID_TOKEN, Cluster, base_config, scope_folder
from tests.support.issuer import TestIssuer, new_key

RESULTS = Path(__file__).parent / "results" / "hostile_input.json"
TRUST = {
    "any": [
        {"claim": "team", "regex": "(a+)+b"},  # exponential in Python's re, linear in RE2
        {"cel": "claims.groups.exists(g, g == 'platform')"},
        {"claim": "sub", "regex": "[A-Za-z0-9._:/@-]{1,128}"},
    ]
}


def ms(seconds: float) -> float:
    return round(seconds * 1000, 3)


def corpus(issuer: TestIssuer, crowded: TestIssuer) -> dict[str, str]:
    """Hostile subject tokens by shape (every one refused)."""
    key = issuer.keys[0]
    head = {"alg": "ES256", "kid": key.kid, "typ": "JWT"}
    now = int(time.time())
    claims = {"iss": issuer.url, "sub": "agent", "aud": "broker", "iat": now, "exp": now + 600}
    nested: Any = "x"
    for _ in range(15):
        nested = [nested, nested, nested] if len(json.dumps(nested)) < 3000 else [nested]
    wide = {f"k{i}": i for i in range(1500)}
    rand = base64.urlsafe_b64encode(secrets.token_bytes(4000)).decode().rstrip("=")
    attacker = new_key(key.kid)
    crowded_kid = crowded.keys[0].kid
    return {
        "oversized (20 KB)": "x" * 20_000,
        "many segments (8000)": "a." * 8000,
        "dots only (16 KB)": "." * 16_000,
        "base64 garbage, 3 segments": f"{rand[:5000]}.{rand[5000:]}.{rand[:100]}",
        "non-canonical base64": b64(head)[:-1] + "B." + b64(claims) + ".AB",
        "escaped-quote soup (12 KB header)": b64('"' + '\\"' * 5500) + ".e30.",
        "quote soup (12 KB)": b64('"' * 11_000) + ".e30.",
        "deep arrays (12 KB)": b64("[" * 11_000) + ".e30.",
        "deep objects": b64(head) + "." + b64('{"a":' * 2000 + "1" + "}" * 2000) + ".x",
        "1500-key header": b64({**head, **wide}) + "." + b64(claims) + ".x",
        "duplicate members": b64('{"alg":"ES256","alg":"none"}') + "." + b64(claims) + ".x",
        "4000-digit exp": b64(head)
        + "."
        + b64(json.dumps(claims)[:-1] + ',"n":' + "9" * 4000 + "}")
        + ".x",
        "lone surrogates": b64(head) + "." + b64('{"sub":"' + "\\ud800" * 1500 + '"}') + ".x",
        "alg none": b64({"alg": "none"}) + "." + b64(claims) + ".",
        "HS256 with the public key": forge(
            {"alg": "HS256", "kid": key.kid}, claims, alg="HS256", secret=b"k"
        ),
        "crit header": forge({**head, "crit": ["exp"]}, claims, key=key),
        "unknown kid": forge({**head, "kid": uuid.uuid4().hex}, claims, key=attacker),
        "forged signature": forge(head, claims, key=attacker),
        "zero signature": b64(head) + "." + b64(claims) + "." + b64(b"\x00" * 64),
        "at+jwt as an ID token": forge({**head, "typ": "at+jwt"}, claims, key=key),
        "unknown issuer": forge(head, {**claims, "iss": "https://evil.example"}, key=attacker),
        "expired": forge(head, {**claims, "exp": now - 3600, "iat": now - 7200}, key=key),
        "audience mismatch": forge(head, {**claims, "aud": ["broker", "evil"]}, key=key),
        "signed, nested claim arrays (depth 15)": forge(
            head, {**claims, "sub": "!", "deep": nested}, key=key
        ),
        "signed, pathological regex input": forge(
            head, {**claims, "sub": "!", "team": "a" * 5000 + "!"}, key=key
        ),
        "signed, CEL over 1500 groups": forge(
            head, {**claims, "sub": "!", "groups": [f"g{i}" for i in range(1500)]}, key=key
        ),
        "JWKS confusion: 60 keys, one kid": forge(
            {"alg": "ES256", "kid": crowded_kid}, {**claims, "iss": crowded.url}, key=attacker
        ),
    }


def time_each(fn: Callable[[], object], rounds: int) -> list[float]:
    out = []
    for _ in range(rounds):
        start = time.perf_counter()
        with contextlib.suppress(BrokerError, MalformedInput):
            fn()
        out.append(time.perf_counter() - start)
    return out


def old_depth_check(text: str) -> None:
    """The nesting check as it was before this change (quadratic on quote soup)."""
    strings = re.compile(r'"(?:[^"\\]|\\.)*"', re.DOTALL)
    depth = 0
    for match in re.finditer(r"[\[\]{}]", strings.sub('""', text)):
        depth += 1 if match.group() in "[{" else -1


def in_process(rounds: int) -> dict[str, Any]:
    issuer, crowded = TestIssuer().start(), TestIssuer().start()
    kid = crowded.keys[0].kid
    crowded.extra_jwks = [new_key(kid).jwk() for _ in range(59)]
    try:
        with httpx.Client() as http:
            verifier = TokenVerifier(
                [
                    IssuerConfig(**issuer.issuer_config(trust=TRUST)),
                    IssuerConfig(**crowded.issuer_config(name="crowded")),
                ],
                http,
                allow_http_loopback=True,
            )
            valid = issuer.token(ttl=3600, groups=["platform"])
            verifier.verify(valid)
            tokens = corpus(issuer, crowded)
            for token in tokens.values():  # warm caches (keys, unknown-kid refetch)
                time_each(lambda t=token: verifier.verify(t), 1)
            rows = {}
            for shape, token in tokens.items():
                times = time_each(lambda t=token: verifier.verify(t), rounds)
                rows[shape] = {
                    "median_ms": ms(statistics.median(times)),
                    "worst_ms": ms(max(times)),
                }
            good = time_each(lambda: verifier.verify(valid), rounds * 3)
            soup = '"' + '\\"' * 5500
            old = time_each(lambda: old_depth_check(soup), 3)
            new = time_each(lambda: strict_json(soup.encode()), 3)
    finally:
        issuer.stop()
        crowded.stop()
    return {
        "valid_token": {"median_ms": ms(statistics.median(good)), "worst_ms": ms(max(good))},
        "refusals": rows,
        "nesting_check_on_quote_soup": {
            "before_ms": ms(statistics.median(old)),
            "now_ms": ms(statistics.median(new)),
        },
    }


# --- over HTTP --------------------------------------------------------------------------------


def raw_request(port: int, data: bytes) -> None:
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(data)
        answer = b""
        while b"\r\n\r\n" not in answer:
            chunk = sock.recv(65536)
            if not chunk:
                break
            answer += chunk


def http_cases(
    issuer: TestIssuer, crowded: TestIssuer, port: int
) -> dict[str, Callable[[httpx.Client, str], object]]:
    def token_case(token: str) -> Callable[[httpx.Client, str], object]:
        return lambda c, addr: c.post(
            "/oauth2/token",
            data={"grant_type": GRANT, "subject_token_type": ID_TOKEN, "subject_token": token},
            headers={"X-Forwarded-For": addr},
        )

    cases = {f"token: {k}": token_case(v) for k, v in corpus(issuer, crowded).items()}
    deep = b"[" * 60_000
    cases.update(
        {
            "body: 1 GB declared": lambda c, a: raw_request(
                port,
                b"POST /oauth2/token HTTP/1.1\r\nHost: b\r\nContent-Length: 1000000000\r\n\r\n",
            ),
            "body: 60 KB nested JSON, no session": lambda c, a: c.post(
                "/v1/tasks",
                content=deep,
                headers={"Content-Type": "application/json", "X-Forwarded-For": a},
            ),
            "body: 60 KB many-key JSON": lambda c, a: c.post(
                "/v1/tasks",
                content=json.dumps(
                    {"scope": "x", "purpose": "p", "params": {f"p{i}": i for i in range(6000)}}
                ).encode(),
                headers={"Content-Type": "application/json", "X-Forwarded-For": a},
            ),
            "body: 200 KB JSON (over the cap)": lambda c, a: c.post(
                "/v1/tasks",
                content=b" " * 200_000,
                headers={"Content-Type": "application/json", "X-Forwarded-For": a},
            ),
            "form: 10,000 fields": lambda c, a: c.post(
                "/oauth2/token",
                content=b"&".join(b"f%d=1" % i for i in range(3000)),
                headers={"Content-Type": "application/x-www-form-urlencoded", "X-Forwarded-For": a},
            ),
            "head: 15 KB header": lambda c, a: c.get("/healthz", headers={"X-Big": "v" * 15_000}),
            "head: 80 headers": lambda c, a: c.get(
                "/healthz", headers={f"X-H{i}": "v" for i in range(80)}
            ),
            "head: 200 KB header": lambda c, a: raw_request(
                port, b"GET /healthz HTTP/1.1\r\nHost: b\r\nX: " + b"v" * 200_000 + b"\r\n\r\n"
            ),
            "bearer: 500 random characters": lambda c, a: c.get(
                "/v1/sessions/current",
                headers={
                    "Authorization": "Bearer " + secrets.token_urlsafe(375),
                    "X-Forwarded-For": a,
                },
            ),
            "bearer: 12 KB": lambda c, a: c.get(
                "/v1/sessions/current",
                headers={"Authorization": "Bearer " + "a" * 12_000, "X-Forwarded-For": a},
            ),
        }
    )
    return cases


def fresh_address() -> str:
    return f"10.{secrets.randbelow(250)}.{secrets.randbelow(250)}.{secrets.randbelow(250) + 1}"


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def flood(url: str, tokens: list[str], seconds: float, distributed: bool) -> dict[str, Any]:
    stop = threading.Event()
    sent = [0] * 8
    health: list[float] = []

    def attacker(i: int) -> None:
        own = fresh_address()
        transport = httpx.HTTPTransport(local_address="127.0.0.2")
        with httpx.Client(base_url=url, transport=transport, timeout=60) as client:
            n = 0
            while not stop.is_set():
                token = tokens[n % len(tokens)]
                client.post(
                    "/oauth2/token",
                    data={
                        "grant_type": GRANT,
                        "subject_token_type": ID_TOKEN,
                        "subject_token": token,
                    },
                    headers={"X-Forwarded-For": fresh_address() if distributed else own},
                )
                n += 1
            sent[i] = n

    def poller() -> None:
        with httpx.Client(base_url=url, timeout=60) as client:
            while not stop.is_set():
                start = time.perf_counter()
                client.get("/healthz")
                health.append(time.perf_counter() - start)
                time.sleep(0.02)  # a load balancer's probe rate, not synchronisation

    threads = [threading.Thread(target=attacker, args=(i,)) for i in range(8)]
    threads.append(threading.Thread(target=poller))
    for thread in threads:
        thread.start()
    time.sleep(seconds)  # the flood's duration
    stop.set()
    for thread in threads:
        thread.join(120)
    return {
        "hostile_requests_per_s": round(sum(sent) / seconds, 1),
        "healthz_samples": len(health),
        "healthz_p50_ms": ms(percentile(health, 0.50)),
        "healthz_p95_ms": ms(percentile(health, 0.95)),
        "healthz_p99_ms": ms(percentile(health, 0.99)),
        "healthz_max_ms": ms(max(health)),
    }


def over_http(rounds: int, flood_seconds: float, auth_concurrency: int) -> dict[str, Any]:
    issuer, crowded = TestIssuer().start(), TestIssuer().start()
    crowded.extra_jwks = [new_key(crowded.keys[0].kid).jwk() for _ in range(59)]
    base = Path(tempfile.mkdtemp(prefix="bench-hostile-"))
    config = base_config(
        database_url=f"sqlite:///{base / 'broker.db'}",
        issuer=issuer,
        scopes_dir=scope_folder(base),
        issuers=[
            issuer.issuer_config(trust=TRUST),
            crowded.issuer_config(name="crowded"),
        ],
        http={"trusted_proxies": ["127.0.0.2"], "auth_concurrency": auth_concurrency},
        auth_limits={"per_address": 30, "window": 60},
    )
    node = Cluster(base, config, count=1, migrate=True)
    node.start()
    try:
        url = node.urls[0]
        port = int(url.rsplit(":", 1)[1])
        transport = httpx.HTTPTransport(local_address="127.0.0.2")
        rows: dict[str, Any] = {}
        with httpx.Client(base_url=url, transport=transport, timeout=60) as client:
            valid = []
            for _ in range(rounds):
                token = issuer.token(f"bench-{uuid.uuid4().hex[:8]}", ttl=600, groups=["platform"])
                start = time.perf_counter()
                resp = client.post(
                    "/oauth2/token",
                    data={
                        "grant_type": GRANT,
                        "subject_token_type": ID_TOKEN,
                        "subject_token": token,
                    },
                    headers={"X-Forwarded-For": fresh_address()},
                )
                valid.append(time.perf_counter() - start)
                assert resp.status_code == 200, resp.text
            for name, case in http_cases(issuer, crowded, port).items():
                case(client, fresh_address())  # warm up
                times = []
                for _ in range(rounds):
                    addr = fresh_address()
                    start = time.perf_counter()
                    case(client, addr)
                    times.append(time.perf_counter() - start)
                rows[name] = {"median_ms": ms(statistics.median(times)), "worst_ms": ms(max(times))}
        tokens = list(corpus(issuer, crowded).values())
        floods = {
            "8 clients, one address each": flood(url, tokens, flood_seconds, distributed=False),
            "8 clients, a fresh address per request": flood(
                url, tokens, flood_seconds, distributed=True
            ),
        }
    finally:
        node.stop()
        issuer.stop()
        crowded.stop()
    return {
        "valid_exchange": {"median_ms": ms(statistics.median(valid)), "worst_ms": ms(max(valid))},
        "refusals": rows,
        "flood": floods,
    }


def table(title: str, rows: dict[str, Any]) -> None:
    print(f"\n{title}")
    width = max(len(k) for k in rows)
    print(f"  {'shape':<{width}}  {'median ms':>10}  {'worst ms':>10}")
    for name, row in rows.items():
        print(f"  {name:<{width}}  {row['median_ms']:>10.3f}  {row['worst_ms']:>10.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--flood-seconds", type=float, default=15.0)
    parser.add_argument("--auth-concurrency", type=int, default=4, help="http.auth_concurrency")
    parser.add_argument("--flood-only", action="store_true", help="skip the per-shape tables")
    args = parser.parse_args()
    load_before = os.getloadavg()
    local = in_process(args.rounds) if not args.flood_only else None
    remote = over_http(
        1 if args.flood_only else args.rounds, args.flood_seconds, args.auth_concurrency
    )
    if local is None:
        print(f"load before {load_before}, after {os.getloadavg()}")
        for name, row in remote["flood"].items():
            print(f"flood (auth_concurrency {args.auth_concurrency}), {name}: {row}")
        return
    load_after = os.getloadavg()
    result = {
        "when": time.strftime("%Y-%m-%d %H:%M"),
        "cpus": os.cpu_count(),
        "auth_concurrency": args.auth_concurrency,
        "load_before": [round(v, 2) for v in load_before],
        "load_after": [round(v, 2) for v in load_after],
        "in_process": local,
        "http": remote,
    }
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(f"load average before {load_before}, after {load_after}")
    print(f"valid token verify: {local['valid_token']}")
    table("in process: verifier refusals", local["refusals"])
    print(f"nesting check on 11 KB of escaped quotes: {local['nesting_check_on_quote_soup']}")
    print(f"\nvalid exchange over HTTP: {remote['valid_exchange']}")
    table("over HTTP: refusals (client-side latency)", remote["refusals"])
    for name, row in remote["flood"].items():
        print(f"\nflood, {name}: {row}")


if __name__ == "__main__":
    main()
