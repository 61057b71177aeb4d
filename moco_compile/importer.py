"""Front door for models: load an ONNX file or export an ``nn.Module``, then normalise.

The result is an :class:`ImportedModel`: a topologically sorted, constant-folded
ONNX model at opset >= 17, the name of its classifier output, and a map from
tensor names to the PyTorch module scopes that produced them (from either the
torch.export-based exporter's ``namespace`` metadata or the legacy exporter's
``/scope/scope/Op`` node names).  A batch dimension the export fixed is freed
(``passes/graph/fixed_batch.py``; :func:`moco_compile.prepare.check_freed_batch` checks it on rows).
"""
from __future__ import annotations

import io
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from moco_compile.constants import LABELS
from moco_compile.errors import ModelError
from moco_compile.export_check import check_export, check_single_label_head
from moco_compile.hf_images import ARCHITECTURE_SUFFIX as IMAGE_ARCHITECTURE_SUFFIX
from moco_compile.hf_images import export_hf_image_classifier, is_hf_image_classifier
from moco_compile.passes.graph.binary_output import BinaryOutput, to_two_class
from moco_compile.passes.graph.fixed_batch import fixed_batch_size, free_batch
from moco_compile.passes.graph.index import opset_of

MIN_OPSET = 17


@dataclass(frozen=True)
class FixedBatch:
    """The batch size the user's export fixed its inputs at, and that graph (normalised) as it was:
    the freed graph is checked against it on calibration rows before anything else runs."""

    size: int
    model: onnx.ModelProto


@dataclass
class ImportedModel:
    """A classifier ready for the passes."""

    model: onnx.ModelProto
    output: str
    scopes: dict[str, tuple[str, ...]] = field(default_factory=dict)
    text: "TextInputs | None" = None  # set for text models (e.g. Hugging Face sequence classifiers)
    fixed_batch: FixedBatch | None = None  # set when the export fixed the batch and moco freed it
    binary: BinaryOutput | None = None  # set for a one-column binary output: ``output`` is its two-class form

    @property
    def input_names(self) -> list[str]:
        initializers = {init.name for init in self.model.graph.initializer}
        return [i.name for i in self.model.graph.input if i.name not in initializers]

    @property
    def num_classes(self) -> int:
        return output_shape(self.model, self.output)[1]


def import_model(source: Any, output: str | None = None, example_input: Any = None,
                 rows: Mapping[str, Any] | None = None) -> ImportedModel:
    """Load ``source`` as a classifier: an ONNX path, an ``onnx.ModelProto``, a ``torch.nn.Module``,
    a Hugging Face sequence or image classifier, or a directory it was saved to with ``save_pretrained``.

    ``example_input`` is what an ``nn.Module`` is exported on: a tensor, a tuple of tensors or a dict of
    named tensors with the batch on axis 0; without it, the first rows of ``rows`` (calibration arrays by
    name, in memory) when they are named after the module's ``forward`` parameters.  For a Hugging Face
    image classifier it is optional: a batch of images fixing the input size (default: the config's).
    ``output`` names the classifier output when the model has several.
    """
    if isinstance(source, onnx.ModelProto):
        model = source
    elif isinstance(source, (str, os.PathLike)) and Path(source).is_dir():
        model = export_hf_classifier(load_hf_directory(Path(source)), example_input, Path(source))
    elif isinstance(source, (str, os.PathLike)):
        model = load_onnx(Path(source))
    elif _is_hf_model(source):
        model = export_hf_classifier(source, example_input)
    elif _is_torch_module(source):
        example_input = example_input if example_input is not None else _example_from_rows(source, rows)
        if example_input is None:
            raise ModelError("an nn.Module needs an example input: pass example_input=<a batch of inputs>, or name "
                             f"the calibration arrays after the parameters of its forward ({_parameters(source)})")
        model = export_torch(source, example_input)
    else:
        raise ModelError(f"cannot compile a {type(source).__name__}: pass an ONNX file path, "
                         "an onnx.ModelProto or a torch.nn.Module")
    scopes = module_scopes(model)
    text = text_inputs(model)
    model = normalize(model)
    fixed = None
    size = fixed_batch_size(model)
    if size is not None:
        fixed, model = FixedBatch(size, model), free_batch(model, size)
    output = classifier_output(model, output)
    binary = None
    if output_shape(model, output)[1] == 1:
        model, binary = to_two_class(model, output)
        model, output = onnx.shape_inference.infer_shapes(model), binary.two_class
    return ImportedModel(model, output, scopes, text, fixed, binary)


