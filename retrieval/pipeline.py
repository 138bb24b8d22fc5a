"""The ``image-retrieval`` pipeline: image(s) in, nearest entries of an :class:`EmbeddingIndex` out.

After :func:`register_retrieval_pipeline` (``import crossmetric`` calls it)::

    from transformers import pipeline
    retrieve = pipeline("image-retrieval", model="path/to/export", index="path/to/index", top_k=5)
    retrieve("query.jpg")            # [{"id", "label", "score", "path"}, ...] best first
    retrieve(["a.jpg", "b.jpg"])     # one such list per image
    # retrieve, then re-rank the 20 nearest with the model's re-ranker (reranker/) and the tokens the index stores
    rerank = pipeline("image-retrieval", model="path/to/export", index="path/to/index", top_k=5, rerank_top_k=20)

How the index reaches the pipeline: ``transformers.pipeline()`` hands every keyword it does not know itself to
the pipeline class, whose ``_sanitize_parameters`` sorts them into preprocess / forward / postprocess parameters
(the same happens for keywords given at call time, which override). ``index`` (an ``EmbeddingIndex``, a saved
index folder, or a Hub repo id), ``top_k``, ``ef_search`` and ``nprobe`` are postprocess parameters;
``timeout`` (for image URLs) a preprocess one. Without ``index=``, the pipeline looks for an index in the model's
own folder or repo under ``index/`` (see ``EmbeddingIndex.push_to_hub(repo_id, path_in_repo="index")``).

``index`` may be either engine's index (:mod:`.protocol`: a folder's ``EmbeddingIndex`` or a ``MilvusIndex``);
:func:`retrieval_pipeline` makes the pipeline of a ``LoadedModel`` (embedder, processor and re-ranker loaded once).
An index built by another model is refused, naming both.

``rerank_top_k`` (an integer >= 2) re-scores each query's K nearest with the model's re-ranker
(:mod:`.reranking`: items past K keep the embedding's order); the re-ranker is the model's own ``reranker/``
(folder or repo), or one passed as ``reranker=``. The query's single backbone pass then also gives the head's
tokens. A model without a re-ranker, or an index without the head's tokens, is refused when the option is given,
before any image is processed.

The query embedding is the model's ``pooler_output`` (the L2-normalised embedding), so any model whose output
has one works, not only crossmetric's.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModel, Pipeline
from transformers.pipelines import PIPELINE_REGISTRY

from ..utils.atomic_files import write_atomic
from .reranking import check_index_for_reranker, check_rerank_top_k, search_and_rerank

logger = logging.getLogger(__name__)

TASK = "image-retrieval"
DEFAULT_TOP_K = 5
# The module path transformers records for remote code is "<file stem>.<class>"; see add_retrieval_pipeline_to_config.
_REMOTE_CODE_FILE = "crossmetric_retrieval_pipeline.py"
_REMOTE_CODE = '''"""Remote-code entry for the image-retrieval pipeline; the code is in the crossmetric package.

