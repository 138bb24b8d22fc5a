"""The error body and status codes of the server, as Text Embeddings Inference answers them.

Every error is ``{"error": "<one sentence>", "error_type": "<kind>"}`` with the status of its kind. Where Text
Embeddings Inference has the kind, the status is its own (``unhealthy`` 503, ``backend`` 424, ``overloaded`` 429,
``validation`` 413, ``empty`` 400); the image server adds ``image`` (422: an input that does not decode, TEI's
``tokenizer`` for text), ``invalid_input`` (422: a body or parameter of the wrong shape), ``unauthorized`` (401),
``not_found`` (404) and ``method_not_allowed`` (405).

A client can cause only 4xx: routes raise :class:`ServeError` for what they refuse, and anything else that escapes is
logged and answered 500 without details (the message never echoes headers, so never the API key).
"""

from __future__ import annotations

import json
import logging

from starlette.responses import Response

logger = logging.getLogger(__name__)

STATUS = {
    "empty": 400,
    "unauthorized": 401,
    "not_found": 404,
    "method_not_allowed": 405,
    "validation": 413,
    "unsupported_media_type": 415,
    "invalid_input": 422,
    "image": 422,
    "backend": 424,
    "overloaded": 429,
    "internal": 500,
    "unhealthy": 503,
}


class ServeError(Exception):
    """A refusal with its TEI ``error_type`` (the status follows from :data:`STATUS`) and a one-line message."""

    def __init__(self, error_type: str, message: str) -> None:
        if error_type not in STATUS:
            raise ValueError(f"unknown error_type {error_type!r}; one of {sorted(STATUS)}.")
        super().__init__(message)
        self.error_type = error_type
        self.message = message

    @property
    def status(self) -> int:
        return STATUS[self.error_type]


def error_response(error_type: str, message: str, headers: dict[str, str] | None = None) -> Response:
    """The TEI error body ``{"error", "error_type"}`` with the status of ``error_type``."""
    body = json.dumps({"error": message, "error_type": error_type}, ensure_ascii=False)
    return Response(body, status_code=STATUS[error_type], media_type="application/json", headers=headers)


def status_error_type(status: int) -> str:
    """The error type of a status raised by the framework itself (unknown route, wrong method, bad form)."""
    return {404: "not_found", 405: "method_not_allowed", 413: "validation", 415: "unsupported_media_type"}.get(
        status, "invalid_input" if 400 <= status < 500 else "internal"
    )
