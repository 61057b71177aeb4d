"""Supervised training on Fashion-MNIST-shaped inputs: augmentation, a one-cycle loop, accuracy.

Inputs are a mapping ``{input name: tensor}`` in the order of the module's ``forward``
arguments; the ``"images"`` input (``[N, 1, 28, 28]``) is augmented, any other input
(e.g. a side feature vector) is passed through unchanged.
"""
from __future__ import annotations

import time
from collections.abc import Callable, Mapping

import numpy as np
import torch
from torch import nn


def augment(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random 2-pixel translation (pad + crop) and horizontal flip, per image."""
    n = images.shape[0]
    padded = nn.functional.pad(images, (2, 2, 2, 2))
    dx = torch.randint(0, 5, (n,), generator=generator)
    dy = torch.randint(0, 5, (n,), generator=generator)
    rows = (dy[:, None] + torch.arange(28)[None, :])[:, None, :, None].expand(n, 1, 28, 32)
    cropped = torch.gather(padded, 2, rows)
    cols = (dx[:, None] + torch.arange(28)[None, :])[:, None, None, :].expand(n, 1, 28, 28)
    cropped = torch.gather(cropped, 3, cols)
    flip = torch.rand(n, generator=generator) < 0.5
    cropped[flip] = cropped[flip].flip(-1)
    return cropped


@torch.no_grad()
def accuracy(model: nn.Module, inputs: Mapping[str, np.ndarray], labels: np.ndarray) -> float:
    """Share of rows whose argmax is the label (model in eval mode, batches of 1,000)."""
    model.eval()
    correct = 0
    for start in range(0, len(labels), 1000):
        logits = model(*(torch.from_numpy(values[start:start + 1000]) for values in inputs.values()))
        correct += int((logits.argmax(1).numpy() == labels[start:start + 1000]).sum())
    return correct / len(labels)


def fit(model: nn.Module, inputs: Mapping[str, np.ndarray], labels: np.ndarray, epochs: int,
        make_optimizer: Callable[[nn.Module], torch.optim.Optimizer], max_lr: float, batch_size: int = 128,
        seed: int = 0, report: Callable[[int], str] = lambda epoch: "") -> nn.Module:
    """Train ``model`` in place with a one-cycle schedule peaking at ``max_lr``; returns it in eval mode.

    ``report(epoch)`` adds to each epoch's progress line (e.g. the test accuracy).
    """
    generator = torch.Generator().manual_seed(seed)
    tensors = {name: torch.from_numpy(values) for name, values in inputs.items()}
    targets = torch.from_numpy(labels)
    steps_per_epoch = len(targets) // batch_size
    optimizer = make_optimizer(model)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=max_lr, total_steps=epochs * steps_per_epoch,
                                                   pct_start=0.2)
    for epoch in range(epochs):
        model.train()
        start = time.time()
        order = torch.randperm(len(targets), generator=generator)
        for step in range(steps_per_epoch):
            batch = order[step * batch_size:(step + 1) * batch_size]
            args = [augment(values[batch], generator) if name == "images" else values[batch]
                    for name, values in tensors.items()]
            loss = nn.functional.cross_entropy(model(*args), targets[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
        print(f"epoch {epoch + 1}/{epochs}  loss {loss.item():.3f}  {report(epoch)}  {time.time() - start:.0f}s",
              flush=True)
    return model.eval()
