"""The streaming state machine without sockets: VAD, segmentation, LocalAgreement, channels,
back-pressure, flushing. A fake backend stands in for the service (no ASR, no models)."""

from __future__ import annotations

import asyncio
import random
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from app.analysis.segmenter import (
    Candidate,
    PartialDue,
    SegmenterConfig,
    UtteranceEnd,
    UtterancePolicy,
    UtteranceSegmenter,
)
from app.analysis.vad import StreamingVAD
from app.errors import QueueFull
from app.inference.scheduler import Priority
from app.schemas import Emotion, TextSentiment, WordOut
from app.settings import Settings
from app.store.sqlite import SQLiteStore
from app.streaming.audio import ArrivalClock, ChannelResampler, InvalidAudioFrame, PcmDecoder
from app.streaming.local_agreement import LocalAgreement
from app.streaming.protocol import FinalMessage, InterimMessage, PartialMessage, StartMessage, WarningMessage
from app.streaming.session import StreamSession, UtteranceOutput

FIXTURES = Path(__file__).parent / "fixtures"
SR = 16000


@pytest.fixture(scope="module")
def two_utt() -> np.ndarray:
    audio, sr = sf.read(FIXTURES / "two_utterances.flac", dtype="float32")
    assert sr == SR
    return audio


def pcm16(x: np.ndarray) -> bytes:
    return (np.clip(x, -1, 1) * 32767).astype("<i2").tobytes()


def frames(x: np.ndarray, rate: int = SR, frame_ms: int = 20) -> list[bytes]:
    """Interleaved pcm_s16le frames of (n,) or (n, channels) audio."""
    x = x if x.ndim == 2 else x[:, None]
    step = rate * frame_ms // 1000
    return [pcm16(x[i : i + step].reshape(-1)) for i in range(0, len(x), step)]


# --- VAD and segmentation ----------------------------------------------------------------------


def test_streaming_vad_matches_whole_clip_vad(two_utt):
    from faster_whisper.vad import get_vad_model

    n = len(two_utt) // 512 * 512
    whole = get_vad_model()(two_utt[:n]).reshape(-1)
    vad = StreamingVAD()
    parts = [vad.feed(two_utt[i : i + 320]) for i in range(0, n, 320)]  # 20-ms frames
    streamed = np.concatenate(parts)
    assert np.allclose(streamed, whole[: len(streamed)], atol=1e-5)


def run_segmenter(audio: np.ndarray, cfg: SegmenterConfig, frame: int = 320):
    seg = UtteranceSegmenter(cfg)
    events = []
    for i in range(0, len(audio), frame):
        events += seg.feed(audio[i : i + frame])
    return seg, events


def test_segmenter_finds_both_utterances(two_utt):
    seg, events = run_segmenter(two_utt, SegmenterConfig(partial_every_s=0.5))
    ends = [e for e in events if isinstance(e, UtteranceEnd)]
    assert [e.reason for e in ends] == ["end_of_speech", "end_of_speech"]
    # Speech is at about 1.09-3.07 s and 6.18-7.90 s (offline VAD).
    (a, b) = ends
    assert 0.7 < a.start / SR < 1.1 and 2.9 < a.speech_end / SR < 3.4
    assert 5.8 < b.start / SR < 6.2 and 7.7 < b.speech_end / SR < 8.3
    for e in ends:
        assert len(e.audio) == e.end - e.start
        assert e.end - e.speech_end == seg.post_pad
        np.testing.assert_array_equal(e.audio, two_utt[e.start : e.end])
    # A speculative candidate precedes each end, with the very same audio range.
    cands = [e for e in events if isinstance(e, Candidate)]
    assert [(c.start, c.end) for c in cands] == [(e.start, e.end) for e in ends]
    assert sum(isinstance(e, PartialDue) for e in events) >= 4
    assert not seg.flush()  # idle at the end: nothing pending


