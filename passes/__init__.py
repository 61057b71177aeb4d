"""Graph analyses and rewrites, each a module with one job (installed as ``moco_compile.passes``)."""
