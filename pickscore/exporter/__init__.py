"""Exporters: ONNX graphs and a Triton model repository, each verified against the checkpoint."""
