"""The web UI on a server with API keys, in real Chromium: the pages load without a key; the API
answers 401 and the page asks for the key; the key typed into the header field is kept in
``localStorage`` and sent (Bearer for fetch, ``?api_key=`` for the WebSocket); a wrong key is
reported as rejected. The real app and auth with a stub service (no models) and a SQLite store."""

from __future__ import annotations

import pytest

from app.main import create_app
from app.settings import Settings
from tests import browser_support as bs
from tests.browser_support import css, settle, wait_for
from tests.test_health import StubService

pytestmark = pytest.mark.skipif(bs.missing() is not None, reason=bs.missing() or "")

KEY = "s3cret-key"


class NoModels(StubService):
    """The stub, with an (empty) model list for ``GET /v1/models``."""

    def __init__(self) -> None:
        super().__init__()
        from types import SimpleNamespace

        from app.analysis.analyzer import FeatureConfig

        self.engine.cards, self.engine.runners = {}, {}
        # GET /v1/models also names the ASR model and the model directory
        self.engine.analyzer = SimpleNamespace(config=FeatureConfig())
        self.engine.model_dir = "models"


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    settings = Settings(sqlite_path=tmp_path_factory.mktemp("auth-ui") / "s.db", api_keys=[f"team:{KEY}"])
    with bs.serve(create_app(settings, NoModels())) as url:
        yield url


@pytest.fixture(scope="module")
def driver():
    drv = bs.chrome()
    yield drv
    drv.quit()


def only_unauthorized(errors: list[dict]) -> bool:
    """The browser logs each 401 as a failed resource; nothing else may appear."""
    return all("status of 401" in e["message"] for e in errors)


def save_key(driver, key: str) -> None:
    field = driver.find_element("css selector", "#api-key input")
    field.clear()
    field.send_keys(key)
    driver.find_element("css selector", "#api-key button").click()


def test_key_entry_on_a_server_with_keys(base, driver):
    settle(driver)
    driver.get(base + "/ui/dashboard")
    state = "#api-key .key-state"
    wait_for(driver, lambda d: css(d, "#api-key.needed"), 10, "key asked for")
    assert css(driver, state)[0].text == "key required"
    assert "unauthorized" in driver.find_element("id", "list-error").text
    errors = bs.console_errors(driver)
    assert errors and only_unauthorized(errors), errors

    save_key(driver, "wrong")
    wait_for(driver, lambda d: css(d, state)[0].text == "key rejected", 10, "wrong key rejected")

    save_key(driver, KEY)
    wait_for(driver, lambda d: driver.find_element("id", "list-error").text == "", 10, "list loads")
    wait_for(
        driver, lambda d: "no sessions yet" in d.find_element("id", "session-list").text, 10, "empty list"
    )
    assert not css(driver, "#api-key.needed") and css(driver, state)[0].text == "key set"
    assert driver.execute_script("return localStorage.getItem('emotion-server.api-key')") == KEY
    assert only_unauthorized(bs.console_errors(driver))

    # kept across pages; the page's URLs for WebSocket and EventSource carry it
    settle(driver)
    driver.get(base + "/ui/mic")
    wait_for(driver, lambda d: css(d, "#models input"), 10, "models with the stored key")
    assert css(driver, state)[0].text == "key set"
    urls = driver.execute_script(
        "return import('/ui/static/js/api.js').then((m) => [m.wsUrl('/v1/stream'), m.withKey('/v1/events')])"
    )
    assert urls == [f"ws://{base[len('http://') :]}/v1/stream?api_key={KEY}", f"/v1/events?api_key={KEY}"]
    assert not bs.console_errors(driver)
    driver.execute_script("localStorage.clear()")
