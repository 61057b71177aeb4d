"""The shipped reference mixture-of-experts language model: a small byte-level decoder with top-k routed experts.

Structure (pre-norm decoder, ``MoEConfig`` sets the sizes)::

    bytes -> embedding + learned positions
          -> [ x += attention(norm(x));  x += MoE(norm(x)) ] x num_layers
          -> norm -> tied output embedding -> next-byte logits

Each MoE block routes a token to ``top_k`` of ``num_experts`` feed-forward experts
(gate: one linear map, softmax, top-k, weights renormalised over the chosen
experts) and adds a Switch-style load-balancing loss while training.  Attention can
append to a key/value cache (a ``[k, v]`` list per layer), so a decoding step runs each
layer's experts for one token only: the setting of expert offloading
(:mod:`moco_compile.runtime.moe.decode` drives the blocks).

The class lives in the installed package so that ``torch.save(model, path)`` of it loads
anywhere moco is installed.  The trained weights ship as package data
(``reference/moe_lm.pt``: configuration and float16 weights, written by
``models/train_moe_lm.py``), with a sample of its held-out calibration text and a prompt
set (``reference/moe_lm.calibration.txt``, ``reference/moe_lm.prompts.txt``), so that
``moco moe ... --reference moe_lm`` runs from a plain install.
"""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from moco_compile.errors import ModelError

REFERENCE_DIR = Path(__file__).resolve().parent / "reference"
REFERENCES = ("moe_lm",)
WEIGHTS = REFERENCE_DIR / "moe_lm.pt"


@dataclass(frozen=True)
class MoEConfig:
    """Sizes of a :class:`MoELanguageModel`."""

    vocab_size: int = 256
    context: int = 128
    d_model: int = 128
    num_heads: int = 4
    num_layers: int = 4
    num_experts: int = 8
    top_k: int = 2
    d_expert: int = 192


class Expert(nn.Module):
    """A feed-forward expert: ``w2(gelu(w1(x)))``."""

    def __init__(self, d_model: int, d_expert: int) -> None:
        super().__init__()
        self.w1 = nn.Linear(d_model, d_expert)
        self.w2 = nn.Linear(d_expert, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.gelu(self.w1(x)))


class MoELayer(nn.Module):
    """Top-k routed experts.  ``route`` and ``combine`` are separate so a runtime can supply
    the expert modules itself (e.g. copies in a device cache)."""

    def __init__(self, config: MoEConfig) -> None:
        super().__init__()
        self.top_k = config.top_k
        self.gate = nn.Linear(config.d_model, config.num_experts, bias=False)
        self.experts = nn.ModuleList(Expert(config.d_model, config.d_expert) for _ in range(config.num_experts))

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Gate probabilities ``[T, E]``, the chosen experts ``[T, k]`` and their renormalised weights."""
        probs = torch.softmax(self.gate(x), dim=-1)
        weights, chosen = probs.topk(self.top_k, dim=-1)
        return probs, chosen, weights / weights.sum(-1, keepdim=True)

    def combine(self, x: torch.Tensor, chosen: torch.Tensor, weights: torch.Tensor, experts) -> torch.Tensor:
        """``sum_j weights[:, j] * experts[chosen[:, j]](x)`` for tokens ``x`` ``[T, D]``."""
        out = torch.zeros_like(x)
        for expert in chosen.unique().tolist():
            rows, slot = (chosen == expert).nonzero(as_tuple=True)
            out.index_add_(0, rows, experts[expert](x[rows]) * weights[rows, slot, None])
        return out

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Output, chosen experts and the load-balancing loss for tokens ``x`` ``[T, D]``."""
        probs, chosen, weights = self.route(x)
        load = F.one_hot(chosen, probs.shape[-1]).float().sum(1).mean(0) / self.top_k
        balance = probs.shape[-1] * (load * probs.mean(0)).sum()
        return self.combine(x, chosen, weights, self.experts), chosen, balance


