"""Asynchronous jobs over real HTTP (``/v1/jobs``), with the shipped models, the real Analyzer, the
SQLite session store and a webhook receiver on loopback.

One server (API keys on, tenants alice and bob, admin root) serves the behaviour checks; the restart
test runs its own server three times on one data directory.
"""

from __future__ import annotations

import asyncio
import io
import json
import time

import numpy as np
import pytest
import soundfile as sf

from app.jobs import webhooks as webhook_module
from app.jobs.store import JobStore
from app.jobs.webhooks import verify
from tests.jobs_support import SECRET, JobServer, Receiver, long_recording_wav, wait_for
from tests.serving_helpers import ANGRY, STEREO
from tests.stream_support import free_port

ALICE, BOB, ROOT = "ka", "kb", "root-key"
AUTH = dict(api_keys=["alice:ka", "bob:kb"], admin_keys=[ROOT], auth_fail_burst=0, key_rate_per_s=0)
N_UTTERANCES = 4  # tests/jobs_support.PARTS


def webhooks(url: str) -> dict:
    return {
        "hook": {"url": url, "secret": SECRET},
        "alice-only": {"url": url, "secret": SECRET, "tenants": ["alice"]},
    }


@pytest.fixture(scope="module")
def recording() -> tuple[bytes, float]:
    return long_recording_wav()


@pytest.fixture(scope="module")
def receiver():
    r = Receiver()
    yield r
    r.close()


@pytest.fixture(scope="module")
def server(tmp_path_factory, receiver):
    srv = JobServer(
        tmp_path_factory.mktemp("jobs-live"),
        free_port(),
        **AUTH,
        webhooks=webhooks(receiver.url),
        job_max_in_flight=1,  # one utterance at a time: progress moves in visible steps
        job_max_duration_s=25.0,
    )
    srv.start()
    yield srv
    srv.stop()


def post_job(srv: JobServer, wav: bytes, key: str, query: str = "", name: str = "call.wav"):
    return srv.request("POST", f"/v1/jobs{query}", key, files={"file": (name, wav, "audio/wav")})


def get_job(srv: JobServer, job_id: str, key: str = ROOT) -> dict:
    r = srv.request("GET", f"/v1/jobs/{job_id}", key)
    assert r.status_code == 200, r.text
    return r.json()


def wait_status(srv: JobServer, job_id: str, states=("done", "failed"), timeout_s: float = 180.0) -> dict:
    return wait_for(lambda: (j := get_job(srv, job_id)) and j["status"] in states and j, timeout_s, 0.1)


def hits_for(receiver: Receiver, delivery_id: str):
    return [h for h in receiver.hits if h.headers.get("X-Emotion-Delivery") == delivery_id]


@pytest.fixture(scope="module")
def finished(server, recording, receiver):
    """alice's job on the ~20-s recording, watched from 202 to done (every status poll kept)."""
    wav, duration = recording
    r = post_job(server, wav, ALICE, "?webhook=hook&roles=agent")
    assert r.status_code == 202, r.text
    created = r.json()
    polls = [created]
    deadline = time.monotonic() + 180
    while polls[-1]["status"] not in ("done", "failed"):
        assert time.monotonic() < deadline, polls[-1]
        time.sleep(0.05)
        polls.append(get_job(server, created["job_id"], ALICE))
    return r, polls, duration


def test_a_job_reaches_done_with_rising_progress_and_its_results_in_the_session(server, finished):
    response, polls, duration = finished
    created, done = polls[0], polls[-1]
    assert response.headers["location"] == f"/v1/jobs/{created['job_id']}"
    assert created["status"] == "queued" and created["progress"] == 0.0
    assert created["session_id"] == f"job-{created['job_id']}"
    assert created["file"]["duration_s"] == pytest.approx(duration, abs=0.01)
    assert done["status"] == "done", done["error"]
    progress = [p["progress"] for p in polls]
    assert progress == sorted(progress)  # never goes back
    assert any(0.0 < p < 1.0 for p in progress)  # seen part-way
    assert {"queued", "running", "done"} <= {p["status"] for p in polls}
    assert done["progress"] == 1.0 and done["segments_done"] == done["segments_total"] == N_UTTERANCES
    assert done["error"] is None and done["runs"] == 1
    for name in ("created_at", "updated_at", "started_at", "finished_at"):
        assert done[name].endswith("Z") and done[name][:2] == "20"
    summary = done["result"]
    assert summary["segments"] == N_UTTERANCES and (summary["first_seq"], summary["last_seq"]) == (1, 4)
    assert sum(summary["emotion"]["probabilities"].values()) == pytest.approx(1.0, abs=1e-4)
    ranking = summary["emotion"]["ranking"]  # the v2 Emotion shape
    assert (
        ranking[0]["label"] == summary["emotion"]["label"]
        and ranking[0]["score"] == summary["emotion"]["score"]
    )
    assert [r["score"] for r in ranking] == sorted((r["score"] for r in ranking), reverse=True)

    sid = done["session_id"]
    results = server.request("GET", f"/v1/sessions/{sid}/results?limit=100", ALICE).json()["results"]
    assert [r["seq"] for r in results] == [1, 2, 3, 4]
    assert all(r["job_id"] == done["job_id"] and r["source"] == "job" for r in results)
    assert all(r["role"] == "agent" for r in results)  # roles=agent: channel 0
    assert [r["start"] for r in results] == sorted(r["start"] for r in results)
    assert all("door" in r["text"].lower() for r in results)
    session = server.request("GET", f"/v1/sessions/{sid}", ALICE).json()
    assert session["state"] == "ended" and session["end_reason"] == "job_done"  # its own session ends


