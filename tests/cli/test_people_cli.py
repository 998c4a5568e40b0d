"""`broker approvals list|show|approve|deny` against a running broker over real HTTP."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from broker.cli.main import app
from tests.api.flows import cast, running, settings_for
from tests.support.issuer import TestIssuer

pytestmark = pytest.mark.integration
runner = CliRunner()


@pytest.fixture(autouse=True)
def own_session_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Sessions these tests open are cached under the test's folder, not the user's home."""
    monkeypatch.setenv("BROKER_SESSION_CACHE", str(tmp_path / "sessions.json"))


def test_an_approver_decides_from_the_terminal(
    tmp_path: Path, issuer: TestIssuer, make_settings: Any
) -> None:
    """An approver lists what waits for them, reads one task, approves it; a second task is
    denied; the requester's own attempt is refused with the broker's reason (exit 1)."""
    with running(settings_for(make_settings, issuer)) as (_, client):
        people = cast(client, issuer)
        first = people.agent.request("postgres-readwrite", purpose="fix the invoice table").json()
        second = people.wrong_group.request("postgres-readwrite", purpose="drop a column").json()
        env = {"BROKER_URL": str(client.base_url), "BROKER_SESSION_TOKEN": people.dba.token}

        listed = runner.invoke(app, ["approvals", "list"], env=env)
        assert listed.exit_code == 0, listed.output
        assert first["id"] in listed.stdout and "fix the invoice table" in listed.stdout
        as_json = json.loads(runner.invoke(app, ["approvals", "list", "--json"], env=env).stdout)
        assert {t["task"]["id"] for t in as_json} == {first["id"], second["id"]}

        shown = runner.invoke(app, ["approvals", "show", first["id"]], env=env)
        assert "approvals 0 of 1" in shown.stdout and "risk high" in shown.stdout

        ok = runner.invoke(
            app, ["approvals", "approve", first["id"], "-r", "ticket INC-1"], env=env
        )
        assert (ok.exit_code, ok.stdout.strip()) == (0, f"{first['id']}  approved")
        assert people.agent.task(first["id"])["approvals"][0]["reason"] == "ticket INC-1"

        # With an ID token instead of a session token: the CLI exchanges it first.
        id_token = tmp_path / "id-token"
        id_token.write_text(issuer.token("omar", groups=["dba"], broker_roles=["approver"]))
        no = runner.invoke(
            app,
            [
                "approvals",
                "deny",
                second["id"],
                "--reason",
                "not in prod",
                "--url",
                str(client.base_url),
                "--id-token-file",
                str(id_token),
            ],
        )
        assert no.exit_code == 0, no.output
        assert people.wrong_group.task(second["id"])["state"] == "denied"

        third = people.dba.request("postgres-readwrite").json()
        own = runner.invoke(app, ["approvals", "approve", third["id"], "-r", "me"], env=env)
        assert own.exit_code == 4  # refused
        assert "the requester of a task can never decide it (self_approval)" in own.output


def test_usage_errors(issuer: TestIssuer, make_settings: Any) -> None:
    """No way to sign in is a usage error (2) that names the ID token sources; an unreachable
    broker is exit 7."""
    no_id_token = {
        "BROKER_URL": "http://127.0.0.1:9",
        "BROKER_ID_TOKEN": "",
        "BROKER_ID_TOKEN_FILE": "",
        "BROKER_ID_TOKEN_COMMAND": "",
        "BROKER_SESSION_TOKEN": "",
    }
    missing = runner.invoke(app, ["approvals", "list"], env=no_id_token)
    assert missing.exit_code == 2
    assert "no ID token found" in missing.output and "BROKER_ID_TOKEN_COMMAND" in missing.output
    down = runner.invoke(
        app,
        ["approvals", "list"],
        env={"BROKER_URL": "http://127.0.0.1:9", "BROKER_SESSION_TOKEN": "x"},
    )
    assert down.exit_code == 7 and "cannot reach the broker" in down.output


def test_approvals_show_prints_the_grant_for_these_parameters(
    issuer: TestIssuer, make_settings: Any
) -> None:
    """``broker approvals show`` prints what the credential will grant, rendered for the task's
    parameters (the deploy role, the change ticket as a session tag), then the template's
    backend as written, so the approver sees the value, not the placeholder."""
    with running(settings_for(make_settings, issuer)) as (_, client):
        people = cast(client, issuer)
        task = people.agent.request(
            "aws-deploy", {"environment": "production", "change": "CHG-9911"}
        ).json()
        env = {"BROKER_URL": str(client.base_url), "BROKER_SESSION_TOKEN": people.manager1.token}
        shown = runner.invoke(app, ["approvals", "show", task["id"]], env=env)
        assert shown.exit_code == 0, shown.output
        out = shown.stdout
        grants = out.index("grants    (the template rendered for these parameters)")
        written = out.index("template  (backend as written)")
        assert grants < written
        rendered = out[grants:written]
        assert "arn:aws:iam::123456789012:role/broker-deploy" in rendered
        assert '"change": "CHG-9911"' in rendered and '"environment": "production"' in rendered
        assert "{{params.change}}" not in rendered
        assert "{{params.change}}" in out[written:]
