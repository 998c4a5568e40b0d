"""Secret scrubbing and the attribute allowlist: secrets by shape and by key name are removed,
identifiers are kept, sizes are bounded, and sanitizing twice changes nothing."""

from __future__ import annotations

import pytest

from broker.domain.audit import DROPPED_KEY, sanitize_attributes
from broker.domain.scrub import MAX_ITEMS, MAX_TEXT, is_secret_key, scrub_text, scrub_value

JWT = (
    "eyJhbGciOiJFUzI1NiIsImtpZCI6ImFiYyJ9.eyJzdWIiOiJhZ2VudC0xIiwiYXVkIjoiYnJva2VyIn0.c2lnbmF0dXJl"
)


@pytest.mark.parametrize(
    ("text", "gone", "kept"),
    [
        (f"id_token={JWT}", JWT, "id_token="),
        (f"got {JWT} back", JWT, "got "),
        ("brk_sess_AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA", "AAAAAAAAAAAAAAAA", ""),
        ("VAULT_TOKEN=s.AbCdEfGhIjKlMnOpQrStUvWx", "AbCdEfGhIjKlMnOpQrStUvWx", "VAULT_TOKEN="),
        ("hvs.CAESIJabcdefghijklmnopqrstuvwxyz0123", "CAESIJabcdefghij", ""),
        ("token FwoGZXIvYXdzEJr//////////wEaDNXyz0123456789abc", "EJr//////////wEaDN", "token "),
        ("postgresql://app:hunter2hunter2@db:5432/x", "hunter2hunter2", "postgresql://app:"),
        ("Authorization: Bearer abcdefghijklmnop", "abcdefghijklmnop", "Bearer "),
        ('{"client_secret": "s3cr3t-value"}', "s3cr3t-value", "client_secret"),
        ("aws_secret_access_key = wJalrXUtnFEMI/K7MDENG", "wJalrXUtnFEMI", "aws_secret_access_key"),
        (
            "-----BEGIN EC PRIVATE KEY-----\nMHcCAQEEIBase64Stuff\n-----END EC PRIVATE KEY-----",
            "MHcCAQEEIBase64Stuff",
            "",
        ),
    ],
)
def test_secret_shapes_are_redacted(text: str, gone: str, kept: str) -> None:
    """Each secret shape is replaced; the text around it stays readable."""
    out = scrub_text(text)
    assert gone not in out
    assert kept in out
    assert "REDACTED" in out


@pytest.mark.parametrize(
    "text",
    [
        "secret/data/demo/hello",
        "accessor UpVxbNoKKJLDjhSavAcIYN4O",
        "database/creds/readonly/8nB2kL0QqZpXvY3a",
        "AKIAIOSFODNN7EXAMPLE",
        "token_type=Bearer",
        "sha256 " + "ab" * 32,
        "tsk_3mJ0abcdEFGH1234.agent-1",
    ],
)
def test_identifiers_are_kept(text: str) -> None:
    """Accessors, lease ids, access key ids, hashes, task ids and paths are not secrets."""
    assert scrub_text(text) == text


def test_values_under_secret_key_names_are_replaced_whatever_they_look_like() -> None:
    """In mappings, a value under a secret-naming key goes, at any depth; harmless look-alikes
    (``*_sha256``, ``token_type``, ``*_accessor``) stay."""
    value = {
        "password": "x",
        "nested": {"db_password": "y", "list": [{"api_key": "z"}]},
        "token_sha256": "keep",
        "token_type": "keep",
        "client_token_accessor": "keep",
        "secret_id": "gone",
    }
    out = scrub_value(value)
    assert out["password"] == out["nested"]["db_password"] == out["secret_id"] == "[REDACTED]"
    assert out["nested"]["list"][0]["api_key"] == "[REDACTED]"
    assert out["token_sha256"] == out["token_type"] == out["client_token_accessor"] == "keep"
    assert is_secret_key("broker.credential.token") and not is_secret_key(
        "broker.auth.token_sha256"
    )


def test_sizes_are_bounded() -> None:
    """Long strings are cut, long lists and deep nesting are truncated (memory stays bounded)."""
    assert len(scrub_text("a" * (MAX_TEXT * 3))) < MAX_TEXT + 32
    assert len(scrub_value(list(range(MAX_ITEMS * 2)))) == MAX_ITEMS + 1
    deep: dict[str, object] = {}
    cursor = deep
    for _ in range(30):
        cursor["d"] = {}
        cursor = cursor["d"]  # type: ignore[assignment]
    assert "too deep" in str(scrub_value(deep))


def test_the_allowlist_drops_unknown_namespaces_and_says_which() -> None:
    """Only documented namespaces are kept; dropped names are listed; sanitizing is idempotent."""
    attrs = {
        "broker.task.id": "tsk_1",
        "gen_ai.conversation.id": "conv-1",
        "vault.request.path": "secret/data/x",
        "http.request.header.authorization": "Bearer abcdefghijklmnop",
        "password": "hunter2",
        "broker.purpose": f"uses {JWT}",
        "broker.none": None,
    }
    once = sanitize_attributes(attrs)
    assert set(once) == {
        "broker.task.id",
        "gen_ai.conversation.id",
        "vault.request.path",
        "broker.purpose",
        DROPPED_KEY,
    }
    assert once[DROPPED_KEY] == ["http.request.header.authorization", "password"]
    assert JWT not in once["broker.purpose"]
    assert sanitize_attributes(once) == once
