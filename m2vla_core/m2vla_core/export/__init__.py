"""ONNX export of heads and the runtimes that execute a head (torch or onnxruntime)."""
