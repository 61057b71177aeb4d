"""Running compiled graphs (installed as ``moco_compile.runtime``); never imports the compiler."""
