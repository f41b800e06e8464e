"""Real Chromium for the web UI's tests and the dashboard bench (Selenium + Debian's ``chromium`` and
``chromium-driver``, installed by ``make system-deps``; nothing is downloaded).

* ``chrome(...)``: a headless Chromium whose network stops at the loopback interface: every other
  host resolves to nothing and goes through a proxy that does not exist, so a page that tried to
  load a CDN file would fail (and the tests would see the failed request and the console error).
  With ``fake_audio`` the microphone is Chromium's fake capture device playing that WAV once.
* ``console_errors(driver)``: SEVERE browser log entries since the last call.
* ``requested_urls(driver)``: every URL pages requested since the last call (performance log).
* ``fake_audio_wav(...)``: a 16-bit WAV of a fixture with silence around it.
* ``wait_for``, ``css``, ``settle``, ``assert_clean``: the tests' small Selenium vocabulary.
* ``serve(app)``: an ASGI app under uvicorn on a free loopback port, in a thread.

Thread-safety: a WebDriver is used from one thread at a time.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np

CHROMIUM = os.environ.get("EMOTION_TEST_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = (
    os.environ.get("EMOTION_TEST_CHROMEDRIVER") or shutil.which("chromedriver") or "/usr/bin/chromedriver"
)
ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts" / "browser"

BASE_FLAGS = (
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-quic",
    "--no-first-run",
    "--no-default-browser-check",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-extensions",
    "--disable-default-apps",
    "--disable-features=Translate,MediaRouter,OptimizationHints",
    "--metrics-recording-only",
    "--mute-audio",
    "--autoplay-policy=no-user-gesture-required",
    # background tabs keep their timers (the bench follows several sessions, one tab each)
    "--disable-background-timer-throttling",
    "--disable-backgrounding-occluded-windows",
    "--disable-renderer-backgrounding",
    # no network beyond loopback: names do not resolve and everything else goes to a dead proxy
    "--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE 127.0.0.1, EXCLUDE localhost",
    "--proxy-server=http://127.0.0.1:9",  # loopback is never proxied (Chromium's implicit bypass)
    "--window-size=1280,1100",
)


def missing() -> str | None:
    """Why the browser cannot run here (None: it can)."""
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (pip install '.[dev]')"
    for name, path in (("chromium", CHROMIUM), ("chromedriver", CHROMEDRIVER)):
        if not Path(path).exists():
            return f"{name} not found at {path} (make system-deps installs chromium and chromium-driver)"
    return None


def chrome(fake_audio: Path | None = None, user_data_dir: str | None = None):
    """A headless Chromium driven by chromedriver, browser and performance logs on."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in BASE_FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={user_data_dir or tempfile.mkdtemp(prefix='emotion-chromium-')}")
    options.add_argument("--use-fake-ui-for-media-stream")  # grant the microphone without asking
    options.add_argument("--use-fake-device-for-media-stream")
    if fake_audio is not None:
        # %noloop: play the file once, then silence (Chromium loops it otherwise)
        options.add_argument(f"--use-file-for-fake-audio-capture={fake_audio}%noloop")
    options.set_capability("goog:loggingPrefs", {"browser": "ALL", "performance": "ALL"})
    service = Service(executable_path=CHROMEDRIVER, log_output=os.devnull)
    driver = webdriver.Chrome(options=options, service=service)
    driver.set_page_load_timeout(30)
    driver.set_script_timeout(30)
    return driver


def console_errors(driver) -> list[dict]:
    return [e for e in driver.get_log("browser") if e.get("level") == "SEVERE"]


INTERNAL = ("chrome://", "chrome-untrusted://", "chrome-extension://", "devtools://", "about:")


def requested_urls(driver) -> list[str]:
    """Every URL pages requested since the last call (the browser's own chrome:// pages left out)."""
    urls = []
    for entry in driver.get_log("performance"):
        message = json.loads(entry["message"])["message"]
        if message.get("method") == "Network.requestWillBeSent":
            urls.append(message["params"]["request"]["url"])
        elif message.get("method") == "Network.webSocketCreated":
            urls.append(message["params"]["url"])
    return [u for u in urls if not u.startswith(INTERNAL)]


def fake_audio_wav(src: Path, dst: Path, lead_s: float = 1.0, tail_s: float = 2.0, rate: int = 48000) -> Path:
    """``src`` as 16-bit mono WAV at ``rate`` (a microphone's usual rate, so the page's resampler
    works as it does with a real device), after ``lead_s`` and before ``tail_s`` of silence."""
    import soundfile as sf
    import soxr

    x, sr = sf.read(str(src), dtype="float32", always_2d=True)
    x = x.mean(axis=1)
    if sr != rate:
        x = soxr.resample(x, sr, rate).astype(np.float32)
    y = np.concatenate(
        [np.zeros(int(lead_s * rate), np.float32), x, np.zeros(int(tail_s * rate), np.float32)]
    )
    sf.write(str(dst), y, rate, subtype="PCM_16")
    return dst


def wait_for(driver, predicate, timeout_s: float = 90.0, what: str = "condition"):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout_s, poll_frequency=0.1).until(predicate, message=what)


def css(driver, selector: str) -> list:
    from selenium.webdriver.common.by import By

    return driver.find_elements(By.CSS_SELECTOR, selector)


def settle(driver) -> None:
    """Drain the logs of earlier steps, so that a check sees only its own page's entries."""
    console_errors(driver)
    requested_urls(driver)


def assert_clean(driver, base: str) -> None:
    """No console error, and nothing requested from anywhere but ``base`` (http or ws)."""
    errors = console_errors(driver)
    assert not errors, errors
    urls = requested_urls(driver)
    foreign = [u for u in urls if not u.startswith((base, base.replace("http", "ws", 1), "data:", "blob:"))]
    assert not foreign, foreign


@contextlib.contextmanager
def serve(app, ready_path: str = "/healthz", timeout_s: float = 30.0) -> Iterator[str]:
    """Run ``app`` under uvicorn on a free loopback port; yields its base URL once ``ready_path``
    answers below 500."""
    import httpx
    import uvicorn

    from tests.stream_support import free_port

    port = free_port()
    config = uvicorn.Config(
        app, host="127.0.0.1", port=port, log_level="warning", timeout_graceful_shutdown=2
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name=f"uvicorn-{port}", daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout_s
    try:
        while True:
            try:
                if httpx.get(base + ready_path, timeout=2).status_code < 500:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"{base}{ready_path} did not answer")
            time.sleep(0.05)
        yield base
    finally:
        server.should_exit = True
        thread.join(timeout=10)
