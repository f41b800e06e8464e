"""Per-session adaptation in streaming (``start.adapt``): which statistics each final gets (fake
backend), the real models' adapted finals, and the refusal when the models ship no population."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import numpy as np
import pytest

from app.analysis.adaptation import PopulationStats, shift_for

D = 6


def population(tau: float = 3.0, seed: int = 0) -> PopulationStats:
    rng = np.random.default_rng(seed)
    return PopulationStats.from_means(rng.normal(size=(20, D)), tau=tau, asr_model="tiny.en")


# --- the streaming session: which statistics each final gets ------------------------------------


async def open_session(tmp_path, backend, population_stats=None, **start):
    from app.settings import Settings
    from app.store.sqlite import SQLiteStore
    from app.streaming.protocol import StartMessage
    from app.streaming.session import StreamSession
    from tests.test_streaming_state import SimClock

    store, sent, clock = SQLiteStore(tmp_path / "s.db"), [], SimClock()

    async def emit(msg):
        sent.append(msg)

    session = StreamSession(
        session_id="sess-1",
        start=StartMessage(type="start", partials=False, **start),
        settings=Settings(),
        backend=backend,
        store=store,
        emit=emit,
        models=["fake"],
        clock=clock,
        population=population_stats,
    )
    await session.open()
    return session, store, sent, clock


def two_utterances() -> np.ndarray:
    import soundfile as sf

    from tests.test_streaming_state import FIXTURES

    audio, _ = sf.read(FIXTURES / "two_utterances.flac", dtype="float32")
    return audio


class ShiftRecordingBackend:
    """Analyses instantly (or when released); records the shift each final got and returns a known
    raw frame mean per utterance (its index times ones), as ``ServiceBackend`` does for real."""

    def __init__(self):
        self.shifts: list[np.ndarray | None] = []
        self.gates: dict[int, asyncio.Event] = {}

    def resolve_models(self, models):
        return ["fake"]

    async def analyze(
        self, audio, models, channel, offset_s, key, count_audio=True, priority=None, encoder_shift=None
    ):
        from app.inference.scheduler import Priority
        from app.schemas import Emotion
        from app.streaming.session import UtteranceOutput

        if priority != Priority.FINAL:
            return UtteranceOutput(text="", words=[], emotion=None)
        index = len(self.shifts)
        self.shifts.append(None if encoder_shift is None else np.array(encoder_shift))
        gate = self.gates.get(index)
        if gate is not None:
            await gate.wait()
        emotion = Emotion(label="neutral", probabilities={"neutral": 1.0})
        mean = None if encoder_shift is None else np.full(D, float(index + 1))
        return UtteranceOutput(text=f"u{index}", words=[], emotion=emotion, frame_mean=mean)

    async def transcribe_words(self, audio, key):
        return []

    def asr_idle(self):
        return False  # no speculation: one analysis per final, in order


def test_session_finals_report_and_use_only_earlier_finals(tmp_path):
    from tests.test_streaming_state import SR, frames

    audio = two_utterances()
    three = np.concatenate([audio, np.zeros(SR, np.float32), audio[: int(2.5 * SR)]])
    pop = population(tau=1.0)

    async def body():
        from app.streaming.protocol import FinalMessage

        backend = ShiftRecordingBackend()
        # the first final's analysis is slow: the second must still wait for its statistics
        backend.gates[0] = asyncio.Event()
        session, store, sent, clock = await open_session(tmp_path, backend, pop, adapt=True)
        for chunk in frames(three):
            clock.now += 0.02
            await session.feed(chunk, clock.now)
            await asyncio.sleep(0)
        for _ in range(50):
            await asyncio.sleep(0.01)
        # every utterance has ended, but the later ones wait for the first one's statistics
        assert len(backend.shifts) == 1
        backend.gates[0].set()
        stats = await session.finish("stop")
        finals = [m for m in sent if isinstance(m, FinalMessage)]
        assert stats.finals >= 3
        with pytest.raises(ValueError):  # adapt without statistics is refused before any audio
            await open_session(tmp_path, backend, None, adapt=True)
        assert [f.adaptation.utterances for f in finals[:3]] == [0, 1, 2]
        assert not backend.shifts[0].any()  # nothing earlier: the identity
        assert np.allclose(backend.shifts[1], shift_for(np.full(D, 1.0), 1, pop.vector, 1.0))
        assert np.allclose(backend.shifts[2], shift_for(np.full(D, 3.0), 2, pop.vector, 1.0))
        stored = await store.results("sess-1")
        assert [r["adaptation"] for r in stored[:3]] == [{"utterances": n} for n in range(3)]
        await store.close()

    asyncio.run(body())


def test_session_without_adapt_passes_no_shift_and_reports_none(tmp_path):
    from tests.test_streaming_state import frames

    audio = two_utterances()

    async def body():
        from app.streaming.protocol import FinalMessage

        backend = ShiftRecordingBackend()
        session, store, sent, clock = await open_session(tmp_path, backend)
        for chunk in frames(audio):
            clock.now += 0.02
            await session.feed(chunk, clock.now)
            await asyncio.sleep(0)
        await session.finish("stop")
        finals = [m for m in sent if isinstance(m, FinalMessage)]
        assert len(finals) == 2 and all(f.adaptation is None for f in finals)
        assert backend.shifts == [None, None]
        assert "adaptation" not in json.loads(finals[0].model_dump_json())
        await store.close()

    asyncio.run(body())


# --- the real models -----------------------------------------------------------------------------

REPO_MODELS = Path(__file__).resolve().parents[1] / "models"
REAL_MODELS = ["cmt-awc", "ca-mser", "adf", "3m-ser"]


async def stream_finals(tmp_path, service, adapt: bool):
    """The finals of one stream of the two-utterance fixture through the real service."""
    from app.streaming.protocol import FinalMessage
    from app.streaming.session import ServiceBackend
    from tests.test_streaming_state import frames

    tmp_path.mkdir()
    population_stats = service.adaptation_population() if adapt else None
    session, store, sent, clock = await open_session(
        tmp_path, ServiceBackend(service), population_stats, adapt=adapt
    )
    session.models = None  # every loaded model
    for chunk in frames(two_utterances()):
        clock.now += 0.02
        await session.feed(chunk, clock.now)
    await session.finish("stop")
    await store.close()
    finals = [m for m in sent if isinstance(m, FinalMessage)]
    assert len(finals) == 2, sent
    return finals


def test_real_models_second_final_is_adapted_after_one_utterance(tmp_path):
    from tests.serving_helpers import make_service

    async def body():
        # the shipped models (all four read Whisper encoder frames) behind the real service; the
        # engine belongs to the loop that starts it, so everything runs on this one
        service = make_service(tmp_path, model_dir=REPO_MODELS, models=REAL_MODELS)
        await service.start()
        try:
            plain = await stream_finals(tmp_path / "plain", service, adapt=False)
            adapted = await stream_finals(tmp_path / "adapted", service, adapt=True)
        finally:
            await service.stop()
        return plain, adapted

    plain, adapted = asyncio.run(body())
    assert [f.text for f in plain] == [f.text for f in adapted]
    assert [f.adaptation for f in plain] == [None, None]
    assert [f.adaptation.utterances for f in adapted] == [0, 1]

    def probs(f):
        return np.array([f.emotion.probabilities[c] for c in sorted(f.emotion.probabilities)])

    # no earlier utterance: exactly the unadapted result; after one: the shifted frames change it
    assert np.allclose(probs(adapted[0]), probs(plain[0]), atol=1e-5)
    assert np.abs(probs(adapted[1]) - probs(plain[1])).max() > 1e-3
    for mid in REAL_MODELS:  # every model reads the shifted frames
        a, b = adapted[1].emotion.per_model[mid], plain[1].emotion.per_model[mid]
        assert a.probabilities != pytest.approx(b.probabilities, abs=1e-5), mid


# --- refusal -------------------------------------------------------------------------------------


def test_population_missing_or_for_another_asr_model_is_refused(tmp_path):
    from app.service import AdaptationUnavailable
    from tests.serving_helpers import make_service

    service = make_service(tmp_path)  # dummy models: no adaptation.json beside them
    with pytest.raises(AdaptationUnavailable, match="adaptation.json"):
        service.adaptation_population()
    population(tau=2.0).save(service.engine.model_dir / "adaptation.json")
    assert make_service(tmp_path).adaptation_population().tau == 2.0
    PopulationStats.from_means(np.zeros((2, D)), asr_model="base").save(
        service.engine.model_dir / "adaptation.json"
    )
    with pytest.raises(AdaptationUnavailable, match="base"):
        make_service(tmp_path).adaptation_population()


def test_client_asks_for_adaptation_only_when_told():
    """``emotion-server stream --adapt`` (and ``stream_audio(adapt=True)``) put it in ``start``."""
    from app.cli import build_parser
    from app.streaming.client import _Progress, _start_message

    x = np.zeros((160, 1), np.float32)
    opts = {k: None for k in ("models", "metadata", "partials", "roles", "words", "adapt")}
    opts["partials"] = True
    assert "adapt" not in _start_message(x, 16000, _Progress(session_id=None), opts)
    assert _start_message(x, 16000, _Progress(session_id=None), {**opts, "adapt": True})["adapt"] is True
    assert build_parser().parse_args(["stream", "f.wav", "--adapt"]).adapt is True
    assert build_parser().parse_args(["stream", "f.wav"]).adapt is False
