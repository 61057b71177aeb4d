"""Eager PyTorch front end for text models: the compiled graph's exit rules, applied in PyTorch.

>>> model = EarlyExitTextClassificationModel(bert_classifier)                # doctest: +SKIP
>>> model.load_plan("out/plan.json")       # the rules a ``moco_compile.compile`` fitted
>>> logits, exits = model(input_ids, attention_mask, token_type_ids)

The rules are the ones in ``plan.json`` (one format for both front ends): at a cut
(``bert.embeddings``, ``bert.encoder.layer.<i>.attention``, ``bert.encoder.layer.<i>``)
the hidden states are pooled (``first_token``, mask-aware ``token_mean``, or both
concatenated), scored with one linear map (optionally ``log_softmax``-normalised) and
compared with per-class thresholds.
Rows whose best margin is positive leave with the margins as their logits (so their
argmax is the rule's class, exactly like the compiled ONNX graph); the other rows
continue, compressed, through the remaining layers.  ``exits`` holds the exit index
per row (-1: full network), numbered like ``moco_exit``.

Supported: ``BertForSequenceClassification`` (the architectures the importer supports).
"""
from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from moco_compile.errors import ModelError
from moco_compile.importer import SUPPORTED_HF_ARCHITECTURES

_NEVER = float(np.finfo(np.float32).max)


@dataclass
class _Rule:
    module: str
    pooling: str
    weight: torch.Tensor  # [D, C]
    bias: torch.Tensor  # [C]
    thresholds: torch.Tensor  # [C], FLT_MAX where the class is off
    normalize: str  # "none" or "log_softmax" (as in LinearScores)

    def margins(self, features: torch.Tensor) -> torch.Tensor:
        """Exactly the compiled graph's margins (see passes/rewrite.py ``_margin_nodes``)."""
        scores = features @ self.weight
        if self.normalize == "none":  # thresholds folded into the bias; disabled classes -FLT_MAX
            offset = torch.where(self.thresholds < _NEVER, self.bias - self.thresholds,
                                 torch.full_like(self.bias, -_NEVER))
            return scores + offset
        return torch.log_softmax(scores + self.bias, dim=1) - self.thresholds


