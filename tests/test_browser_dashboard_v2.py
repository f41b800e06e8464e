"""The dashboard page against the session API of result shape 2.0 (CONTRACTS: server-sent events,
roles, text sentiment, call summary, alerts), in real Chromium.

The server here is a small stand-in that speaks that contract: the web UI's own router plus
``/openapi.json``, ``/v1/sessions[...]``, ``/v1/events`` and ``/v1/sessions/{id}/events`` fed from
a script the test drives. It checks the page's event path, which the real server of this branch
does not have yet (``tests/test_browser.py`` covers the real server and the polling path):

* the list is live over ``GET /v1/events`` (created, result, ended), the session over its own event
  stream;
* one timeline per role; the utterances where text sentiment and voice disagree are highlighted;
* the server's call summary (``by_role`` + ``overall``) and the alerts are shown;
* no console error, nothing requested from another host.
"""

from __future__ import annotations

import asyncio
import json
import time
from datetime import datetime, timezone

import pytest
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from app.api import web
from tests import browser_support as bs
from tests.browser_support import assert_clean, css, settle, wait_for

pytestmark = pytest.mark.skipif(bs.missing() is not None, reason=bs.missing() or "")

ROUTES = [
    "/v1/sessions",
    "/v1/sessions/{session_id}",
    "/v1/sessions/{session_id}/results",
    "/v1/sessions/{session_id}/summary",
    "/v1/sessions/{session_id}/alerts",
    "/v1/sessions/{session_id}/events",
    "/v1/events",
]


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def emotion(label: str, p: float) -> dict:
    rest = (1.0 - p) / 3
    probs = {k: (p if k == label else rest) for k in ("angry", "happy", "neutral", "sad")}
    ranking = sorted(({"label": k, "score": v} for k, v in probs.items()), key=lambda r: -r["score"])
    return {"label": label, "score": p, "ranking": ranking, "probabilities": probs, "per_model": {}}


def sentiment(label: str, compound: float) -> dict:
    return {"label": label, "compound": compound, "pos": 0.0, "neu": 1.0, "neg": 0.0, "source": "vader"}


