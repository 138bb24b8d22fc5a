"""autofaiss' ``build_index`` on a folder of ``.npy`` embeddings, for ``benchmark_index_scale.py``.

Runs in a separate interpreter that has autofaiss (not a dependency of crossmetric):

    python -m venv --system-site-packages /work/bench/afenv && /work/bench/afenv/bin/pip install autofaiss
    /work/bench/afenv/bin/pip uninstall -y numpy   # autofaiss pins numpy<2; the system's numpy 2 works with it

    python _index_scale_autofaiss.py EMBEDDINGS_DIR OUT_DIR MAX_MEMORY [--mmap]

One thread (``nb_cores=1``), inner product, autofaiss' defaults otherwise (``max_index_query_time_ms=10``: it picks
the search parameters that keep a query under 10 ms). Prints one JSON line: autofaiss' infos, ``index_path``,
``index_key``, ``index_param`` and the build time.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path

import autofaiss.external.optimize
import autofaiss.external.quantize
from autofaiss import build_index


class _NumpyJson:
    """json for autofaiss' info files: under numpy 2 its float32 metrics are not JSON numbers (autofaiss pins
    numpy<2, but pyarrow here needs numpy 2)."""

    dump = staticmethod(lambda obj, handle, **kwargs: json.dump(obj, handle, default=float, **kwargs))
    dumps = staticmethod(lambda obj, **kwargs: json.dumps(obj, default=float, **kwargs))
    load, loads = staticmethod(json.load), staticmethod(json.loads)


autofaiss.external.optimize.json = autofaiss.external.quantize.json = _NumpyJson


def main() -> None:
    embeddings, out, max_memory = sys.argv[1:4]
    mmap = "--mmap" in sys.argv
    out_dir = Path(out)
    start = time.perf_counter()
    _, infos = build_index(
        embeddings=embeddings,
        index_path=str(out_dir / "knn.index"),
        index_infos_path=str(out_dir / "index_infos.json"),
        max_index_memory_usage=max_memory,
        current_memory_available="8G",
        metric_type="ip",
        nb_cores=1,
        should_be_memory_mappable=mmap,
        verbose=logging.WARNING,
    )
    infos = dict(infos or {})
    infos.update(build_s=time.perf_counter() - start, index_path=str(out_dir / "knn.index"), memory_mappable=mmap)
    if "index_key" not in infos or "index_param" not in infos:
        infos.update(json.loads((out_dir / "index_infos.json").read_text()))
    print(json.dumps(infos, default=str))


if __name__ == "__main__":
    main()
