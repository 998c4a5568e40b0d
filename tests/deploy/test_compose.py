"""deploy/compose.yaml: valid against the Compose Specification's JSON schema, wired as documented,
its broker settings accepted in production mode, its OpenBao provisioning run on a real OpenBao."""

from __future__ import annotations

import importlib.resources
import json
import os
import re
import subprocess
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from broker.backends.base import MintRequest
from broker.backends.vault import VaultBackend
from broker.devstack import openbao as bao_provision
from broker.devstack.processes import bao_binary, free_port, start_openbao
from broker.domain.scope import VaultTokenBackend
from broker.settings import Settings, VaultSettings

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
COMPOSE = DEPLOY / "compose.yaml"


def compose() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load(COMPOSE.read_text())
    return data


def compose_schema() -> dict[str, Any]:
    """The Compose Specification schema as vendored by check-jsonschema (a dev dependency)."""
    text = (
        importlib.resources.files("check_jsonschema.builtin_schemas.vendor")
        .joinpath("compose-spec.json")
        .read_text()
    )
    schema: dict[str, Any] = json.loads(text)
    return schema


def test_the_compose_file_matches_the_compose_specification() -> None:
    """The whole file (anchors and merge keys resolved, as Compose does) validates against the
    Compose Specification schema; a typo in a key would not."""
    validator = jsonschema.Draft202012Validator(compose_schema())
    errors = sorted(validator.iter_errors(compose()), key=lambda e: list(e.path))
    assert not errors, [f"{list(e.path)}: {e.message}" for e in errors[:5]]
    broken = compose()
    broken["services"]["broker-1"]["helthcheck"] = broken["services"]["broker-1"].pop("healthcheck")
    assert list(validator.iter_errors(broken)), "the schema must refuse unknown keys"