class ContractServer:
    """The 2.0 session API over scripted state; the test thread mutates it, the loop reads it
    (appends to lists only, so readers never see a half-written entry)."""

    def __init__(self) -> None:
        self.sessions: dict[str, dict] = {}
        self.results: dict[str, list[dict]] = {}
        self.alerts: dict[str, list[dict]] = {}
        self.bus: list[tuple[str, dict]] = []  # (event, data) for GET /v1/events
        self.base = ""  # set once served
        self.app = self._app()

    # --- script -------------------------------------------------------------------------------
    def create(self, sid: str, roles: list[str]) -> None:
        t = now_iso()
        self.sessions[sid] = {
            "id": sid,
            "state": "active",
            "source": "stream",
            "created_at": t,
            "updated_at": t,
            "ended_at": None,
            "duration_s": 0.0,
            "audio_duration_s": 0.0,
            "metadata": {"queue": "billing"},
            "channels": [0, 1],
            "roles": roles,
            "result_count": 0,
            "last_seq": 0,
            "emotion": {"n": 0, "label": None, "counts": {}, "mean_probabilities": {}},
            "last_result": None,
            "summary": None,
        }
        self.results[sid], self.alerts[sid] = [], []
        self.bus.append(("created", {"session_id": sid, "session": dict(self.sessions[sid])}))

    def add(self, sid: str, channel: int, start: float, text: str, voice: tuple, text_sent: tuple) -> dict:
        s = self.sessions[sid]
        seq = len(self.results[sid]) + 1
        result = {
            "seq": seq,
            "session_id": sid,
            "channel": channel,
            "role": s["roles"][channel],
            "start": start,
            "end": start + 2.0,
            "text": text,
            "emotion": emotion(*voice),
            "text_sentiment": sentiment(*text_sent),
            "received_at": now_iso(),
            "source": "stream",
        }
        self.results[sid].append(result)
        s.update(result_count=seq, last_seq=seq, last_result=result, updated_at=result["received_at"])
        s["audio_duration_s"] = result["end"]
        self.bus.append(("result", {"session_id": sid, "result": result}))
        return result

    def alert(self, sid: str, result: dict) -> None:
        alert = {
            "session_id": sid,
            "rule": "angry_customer",
            "seq": result["seq"],
            "seqs": [result["seq"] - 1, result["seq"]],
            "role": result["role"],
            "channel": result["channel"],
            "label": "angry",
            "score": result["emotion"]["score"],
            "min_score": 0.6,
            "consecutive": 2,
            "text": result["text"],
            "at": now_iso(),
        }
        self.alerts[sid].append(alert)
        self.bus.append(("alert", {"session_id": sid, "alert": alert}))

    def end(self, sid: str) -> None:
        self.sessions[sid].update(state="ended", ended_at=now_iso(), summary=self.summary(sid))
        self.bus.append(("ended", {"session_id": sid, "session": dict(self.sessions[sid])}))

    def summary(self, sid: str) -> dict:
        def group(role, rs):
            return {
                "role": role,
                "channels": sorted({r["channel"] for r in rs}),
                "utterances": len(rs),
                "speech_s": 2.0 * len(rs),
                "mean_probabilities": {"angry": 0.5, "happy": 0.2, "neutral": 0.2, "sad": 0.1},
                "label": "angry",
                "trend": {"angry": 0.3, "happy": -0.1, "neutral": -0.1, "sad": -0.1},
                "negative_share": 0.5,
                "text_sentiment_mean": 0.1,
                "disagreements": 1,
                "disagreement_seqs": [r["seq"] for r in rs][:1],
            }

        rs = self.results[sid]
        roles = self.sessions[sid]["roles"]
        return {
            "session_id": sid,
            "utterances": len(rs),
            "speech_s": 2.0 * len(rs),
            "roles": roles,
            "by_role": {role: group(role, [r for r in rs if r["role"] == role]) for role in roles},
            "overall": group(None, rs),
            "negative_labels": ["angry", "sad", "fearful", "disgust"],
        }

    # --- the API --------------------------------------------------------------------------------
    def _app(self) -> FastAPI:
        app = FastAPI(openapi_url=None, docs_url=None, redoc_url=None)
        app.include_router(web.router)

        def missing(sid):
            return JSONResponse({"error": "session_not_found", "detail": f"no session {sid!r}"}, 404)

        def sse(kind: str, data: dict, event_id: int | None = None) -> str:
            head = f"id: {event_id}\n" if event_id is not None else ""
            return f"{head}event: {kind}\ndata: {json.dumps(data)}\n\n"

        @app.get("/openapi.json")
        async def openapi():
            return {
                "openapi": "3.1.0",
                "info": {"title": "contract", "version": "2.0.0"},
                "paths": {p: {} for p in ROUTES},
            }

        @app.get("/v1/sessions")
        async def sessions():
            return {"sessions": list(self.sessions.values())}

        @app.get("/v1/sessions/{sid}")
        async def session(sid: str):
            return self.sessions[sid] if sid in self.sessions else missing(sid)

        @app.get("/v1/sessions/{sid}/results")
        async def results(sid: str, after: int = 0, limit: int = 100):
            if sid not in self.sessions:
                return missing(sid)
            rs = [r for r in self.results[sid] if r["seq"] > after][:limit]
            last = rs[-1]["seq"] if rs else after
            return {"session_id": sid, "state": self.sessions[sid]["state"], "last_seq": last, "results": rs}

        @app.get("/v1/sessions/{sid}/summary")
        async def summary(sid: str):
            return self.summary(sid) if sid in self.sessions else missing(sid)

        @app.get("/v1/sessions/{sid}/alerts")
        async def alerts(sid: str):
            return {"session_id": sid, "alerts": self.alerts[sid]} if sid in self.sessions else missing(sid)

        @app.get("/v1/events")
        async def events(request: Request):
            async def stream():
                yield "retry: 3000\n\n"
                sent = len(self.bus)  # live only, like the real route without Last-Event-ID
                while not await request.is_disconnected():
                    while sent < len(self.bus):
                        kind, data = self.bus[sent]
                        sent += 1
                        yield sse(kind, data, sent)
                    await asyncio.sleep(0.05)

            return StreamingResponse(stream(), media_type="text/event-stream")

        @app.get("/v1/sessions/{sid}/events")
        async def session_events(sid: str, request: Request, after: int = 0):
            async def stream():
                yield "retry: 3000\n\n"
                sent, alerts_sent, ended = after, 0, False
                while not await request.is_disconnected():
                    for r in self.results.get(sid, [])[sent:]:
                        sent = r["seq"]
                        yield sse("result", r, r["seq"])
                    for a in self.alerts.get(sid, [])[alerts_sent:]:
                        alerts_sent += 1
                        yield sse("alert", a)
                    s = self.sessions.get(sid)
                    if s and s["state"] == "ended" and not ended:
                        ended = True
                        yield sse("ended", s)
                    await asyncio.sleep(0.05)

            return StreamingResponse(stream(), media_type="text/event-stream")

        return app


