"""Eager PyTorch front end for text classifiers: early-exit rules applied in PyTorch.

>>> from moco_compile.torch import EarlyExitTextClassificationModel          # doctest: +SKIP
>>> model = EarlyExitTextClassificationModel(bert_classifier)
>>> model.add_rule(rule.condition, 1, "encoder", 0, "attention")   # e.g. from AnalyticsEngine
>>> model.load_plan("out/plan.json")           # or the rules a moco_compile.compile fitted
>>> out = model(**tokenizer(texts, return_tensors="pt", padding=True))
>>> out.logits, out.exits                       # exits[i]: index into model.exit_names, -1 = full

A rule sits at a cut, named as the compiled graph names it (the importer's rule: the outermost module
around the cut's tensor that runs no more after it, numbered ``[k]`` where several cuts share a name):
the embeddings (``bert.embeddings``; GPT-2's ``transformer``, Llama's ``model.embed_tokens``), the
projection of narrower embeddings (ELECTRA's ``electra.embeddings_project``, ALBERT's
``albert.encoder.embedding_hidden_mapping_in``), and in block ``i`` after the attention sub-layer and
after the block output (``bert.encoder.layer.<i>.attention`` and ``bert.encoder.layer.<i>``;
DistilBERT's ``distilbert.transformer.layer.<i>.sa_layer_norm`` and ``distilbert.transformer.layer.<i>``;
GPT-2's ``transformer.h.<i>[0]`` and ``[1]``, Llama's ``model.layers.<i>[0]`` and ``[1]``, whose
residual adds sit inline in the block; ALBERT's shared layer names each call by the innermost module
while the layer runs again later).  :meth:`~EarlyExitTextClassificationModel.add_rule` also takes a
cut as ``("encoder", block, "attention" | "output")`` for every architecture.  The last block's output
is no cut: only the head follows it.  The hidden states there are pooled (mask-aware ``token_mean``,
``first_token``, ``last_token`` (the last token the mask keeps, a decoder's summary), or two joined by
``+``), scored with one linear map and compared with per-class thresholds: exactly the compiled ONNX
graph's exit.  Rows whose best margin is positive leave with the rule's calibrated log-probabilities
as their logits when the plan gave the exit a confidence scale (``passes/calibration/exit_confidence.py``), else
with the margins (either way their argmax is the rule's class);
the other rows continue, compressed, through the remaining layers.  A plan compiled with an
out-of-distribution guard (``ood_guard``) brings each exit's guard: rows it finds unfamiliar
do not leave there (the graph's formula, ``passes/calibration/guard.py``).  A plan of the ``patience``
family routes with agreement: past the first exit a row leaves only with the class it had at the exit
before, as its graph does.

Supported (:data:`EAGER_ARCHITECTURES`, a family each in :mod:`~moco_compile.eager_families`): the
encoders BERT, DistilBERT, RoBERTa, XLM-RoBERTa, ALBERT, ELECTRA, DeBERTa-v2/v3, ModernBERT and the
decoders GPT-2, Llama, Mistral, Qwen2 and Qwen3, which classify the last token the attention mask keeps
(left or right padding), as the compiled graph does: every architecture the importer exports.
"""
from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers.modeling_outputs import SequenceClassifierOutput

from moco_compile.eager_families import EAGER_ARCHITECTURES, FAMILIES, Step, last_tokens
from moco_compile.errors import ModelError
from moco_compile.export_check import check_single_label_head
from moco_compile.passes.graph.cut_points import numbered_repeats, outermost_unused_scope

_NEVER = float(np.finfo(np.float32).max)
_POOLINGS = ("first_token", "token_mean", "last_token")
_MASKED_POOLINGS = ("token_mean", "last_token")  # pieces that read the attention mask


@dataclass
class EarlyExitClassifierOutput(SequenceClassifierOutput):
    """The wrapped model's output plus ``exits``: per row, the index into
    :attr:`EarlyExitTextClassificationModel.exit_names` of the exit it took, -1 for the full network."""

    exits: torch.Tensor | None = None