class EarlyExitTextClassificationModel(torch.nn.Module):
    """A Hugging Face sequence classifier with early exits (eager; inference only)."""

    def __init__(self, model: Any) -> None:
        super().__init__()
        architecture = type(model).__name__
        if architecture not in SUPPORTED_HF_ARCHITECTURES:
            raise ModelError(f"{architecture} is not supported by the eager text API; supported: "
                             f"{', '.join(SUPPORTED_HF_ARCHITECTURES)}")
        self.model = model.eval()
        self.rules: dict[str, _Rule] = {}

    # -- rules ---------------------------------------------------------------------------------
    def cut_names(self) -> list[str]:
        """Where rules may go, in execution order (names as in the ONNX export's plan)."""
        names = ["bert.embeddings"]
        for i in range(len(self.model.bert.encoder.layer)):
            names += [f"bert.encoder.layer.{i}.attention", f"bert.encoder.layer.{i}"]
        return names

    def add_rule(self, module: str, weight: Any, bias: Any, thresholds: Any,
                 pooling: str = "token_mean@attention_mask", normalize: str = "none") -> None:
        """Exit at ``module`` when ``max_c(scores_c - thresholds_c) > 0``, where
        ``scores = pool(h) @ weight + bias`` (then ``log_softmax`` with ``normalize="log_softmax"``).

        ``weight`` is ``[features, classes]``; a threshold of ``None``/``inf`` turns a class off.
        ``pooling``: ``first_token``, ``token_mean@attention_mask`` or both joined by ``+``.
        """
        names = self.cut_names()
        if module not in names and f"bert.{module}" in names:
            module = f"bert.{module}"
        if module not in names:
            raise ModelError(f"{module!r} is not a cut point of this model; choose one of {', '.join(names)}")
        for piece in pooling.split("+"):
            if piece.split("@")[0] not in ("first_token", "token_mean"):
                raise ModelError(f"pooling {pooling!r}: pieces must be first_token or token_mean@<mask>")
        weight = torch.as_tensor(np.asarray(weight, np.float32))
        bias = np.asarray(bias, np.float32)
        thresholds = np.asarray([np.inf if t is None else t for t in np.atleast_1d(thresholds)], np.float32)
        classes = self.model.config.num_labels
        if weight.ndim != 2 or weight.shape[1] != classes or bias.shape != (classes,) or thresholds.shape != (classes,):
            raise ModelError(f"rule at {module}: weight must be [features, {classes}], bias and thresholds "
                             f"[{classes}]; got {tuple(weight.shape)}, {bias.shape}, {thresholds.shape}")
        if normalize not in ("none", "log_softmax"):
            raise ModelError(f"rule at {module}: normalize must be 'none' or 'log_softmax', got {normalize!r}")
        thresholds = np.where(np.isfinite(thresholds), thresholds, _NEVER).astype(np.float32)
        self.rules[module] = _Rule(module, pooling, weight, torch.from_numpy(bias), torch.from_numpy(thresholds),
                                   normalize)

    def load_plan(self, plan: str | os.PathLike | Mapping | Any) -> "EarlyExitTextClassificationModel":
        """Add the rules of a compile's ``plan.json`` (a path, its parsed dict, or an ``ExitPlan``)."""
        if isinstance(plan, (str, os.PathLike)):
            plan = json.loads(Path(plan).read_text())
        exits = plan["exits"] if isinstance(plan, Mapping) else [e.to_dict() for e in plan.exits]
        for exit_ in exits:
            if not exit_.get("module"):
                raise ModelError(f"exit at tensor {exit_.get('cut')!r} has no module name; compile the model "
                                 "from a file exported with module scopes (export_hf_sequence_classifier)")
            self.add_rule(exit_["module"], exit_["weight"], exit_["bias"], exit_["thresholds"], exit_["pooling"],
                          exit_.get("normalize", "none"))
        return self

    # -- running --------------------------------------------------------------------------------
    @torch.no_grad()
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                token_type_ids: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(logits [N, C], exits [N])``; exited rows carry the rule's margins as logits."""
        bert = self.model.bert
        order = {name: k for k, name in enumerate(n for n in self.cut_names() if n in self.rules)}
        rows = torch.arange(input_ids.shape[0])
        logits = torch.zeros(input_ids.shape[0], self.model.config.num_labels)
        exits = torch.full((input_ids.shape[0],), -1, dtype=torch.int64)
        mask = attention_mask
        hidden = bert.embeddings(input_ids=input_ids, token_type_ids=token_type_ids)

        def check(name: str, hidden: torch.Tensor, mask: torch.Tensor, rows: torch.Tensor):
            rule = self.rules.get(name)
            if rule is None or not len(rows):
                return hidden, mask, rows
            margins = rule.margins(_pool(hidden, mask, rule.pooling))
            fired = margins.max(dim=1).values > 0
            logits[rows[fired]] = margins[fired]
            exits[rows[fired]] = order[name]
            keep = ~fired
            return hidden[keep], mask[keep], rows[keep]

        hidden, mask, rows = check("bert.embeddings", hidden, mask, rows)
        for i, layer in enumerate(bert.encoder.layer):
            if not len(rows):
                break
            extended = _extended_mask(bert, mask, hidden)
            attention = layer.attention(hidden, extended)[0]
            attention, mask, rows = check(f"bert.encoder.layer.{i}.attention", attention, mask, rows)
            if not len(rows):
                break
            hidden = layer.feed_forward_chunk(attention)
            hidden, mask, rows = check(f"bert.encoder.layer.{i}", hidden, mask, rows)
        if len(rows):
            pooled = bert.pooler(hidden) if bert.pooler is not None else hidden[:, 0]
            logits[rows] = self.model.classifier(self.model.dropout(pooled)).float()
        return logits, exits


def _pool(hidden: torch.Tensor, mask: torch.Tensor, pooling: str) -> torch.Tensor:
    parts = []
    for piece in pooling.split("+"):
        if piece == "first_token":
            parts.append(hidden[:, 0].float())
        else:
            weights = mask.float().unsqueeze(-1)
            parts.append((hidden.float() * weights).sum(1) / weights.sum(1).clamp(min=1.0))
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)


def _extended_mask(bert: Any, mask: torch.Tensor, hidden: torch.Tensor) -> Any:
    """The attention mask in the form the layers take (transformers 5, or 4's extended mask)."""
    if hasattr(bert, "_create_attention_masks"):
        return bert._create_attention_masks(attention_mask=mask, encoder_attention_mask=None,
                                            embedding_output=hidden, encoder_hidden_states=None, cache=None)[0]
    return bert.get_extended_attention_mask(mask, mask.shape)
