"""moco: compile trained classifiers into one ONNX graph where easy inputs leave early."""