@dataclass
class _Guard:
    """An exit's out-of-distribution guard (``passes/calibration/guard.py`` ``OODGuard``), in torch."""

    weight: torch.Tensor  # [D, D]
    bias: torch.Tensor  # [D]
    cross_weight: torch.Tensor  # [D, K]
    cross_bias: torch.Tensor  # [K]
    threshold: float

    @classmethod
    def from_dict(cls, data: Mapping) -> "_Guard":
        means = torch.tensor(np.asarray(data["means"], np.float32))
        return cls(torch.tensor(np.asarray(data["weight"], np.float32)),
                   torch.tensor(np.asarray(data["bias"], np.float32)), -2 * means.T.contiguous(),
                   (means * means).sum(dim=1), float(data["threshold"]))

    def unfamiliar(self, features: torch.Tensor) -> torch.Tensor:
        """``[N]`` bool: rows whose distance exceeds the threshold (the graph's ``guard_nodes``)."""
        weight, bias, cross_weight, cross_bias = (t.to(features.device) for t in (
            self.weight, self.bias, self.cross_weight, self.cross_bias))
        whitened = features @ weight + bias
        squared = (whitened * whitened).sum(dim=1, keepdim=True)
        return (whitened @ cross_weight + cross_bias + squared).amin(dim=1) > self.threshold


@dataclass
class _Rule:
    pooling: str
    weight: torch.Tensor  # [D, C], or [H, C] after a hidden layer
    bias: torch.Tensor  # [C]
    thresholds: torch.Tensor  # [C], FLT_MAX where the class is off
    normalize: str  # "none" or "log_softmax" (as in LinearScores)
    guard: _Guard | None = None
    confidence_scale: float | None = None
    hidden: tuple[torch.Tensor, torch.Tensor] | None = None  # an MLP head's [D, H] weight and [H] bias

    def _linear(self, features: torch.Tensor) -> torch.Tensor:
        """``features @ weight`` (through the hidden ReLU layer first when the rule has one)."""
        if self.hidden is not None:
            hidden_weight, hidden_bias = (t.to(features.device) for t in self.hidden)
            features = torch.relu(features @ hidden_weight + hidden_bias)
        return features @ self.weight.to(features.device)

    def margins(self, features: torch.Tensor) -> torch.Tensor:
        """Exactly the compiled graph's margins (see passes/graph/exit_graph.py ``_margin_nodes``); rows the
        guard finds unfamiliar get -FLT_MAX (they never leave by this rule)."""
        bias, thresholds = (t.to(features.device) for t in (self.bias, self.thresholds))
        scores = self._linear(features)
        if self.normalize == "none":  # disabled classes get -FLT_MAX
            margins = scores + torch.where(thresholds < _NEVER, bias - thresholds, torch.full_like(bias, -_NEVER))
        else:
            margins = torch.log_softmax(scores + bias, dim=1) - thresholds
        if self.guard is None:
            return margins
        return torch.where(self.guard.unfamiliar(features)[:, None], torch.full_like(margins, -_NEVER), margins)

    def exited_logits(self, features: torch.Tensor, margins: torch.Tensor) -> torch.Tensor:
        """What rows leaving by this rule carry: its calibrated log-probabilities with the exit's class
        swapped into the top place (the graph's ``exited_logits_nodes``), or the margins when the rule
        has no confidence scale."""
        if self.confidence_scale is None or self.normalize != "log_softmax":
            return margins
        scaled = torch.log_softmax(self._linear(features) + self.bias.to(features.device), dim=1) * self.confidence_scale
        top, cls = scaled.argmax(dim=1, keepdim=True), margins.argmax(dim=1, keepdim=True)
        return scaled.scatter(1, top, scaled.gather(1, cls)).scatter(1, cls, scaled.gather(1, top))


def _scopes(path: str) -> tuple[str, ...]:
    """The modules around the output of the module at ``path``, outermost first, as the export records
    them: every dotted prefix (a container such as ``ModuleList`` is never called, so no scope, but it
    could only be the name of a cut after its last member, the last block's output, which is no cut)."""
    parts = path.split(".")
    return tuple(".".join(parts[:k]) for k in range(1, len(parts) + 1))


