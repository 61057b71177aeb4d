"""Measured peak memory of onnxruntime runs."""
