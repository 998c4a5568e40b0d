"""JSON bodies are parsed in a worker thread, not on the event loop (and mean the same)."""

from __future__ import annotations

import json
import threading
import types
from typing import Any

import httpx
import pytest

from broker.api import json_bodies
from tests.support.issuer import TestIssuer
from tests.support.services import live_broker

GRANT = "urn:ietf:params:oauth:grant-type:token-exchange"
ID_TOKEN = "urn:ietf:params:oauth:token-type:id_token"

pytestmark = pytest.mark.integration


def test_large_json_bodies_are_parsed_off_the_loop(
    make_settings: Any, issuer: TestIssuer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A task request of 9 KB is parsed in one of the pool's worker threads, never in the
    thread running the event loop; a small one is parsed inline; a body that is not JSON is
    still a 422 problem document, and a large valid one still creates its task."""
    threads: list[str] = []

    def recording_loads(data: Any) -> Any:
        threads.append(threading.current_thread().name)
        return json.loads(data)

    monkeypatch.setattr(json_bodies, "json", types.SimpleNamespace(loads=recording_loads))
    with live_broker(make_settings()) as (server, _), httpx.Client(base_url=server.url) as client:
        token = client.post(
            "/oauth2/token",
            data={
                "grant_type": GRANT,
                "subject_token_type": ID_TOKEN,
                "subject_token": issuer.token(),
            },
        ).json()["access_token"]
        auth = {"Authorization": f"Bearer {token}"}
        big = json.dumps({"scope": "vault-kv-read", "purpose": "a large request"}) + " " * 9000
        resp = client.post(
            "/v1/tasks", content=big, headers={**auth, "Content-Type": "application/json"}
        )
        assert resp.status_code == 201, resp.text
        resp = client.post(
            "/v1/tasks",
            content=b"{" + b" " * 9000,
            headers={**auth, "Content-Type": "application/json"},
        )
        assert resp.status_code == 422
        assert resp.headers["content-type"].startswith("application/problem+json")
        client.post("/v1/tasks", json={"scope": "x", "purpose": "small"}, headers=auth)
    loop_thread = server.thread.name
    assert len(threads) == 3
    assert threads[0] != loop_thread and threads[1] != loop_thread
    assert threads[2] == loop_thread