def _cut_names(steps: list[Step]) -> list[str]:
    """The compiled graph's name for the cut after each step but the last (after the last block only the
    head runs, far too little to cut before): the importer's rule (``passes/graph/cut_points.py``)."""
    scopes = [_scopes(step.module) for step in steps]
    names = [outermost_unused_scope(own, set().union(*scopes[k + 1:])) for k, own in enumerate(scopes[:-1])]
    return numbered_repeats(names)


class EarlyExitTextClassificationModel(torch.nn.Module):
    """A Hugging Face sequence classifier with early exits (eager; inference only).

    Parameters
    ----------
    model:
        A sequence classifier of one of :data:`EAGER_ARCHITECTURES` (BERT, DistilBERT, RoBERTa,
        XLM-RoBERTa, ALBERT, ELECTRA, DeBERTa-v2/v3, ModernBERT, GPT-2, Llama, Mistral, Qwen2, Qwen3; any
        number of blocks and classes).
    """

    def __init__(self, model: Any) -> None:
        super().__init__()
        architecture = type(model).__name__
        if architecture not in FAMILIES:
            raise ModelError(f"{architecture} is not supported by the eager text API; supported: "
                             f"{', '.join(EAGER_ARCHITECTURES)} (export other models to ONNX and compile them: "
                             "moco.compile)")
        check_single_label_head(model)
        self.model = model.eval()
        self.prefix = model.base_model_prefix  # "bert", "distilbert", "transformer", "model", ...
        self._family = FAMILIES[architecture](model)
        self._steps = self._family.steps()
        self._cuts = dict(zip(_cut_names(self._steps), self._steps))
        self._rules: dict[str, list[_Rule]] = {}
        self.agreement = False  # a loaded plan's routing: past the first exit, leave only with the class had before

    # -- where rules go ------------------------------------------------------------------------
    @property
    def cut_names(self) -> list[str]:
        """Where rules may go, in execution order (the module names the ONNX compile uses)."""
        return list(self._cuts)

    @property
    def exit_names(self) -> list[str]:
        """The cuts that hold rules, in execution order; ``exits`` in the output indexes this list."""
        return [name for name in self.cut_names if name in self._rules]

    def _cut(self, where: str, block: int | None, sublayer: str) -> str:
        if block is not None:
            return self._block_cut(where, block, sublayer)
        stripped = re.sub(r"\.output$", "", where)
        aliases = {"embeddings": self.cut_names[0]}
        for name in (where, stripped, f"{self.prefix}.{stripped}", aliases.get(where)):
            if name in self._cuts:
                return name
        raise ModelError(f"{where!r} is not a cut point of this model; use ('embeddings'), "
                         f"('encoder', block, 'attention' | 'output') or one of {', '.join(self.cut_names)}")

    def _block_cut(self, where: str, block: int, sublayer: str) -> str:
        """The cut after ``sublayer`` of block ``block`` (``where='encoder'`` for every architecture)."""
        if where not in ("encoder", f"{self.prefix}.encoder"):
            raise ModelError(f"a block index goes with where='encoder', not {where!r}")
        blocks = 1 + max(step.block for step in self._steps if step.block is not None)
        if not isinstance(block, (int, np.integer)) or not 0 <= block < blocks:
            raise ModelError(f"block index {block!r} is out of range: this model has blocks 0..{blocks - 1}")
        if sublayer not in ("attention", "output"):
            raise ModelError(f"sublayer must be 'attention' or 'output', got {sublayer!r}")
        name = next((name for name, step in self._cuts.items() if (step.block, step.sublayer) == (block, sublayer)),
                    None)
        if name is None:
            raise ModelError(f"block {block}'s output is the last state before the head, not a cut; "
                             "use its 'attention' sub-layer or an earlier block")
        return name

    # -- rules ---------------------------------------------------------------------------------
    def add_rule(self, condition: Any, cls: int, where: str = "encoder", block: int | None = None,
                 sublayer: str = "output", *, pooling: str = "token_mean") -> "EarlyExitTextClassificationModel":
        """Exit rows as class ``cls`` at a cut where ``pool(h) @ weights + bias > threshold``.

        ``condition``: a :class:`~moco_compile.analytics.LinearCondition`, a
        :class:`~moco_compile.analytics.SufficientRule` (its condition), or a mapping with
        ``weights``, ``bias``, ``threshold``.  The cut: ``("embeddings")``,
        ``("encoder", block, "attention" | "output")`` or a module name.  ``pooling``:
        ``token_mean`` (over the attention mask), ``first_token``, ``last_token`` (the last token the
        mask keeps: a decoder's summary) or two joined by ``+``;
        it must be how the condition's features were pooled.  Several rules may share a cut;
        the row takes the class with the largest margin ``score - threshold``.
        """
        condition = getattr(condition, "condition", condition)
        if isinstance(condition, Mapping):
            missing = [k for k in ("weights", "bias", "threshold") if k not in condition]
            if missing:
                raise ModelError(f"a condition needs weights, bias and threshold; missing {', '.join(missing)}")
            weights, bias, threshold = condition["weights"], condition["bias"], condition["threshold"]
        elif all(hasattr(condition, k) for k in ("weights", "bias", "threshold")):
            weights, bias, threshold = condition.weights, condition.bias, condition.threshold
        else:
            raise ModelError(f"condition must be a LinearCondition, a SufficientRule or a mapping with weights, "
                             f"bias and threshold; got {type(condition).__name__}")
        classes = self.model.config.num_labels
        if not isinstance(cls, (int, np.integer)) or not 0 <= cls < classes:
            raise ModelError(f"cls must be a class index in 0..{classes - 1}, got {cls!r}")
        weights = np.asarray(weights, np.float32).reshape(-1)
        weight = np.zeros((len(weights), classes), np.float32)
        weight[:, cls] = weights
        biases = np.zeros(classes, np.float32)
        biases[cls] = float(bias)
        thresholds = np.full(classes, np.inf, np.float32)
        thresholds[cls] = float(threshold)
        self._add(self._cut(where, block, sublayer), weight, biases, thresholds, pooling, "none")
        return self

    def _add(self, cut: str, weight: Any, bias: Any, thresholds: Any, pooling: str, normalize: str,
             guard: Mapping | None = None, confidence_scale: float | None = None,
             hidden: tuple[Any, Any] | None = None) -> None:
        pooling = "+".join(f"{p}@attention_mask" if p in _MASKED_POOLINGS else p for p in pooling.split("+"))
        if any(p.split("@")[0] not in _POOLINGS for p in pooling.split("+")):
            raise ModelError(f"pooling {pooling!r}: use first_token, token_mean, last_token or two joined by '+'")
        weight = np.asarray(weight, np.float32)
        bias = np.asarray(bias, np.float32)
        thresholds = np.asarray([np.inf if t is None else t for t in np.atleast_1d(thresholds)], np.float32)
        classes = self.model.config.num_labels
        width = self._width(cut) * len(pooling.split("+"))
        if hidden is not None:
            hidden = tuple(np.asarray(t, np.float32) for t in hidden)
            if hidden[0].shape != (width, len(hidden[1])) or hidden[1].ndim != 1:
                raise ModelError(f"rule at {cut} with pooling {pooling}: the hidden layer's weights must be "
                                 f"[{width}, H] and its bias [H]; got {hidden[0].shape} and {hidden[1].shape}")
            width = len(hidden[1])
        if weight.shape != (width, classes) or bias.shape != (classes,) or thresholds.shape != (classes,):
            raise ModelError(f"rule at {cut} with pooling {pooling}: weights must be [{width}, {classes}], bias and "
                             f"thresholds [{classes}]; got {weight.shape}, {bias.shape}, {thresholds.shape}")
        if normalize not in ("none", "log_softmax"):
            raise ModelError(f"rule at {cut}: normalize must be 'none' or 'log_softmax', got {normalize!r}")
        thresholds = np.where(np.isfinite(thresholds), thresholds, _NEVER).astype(np.float32)
        self._rules.setdefault(cut, []).append(
            _Rule(pooling, torch.from_numpy(weight), torch.from_numpy(bias), torch.from_numpy(thresholds), normalize,
                  None if guard is None else _Guard.from_dict(guard), confidence_scale,
                  None if hidden is None else tuple(torch.from_numpy(t) for t in hidden)))

    def _width(self, cut: str) -> int:
        """Features per token at ``cut``: ELECTRA's and ALBERT's embeddings may be narrower than their blocks."""
        return self._cuts[cut].width

    def load_plan(self, plan: str | os.PathLike | Mapping | Any) -> "EarlyExitTextClassificationModel":
        """Add the rules of a compile's ``plan.json`` (a path, its parsed dict, or an ``ExitPlan``)."""
        if isinstance(plan, (str, os.PathLike)):
            plan = json.loads(Path(plan).read_text())
        exits = plan["exits"] if isinstance(plan, Mapping) else [e.to_dict() for e in plan.exits]
        self.agreement = bool(plan.get("agreement", False) if isinstance(plan, Mapping) else plan.agreement)
        for exit_ in exits:
            if not exit_.get("module"):
                raise ModelError(f"exit at tensor {exit_.get('cut')!r} has no module name; compile the model "
                                 "from a file exported with module scopes (export_hf_sequence_classifier)")
            self._add(self._cut(exit_["module"], None, ""), exit_["weight"], exit_["bias"], exit_["thresholds"],
                      exit_["pooling"], exit_.get("normalize", "none"), exit_.get("guard"),
                      exit_.get("confidence_scale"),
                      None if exit_.get("hidden_weight") is None else (exit_["hidden_weight"], exit_["hidden_bias"]))
        return self

    # -- running --------------------------------------------------------------------------------
    @torch.no_grad()
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None) -> EarlyExitClassifierOutput:
        """Run like the wrapped model; exited rows carry their rule's margins as logits.

        ``token_type_ids`` reach the encoders that take them (BERT, RoBERTa, ALBERT, ELECTRA); the
        others, like their compiled graphs, read none."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        order = {name: k for k, name in enumerate(self.exit_names)}
        rows = torch.arange(input_ids.shape[0], device=input_ids.device)
        logits = torch.zeros(input_ids.shape[0], self.model.config.num_labels, device=input_ids.device)
        exits = torch.full((input_ids.shape[0],), -1, dtype=torch.int64, device=input_ids.device)
        mask = attention_mask
        before = torch.full_like(exits, -1)  # each row's class at the last exit it passed (-1: none yet)

        def check(name: str, hidden: torch.Tensor, mask: torch.Tensor, rows: torch.Tensor):
            rules = self._rules.get(name)
            if not rules or not len(rows):
                return hidden, mask, rows
            features = [_pool(hidden, mask, rule.pooling) for rule in rules]
            margins = torch.stack([rule.margins(f) for rule, f in zip(rules, features)]).amax(0)
            fired = margins.max(dim=1).values > 0
            if self.agreement:  # as the compiled graph: the rows' class must be the one they had at the exit before
                classes = margins.argmax(dim=1)
                fired &= (classes == before[rows]) | (before[rows] < 0)
                before[rows] = classes
            exited = rules[0].exited_logits(features[0], margins) if len(rules) == 1 else margins
            logits[rows[fired]] = exited[fired]
            exits[rows[fired]] = order[name]
            keep = ~fired
            return hidden[keep], mask[keep], rows[keep]

        hidden = self._steps[0].run(input_ids, token_type_ids, mask)
        for name, step in zip(self._cuts, self._steps[1:]):  # each cut, then the step after it
            hidden, mask, rows = check(name, hidden, mask, rows)
            if not len(rows):
                break
            hidden = step.run(hidden, mask)
        if len(rows):
            logits[rows] = self._family.head(hidden, mask).float()
        return EarlyExitClassifierOutput(logits=logits, exits=exits)


def _pool(hidden: torch.Tensor, mask: torch.Tensor, pooling: str) -> torch.Tensor:
    parts = []
    for piece in pooling.split("+"):
        kind = piece.split("@")[0]
        if kind == "first_token":
            parts.append(hidden[:, 0].float())
        elif kind == "last_token":
            parts.append(last_tokens(hidden, mask).float())
        else:
            weights = mask.float().unsqueeze(-1)
            parts.append((hidden.float() * weights).sum(1) / weights.sum(1).clamp(min=1.0))
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)
