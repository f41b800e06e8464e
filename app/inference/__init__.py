"""ONNX Runtime sessions, dynamic batching, the ASR scheduler and the ensemble."""
