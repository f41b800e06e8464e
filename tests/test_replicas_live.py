"""Two replicas behind nginx, one killed with ``kill -9`` during 4 live streams (issue 12).

Everything is real and on loopback: a ``redis-server`` (the shared store), two server processes
(``python -m app.cli serve``, ``EMOTION_STORE=redis``, the shipped 3m-ser model: the smallest
realistic model set, so that each process loads and warms up in a few seconds), and nginx with the
shipped ``deploy/nginx.conf`` + ``deploy/nginx-proxy.conf`` proxying both. Four clients stream
18.3 s of speech (two RAVDESS sentences, twice) in real time through nginx with
``reconnect=True``. Once every stream has received a final and is past 7 s of audio, the replica
holding the most streams is killed with SIGKILL. Then:

* the killed replica's streams reconnect through nginx and resume on the other replica (their
  lease owner changes to the survivor's process), the others are untouched;
* every stream ends normally with its session: same ``session_id``, stored ``seq`` 1..N without a
  gap, the sentences in order and none twice, times increasing across the reconnect;
* 0 acknowledged results lost: every final a client received is stored, identically; and every
  stored result was received or reported by ``ready.last_seq`` as stored-but-not-received.

The lease TTL is 3 s here (``EMOTION_STREAM_LEASE_TTL_S``; default 10 s), so a resumed stream waits
at most ~3 s for the dead replica's lease to expire. Runs in about a minute on 2 cores; the
measured numbers are printed (``pytest -s``).
"""

from __future__ import annotations

import asyncio
import json
import shutil
import time
import uuid

import numpy as np
import pytest
import soundfile as sf

from app.streaming.client import StreamRun, stream_audio
from tests.replica_support import ServerProcess, nginx_binary, nginx_proxy
from tests.stream_support import redis_server
from tests.test_stream_ws import TWO_UTT

LEASE_TTL_S = 3.0
STREAMS = 4
KILL_AFTER_AUDIO_S = 7.0

pytestmark = pytest.mark.skipif(
    shutil.which("redis-server") is None or nginx_binary() is None,
    reason="needs redis-server and nginx (make system-deps installs both)",
)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """(redis url, redis prefix, [replica A, replica B], nginx port)."""
    work = tmp_path_factory.mktemp("replicas")
    prefix = f"rep{uuid.uuid4().hex[:6]}:"
    with redis_server() as url:
        env = {
            "EMOTION_STORE": "redis",
            "EMOTION_REDIS_URL": url,
            "EMOTION_REDIS_PREFIX": prefix,
            "EMOTION_MODELS": "3m-ser",
            "EMOTION_STREAM_LEASE_TTL_S": str(LEASE_TTL_S),
            "EMOTION_SQLITE_PATH": str(work / "unused.db"),
            "EMOTION_API_KEYS": "",
            "EMOTION_LOG_LEVEL": "warning",
        }
        replicas = [ServerProcess(name, env, work) for name in ("replica-a", "replica-b")]
        try:
            for r in replicas:  # load both at once
                r.start()
            deadline = time.monotonic() + 240
            for r in replicas:
                r.wait_ready(deadline)
            with nginx_proxy([r.port for r in replicas], work / "nginx") as port:
                yield url, prefix, replicas, port, work
        finally:
            for r in replicas:
                r.stop()


def speech() -> tuple[np.ndarray, int]:
    """18.3 s: "Kids are talking by the door" (angry), "Dogs are sitting by the door" (neutral), 0.6 s of
    silence, the same two again."""
    audio, rate = sf.read(TWO_UTT, dtype="float32")
    return np.concatenate([audio, np.zeros(int(0.6 * rate), np.float32), audio]), rate


def _pid_of(owner: str | None) -> int | None:
    return int(owner.split(":")[-2]) if owner else None


