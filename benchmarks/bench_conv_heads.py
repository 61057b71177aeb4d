"""Benchmark: a cheap convolution before an exit's pooling (issue 28, item 1), on the reference CNN.

    python benchmarks/bench_conv_heads.py [--no-write]

At the four cuts of the default plan at 1% (layer1.0, layer2.0, layer2, layer3.0): the activations of the
10,000 calibration images; heads fitted on the first 7,000 rows, distilled from the full model's
probabilities, and compared on the other 3,000 by coverage at 99.5% precision (per-class thresholds on the
heads' log-probabilities; the statistic moco's pooling-variant choice uses).  Heads:

* moco's MLP head (``DistilledMLPFitter``) on the cut's 3x3-grid mean and global max (``grid3+max``);
* the same pooled features beside the pooled (``grid3+max``) output of a ReLU 3x3 convolution, depthwise or
  to 16 channels, into one 64-unit MLP, trained by torch (AdamW, one-cycle, 40 epochs, channels standardised).

The convolution's FLOPs per row are given beside: every row that reaches the exit pays them.  Then the
plan-level bound for the 16-channel convolution: the default build's rows reaching each exit on the official
test split, what the convolution costs them, and what its extra coverage could save at most, if every newly
covered row would have left at the next exit, or never.
Writes the section "Convolution before an exit's pooling (reference CNN)" of ``benchmarks/RESULTS.md``.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
from scipy.special import softmax

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.bench_fashion_resnet import run_batched  # noqa: E402
from benchmarks.results import machine_description, write_section  # noqa: E402
from models.export_fashion_resnet import ONNX_PATH, load_calibration  # noqa: E402
from models.fashion_mnist import load_split  # noqa: E402
from moco_compile import compile  # noqa: E402
from moco_compile.importer import import_model  # noqa: E402
from moco_compile.passes.calibration.calibrate import cut_column  # noqa: E402
from moco_compile.passes.calibration.mlp_head import HIDDEN_WIDTH, DistilledMLPFitter  # noqa: E402
from moco_compile.passes.calibration.rules import high_precision_coverage  # noqa: E402
from moco_compile.passes.graph.index import exposing_every_tensor  # noqa: E402
from moco_compile.prepare import cut_points_of  # noqa: E402
from moco_compile.runtime.session import CPU, make_session  # noqa: E402

CUTS = ("layer1.0", "layer2.0", "layer2", "layer3.0")
FIT_ROWS, PRECISION, EPOCHS, BATCH = 7000, 0.995, 40, 256
CONV_CHANNELS = 16
GRID = 3


def activations(images: np.ndarray) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """The full model's probabilities and the activations at :data:`CUTS` for ``images``."""
    imported = import_model(str(ONNX_PATH))
    _, cuts = cut_points_of(imported, {"images": images[:64]}, 64)
    wanted = {cut_column(cut): cut.tensor for cut in cuts if cut_column(cut) in CUTS}
    session = make_session(exposing_every_tensor(imported.model), [CPU])
    logits, *values = run_batched(session, images, 500, names=[imported.output, *wanted.values()])
    return softmax(logits, axis=1), dict(zip(wanted, values))


def grid_and_max(values: np.ndarray) -> np.ndarray:
    """``grid3+max`` pooling of ``[N, C, H, W]``: the mean of each cell of a 3x3 grid, then the global max."""
    return np.concatenate([torch.nn.functional.adaptive_avg_pool2d(torch.tensor(values), GRID).flatten(1).numpy(),
                           values.max(axis=(2, 3))], axis=1).astype(np.float32)


class ConvBesidePooling(torch.nn.Module):
    """The cut's pooled features beside the pooled output of a ReLU 3x3 convolution, into one MLP."""

    def __init__(self, values: np.ndarray, pooled: np.ndarray, out_channels: int, depthwise: bool, classes: int):
        super().__init__()
        channels = values.shape[1]
        self.register_buffer("mean", torch.tensor(values.mean(axis=(0, 2, 3)))[None, :, None, None])
        self.register_buffer("scale", torch.tensor(values.std(axis=(0, 2, 3)) + 1e-6)[None, :, None, None])
        self.register_buffer("pooled_mean", torch.tensor(pooled.mean(axis=0)))
        self.register_buffer("pooled_scale", torch.tensor(pooled.std(axis=0) + 1e-6))
        self.conv = torch.nn.Conv2d(channels, out_channels, 3, padding=1, groups=channels if depthwise else 1)
        self.head = torch.nn.Sequential(torch.nn.Linear(pooled.shape[1] + (GRID * GRID + 1) * out_channels,
                                                        HIDDEN_WIDTH), torch.nn.ReLU(),
                                        torch.nn.Linear(HIDDEN_WIDTH, classes))

    def forward(self, values: torch.Tensor, pooled: torch.Tensor) -> torch.Tensor:
        z = torch.relu(self.conv((values - self.mean) / self.scale))
        conv_pooled = torch.cat([torch.nn.functional.adaptive_avg_pool2d(z, GRID).flatten(1), z.amax((2, 3))], 1)
        return self.head(torch.cat([(pooled - self.pooled_mean) / self.pooled_scale, conv_pooled], 1))


