"""The model: config, embedder, training-only cross-image-attention head, image processor.

Depends only on torch, timm and transformers, and imports only relatively, so that these files are
valid Hugging Face remote code (``register_for_auto_class`` copies them next to exported weights).
"""