def test_segmenter_cuts_at_max_length(two_utt):
    speech = two_utt[int(1.1 * SR) : int(3.0 * SR)]
    long = np.tile(speech, 4)  # ~7.6 s of speech without pauses longer than the end silence
    seg, events = run_segmenter(long, SegmenterConfig(UtterancePolicy(max_s=2.0), partial_every_s=0))
    events += seg.flush()
    ends = [e for e in events if isinstance(e, UtteranceEnd)]
    assert any(e.reason == "max_length" for e in ends)
    assert all((e.end - e.start) / SR <= 2.0 + 0.05 for e in ends)
    # Consecutive max-length pieces abut: no audio lost or duplicated between them.
    for prev, nxt in zip(ends, ends[1:], strict=False):
        if prev.reason == "max_length":
            assert nxt.start == prev.end


def test_segmenter_flush_keeps_everything_received(two_utt):
    cut = int(2.0 * SR)  # in the middle of the first sentence
    seg, events = run_segmenter(two_utt[:cut], SegmenterConfig())
    assert not [e for e in events if isinstance(e, UtteranceEnd)]
    (end,) = [e for e in seg.flush("disconnect") if isinstance(e, UtteranceEnd)]
    assert end.reason == "disconnect" and end.end == cut
    np.testing.assert_array_equal(end.audio, two_utt[end.start : cut])


def test_segmenter_ignores_silence_and_clicks():
    rng = np.random.default_rng(0)
    quiet = (rng.standard_normal(SR * 3) * 1e-4).astype(np.float32)
    _, events = run_segmenter(quiet, SegmenterConfig())
    assert not [e for e in events if isinstance(e, UtteranceEnd)]


# --- LocalAgreement ----------------------------------------------------------------------------


def test_local_agreement_confirms_words_seen_twice():
    la = LocalAgreement()
    assert la.update(["Kids"]) == ([], ["Kids"])
    assert la.update(["Kids", "are"]) == (["Kids"], ["are"])
    assert la.update(["Kids", "are", "walking"]) == (["Kids", "are"], ["walking"])
    assert la.update(["kids,", "are", "talking", "by"]) == (["Kids", "are"], ["talking", "by"])
    assert la.update(["Kids", "are", "talking", "by", "the"]) == (["Kids", "are", "talking", "by"], ["the"])
    # A hypothesis contradicting the confirmed prefix does not change it.
    assert la.update(["Dogs", "are"])[0] == ["Kids", "are", "talking", "by"]


def test_local_agreement_prefix_never_changes_on_random_hypotheses():
    rnd = random.Random(7)
    vocab = ["a", "b", "c", "d"]
    for _ in range(200):
        la, seen = LocalAgreement(), []
        truth = [rnd.choice(vocab) for _ in range(10)]
        for step in range(1, 12):
            hyp = truth[:step]
            if rnd.random() < 0.4 and hyp:  # noisy tail
                hyp = hyp[:-1] + [rnd.choice(vocab)]
            confirmed, _ = la.update(hyp)
            assert confirmed[: len(seen)] == seen
            seen = confirmed


# --- audio plumbing ----------------------------------------------------------------------------


def test_pcm_decoder_splits_samples_and_channels():
    x = np.array([[0.5, -0.5], [0.25, -0.25], [0.0, 1.0]], dtype=np.float32)
    raw = pcm16(x.reshape(-1))
    dec = PcmDecoder("pcm_s16le", 2)
    a = dec.decode(raw[:5])  # one whole stereo sample (4 bytes) + 1 byte
    b = dec.decode(raw[5:])
    out = np.concatenate([a, b])
    assert out.shape == (3, 2) and dec.pending_bytes == 0
    np.testing.assert_allclose(out, x, atol=1e-4)
    f32 = PcmDecoder("f32le", 1)
    np.testing.assert_array_equal(f32.decode(np.float32([0.1, 0.2]).tobytes())[:, 0], np.float32([0.1, 0.2]))
    with pytest.raises(InvalidAudioFrame):
        f32.decode(np.float32([np.nan]).tobytes())


def test_streaming_resampler_matches_one_shot():
    from app.analysis.audio import resample

    t = np.arange(48000 * 2) / 48000
    x = (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)
    rs = ChannelResampler(48000)
    parts = [rs(x[i : i + 960]) for i in range(0, len(x), 960)] + [rs(np.zeros(0, np.float32), last=True)]
    streamed = np.concatenate(parts)
    whole = resample(x, 48000)
    assert abs(len(streamed) - len(whole)) <= 2
    n = min(len(streamed), len(whole))
    mid = slice(1000, n - 1000)
    assert np.max(np.abs(streamed[mid] - whole[mid])) < 1e-3


