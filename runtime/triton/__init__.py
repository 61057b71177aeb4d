"""Triton Inference Server: model repository export, the python-backend model, a loopback server.

``export_triton`` / ``TritonSettings`` (:mod:`.repository`) and ``TritonServer``
(:mod:`.server`) are the entry points.
"""
from moco_compile.runtime.triton.repository import TritonSettings, export_triton
from moco_compile.runtime.triton.server import TritonServer

__all__ = ["TritonServer", "TritonSettings", "export_triton"]
