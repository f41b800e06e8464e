"""``GET /metrics`` (Prometheus text format, open) and the HTTP metrics middleware.

The middleware labels requests by route *template* (``/v1/predict``, never a raw path with ids),
and unmatched paths as ``unmatched``, so label cardinality stays bounded.
Thread-safety: stateless; prometheus_client metrics are thread-safe.
"""

from __future__ import annotations

import time

from fastapi import APIRouter
from fastapi.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app import metrics

router = APIRouter(tags=["metrics"])


@router.get("/metrics", summary="Prometheus metrics", response_class=Response)
async def get_metrics() -> Response:
    body, content_type = metrics.exposition()
    return Response(body, media_type=content_type)


class MetricsMiddleware:
    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500
        start = time.perf_counter()

        async def tracking_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        metrics.REQUESTS_IN_FLIGHT.inc()
        try:
            await self.app(scope, receive, tracking_send)
        finally:
            metrics.REQUESTS_IN_FLIGHT.dec()
            route = scope.get("route")
            label = getattr(route, "path", None) or "unmatched"
            method = scope.get("method", "")
            metrics.HTTP_REQUESTS.labels(route=label, method=method, status=str(status)).inc()
            metrics.HTTP_LATENCY.labels(route=label, method=method, status=str(status)).observe(
                time.perf_counter() - start
            )
