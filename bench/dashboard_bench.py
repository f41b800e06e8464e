"""Dashboard lag: N concurrent real-time streams, each followed live by the dashboard, and how long
after the stream's own ``final`` the result shows up on the dashboard.

A server is started here (``emotion-server serve`` in a subprocess, as ``bench/stream_bench.py``
does; the models of ``EMOTION_MODEL_DIR`` / ``models/``, ``--models`` for a subset). N streams
(``app.streaming.client``, 20-ms frames, real-time pace, staggered starts) send ``--seconds`` of
RAVDESS clips each. The follower:

* ``--follower browser`` (default): headless Chromium (``tests/browser_support.py``), one tab per
  stream on ``/ui/dashboard#session=<id>``, i.e. the real page following the session the way it
  does for a user (server-sent events when the server has them, else the results long poll). The
  page stamps each result when it lands on the page (``window.dashStats.seen``, epoch ms);
* ``--follower http``: one asyncio task per stream doing what the page does, without a browser
  (``GET /v1/sessions/{id}/events`` when ``/openapi.json`` lists it, else the long poll).

Lag of a result = its time on the dashboard - the time the streaming client received its ``final``
(both this machine's wall clock). Target (issue 13): within 1 s. Writes
``bench/results/dashboard.json``.

Usage: ``python bench/dashboard_bench.py [--streams 8] [--seconds 20] [--follower browser|http]``.
Bounded: the streams' audio plus a drain timeout; loopback only.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from stream_bench import DEFAULT_DATA, RESULTS, Server, load_clips, percentile, stream_audio_for  # noqa: E402

LONG_POLL_S = 10
# a worktree (/work/wt/<name>) sits one level deeper than the main checkout that stream_bench assumes
DATA = next(
    (p for p in (DEFAULT_DATA, ROOT.parents[1] / "shared" / "data" / DEFAULT_DATA.name) if p.exists()),
    DEFAULT_DATA,
)


async def stream_all(server: Server, audios, session_ids, args) -> tuple[dict, list]:
    """Run the streams; returns {(session, seq): client time of the final} and the runs."""
    from app.streaming.client import stream_audio

    finals: dict[tuple[str, int], float] = {}
    rng = random.Random(len(audios))

    async def one(i: int):
        sid = session_ids[i]

        def on_message(msg: dict) -> None:
            if msg.get("type") == "final" and msg.get("seq") is not None:
                finals[(sid, msg["seq"])] = time.time()

        await asyncio.sleep(rng.uniform(0, 1.0))  # staggered, as real calls arrive
        return await stream_audio(
            audios[i],
            16000,
            server.ws,
            realtime=True,
            session_id=sid,
            on_message=on_message,
            timeout_s=args.seconds * 3 + 120,
        )

    runs = await asyncio.gather(*(one(i) for i in range(len(audios))), return_exceptions=True)
    return finals, runs


# --- followers ---------------------------------------------------------------------------------


class BrowserFollower:
    """One Chromium tab per session on the dashboard page."""

    def __init__(self, base: str, session_ids: list[str]):
        from tests import browser_support as bs

        why = bs.missing()
        if why:
            raise SystemExit(f"--follower browser: {why}")
        self.driver = bs.chrome()
        self.session_ids = session_ids
        self.handles: dict[str, str] = {}
        for i, sid in enumerate(session_ids):
            if i:
                self.driver.switch_to.new_window("tab")
            # the session does not exist yet: the page looks again every 2 s until it does
            self.driver.get(f"{base}/ui/dashboard#session={sid}")
            self.handles[sid] = self.driver.current_window_handle

    def start(self) -> None:
        pass  # the pages follow on their own

    async def stop(self) -> None:
        pass

    def seen(self) -> tuple[dict, dict]:
        seen, modes = {}, {}
        for sid, handle in self.handles.items():
            self.driver.switch_to.window(handle)
            stats = self.driver.execute_script("return window.dashStats")
            modes[sid] = stats.get("liveMode")
            for key, ms in stats["seen"].items():
                session, seq = key.rsplit(":", 1)
                seen[(session, int(seq))] = ms / 1000.0
        return seen, modes

    def screenshot(self, path: Path) -> None:
        self.driver.switch_to.window(self.handles[self.session_ids[0]])
        self.driver.save_screenshot(str(path))

    def close(self) -> None:
        self.driver.quit()


class HttpFollower:
    """What dashboard.js does for one session, without a browser: SSE when listed, else long poll."""

    def __init__(self, base: str, session_ids: list[str]):
        self.base, self.session_ids = base, session_ids
        self._seen: dict[tuple[str, int], float] = {}
        self.modes: dict[str, str] = {}
        self.tasks: list[asyncio.Task] = []

    def start(self) -> None:
        self.tasks = [asyncio.ensure_future(self._follow(sid)) for sid in self.session_ids]

    async def stop(self) -> None:
        for t in self.tasks:
            t.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)

    async def _follow(self, sid: str) -> None:
        import httpx

        async with httpx.AsyncClient(base_url=self.base, timeout=LONG_POLL_S + 10) as client:
            paths = (await client.get("/openapi.json")).json().get("paths", {})
            if "/v1/sessions/{session_id}/events" in paths:
                self.modes[sid] = "events"
                await self._sse(client, sid)
            else:
                self.modes[sid] = "long-poll"
                await self._long_poll(client, sid)

    async def _sse(self, client, sid: str) -> None:
        async with client.stream("GET", f"/v1/sessions/{sid}/events", timeout=None) as response:
            kind = None
            async for line in response.aiter_lines():
                if line.startswith("event:"):
                    kind = line[6:].strip()
                elif line.startswith("data:") and kind == "result":
                    seq = json.loads(line[5:])["seq"]
                    self._seen.setdefault((sid, seq), time.time())
                elif not line:
                    kind = None

    async def _long_poll(self, client, sid: str) -> None:
        after = 0
        while True:
            r = await client.get(f"/v1/sessions/{sid}/results", params={"after": after, "wait": LONG_POLL_S})
            if r.status_code == 404:  # not created yet
                await asyncio.sleep(0.2)
                continue
            page = r.json()
            now = time.time()
            for res in page["results"]:
                self._seen.setdefault((sid, res["seq"]), now)
            after = page["last_seq"]
            if page["state"] == "ended" and not page["results"]:
                return

    def seen(self) -> tuple[dict, dict]:
        return dict(self._seen), dict(self.modes)

    def screenshot(self, path: Path) -> None:
        pass

    def close(self) -> None:
        pass


async def run(server: Server, follower, audios, session_ids, args):
    follower.start()
    try:
        finals, runs = await stream_all(server, audios, session_ids, args)
        await asyncio.sleep(args.drain)  # the last finals reach the dashboard
    finally:
        await follower.stop()
    return finals, runs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--streams", type=int, default=8)
    ap.add_argument("--seconds", type=float, default=20.0, help="audio per stream")
    ap.add_argument("--gap", type=float, default=0.8, help="silence after each clip (s)")
    ap.add_argument("--follower", choices=["browser", "http"], default="browser")
    ap.add_argument("--models", default="", help="EMOTION_MODELS for the server (default: all)")
    ap.add_argument("--data", type=Path, default=DATA)
    ap.add_argument("--clips", type=int, default=40)
    ap.add_argument(
        "--drain", type=float, default=3.0, help="seconds to wait for the dashboard after the streams"
    )
    ap.add_argument("--target-ms", type=float, default=1000.0)
    ap.add_argument("--dummy-models", action="store_true", help="dummy ONNX models (harness smoke test)")
    ap.add_argument("--out", type=Path, default=RESULTS / "dashboard.json")
    args = ap.parse_args()
    args.max_streams = args.streams  # what stream_bench.Server reads
    if args.models:
        os.environ["EMOTION_MODELS"] = args.models

    clips = load_clips(args.data, args.clips, seed=0)
    audios = [stream_audio_for(i, clips, args.seconds, args.gap) for i in range(args.streams)]
    stamp = int(time.time())
    session_ids = [f"dash-bench-{stamp}-{i}" for i in range(args.streams)]
    with tempfile.TemporaryDirectory(prefix="dashboard-bench-") as tmp:
        server = Server(args, Path(tmp))
        follower = None
        try:
            server.wait_ready()
            import httpx

            loaded = httpx.get(server.base + "/v1/models", timeout=10).json().get("models", [])
            models = [m["id"] for m in loaded]
            cls = BrowserFollower if args.follower == "browser" else HttpFollower
            follower = cls(server.base, session_ids)
            finals, runs = asyncio.run(run(server, follower, audios, session_ids, args))
            seen, modes = follower.seen()
            follower.screenshot(ROOT / "test-artifacts" / "browser" / "dashboard-bench.png")  # git-ignored
        finally:
            if follower is not None:
                follower.close()
            server.stop()

    errors = [f"{type(r).__name__}: {r}" for r in runs if isinstance(r, BaseException)]
    errors += [
        f"closed {r.close_code}" for r in runs if not isinstance(r, BaseException) and r.close_code != 1000
    ]
    server_latency = [
        m["latency_ms"]
        for r in runs
        if not isinstance(r, BaseException)
        for m in r.messages
        if m.get("type") == "final"
    ]
    lags = [(seen[key] - at) * 1000.0 for key, at in finals.items() if key in seen]
    missing = sorted(f"{s}:{q}" for (s, q) in finals if (s, q) not in seen)
    result = {
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores; load average at the end "
        f"{os.getloadavg()[0]:.1f} (a shared machine)",
        "models": ", ".join(models),
        "dummy_models": args.dummy_models,
        "streams": args.streams,
        "seconds_per_stream": args.seconds,
        "follower": args.follower,
        "follower_detail": (
            "headless Chromium, one tab per stream on /ui/dashboard#session=<id>"
            if args.follower == "browser"
            else "asyncio HTTP client per stream, as dashboard.js follows a session"
        ),
        "follow_modes": sorted(set(modes.values()) - {None}),
        "finals": len(finals),
        "seen_on_dashboard": len(lags),
        "missing": missing[:20],
        "lag_ms": {
            "p50": percentile(lags, 50),
            "p95": percentile(lags, 95),
            "max": percentile(lags, 100),
            "min": percentile(lags, 0),
        },
        "target_ms": args.target_ms,
        "within_target": bool(lags) and not missing and max(lags) <= args.target_ms,
        "stream_final_latency_ms": {
            "p50": percentile(server_latency, 50),
            "p95": percentile(server_latency, 95),
        },
        "definition": "lag = result on the dashboard (page's Date.now() / follower's time.time()) - final "
        "received by the streaming client (time.time()); stream_final_latency_ms is the finals' own "
        "latency_ms (speech end -> final), for context",
        "errors": errors[:10],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
