"""PostgreSQL round trips per issuance step: a count, not a time, so it holds on a noisy machine.

Counts psycopg's waits for the server (one per statement, BEGIN and COMMIT) while one broker,
built in this process on a fresh PostgreSQL database, serves exchange, resolve (what every
authenticated request does first), task, mint (broker-signed JWT: no backend round trip) and
complete. Run alone: ``python -m bench.roundtrips``.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import psycopg

from broker.services.tasks import TaskRequest
from broker.settings import Settings
from broker.store.migrate import upgrade
from broker.wiring import build_broker
from tests.replicas.cluster import scope_folder
from tests.support.issuer import TestIssuer
from tests.support.services import pg_database


def run() -> dict[str, Any]:
    counter = {"n": 0}
    original = psycopg.Connection.wait

    def counting(self: psycopg.Connection[Any], gen: Any, *args: Any, **kwargs: Any) -> Any:
        counter["n"] += 1
        return original(self, gen, *args, **kwargs)

    issuer = TestIssuer().start()
    psycopg.Connection.wait = counting  # type: ignore[method-assign]
    try:
        with tempfile.TemporaryDirectory() as tmp, pg_database() as url:
            base = Path(tmp)
            upgrade(url)
            settings = Settings(
                dev_mode=True,
                data_dir=base / "data",
                database_url=url,
                scopes_dir=scope_folder(base),
                scopes_reload_interval=0,
                issuers=[issuer.issuer_config()],
            )
            broker = build_broker(settings)
            try:

                def measured(fn: Any) -> tuple[Any, int]:
                    before = counter["n"]
                    value = fn()
                    return value, counter["n"] - before

                steps: dict[str, int] = {}
                for i in range(6):  # warm: caches, prepared statements, pool
                    issued, steps["exchange"] = measured(
                        lambda i=i: broker.sessions.exchange(issuer.token(f"rt-{i}", ttl=3600))
                    )
                    session, steps["resolve"] = measured(
                        lambda issued=issued: broker.sessions.resolve(issued.token)
                    )
                    task, steps["task"] = measured(
                        lambda session=session: (
                            broker.tasks.submit(
                                session, TaskRequest(scope="replica-jwt", params={}, purpose="rt")
                            ).task
                        )
                    )
                    _, steps["mint"] = measured(
                        lambda session=session, task=task: broker.credentials.mint(session, task.id)
                    )
                    _, steps["complete"] = measured(
                        lambda session=session, task=task: broker.tasks.complete(session, task.id)
                    )
            finally:
                broker.stop()
    finally:
        psycopg.Connection.wait = original  # type: ignore[method-assign]
        issuer.stop()
    # Over HTTP, task, mint and complete each resolve the session first.
    steps["issuance over HTTP"] = (
        steps["exchange"] + steps["task"] + steps["mint"] + steps["complete"] + 3 * steps["resolve"]
    )
    return steps


if __name__ == "__main__":
    print(run())
