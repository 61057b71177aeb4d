"""Triton python-backend entry model of a staged export: routes each request through the stage models.

Not imported by moco: ``moco export-triton --staged`` copies this file as ``NAME/1/model.py``, and
Triton's python backend runs it (numpy < 2; no onnxruntime needed here, the stage models run the
graphs).  Its config's ``moco_stages`` parameter lists the stages in order (JSON)::

    [{"model": "NAME_stage0", "inputs": {"images": "images"},
      "outputs": {"moco/moco_s0_bN/carry/relu_2": "carry/relu_2", "moco/moco_s0_bN/keep": "keep",
                  "moco/moco_s0_bN/exited/logits": "exited/logits"}}, ...]

``inputs`` maps each input of the stage model to the tensor whose rows it takes (a model input at
stage 0, a tensor the previous stage carries after); ``outputs`` maps each output to its role.

For the requests of one call (their rows stacked into one batch when their shapes allow, so that a
stage is called once per call; else each request on its own, concurrently):

1. stage k's model runs on the request's rows still going (BLS, ``async_exec``);
2. rows whose ``keep`` is false leave: their outputs are the stage's ``exited/<output>``, their
   ``moco_exit`` is k;
3. the others' carried tensors (``carry/<tensor>``) go to stage k + 1, whose dynamic batcher merges
   them with other requests' continuing rows; the last stage gives ``out/<output>`` and exit -1;
4. results are scattered back in row order; when a stage fails on a stacked batch, each request runs
   alone, so a failing stage fails only its request.

The rows that took each exit are counted in ``moco_exit_rows_total{model, version, exit}`` on the
metrics endpoint, as the single-graph model.py does.
"""
import asyncio
import json

import numpy as np
import triton_python_backend_utils as pb_utils

EXIT_METRIC = "moco_exit_rows_total"


class StageFailed(Exception):
    """A stage model answered with an error."""


class TritonPythonModel:
    """One instance of the entry model: the stage list and the per-exit row counters."""

    def initialize(self, args):
        config = json.loads(args["model_config"])
        parameters = config["parameters"]
        self.stages = json.loads(parameters["moco_stages"]["string_value"])
        self.exit_output = parameters["exit_output"]["string_value"]
        self.input_names = [tensor["name"] for tensor in config["input"]]
        self.output_names = [tensor["name"] for tensor in config["output"] if tensor["name"] != self.exit_output]
        self.labels = {"model": args["model_name"], "version": args["model_version"]}
        self.family = _exit_metric_family()
        self.counters = {}

    async def execute(self, requests):
        feeds = [{name: pb_utils.get_input_tensor_by_name(request, name).as_numpy() for name in self.input_names}
                 for request in requests]
        if len(feeds) > 1 and _stackable(feeds, self.input_names):
            return await self._answer_together(feeds)
        return list(await asyncio.gather(*(self._answer(feed) for feed in feeds)))

    async def _answer_together(self, feeds):
        """The requests of one call as one batch: one stage call per stage for all their rows (the
        stage models' batchers merge them further with other calls'); if a stage fails, each
        request runs alone, so that only the requests that fail get an error."""
        batch = {name: np.concatenate([feed[name] for feed in feeds]) for name in self.input_names}
        try:
            values, exits = await self._level(0, batch)
        except StageFailed:
            return list(await asyncio.gather(*(self._answer(feed) for feed in feeds)))
        self._count(exits)
        starts = np.cumsum([len(feed[self.input_names[0]]) for feed in feeds])[:-1]
        pieces = {name: np.split(value, starts) for name, value in values.items()}
        return [self._response({name: piece[i] for name, piece in pieces.items()}, rows)
                for i, rows in enumerate(np.split(exits, starts))]

    async def _answer(self, feed):
        """The response to one request: every output, ``moco_exit`` last."""
        try:
            values, exits = await self._level(0, feed)
        except StageFailed as error:
            return pb_utils.InferenceResponse(error=pb_utils.TritonError(str(error)))
        self._count(exits)
        return self._response(values, exits)

    def _response(self, values, exits):
        return pb_utils.InferenceResponse([pb_utils.Tensor(name, np.ascontiguousarray(values[name]))
                                           for name in self.output_names]
                                          + [pb_utils.Tensor(self.exit_output, np.ascontiguousarray(exits))])

    async def _level(self, stage, tensors):
        """Stage ``stage`` and every stage after it on the rows of ``tensors`` ({tensor: rows}):
        ({output: values}, exit per row)."""
        spec = self.stages[stage]
        request = pb_utils.InferenceRequest(
            model_name=spec["model"], requested_output_names=list(spec["outputs"]),
            inputs=[pb_utils.Tensor(name, np.ascontiguousarray(tensors[tensor]))
                    for name, tensor in spec["inputs"].items()])
        response = await request.async_exec()
        if response.has_error():
            raise StageFailed(f"{spec['model']}: {response.error().message()}")
        roles = {role: pb_utils.get_output_tensor_by_name(response, name).as_numpy()
                 for name, role in spec["outputs"].items()}
        if stage == len(self.stages) - 1:
            values = {name: roles[f"out/{name}"] for name in self.output_names}
            return values, np.full(len(next(iter(values.values()))), -1, np.int64)
        keep = roles["keep"].reshape(-1).astype(bool)
        values = {name: np.array(roles[f"exited/{name}"]) for name in self.output_names}
        exits = np.full(len(keep), stage, np.int64)
        continuing = np.flatnonzero(keep)
        if len(continuing):
            carried = {role.split("/", 1)[1]: value[continuing] for role, value in roles.items()
                       if role.startswith("carry/")}
            rest, rest_exits = await self._level(stage + 1, carried)
            for name, value in values.items():
                value[continuing] = rest[name]
            exits[continuing] = rest_exits
        return values, exits

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


def _stackable(feeds, names):
    """Whether the feeds agree on every axis but the first of every input (so their rows stack)."""
    return all(len({feed[name].shape[1:] for feed in feeds}) == 1 for name in names)


def _exit_metric_family():
    """The per-exit row counter family, or None when this python backend has no custom metrics."""
    if not hasattr(pb_utils, "MetricFamily"):
        return None
    return pb_utils.MetricFamily(name=EXIT_METRIC, kind=pb_utils.MetricFamily.COUNTER,
                                 description="rows of a moco early-exit model that left at each exit "
                                             "(-1 = full network)")
