"""The three files that make an exported folder a sentence-transformers model (``SentenceTransformer(DIR)``).

sentence-transformers (>= 5.4) wraps any transformers image model in its ``Transformer`` module. Our
``CrossMetricModel.forward`` already returns the L2-normalised embedding as ``pooler_output``, so the module reads
that output directly and no ``Pooling`` or ``Normalize`` module follows it:

- ``modules.json``: one module, the ``Transformer`` at the folder's root (``path: ""``, next to ``config.json``);
- ``sentence_bert_config.json``: task ``feature-extraction``, the image modality calls ``forward`` and reads
  ``pooler_output``, published as ``sentence_embedding``;
- ``config_sentence_transformers.json``: cosine similarity.

The exporter writes them itself (no sentence-transformers import, so it stays an optional extra):
``SentenceTransformer.save()`` would overwrite our model card and does not copy the modeling files. The embedding
size comes from the config's ``projection_dim`` (= ``embedding_dim``), which ``get_embedding_dimension()`` needs.
"""

from __future__ import annotations

import json
from typing import Any

TRANSFORMER_MODULE = "sentence_transformers.base.modules.transformer.Transformer"
MODULES_FILE = "modules.json"
MODULE_CONFIG_FILE = "sentence_bert_config.json"
MODEL_CONFIG_FILE = "config_sentence_transformers.json"
FILE_NAMES = (MODULES_FILE, MODULE_CONFIG_FILE, MODEL_CONFIG_FILE)
# The first release whose Transformer module takes image models with a modality_config.
MINIMUM_VERSION = "5.4"


def sentence_transformers_configs() -> dict[str, Any]:
    """File name -> JSON content of the three sentence-transformers files of an exported embedder."""
    return {
        MODULES_FILE: [{"idx": 0, "name": "0", "path": "", "type": TRANSFORMER_MODULE}],
        MODULE_CONFIG_FILE: {
            "transformer_task": "feature-extraction",
            "modality_config": {"image": {"method": "forward", "method_output_name": "pooler_output"}},
            "module_output_name": "sentence_embedding",
        },
        MODEL_CONFIG_FILE: {
            "model_type": "SentenceTransformer",
            "prompts": {},
            "default_prompt_name": None,
            "similarity_fn_name": "cosine",
        },
    }


def sentence_transformers_files() -> dict[str, str]:
    """File name -> text, in the form ``save_embedder(extra_files=...)`` takes (written with the weights)."""
    return {name: json.dumps(content, indent=2) + "\n" for name, content in sentence_transformers_configs().items()}