Only used by ``transformers.pipeline(model=..., trust_remote_code=True)``; with crossmetric installed,
``import crossmetric`` registers the pipeline and no remote code is needed (pass ``pipeline_class=`` or drop the
``custom_pipelines`` entry from config.json). Needs ``pip install crossmetric``.
"""

from crossmetric.retrieval.pipeline import ImageRetrievalPipeline  # noqa: F401
'''


def _resolve_index(index: Any) -> Any:
    """An index from an index object of either engine (:class:`~.protocol.GalleryIndex`: ``EmbeddingIndex``,
    ``MilvusIndex``), a folder or a Hub repo id."""
    from .index import EmbeddingIndex
    from .protocol import GalleryIndex

    if isinstance(index, (str, os.PathLike)):
        return EmbeddingIndex.from_pretrained(index)
    if isinstance(index, (EmbeddingIndex, GalleryIndex)):
        return index
    raise TypeError(
        f"index must be an EmbeddingIndex, a MilvusIndex, a saved index folder or a Hub repo id, got {type(index)}."
    )


def retrieval_pipeline(loaded: Any, index: Any = None, **kwargs: Any) -> ImageRetrievalPipeline:
    """The ``image-retrieval`` pipeline of a :class:`~crossmetric.inference.loaded_model.LoadedModel` (its embedder,
    processor and, when loaded, re-ranker: nothing is loaded again) over ``index`` (either engine, a folder or a Hub
    id; None: the model's own ``index/``); ``kwargs``: the pipeline's keywords (``top_k``, ``rerank_top_k``, ...)."""
    if loaded.reranker is not None and kwargs.get("rerank_top_k") is not None:
        kwargs.setdefault("reranker", loaded.reranker)
    if index is not None:
        kwargs["index"] = index
    device = getattr(loaded.embedder, "device", None)
    return ImageRetrievalPipeline(
        model=loaded.embedder, image_processor=loaded.processor, device=device, task=TASK, **kwargs
    )


class ImageRetrievalPipeline(Pipeline):
    """Embed each query image with the model and return its ``top_k`` nearest entries of the index.

    Keyword arguments (at construction or per call): ``index``, ``top_k`` (default 5), ``ef_search`` / ``nprobe``
    (approximate indexes), ``timeout`` (seconds, for image URLs), ``rerank_top_k`` and ``reranker`` (re-ranking).
    """

    _load_processor = False
    _load_image_processor = True
    _load_feature_extractor = False
    _load_tokenizer = False

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._check_image_processor()
        if self._postprocess_params.get("index") is None:
            self._postprocess_params["index"] = self._index_next_to_model()
        if self._postprocess_params.get("rerank_top_k"):
            check_index_for_reranker(self.index, self._postprocess_params["reranker"])

    @property
    def index(self) -> Any:
        """The index searched when a call passes none."""
        return self._postprocess_params["index"]

    def _check_image_processor(self) -> None:
        if self.image_processor is None:
            raise ValueError(
                "image-retrieval needs the model's image processor: the model folder has no preprocessor_config.json; "
                "pass image_processor= to pipeline()."
            )

    def _index_next_to_model(self) -> Any:
        """The index shipped with the model (its folder or repo, ``index/``), or a clear error."""
        from .hub import DEFAULT_SUBFOLDER
        from .index import EmbeddingIndex

        source = getattr(self.model, "name_or_path", "") or getattr(self.model.config, "_name_or_path", "")
        if source:
            try:
                return EmbeddingIndex.from_pretrained(source, subfolder=DEFAULT_SUBFOLDER)
            except FileNotFoundError as error:
                logger.debug("No index next to the model: %s", error)
        raise ValueError(
            "image-retrieval needs an index: pass index= (an EmbeddingIndex, a folder written by EmbeddingIndex.save, "
            f"or a Hub repo id); the model {source or '(unnamed)'!r} has no index/ folder."
        )

    def _check_index(self, index: Any) -> Any:
        """Refuse an index of another embedding size, or built by another model (naming both)."""
        from ..inference.embedding import model_reference
        from .compatibility import check_index_for_model

        if getattr(self, "_reference", None) is None:
            self._reference = model_reference(self.model)  # the weight fingerprint, computed once per pipeline
        check_index_for_model(index, self._reference, getattr(self.model.config, "embedding_dim", None))
        return index

    def _reranker_for(self, reranker: Any) -> Any:
        """The re-ranker to use: ``reranker`` (a ``CrossMetricReranker``), else the model's own ``reranker/``, loaded
        once with this pipeline's model as its embedder; a clear refusal when the model has none."""
        from ..inference.reranker_loading import load_reranker, no_reranker_message, require_reranker
        from ..modeling.reranking_crossmetric import CrossMetricReranker

        if isinstance(reranker, CrossMetricReranker):
            return reranker.set_embedder(self.model, self.image_processor)
        if reranker is not None:
            raise TypeError(f"reranker must be a CrossMetricReranker, got {type(reranker).__name__}.")
        if getattr(self, "_own_reranker", None) is None:
            source = getattr(self.model, "name_or_path", "") or getattr(self.model.config, "_name_or_path", "")
            if not source:
                raise ValueError(no_reranker_message("(unnamed model)", "rerank_top_k", "model"))
            self._own_reranker = load_reranker(require_reranker(source, "rerank_top_k", "model"), embedder=self.model)
            self._own_reranker.to(self.device)
        return self._own_reranker

    def _sanitize_parameters(
        self,
        index: Any = None,
        top_k: int | None = None,
        ef_search: int | None = None,
        nprobe: int | None = None,
        timeout: float | None = None,
        rerank_top_k: int | None = None,
        reranker: Any = None,
        **kwargs: Any,
    ) -> tuple[dict, dict, dict]:
        if kwargs:
            raise TypeError(f"image-retrieval got unexpected keyword arguments: {sorted(kwargs)}.")
        preprocess = {"timeout": timeout} if timeout is not None else {}
        postprocess: dict[str, Any] = {}
        forward: dict[str, Any] = {}
        if index is not None:
            postprocess["index"] = self._check_index(_resolve_index(index))
        if rerank_top_k is not None:  # checked before any image is processed
            postprocess["rerank_top_k"] = check_rerank_top_k(rerank_top_k)
            postprocess["reranker"] = self._reranker_for(reranker)
            forward["token_stage"] = (postprocess["reranker"].config.token_stage,)
            current = postprocess.get("index") or getattr(self, "_postprocess_params", {}).get("index")
            if current is not None:  # else checked in __init__, once the index next to the model is found
                check_index_for_reranker(current, postprocess["reranker"])
        if top_k is not None:
            if not isinstance(top_k, int) or isinstance(top_k, bool) or top_k < 1:
                raise ValueError(f"top_k must be a positive integer, got {top_k!r}.")
            postprocess["top_k"] = top_k
        for name, value in (("ef_search", ef_search), ("nprobe", nprobe)):
            if value is not None:
                postprocess[name] = value
        return preprocess, forward, postprocess

    def __call__(self, images: Any, **kwargs: Any) -> list[dict[str, Any]] | list[list[dict[str, Any]]]:
        """Retrieve for one image (a path, URL or PIL image: one result list) or a list of them (a list of lists)."""
        return super().__call__(images, **kwargs)

    def preprocess(self, image: Any, timeout: float | None = None) -> dict[str, torch.Tensor]:
        from transformers.image_utils import load_image

        from ..data.image_loading import describe_source, load_rgb_image

        if isinstance(image, str) and image.startswith(("http://", "https://")):
            decoded = load_image(image, timeout=timeout).convert("RGB")
        else:
            decoded = load_rgb_image(image)
            if decoded is None:
                raise ValueError(f"query image {describe_source(image)!r} could not be decoded (see the warning).")
        inputs = self.image_processor(images=decoded, return_tensors="pt")
        return {"pixel_values": inputs["pixel_values"].to(self.dtype or torch.float32)}

    def _forward(
        self, model_inputs: dict[str, torch.Tensor], token_stage: tuple[str | None] | None = None
    ) -> dict[str, torch.Tensor]:
        """The embedding; when re-ranking (``token_stage``), the head's tokens too, from the same backbone pass."""
        if token_stage is None:
            return {"embeddings": self.model(pixel_values=model_inputs["pixel_values"]).pooler_output}
        from ..modeling.reranking_crossmetric import embed_with_tokens

        _, embeddings, tokens, _ = embed_with_tokens(self.model, model_inputs["pixel_values"], token_stage[0])
        return {"embeddings": embeddings, "tokens": tokens}

    def postprocess(
        self,
        model_outputs: dict[str, torch.Tensor],
        index: Any = None,
        top_k: int = DEFAULT_TOP_K,
        ef_search: int | None = None,
        nprobe: int | None = None,
        rerank_top_k: int | None = None,
        reranker: Any = None,
    ) -> list[dict[str, Any]]:
        embeddings = model_outputs["embeddings"].float().cpu().numpy()
        if rerank_top_k:
            tokens = model_outputs["tokens"].float().cpu().numpy()
            options = {"ef_search": ef_search, "nprobe": nprobe}
            return search_and_rerank(index, reranker, embeddings, tokens, top_k, rerank_top_k, **options)[0]
        return index.search(embeddings, k=top_k, ef_search=ef_search, nprobe=nprobe)[0]


def register_retrieval_pipeline() -> None:
    """Register ``image-retrieval`` with transformers (idempotent; ``import crossmetric`` calls it)."""
    current = PIPELINE_REGISTRY.supported_tasks.get(TASK)
    if current is not None and current.get("impl") is ImageRetrievalPipeline:
        return
    PIPELINE_REGISTRY.register_pipeline(TASK, pipeline_class=ImageRetrievalPipeline, pt_model=AutoModel, type="image")


def add_retrieval_pipeline_to_config(export_dir: str | os.PathLike) -> Path:
    """Declare the ``image-retrieval`` pipeline in an exported model's ``config.json``, for remote-code users.

    Writes ``custom_pipelines = {"image-retrieval": {"impl": "crossmetric_retrieval_pipeline.ImageRetrievalPipeline",
    "pt": ["AutoModel"], "tf": [], "type": "image"}}`` (the entry ``Pipeline.save_pretrained`` writes for a
    registered custom pipeline) and the small remote-code file it names, which imports the implementation from the
    installed crossmetric package. Then ``pipeline(model=repo, trust_remote_code=True, index=...)`` infers the task.

    Trade-off (transformers 5.x): once a config declares the task in ``custom_pipelines``,
    ``pipeline("image-retrieval", model=...)`` insists on ``trust_remote_code=True`` (or ``pipeline_class=``)
    even when crossmetric is installed and has registered the task. Without this entry, the registered pipeline
    works with no remote code at all, so only add it when the task should be inferred from the repo.
    """
    folder = Path(export_dir)
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise ValueError(f"{str(folder)!r} has no config.json: pass a folder written by save_embedder().")
    config = json.loads(config_path.read_text(encoding="utf-8"))
    config.setdefault("custom_pipelines", {})[TASK] = {
        "impl": f"{Path(_REMOTE_CODE_FILE).stem}.{ImageRetrievalPipeline.__name__}",
        "pt": ["AutoModel"],
        "tf": [],
        "type": "image",
    }
    write_atomic(folder / _REMOTE_CODE_FILE, _REMOTE_CODE)
    write_atomic(config_path, json.dumps(config, indent=2, sort_keys=True) + "\n")
    return config_path
