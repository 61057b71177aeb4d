"""Running a mixture-of-experts decoder block by block, with the experts supplied by the caller.

The model protocol (what ``models/moe_lm.py`` defines; any model shaped so works):

* ``model.embed_at(tokens, start)`` -> the residual stream ``[B, T, D]`` entering block 0;
* ``model.blocks``: blocks with ``norm1``, ``attention(x, kv)`` (appends to the ``[k, v]``
  list ``kv``), ``norm2`` and ``moe``; ``moe`` has ``gate`` (a linear map to expert
  logits), ``experts`` (a list of modules), ``route(x)`` -> ``(probs, chosen, weights)``
  and ``combine(x, chosen, weights, experts)``;
* ``model.logits(x)`` -> next-token logits from the last residual stream.

:func:`forward_tokens` runs the blocks and calls ``moe_step(layer, residual, normed)``
for each MoE block, so a tracer can record what enters it and an offloading runtime
can fetch the experts it routes to.  The hidden state of a layer, as traced and as
predictors see it, is ``residual``: the residual stream entering its MoE block.
"""
from __future__ import annotations

from collections.abc import Callable

import torch

from moco_compile.errors import NoMoELayersError

MoEStep = Callable[[int, torch.Tensor, torch.Tensor], torch.Tensor]
Observe = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], None]
_MOE_PARTS = ("gate", "experts", "route", "combine")


def moe_blocks(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The MoE modules of ``model``'s blocks, in order; :class:`NoMoELayersError` if it has none
    or if some block is not routed (this runtime offloads every layer's experts)."""
    blocks = list(getattr(model, "blocks", None) or [])
    layers = [getattr(block, "moe", None) for block in blocks]
    routed = [layer is not None and all(hasattr(layer, part) for part in _MOE_PARTS) for layer in layers]
    if not blocks or not any(routed):
        raise NoMoELayersError(
            f"{type(model).__name__} has no mixture-of-experts layers: moco moe needs a decoder whose "
            f"`blocks` each hold a `moe` module with {', '.join(_MOE_PARTS)} (as models/moe_lm.py). A dense "
            "model has no experts to offload or prefetch; serve it as it is")
    if not all(routed):
        dense = [index for index, ok in enumerate(routed) if not ok]
        raise NoMoELayersError(f"blocks {dense} of {type(model).__name__} have no routed `moe` module; "
                               "moco moe needs every block to be a mixture of experts")
    return layers


def reference_step(model: torch.nn.Module, observe: Observe | None = None) -> MoEStep:
    """The model's own MoE computation (all experts resident); ``observe(layer, residual, probs, chosen)``,
    if given, sees each MoE layer's input, gate probabilities ``[T, E]`` and chosen experts ``[T, k]``."""
    layers = moe_blocks(model)

    def step(layer: int, residual: torch.Tensor, normed: torch.Tensor) -> torch.Tensor:
        moe = layers[layer]
        probs, chosen, weights = moe.route(normed)
        if observe is not None:
            observe(layer, residual, probs, chosen)
        return moe.combine(normed, chosen, weights, moe.experts)

    return step


def new_kv(model: torch.nn.Module) -> list[list[torch.Tensor]]:
    """An empty key/value cache: one ``[k, v]`` list per block."""
    return [[] for _ in model.blocks]


def forward_tokens(model: torch.nn.Module, tokens: torch.Tensor, kv: list[list[torch.Tensor]],
                   moe_step: MoEStep) -> torch.Tensor:
    """Logits ``[B, T, V]`` for ``tokens`` ``[B, T]`` appended after what ``kv`` holds.

    Several tokens at once only on an empty ``kv`` (a prompt or a calibration window).
    """
    start = kv[0][0].shape[2] if kv[0] else 0
    x = model.embed_at(tokens, start)
    for layer, block in enumerate(model.blocks):
        x = x + block.attention(block.norm1(x), kv[layer])
        residual = x.flatten(0, 1)
        x = x + moe_step(layer, residual, block.norm2(residual)).view_as(x)
    return model.logits(x)


def greedy_decode(model: torch.nn.Module, prompt: torch.Tensor, steps: int, moe_step: MoEStep,
                  on_token: Callable[[], None] | None = None) -> tuple[list[int], torch.Tensor]:
    """Greedy continuation of ``prompt`` (``[T]`` token ids) by ``steps`` tokens, one token per
    forward after the prompt; the tokens and the logits of every step ``[steps, V]``.
    ``on_token`` is called after each generated token (timing, progress)."""
    kv = new_kv(model)
    tokens, logits = [], []
    with torch.no_grad():
        step_logits = forward_tokens(model, prompt[None], kv, moe_step)[0, -1]
        for _ in range(steps):
            token = int(step_logits.argmax())
            tokens.append(token)
            logits.append(step_logits)
            if on_token is not None:
                on_token()
            step_logits = forward_tokens(model, torch.tensor([[token]]), kv, moe_step)[0, -1]
    return tokens, torch.stack(logits)
