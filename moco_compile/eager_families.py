"""Architecture families of the eager text API (:mod:`moco_compile.torch`): how each Hugging Face
classifier runs in the steps the compiled graph cuts between, and its head.

One :class:`Family` per architecture family (:data:`FAMILIES`): the encoders BERT, DistilBERT,
RoBERTa, XLM-RoBERTa, ALBERT, ELECTRA, DeBERTa-v2/v3, ModernBERT and the decoders GPT-2, Llama, Mistral,
Qwen2 and Qwen3: every architecture the importer exports.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
from transformers.masking_utils import (create_bidirectional_mask, create_bidirectional_sliding_window_mask,
                                        create_causal_mask, create_sliding_window_causal_mask)

from moco_compile.errors import ModelError

StepRun = Callable[..., torch.Tensor]


@dataclass(frozen=True)
class Step:
    """A stretch of the network that ends where the compiled graph may cut.

    ``module``: the innermost module whose forward writes the step's output (the cut's scope in the
    export); ``width``: features per token there; ``block`` and ``sublayer`` (``"attention"`` or
    ``"output"``): which half of which block it is, None for the embeddings and their projection.
    """

    module: str
    run: StepRun
    width: int
    block: int | None = None
    sublayer: str = ""


def block_steps(block: int, width: int, attention: tuple[str, StepRun], output: tuple[str, StepRun]) -> list[Step]:
    """A block's two steps: up to its attention sub-layer's output, then up to the block's output."""
    return [Step(*attention, width, block, "attention"), Step(*output, width, block, "output")]


def per_token(module: Callable[[torch.Tensor], torch.Tensor], hidden: torch.Tensor,
               mask: torch.Tensor) -> torch.Tensor:
    """A step that maps each token on its own (a projection), whatever the mask."""
    return module(hidden)


