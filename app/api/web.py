"""The web UI: plain HTML/JS/CSS pages in ``app/web/static`` served by the app (no CDN, no build step).

Routes (none in the OpenAPI schema, none behind the API key: the pages hold no data; the API calls
they make carry the key the user typed, from ``localStorage``):

* ``GET /``: index linking every page, ``/docs`` and ``/redoc``;
* ``GET /ui/mic``, ``/ui/dashboard``, ``/ui/upload``: the pages;
* ``GET /ui/protocol``: ``docs/streaming-protocol.md`` rendered to HTML on the server
  (markdown-it-py, raw HTML disabled, so the page carries no markup of its own making);
* ``GET /ui/static/{path}``: the static files, only those under ``app/web/static`` with a known
  suffix (anything else: 404 ``not_found``);
* ``GET /redoc``: ReDoc from fastapi-offline's bundle, with the one remote file that bundle still
  fetches (the Redocly logo from cdn.redoc.ly) replaced by an empty inline image, so ``/redoc``
  works offline too (``app.main`` turns fastapi-offline's own ``/redoc`` off). Swagger UI at
  ``/docs`` stays fastapi-offline's.

Every response carries a strict Content-Security-Policy (``default-src 'self'``; no inline script
or style, no frames, no plugins): a page can load and connect to nothing but this server, so it
works offline and an injected string cannot run. ``'self'`` covers ``ws://``/``wss://`` to the
same host in current browsers (CSP 3).

Thread-safety: stateless handlers; the rendered protocol page is cached per file modification time
(a dict replaced whole, so a race renders twice at worst).
"""

from __future__ import annotations

import functools
import html
import re
from pathlib import Path

from fastapi import APIRouter, HTTPException, Request
from fastapi.openapi.docs import get_redoc_html
from fastapi.responses import FileResponse, HTMLResponse, RedirectResponse, Response

from app.settings import REPO_ROOT

STATIC_DIR = Path(__file__).resolve().parent.parent / "web" / "static"
PROTOCOL_DOC = REPO_ROOT / "docs" / "streaming-protocol.md"

CSP = (
    "default-src 'self'; base-uri 'none'; object-src 'none'; frame-ancestors 'none'; "
    "form-action 'self'; img-src 'self' data:"
)
SECURITY_HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Permissions-Policy": "microphone=(self), camera=(), geolocation=()",
    "Cache-Control": "no-cache",  # revalidate: an upgraded server never runs with stale page scripts
}
CONTENT_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
    ".json": "application/json",
    ".md": "text/markdown; charset=utf-8",
}
PAGES = {"mic": "mic.html", "dashboard": "dashboard.html", "upload": "upload.html"}

router = APIRouter(include_in_schema=False)


def _file(name: str) -> FileResponse:
    path = STATIC_DIR / name
    return FileResponse(path, media_type=CONTENT_TYPES[path.suffix], headers=SECURITY_HEADERS)


@router.get("/")
async def index() -> FileResponse:
    return _file("index.html")


@router.get("/ui")
@router.get("/ui/")
async def ui_root() -> RedirectResponse:
    return RedirectResponse("/", status_code=307)


@router.get("/ui/protocol")
async def protocol_page(request: Request) -> HTMLResponse:
    # settings.docs_dir: an installed package (the Docker image) has no repository around it
    doc = request.app.state.settings.docs_dir / PROTOCOL_DOC.name
    return HTMLResponse(render_protocol(doc), headers=SECURITY_HEADERS)


@router.get("/ui/static/{path:path}")
async def static_file(path: str) -> FileResponse:
    target = (STATIC_DIR / path).resolve()
    if not target.is_relative_to(STATIC_DIR) or target.suffix not in CONTENT_TYPES or not target.is_file():
        raise HTTPException(404, f"no file {path!r} in the web UI")
    return _file(str(target.relative_to(STATIC_DIR)))


# --- ReDoc without a CDN -------------------------------------------------------------------------

