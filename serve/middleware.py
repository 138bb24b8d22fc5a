"""ASGI layers around the routes: request metrics, the API key, and the payload limit.

Plain ASGI (no ``BaseHTTPMiddleware``) so that a streamed body is counted as it arrives and nothing is buffered:

- :class:`MetricsMiddleware` (outermost) times every answer and counts it by route and status, refusals included;
- :class:`ApiKeyMiddleware` answers 401 unless ``Authorization: Bearer <key>`` matches (constant-time compare), on
  every route but ``/health``; the key is never logged or echoed;
- :class:`PayloadLimitMiddleware` answers 413 when ``Content-Length`` exceeds the limit, and stops a body without one
  (chunked) as soon as it passes the limit.
"""

from __future__ import annotations

import hmac
import time
from typing import Any

from .errors import ServeError, error_response
from .metrics import ServerMetrics

Scope = dict[str, Any]
OPEN_PATHS = frozenset({"/health"})


class MetricsMiddleware:
    """Record each HTTP answer's status and latency in :class:`ServerMetrics`."""

    def __init__(self, app: Any, metrics: ServerMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500

        async def record_status(message: dict[str, Any]) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        self.metrics.in_flight.inc()
        try:
            await self.app(scope, receive, record_status)
        finally:
            self.metrics.in_flight.dec()
            self.metrics.observe_request(scope.get("path", ""), status, time.perf_counter() - started)


class ApiKeyMiddleware:
    """401 for any route but ``/health`` without ``Authorization: Bearer <key>``."""

    def __init__(self, app: Any, api_key: str) -> None:
        self.app = app
        self._expected = f"Bearer {api_key}".encode()

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope.get("path") not in OPEN_PATHS:
            given = next((v for k, v in scope.get("headers", []) if k == b"authorization"), b"")
            if not hmac.compare_digest(given, self._expected):
                response = error_response(
                    "unauthorized",
                    "missing or wrong API key: send the header 'Authorization: Bearer <key>'.",
                    headers={"WWW-Authenticate": "Bearer"},
                )
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


class PayloadTooLarge(ServeError):
    """A request body over ``--payload_limit`` bytes (raised from ``receive`` while the route reads the body)."""

    def __init__(self, limit: int) -> None:
        super().__init__("validation", f"the request body is larger than the limit of {limit} bytes (--payload_limit).")


class PayloadLimitMiddleware:
    """413 for a body over ``limit`` bytes: at once from ``Content-Length``, else while it streams in."""

    def __init__(self, app: Any, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = next((v for k, v in scope.get("headers", []) if k == b"content-length"), None)
        if declared is not None:
            try:
                too_large = int(declared) > self.limit
            except ValueError:
                too_large = False  # the HTTP server itself rejects a malformed Content-Length
            if too_large:
                error = PayloadTooLarge(self.limit)
                await error_response(error.error_type, error.message)(scope, receive, send)
                return
        seen = 0

        async def counted_receive() -> dict[str, Any]:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise PayloadTooLarge(self.limit)
            return message

        await self.app(scope, counted_receive, send)
