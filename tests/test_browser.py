"""The web UI in real Chromium (headless, Debian's chromium + chromium-driver through Selenium)
against a live server (uvicorn on a loopback port) with a shipped model (3m-ser), the bundled ASR
and the SQLite store.

* every page loads with the network limited to loopback, requests nothing from another host and
  logs no console error (the pages' CSP, ``default-src 'self'``, is in force throughout);
* the microphone page, fed by Chromium's fake capture device playing a fixture WAV (1 s of silence,
  "Kids are talking by the door", silence), shows the final's words and an emotion label; the
  page's own latency figures (speech start -> first partial, speech end -> final) are written to
  the artefacts, not asserted;
* the dashboard shows a session appear while the Python client streams, follows it (both finals,
  a timeline, the summary) and sees it end; the lag between the client's finals and the page is
  written to the artefacts;
* the upload page analyses a fixture and shows its segment;
* the page's AudioWorklet resamples 48 and 44.1 kHz to 16 kHz 20-ms frames, keeping a 1-kHz tone's
  level and removing a 12-kHz one (no alias in the speech band).

Screenshots and JSON go to ``test-artifacts/browser/`` (git-ignored); the path is printed at the end.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
import uuid
from pathlib import Path

import pytest

from tests import browser_support as bs
from tests.browser_support import assert_clean, css, settle, wait_for
from tests.test_stream_ws import LiveServer

REPO = Path(__file__).resolve().parents[1]
FIXTURES = Path(__file__).parent / "fixtures"
KIDS = FIXTURES / "kids_angry_a01.flac"  # "Kids are talking by the door", angry
TWO_UTT = FIXTURES / "two_utterances.flac"  # kids (angry) + 1 s silence + dogs (neutral)
LABELS = {"angry", "happy", "neutral", "sad"}
WAIT_S = 90

pytestmark = pytest.mark.skipif(bs.missing() is not None, reason=bs.missing() or "")


@pytest.fixture(scope="module")
def artifacts(request):
    bs.ARTIFACTS.mkdir(parents=True, exist_ok=True)
    yield bs.ARTIFACTS
    capture = request.config.pluginmanager.getplugin("capturemanager")
    with capture.global_and_fixture_disabled():  # shown even without -s
        print(f"\nbrowser test artefacts (screenshots, timings): {bs.ARTIFACTS}")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = LiveServer(
        tmp_path_factory.mktemp("browser-live"),
        model_dir=REPO / "models",
        models=["3m-ser"],  # one shipped model: a short warm-up on a shared machine
    )
    srv.start()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def driver(tmp_path_factory):
    wav = bs.fake_audio_wav(KIDS, tmp_path_factory.mktemp("fake-audio") / "kids.wav")
    drv = bs.chrome(fake_audio=wav)
    yield drv
    drv.quit()


PAGES = {
    "/": ("#ready", "ready"),
    "/ui/mic": ("#models input", None),
    "/ui/dashboard": ("#session-list li", None),
    "/ui/upload": ("#models input", None),
    "/ui/protocol": ("main.doc table", None),
    "/docs": (".swagger-ui", None),
    "/redoc": ("redoc, [class*='redoc']", None),
}


def test_every_page_loads_offline_without_console_errors(server, driver, artifacts):
    for path, (selector, text) in PAGES.items():
        settle(driver)
        driver.get(server.base + path)

        def loaded(d, selector=selector, text=text):
            found = css(d, selector)
            if not found:
                return False
            return text is None or any(text in (e.text or "") for e in found)

        wait_for(driver, loaded, 30, f"{path}: {selector}")
        time.sleep(0.3)  # late console errors (a module that fails after its first paint)
        driver.save_screenshot(str(artifacts / f"page{path.replace('/', '_') or '_index'}.png"))
        errors = bs.console_errors(driver)
        assert not errors, (path, errors)
        urls = bs.requested_urls(driver)
        assert server.base + path in urls, (path, urls)
        foreign = [u for u in urls if not u.startswith((server.base, "data:", "blob:"))]
        assert not foreign, (path, foreign)
    # the page's CSP is the strict one
    assert "default-src 'self'" in server.get("/ui/mic").headers["content-security-policy"]


def _mic_timings(stats: dict, server) -> dict:
    settings = server.settings
    utterances = sorted(stats["utterances"].values(), key=lambda u: (u["channel"], u["utterance"]))
    return {
        "what": "microphone page, Chromium fake capture device playing tests/fixtures/kids_angry_a01.flac "
        "after 1 s of silence (48 kHz WAV, resampled by the page's AudioWorklet); one stream, "
        "3m-ser, this machine",
        "definitions": {
            "first_partial_ms": "first partial on screen minus the capture time of the speech start "
            f"(utterance start + pre_pad {settings.utterance_pre_pad_ms} ms)",
            "final_ms": "final on screen minus the capture time of the speech end "
            f"(utterance end - post_pad {settings.utterance_post_pad_ms} ms); includes the "
            f"{settings.utterance_end_silence_ms} ms of silence that ends an utterance",
            "server_latency_ms": "the final's latency_ms (server: from the arrival of the frame where "
            "the speech ended)",
        },
        "context_rate_hz": stats["contextRate"],
        "utterances": [
            {
                k: u.get(k)
                for k in (
                    "channel",
                    "utterance",
                    "start",
                    "end",
                    "text",
                    "label",
                    "reason",
                    "firstPartialMs",
                    "finalMs",
                    "serverLatencyMs",
                )
            }
            for u in utterances
        ],
        "targets": {"first_partial_ms": 1500, "final_ms": 1000},
    }


def test_microphone_page_streams_and_shows_finals(server, driver, artifacts):
    from selenium.webdriver.common.by import By

    settle(driver)
    driver.get(server.base + "/ui/mic")
    wait_for(driver, lambda d: css(d, "#models input"), 30, "models listed")
    driver.find_element(By.ID, "start").click()
    wait_for(driver, lambda d: css(d, "#finals li.result"), WAIT_S, "a final on the page")
    driver.save_screenshot(str(artifacts / "mic-final.png"))
    driver.find_element(By.ID, "stop").click()
    wait_for(driver, lambda d: d.execute_script("return window.micStats.state") == "idle", 60, "stopped")
    driver.save_screenshot(str(artifacts / "mic-stopped.png"))

    stats = driver.execute_script("return window.micStats")
    assert stats["closeCode"] == 1000 and stats["end"] is not None, stats
    assert stats["error"] is None, stats["error"]
    items = css(driver, "#finals li.result")
    assert len(items) == 1, [i.text for i in items]
    text = items[0].find_element(By.CSS_SELECTOR, "p.text").text.lower()
    assert sum(w in text for w in ("kids", "talking", "door")) >= 2, text
    label = items[0].get_attribute("data-label")
    assert label in LABELS
    chip = items[0].find_element(By.CSS_SELECTOR, ".chip.emo")
    assert chip.text.startswith(label)
    bars = items[0].find_elements(By.CSS_SELECTOR, ".bar-row")
    assert {b.get_attribute("data-label") for b in bars} == LABELS
    assert abs(sum(float(b.get_attribute("data-p")) for b in bars) - 1.0) < 0.01
    # the page's resampled audio keeps time: the 1-s lead-in plus the clip's own silence before the
    # speech (its utterance starts at 0.6-1.2 s when the file itself is streamed, test_stream_ws)
    (utt,) = stats["utterances"].values()
    assert 1.6 - 0.05 < utt["start"] < 2.2 + 0.05, utt
    assert css(driver, "#session a")[0].get_attribute("href").endswith(stats["sessionId"])
    timings = _mic_timings(stats, server)
    (artifacts / "mic-latency.json").write_text(json.dumps(timings, indent=2))
    print(json.dumps(timings["utterances"], indent=2))
    assert_clean(driver, server.base)


def test_dashboard_follows_a_live_stream(server, driver, artifacts):
    from app.streaming.client import stream_file

    settle(driver)
    driver.get(server.base + "/ui/dashboard")
    wait_for(driver, lambda d: d.execute_script("return window.dashStats.listMode"), 30, "list mode")
    session_id = f"browser-{uuid.uuid4().hex[:8]}"
    finals_at: dict[int, float] = {}

    def on_message(msg: dict) -> None:
        if msg.get("type") == "final":
            finals_at[msg["seq"]] = time.time()

    result: dict = {}

    def run() -> None:
        result["run"] = asyncio.run(
            stream_file(
                TWO_UTT, server.ws, realtime=True, session_id=session_id, on_message=on_message, timeout_s=120
            )
        )

    streamer = threading.Thread(target=run, name="dashboard-streamer")
    streamer.start()
    try:
        item = f"#session-list li[data-session-id='{session_id}']"
        wait_for(driver, lambda d: css(d, item), 30, "the session in the list")
        assert css(driver, item)[0].get_attribute("data-state") == "active"
        css(driver, item + " a")[0].click()
        wait_for(
            driver, lambda d: d.execute_script("return window.dashStats.viewMode") not in (None, "loading")
        )
        wait_for(driver, lambda d: len(css(d, "#sv-results li.result")) >= 1, WAIT_S, "first final")
        driver.save_screenshot(str(artifacts / "dashboard-live.png"))
        wait_for(driver, lambda d: len(css(d, "#sv-results li.result")) >= 2, WAIT_S, "second final")
    finally:
        streamer.join(timeout=150)
    run_ = result["run"]
    assert run_.close_code == 1000
    finals = run_.of_type("final")
    assert [f["seq"] for f in finals] == [1, 2]

    texts = [e.text.lower() for e in css(driver, "#sv-results li.result p.text")]
    assert "talking" in texts[0] and "sitting" in texts[1], texts
    assert [e.get_attribute("data-seq") for e in css(driver, "#sv-results li.result")] == ["1", "2"]
    assert all(e.get_attribute("data-label") in LABELS for e in css(driver, "#sv-results li.result"))
    # the timeline: one chart for the one channel, a point per label and utterance, two utterance bands
    assert len(css(driver, "#sv-timelines figure.timeline-group")) == 1
    assert len(css(driver, "#sv-timelines svg circle.point")) == 2 * len(LABELS)
    assert len(css(driver, "#sv-timelines svg rect.utterance")) == 2
    # the call summary (the server's, or computed in the page when the server has none)
    wait_for(driver, lambda d: css(d, "#sv-summary table.summary tbody tr"), 30, "summary")
    row = css(driver, "#sv-summary table.summary tbody tr")[0]
    assert row.find_elements("css selector", "td")[1].text == "2"
    # the list follows: two results, then ended
    item = f"#session-list li[data-session-id='{session_id}']"
    wait_for(driver, lambda d: css(d, item)[0].get_attribute("data-count") == "2", 30, "count 2 in the list")
    wait_for(
        driver, lambda d: css(d, item)[0].get_attribute("data-state") == "ended", 30, "ended in the list"
    )
    wait_for(
        driver, lambda d: d.execute_script("return window.dashStats.viewMode") == "ended", 30, "view ended"
    )
    driver.save_screenshot(str(artifacts / "dashboard-ended.png"))

    stats = driver.execute_script("return window.dashStats")
    lags = {seq: stats["seen"][f"{session_id}:{seq}"] / 1000.0 - at for seq, at in finals_at.items()}
    report = {
        "what": "dashboard page following one real-time stream of tests/fixtures/two_utterances.flac "
        "(Python client); lag = result on the page (Date.now()) - final received by the client (time.time())",
        "list_mode": stats["listMode"],
        "view_mode_while_live": stats["liveMode"],
        "lag_s": {str(k): round(v, 3) for k, v in sorted(lags.items())},
    }
    (artifacts / "dashboard-lag.json").write_text(json.dumps(report, indent=2))
    assert all(-1.0 < lag < 30 for lag in lags.values()), lags  # both clocks are this machine's
    assert_clean(driver, server.base)


def test_upload_page_shows_segments(server, driver, artifacts):
    from selenium.webdriver.common.by import By

    settle(driver)
    driver.get(server.base + "/ui/upload")
    wait_for(driver, lambda d: css(d, "#models input"), 30, "models listed")
    driver.find_element(By.ID, "file").send_keys(str(KIDS))
    driver.find_element(By.ID, "submit").click()
    wait_for(driver, lambda d: css(d, "#segments li.result"), WAIT_S, "segments")
    driver.save_screenshot(str(artifacts / "upload.png"))
    segments = css(driver, "#segments li.result")
    assert len(segments) == 1
    text = segments[0].find_element(By.CSS_SELECTOR, "p.text").text.lower()
    assert sum(w in text for w in ("kids", "talking", "door")) >= 2, text
    assert segments[0].get_attribute("data-label") in LABELS
    assert len(segments[0].find_elements(By.CSS_SELECTOR, "p.words .word")) >= 4  # words=true by default
    assert css(driver, "#overall .bars .bar-row")
    assert len(css(driver, "#timelines figure.timeline-group")) == 1
    assert "done: 1 segment" in driver.find_element(By.ID, "status").text
    assert_clean(driver, server.base)


RESAMPLE_SCRIPT = """
const [rate, tones, done] = [arguments[0], arguments[1], arguments[arguments.length - 1]];
(async () => {
  const out = {};
  for (const hz of tones) {
    const ctx = new OfflineAudioContext(1, rate, rate);  // 1 s
    await ctx.audioWorklet.addModule("/ui/static/js/pcm-worklet.js");
    const node = new AudioWorkletNode(ctx, "pcm-downsampler", {processorOptions: {targetRate: 16000, frameMs: 20}});
    const frames = [];
    node.port.onmessage = ({data}) => frames.push(new Int16Array(data.pcm));
    const osc = new OscillatorNode(ctx, {frequency: hz});
    const gain = new GainNode(ctx, {gain: 0.5});
    osc.connect(gain).connect(node);
    node.connect(ctx.destination);
    osc.start();
    await ctx.startRendering();
    await new Promise((r) => setTimeout(r, 300));  // the last posted frames
    const samples = frames.flatMap((f) => Array.from(f));
    const tail = samples.slice(1600);  // past the filter's start-up
    const rms = Math.sqrt(tail.reduce((s, v) => s + v * v, 0) / tail.length) / 32768;
    out[hz] = {frames: frames.length, frameSizes: [...new Set(frames.map((f) => f.length))], rms};
  }
  done(out);
})().catch((e) => done({error: String(e)}));
"""


@pytest.mark.parametrize("rate", [48000, 44100])
def test_worklet_resamples_to_16k_without_aliasing(server, driver, rate):
    """The page's AudioWorklet (in Chromium, offline rendering): 1 s in -> 50 frames of 320 samples;
    a 1-kHz tone keeps its level; a 12-kHz tone (above the 8-kHz Nyquist of 16 kHz) is removed
    instead of folding back into the speech band as a 4-kHz alias."""
    settle(driver)
    driver.get(server.base + "/ui/mic")
    got = driver.execute_async_script(RESAMPLE_SCRIPT, rate, [1000, 12000])
    assert "error" not in got, got
    tone, alias = got["1000"], got["12000"]
    print(rate, got)
    assert tone["frameSizes"] == [320] and 49 <= tone["frames"] <= 50, tone
    sine_rms = 0.5 / 2**0.5
    assert abs(tone["rms"] / sine_rms - 1) < 0.02, tone  # passband: within 2 %
    assert alias["rms"] < sine_rms * 10 ** (-40 / 20), alias  # stopband: at least 40 dB down
    assert_clean(driver, server.base)
