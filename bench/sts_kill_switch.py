"""AWS revocation at volume: 1,000 STS tasks completed on one role, against moto.

The scenario of ``tests/services/test_kill_switch_volume.py`` (which proves every ended session
denied), measured: time per completion (the revocation writes the role's policy), the bare IAM
``PutRolePolicy`` of the same document beside it, the policy's size after every completion next
to IAM's limit and to what one deny per ended session would need. Run alone:
``python -m bench.sts_kill_switch`` (about three minutes); ``--tasks N`` for another volume.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
from pathlib import Path
from typing import Any

from broker.devstack.processes import free_port, start_moto
from tests.support.issuer import TestIssuer
from tests.support.sts_volume import role_for_run, run_volume, volume_broker

RESULTS = Path(__file__).parent / "results"


def run(tasks: int = 1000) -> dict[str, Any]:
    os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
    os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
    issuer = TestIssuer().start()
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp)
        port = free_port()
        moto = start_moto(base / "moto", port)
        try:
            endpoint = f"http://127.0.0.1:{port}"
            role_arn = role_for_run(endpoint)
            broker = volume_broker(base, endpoint, issuer, role_arn)
            try:
                session = broker.sessions.exchange(issuer.token("bench", ttl=20_000)).session
                volume = run_volume(broker, session, role_arn, tasks=tasks, kill_at=tasks // 2)
            finally:
                broker.stop()
        finally:
            moto.stop()
            issuer.stop()
    summary = volume.summary()
    tenth = max(1, len(volume.complete_ms) // 10)
    summary["complete_first_tenth_p50_ms"] = round(statistics.median(volume.complete_ms[:tenth]), 1)
    summary["complete_last_tenth_p50_ms"] = round(statistics.median(volume.complete_ms[-tenth:]), 1)
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tasks", type=int, default=1000)
    args = parser.parse_args()
    summary = run(args.tasks)
    for key, value in summary.items():
        print(f"{key:42} {value}")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "sts_kill_switch.json").write_text(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    main()
