"""Audio plumbing of a stream: raw frames -> per-channel 16-kHz float32, and arrival times.

* ``PcmDecoder`` turns binary frames (interleaved ``pcm_s16le`` or ``f32le``) into (n, channels)
  float32. A frame need not hold whole sample frames: leftover bytes wait for the next frame.
* ``ChannelResampler`` resamples each channel to 16 kHz with soxr's *streaming* resampler (the
  same soxr HQ filter as ``app.analysis.audio.resample``, which handles whole clips). Resampling each 20-ms
  frame separately with the one-shot function would zero-pad both edges of every frame and put a
  click every 20 ms into the audio; the streaming resampler carries its filter state over.
* ``ArrivalClock`` remembers when the frame holding each audio position arrived, so a final's
  latency can be measured from the frame in which its speech ended.

Thread-safety: one instance of each per stream, used by that stream's task only.
"""

from __future__ import annotations

import bisect
from collections import deque

import numpy as np

from app.analysis.audio import SAMPLE_RATE
from app.streaming.protocol import ENCODINGS


class InvalidAudioFrame(ValueError):
    """The frame's content is not valid audio for the announced encoding (close code 1007)."""


class PcmDecoder:
    def __init__(self, encoding: str, channels: int):
        if encoding not in ENCODINGS:
            raise ValueError(f"unsupported encoding {encoding!r}")
        self.encoding = encoding
        self.channels = channels
        self.sample_bytes = ENCODINGS[encoding]
        self.frame_bytes = self.sample_bytes * channels  # one sample of every channel
        self._rest = b""

    def decode(self, data: bytes) -> np.ndarray:
        """(n, channels) float32 in [-1, 1] (f32le is passed through, but must be finite)."""
        buf = self._rest + bytes(data)
        usable = len(buf) - len(buf) % self.frame_bytes
        self._rest = buf[usable:]
        if usable == 0:
            return np.zeros((0, self.channels), dtype=np.float32)
        if self.encoding == "pcm_s16le":
            x = np.frombuffer(buf[:usable], dtype="<i2").astype(np.float32) / 32768.0
        else:
            x = np.frombuffer(buf[:usable], dtype="<f4").astype(np.float32)
            if not np.isfinite(x).all():
                raise InvalidAudioFrame("f32le audio contains NaN or infinite samples")
        return x.reshape(-1, self.channels)

    @property
    def pending_bytes(self) -> int:
        return len(self._rest)


class ChannelResampler:
    """Stateful resampler of one channel to 16 kHz (identity at 16 kHz)."""

    def __init__(self, rate_in: int):
        self.rate_in = rate_in
        self._stream = None
        if rate_in != SAMPLE_RATE:
            import soxr

            self._stream = soxr.ResampleStream(rate_in, SAMPLE_RATE, 1, dtype="float32", quality="HQ")

    def __call__(self, x: np.ndarray, last: bool = False) -> np.ndarray:
        if self._stream is None:
            return np.ascontiguousarray(x, dtype=np.float32)
        return self._stream.resample_chunk(np.ascontiguousarray(x, dtype=np.float32), last=last)


class ArrivalClock:
    """Maps a 16-kHz audio position to the arrival time of the frame that carried it.

    Positions are per channel (every channel of a frame shares its arrival time). Only the last
    ``keep`` frames are remembered: latencies are measured for recent audio only.
    """

    def __init__(self, rate_in: int, keep: int = 20000):
        self.rate_in = rate_in
        self._ends: deque[int] = deque(maxlen=keep)  # 16-kHz position just after each frame
        self._times: deque[float] = deque(maxlen=keep)
        self._samples_in = 0

    def add(self, n_samples_in: int, arrival: float) -> None:
        self._samples_in += n_samples_in
        self._ends.append(int(round(self._samples_in * SAMPLE_RATE / self.rate_in)))
        self._times.append(arrival)

    def arrival_of(self, position16k: int) -> float | None:
        """Arrival time of the first frame whose audio reaches past ``position16k``."""
        if not self._ends:
            return None
        i = bisect.bisect_left(self._ends, position16k)
        return self._times[min(i, len(self._times) - 1)]

    @property
    def received_s(self) -> float:
        return self._samples_in / self.rate_in
