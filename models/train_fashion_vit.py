"""Training recipe for a Hugging Face ViT (``ViTForImageClassification``) on Fashion-MNIST.

Run: ``python -m models.train_fashion_vit [--epochs 10]``.  The reference for image classifiers that come
as a Hugging Face directory: 6 encoder blocks of width 64 on 4x4 patches (49 patches and the class
token), trained from scratch on the 50,000 training images the reference CNN trains on (the other 10,000
are the calibration pool, ``models.fashion_mnist``), evaluated on the official test split, and written with
``save_pretrained`` to ``models/artifacts/fashion_vit/`` (about 1 MB).
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch
from torch import nn

from models.fashion_mnist import CLASS_NAMES, load_split, train_and_calibration_splits
from models.training import accuracy, fit

ARTIFACTS = Path(__file__).resolve().parent / "artifacts"


class Logits(nn.Module):
    """The classifier's logits as one tensor, for :func:`models.training.fit`."""

    def __init__(self, classifier: nn.Module) -> None:
        super().__init__()
        self.classifier = classifier

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.classifier(pixel_values=images).logits


def fashion_vit(seed: int = 0):
    """A randomly initialised ViT for 28x28 grey images and the Fashion-MNIST classes."""
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(seed)
    config = ViTConfig(image_size=28, patch_size=4, num_channels=1, hidden_size=64, num_hidden_layers=6,
                       num_attention_heads=4, intermediate_size=128, hidden_dropout_prob=0.0,
                       attention_probs_dropout_prob=0.0, num_labels=len(CLASS_NAMES),
                       id2label=dict(enumerate(CLASS_NAMES)), label2id={n: i for i, n in enumerate(CLASS_NAMES)})
    return ViTForImageClassification(config)


def train(epochs: int, batch_size: int = 128, seed: int = 0):
    (train_x, train_y), _ = train_and_calibration_splits()
    test_x, test_y = load_split("test")
    model = Logits(fashion_vit(seed))

    def adamw(module: nn.Module) -> torch.optim.Optimizer:
        return torch.optim.AdamW(module.parameters(), lr=1e-3, weight_decay=0.05)

    fit(model, {"images": train_x}, train_y, epochs, adamw, max_lr=2e-3, batch_size=batch_size, seed=seed,
        report=lambda _: f"test acc {accuracy(model, {'images': test_x}, test_y):.4f}")
    return model.classifier.eval(), accuracy(model, {"images": test_x}, test_y)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--name", default="fashion_vit")
    args = parser.parse_args()
    torch.set_num_threads(2)
    model, test_accuracy = train(args.epochs)
    model.save_pretrained(ARTIFACTS / args.name)
    print(f"test accuracy {test_accuracy:.4f}; model in {ARTIFACTS / args.name}")


if __name__ == "__main__":
    main()
