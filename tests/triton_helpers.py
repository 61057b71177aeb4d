"""Helpers the Triton tests share: the export command, configs, directory hashes, one inference."""
from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as pb
from typer.testing import CliRunner

from moco_compile.cli import app
from moco_compile.constants import EXIT_OUTPUT


def export_cli(*args):
    """``moco export-triton ARGS``; never a traceback."""
    run = CliRunner().invoke(app, ["export-triton", *map(str, args)])
    assert "Traceback" not in run.output
    return run


def parsed_config(model_dir: Path) -> pb.ModelConfig:
    """A model directory's config.pbtxt as Triton's own message (a parse error fails the test)."""
    return text_format.Parse((model_dir / "config.pbtxt").read_text(), pb.ModelConfig())


def tree_hashes(root: Path) -> dict[str, str]:
    """Every path under ``root`` with the hash of its bytes ("dir" for directories)."""
    return {str(path.relative_to(root)): "dir" if path.is_dir() else hashlib.sha256(path.read_bytes()).hexdigest()
            for path in sorted(root.rglob("*"))}


def infer(protocol, address: str, model: str, images: np.ndarray) -> dict[str, np.ndarray]:
    """One inference of ``model`` over ``protocol`` (tritonclient's http or grpc module): logits and moco_exit."""
    client = protocol.InferenceServerClient(address)
    try:
        request = protocol.InferInput("images", list(images.shape), "FP32")
        request.set_data_from_numpy(images)
        result = client.infer(model, [request])
        return {name: result.as_numpy(name) for name in ("logits", EXIT_OUTPUT)}
    finally:
        client.close()
