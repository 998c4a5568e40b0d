"""Fixtures for the console: the dev issuer (once per session), the broker per test, and one real
headless Chromium per session driven by Playwright.

The browser is Debian's ``chromium`` package at /usr/bin/chromium (``scripts/setup`` installs it
when it can); Playwright never downloads a browser here. Without it the browser tests are skipped
with the reason, except in CI (``CI=true``), where they fail.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.console.stack import DevIssuer, dev_issuer

REPO = Path(__file__).resolve().parents[2]
ARTIFACTS = REPO / "test-artifacts" / "console"
DOC_IMAGES = REPO / "docs" / "images"
CHROMIUM = os.environ.get("BROKER_TEST_CHROMIUM", "/usr/bin/chromium")
#: Headless, no sandbox (containers), and nothing that reaches out to the network by itself.
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@pytest.fixture(scope="session")
def issuer_app(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DevIssuer]:
    """The dev issuer of ``broker dev`` on a real socket (sign-in page and token endpoint)."""
    with dev_issuer(tmp_path_factory.mktemp("dev-issuer")) as issuer:
        yield issuer


def _no_browser(reason: str) -> None:
    if os.environ.get("CI") == "true":
        pytest.fail(f"the console's browser tests must run in CI: {reason}")
    pytest.skip(
        f"{reason}: install Debian's chromium (apt-get install -y chromium; scripts/setup does "
        "it when run as root) to run the console's browser tests"
    )


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    """One headless Chromium for the browser tests (they live in one module, so this is one
    browser per session); each test opens its own context.

    Playwright's ``launch`` gives the browser a fresh temporary user-data-dir; every test's
    context starts with no cookies and no storage. Module scope, not session: while Playwright's
    synchronous API is open, asyncio counts a loop as running in the main thread, which would
    break later tests that run their own (``anyio.run``).
    """
    if not (Path(CHROMIUM).is_file() and os.access(CHROMIUM, os.X_OK)):
        _no_browser(f"no Chromium at {CHROMIUM}")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _no_browser("the playwright package is not installed")
    with sync_playwright() as pw:
        chromium = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        yield chromium
        chromium.close()


class Browsing:
    """A fresh browser context: one person's browser, with screenshots and a record of every
    console page it rendered (for the no-secret test) and every console message (CSP errors)."""

    def __init__(self, browser: Any, name: str, *, javascript: bool = True) -> None:
        self.context = browser.new_context(
            viewport={"width": 1280, "height": 900}, java_script_enabled=javascript
        )
        self.page = self.context.new_page()
        self.name = name
        self.html: list[tuple[str, str]] = []
        self.console_errors: list[str] = []
        self.page.on(
            "console",
            lambda msg: self.console_errors.append(msg.text) if msg.type == "error" else None,
        )

    def keep(self) -> str:
        """The page's current HTML, remembered."""
        html: str = self.page.content()
        self.html.append((self.page.url, html))
        return html

    def shot(self, name: str, *, doc: bool = False) -> Path:
        """A full-page screenshot under test-artifacts/console/ (and docs/images/ when
        ``BROKER_DOC_IMAGES=1`` and ``doc``)."""
        self.keep()
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        path = ARTIFACTS / f"{name}.png"
        self.page.screenshot(path=str(path), full_page=True)
        if doc and os.environ.get("BROKER_DOC_IMAGES") == "1":
            DOC_IMAGES.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, DOC_IMAGES / f"console-{name}.png")
        return path

    def close(self) -> None:
        self.context.close()


@pytest.fixture
def browsing(browser: Any, request: pytest.FixtureRequest) -> Iterator[Any]:
    """Open browser contexts for this test: ``browsing("approver")``; closed afterwards."""
    opened: list[Browsing] = []

    def open_one(name: str, **kw: Any) -> Browsing:
        b = Browsing(browser, f"{request.node.name}-{name}", **kw)
        opened.append(b)
        return b

    yield open_one
    for b in opened:
        b.close()