def test_a_job_cuts_the_file_as_predict_does(server, finished, recording):
    wav, _ = recording
    r = server.request("POST", "/v1/predict", ALICE, files={"file": ("call.wav", wav, "audio/wav")})
    assert r.status_code == 200, r.text
    sid = finished[1][-1]["session_id"]
    stored = server.request("GET", f"/v1/sessions/{sid}/results", ALICE).json()["results"]
    assert [(s["start"], s["end"]) for s in r.json()["segments"]] == [(s["start"], s["end"]) for s in stored]


def test_the_job_webhook_arrives_signed_and_is_visible(server, finished, receiver):
    done = finished[1][-1]
    job = wait_for(
        lambda: (j := get_job(server, done["job_id"], ALICE))["deliveries"][0]["status"] != "pending" and j
    )
    (delivery,) = job["deliveries"]
    assert delivery["event"] == "job.done" and delivery["target"] == "hook"
    assert delivery["status"] == "delivered" and delivery["attempts"] == 1
    assert delivery["last_status_code"] == 200 and delivery["next_attempt_at"] is None
    (hit,) = hits_for(receiver, delivery["id"])
    assert hit.headers["X-Emotion-Event"] == "job.done"
    assert verify(SECRET, hit.body, hit.headers["X-Emotion-Signature"])
    assert not verify("not-the-secret-0123456789", hit.body, hit.headers["X-Emotion-Signature"])
    payload = json.loads(hit.body)
    assert payload["id"] == delivery["id"] and payload["event"] == "job.done"
    assert payload["data"]["job"]["job_id"] == done["job_id"]
    assert payload["data"]["job"]["status"] == "done" and payload["data"]["job"]["result"]["segments"] == 4


def test_separate_channels_get_their_roles_in_a_session_the_client_named(server):
    r = server.request(
        "POST",
        "/v1/jobs?channels=separate&roles=agent,customer&session_id=call-7",
        BOB,
        files={"file": ("call.wav", STEREO.read_bytes(), "audio/wav")},
    )
    assert r.status_code == 202, r.text
    assert r.json()["session_id"] == "call-7" and r.json()["file"]["channels"] == 2
    done = wait_status(server, r.json()["job_id"])
    assert done["status"] == "done", done["error"]
    results = server.request("GET", "/v1/sessions/call-7/results", BOB).json()["results"]
    assert {(x["channel"], x["role"]) for x in results} == {(0, "agent"), (1, "customer")}
    session = server.request("GET", "/v1/sessions/call-7", BOB).json()
    assert session["state"] == "active" and session["tenant"] == "bob"  # the client's session stays open


def test_the_event_bus_can_enqueue_session_ended(server, receiver):
    """``app.jobs.webhooks.enqueue``: a module-level way to queue any event for a named target."""
    delivery_id = asyncio.run(webhook_module.enqueue("hook", "session.ended", {"session_id": "call-7"}))
    assert delivery_id is not None
    hit = wait_for(lambda: hits_for(receiver, delivery_id))[0]
    assert hit.headers["X-Emotion-Event"] == "session.ended"
    assert verify(SECRET, hit.body, hit.headers["X-Emotion-Signature"])
    assert json.loads(hit.body)["data"] == {"session_id": "call-7"}


