"""Redaction of a credential's values in a command's output and command line: against accidents.

What it does: every occurrence of a secret value, of its URL encoding and of its base64 encoding
(standard and URL-safe alphabets, at any of the three byte alignments, so a secret inside a
longer base64 text such as an HTTP Basic header is found too) is replaced by ``[redacted]``.
Output is redacted as a stream, before anything is cut to size: a secret that straddles a read
boundary or the output limit is replaced whole, never leaving a prefix behind.

What it cannot do: the command holds the credential in its environment and can print it
reversed, split, compressed or encrypted, or send it anywhere. Redaction keeps an honest
program's output (a debug line, an error echoing a URL) from carrying the secret into an
agent's transcript; it is no barrier against a hostile one. Only a credential-injection proxy,
which keeps the secret out of the agent's environment altogether, is.
"""

from __future__ import annotations

import base64
from collections.abc import Callable, Iterable, Sequence
from urllib.parse import quote

REDACTED = "[redacted]"
#: Encoded forms shorter than this are not redacted: they would match innocent text.
MIN_FORM = 8


def _base64_cores(secret: bytes, encode: Callable[[bytes], bytes]) -> list[bytes]:
    """The base64 characters determined by ``secret`` alone, at each of the three alignments it
    can have inside a longer encoded text."""
    cores = []
    for offset in range(3):
        text: bytes = encode(b"\0" * offset + secret).rstrip(b"=")
        first = -(-8 * offset // 6)  # the first character made of secret bits only
        last = (8 * (offset + len(secret))) // 6  # one past the last such character
        core = text[first:last]
        if len(core) >= MIN_FORM:
            cores.append(core)
    return cores


def secret_forms(values: Iterable[str]) -> list[bytes]:
    """Each value and its common encodings, longest first (so no fragment of one survives).

    Encodings shorter than :data:`MIN_FORM` are left out (they would match innocent text); the
    values themselves are the caller's to choose (``Credential.secret_values`` drops short ones).
    """
    forms: set[bytes] = set()
    for value in values:
        if not value:
            continue
        raw = value.encode()
        forms.add(raw)
        encoded = [quote(value, safe="").encode()]
        for encode in (base64.b64encode, base64.urlsafe_b64encode):
            # The whole encoding (padding and all) when it stands alone, and the characters
            # only the secret determines when it sits inside a longer encoded text.
            whole = encode(raw)
            encoded += [whole, whole.rstrip(b"="), *_base64_cores(raw, encode)]
        forms.update(e for e in encoded if len(e) >= MIN_FORM)
    return sorted(forms, key=len, reverse=True)


def _scan(data: bytes, forms: Sequence[bytes], release: int) -> tuple[bytes, int]:
    """Replace, leftmost first (the longest form at a position), every occurrence that starts
    before ``release``; returns the output and where the unconsumed input starts."""
    mark = REDACTED.encode()
    out = bytearray()
    i = 0
    while True:
        best: tuple[int, bytes] | None = None
        for form in forms:  # longest first: at equal positions the longest wins
            j = data.find(form, i, release - 1 + len(form))
            if j != -1 and (best is None or j < best[0]):
                best = (j, form)
        if best is None:
            return bytes(out), i
        j, form = best
        out += data[i:j] + mark
        i = j + len(form)


def redact_bytes(data: bytes, forms: Sequence[bytes]) -> bytes:
    """``data`` with every occurrence of ``forms`` (longest first) replaced."""
    out, rest = _scan(data, [f for f in forms if f], len(data))
    return out + data[rest:]


def redact_text(text: str, values: Sequence[str]) -> str:
    """``text`` with every secret value and its encodings replaced."""
    forms = secret_forms(values)
    return redact_bytes(text.encode("utf-8", errors="surrogateescape"), forms).decode(
        "utf-8", errors="surrogateescape"
    )


class StreamRedactor:
    """Redacts a byte stream fed in chunks, with the same result as redacting it whole: the
    last ``longest - 1`` bytes are held back (they may start a secret the next chunk ends), and
    only occurrences starting before them are replaced now."""

    def __init__(self, forms: Sequence[bytes]) -> None:
        self.forms = [f for f in forms if f]
        self.keep = max((len(f) for f in self.forms), default=1) - 1
        self._held = b""

    def feed(self, chunk: bytes) -> bytes:
        """What can be released safely after ``chunk``."""
        data = self._held + chunk
        release = len(data) - self.keep
        if release <= 0:
            self._held = data
            return b""
        out, rest = _scan(data, self.forms, release)
        if rest < release:
            out += data[rest:release]
            rest = release
        self._held = data[rest:]
        return out

    def close(self) -> bytes:
        """The rest, at the end of the stream."""
        data, self._held = self._held, b""
        return redact_bytes(data, self.forms)