def check_rows_are_independent(model: onnx.ModelProto) -> None:
    """Refuse to plan exits on a model that quantizes its activations per batch (onnxruntime's dynamic int8): a
    row's output then depends on the other rows in its batch, and exits change which rows share one, so no plan
    could hold (the memory passes put a build's exits on such a model and validate the result instead)."""
    if any(node.op_type == "DynamicQuantizeLinear" for node in model.graph.node):
        raise ModelError("the model quantizes its activations per batch (DynamicQuantizeLinear: onnxruntime's dynamic "
                         "int8), so a row's output depends on the other rows in its batch, and exits change which "
                         "rows share a batch: no plan can hold. Compile the float model, then put its exits back on "
                         "the int8 version with `moco optimize-memory BUILD --int8 dynamic` (validated on untouched "
                         "rows), or quantize with static int8 (fixed ranges) first")


def load_original(path: Path) -> onnx.ModelProto:
    """The ONNX graph of the model a build was compiled from: the file, or the export of the Hugging Face
    classifier saved in the directory, as compile exported it."""
    if path.is_dir():
        return export_hf_classifier(load_hf_directory(path), None, path)
    return load_onnx(path)


def load_onnx(path: Path) -> onnx.ModelProto:
    """Load and check an ONNX file, with a clear error when it is missing or corrupt."""
    if not path.exists():
        raise ModelError(f"model file {path} does not exist: give the path of an .onnx file")
    try:
        model = onnx.load(str(path))
        onnx.checker.check_model(model)
    except Exception as error:  # onnx raises DecodeError, ValidationError, ... for bad files
        raise ModelError(f"{path} is not a valid ONNX model ({type(error).__name__}: "
                         f"{str(error).strip().splitlines()[0] if str(error).strip() else 'unreadable'}); "
                         "re-export it with torch.onnx.export or check the file is complete") from error
    return model


def _is_torch_module(obj: Any) -> bool:
    try:
        import torch
    except ImportError:
        return False
    return isinstance(obj, torch.nn.Module)


def export_torch(module: Any, example_input: Any, opset: int = 18) -> onnx.ModelProto:
    """Export an ``nn.Module`` with the torch.export-based exporter, batch axis dynamic; a module returning a
    dict of tensors gets outputs named by its keys."""
    import torch

    if isinstance(example_input, dict):
        args, kwargs, names = (), dict(example_input), list(example_input)
        dims = {name: {0: torch.export.Dim("batch")} for name in names}
        dynamic = dims
    else:
        args = example_input if isinstance(example_input, tuple) else (example_input,)
        kwargs, names = {}, _forward_argument_names(module, len(args))
        batch = torch.export.Dim("batch")
        dynamic = tuple({0: batch} for _ in args)
    module = module.eval()
    try:
        with torch.no_grad():
            returned = module(*args, **kwargs)  # a dict's keys name the outputs (else the exporter names them)
            output_names = [key for key, value in returned.items() if isinstance(value, torch.Tensor)] \
                if isinstance(returned, Mapping) else None
            program = torch.onnx.export(module, args, kwargs=kwargs or None, dynamo=True,
                                        dynamic_shapes=dynamic, opset_version=opset,
                                        input_names=names if not kwargs else None, output_names=output_names,
                                        verbose=False)
    except Exception as error:
        raise ModelError(f"torch.onnx.export failed for {type(module).__name__}: {error}; "
                         "export it yourself and pass the .onnx file") from error
    buffer = io.BytesIO()
    program.save(buffer)
    return onnx.load_from_string(buffer.getvalue())


