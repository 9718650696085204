"""The browser chat page served at ``/`` by ``memlm serve``: plain HTML/CSS/JS from ``static/`` (no build step).

The page is a thin client of the HTTP API (memlm/serve/api.py): it streams replies from
``/v1/chat/completions`` (server-sent events), lists and creates sessions, switches memory mode and learning through
``POST /v1/sessions/{id}`` and shows ``GET /v1/sessions/{id}`` in its memory panel. Model output is inserted as
text (never as HTML), and a strict Content-Security-Policy allows only this server's own scripts and styles.
"""
from __future__ import annotations

from pathlib import Path

from fastapi.responses import FileResponse, JSONResponse

STATIC = Path(__file__).parent / "static"
FILES = {"index.html": "text/html; charset=utf-8", "app.js": "text/javascript; charset=utf-8",
         "style.css": "text/css; charset=utf-8"}
HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
                               "img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}


def add_web_routes(app) -> None:
    """Register ``/`` and ``/static/<file>`` (only the files listed in FILES: nothing else can be read)."""

    @app.get("/", include_in_schema=False)
    async def index():
        return FileResponse(STATIC / "index.html", media_type=FILES["index.html"], headers=HEADERS)

    @app.get("/static/{name}", include_in_schema=False)
    async def static(name: str):
        if name not in FILES:
            return JSONResponse({"error": {"message": "no such file", "type": "invalid_request_error",
                                           "param": None, "code": "404"}}, status_code=404)
        return FileResponse(STATIC / name, media_type=FILES[name], headers=HEADERS)
