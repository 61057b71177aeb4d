"""Triton python-backend model serving a moco build's ``model.onnx`` with onnxruntime.

Not imported by moco: ``moco export-triton --backend python`` copies this file as ``1/model.py``
beside ``1/model.onnx`` (with ``--staged``, beside each stage's graph), and Triton's python backend
runs it in an environment that has numpy < 2 and onnxruntime (moco itself need not be installed there).

* The session uses CUDA on a KIND_GPU instance when that environment's onnxruntime has it, else CPU.
* The requests of one call run as one batch when their inputs agree on every axis but the first
  (what dynamic batching gathered), else one by one; an onnxruntime error fails only its requests.
* The session's threads spin-wait after a run (onnxruntime's default) unless the config parameter
  ``intra_op_spinning`` is "0" (what a staged export writes for its stages).
* Every output of the graph is returned.  The rows that took each exit are counted in the counter
  ``moco_exit_rows_total{model, version, exit}`` (exit "-1" = full network) on Triton's metrics
  endpoint, when this backend supports custom metrics.  The exit output's name comes from the
  config's ``exit_output`` parameter; a model without it (a stage of a staged export) counts nothing.
"""
import json
import os

import numpy as np
import onnxruntime as ort
import triton_python_backend_utils as pb_utils

EXIT_METRIC = "moco_exit_rows_total"


class TritonPythonModel:
    """One instance of the model: an onnxruntime session and the per-exit row counters."""

    def initialize(self, args):
        config = json.loads(args["model_config"])
        path = os.path.join(args["model_repository"], args["model_version"], "model.onnx")
        self.session = ort.InferenceSession(path, _options(config), providers=_providers(args))
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]
        exit_output = config.get("parameters", {}).get("exit_output")
        self.exit_output = exit_output and exit_output["string_value"]
        self.labels = {"model": args["model_name"], "version": args["model_version"]}
        self.family = self.exit_output and _exit_metric_family()
        self.counters = {}

    def execute(self, requests):
        feeds = [{name: pb_utils.get_input_tensor_by_name(request, name).as_numpy() for name in self.input_names}
                 for request in requests]
        groups = [feeds] if _stackable(feeds, self.input_names) else [[feed] for feed in feeds]
        return [response for group in groups for response in self._run(group)]

    def _run(self, feeds):
        """One session run over the rows of ``feeds``; one response per feed.  When a run over several
        feeds fails, each runs alone, so that only the requests that fail get an error."""
        try:
            batch = {name: np.concatenate([feed[name] for feed in feeds]) for name in self.input_names}
            values = self.session.run(self.output_names, batch)
        except Exception as error:  # onnxruntime's own errors: each client gets the message
            if len(feeds) > 1:
                return [response for feed in feeds for response in self._run([feed])]
            return [pb_utils.InferenceResponse(error=pb_utils.TritonError(str(error)))]
        if self.exit_output:
            self._count(values[self.output_names.index(self.exit_output)])
        starts = np.cumsum([len(feed[self.input_names[0]]) for feed in feeds])[:-1]
        pieces = [np.split(value, starts) for value in values]
        return [pb_utils.InferenceResponse([pb_utils.Tensor(name, piece[i])
                                            for name, piece in zip(self.output_names, pieces)])
                for i in range(len(feeds))]

    def _count(self, exits):
        """Add each exit's rows to its counter (no-op without custom metrics)."""
        if self.family is None:
            return
        taken, counts = np.unique(exits, return_counts=True)
        for exit_index, count in zip(taken.tolist(), counts.tolist()):
            label = str(exit_index)
            if label not in self.counters:
                self.counters[label] = self.family.Metric(labels={**self.labels, "exit": label})
            self.counters[label].increment(count)


# moco_compile.runtime.session.CUDA_OPTIONS (moco is not importable here): TF32 off, no cuDNN search.
CUDA_OPTIONS = {"use_tf32": "0", "cudnn_conv_algo_search": "DEFAULT"}


def _options(config):
    """Session options: onnxruntime's threads spin-wait after a run unless the config parameter
    ``intra_op_spinning`` is "0" (the stages of a staged export, which share the cores)."""
    options = ort.SessionOptions()
    spinning = config.get("parameters", {}).get("intra_op_spinning")
    if spinning:
        options.add_session_config_entry("session.intra_op.allow_spinning", spinning["string_value"])
    return options


def _providers(args):
    """CUDA on a GPU instance when this onnxruntime has it (on the instance's device), else CPU."""
    if args.get("model_instance_kind") == "GPU" and "CUDAExecutionProvider" in ort.get_available_providers():
        return [("CUDAExecutionProvider", {**CUDA_OPTIONS, "device_id": int(args["model_instance_device_id"])}),
                "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def _exit_metric_family():
    """The per-exit row counter family, or None when this python backend has no custom metrics."""
    if not hasattr(pb_utils, "MetricFamily"):
        return None
    return pb_utils.MetricFamily(name=EXIT_METRIC, kind=pb_utils.MetricFamily.COUNTER,
                                 description="rows of a moco early-exit model that left at each exit "
                                             "(-1 = full network)")


def _stackable(feeds, names):
    """Whether the feeds agree on every axis but the first of every input."""
    return all(feed[name].shape[1:] == feeds[0][name].shape[1:] for feed in feeds for name in names)