class Attention(nn.Module):
    """Causal multi-head self-attention that can append to a key/value cache."""

    def __init__(self, config: MoEConfig) -> None:
        super().__init__()
        self.heads = config.num_heads
        self.qkv = nn.Linear(config.d_model, 3 * config.d_model)
        self.out = nn.Linear(config.d_model, config.d_model)

    def forward(self, x: torch.Tensor, cache: list[torch.Tensor] | None = None) -> torch.Tensor:
        batch, length, width = x.shape
        q, k, v = (part.view(batch, length, self.heads, -1).transpose(1, 2)
                   for part in self.qkv(x).split(width, dim=-1))
        if cache is not None:
            if cache:
                k, v = torch.cat([cache[0], k], dim=2), torch.cat([cache[1], v], dim=2)
            cache[:] = [k, v]
        y = F.scaled_dot_product_attention(q, k, v, is_causal=cache is None or length > 1)
        return self.out(y.transpose(1, 2).reshape(batch, length, width))


class Block(nn.Module):
    """``x += attention(norm(x)); x += moe(norm(x))``."""

    def __init__(self, config: MoEConfig) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(config.d_model)
        self.attention = Attention(config)
        self.norm2 = nn.LayerNorm(config.d_model)
        self.moe = MoELayer(config)


class MoELanguageModel(nn.Module):
    """Byte-level decoder whose feed-forward blocks are mixtures of experts."""

    def __init__(self, config: MoEConfig) -> None:
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.d_model)
        self.position = nn.Embedding(config.context, config.d_model)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.num_layers))
        self.norm = nn.LayerNorm(config.d_model)
        for embedding in (self.embed, self.position):  # tied output: unit-scale rows give logits of std ~11
            nn.init.normal_(embedding.weight, std=0.02)

    def forward(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Logits ``[B, T, V]``, chosen experts ``[L, B*T, k]`` and the mean load-balancing loss."""
        x = self.embed_at(tokens)
        chosen, balance = [], []
        for block in self.blocks:
            x = x + block.attention(block.norm1(x))
            moe_out, experts, loss = block.moe(block.norm2(x).flatten(0, 1))
            x = x + moe_out.view_as(x)
            chosen.append(experts)
            balance.append(loss)
        return self.logits(x), torch.stack(chosen), torch.stack(balance).mean()

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Next-byte logits from the last residual stream."""
        return self.norm(x) @ self.embed.weight.T

    def embed_at(self, tokens: torch.Tensor, start: int = 0) -> torch.Tensor:
        """The residual stream ``[B, T, D]`` entering block 0 for ``tokens`` at positions ``start, ...``."""
        return self.embed(tokens) + self.position(torch.arange(start, start + tokens.shape[1], device=tokens.device))


def reference_file(name: str, kind: str) -> Path:
    """The shipped file of reference ``name``: ``kind`` is ``weights``, ``calibration`` or ``prompts``
    (:class:`ModelError` for an unknown name)."""
    if name not in REFERENCES:
        raise ModelError(f"unknown reference model {name!r}; moco ships {', '.join(REFERENCES)}")
    return REFERENCE_DIR / (f"{name}.pt" if kind == "weights" else f"{name}.{kind}.txt")


def is_saved_reference(saved: object) -> bool:
    """Whether ``saved`` (what ``torch.load`` returned) is what :func:`save_model` writes."""
    return isinstance(saved, dict) and set(saved) == {"config", "state"}


def save_model(model: MoELanguageModel, path: str | os.PathLike = WEIGHTS) -> None:
    """Write the configuration and float16 weights."""
    state = {name: value.half() for name, value in model.state_dict().items()}
    torch.save({"config": asdict(model.config), "state": state}, path)


def load_model(path: str | os.PathLike = WEIGHTS) -> MoELanguageModel:
    """The reference model (float32 computation on the saved float16 weights), in eval mode."""
    return from_saved(torch.load(path, map_location="cpu", weights_only=True))


def from_saved(saved: dict) -> MoELanguageModel:
    """The model in what :func:`save_model` wrote (``torch.load``'s result), in eval mode."""
    model = MoELanguageModel(MoEConfig(**saved["config"]))
    model.load_state_dict({name: value.float() for name, value in saved["state"].items()})
    return model.eval()
