"""deploy/kubernetes: rendered (kustomize, when kubectl is installed; the listed files otherwise),
every object validated against the Kubernetes OpenAPI schemas (strict: unknown fields refused)
for the oldest and the newest supported release, and checked for what the deployment promises."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from broker.settings import Settings

REPO = Path(__file__).resolve().parents[2]
KUSTOMIZE = REPO / "deploy" / "kubernetes"
#: The Kubernetes releases the manifests must be valid for.
VERSIONS = ("1.29.0", "1.37.0")


def rendered() -> list[dict[str, Any]]:
    """The objects ``kubectl apply -k deploy/kubernetes`` would send."""
    kubectl = shutil.which("kubectl")
    if kubectl:
        result = subprocess.run(
            [kubectl, "kustomize", str(KUSTOMIZE)], capture_output=True, text=True, check=False
        )
        assert result.returncode == 0, result.stderr
        return [d for d in yaml.safe_load_all(result.stdout) if d]
    kustomization = yaml.safe_load((KUSTOMIZE / "kustomization.yaml").read_text())
    docs: list[dict[str, Any]] = []
    for name in kustomization["resources"]:
        for doc in yaml.safe_load_all((KUSTOMIZE / name).read_text()):
            if doc:
                if doc["kind"] != "Namespace":
                    doc["metadata"]["namespace"] = kustomization["namespace"]
                docs.append(doc)
    return docs


def one(kind: str) -> dict[str, Any]:
    (found,) = [d for d in rendered() if d["kind"] == kind]
    return found


@pytest.mark.parametrize("version", VERSIONS)
def test_every_object_is_valid_kubernetes(version: str) -> None:
    """Each rendered object validates against that release's schema in strict mode."""
    docs = rendered()
    assert {d["kind"] for d in docs} >= {
        "ServiceAccount",
        "ConfigMap",
        "Deployment",
        "Service",
        "PodDisruptionBudget",
    }
    for doc in docs:
        kubernetes_validate.validate(doc, version, strict=True)


def test_the_validation_is_strict() -> None:
    """A misspelt field in the Deployment is refused, so the test above means something."""
    deployment = one("Deployment")
    deployment["spec"]["template"]["spec"]["containers"][0]["livenesProbe"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, VERSIONS[-1], strict=True)


def test_replicas_probes_limits_and_a_disruption_budget() -> None:
    """At least two replicas spread over nodes, rolling updates that never drop below them;
    startup, liveness (/healthz) and readiness (/readyz) probes; requests and limits on every
    container; a PodDisruptionBudget selecting exactly these pods and keeping one."""
    deployment = one("Deployment")
    spec = deployment["spec"]
    assert spec["replicas"] >= 2
    assert spec["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    pod = spec["template"]["spec"]
    assert pod["topologySpreadConstraints"]
    (container,) = pod["containers"]
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["startupProbe"]["httpGet"]["path"] == "/healthz"
    for c in pod["containers"] + pod.get("initContainers", []):
        limits = c["resources"]["limits"]
        requests = c["resources"]["requests"]
        assert limits["cpu"] and limits["memory"] and requests["cpu"] and requests["memory"]
    labels = spec["template"]["metadata"]["labels"]
    assert spec["selector"]["matchLabels"].items() <= labels.items()
    pdb = one("PodDisruptionBudget")
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert 0 < pdb["spec"]["minAvailable"] < spec["replicas"]
    service = one("Service")
    assert service["spec"]["selector"].items() <= labels.items()
    ports = {p["name"] for p in container["ports"]}
    assert all(p["targetPort"] in ports for p in service["spec"]["ports"])


def test_pods_run_locked_down() -> None:
    """Non-root (the image's uid), no privilege escalation, a read-only root filesystem, no
    capabilities, the RuntimeDefault seccomp profile, and no Kubernetes API token mounted."""
    deployment = one("Deployment")
    pod = deployment["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == 10001
    assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
    assert pod["automountServiceAccountToken"] is False
    assert one("ServiceAccount")["automountServiceAccountToken"] is False
    for c in pod["containers"] + pod["initContainers"]:
        sc = c["securityContext"]
        assert sc["allowPrivilegeEscalation"] is False
        assert sc["readOnlyRootFilesystem"] is True
        assert sc["capabilities"]["drop"] == ["ALL"]
        assert not c["image"].endswith(":latest")
    dockerfile = (REPO / "deploy" / "Dockerfile").read_text()
    assert "USER 10001:10001" in dockerfile


def test_the_broker_logs_in_to_vault_with_its_projected_service_account_token(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The pod runs as the ``broker`` ServiceAccount and mounts a projected token of it with
    audience ``vault`` at the path the broker's settings read (``vault.jwt_file``, JWT login,
    re-read at each login); the ConfigMap's settings, with the Deployment's environment, are
    accepted outside dev mode."""
    deployment = one("Deployment")
    pod = deployment["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == one("ServiceAccount")["metadata"]["name"]
    (projected,) = [v for v in pod["volumes"] if "projected" in v]
    (source,) = projected["projected"]["sources"]
    token = source["serviceAccountToken"]
    assert token["audience"] == "vault" and token["expirationSeconds"] <= 3600
    (container,) = pod["containers"]
    (mount,) = [m for m in container["volumeMounts"] if m["name"] == projected["name"]]
    token_path = f"{mount['mountPath']}/{token['path']}"

    config = next(
        d
        for d in rendered()
        if d["kind"] == "ConfigMap" and d["metadata"]["name"] == "broker-config"
    )
    settings_file = tmp_path / "broker.yaml"
    settings_file.write_text(config["data"]["broker.yaml"])
    for key in [k for k in os.environ if k.startswith("BROKER_")]:
        monkeypatch.delenv(key)
    for item in container["env"]:
        # Secret references stand for a value the operator puts in the Secret.
        value = item.get("value", "postgresql://broker:x@postgres.example:5432/broker")
        monkeypatch.setenv(item["name"], value)
    monkeypatch.setenv("BROKER_CONFIG", str(settings_file))
    settings = Settings()
    assert settings.dev_mode is False
    assert settings.vault is not None
    assert settings.vault.auth_method == "jwt"
    assert str(settings.vault.jwt_file) == token_path
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    assert str(settings.signing_key_file).startswith("/etc/broker/keys/")
    assert mounts["/etc/broker/keys"]["readOnly"] is True
    assert str(settings.scopes_dir) in mounts
    # The image's data folder is writable (an emptyDir), the rest of the filesystem is not.
    assert "/var/lib/broker" in mounts and "/tmp" in mounts
