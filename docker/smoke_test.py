"""Smoke test of a running server (the Docker image in ``make docker-test``): readiness, one REST
prediction and one WebSocket stream, checked against what a client relies on.

    python docker/smoke_test.py --url http://127.0.0.1:8000 [--container ID] [--ready-timeout 300]

Exits 0 when every check passed, 1 with the failed check otherwise (``docker/docker_test.sh`` then
prints the container's logs). ``--container`` makes the readiness wait stop at once when that
container is no longer running, instead of waiting out the timeout. Runs from the repository root
(the stream uses ``app.streaming.client``; the fixtures are ``tests/fixtures``).
Single-threaded; one asyncio loop for the stream.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parent.parent
FIXTURES = REPO / "tests" / "fixtures"


class CheckFailed(Exception):
    pass


def check(ok: bool, what: str) -> None:
    if not ok:
        raise CheckFailed(what)


def step(name: str):
    """Print a step's name and its duration."""

    class _Step:
        def __enter__(self):
            self.t0 = time.monotonic()
            print(f"[smoke] {name} ...", flush=True)

        def __exit__(self, exc_type, exc, tb):
            state = "ok" if exc is None else "FAILED"
            print(f"[smoke] {name}: {state} ({time.monotonic() - self.t0:.1f} s)", flush=True)

    return _Step()


def container_running(container: str, docker: str) -> bool:
    out = subprocess.run(
        [docker, "inspect", "-f", "{{.State.Running}}", container], capture_output=True, text=True
    )
    return out.returncode == 0 and out.stdout.strip() == "true"


def wait_ready(client: httpx.Client, timeout_s: float, container: str | None, docker: str) -> None:
    deadline = time.monotonic() + timeout_s
    last = "no answer"
    while time.monotonic() < deadline:
        if container and not container_running(container, docker):
            raise CheckFailed(f"container {container} stopped before /readyz answered 200 (last: {last})")
        try:
            r = client.get("/readyz", timeout=5)
            if r.status_code == 200:
                return
            last = f"{r.status_code} {r.text[:300]}"
        except httpx.HTTPError as exc:
            last = f"{type(exc).__name__}: {exc}"
        time.sleep(1.0)
    raise CheckFailed(f"/readyz not 200 within {timeout_s:.0f} s (last: {last})")


def check_basics(client: httpx.Client) -> list[str]:
    """Liveness, models, metrics and the offline API docs; returns the loaded model ids."""
    for path in ("/healthz", "/metrics", "/docs", "/openapi.json"):
        r = client.get(path)
        check(r.status_code == 200, f"GET {path} -> {r.status_code} {r.text[:200]}")
    r = client.get("/v1/models")
    check(r.status_code == 200, f"GET /v1/models -> {r.status_code} {r.text[:200]}")
    body = r.json()
    models = body.get("models", body) if isinstance(body, dict) else body
    ids = [m["id"] for m in models]
    check(len(ids) >= 1, f"/v1/models lists no model: {body}")
    return ids


def words_of(response: dict, segment: dict) -> list[dict]:
    # Result shape v2 puts words in segments only; v1 also had a top-level list.
    return segment.get("words") or response.get("words") or []


def check_predict(client: httpx.Client, fixture: Path) -> None:
    with fixture.open("rb") as fh:
        r = client.post(
            "/v1/predict",
            params={"words": "true"},
            files={"file": (fixture.name, fh, "audio/flac")},
            timeout=300,
        )
    check(r.status_code == 200, f"POST /v1/predict -> {r.status_code} {r.text[:500]}")
    body = r.json()
    segments = body.get("segments") or []
    check(len(segments) >= 1, f"no segment in the prediction: {json.dumps(body)[:500]}")
    seg = next((s for s in segments if (s.get("text") or "").strip()), None)
    check(seg is not None, f"no segment with text: {json.dumps(segments)[:500]}")
    assert seg is not None
    emotion = seg.get("emotion") or {}
    probs = emotion.get("probabilities") or {}
    check(
        emotion.get("label") in probs and abs(sum(probs.values()) - 1.0) < 1e-3,
        f"segment emotion is not a label with probabilities summing to 1: {emotion}",
    )
    words = words_of(body, seg)
    check(
        len(words) >= 1 and all(0.0 <= w["confidence"] <= 1.0 and w["word"].strip() for w in words),
        f"words=true gave no words with confidences: {words}",
    )
    print(
        f"[smoke] predict: {len(segments)} segment(s), text={seg['text'].strip()!r}, "
        f"label={emotion['label']}, {len(words)} words",
        flush=True,
    )


def check_stream(ws_url: str, fixture: Path) -> None:
    from app.streaming.client import load_audio, stream_audio

    samples, rate = load_audio(fixture)
    run = asyncio.run(stream_audio(samples, rate, ws_url, realtime=False, timeout_s=300))
    types = [m.get("type") for m in run.messages]
    check("ready" in types, f"no ready message (close {run.close_code} {run.close_reason!r}): {types}")
    errors = run.of_type("error")
    check(not errors, f"stream errors: {errors}")
    finals = run.of_type("final")
    check(len(finals) >= 1, f"no final (close {run.close_code} {run.close_reason!r}): {types}")
    with_text = [f for f in finals if (f.get("text") or "").strip() and (f.get("emotion") or {}).get("label")]
    check(len(with_text) >= 1, f"no final with text and an emotion label: {finals}")
    # seq is null when storing failed: the session store (SQLite on the /data volume) must be writable.
    check(all(f.get("seq") is not None for f in finals), f"a final was not stored (seq null): {finals}")
    check("end" in types, f"no end message: {types}")
    print(
        f"[smoke] stream: {len(finals)} final(s): "
        + "; ".join(f"{f['text'].strip()!r} -> {f['emotion']['label']}" for f in with_text),
        flush=True,
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--url", required=True, help="http://HOST:PORT of the server")
    ap.add_argument("--container", help="docker container id: stop waiting when it is not running")
    ap.add_argument("--docker", default="docker", help="docker client for --container")
    ap.add_argument("--ready-timeout", type=float, default=300.0)
    ap.add_argument("--predict-fixture", type=Path, default=FIXTURES / "kids_angry_a01.flac")
    ap.add_argument("--stream-fixture", type=Path, default=FIXTURES / "two_utterances.flac")
    args = ap.parse_args(argv)
    url = args.url.rstrip("/")
    ws_url = "ws" + url[len("http") :] + "/v1/stream"
    try:
        with httpx.Client(base_url=url, timeout=30) as client:
            with step(f"wait for /readyz (<= {args.ready_timeout:.0f} s)"):
                wait_ready(client, args.ready_timeout, args.container, args.docker)
            with step("healthz, metrics, docs, models"):
                ids = check_basics(client)
                print(f"[smoke] models: {', '.join(ids)}", flush=True)
            with step(f"POST /v1/predict {args.predict_fixture.name}"):
                check_predict(client, args.predict_fixture)
        with step(f"WS /v1/stream {args.stream_fixture.name}"):
            check_stream(ws_url, args.stream_fixture)
    except CheckFailed as exc:
        print(f"[smoke] FAILED: {exc}", file=sys.stderr, flush=True)
        return 1
    print("[smoke] all checks passed", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
