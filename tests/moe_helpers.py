"""A tiny MoE language model (seconds to build and run) shared by the tests/test_moe*.py files."""
from __future__ import annotations

import torch

from models.moe_lm import MoEConfig, MoELanguageModel

TINY = MoEConfig(context=48, d_model=32, num_heads=2, num_layers=3, num_experts=8, top_k=2, d_expert=32)


def tiny_model(seed: int = 0) -> MoELanguageModel:
    """Random weights; its routing depends on the token, so decoding uses several experts per layer."""
    torch.manual_seed(seed)
    torch.set_num_threads(1)
    return MoELanguageModel(TINY).eval()
