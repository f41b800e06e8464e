"""The web UI's routes without a browser (``app.api.web``): every page and static file is served
with its content type and the strict CSP, nothing outside ``app/web/static`` is reachable, the
protocol page is rendered from ``docs/streaming-protocol.md`` (raw HTML escaped), and no page or
script refers to another host (the UI works offline). A stub service: no models are needed.
The pages themselves run in Chromium in ``tests/test_browser.py``."""

from __future__ import annotations

import re

import pytest
from fastapi.testclient import TestClient

from app.api import web
from app.main import create_app
from app.settings import Settings
from tests.test_health import StubService

PAGES = {"/": "index.js", "/ui/mic": "mic.js", "/ui/dashboard": "dashboard.js", "/ui/upload": "upload.js"}


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    settings = Settings(sqlite_path=tmp_path_factory.mktemp("web") / "s.db", api_keys=["secret"])
    with TestClient(create_app(settings, StubService(), store=None)) as c:
        yield c


def assert_ui_headers(response) -> None:
    csp = response.headers["content-security-policy"]
    assert "default-src 'self'" in csp and "unsafe-inline" not in csp and "unsafe-eval" not in csp
    assert response.headers["x-content-type-options"] == "nosniff"


@pytest.mark.parametrize("path", sorted(PAGES))
def test_pages_are_html_with_csp_and_their_module(client, path):
    r = client.get(path)
    assert r.status_code == 200
    assert r.headers["content-type"] == "text/html; charset=utf-8"
    assert_ui_headers(r)
    assert f'<script type="module" src="/ui/static/js/{PAGES[path]}">' in r.text
    assert "<script>" not in r.text and " style=" not in r.text  # nothing inline: the CSP would refuse it
    for link in ("/ui/mic", "/ui/dashboard", "/ui/upload", "/ui/protocol", "/docs"):
        assert f'href="{link}"' in r.text


def test_pages_need_no_key_but_the_api_does(client):
    """The pages hold no data; the API behind them still asks for the key."""
    assert client.get("/ui/dashboard").status_code == 200
    assert client.get("/v1/sessions").status_code == 401


def test_index_links_every_page(client):
    text = client.get("/").text
    for link in ("/ui/mic", "/ui/dashboard", "/ui/upload", "/ui/protocol", "/docs", "/redoc"):
        assert f'href="{link}"' in text


@pytest.mark.parametrize(
    ("path", "content_type"),
    [
        ("/ui/static/style.css", "text/css; charset=utf-8"),
        ("/ui/static/js/mic.js", "text/javascript; charset=utf-8"),
        ("/ui/static/js/pcm-worklet.js", "text/javascript; charset=utf-8"),
        ("/ui/static/favicon.svg", "image/svg+xml"),
    ],
)
def test_static_files_have_their_content_type(client, path, content_type):
    r = client.get(path)
    assert r.status_code == 200 and r.headers["content-type"] == content_type
    assert_ui_headers(r)


@pytest.mark.parametrize(
    "path",
    [
        "/ui/static/../../settings.py",
        "/ui/static/%2e%2e/%2e%2e/settings.py",
        "/ui/static/..%2f..%2fsettings.py",
        "/ui/static/js/nope.js",
        "/ui/static/js",
        "/ui/static/",
        "/ui/nope",
    ],
)
def test_nothing_else_is_served(client, path):
    r = client.get(path)
    assert r.status_code == 404, (path, r.status_code)
    assert r.json()["error"] == "not_found"


def test_ui_root_redirects_home(client):
    r = client.get("/ui/", follow_redirects=False)
    assert r.status_code == 307 and r.headers["location"] == "/"


def test_ui_routes_stay_out_of_the_api_schema(client):
    paths = client.get("/openapi.json").json()["paths"]
    assert not [p for p in paths if p == "/" or p.startswith("/ui")]


def test_protocol_page_is_rendered_from_the_document(client):
    r = client.get("/ui/protocol")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    assert_ui_headers(r)
    html = r.text
    assert "<h1>WebSocket streaming protocol (<code>WS /v1/stream</code>)</h1>" in html
    assert "<table>" in html and "<td>4009</td>" in html and "<code>session_busy</code>" in html
    for message in (
        "start",
        "stop",
        "ping",
        "ready",
        "partial",
        "final",
        "interim",
        "warning",
        "error",
        "end",
    ):
        assert f"<code>{message}</code>" in html, message
    assert " style=" not in html and "<script" not in html


def test_every_close_code_of_the_endpoint_is_documented():
    """The document and the endpoint do not drift apart: each close code and error the endpoint's
    docstring lists has a row in the document's table."""
    from app.api import stream

    doc = web.PROTOCOL_DOC.read_text()
    rows = re.findall(r"^(\d{4})\s+(\(normal\)|\w+)", stream.__doc__ or "", re.MULTILINE)
    assert len(rows) >= 15
    for code, error in rows:
        want = f"| {code} | (normal) |" if error == "(normal)" else f"| {code} | `{error}` |"
        assert want in doc, want


def test_raw_html_in_the_document_is_escaped(tmp_path):
    doc = tmp_path / "p.md"
    doc.write_text("# T\n\n<script>alert(1)</script>\n\n| a | b |\n|:--|--:|\n| 1 | 2 |\n")
    page = web.render_protocol(doc)
    assert "<script>alert" not in page and "&lt;script&gt;" in page
    assert " style=" not in page and 'class="align-right"' in page


def test_protocol_page_without_the_document_shows_the_endpoint_docstring(tmp_path):
    page = web.render_protocol(tmp_path / "missing.md")
    assert "<pre>" in page and "1013" in page and "not installed" in page


def test_no_file_of_the_ui_refers_to_another_host():
    """Offline: no http(s) URL other than examples in comments, no CDN, no protocol-relative URL."""
    files = [p for p in web.STATIC_DIR.rglob("*") if p.is_file()]
    assert {p.suffix for p in files} <= set(web.CONTENT_TYPES)
    assert len(files) >= 12
    for path in files:
        text = path.read_text()
        code = "\n".join(
            line for line in text.splitlines() if not line.lstrip().startswith(("//", "/*", "*"))
        )
        code = code.replace("http://www.w3.org/2000/svg", "")  # the SVG namespace: a name, not a fetch
        assert not re.search(r"https?://", code), path
        assert not re.search(r"""["'(]//[a-z0-9]""", code, re.IGNORECASE), path
        assert "@import" not in code and "url(" not in code.replace("url(#", ""), path


def test_static_files_are_package_data():
    from pathlib import Path

    pyproject = (Path(__file__).parents[1] / "pyproject.toml").read_text()
    assert re.search(r'^app = \[.*"web/static/\*\*/\*"', pyproject, re.MULTILINE)


def test_redoc_bundle_fetches_nothing_remote(client):
    """fastapi-offline's ReDoc bundle loads a logo from cdn.redoc.ly; ours is the same bundle without it."""
    html = client.get("/redoc").text
    assert 'src="/ui/redoc.standalone.js"' in html and "https://" not in html
    r = client.get("/ui/redoc.standalone.js")
    assert r.status_code == 200 and r.headers["content-type"] == "text/javascript; charset=utf-8"
    assert len(r.content) > 500_000 and b"cdn.redoc.ly" not in r.content
    assert web.BLANK_IMAGE in r.content
