"""Token verification speed: cached keys, refused tokens, and a flood of unknown kids.

Run: ``.venv/bin/python -m bench.oidc_verify [--seconds 3]``. Prints verifications per second
for each case and the issuer's key fetches during the flood (expected: one per cooldown).
"""

from __future__ import annotations

import argparse
import contextlib
import time
import uuid
from collections.abc import Callable

import httpx
import jwt

from broker.errors import BrokerError
from broker.oidc.verifier import TokenVerifier
from broker.settings import IssuerConfig
from tests.support.issuer import TestIssuer, new_key


def rate(fn: Callable[[], object], seconds: float) -> float:
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        with contextlib.suppress(BrokerError):
            fn()
        count += 1
    return count / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=3.0)
    args = parser.parse_args()
    issuer = TestIssuer().start()
    try:
        with httpx.Client() as http:
            verifier = TokenVerifier(
                [IssuerConfig(**issuer.issuer_config())], http, allow_http_loopback=True
            )
            good = issuer.token(ttl=3600)
            verifier.verify(good)
            print(
                f"valid ES256 token, cached keys: {rate(lambda: verifier.verify(good), args.seconds):9.0f}/s"
            )
            unknown = jwt.encode(
                {"iss": "https://unknown.example", "sub": "x"}, new_key().private, algorithm="ES256"
            )
            print(
                f"unknown issuer:                 {rate(lambda: verifier.verify(unknown), args.seconds):9.0f}/s"
            )
            garbage = "x" * 20_000
            print(
                f"oversized token:                {rate(lambda: verifier.verify(garbage), args.seconds):9.0f}/s"
            )
            before = issuer.fetch_count()
            attacker = new_key()

            def random_kid() -> object:
                return verifier.verify(
                    jwt.encode(
                        {"iss": issuer.url, "sub": "x", "aud": "broker", "exp": 2**31, "iat": 0},
                        attacker.private,
                        algorithm="ES256",
                        headers={"kid": uuid.uuid4().hex},
                    )
                )

            flood = rate(random_kid, args.seconds)
            print(
                f"random-kid flood:               {flood:9.0f}/s, "
                f"{issuer.fetch_count() - before} key fetches in {args.seconds:.0f} s"
            )
    finally:
        issuer.stop()


if __name__ == "__main__":
    main()
