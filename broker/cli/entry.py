"""The `broker` executable's entry point: answers `broker version` before anything is imported.

Everything else goes to :func:`broker.cli.main.main` (Typer, the commands). Kept apart so the
one command that needs nothing starts as fast as Python itself.
"""

from __future__ import annotations

import sys


def main() -> None:
    if sys.argv[1:] in (["version"], ["--version"]):
        import broker

        print(broker.__version__)
        return
    from broker.cli.main import main as run

    run()
