"""Webhook targets: the configured receivers (``EMOTION_WEBHOOKS``), named, never given by a caller.

``EMOTION_WEBHOOKS`` is a JSON object ``{"name": {"url": ..., "secret": ..., "events": [...],
"tenants": [...]}}``. A request names a target (``POST /v1/jobs?webhook=name``); the URL and the
secret come only from here, so an API caller cannot make the server post to an address of its
choosing (no SSRF through webhooks). ``tenants`` (optional) restricts which API-key tenants may name
the target; an admin may name any. The secret is a ``SecretStr``: ``emotion-server config`` and
logs show it masked.

Thread-safety: immutable pydantic models; the helpers are pure.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator

Event = Literal["job.done", "job.failed", "session.ended"]
EVENTS: tuple[Event, ...] = ("job.done", "job.failed", "session.ended")
JOB_EVENTS: tuple[Event, ...] = ("job.done", "job.failed")
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"


class WebhookTarget(BaseModel):
    """One receiver: where to POST, the shared secret that signs each body, which events it takes."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    url: str = Field(description="http(s) URL the events are POSTed to")
    secret: SecretStr = Field(description="HMAC-SHA256 key of the X-Emotion-Signature header")
    events: list[Event] = Field(default_factory=lambda: list(EVENTS), description="events it receives")
    tenants: list[str] | None = Field(
        None, description="API-key tenants that may name it (null = every caller)"
    )

    @field_validator("url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        value = value.strip()
        if not value.lower().startswith(("http://", "https://")) or len(value) < 10:
            raise ValueError("a webhook url must be an absolute http:// or https:// URL")
        return value

    @field_validator("secret")
    @classmethod
    def _non_empty(cls, value: SecretStr) -> SecretStr:
        if len(value.get_secret_value()) < 16:
            raise ValueError("a webhook secret needs at least 16 characters")
        return value

    def takes(self, event: str) -> bool:
        return event in self.events

    def allows(self, tenant: str | None, admin: bool) -> bool:
        """May a caller of ``tenant`` (or an admin) have events sent here?"""
        return admin or self.tenants is None or (tenant is not None and tenant in self.tenants)


def check_names(targets: Mapping[str, WebhookTarget]) -> Mapping[str, WebhookTarget]:
    import re

    bad = [n for n in targets if not re.fullmatch(NAME_PATTERN, n)]
    if bad:
        raise ValueError(f"webhook names must match {NAME_PATTERN}: {', '.join(map(repr, bad))}")
    return targets