def _example_from_rows(module: Any, rows: Mapping[str, Any] | None) -> dict | None:
    """The first two rows of the arrays in ``rows`` (but ``labels``) as tensors by name, when every name is one of
    ``module.forward``'s parameters; else None."""
    import torch

    names = [name for name in rows or {} if name != LABELS]
    if not names or any(name not in _parameters(module) for name in names):
        return None
    return {name: torch.as_tensor(np.asarray(rows[name][:2])) for name in names}


def _parameters(module: Any) -> list[str]:
    """The names of ``module.forward``'s parameters that a value can be passed to by position or name."""
    import inspect

    return [p.name for p in inspect.signature(module.forward).parameters.values()
            if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]


def _forward_argument_names(module: Any, count: int) -> list[str]:
    """ONNX input names for positional inputs: the names of ``forward``'s parameters."""
    parameters = _parameters(module)
    return parameters[:count] if len(parameters) >= count else [f"input_{i}" for i in range(count)]


def module_scopes(model: onnx.ModelProto) -> dict[str, tuple[str, ...]]:
    """Map each node output to the qualified names of the modules around its node.

    torch.export-based exporter: ``namespace`` metadata such as
    ``": Net/layer1: Sequential/layer1.0: Block/relu_2: aten.relu.default"``.
    Legacy exporter: node names such as ``/layer1/layer1.0/relu/Relu``.
    """
    scopes: dict[str, tuple[str, ...]] = {}
    for node in model.graph.node:
        metadata = {prop.key: prop.value for prop in node.metadata_props}
        if "namespace" in metadata:
            parts = [part.split(":")[0].strip() for part in metadata["namespace"].split("/")]
            names = tuple(part for part in parts[1:-1] if part)
        elif node.name.startswith("/"):
            names = _qualify(node.name.split("/")[1:-1])
        else:
            names = ()
        for output in node.output:
            scopes[output] = names
    return scopes


def _qualify(parts: list[str]) -> tuple[str, ...]:
    """Full module paths from legacy scopes.

    The legacy exporter names a module by its path from the last non-numeric part on
    (``features.0.block.3`` is ``block.3``, ``layer1.0`` stays ``layer1.0``, ``layer1.0.conv1``
    is ``conv1``), so a scope either extends its parent's such name with numeric parts or is
    one attribute below the parent.
    """
    qualified: list[str] = []
    for part in parts:
        if qualified:
            parent = qualified[-1]
            short = _short_name(parent)
            extension = part[len(short) + 1:].split(".") if part.startswith(short + ".") else []
            part = parent + part[len(short):] if extension and all(a.isdigit() for a in extension) \
                else f"{parent}.{part}"
        qualified.append(part)
    return tuple(qualified)


def _short_name(path: str) -> str:
    """A module path from its last non-numeric part on (the legacy exporter's scope name)."""
    atoms = path.split(".")
    last = max((i for i, atom in enumerate(atoms) if not atom.isdigit()), default=0)
    return ".".join(atoms[last:])


def normalize(model: onnx.ModelProto) -> onnx.ModelProto:
    """Fold constants, drop dead nodes, sort topologically and lift the opset to >= 17."""
    import onnx_graphsurgeon as gs

    opset = opset_of(model)
    if opset < MIN_OPSET:
        try:
            model = onnx.version_converter.convert_version(model, MIN_OPSET)
        except Exception as error:
            raise ModelError(f"the model uses opset {opset} and could not be converted to opset "
                             f"{MIN_OPSET} ({error}); re-export it with opset_version>={MIN_OPSET}") from error
    graph = gs.import_onnx(model)
    graph.fold_constants(error_ok=True).cleanup(remove_unused_graph_inputs=False).toposort()
    normalized = gs.export_onnx(graph, do_type_check=False)
    normalized.ir_version = min(model.ir_version, onnx.IR_VERSION) or onnx.IR_VERSION
    normalized.metadata_props.extend(prop for prop in model.metadata_props if prop.key.startswith(TEXT_METADATA))
    for ours, theirs in ((normalized.graph.input, model.graph.input), (normalized.graph.output, model.graph.output)):
        original = {value.name: value for value in theirs}
        for value in ours:  # keep the user's declarations (shapes, dim names, metadata) exactly
            if value.name in original:
                value.CopyFrom(original[value.name])
    return onnx.shape_inference.infer_shapes(normalized)