REDOC_LOGO = b"https://cdn.redoc.ly/redoc/logo-mini.svg"
BLANK_IMAGE = b"data:image/svg+xml,%3Csvg xmlns=%22http://www.w3.org/2000/svg%22/%3E"


@functools.cache
def redoc_bundle() -> bytes:
    """fastapi-offline's ReDoc bundle with its remote logo replaced (read once)."""
    import fastapi_offline

    bundle = Path(fastapi_offline.__file__).parent / "static" / "redoc.standalone.js"
    return bundle.read_bytes().replace(REDOC_LOGO, BLANK_IMAGE)


@router.get("/redoc")
async def redoc(request: Request) -> HTMLResponse:
    root = request.scope.get("root_path", "")
    return get_redoc_html(
        openapi_url=f"{root}{request.app.openapi_url}",
        title=f"{request.app.title} - ReDoc",
        redoc_js_url=f"{root}/ui/redoc.standalone.js",
        redoc_favicon_url=f"{root}/static-offline-docs/favicon.png",
        with_google_fonts=False,
    )


@router.get("/ui/redoc.standalone.js")
async def redoc_js() -> Response:
    return Response(
        redoc_bundle(),
        media_type=CONTENT_TYPES[".js"],
        headers={"Cache-Control": "public, max-age=86400", "X-Content-Type-Options": "nosniff"},
    )


# --- the protocol page ------------------------------------------------------------------------

_CACHE: dict[str, tuple[float, str]] = {}
_ALIGN = re.compile(r' style="text-align:(left|right|center)"')

_PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{title} · emotion-server</title>
<link rel="icon" href="/ui/static/favicon.svg" type="image/svg+xml">
<link rel="stylesheet" href="/ui/static/style.css">
</head>
<body>
<header class="top"><nav><a href="/" class="brand">emotion-server</a>
<a href="/ui/mic">Microphone</a><a href="/ui/dashboard">Dashboard</a><a href="/ui/upload">Upload</a>
<a href="/ui/protocol" aria-current="page">Protocol</a><a href="/docs">API docs</a></nav></header>
<main class="doc">
{body}
</main>
</body>
</html>
"""


def _markdown(text: str) -> str:
    """Markdown to HTML with raw HTML disabled (escaped), tables on; a <pre> when markdown-it-py
    is missing (it comes with ``rich``; listed in the project's dependencies)."""
    try:
        from markdown_it import MarkdownIt
    except ImportError:  # pragma: no cover - depends on the environment
        return f"<pre>{html.escape(text)}</pre>"
    rendered = MarkdownIt("commonmark", {"html": False, "linkify": False}).enable("table").render(text)
    # aligned table columns come out as style attributes, which the page's CSP refuses: use classes
    return _ALIGN.sub(r' class="align-\1"', rendered)


def render_protocol(doc: Path = PROTOCOL_DOC) -> str:
    """The protocol page; from the module docstring of ``app.api.stream`` when the document is not
    installed (an image that copies only ``app/``)."""
    try:
        mtime = doc.stat().st_mtime
    except OSError:
        from app.api import stream

        body = (
            "<h1>WebSocket streaming protocol</h1>\n<p>The protocol document "
            "(<code>docs/streaming-protocol.md</code>) is not installed with this server; this is the "
            "endpoint's own summary.</p>\n"
            f"<pre>{html.escape(stream.__doc__ or '')}</pre>"
        )
        return _PAGE.format(title="Streaming protocol", body=body)
    key = str(doc)
    cached = _CACHE.get(key)
    if cached is None or cached[0] != mtime:
        page = _PAGE.format(title="Streaming protocol", body=_markdown(doc.read_text(encoding="utf-8")))
        cached = _CACHE[key] = (mtime, page)
    return cached[1]


# last: "/ui/{page}" would otherwise shadow the fixed /ui/... routes above
@router.get("/ui/{page}")
async def page(page: str) -> FileResponse:
    if page not in PAGES:
        raise HTTPException(404, f"no page {page!r}; pages: {', '.join(sorted(PAGES))}, protocol")
    return _file(PAGES[page])
