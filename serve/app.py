"""The FastAPI application of ``crossmetric serve``: routes, error handlers and the ASGI layers around them.

Routes (Text Embeddings Inference's shapes where it has the route):

- ``POST /embed``: images (JSON ``{"inputs": base64 | data-URI | [...]}`` or multipart ``images``) -> ``[[float]]``;
- ``POST /search?k=``: the same inputs (``k`` also as a JSON field) -> per query ``[{"id", "label", "score", "path"}]``;
  ``filter`` (a JSON field ``{"label": ["a", "b"]}``, or ``COLUMN=VALUE[,VALUE...]`` as form fields, query parameters
  or JSON strings, each repeatable: OR within one, AND across) keeps only the items it allows, inside the index's
  search (``k`` results whenever ``k`` items pass); a bad filter is a 422 before any image is embedded;
  with ``--rerank_top_k K`` the first ``K`` are re-ranked and each hit also has ``"cosine"``, ``"head_score"`` and
  ``"reranked"`` (:mod:`.search_service`);
- ``GET /info``, ``GET /health`` (200 once loaded and warmed up, 503 before), ``GET /metrics`` (Prometheus);
- ``GET /``: the search page; ``GET /thumbnail?id=``: a gallery thumbnail; ``GET /docs``: the OpenAPI docs (Swagger UI
  served from local files, no CDN).

Every error is TEI's ``{"error", "error_type"}`` body (:mod:`.errors`).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator
from importlib import resources
from typing import Any

import numpy as np
import orjson
from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi_offline import FastAPIOffline
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import HTMLResponse, Response

from .errors import ServeError, error_response, status_error_type
from .inputs import read_request
from .middleware import ApiKeyMiddleware, MetricsMiddleware, PayloadLimitMiddleware
from .runtime import Runtime
from .search_service import check_k, request_filter
from .settings import ServeSettings

logger = logging.getLogger(__name__)
DEFAULT_K = 10
FILTER_QUERY = Query(default=None, description="COLUMN=VALUE[,VALUE...] (a comma in a value as \\,), repeatable: AND")


class ErrorBody(BaseModel):
    """Text Embeddings Inference's error body."""

    error: str = Field(examples=['images[0] ("a.jpg") could not be decoded: not an image Pillow can identify.'])
    error_type: str = Field(examples=["image"])


class EmbedRequest(BaseModel):
    """The JSON form of a request: base64 images (or data URIs), one or a list."""

    inputs: str | list[str] = Field(examples=["iVBORw0KGgoAAAANSUhEUgAA..."])


class SearchRequest(EmbedRequest):
    k: int | None = Field(default=None, ge=1, description="neighbours per query (default 10, or ?k=)")
    filter: dict[str, list[str | int | float | bool] | str | int | float | bool] | list[str] | str | None = Field(
        default=None,
        description='keep items whose column holds one of the values: {"label": ["a", "b"], "color": "red"} (OR '
        'within a column, AND across), or "label=a,b" strings (a comma inside a value as \\,), as --filter',
        examples=[{"label": ["cat", "dog"]}],
    )


class Hit(BaseModel):
    """One search result; the last three fields only when the server re-ranks (``--rerank_top_k``)."""

    id: str
    label: str | None
    score: float = Field(description="cosine similarity, or the re-ranker's fused score for a re-ranked hit")
    path: str | None
    cosine: float | None = Field(default=None, description="the embedding's cosine similarity (re-ranking only)")
    head_score: float | None = Field(default=None, description="the re-ranker head's similarity (None past K)")
    reranked: bool | None = Field(default=None, description="whether the re-ranker re-scored this hit")


def _body(model: type[BaseModel]) -> dict[str, Any]:
    """OpenAPI request body of a route that takes JSON or a multipart upload (parsed by the route itself)."""
    return {
        "requestBody": {
            "required": True,
            "content": {
                "application/json": {"schema": model.model_json_schema()},
                "multipart/form-data": {
                    "schema": {
                        "type": "object",
                        "properties": {"images": {"type": "array", "items": {"type": "string", "format": "binary"}}},
                        "required": ["images"],
                    }
                },
            },
        }
    }


ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorBody, "description": what}
    for code, what in {
        400: "no image in the request",
        401: "missing or wrong API key",
        413: "too many images or too large a body",
        422: "an input that does not decode (named), or a malformed request",
        424: "the model failed, or /search without an index",
        429: "--max_concurrent_requests are already being served",
        503: "still loading",
    }.items()
}