def test_a_stream_that_ends_sends_session_ended_to_the_targets_its_tenant_may_use(server, receiver):
    """The event bus's ``ended`` becomes a signed ``session.ended`` delivery (app.jobs.lifecycle),
    to "hook" (every tenant) and not to "alice-only" (the stream is bob's)."""
    from app.streaming.client import stream_file

    run = asyncio.run(
        stream_file(
            ANGRY,
            server.base.replace("http", "ws") + "/v1/stream",
            realtime=False,
            session_id="live-end",
            api_key=BOB,
            timeout_s=120,
        )
    )
    assert run.of_type("final") and run.of_type("end")

    def ended_hits():
        out = []
        for h in receiver.hits:
            body = json.loads(h.body)
            if (
                body["event"] == "session.ended"
                and (body["data"].get("session") or {}).get("id") == "live-end"
            ):
                out.append((h, body))
        return out

    hit, body = wait_for(ended_hits)[0]
    assert verify(SECRET, hit.body, hit.headers["X-Emotion-Signature"])
    session = body["data"]["session"]
    assert session["state"] == "ended" and session["tenant"] == "bob" and session["last_seq"] >= 1
    time.sleep(1.0)  # a second (wrong) delivery to alice-only would have arrived by now
    assert len(ended_hits()) == 1


def test_webhook_names_must_be_configured_for_the_caller(server, recording):
    wav, _ = recording
    before = len(server.request("GET", "/v1/jobs?limit=1000", ROOT).json()["jobs"])
    for key, name in ((ALICE, "nope"), (BOB, "alice-only"), (ALICE, "http://evil.example/x")):
        r = post_job(server, wav, key, f"?webhook={name}")
        assert r.status_code == 422, r.text
        assert r.json()["error"] in ("unknown_webhook", "invalid_request")
    assert post_job(server, wav, BOB, "?webhook=nope").json()["error"] == "unknown_webhook"
    assert len(server.request("GET", "/v1/jobs?limit=1000", ROOT).json()["jobs"]) == before


def test_bad_input_gets_the_same_errors_as_predict(server):
    silence_30s = io.BytesIO()
    sf.write(silence_30s, np.zeros(30 * 16000, np.float32), 16000, format="WAV", subtype="PCM_16")
    for blob in (b"this is not audio at all" * 10, b"", b"RIFF\x00\x00\x00\x00WAVEfmt "):
        files = {"file": ("x.wav", blob, "audio/wav")}
        job = server.request("POST", "/v1/jobs", ALICE, files=files)
        predict = server.request("POST", "/v1/predict", ALICE, files=files)
        assert 400 <= job.status_code < 500 and job.status_code == predict.status_code, (
            job.text,
            predict.text,
        )
        assert job.json()["error"] == predict.json()["error"]
    r = server.request("POST", "/v1/jobs?models=nope", ALICE, files={"file": ("a.flac", ANGRY.read_bytes())})
    assert r.status_code == 400 and r.json()["error"] == "unknown_model"
    r = post_job(server, silence_30s.getvalue(), ALICE)  # over job_max_duration_s (25 s here)
    assert r.status_code == 413 and r.json()["error"] == "audio_too_long", r.text
    silence_5s = io.BytesIO()
    sf.write(silence_5s, np.zeros(5 * 16000, np.float32), 16000, format="WAV", subtype="PCM_16")
    r = post_job(server, silence_5s.getvalue(), ALICE)  # finding no speech takes the analysis: the job fails
    assert r.status_code == 202, r.text
    failed = wait_status(server, r.json()["job_id"])
    assert failed["status"] == "failed" and failed["error"]["error"] == "no_speech"
    assert failed["progress"] == 0.0 and failed["result"] is None


def test_jobs_are_scoped_to_their_tenant(server, finished):
    job_id, sid = finished[1][-1]["job_id"], finished[1][-1]["session_id"]
    for method in ("GET", "DELETE"):
        r = server.request(method, f"/v1/jobs/{job_id}", BOB)
        assert r.status_code == 404 and r.json()["error"] == "job_not_found"
    assert job_id not in {j["job_id"] for j in server.request("GET", "/v1/jobs", BOB).json()["jobs"]}
    assert job_id in {
        j["job_id"] for j in server.request("GET", "/v1/jobs?status=done", ALICE).json()["jobs"]
    }
    assert job_id in {j["job_id"] for j in server.request("GET", "/v1/jobs", ROOT).json()["jobs"]}
    assert get_job(server, job_id, ROOT)["tenant"] == "alice"
    r = post_job(server, ANGRY.read_bytes(), BOB, f"?session_id={sid}", name="a.flac")
    assert r.status_code == 404 and r.json()["error"] == "session_not_found"  # alice's session
    assert server.request("GET", "/v1/jobs").status_code == 401