def conv_scores(values: np.ndarray, pooled: np.ndarray, probabilities: np.ndarray, depthwise: bool) -> np.ndarray:
    """Held-out log-probabilities of a :class:`ConvBesidePooling` head distilled on the fitting rows."""
    torch.manual_seed(0)
    fit = slice(0, FIT_ROWS)
    out_channels = values.shape[1] if depthwise else CONV_CHANNELS
    net = ConvBesidePooling(values[fit], pooled[fit], out_channels, depthwise, probabilities.shape[1])
    steps = EPOCHS * -(-FIT_ROWS // BATCH)
    optimizer = torch.optim.AdamW(net.parameters(), 2e-3, weight_decay=1e-2)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, 2e-3, total_steps=steps)
    x, p, targets = torch.tensor(values[fit]), torch.tensor(pooled[fit]), torch.tensor(probabilities[fit])
    for _ in range(EPOCHS):
        order = torch.randperm(FIT_ROWS)
        for start in range(0, FIT_ROWS, BATCH):
            rows = order[start:start + BATCH]
            loss = -(targets[rows] * torch.log_softmax(net(x[rows], p[rows]), 1)).sum(1).mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
    with torch.no_grad():
        return torch.log_softmax(net(torch.tensor(values[FIT_ROWS:]), torch.tensor(pooled[FIT_ROWS:])), 1).numpy()


def plan_level_bound(conv: dict[str, tuple[float, float]], calibration: dict) -> list[str]:
    """Per cut, ``conv[cut] = (coverage gain, FLOPs)`` of the 16-channel convolution set against the default
    build at 1%: its rows reaching each exit on the test split, the convolution's cost to them and the most its
    coverage gain could save, in percent of the network's FLOPs."""
    result = compile(ONNX_PATH, calibration, max_disagreement=0.01, measure_latency=False, show_progress=False)
    _, exits = run_batched(make_session(result.model, [CPU]), load_split("test")[0])
    plan = result.plan
    share = [e.cut.flops_before / plan.total_flops for e in plan.exits] + [1.0]
    lines = ["| cut | share of the FLOPs before it | rows reaching the exit | conv's cost | saving at most, newly "
             "covered rows leaving at the next exit instead | saving at most, rows never leaving instead |",
             "|---|---|---|---|---|---|"]
    for k, exit_ in enumerate(plan.exits):
        gain, flops = conv.get(cut_column(exit_.cut), (None, None))
        if gain is None:
            continue
        reach = float(((exits < 0) | (exits >= k)).mean())
        lines.append(f"| {cut_column(exit_.cut)} | {share[k]:.1%} | {reach:.1%} | "
                     f"{reach * flops / plan.total_flops:.2%} | {gain * (share[k + 1] - share[k]):+.2%} | "
                     f"{gain * (1 - share[k]):+.2%} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--no-write", action="store_true", help="print only; leave RESULTS.md alone")
    args = parser.parse_args()
    started = time.perf_counter()
    torch.set_num_threads(2)
    calibration = load_calibration()
    probabilities, cut_values = activations(calibration["images"])
    probabilities = probabilities.astype(np.float32)
    predictions = probabilities.argmax(axis=1)
    held = predictions[FIT_ROWS:]
    lines = ["| cut | activation | MLP head (moco) | + depthwise 3x3 conv | + 3x3 conv to 16 channels |",
             "|---|---|---|---|---|"]
    conv = {}
    for column, values in cut_values.items():
        pooled = grid_and_max(values)
        mlp = DistilledMLPFitter().fit(pooled[:FIT_ROWS], probabilities[:FIT_ROWS], probabilities.shape[1])
        mlp_coverage = high_precision_coverage(mlp(pooled[FIT_ROWS:]), held, PRECISION)
        cells = [f"{mlp_coverage:.3f}"]
        for depthwise in (True, False):
            coverage = high_precision_coverage(conv_scores(values, pooled, probabilities, depthwise), held, PRECISION)
            kernels = values.shape[1] if depthwise else values.shape[1] * CONV_CHANNELS
            flops = 2 * 9 * kernels * values.shape[2] * values.shape[3]
            cells.append(f"{coverage:.3f} (+{flops / 1e6:.2f} MFLOPs)")
            if not depthwise:  # the 16-channel convolution, bounded at the plan level below
                conv[column] = (coverage - mlp_coverage, flops)
        lines.append(f"| {column} | {'x'.join(map(str, values.shape[1:]))} | {' | '.join(cells)} |")
        print(lines[-1], flush=True)
    body = "\n".join([
        "Command: `python benchmarks/bench_conv_heads.py`",
        f"Machine: {machine_description()} (run took {(time.perf_counter() - started) / 60:.1f} min)", "",
        "Reference CNN (40.6 MFLOPs per image), at the cuts of the default plan at 1%. Heads fitted on the first "
        f"{FIT_ROWS:,} of the 10,000 calibration images (distilled from the full model's probabilities), compared on "
        f"the other {10_000 - FIT_ROWS:,} by coverage at {PRECISION:.1%} precision (the share of rows per-class "
        "thresholds admit while each class keeps that precision). The conv heads put the pooled output of a ReLU 3x3 "
        "convolution beside moco's pooled features (3x3-grid mean and global max) into one 64-unit MLP (torch, AdamW, "
        f"one-cycle, {EPOCHS} epochs); their convolution's FLOPs per row are given beside.", "", *lines, "",
        "Plan-level bound for the 16-channel convolution: the default build at 1% (`moco compile`'s plan, MLP heads) "
        "on the official 10,000-image test split. A conv head at an exit costs its FLOPs on every row that reaches "
        "the exit; its coverage gain (from the table above, as a share of all rows) can at most move that many rows "
        "to this exit from the next one, or from the full network. Figures in percent of the network's FLOPs:", "",
        *plan_level_bound(conv, calibration)])
    print(body)
    if not args.no_write:
        write_section("Convolution before an exit's pooling (reference CNN)", body)


if __name__ == "__main__":
    main()
