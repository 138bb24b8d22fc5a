"""Hub: ``crossmetric export`` of a run or checkpoint, the ONNX export and its check, push to the Hub."""
