"""The API's version and description in the OpenAPI document (``/docs``, ``/openapi.json``).

``VERSION`` is the version of the HTTP/WebSocket API (2.0.0: result shape v2), not of the
package. The description lists what changed from 1.x, for clients upgrading.

Thread-safety: constants.
"""

from __future__ import annotations

VERSION = "2.0.0"
DESCRIPTION = """Transcript, voice emotion (neutral, happy, sad, angry; four published multimodal models and
their weighted ensemble) and text sentiment of speech. Errors are JSON `{error, detail}` (on the
OpenAI-compatible route, OpenAI's `{error: {message, type, param, code}}`).

## Changes in 2.0 (result shape v2)

- `emotion` gains `score` (the probability of `label`) and `ranking` (every class with its
  probability, most probable first); each `per_model` entry gains `score`.
- `per_model` no longer has an `ensemble` entry: the ensemble is the top level (`label`, `score`,
  `ranking`, `probabilities`). `models=...,ensemble` is still accepted and adds nothing;
  `models=ensemble` alone means every model.
- The top-level `words` list of `/v1/predict` is gone; with `words=true` each segment carries its
  own `words`. Without `words=true` a segment has no `words` key (1.x sent an empty list).
- New: `role` per segment from `roles=agent,customer` (index = channel, with `channels=separate`);
  `text_sentiment` (VADER: label, compound, pos, neu, neg) per segment and for the whole transcript,
  beside the voice emotion. Stored session results and streaming `final` messages have the same
  shape (a `final` carries `words` only when its stream asked for them).
- `/predict` stays an alias of `/v1/predict` and answers in the 2.0 shape too.
- New: `POST /v1/audio/transcriptions`, OpenAI-compatible, with `emotion` in `verbose_json` segments.
"""
