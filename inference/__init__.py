"""Inference: a model by reference (export, run, checkpoint, Hub id; PyTorch or ONNX Runtime), what a run folder holds,
the offline pretrained weights, and the one loop that embeds images in batches (with the head's tokens when asked)."""
