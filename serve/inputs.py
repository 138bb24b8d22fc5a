"""Reading the images of an ``/embed`` or ``/search`` request, TEI's JSON shape or a multipart upload.

- JSON: ``{"inputs": "<base64>" | "data:image/...;base64,<...>" | [...], "k": 5}`` (``k`` for ``/search`` only);
- multipart: the files of the repeated field ``images`` (what an HTML form or ``curl -F images=@a.jpg`` sends).

Each image keeps a name for error messages (``inputs[2]``, ``images[0] ("cat.png")``), so a 422 says which input
failed. Requests without images are 400 (``empty``), with more than ``--max_client_batch_size`` images 413
(``validation``), of another shape 422 (``invalid_input``); a URL is refused (the server fetches nothing).
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from dataclasses import dataclass
from typing import Any

from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.requests import Request

from .errors import ServeError

FIELD = "images"
_DATA_URI = re.compile(r"^data:[\w.+-]*/?[\w.+-]*(;[\w=.+-]+)*;base64,", re.IGNORECASE)


@dataclass
class RawImage:
    """The bytes of one input image and its name in the request."""

    name: str
    data: bytes


@dataclass
class ParsedRequest:
    """The request's images, and the ``k`` its JSON body gave (None: not given there)."""

    images: list[RawImage]
    k: Any = None


def display_name(text: str, limit: int = 80) -> str:
    """A client-given name, quoted and shortened for an error message."""
    shown = text if len(text) <= limit else text[: limit - 1] + "…"
    return json.dumps(shown, ensure_ascii=False)


def decode_base64(value: Any, name: str) -> bytes:
    """The bytes of one JSON input (plain base64 or a data URI); ``ServeError`` naming ``name`` otherwise."""
    if not isinstance(value, str):
        raise ServeError("invalid_input", f"{name} must be a base64 string or data URI, got {type(value).__name__}.")
    text = value.strip()
    if text.lower().startswith(("http://", "https://", "file:")):
        raise ServeError("invalid_input", f"{name} is a URL; this server fetches nothing: send the image as base64.")
    match = _DATA_URI.match(text)
    if match:
        text = text[match.end() :]
    elif text.lower().startswith("data:"):
        raise ServeError("invalid_input", f"{name} is a data URI without ';base64,': send base64 image data.")
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as error:
        raise ServeError("image", f"{name} could not be decoded: it is not valid base64 ({error}).") from None


def parse_json_body(body: bytes, with_k: bool) -> ParsedRequest:
    """The images (and ``k``) of a JSON body; runs off the event loop (base64 of a large body takes a while)."""
    try:
        payload = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ServeError("invalid_input", f"the body is not valid JSON: {error}.") from None
    if not isinstance(payload, dict) or "inputs" not in payload:
        raise ServeError(
            "invalid_input", 'the JSON body must be an object with "inputs": a base64 image or a list of them.'
        )
    inputs = payload["inputs"]
    if isinstance(inputs, str):
        images = [RawImage("inputs", decode_base64(inputs, "inputs"))]
    elif isinstance(inputs, list):
        images = [RawImage(f"inputs[{i}]", decode_base64(v, f"inputs[{i}]")) for i, v in enumerate(inputs)]
    else:
        raise ServeError(
            "invalid_input", f'"inputs" must be a string or a list of strings, got {type(inputs).__name__}.'
        )
    return ParsedRequest(images, payload.get("k") if with_k else None)


async def read_request(request: Request, max_images: int, with_k: bool, run_off_loop: Any) -> ParsedRequest:
    """The images of ``request`` (JSON or multipart), checked for count; ``run_off_loop(fn, *args)`` runs parsing
    of a JSON body in a worker thread."""
    content_type = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if content_type == "multipart/form-data":
        parsed = await _read_multipart(request, max_images)
    elif content_type in ("application/json", ""):
        body = await request.body()
        if not body:
            raise ServeError("empty", 'the request has no body: send JSON {"inputs": ...} or multipart images.')
        parsed = await run_off_loop(parse_json_body, body, with_k)
    else:
        raise ServeError(
            "unsupported_media_type",
            f"Content-Type {display_name(content_type)} is not accepted: send application/json or multipart/form-data.",
        )
    if not parsed.images:
        raise ServeError("empty", "the request holds no image.")
    if len(parsed.images) > max_images:
        raise ServeError(
            "validation",
            f"batch size {len(parsed.images)} > maximum allowed batch size {max_images} (--max_client_batch_size).",
        )
    return parsed


async def _read_multipart(request: Request, max_images: int) -> ParsedRequest:
    """The files of the field ``images``; other fields are ignored."""
    try:
        form = await request.form(max_files=max_images + 1, max_fields=100)
    except HTTPException as error:  # python-multipart's refusals, which Starlette turns into a plain 400
        if "Too many files" in str(error.detail):
            raise ServeError(
                "validation", f"more than {max_images} images in one request (--max_client_batch_size)."
            ) from None
        raise ServeError("invalid_input", f"the multipart body could not be read: {error.detail}") from None
    try:
        images = []
        for i, item in enumerate(form.getlist(FIELD)):
            if not isinstance(item, UploadFile):
                raise ServeError("invalid_input", f'{FIELD}[{i}] is a text field: send the field "{FIELD}" as files.')
            label = f"{FIELD}[{i}]" + (f" ({display_name(item.filename)})" if item.filename else "")
            images.append(RawImage(label, await item.read()))
        if not images and len(form):
            fields = ", ".join(display_name(k, 30) for k in list(form)[:5])
            raise ServeError("empty", f'the form holds no file in the field "{FIELD}" (fields: {fields}).')
    finally:
        await form.close()
    return ParsedRequest(images)