def output_shape(model: onnx.ModelProto, name: str) -> list[int | str | None]:
    """Shape of a graph output: ints for fixed dims, strings for symbolic ones, None if unknown."""
    for value in model.graph.output:
        if value.name == name:
            if not value.type.tensor_type.HasField("shape"):
                return []
            return [d.dim_value if d.HasField("dim_value") else (d.dim_param or None)
                    for d in value.type.tensor_type.shape.dim]
    raise KeyError(name)


def classifier_output(model: onnx.ModelProto, output: str | None) -> str:
    """Pick and validate the classifier output: float ``[N, C]`` with a fixed C >= 2, or ``[N, 1]`` (a
    binary classifier's logit or probability, :mod:`~moco_compile.passes.graph.binary_output`)."""
    names = [o.name for o in model.graph.output]
    if output is None:
        if len(names) != 1:
            raise ModelError(f"the model has {len(names)} outputs ({', '.join(names)}): "
                             "name the classifier's [N, C] output with --output")
        output = names[0]
    elif output not in names:
        raise ModelError(f"--output {output!r} is not an output of the model; its outputs are: "
                         f"{', '.join(names)}")
    shape = output_shape(model, output)
    elem = next(o for o in model.graph.output if o.name == output).type.tensor_type.elem_type
    float_types = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE,
                   onnx.TensorProto.BFLOAT16)
    if len(shape) != 2 or not isinstance(shape[1], int) or shape[1] < 1 or elem not in float_types:
        dtype = onnx.helper.tensor_dtype_to_np_dtype(elem) if elem else "unknown"
        raise ModelError(f"output {output!r} has shape {shape} and dtype {dtype}: moco compiles "
                         "classifiers whose output is float [batch, classes] with a fixed number "
                         "of classes >= 2 (logits or probabilities), or [batch, 1] (a binary classifier's "
                         "logit or sigmoid probability)")
    return output


def input_dtypes(model: onnx.ModelProto) -> dict[str, np.dtype]:
    """Numpy dtype of each (non-initializer) graph input."""
    initializers = {init.name for init in model.graph.initializer}
    return {i.name: np.dtype(onnx.helper.tensor_dtype_to_np_dtype(i.type.tensor_type.elem_type))
            for i in model.graph.input if i.name not in initializers}


# -- text models ------------------------------------------------------------------------------

TEXT_METADATA = "moco.text."
# Hugging Face architectures whose export, cut points and exits are tested (tests/test_text_architectures.py).
HF_ENCODERS = ("BertForSequenceClassification", "DistilBertForSequenceClassification",
               "RobertaForSequenceClassification", "XLMRobertaForSequenceClassification",
               "AlbertForSequenceClassification", "ElectraForSequenceClassification",
               "DebertaV2ForSequenceClassification", "ModernBertForSequenceClassification")
HF_DECODERS = ("GPT2ForSequenceClassification", "LlamaForSequenceClassification",  # classify the last token
               "MistralForSequenceClassification", "Qwen2ForSequenceClassification", "Qwen3ForSequenceClassification")
SUPPORTED_HF_ARCHITECTURES = HF_ENCODERS + HF_DECODERS
_MASK_NAMES = ("attention_mask",)
_SIDE_NAMES = ("attention_mask", "token_type_ids", "position_ids")


@dataclass(frozen=True)
class TextInputs:
    """What the passes need to know about a text model's inputs.

    ``mask``: the ``[N, S]`` attention mask (1 = real token) that sequence pooling reads;
    ``side``: graph inputs that later layers read besides the hidden state, compressed with
    it at every exit; ``max_length``: the longest sequence the model accepts (None: unknown);
    ``summary_token``: the token whose state sums the text up (``first_token`` for encoders,
    ``last_token`` for causal decoders, whose other tokens have not seen the whole text).
    """

    mask: str
    side: tuple[str, ...]
    max_length: int | None = None
    architecture: str = ""
    summary_token: str = "first_token"