def test_two_broker_replicas_and_every_part_are_there() -> None:
    """Two broker replicas from one image with health checks and hardening, behind a load
    balancer naming both; PostgreSQL, OpenBao, an OpenTelemetry Collector and Jaeger; the
    replicas start only once the schema is migrated, the signing key made and OpenBao
    provisioned; every file mounted from the repository exists."""
    services = compose()["services"]
    brokers = {name: s for name, s in services.items() if name.startswith("broker-")}
    assert sorted(brokers) == ["broker-1", "broker-2"]
    assert len({json.dumps(s, sort_keys=True) for s in brokers.values()}) == 1
    broker = brokers["broker-1"]
    assert "/readyz" in " ".join(broker["healthcheck"]["test"])
    assert broker["read_only"] is True and broker["cap_drop"] == ["ALL"]
    assert broker["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
    assert broker["depends_on"]["keygen"]["condition"] == "service_completed_successfully"
    assert broker["depends_on"]["openbao-init"]["condition"] == "service_completed_successfully"
    for part in ("postgres", "openbao", "otel-collector", "jaeger", "lb"):
        assert part in services, part
    nginx = (DEPLOY / "compose" / "nginx.conf").read_text()
    assert "server broker-1:8080" in nginx and "server broker-2:8080" in nginx
    assert "non_idempotent" not in nginx  # a POST (a mint) is never replayed elsewhere
    for name, service in services.items():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (DEPLOY / source).exists(), f"{name}: {source}"
        image = service.get("image", "")
        assert image and not image.endswith(":latest"), f"{name}: {image}"
        assert ":" in image.split("/")[-1], f"{name}: pin the image tag ({image})"


def test_the_collector_forwards_to_jaeger_and_the_brokers_export_to_it() -> None:
    """The brokers' OTLP endpoint is the collector's OTLP/HTTP receiver; the collector's trace
    pipeline exports to Jaeger's OTLP port."""
    collector = yaml.safe_load((DEPLOY / "compose" / "otel-collector.yaml").read_text())
    assert collector["receivers"]["otlp"]["protocols"]["http"]["endpoint"].endswith(":4318")
    pipeline = collector["service"]["pipelines"]["traces"]
    assert "otlp" in pipeline["receivers"]
    jaeger = [e for e in pipeline["exporters"] if e.startswith("otlp/")]
    assert jaeger and collector["exporters"][jaeger[0]]["endpoint"] == "jaeger:4317"
    settings = yaml.safe_load((DEPLOY / "compose" / "broker.yaml").read_text())
    assert settings["otlp"]["endpoint"] == "http://otel-collector:4318"
    assert settings["vault"]["addr"] == "http://openbao:8200"


def test_the_compose_settings_load_in_production_mode(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The replicas' settings file, with the environment compose gives them, is accepted by the
    broker outside dev mode (https issuers, a signing key file); the key the ``keygen`` service
    makes is one the broker signs checkpoints and tokens with."""
    for key in [k for k in os.environ if k.startswith("BROKER_")]:
        monkeypatch.delenv(key)
    env = compose()["services"]["broker-1"]["environment"]
    monkeypatch.setenv("BROKER_CONFIG", str(DEPLOY / "compose" / "broker.yaml"))
    for key, value in env.items():
        if key != "BROKER_CONFIG":
            monkeypatch.setenv(key, re.sub(r"\$\{[^}]*\}", "x", value))
    settings = Settings()
    assert settings.dev_mode is False
    assert settings.database_url is not None and settings.database_url.startswith("postgresql://")
    assert settings.vault is not None and settings.vault.token is not None

    # Run the keygen service's program against a temporary folder.
    program = compose()["services"]["keygen"]["command"][0]
    key_file = tmp_path / "signing-key.pem"
    program = program.replace("/var/lib/broker/keys/signing-key.pem", str(key_file))
    exec(compile(program, "keygen", "exec"), {})  # our own compose file's program
    assert key_file.stat().st_mode & 0o777 == 0o400
    from broker.audit.checkpoints import FileKeySigner
    from broker.keyring import algorithm_of, load_private_key

    signer = FileKeySigner.from_settings(settings.model_copy(update={"signing_key_file": key_file}))
    key_id, signature = signer.sign(b"checkpoint")
    assert signer.verify(key_id, b"checkpoint", signature)
    assert algorithm_of(load_private_key(key_file)) == "ES256"
    from broker.audit.runtime import checkpoint_verifier

    keyed = settings.model_copy(update={"signing_key_file": key_file})
    assert checkpoint_verifier(keyed).verify(key_id, b"checkpoint", signature)


@pytest.mark.integration
def test_the_openbao_provisioning_script_works_on_a_real_openbao(tmp_path: Path) -> None:
    """``compose/openbao-init.sh`` run against a real OpenBao dev server (as the
    ``openbao-init`` service runs it): the broker's token it makes can create an agent token
    through the ``broker-child`` role, and it grants exactly the policy the tests prove the
    broker works with. Running it twice changes nothing (compose runs it on every start)."""
    script = DEPLOY / "compose" / "openbao-init.sh"
    for line in bao_provision.BROKER_POLICY.strip().splitlines():
        assert line.strip() in script.read_text(), line
    root = "root-compose-test"
    port = free_port()
    proc = start_openbao(tmp_path, port, root)
    try:
        env = {
            **os.environ,
            "PATH": f"{Path(bao_binary()).parent}:{os.environ.get('PATH', '')}",
            "HOME": str(tmp_path / "bao-home"),
            "BAO_ADDR": f"http://127.0.0.1:{port}",
            "BAO_TOKEN": root,
            "BROKER_VAULT_TOKEN": "compose-broker-token",
        }
        for _ in range(2):
            result = subprocess.run(
                ["/bin/sh", str(script)], env=env, capture_output=True, text=True, check=False
            )
            assert result.returncode == 0, result.stdout + result.stderr
        backend = VaultBackend(
            VaultSettings(
                addr=f"http://127.0.0.1:{port}",
                token="compose-broker-token",
                token_role="broker-child",
                lease_token_role="broker-lease",
            ),
            cluster="compose",
        )
        backend.health()
        request = MintRequest(
            task_id="tsk_compose",
            credential_id="crd_compose",
            scope="vault-kv-read",
            issuer="https://issuer.example",
            subject="agent",
            ttl=300,
            spec=VaultTokenBackend(type="vault_token", policies=["kv-read"]),
            params={},
            max_uses=None,
            session_id="ses_compose",
            cluster="compose",
        )
        minted = backend.mint(request)
        assert "kv-read" in minted.details["policies"]
        assert "root" not in minted.details["policies"]
        assert [o.credential_id for o in backend.inventory("compose")] == ["crd_compose"]
    finally:
        proc.stop()