def test_cancel_a_queued_and_a_running_job(server, recording, receiver):
    wav, _ = recording
    first = post_job(server, wav, ALICE).json()
    second = post_job(server, wav, ALICE, "?webhook=hook").json()  # waits behind the first (1 worker)
    r = server.request("DELETE", f"/v1/jobs/{second['job_id']}", ALICE)
    assert r.status_code == 200, r.text
    cancelled = r.json()
    assert cancelled["status"] == "failed" and cancelled["error"]["error"] == "cancelled"
    assert cancelled["segments_done"] == 0 and cancelled["runs"] == 0
    assert cancelled["deliveries"][0]["event"] == "job.failed"
    wait_for(lambda: get_job(server, second["job_id"])["deliveries"][0]["status"] == "delivered")

    wait_for(lambda: get_job(server, first["job_id"])["segments_done"] >= 1, 120, 0.05)
    r = server.request("DELETE", f"/v1/jobs/{first['job_id']}", ALICE)
    assert r.status_code == 200, r.text
    stopped = r.json()
    assert stopped["status"] == "failed" and stopped["error"]["error"] == "cancelled"
    assert 1 <= stopped["segments_done"] < N_UTTERANCES
    kept = server.request("GET", f"/v1/sessions/{stopped['session_id']}/results", ALICE).json()["results"]
    assert len(kept) == stopped["segments_done"]  # what was stored stays
    time.sleep(0.5)
    assert get_job(server, first["job_id"])["segments_done"] == stopped["segments_done"]  # really stopped

    assert server.request("DELETE", f"/v1/jobs/{first['job_id']}", ALICE).status_code == 204  # forget it
    assert server.request("GET", f"/v1/jobs/{first['job_id']}", ALICE).status_code == 404


def _db_job(data_dir, job_id: str):
    async def read():
        store = JobStore(data_dir / "jobs")
        try:
            job = await store.get(job_id)
            return job, await store.deliveries_of(job_id)
        finally:
            await store.close()

    return asyncio.run(read())


def test_jobs_and_pending_deliveries_survive_restarts(tmp_path):
    """1st life: jobs are queued but not run (job_workers=0), the queue bound answers 503; stop.
    2nd life: the short job finishes (its webhook target is down: the delivery stays pending), the
    long one is stopped part-way. 3rd life: the receiver is up; the long job resumes after its
    stored utterances and completes once, with no duplicate; both deliveries arrive."""
    wav, _ = long_recording_wav(repeat=2)  # 8 utterances (~39 s): time to stop it part-way
    n = 2 * N_UTTERANCES
    port = free_port()  # the receiver's port: nothing listens there before the 3rd life
    srv = JobServer(
        tmp_path,
        free_port(),
        webhooks=webhooks(f"http://127.0.0.1:{port}/hook"),
        job_max_in_flight=1,
        job_max_queued=2,
        webhook_backoff_s=5.0,
    )
    srv.start(job_workers=0)
    try:
        short = post_job(srv, ANGRY.read_bytes(), ROOT, "?webhook=hook", name="a.flac").json()
        long = post_job(srv, wav, ROOT, "?webhook=hook").json()
        full = post_job(srv, wav, ROOT)
        assert full.status_code == 503 and full.json()["error"] == "job_queue_full"
        assert int(full.headers["retry-after"]) >= 1
        time.sleep(0.5)
        assert get_job(srv, long["job_id"])["status"] == "queued"
    finally:
        srv.stop()

    srv.start()
    try:
        wait_for(lambda: get_job(srv, long["job_id"])["segments_done"] >= 1, 180, 0.05)
    finally:
        srv.stop()
    job, _ = _db_job(tmp_path, long["job_id"])
    assert job.status == "queued" and job.runs == 1 and 1 <= job.segments_done < n
    job, (pending,) = _db_job(tmp_path, short["job_id"])
    assert job.status == "done" and pending.status == "pending" and pending.attempts == 1
    assert pending.last_status_code is None and pending.last_error  # refused: nothing listened

    receiver = Receiver(port=port)
    srv.start()
    try:
        done = wait_status(srv, long["job_id"])
        assert done["status"] == "done" and done["runs"] == 2, done
        results = srv.request("GET", f"/v1/sessions/{done['session_id']}/results").json()["results"]
        assert len(results) == n == done["segments_total"] == done["segments_done"]
        assert [r["seq"] for r in results] == list(range(1, n + 1))
        assert len({(r["start"], r["channel"]) for r in results}) == n  # no duplicates
        deliveries = wait_for(
            lambda: (
                all(
                    d["status"] == "delivered"
                    for j in (short, long)
                    for d in get_job(srv, j["job_id"])["deliveries"]
                )
                and [get_job(srv, j["job_id"])["deliveries"][0] for j in (short, long)]
            ),
            30,
        )
    finally:
        srv.stop()
        receiver.close()
    resumed, first = deliveries
    assert resumed["attempts"] == 2 and first["attempts"] == 1
    (hit,) = hits_for(receiver, resumed["id"])
    assert hit.headers["X-Emotion-Attempt"] == "2" and verify(
        SECRET, hit.body, hit.headers["X-Emotion-Signature"]
    )
    assert json.loads(hit.body)["data"]["job"]["job_id"] == short["job_id"]