def text_inputs(model: onnx.ModelProto) -> TextInputs | None:
    """Text-model facts from moco's metadata (HF export) or, for other files, from input names."""
    meta = {prop.key[len(TEXT_METADATA):]: prop.value for prop in model.metadata_props
            if prop.key.startswith(TEXT_METADATA)}
    if "mask" in meta:
        return TextInputs(meta["mask"], tuple(n for n in meta.get("side", meta["mask"]).split(",") if n),
                          int(meta["max_length"]) if meta.get("max_length") else None,
                          meta.get("architecture", ""), meta.get("summary_token", "first_token"))
    inputs = {name: dtype for name, dtype in input_dtypes(model).items()}
    masks = [n for n in _MASK_NAMES if n in inputs and np.issubdtype(inputs[n], np.integer)]
    if not masks:
        return None
    return TextInputs(masks[0], tuple(n for n in _SIDE_NAMES if n in inputs))


def _is_hf_model(obj: Any) -> bool:
    return _is_torch_module(obj) and type(obj).__module__.startswith("transformers.") \
        and hasattr(obj, "config")


def load_hf_directory(path: Path) -> Any:
    """The Hugging Face sequence or image classifier saved in ``path`` (``save_pretrained``), from local files
    only."""
    if not (path / "config.json").exists():
        raise ModelError(f"{path} is a directory without config.json: give an .onnx file or a directory a "
                         "Hugging Face sequence or image classifier was saved to (model.save_pretrained(path))")
    try:
        from transformers import AutoConfig, AutoModelForImageClassification, AutoModelForSequenceClassification
    except ImportError as error:
        raise ModelError("loading a Hugging Face model directory needs transformers: "
                         "pip install 'moco-compile[text]'") from error
    architectures = AutoConfig.from_pretrained(path, local_files_only=True).architectures or []
    if any(name.endswith(IMAGE_ARCHITECTURE_SUFFIX) for name in architectures):
        return AutoModelForImageClassification.from_pretrained(path, local_files_only=True).eval()
    if not any(name.endswith("ForSequenceClassification") for name in architectures):
        raise ModelError(f"{path} holds a {', '.join(architectures) or 'model without a stated architecture'}, "
                         "not a classifier with a trained head; moco imports image classifiers "
                         f"(*{IMAGE_ARCHITECTURE_SUFFIX}) and the sequence classifiers "
                         f"{', '.join(SUPPORTED_HF_ARCHITECTURES)} (fine-tune and save_pretrained one first)")
    return AutoModelForSequenceClassification.from_pretrained(path, local_files_only=True).eval()


def export_hf_classifier(model: Any, example_input: Any = None, directory: Path | None = None) -> onnx.ModelProto:
    """Export a Hugging Face image classifier (:mod:`~moco_compile.hf_images`; ``example_input`` and the
    ``directory`` it was saved to may give its image size) or sequence classifier."""
    if is_hf_image_classifier(model):
        return export_hf_image_classifier(model, example_input, directory)
    return export_hf_sequence_classifier(model)


