"""``moco moe``: routing traces, expert predictors and offloaded-decoding benchmarks."""
