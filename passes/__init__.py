"""The compiler's stages (installed as ``moco_compile.passes``), one sub-package each:

- ``graph``: analyses and rewrites of ONNX graphs (index, cut points, FLOPs, the exit rewrite, verification);
- ``calibration``: the model run that records cut activations, pooling, rules, the OOD guard, exit confidence;
- ``planning``: splits, candidate exits, routing and cost, plan design, certification, the planner;
- ``memory``: liveness, float16, int8 and fusion passes;
- ``moe``: expert predictors for mixture-of-experts prefetching.

A pass never imports the CLI, the reports or the runtime."""
