"""Memory passes: liveness and weight bytes, float16, int8 quantization, offline fusion."""
