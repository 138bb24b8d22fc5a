"""faiss' numpy methods, whoever imported ``faiss.contrib.torch_utils`` before us.

``faiss.contrib.torch_utils`` (imported by e.g. pytorch-metric-learning) replaces ``search``, ``range_search`` and
``reconstruct_n`` on every index class with torch wrappers that drop ``params`` (so id selectors and per-call
``nprobe`` / ``efSearch`` are lost) or allocate torch tensors. The originals stay reachable as ``<name>_numpy``;
every call of the index code that passes ``params`` or reads vectors back goes through :func:`numpy_method`.
"""

from __future__ import annotations

from typing import Any


def numpy_method(index: Any, name: str) -> Any:
    """``index.<name>_numpy`` where torch_utils has wrapped ``name``, else ``index.<name>``."""
    return getattr(index, f"{name}_numpy", None) or getattr(index, name)
