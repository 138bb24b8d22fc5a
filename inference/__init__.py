"""Inference: a model by reference (torch or ONNX), run folders, pretrained weights, the one embedding loop."""