def test_kill_9_of_a_replica_during_4_streams_loses_no_acknowledged_result(cluster):
    import httpx
    import redis.asyncio as aioredis

    url, prefix, replicas, port, work = cluster
    audio, rate = speech()
    ws_url = f"ws://127.0.0.1:{port}/v1/stream"
    sessions = [f"replica-{i}-{uuid.uuid4().hex[:6]}" for i in range(STREAMS)]
    finals_seen = dict.fromkeys(sessions, 0)
    owners: dict[str, list[int]] = {s: [] for s in sessions}  # lease owner pids seen, in order
    killed: dict[str, object] = {}

    def counter(s):
        def on_message(m):
            if m["type"] == "final":
                finals_seen[s] += 1

        return on_message

    async def watch_leases(redis, stop: asyncio.Event) -> None:
        while not stop.is_set():
            for s in sessions:
                pid = _pid_of(await redis.get(f"{prefix}session{{{s}}}:lease"))
                if pid is not None and (not owners[s] or owners[s][-1] != pid):
                    owners[s].append(pid)
            await asyncio.sleep(0.1)

    async def killer(runs_started: float) -> None:
        while time.monotonic() - runs_started < KILL_AFTER_AUDIO_S or min(finals_seen.values()) < 1:
            await asyncio.sleep(0.05)
        by_pid = {r.pid: sum(1 for s in sessions if owners[s] and owners[s][-1] == r.pid) for r in replicas}
        victim = max(replicas, key=lambda r: by_pid[r.pid])
        killed.update(
            replica=victim,
            at=time.monotonic(),
            streams=[s for s in sessions if owners[s] and owners[s][-1] == victim.pid],
            streams_per_pid=by_pid,
        )
        victim.kill9()

    async def scenario() -> list[StreamRun]:
        redis = aioredis.Redis.from_url(url, decode_responses=True)
        stop = asyncio.Event()
        watcher = asyncio.create_task(watch_leases(redis, stop))
        t0 = time.monotonic()
        kill = asyncio.create_task(killer(t0))
        runs = await asyncio.gather(
            *(
                stream_audio(
                    audio,
                    rate,
                    ws_url,
                    realtime=True,
                    session_id=s,
                    partials=False,
                    on_message=counter(s),
                    reconnect=True,
                    reconnect_for_s=30.0,
                    timeout_s=120.0,
                )
                for s in sessions
            )
        )
        await kill
        stop.set()
        await watcher
        await redis.aclose()
        return list(runs)

    t_start = time.monotonic()
    runs = asyncio.run(scenario())
    wall_s = time.monotonic() - t_start
    victim: ServerProcess = killed["replica"]  # type: ignore[assignment]
    survivor = next(r for r in replicas if r is not victim)
    affected = set(killed["streams"])  # type: ignore[arg-type]
    assert affected, f"no stream was on the killed replica: {killed}"

    stored = {}
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10) as http:  # through nginx
        for s in sessions:
            body = http.get(f"/v1/sessions/{s}/results").json()
            stored[s] = body
    report = {"streams": STREAMS, "killed_replica_streams": len(affected), "wall_s": round(wall_s, 1)}
    acked_total = stored_total = 0
    gaps = []
    for s, run in zip(sessions, runs, strict=True):
        where = f"{s}: {run.last_connection()[-3:]}\n{victim.log_tail(5)}\n{survivor.log_tail(15)}"
        assert run.ended and run.close_code == 1000, where
        assert run.session_id == s
        received = [f for f in run.of_type("final")]
        results = stored[s]["results"]
        seqs = [r["seq"] for r in results]
        # the session continued: one session, numbering without a gap, ended by the final connection
        assert stored[s]["state"] == "ended" and seqs == list(range(1, len(seqs) + 1)), seqs
        # 0 acknowledged results lost: every final received is stored, as it was sent
        by_seq = {r["seq"]: r for r in results}
        for f in received:
            assert f["seq"] in by_seq, (s, f["seq"], seqs)
            r = by_seq[f["seq"]]
            assert (r["start"], r["end"], r["text"]) == (f["start"], f["end"], f["text"])
        # and nothing stored went unaccounted: received, or announced by a resumed ``ready``
        assert sorted({f["seq"] for f in received} | set(run.missed_seqs)) == seqs, (s, run.missed_seqs)
        # the sentences in order, each once: nothing lost with the replica, nothing analysed twice
        sentences = [
            "kids" if "talking" in r["text"].lower() else "dogs" if "sitting" in r["text"].lower() else "?"
            for r in results
        ]
        detail = (s, s in affected, [(r["seq"], r["start"], r["end"], r["text"]) for r in results])
        assert sentences == ["kids", "dogs", "kids", "dogs"], detail
        # times continue across the reconnect: increasing, no overlap
        for a, b in zip(results, results[1:], strict=False):
            assert b["start"] >= a["end"] - 1e-3 and b["end"] > b["start"], (s, a, b)
        assert results[-1]["end"] <= len(audio) / rate + 0.05
        acked_total += len(received)
        stored_total += len(results)
        if s in affected:
            assert len(run.reconnects) == 1 and run.connections == 2, (s, run.reconnects)
            rec = run.reconnects[0]
            assert rec.after_code == 1006 and rec.ready_at is not None  # dropped, then resumed
            assert owners[s][0] == victim.pid and owners[s][-1] == survivor.pid, owners[s]
            readies = run.of_type("ready")
            assert [m["session_id"] for m in readies] == [s, s]
            assert readies[1]["resume_offset_s"] == rec.resume_offset_s > 0
            # the resumed connection's finals start after the resume point
            after = [f for f in received if f["seq"] > readies[1]["last_seq"]]
            assert after and all(f["start"] >= readies[1]["resume_offset_s"] for f in after)
            assert rec.gap_s is not None and rec.gap_s < LEASE_TTL_S + 5.0
            gaps.append(round(rec.gap_s, 2))
            report.setdefault("resent_audio_s", []).append(round(rec.resent_s, 2))
            report.setdefault("attempts", []).append(rec.attempts)
        else:
            assert not run.reconnects and run.connections == 1, (s, run.reconnects)
            assert owners[s] == [survivor.pid], owners[s]
    report.update(
        finals_acknowledged=acked_total,
        finals_stored=stored_total,
        acknowledged_lost=0,
        missed_then_recovered=sum(len(r.missed_seqs) for r in runs),
        reconnect_s=gaps,
    )
    print("\nreplica kill -9 run:", json.dumps(report))
    details = {
        s: [(r["seq"], r["start"], r["end"], r["text"]) for r in stored[s]["results"]] for s in sessions
    }
    (work / "report.json").write_text(
        json.dumps({**report, "affected": sorted(affected), "results": details})
    )