def json_response(payload: Any) -> Response:
    """JSON by orjson, numpy arrays included, without FastAPI's per-item encoder: with the standard library's encoder,
    writing the embeddings took a sixth of the event loop's time per ``/embed`` request under load."""
    return Response(orjson.dumps(payload, option=orjson.OPT_SERIALIZE_NUMPY), media_type="application/json")


def create_app(settings: ServeSettings, runtime: Runtime | None = None) -> Any:
    """The ASGI application serving ``settings`` (``runtime``: the state, made here unless given)."""
    runtime = runtime or Runtime(settings)

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        await runtime.startup()
        yield
        await runtime.shutdown()

    # the OpenAPI docs' Swagger UI from files fastapi-offline installs, not from a CDN: a server without internet
    # access (or a browser without) still shows its /docs
    app = FastAPIOffline(
        redoc_url=None,
        title="crossmetric serve",
        summary="Image embeddings and nearest-neighbour search with a crossmetric model.",
        version="1",
        lifespan=lifespan,
    )
    app.state.runtime = runtime

    @app.exception_handler(ServeError)
    async def serve_error(_: Request, error: ServeError) -> Response:
        return error_response(error.error_type, error.message)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, error: StarletteHTTPException) -> Response:
        return error_response(status_error_type(error.status_code), str(error.detail))

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, error: RequestValidationError) -> Response:
        first = error.errors()[0] if error.errors() else {}
        where = ".".join(str(part) for part in first.get("loc", ()))
        return error_response("invalid_input", f"{where}: {first.get('msg', 'invalid value')}.")

    @app.exception_handler(Exception)
    async def unexpected(_: Request, error: Exception) -> Response:
        logger.exception("Unexpected error")
        return error_response("internal", "internal error (logged by the server).")

    @app.post("/embed", openapi_extra=_body(EmbedRequest), responses=ERRORS, response_model=list[list[float]])
    async def embed(request: Request) -> Response:
        """Embed images: one L2-normalised embedding per input, in input order."""
        runtime.require_ready()
        with runtime.permits.hold():
            parsed = await read_request(request, settings.max_client_batch_size, False, runtime.run_off_loop)
            embeddings = await runtime.embed(parsed.images)
        return json_response(np.ascontiguousarray(embeddings, dtype=np.float32))

    @app.post("/search", openapi_extra=_body(SearchRequest), responses=ERRORS, response_model=list[list[Hit]])
    async def search_route(
        request: Request,
        k: str | None = Query(default=None, description="neighbours"),
        filter: list[str] | None = FILTER_QUERY,
    ) -> Response:
        """The ``k`` nearest gallery entries of each query image, best first (cosine similarity; with
        ``--rerank_top_k K``, the first ``K`` re-ranked by the model's re-ranker)."""
        runtime.require_ready()
        with runtime.permits.hold():
            parsed = await read_request(request, settings.max_client_batch_size, True, runtime.run_off_loop)
            count = check_k(parsed.k if parsed.k is not None else (k if k is not None else DEFAULT_K))
            wanted = request_filter(parsed.filter if parsed.filter is not None else filter)
            results = await runtime.search_images(parsed.images, count, wanted)
        return json_response(results)

    @app.get("/info")
    async def info() -> Response:
        """The model, backend, embedding size, index kind and size, re-ranking, and the limits."""
        return json_response(runtime.info())

    @app.get("/health", responses={503: {"model": ErrorBody, "description": "still loading"}})
    async def health() -> Response:
        """200 once the model and index are loaded and a warm-up batch has run; 503 before."""
        runtime.require_ready()
        return Response(status_code=200)

    @app.get("/metrics")
    async def metrics() -> Response:
        """Prometheus metrics: requests by route and status, latency, queue time, batch size, index size."""
        return Response(runtime.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/thumbnail", responses={404: {"model": ErrorBody, "description": "no such entry or file"}})
    async def thumbnail(entry_id: str = Query(alias="id", max_length=4096)) -> Response:
        """A small JPEG of a gallery entry, read from the file its index entry recorded at build time."""
        runtime.require_ready()
        assert runtime.thumbnails is not None
        data = await runtime.run_off_loop(runtime.thumbnails.get, runtime.index, entry_id)
        return Response(data, media_type="image/jpeg", headers={"Cache-Control": "private, max-age=60"})

    page = resources.files(__package__).joinpath("static/search_page.html").read_text(encoding="utf-8")

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def search_page() -> HTMLResponse:
        return HTMLResponse(page)

    wrapped: Any = PayloadLimitMiddleware(app, settings.payload_limit)
    if settings.api_key is not None:
        wrapped = ApiKeyMiddleware(wrapped, settings.api_key)
    return MetricsMiddleware(wrapped, runtime.metrics)