@pytest.fixture(scope="module")
def fake():
    srv = ContractServer()
    with bs.serve(srv.app, "/v1/sessions") as base:
        srv.base = base
        yield srv


@pytest.fixture(scope="module")
def driver():
    drv = bs.chrome()
    yield drv
    drv.quit()


def test_dashboard_on_the_v2_session_api(fake, driver):
    artifacts = bs.ARTIFACTS
    artifacts.mkdir(parents=True, exist_ok=True)
    settle(driver)
    driver.get(fake.base + "/ui/dashboard")
    wait_for(driver, lambda d: d.execute_script("return window.dashStats.listMode") == "events", 30, "events")
    time.sleep(0.3)  # the list's event stream is connected (only new events are sent)

    sid = "call-7"
    fake.create(sid, ["agent", "customer"])
    item = f"#session-list li[data-session-id='{sid}']"
    wait_for(driver, lambda d: css(d, item), 10, "created event")
    css(driver, item + " a")[0].click()
    wait_for(driver, lambda d: d.execute_script("return window.dashStats.viewMode") == "events", 10, "view")
    time.sleep(0.3)

    fake.add(sid, 0, 0.5, "How can I help you today?", ("neutral", 0.8), ("positive", 0.4))
    fake.add(sid, 1, 3.0, "Great, just great, thanks a lot.", ("angry", 0.7), ("positive", 0.8))  # disagree
    third = fake.add(sid, 1, 6.0, "I have been waiting for an hour.", ("angry", 0.9), ("negative", -0.4))
    fake.alert(sid, third)
    fake.add(
        sid, 0, 9.0, "That is terrible news, I am sorry.", ("happy", 0.6), ("negative", -0.6)
    )  # disagree

    wait_for(driver, lambda d: len(css(d, "#sv-results li.result")) == 4, 10, "four results")
    groups = [e.get_attribute("data-group") for e in css(driver, "#sv-timelines figure.timeline-group")]
    assert groups == ["agent", "customer"]
    assert [e.get_attribute("data-seq") for e in css(driver, "#sv-results li.result.disagree")] == ["2", "4"]
    sentiments = [e.get_attribute("data-sentiment") for e in css(driver, "#sv-results .chip.sentiment")]
    assert sentiments == ["positive", "positive", "negative", "negative"]
    chips = [e.text for e in css(driver, "#sv-results li.result .chip.emo")]
    assert chips[1] == "angry 0.70"  # label + score
    wait_for(driver, lambda d: css(d, "#sv-alerts li.alert"), 10, "alert")
    alert = css(driver, "#sv-alerts li.alert")[0]
    assert "angry_customer" in alert.text and "customer" in alert.text and "waiting for an hour" in alert.text
    # the server's summary: one row per role and the overall row
    wait_for(
        driver,
        lambda d: (
            [r.get_attribute("data-group") for r in css(d, "#sv-summary tbody tr")]
            == ["agent", "customer", "overall"]
        ),
        10,
        "server summary",
    )
    assert "Computed in the browser" not in driver.find_element("id", "sv-summary").text
    assert "angry ▲ 30 pts" in driver.find_element("id", "sv-summary").text
    wait_for(driver, lambda d: css(d, item)[0].get_attribute("data-count") == "4", 10, "list follows results")
    assert "utterances\n4" in driver.find_element("id", "sv-meta").text
    driver.save_screenshot(str(artifacts / "dashboard-v2-live.png"))

    fake.end(sid)
    wait_for(driver, lambda d: d.execute_script("return window.dashStats.viewMode") == "ended", 10, "ended")
    wait_for(driver, lambda d: css(d, item)[0].get_attribute("data-state") == "ended", 10, "list ended")
    driver.save_screenshot(str(artifacts / "dashboard-v2-ended.png"))
    assert_clean(driver, fake.base)
