"""The web console for approvers and auditors, served by the broker under ``/ui``.

Server-rendered pages (Jinja2 templates) with a little progressive enhancement; see
docs/console.md. :func:`install` mounts it on the API's app.
"""

from __future__ import annotations

from broker.api.console.routes import install

__all__ = ["install"]
