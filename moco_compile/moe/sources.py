"""What ``moco moe`` commands read: a model (a user's saved module or a shipped reference) and byte text."""
from __future__ import annotations

from pathlib import Path

from moco_compile.errors import MocoError, ModelError


def load_torch_model(path: Path):
    """The model in ``path``, in eval mode: a module ``torch.save(model, path)`` wrote (its class importable
    here), or the reference's configuration and weights (:func:`~moco_compile.moe.reference_lm.save_model`);
    :class:`ModelError` otherwise."""
    import torch

    from moco_compile.moe.reference_lm import from_saved, is_saved_reference

    try:
        model = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as error:  # pickle raises anything: wrap it with what to do
        raise ModelError(f"could not load {path} as a torch module ({type(error).__name__}: {error}); save the "
                         "whole model with torch.save(model, path), with its class importable where moco runs "
                         "(installed, or on PYTHONPATH)") from error
    if is_saved_reference(model):
        return from_saved(model)
    if not isinstance(model, torch.nn.Module):
        raise ModelError(f"{path} holds a {type(model).__name__}, not a torch module; save the whole model with "
                         "torch.save(model, path) (a state dict does not say which class to build)")
    return model.eval()


def model_path(model: Path | None, reference: str | None) -> Path:
    """The file of MODEL or of the shipped ``--reference`` (exactly one of them given)."""
    from moco_compile.moe.reference_lm import REFERENCES, reference_file

    if (model is None) == (reference is None):
        raise MocoError(f"give either MODEL (a module saved with torch.save(model, path)) or --reference "
                        f"({', '.join(REFERENCES)}), {'not both' if model is not None else 'one of them'}")
    return model if model is not None else reference_file(reference, "weights")


def input_path(path: Path | None, reference: str | None, kind: str, option: str) -> Path:
    """``path``, or without it the ``kind`` file (``calibration``, ``prompts``) shipped with ``reference``."""
    from moco_compile.moe.reference_lm import reference_file

    if path is not None:
        return path
    if reference is None:
        raise MocoError(f"give {option} (only a --reference model has a default {kind} text)")
    return reference_file(reference, kind)


def read_bytes(path: Path) -> bytes:
    """The bytes of a non-empty text file (:class:`MocoError` otherwise)."""
    try:
        data = path.read_bytes()
    except OSError as error:
        raise MocoError(f"cannot read {path}: {error}") from error
    if not data.strip():
        raise MocoError(f"{path} is empty; give a UTF-8 text file")
    return data
