"""The head's tokens an index stores per gallery item, so that re-ranking K candidates needs no backbone pass.

When the model has a re-ranker (``reranker/``), ``crossmetric index build`` keeps, next to each item's embedding,
the tokens its re-ranker reads (T tokens × C channels of one backbone stage, from the same pass as the embedding)
in float16: ``T · C · 2`` bytes per item (the main job's model: 4×4 tokens × 112 channels = 3584 bytes, next to its
512-byte float32 embedding). They live in a fourth file of the index folder, ``head_tokens.safetensors``, described
in ``metadata.json`` under ``head_tokens`` (shape, dtype, token stage, bytes per item); an index without them
is read as before.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import load_file, save_file

from .storage import METADATA_FILE, IndexFormatError

HEAD_TOKENS_FILE = "head_tokens.safetensors"
HEAD_TOKENS_KEY = "tokens"
DTYPE = np.float16


@dataclass
class HeadTokens:
    """N×T×C float16 tokens, row-aligned with an index's embeddings, and the backbone stage they come from.

    Attributes:
        tokens: the array (float16).
        token_stage: the backbone module whose output they are (the re-ranker config's ``token_stage``; None for the
            embedder's last feature map).
    """

    tokens: np.ndarray
    token_stage: str | None = None

    @classmethod
    def from_array(cls, tokens: Any, token_stage: str | None, count: int) -> HeadTokens:
        """Check ``tokens`` (``count`` × T × C, finite) and store them in float16 (finite there too)."""
        array = np.asarray(tokens)
        if array.ndim != 3 or array.shape[0] != count or 0 in array.shape:
            raise ValueError(f"head tokens must be an array of {count} × T × C, got shape {array.shape}.")
        stored = np.ascontiguousarray(array, dtype=DTYPE)
        if not np.isfinite(stored).all():
            raise ValueError("head tokens hold NaN or infinite values (or values beyond float16's range).")
        return cls(stored, token_stage)

    @staticmethod
    def rows_checked(head_tokens: HeadTokens | None, count: int) -> HeadTokens | None:
        """``head_tokens`` if it has ``count`` rows (or is None), else ``ValueError``."""
        if head_tokens is not None and len(head_tokens) != count:
            raise ValueError(f"head_tokens has {len(head_tokens)} rows for {count} embeddings.")
        return head_tokens

    def __len__(self) -> int:
        return len(self.tokens)

    @property
    def bytes_per_item(self) -> int:
        """Stored bytes per gallery item: T · C · 2."""
        return int(self.tokens.shape[1] * self.tokens.shape[2] * self.tokens.itemsize)

    def info(self) -> dict[str, Any]:
        """Their entry in ``metadata.json``."""
        return {
            "file": HEAD_TOKENS_FILE,
            "shape": [int(self.tokens.shape[1]), int(self.tokens.shape[2])],
            "dtype": "float16",
            "token_stage": self.token_stage,
            "bytes_per_item": self.bytes_per_item,
        }

    def describe(self) -> str:
        """One line for the command line: the shape and the bytes per item."""
        count, channels = self.tokens.shape[1:]
        return f"head tokens {count}×{channels} float16 ({self.bytes_per_item} bytes per item)"

    def subset(self, rows: np.ndarray) -> HeadTokens:
        return HeadTokens(self.tokens[rows], self.token_stage)

    def save(self, folder: Path) -> None:
        """Write ``folder/head_tokens.safetensors`` (into an index's staging folder)."""
        save_file({HEAD_TOKENS_KEY: self.tokens}, str(folder / HEAD_TOKENS_FILE), metadata={"format": "np"})

    @classmethod
    def load(cls, folder: Path, info: Any, count: int) -> HeadTokens:
        """Read and check the tokens that ``metadata.json``'s ``info`` describes; the error names the file at fault."""
        path = folder / HEAD_TOKENS_FILE
        shape = info.get("shape") if isinstance(info, dict) else None
        if not isinstance(shape, list) or len(shape) != 2:
            raise IndexFormatError(f"{folder / METADATA_FILE}: head_tokens needs a shape [T, C], got {info!r}.")
        if not path.is_file():
            raise IndexFormatError(f"{path} is missing, but {METADATA_FILE} lists head tokens: rebuild the index.")
        try:
            tokens = load_file(str(path)).get(HEAD_TOKENS_KEY)
        except Exception as error:  # safetensors raises its own error types for corrupt headers
            raise IndexFormatError(f"{path} is not a readable safetensors file: {error}") from error
        if tokens is None or tokens.dtype != DTYPE or tokens.shape != (count, *shape):
            found = None if tokens is None else (tokens.dtype, tokens.shape)
            raise IndexFormatError(
                f"{path} holds {found}, but {METADATA_FILE} says {count} × {shape} float16: the files come from "
                "different saves. Rebuild the index."
            )
        return cls(tokens, info.get("token_stage"))
