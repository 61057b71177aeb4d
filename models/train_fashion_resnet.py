"""Training recipe for the reference CNN (``FashionResNet``) on Fashion-MNIST.

Run: ``python -m models.train_fashion_resnet [--epochs 18]``.  Trains on 50,000
of the 60,000 training images (the other 10,000 are the calibration pool, see
``models.fashion_mnist``), evaluates on the official 10,000-image test split
and writes ``models/artifacts/fashion_resnet.pt``.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

from models.fashion_mnist import load_split, train_and_calibration_splits
from models.fashion_resnet import FashionResNet
from models.training import accuracy, fit

ARTIFACTS = Path(__file__).resolve().parent / "artifacts"


def train(epochs: int, widths: tuple[int, ...], batch_size: int = 128, seed: int = 0,
          blocks_per_stage: int = 2) -> tuple[FashionResNet, float]:
    torch.manual_seed(seed)
    (train_x, train_y), _ = train_and_calibration_splits()
    test_x, test_y = load_split("test")
    model = FashionResNet(widths, blocks_per_stage)

    def sgd(module: torch.nn.Module) -> torch.optim.Optimizer:
        return torch.optim.SGD(module.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4)

    fit(model, {"images": train_x}, train_y, epochs, sgd, max_lr=0.2, batch_size=batch_size, seed=seed,
        report=lambda _: f"test acc {accuracy(model, {'images': test_x}, test_y):.4f}")
    return model, accuracy(model, {"images": test_x}, test_y)


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