def _last_masked_token_classifier(model: Any) -> Any:
    """A decoder classifier that classifies the last token the attention mask keeps.

    Hugging Face's decoder classifiers find that token from ``input_ids == pad_token_id``, so
    the token ids would cross every cut; reading the mask instead (the same token for any
    padding the mask marks, checked here on a padded batch) keeps the ids inside the prefix.
    The base model and head are held under their own names, so cuts keep their module paths.
    """
    import torch

    class LastMaskedTokenClassifier(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.prefix = model.base_model_prefix
            setattr(self, self.prefix, model.base_model)
            self.score = model.score

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
            hidden = getattr(self, self.prefix)(input_ids=input_ids, attention_mask=attention_mask,
                                                use_cache=False).last_hidden_state
            positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
            last = (attention_mask.long() * positions).argmax(dim=1)
            return self.score(hidden[torch.arange(hidden.shape[0], device=hidden.device), last])

    wrapped = LastMaskedTokenClassifier().eval()
    pad, vocab = model.config.pad_token_id, model.config.vocab_size
    ids = torch.arange(3 * 9).reshape(3, 9) % (vocab - 1)
    ids = torch.where(ids >= pad, ids + 1, ids)  # no pad token among the real ones
    mask = torch.ones_like(ids)
    mask[1, 6:], mask[2, 3:] = 0, 0
    ids = torch.where(mask.bool(), ids, torch.full_like(ids, pad))
    with torch.no_grad():
        expected = model(input_ids=ids, attention_mask=mask).logits
        got = wrapped(ids, mask)
    if not torch.allclose(expected, got, atol=1e-4, rtol=1e-4):
        raise ModelError(f"{type(model).__name__}: classifying the last token the attention mask keeps does not "
                         f"reproduce the model (max difference {float((expected - got).abs().max()):.3g}); export "
                         "it to ONNX yourself and pass the .onnx file")
    return wrapped


def export_hf_sequence_classifier(model: Any, opset: int = 18) -> onnx.ModelProto:
    """Export a Hugging Face sequence classifier: inputs ``input_ids``, ``attention_mask``
    (and ``token_type_ids`` when the model has them), output ``logits``; batch and sequence
    length dynamic.  Offline: nothing is downloaded.  The mask and length limit are stored
    as ``moco.text.*`` metadata so an exported file carries them.
    """
    import inspect

    import torch

    architecture = type(model).__name__
    if architecture not in SUPPORTED_HF_ARCHITECTURES:
        raise ModelError(f"{architecture} is not a supported Hugging Face architecture; moco imports "
                         f"{', '.join(SUPPORTED_HF_ARCHITECTURES)}. Export other models to "
                         "ONNX yourself (inputs input_ids, attention_mask; output [batch, classes] logits) "
                         "and pass the .onnx file")
    config = model.config
    check_single_label_head(model)
    if architecture in HF_DECODERS and getattr(config, "pad_token_id", None) is None:
        raise ModelError(f"{architecture} has no pad_token_id, so it cannot tell which token of a padded row "
                         "is the last one: set model.config.pad_token_id (e.g. to the tokenizer's "
                         "eos_token_id, as for padding) before compiling")
    names = ["input_ids", "attention_mask"]
    if "token_type_ids" in inspect.signature(model.forward).parameters and getattr(config, "type_vocab_size", 0):
        names.append("token_type_ids")
    max_length = int(getattr(config, "max_position_embeddings", 512))
    example = {"input_ids": 1 + torch.arange(16).reshape(2, 8) % (config.vocab_size - 2),
               "attention_mask": torch.ones(2, 8, dtype=torch.long),
               "token_type_ids": torch.zeros(2, 8, dtype=torch.long)}
    example["attention_mask"][1, 5:] = 0
    example = {name: example[name] for name in names}
    batch, sequence = torch.export.Dim("batch"), torch.export.Dim("sequence", max=max_length)
    model = model.eval()
    if architecture in HF_DECODERS:
        model = _last_masked_token_classifier(model)
    use_cache = getattr(config, "use_cache", None)
    try:
        config.use_cache = False  # decoders would also return their key/value cache
        with torch.no_grad():
            program = torch.onnx.export(model, (), kwargs=example, dynamo=True, opset_version=opset,
                                        dynamic_shapes={name: {0: batch, 1: sequence} for name in names},
                                        output_names=["logits"], verbose=False)
    except Exception as error:
        raise ModelError(f"exporting {architecture} to ONNX failed: {error}") from error
    finally:
        if use_cache is None:
            del config.use_cache
        else:
            config.use_cache = use_cache
    buffer = io.BytesIO()
    program.save(buffer)
    exported = onnx.load_from_string(buffer.getvalue())
    if [o.name for o in exported.graph.output] != ["logits"]:
        raise ModelError(f"exporting {architecture} gave outputs {[o.name for o in exported.graph.output]}, "
                         "expected one 'logits' output")
    check_export(exported, model, example, architecture)
    for key, value in (("mask", "attention_mask"), ("side", ",".join(names[1:])),
                       ("max_length", str(max_length)), ("architecture", architecture),
                       ("summary_token", "last_token" if architecture in HF_DECODERS else "first_token")):
        exported.metadata_props.add(key=TEXT_METADATA + key, value=value)
    return exported
