"""The dashboard's files, read once at start-up from the package (``static/``) and
handed to the core, which serves them (:mod:`ostiary.protocol.dashboard`)."""

from __future__ import annotations

from importlib import resources

from ostiary.protocol.dashboard import Asset, Assets

__all__ = ["FILES", "load_dashboard"]

#: URL path → (file in ``static/``, content type).
FILES = {
    "/dashboard": ("dashboard.html", b"text/html; charset=utf-8"),
    "/dashboard.js": ("dashboard.js", b"text/javascript; charset=utf-8"),
    "/dashboard.css": ("dashboard.css", b"text/css; charset=utf-8"),
}


def load_dashboard() -> Assets:
    static = resources.files("ostiary.runtime") / "static"
    return Assets(
        {
            path: Asset(content_type, (static / name).read_bytes())
            for path, (name, content_type) in FILES.items()
        }
    )
