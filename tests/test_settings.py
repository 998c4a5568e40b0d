"""Settings refuse insecure combinations outside dev mode, with clear messages."""

from __future__ import annotations

from pathlib import Path

import pytest

from broker.errors import ConfigurationError
from broker.settings import load_settings


def issuer(url: str = "https://idp.example.com", **kw: object) -> dict[str, object]:
    return {"name": "idp", "issuer": url, "audiences": ["broker"], **kw}


def test_production_refuses_plain_http_issuer(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match="does not use https"):
        load_settings(
            issuers=[issuer("http://idp.example.com")], signing_key_file=tmp_path / "k.pem"
        )


def test_production_refuses_the_dev_issuer(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match="development issuer"):
        load_settings(issuers=[issuer(preset="dev")], signing_key_file=tmp_path / "k.pem")


def test_production_requires_a_signing_key() -> None:
    with pytest.raises(ConfigurationError, match="signing_key_file"):
        load_settings(issuers=[issuer()])


def test_production_accepts_a_sound_configuration(tmp_path: Path) -> None:
    settings = load_settings(issuers=[issuer()], signing_key_file=tmp_path / "k.pem")
    assert settings.issuers[0].issuer == "https://idp.example.com"


@pytest.mark.parametrize("alg", ["none", "HS256", "HS512"])
def test_symmetric_and_none_algorithms_refuse_to_start(alg: str) -> None:
    with pytest.raises(ConfigurationError, match="only asymmetric"):
        load_settings(dev_mode=True, issuers=[issuer(algorithms=["ES256", alg])])


def test_environment_and_config_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """BROKER_CONFIG names a YAML file; BROKER_* variables override it."""
    config = tmp_path / "broker.yaml"
    config.write_text("dev_mode: true\nsession_max_ttl: 900\nvault:\n  addr: http://127.0.0.1:1\n")
    monkeypatch.setenv("BROKER_CONFIG", str(config))
    monkeypatch.setenv("BROKER_SESSION_MAX_TTL", "600")
    settings = load_settings()
    assert settings.session_max_ttl == 600
    assert settings.vault is not None and settings.vault.addr == "http://127.0.0.1:1"


def test_unknown_keys_are_refused(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    config = tmp_path / "broker.yaml"
    config.write_text("dev_mode: true\nsesion_max_ttl: 900\n")
    monkeypatch.setenv("BROKER_CONFIG", str(config))
    with pytest.raises(ConfigurationError, match="sesion_max_ttl"):
        load_settings()
