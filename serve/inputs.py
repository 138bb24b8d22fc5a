"""Reading the images of an ``/embed`` or ``/search`` request, TEI's JSON shape or a multipart upload.

- JSON: ``{"inputs": "<base64>" | "data:image/...;base64,<...>" | [...], "k": 5, "filter": {"label": ["a"]}}``
  (``k`` and ``filter`` for ``/search`` only);
- multipart: the files of the repeated field ``images`` (what an HTML form or ``curl -F images=@a.jpg`` sends), and
  for ``/search`` the repeated text field ``filter`` (``COLUMN=VALUE[,VALUE...]``, as ``crossmetric search --filter``).

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

from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.requests import Request

from .errors import ServeError

FIELD = "images"
FILTER_FIELD = "filter"
_DATA_URI = re.compile(r"^data:[\w.+-]*/?[\w.+-]*(;[\w=.+-]+)*;base64,", re.IGNORECASE)


@dataclass
class RawImage:
    """The bytes of one input image and its name in the request."""

    name: str
    data: bytes


@dataclass
class ParsedRequest:
    """The request's images, and the ``k`` and ``filter`` its body gave (None: not given there)."""

    images: list[RawImage]
    k: Any = None
    filter: Any = None


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
    if with_k:
        return ParsedRequest(images, payload.get("k"), payload.get(FILTER_FIELD))
    return ParsedRequest(images)


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
    """The files of the field ``images``; other fields are ignored.

    The body (already bounded by ``--payload_limit``) is parsed in memory with python-multipart's parser, without
    Starlette's form machinery (a spooled temporary file per upload): on the main job's model that machinery took a
    tenth of the event loop's time per ``/embed`` request under load.
    """
    options = parse_options_header(request.headers.get("content-type", ""))[1]
    boundary = options.get(b"boundary")
    if not boundary:
        raise ServeError("invalid_input", "the multipart body could not be read: its Content-Type has no boundary.")
    parts = _MultipartParts(max_images)
    parser = MultipartParser(boundary, parts.callbacks(), max_header_count=16)
    try:
        async for chunk in request.stream():
            parser.write(chunk)
        parser.finalize()
    except MultipartParseError as error:
        raise ServeError("invalid_input", f"the multipart body could not be read: {error}") from None
    if parts.too_many:
        raise ServeError("validation", f"more than {max_images} images in one request (--max_client_batch_size).")
    if not parts.complete:
        raise ServeError("invalid_input", "the multipart body could not be read: it ends before its last boundary.")
    images = []
    for i, (filename, data) in enumerate(parts.files):
        if filename is None:
            raise ServeError("invalid_input", f'{FIELD}[{i}] is a text field: send the field "{FIELD}" as files.')
        images.append(RawImage(f"{FIELD}[{i}]" + (f" ({display_name(filename)})" if filename else ""), data))
    if not images and parts.other_fields:
        fields = ", ".join(display_name(k, 30) for k in parts.other_fields[:5])
        raise ServeError("empty", f'the form holds no file in the field "{FIELD}" (fields: {fields}).')
    return ParsedRequest(images, filter=parts.filters or None)


class _MultipartParts:
    """What python-multipart's callbacks report: the parts of the field ``images`` as ``(filename or None for a text
    part, bytes)``, the names of the other fields, and whether the body reached its closing boundary."""

    def __init__(self, max_images: int) -> None:
        self.max_images = max_images
        self.files: list[tuple[str | None, bytes]] = []
        self.other_fields: list[str] = []
        self.filters: list[str] = []  # the text fields named "filter"
        self.too_many = False
        self.complete = False
        self._header_name = bytearray()
        self._header_value = bytearray()
        self._disposition = b""
        self._data: list[bytes] = []

    def callbacks(self) -> dict[str, Any]:
        return {
            "on_part_begin": self._part_begin,
            "on_part_data": lambda data, start, end: self._data.append(data[start:end]),
            "on_part_end": self._part_end,
            "on_header_field": lambda data, start, end: self._header_name.extend(data[start:end]),
            "on_header_value": lambda data, start, end: self._header_value.extend(data[start:end]),
            "on_header_end": self._header_end,
            "on_end": self._end,
        }

    def _part_begin(self) -> None:
        self._disposition, self._data = b"", []

    def _header_end(self) -> None:
        if bytes(self._header_name).lower() == b"content-disposition":
            self._disposition = bytes(self._header_value)
        self._header_name.clear()
        self._header_value.clear()

    def _part_end(self) -> None:
        options = parse_options_header(self._disposition)[1]
        name = options.get(b"name", b"").decode("utf-8", "replace")
        if name == FILTER_FIELD and options.get(b"filename") is None:
            self.filters.append(b"".join(self._data).decode("utf-8", "replace"))
        elif name != FIELD:
            self.other_fields.append(name)
        elif len(self.files) >= self.max_images:
            self.too_many = True
        else:
            filename = options.get(b"filename")
            self.files.append((None if filename is None else filename.decode("utf-8", "replace"), b"".join(self._data)))
        self._data = []

    def _end(self) -> None:
        self.complete = True