def test_arrival_clock_maps_positions_to_frames():
    clock = ArrivalClock(8000)
    clock.add(160, 1.0)  # 20 ms at 8 kHz = 320 samples at 16 kHz
    clock.add(160, 2.0)
    assert clock.arrival_of(1) == 1.0 and clock.arrival_of(320) == 1.0
    assert clock.arrival_of(321) == 2.0 and clock.arrival_of(10_000) == 2.0


# --- the session with a fake backend -----------------------------------------------------------


class FakeBackend:
    """Instant (or gated) analysis; partial hypotheses grow with the audio, one word per 0.4 s.

    ``idle`` False = finals wait in the ASR lane (no speculation); ``shed`` True = the lane sheds
    every partial pass (``QueueFull``), as it does under load."""

    WORDS = ["kids", "are", "talking", "by", "the", "door", "dogs", "are", "sitting"]
    SENTIMENT = TextSentiment(label="negative", compound=-0.4, pos=0.0, neu=0.7, neg=0.3)

    def __init__(self):
        self.analyzed: list[tuple[int, float, int]] = []
        self.priorities: list[tuple[str, Priority]] = []
        self.gate: asyncio.Event | None = None
        self.idle = True
        self.shed = False

    def resolve_models(self, models):
        return ["fake"]

    async def analyze(self, audio, models, channel, offset_s, key, count_audio=True, priority=Priority.FINAL):
        self.priorities.append(("analyze", priority))
        if self.gate is not None and priority == Priority.FINAL:
            await self.gate.wait()
        await asyncio.sleep(0)
        if priority == Priority.FINAL:
            self.analyzed.append((channel, round(offset_s, 3), len(audio)))
        emotion = Emotion(label="neutral", probabilities={"neutral": 0.75, "sad": 0.25})
        word = WordOut(word="w", start=offset_s, end=offset_s + 0.1, confidence=0.9)
        return UtteranceOutput(
            text=f"ch{channel}@{offset_s:.2f}", words=[word], emotion=emotion, text_sentiment=self.SENTIMENT
        )

    async def transcribe_words(self, audio, key):
        self.priorities.append(("transcribe", Priority.PARTIAL))
        await asyncio.sleep(0)
        if self.shed:
            raise QueueFull("shed for higher-priority work")
        return self.WORDS[: max(1, len(audio) // int(0.4 * SR))]

    def asr_idle(self):
        return self.idle


class SimClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


async def make_session(
    tmp_path, backend, channels=1, sample_rate=SR, start_cls=StartMessage, start=None, **overrides
):
    settings = Settings(**{"stream_partial_every_s": 0.5, **overrides})
    store = SQLiteStore(tmp_path / "s.db")
    sent: list = []

    async def emit(msg):
        sent.append(msg)

    clock = SimClock()
    start = start_cls(type="start", sample_rate=sample_rate, channels=channels, **(start or {}))
    session = StreamSession(
        session_id="sess-1",
        start=start,
        settings=settings,
        backend=backend,
        store=store,
        emit=emit,
        models=["fake"],
        clock=clock,
    )
    await session.open()
    return session, store, sent, clock


async def feed_realtime(session, clock, chunks, frame_s=0.02):
    """Real-time pace on the simulated clock, with an infinitely fast server: every final due is
    out before the clock moves on, so latencies measure detection delay only."""
    for chunk in chunks:
        clock.now += frame_s
        await session.feed(chunk, clock.now)
        await asyncio.sleep(0)  # let analysis tasks run, as they would between socket reads
        for _ in range(1000):
            if session.backlog_s == 0:
                break
            await asyncio.sleep(0.001)


def test_session_mono_partials_then_finals_stored_once(tmp_path, two_utt):
    async def body():
        backend = FakeBackend()
        session, store, sent, clock = await make_session(tmp_path, backend)
        await feed_realtime(session, clock, frames(two_utt))
        stats = await session.finish("stop")
        finals = [m for m in sent if isinstance(m, FinalMessage)]
        assert [f.seq for f in finals] == [1, 2] and [f.channel for f in finals] == [0, 0]
        assert all(f.reason == "end_of_speech" for f in finals)
        assert stats.finals == stats.stored == stats.utterances == 2
        # Every utterance got partials before its final, and none after it.
        for f in finals:
            idx = sent.index(f)
            partials = [m for m in sent if isinstance(m, PartialMessage) and m.utterance == f.utterance]
            assert partials and all(sent.index(p) < idx for p in partials)
            confirmed = [p.confirmed for p in partials]
            for a, b in zip(confirmed, confirmed[1:], strict=False):
                assert b.startswith(a)
        # Latency from the frame holding the speech end: end silence (500 ms) + frame granularity (sim time).
        for f in finals:
            assert 450 <= f.latency_ms <= 600
        # A speculative analysis was used: exactly one analysis per utterance.
        assert len(backend.analyzed) == 2
        stored = await store.results("sess-1")
        assert [r["seq"] for r in stored] == [1, 2]
        assert [r["start"] for r in stored] == [f.start for f in finals]
        view = await store.get_session("sess-1")
        assert view["state"] == "ended" and view["emotion"]["counts"] == {"neutral": 2}
        await store.close()

    asyncio.run(body())


def test_session_stereo_channels_are_independent(tmp_path, two_utt):
    async def body():
        backend = FakeBackend()
        session, store, sent, clock = await make_session(tmp_path, backend, channels=2, sample_rate=8000)
        first, second = two_utt[: int(4.1 * SR)], two_utt[int(4.1 * SR) :]
        n = max(len(first), len(second)) + SR
        left, right = np.zeros(n, np.float32), np.zeros(n, np.float32)
        left[: len(first)] = first
        right[SR : SR + len(second)] = second  # the customer answers on the right channel
        from app.analysis.audio import resample

        stereo = resample(np.stack([left, right], axis=1), SR, 8000)  # exercise resampling too
        await feed_realtime(session, clock, frames(stereo, rate=8000))
        await session.finish("stop")
        finals = [m for m in sent if isinstance(m, FinalMessage)]
        assert sorted(f.channel for f in finals) == [0, 1]
        by_channel = {f.channel: f for f in finals}
        assert 0.7 < by_channel[0].start < 1.7 and 2.6 < by_channel[1].start < 3.2
        assert [f.seq for f in finals] == [1, 2]
        view = await store.get_session("sess-1")
        assert view["channels"] == [0, 1]
        await store.close()

    asyncio.run(body())


def test_finals_have_shape_v2_words_only_when_asked(tmp_path, two_utt):
    async def body(start_fields: dict, db: str):
        backend = FakeBackend()
        session, store, sent, clock = await make_session(
            tmp_path / db, backend, channels=2, start=start_fields
        )
        stereo = np.stack([two_utt, np.zeros_like(two_utt)], axis=1)  # speech on the left only
        stereo[: len(two_utt) // 2, 1] = two_utt[: len(two_utt) // 2]  # and the first utterance right
        await feed_realtime(session, clock, frames(stereo))
        await session.finish("stop")
        finals = [m for m in sent if isinstance(m, FinalMessage)]
        stored = await store.results("sess-1")
        await store.close()
        return finals, stored

    for db, fields in (("plain", {}), ("asked", {"roles": ["agent", "customer"], "words": True})):
        (tmp_path / db).mkdir()
        finals, stored = asyncio.run(body(fields, db))
        assert sorted(f.channel for f in finals) == [0, 0, 1]
        for f, r in zip(finals, stored, strict=True):
            role = ("agent", "customer")[f.channel] if fields else None
            assert f.role == r["role"] == role
            assert f.text_sentiment == FakeBackend.SENTIMENT and r["text_sentiment"]["label"] == "negative"
            assert r["words"] and r["words"][0]["confidence"] == 0.9  # the store keeps the words
            wire = f.model_dump(mode="json")
            assert ("words" in wire) == bool(fields) and wire["emotion"]["ranking"][0]["label"] == "neutral"


def test_start_roles_are_validated():
    from pydantic import ValidationError

    with pytest.raises(ValidationError):
        StartMessage(type="start", channels=1, roles=["agent", "customer"])  # more roles than channels
    with pytest.raises(ValidationError):
        StartMessage(type="start", channels=2, roles=["agent", "not a name!"])
    with pytest.raises(ValidationError):
        StartMessage(type="start", channels=2, roles=["x" * 33])
    assert StartMessage(type="start", channels=2, roles=["agent"]).roles == ["agent"]  # fewer is fine
    assert StartMessage(type="start").words is False


def test_session_backpressure_pauses_reading_and_drops_nothing(tmp_path, two_utt):
    async def body():
        backend = FakeBackend()
        backend.gate = asyncio.Event()  # analyses block until released: the server "falls behind"
        session, store, sent, clock = await make_session(tmp_path, backend, stream_max_backlog_s=4.0)
        audio = np.concatenate([two_utt] * 3)  # 6 utterances, ~2.4 s of audio each
        chunks = frames(audio)
        fed, paused_at = 0, None
        for chunk in chunks:
            waiter = asyncio.ensure_future(session.wait_capacity())
            await asyncio.sleep(0)
            if not waiter.done():
                paused_at = fed
                assert session.backlog_s > 4.0
                backend.gate.set()  # the server catches up
                await asyncio.wait_for(waiter, 5)
            clock.now += 0.001  # 20 ms of audio per 1 ms: far faster than real time
            await session.feed(chunk, clock.now)
            fed += 1
        assert paused_at is not None and paused_at < len(chunks)
        stats = await session.finish("stop")
        codes = [m.code for m in sent if isinstance(m, WarningMessage)]
        assert "client_too_fast" in codes and "backpressure" in codes and "falling_behind" in codes
        finals = [m for m in sent if isinstance(m, FinalMessage)]
        assert len(finals) == 6 and [f.seq for f in finals] == list(range(1, 7))
        assert stats.max_backlog_s > 4.0 and session.backlog_s == 0.0
        assert len(await store.results("sess-1")) == 6
        await store.close()

    asyncio.run(body())


def test_session_partials_thinned_when_asr_busy(tmp_path, two_utt):
    async def body():
        backend = FakeBackend()
        backend.idle = False  # finals wait in the ASR lane: no speculation
        backend.shed = True  # and the lane sheds partial passes
        session, store, sent, clock = await make_session(tmp_path, backend)
        await feed_realtime(session, clock, frames(two_utt))
        stats = await session.finish("stop")
        assert not [m for m in sent if isinstance(m, PartialMessage)]
        assert stats.partials_skipped > 0 and stats.partials_sent == 0
        assert [m.seq for m in sent if isinstance(m, FinalMessage)] == [1, 2]  # finals never skipped
        await store.close()

    asyncio.run(body())


def test_session_disconnect_mid_utterance_keeps_received_audio(tmp_path, two_utt):
    async def body():
        backend = FakeBackend()
        session, store, sent, clock = await make_session(tmp_path, backend)
        cut = int(6.8 * SR)  # inside the second sentence
        await feed_realtime(session, clock, frames(two_utt[:cut]))
        session.mark_client_gone()
        stats = await session.finish("disconnect")
        assert stats.stored == 2
        stored = await store.results("sess-1")
        assert [r["reason"] for r in stored] == ["end_of_speech", "disconnect"]
        assert stored[1]["end"] == pytest.approx(cut / SR, abs=1e-3)
        assert (await store.get_session("sess-1"))["state"] == "ended"
        await store.close()

    asyncio.run(body())


def test_session_interim_emotions_within_long_utterances(tmp_path, two_utt):
    async def body():
        backend = FakeBackend()
        session, store, sent, clock = await make_session(
            tmp_path, backend, stream_interim_every_s=0.5, stream_partial_every_s=0
        )
        await feed_realtime(session, clock, frames(two_utt))
        await session.finish("stop")
        interims = [m for m in sent if isinstance(m, InterimMessage)]
        finals = [m for m in sent if isinstance(m, FinalMessage)]
        assert {i.utterance for i in interims} == {0, 1}
        for i in interims:  # each before the final of its utterance, covering a growing prefix
            final = next(f for f in finals if f.utterance == i.utterance)
            assert sent.index(i) < sent.index(final) and i.start == final.start and i.end < final.end
            assert i.emotion is not None
        assert not [m for m in sent if isinstance(m, PartialMessage)]
        await store.close()

    asyncio.run(body())


def test_finals_run_at_final_priority_and_low_passes_at_partial(tmp_path, two_utt):
    """Finals (speculative ones included) go to the ASR lane as FINAL; partials and interims as
    PARTIAL, which the lane may shed: the session counts a shed partial as skipped, never retries."""

    async def body():
        backend = FakeBackend()
        session, store, sent, clock = await make_session(tmp_path, backend, stream_interim_every_s=0.3)
        await feed_realtime(session, clock, frames(two_utt))
        backend.shed = True
        await feed_realtime(session, clock, frames(two_utt))
        stats = await session.finish("stop")
        kinds = {(kind, p) for kind, p in backend.priorities}
        assert kinds == {
            ("analyze", Priority.FINAL),
            ("analyze", Priority.PARTIAL),
            ("transcribe", Priority.PARTIAL),
        }
        assert stats.partials_sent > 0 and stats.partials_skipped > 0
        assert stats.finals == stats.stored == 4 and len(backend.analyzed) == 4
        await store.close()

    asyncio.run(body())


def test_feed_runs_the_ingest_step_off_the_event_loop(tmp_path, two_utt):
    """Decoding, resampling and VAD run in the ingest pool, not on the loop's thread."""
    import threading

    async def body():
        backend = FakeBackend()
        session, store, sent, clock = await make_session(tmp_path, backend)
        loop_thread, seen = threading.get_ident(), set()
        original = session.segmenters[0].feed

        def feed(audio):
            seen.add(threading.get_ident())
            return original(audio)

        session.segmenters[0].feed = feed
        await feed_realtime(session, clock, frames(two_utt[: SR * 4]))
        await session.finish("stop")
        assert seen and loop_thread not in seen
        assert [m.seq for m in sent if isinstance(m, FinalMessage)] == [1]
        await store.close()

    asyncio.run(body())


def test_a_stream_that_lost_its_lease_stores_no_more_finals(tmp_path, two_utt):
    """After another stream took the session's lease over, this one's finals are neither stored nor
    sent, it is told once (``on_lease_lost``), and it does not end the successor's session."""
    from app.store.lease import LocalLeases, SessionLease

    async def body():
        leases = LocalLeases()
        lease = SessionLease(leases, "sess-1", "this-host:1:a", ttl_s=30.0)
        assert (await lease.acquire()).acquired
        lost: list[bool] = []
        settings = Settings(stream_partial_every_s=0.5)
        store = SQLiteStore(tmp_path / "s.db")
        sent: list = []

        async def emit(msg):
            sent.append(msg)

        clock = SimClock()
        session = StreamSession(
            session_id="sess-1",
            start=StartMessage(type="start", sample_rate=SR),
            settings=settings,
            backend=FakeBackend(),
            store=store,
            emit=emit,
            models=["fake"],
            clock=clock,
            lease=lease,
            on_lease_lost=lambda: lost.append(True),
        )
        await session.open()
        chunks = frames(two_utt)
        await feed_realtime(session, clock, chunks[: len(chunks) // 2])  # the first utterance
        assert [m.seq for m in sent if isinstance(m, FinalMessage)] == [1]
        leases._held["sess-1"] = ("other-host:2:b", time.monotonic() + 30.0)  # taken over
        await feed_realtime(session, clock, chunks[len(chunks) // 2 :])  # the second utterance
        await session.finish("stop")
        assert [m.seq for m in sent if isinstance(m, FinalMessage)] == [1]
        assert lost == [True]
        view = await store.get_session("sess-1")
        assert view["result_count"] == 1 and view["state"] == "active"  # left to its successor
        await store.close()

    asyncio.run(body())