class Family:
    """How one architecture family runs eagerly, in the steps the compiled graph cuts between.

    :meth:`steps`: the embeddings first (run on ``input_ids, token_type_ids, mask``), then any projection
    and each block's two halves in execution order (run on ``hidden, mask``: the rows still running);
    :meth:`head`: the logits from the last step's states.
    """

    def __init__(self, model: Any) -> None:
        self.model = model
        self.base = model.base_model
        self.prefix = model.base_model_prefix

    def steps(self) -> list[Step]:
        raise NotImplementedError

    def _layer_steps(self, layers: Any, path: str, attention: str = "", output: str = "") -> list[Step]:
        """Both steps of each of ``layers`` (blocks ``<path>.<i>``), run by ``_attention`` and ``_feed_forward``;
        ``attention`` / ``output``: the module in the block whose forward writes that half's output ("": the
        block adds it to its input inline, so both halves take the block's name)."""
        width, steps = self.model.config.hidden_size, []
        for i, layer in enumerate(layers):
            module = [".".join(filter(None, (f"{path}.{i}", inner))) for inner in (attention, output)]
            steps += block_steps(i, width, (module[0], partial(self._attention, layer)),
                                 (module[1], partial(self._feed_forward, layer)))
        return steps

    def head(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class _Encoder(Family):
    """Encoders: every token attends to every token the mask keeps."""

    def _mask(self, hidden: torch.Tensor, mask: torch.Tensor) -> Any:
        return create_bidirectional_mask(config=self.base.config, inputs_embeds=hidden, attention_mask=mask)

    def _embed(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor | None, mask: torch.Tensor) -> torch.Tensor:
        return self.base.embeddings(input_ids=input_ids, token_type_ids=token_type_ids)


class _BertLike(_Encoder):
    """RoBERTa and ELECTRA (and BERT's blocks): ``encoder.layer.<i>`` runs ``attention``, then a
    feed-forward chunk; ELECTRA projects narrower embeddings up (``embeddings_project``); the
    classifier reads token 0 itself."""

    def steps(self) -> list[Step]:
        p, base, width = self.prefix, self.base, self.model.config.hidden_size
        steps = [Step(f"{p}.embeddings.LayerNorm", self._embed, base.embeddings.LayerNorm.normalized_shape[-1])]
        if hasattr(base, "embeddings_project"):
            steps.append(Step(f"{p}.embeddings_project", partial(per_token, base.embeddings_project), width))
        return steps + self._layer_steps(base.encoder.layer, f"{p}.encoder.layer", "attention.output.LayerNorm",
                                         "output.LayerNorm")

    def _attention(self, layer: Any, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return layer.attention(hidden, self._mask(hidden, mask))[0]

    def _feed_forward(self, layer: Any, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return layer.feed_forward_chunk(hidden)

    def head(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.model.classifier(hidden)


class _Bert(_BertLike):
    """BERT: the head reads the pooler's output (token 0 when the model has no pooler)."""

    def head(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        pooler = self.base.pooler
        pooled = pooler(hidden) if pooler is not None else hidden[:, 0]
        return self.model.classifier(self.model.dropout(pooled))


class _DistilBert(_Encoder):
    """DistilBERT: ``transformer.layer.<i>`` adds attention and feed-forward outputs to their inputs
    inside the block (``sa_layer_norm``, ``output_layer_norm``); the head is ``pre_classifier``, ReLU,
    ``classifier`` on token 0; no token types."""

    def steps(self) -> list[Step]:
        p = self.prefix
        return [Step(f"{p}.embeddings.LayerNorm", self._embed, self.model.config.hidden_size),
                *self._layer_steps(self.base.transformer.layer, f"{p}.transformer.layer", "sa_layer_norm",
                                   "output_layer_norm")]

    def _embed(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor | None, mask: torch.Tensor) -> torch.Tensor:
        return self.base.embeddings(input_ids)

    def _attention(self, layer: Any, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return layer.sa_layer_norm(layer.attention(hidden, attention_mask=self._mask(hidden, mask))[0] + hidden)

    def _feed_forward(self, layer: Any, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return layer.output_layer_norm(layer.ffn(hidden) + hidden)

    def head(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        pooled = torch.relu(self.model.pre_classifier(hidden[:, 0]))
        return self.model.classifier(self.model.dropout(pooled))


class _Albert(_Encoder):
    """ALBERT: narrower embeddings projected up (``encoder.embedding_hidden_mapping_in``), then
    ``num_hidden_layers`` runs of a layer group (``num_hidden_groups`` groups share them in order), each
    run through the group's ``albert_layers``: one block per layer run, weights shared across runs."""

    def steps(self) -> list[Step]:
        p, config, encoder = self.prefix, self.model.config, self.base.encoder
        width = config.hidden_size
        projection = encoder.embedding_hidden_mapping_in
        steps = [Step(f"{p}.embeddings.LayerNorm", self._embed, config.embedding_size),
                 Step(f"{p}.encoder.embedding_hidden_mapping_in", partial(per_token, projection), width)]
        for run in range(config.num_hidden_layers):
            group = int(run / (config.num_hidden_layers / config.num_hidden_groups))  # AlbertTransformer's choice
            layers = encoder.albert_layer_groups[group].albert_layers
            for j, layer in enumerate(layers):
                path = f"{p}.encoder.albert_layer_groups.{group}.albert_layers.{j}"
                steps += block_steps(run * len(layers) + j, width,
                                (f"{path}.attention.LayerNorm", partial(self._attention, layer)),
                                (f"{path}.full_layer_layer_norm", partial(self._feed_forward, layer)))
        return steps

    def _attention(self, layer: Any, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return layer.attention(hidden, self._mask(hidden, mask))[0]

    def _feed_forward(self, layer: Any, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return layer.full_layer_layer_norm(layer.ff_chunk(hidden) + hidden)

    def head(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        pooled = self.base.pooler_activation(self.base.pooler(hidden[:, 0]))
        return self.model.classifier(self.model.dropout(pooled))


class _DebertaV2(_Encoder):
    """DeBERTa-v2 and v3: the embeddings are zeroed where the mask is 0 (their step reads it); every
    block's attention adds relative-position scores from the encoder's shared relative embeddings and
    positions (functions of the sequence length alone, computed as the encoder does); the head is the
    context pooler (token 0, dense, activation), then ``classifier``.  A convolution after the first
    block (``conv_kernel_size``, DeBERTa-v2 xlarge) reads the embeddings beside that block's output and
    is refused."""

    def __init__(self, model: Any) -> None:
        super().__init__(model)
        if self.base.encoder.conv is not None:
            raise ModelError("this DeBERTa-v2 configuration adds a convolution after the first block "
                             "(conv_kernel_size > 0), which the eager text API does not run in steps; compile "
                             "the model to ONNX instead (moco.compile), which supports it")

    def steps(self) -> list[Step]:
        p = self.prefix
        return [Step(f"{p}.embeddings", self._embed, self.model.config.hidden_size),
                *self._layer_steps(self.base.encoder.layer, f"{p}.encoder.layer", "attention.output.LayerNorm",
                                   "output.LayerNorm")]

    def _embed(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor | None, mask: torch.Tensor) -> torch.Tensor:
        return self.base.embeddings(input_ids=input_ids, token_type_ids=token_type_ids, mask=mask)

    def _attention(self, layer: Any, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        encoder = self.base.encoder
        return layer.attention(hidden, encoder.get_attention_mask(mask), relative_pos=encoder.get_rel_pos(hidden),
                               rel_embeddings=encoder.get_rel_embedding())[0]

    def _feed_forward(self, layer: Any, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return layer.output(layer.intermediate(hidden), hidden)

    def head(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.model.classifier(self.model.dropout(self.model.pooler(hidden)))


class _ModernBert(_Encoder):
    """ModernBERT: token embeddings and a norm; blocks ``layers.<i>`` add their attention and then their
    MLP to the states inline (both cuts take the block's name), each layer attending to every kept token
    or within its local window (``config.layer_types``) with rotary positions of that kind; the head
    reads the final norm's token 0 or masked mean (``classifier_pooling``) through ``head``, then
    ``classifier``."""

    def steps(self) -> list[Step]:
        p = self.prefix
        return [Step(f"{p}.embeddings.norm", self._embed, self.model.config.hidden_size),
                *self._layer_steps(self.base.layers, f"{p}.layers")]

    def _embed(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor | None, mask: torch.Tensor) -> torch.Tensor:
        return self.base.embeddings(input_ids=input_ids)

    def _attention(self, layer: Any, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        make = create_bidirectional_sliding_window_mask if layer.attention_type == "sliding_attention" \
            else create_bidirectional_mask
        positions = torch.arange(hidden.shape[1], device=hidden.device)[None]
        attended = layer.attn(layer.attn_norm(hidden), attention_mask=make(config=self.base.config,
                                                                             inputs_embeds=hidden, attention_mask=mask),
                              position_embeddings=self.base.rotary_emb(hidden, positions, layer.attention_type))[0]
        return hidden + attended

    def _feed_forward(self, layer: Any, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return hidden + layer.mlp(layer.mlp_norm(hidden))

    def head(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        hidden = self.base.final_norm(hidden)
        if self.model.config.classifier_pooling == "cls":
            pooled = hidden[:, 0]
        else:  # "mean", as the model computes it
            pooled = (hidden * mask.unsqueeze(-1)).sum(dim=1) / mask.sum(dim=1, keepdim=True)
        return self.model.classifier(self.model.drop(self.model.head(pooled)))


class _Decoder(Family):
    """Causal decoders: each token attends to the kept tokens up to itself; positions count from 0
    whatever the padding (the exported model is given no position ids); the head scores the last
    token the mask keeps after the final norm, as the compiled graph does (``importer.py``)."""

    final_norm = ""  # the base model's attributes: its final norm, its block list,
    blocks = ""
    embeddings = ""  # and the embeddings' cut name after the prefix ("": written inline in the base model)

    def steps(self) -> list[Step]:
        """The embeddings, then each block's two halves; a block adds each half's output to its input
        inline, so both cuts take the block's name."""
        p = self.prefix
        return [Step(p + self.embeddings, self._embed, self.model.config.hidden_size),
                *self._layer_steps(getattr(self.base, self.blocks), f"{p}.{self.blocks}")]

    def _positions(self, hidden: torch.Tensor) -> torch.Tensor:
        return torch.arange(hidden.shape[1], device=hidden.device)[None]

    def _mask(self, hidden: torch.Tensor, mask: torch.Tensor, sliding: bool = False) -> Any:
        """The causal mask; ``sliding``: within the configured window (``config.sliding_window``) too."""
        make = create_sliding_window_causal_mask if sliding else create_causal_mask
        return make(config=self.base.config, inputs_embeds=hidden, attention_mask=mask, cache=None,
                    position_ids=self._positions(hidden))

    def head(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.model.score(getattr(self.base, self.final_norm)(last_tokens(hidden, mask)))


class _Gpt2(_Decoder):
    """GPT-2: token plus position embeddings, written inline in ``transformer``; blocks ``h.<i>``."""

    final_norm, blocks = "ln_f", "h"

    def _embed(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor | None, mask: torch.Tensor) -> torch.Tensor:
        base = self.base
        return base.drop(base.wte(input_ids) + base.wpe(torch.arange(input_ids.shape[1], device=input_ids.device)))

    def _attention(self, block: Any, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return hidden + block.attn(block.ln_1(hidden), attention_mask=self._mask(hidden, mask))[0]

    def _feed_forward(self, block: Any, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return hidden + block.mlp(block.ln_2(hidden))


class _Llama(_Decoder):
    """Llama (and Mistral, Qwen2, Qwen3): token embeddings only; rotary position embeddings in each attention;
    blocks ``layers.<i>``."""

    final_norm, blocks, embeddings = "norm", "layers", ".embed_tokens"

    def _embed(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor | None, mask: torch.Tensor) -> torch.Tensor:
        return self.base.embed_tokens(input_ids)

    def _attention(self, layer: Any, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        positions = self._positions(hidden)
        mask = self._mask(hidden, mask, self._sliding(layer))
        attended = layer.self_attn(hidden_states=layer.input_layernorm(hidden), attention_mask=mask,
                                   position_ids=positions,
                                   position_embeddings=self.base.rotary_emb(hidden, position_ids=positions))[0]
        return hidden + attended

    def _feed_forward(self, layer: Any, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return hidden + layer.mlp(layer.post_attention_layernorm(hidden))

    def _sliding(self, layer: Any) -> bool:
        """Whether ``layer`` attends within a sliding window, as the base model masks it: Qwen's layers
        each say so (``layer_types``); the others all do when the config sets ``sliding_window`` (Mistral)."""
        kind = getattr(layer.self_attn, "layer_type", False)
        if kind is not False:
            return kind == "sliding_attention"
        return getattr(self.base.config, "sliding_window", None) is not None


# the importer's SUPPORTED_HF_ARCHITECTURES, in its order
FAMILIES: dict[str, type[Family]] = {
    "BertForSequenceClassification": _Bert,
    "DistilBertForSequenceClassification": _DistilBert,
    "RobertaForSequenceClassification": _BertLike,
    "XLMRobertaForSequenceClassification": _BertLike,
    "AlbertForSequenceClassification": _Albert,
    "ElectraForSequenceClassification": _BertLike,
    "DebertaV2ForSequenceClassification": _DebertaV2,
    "ModernBertForSequenceClassification": _ModernBert,
    "GPT2ForSequenceClassification": _Gpt2,
    "LlamaForSequenceClassification": _Llama,
    "MistralForSequenceClassification": _Llama,  # Llama's blocks; Mistral's sliding window, Qwen3's q/k norms
    "Qwen2ForSequenceClassification": _Llama,    # live inside the attention module the family calls
    "Qwen3ForSequenceClassification": _Llama,
}
EAGER_ARCHITECTURES = tuple(FAMILIES)

def last_tokens(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Each row's state at the last position its mask keeps (left or right padding; ``passes/calibration/pooling.py``
    ``last_token``: the first position for a row with no kept token)."""
    positions = torch.arange(mask.shape[1], device=mask.device)
    last = (mask.long() * positions).argmax(dim=1)
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
