"""Redaction of credential values in output: every form it promises to catch, across chunk and
truncation boundaries, and the limit it documents (a transformed secret passes)."""

from __future__ import annotations

import base64
import random
import secrets
import sys
from urllib.parse import quote

from broker.client.process import new_span_id, run
from broker.client.redact import REDACTED, StreamRedactor, redact_text, secret_forms

SECRET = "s." + secrets.token_urlsafe(24) + "/+="


def test_the_value_and_its_common_encodings_are_redacted() -> None:
    """Plain, URL-encoded, base64 and URL-safe base64, and base64 inside a longer encoded text
    at every alignment (an HTTP Basic header's ``user:secret``)."""
    raw = SECRET.encode()
    samples = [
        SECRET,
        quote(SECRET, safe=""),
        base64.b64encode(raw).decode(),
        base64.urlsafe_b64encode(raw).decode(),
    ]
    samples += [
        base64.b64encode(prefix.encode() + raw + b"!").decode() for prefix in ("a", "ab", "abc:")
    ]
    for sample in samples:
        out = redact_text(f"before {sample} after", [SECRET])
        assert REDACTED in out, sample
        assert out.startswith("before ") and out.endswith(" after")
    # Not a secret: left alone.
    assert redact_text("nothing to see", [SECRET]) == "nothing to see"


def test_a_transformed_secret_is_not_caught() -> None:
    """The documented limit: a command that reverses (or otherwise transforms) the secret is
    not stopped. Redaction guards against accidents, not against a hostile command."""
    assert SECRET[::-1] in redact_text(SECRET[::-1], [SECRET])


def test_streaming_redaction_matches_redacting_the_whole_text_at_any_chunking() -> None:
    """Fed in random chunks (down to one byte), the redactor releases exactly what redacting the
    whole stream at once gives: a secret split across chunks is still replaced whole."""
    forms = secret_forms([SECRET])
    stream = ("x" * 50 + SECRET + "y" * 7 + base64.b64encode(SECRET.encode()).decode()) * 20
    whole = redact_text(stream, [SECRET]).encode()
    rng = random.Random(14)
    for _ in range(50):
        redactor = StreamRedactor(forms)
        data = stream.encode()
        out = b""
        while data:
            n = rng.randint(1, 40)
            out += redactor.feed(data[:n])
            data = data[n:]
        out += redactor.close()
        assert out == whole


def test_captured_output_is_redacted_before_it_is_cut() -> None:
    """A secret straddling the output limit leaves no prefix behind: the output ends with (part
    of) the marker, never the secret's first characters; the cut is reported."""
    limit = 1000
    for offset in (1, 5, len(SECRET) - 1):
        pad = limit - offset
        script = f"import sys; sys.stdout.write('A' * {pad} + sys.argv[1] + 'B' * 100)"
        result = run(
            [sys.executable, "-c", script, SECRET],
            {"PATH": ""},
            span_id=new_span_id(),
            capture=True,
            timeout=30,
            max_output=limit,
            secret_values=[SECRET],
        )
        out = result.stdout or ""
        assert len(out) == limit and result.truncated
        assert out.startswith("A" * (limit - offset))
        assert SECRET[: min(offset, 4)] not in out[limit - offset :]
        assert (REDACTED + "B" * 100)[:offset] == out[limit - offset :]


def test_a_flood_of_output_is_read_to_the_end_but_not_kept() -> None:
    """50 MB of output: the command is never blocked on a full pipe, only the limit is kept,
    and a secret at the very end does not matter."""
    script = "import sys\nfor _ in range(50): sys.stdout.write('z' * 1_000_000)\nprint(sys.argv[1])"
    result = run(
        [sys.executable, "-c", script, SECRET],
        {"PATH": ""},
        span_id=new_span_id(),
        capture=True,
        timeout=60,
        max_output=4096,
        secret_values=[SECRET],
    )
    assert result.exit_code == 0
    assert result.stdout == "z" * 4096 and result.truncated
