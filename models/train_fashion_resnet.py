"""Training recipe for the reference CNN (``FashionResNet``) on Fashion-MNIST.

Run: ``python -m models.train_fashion_resnet [--epochs 18]``.  Trains on 50,000
of the 60,000 training images (the other 10,000 are the calibration pool, see
``models.fashion_mnist``), evaluates on the official 10,000-image test split
and writes ``models/artifacts/fashion_resnet.pt``.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from models.fashion_mnist import load_split, train_and_calibration_splits
from models.fashion_resnet import FashionResNet

ARTIFACTS = Path(__file__).resolve().parent / "artifacts"


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
def accuracy(model: nn.Module, images: np.ndarray, labels: np.ndarray) -> float:
    model.eval()
    correct = 0
    for start in range(0, len(labels), 1000):
        logits = model(torch.from_numpy(images[start:start + 1000]))
        correct += int((logits.argmax(1).numpy() == labels[start:start + 1000]).sum())
    return correct / len(labels)


def train(epochs: int, widths: tuple[int, ...], batch_size: int = 128, seed: int = 0,
          blocks_per_stage: int = 2) -> tuple[FashionResNet, float]:
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    (train_x, train_y), _ = train_and_calibration_splits()
    test_x, test_y = load_split("test")
    model = FashionResNet(widths, blocks_per_stage)
    steps_per_epoch = len(train_y) // batch_size
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True,
                                weight_decay=5e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=0.2, total_steps=epochs * steps_per_epoch, pct_start=0.2)
    images, labels = torch.from_numpy(train_x), torch.from_numpy(train_y)
    for epoch in range(epochs):
        model.train()
        start = time.time()
        order = torch.randperm(len(labels), generator=generator)
        for step in range(steps_per_epoch):
            batch = order[step * batch_size:(step + 1) * batch_size]
            loss = nn.functional.cross_entropy(model(augment(images[batch], generator)), labels[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
        print(f"epoch {epoch + 1}/{epochs}  loss {loss.item():.3f}  "
              f"test acc {accuracy(model, test_x, test_y):.4f}  {time.time() - start:.0f}s", flush=True)
    return model, accuracy(model, test_x, test_y)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--epochs", type=int, default=18)
    parser.add_argument("--widths", type=int, nargs=3, default=[16, 32, 64])
    parser.add_argument("--blocks-per-stage", type=int, default=2)
    parser.add_argument("--name", default="fashion_resnet")
    args = parser.parse_args()
    torch.set_num_threads(2)
    model, test_accuracy = train(args.epochs, tuple(args.widths), blocks_per_stage=args.blocks_per_stage)
    ARTIFACTS.mkdir(exist_ok=True)
    torch.save(model.state_dict(), ARTIFACTS / f"{args.name}.pt")
    print(f"test accuracy {test_accuracy:.4f}; weights in {ARTIFACTS / args.name}.pt")


if __name__ == "__main__":
    main()
