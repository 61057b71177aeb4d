"""A build directory as one value: what ``moco compile`` writes and every later step reads (:class:`Build`).

Its files (names defined here; the manifest's in :mod:`moco_compile.outputs`)::

    model.onnx          the compiled graph
    plan.json           the exits and their certificate (ExitPlan.to_dict), and how the graph was
                        written: exit_layout, seed, planner_config (the resolved PlannerConfig)
    report.json         the figures (bound, exits, ...) and the model compiled (source_model)
    frame.arrow         the calibration rows' pooled activations (ActivationFrame)
    moco-manifest.json  the files moco wrote there

:meth:`Build.save` writes them through :func:`~moco_compile.outputs.staged_output_dir`, the one
place for the rules about the user's files.  :meth:`Build.load` checks, in order, and raises
:class:`~moco_compile.errors.NotACompileOutputError` (files missing, a foreign directory) or
:class:`~moco_compile.errors.BuildError` (files damaged), each saying what is wrong and what to do:

1. the directory exists, its manifest lists model.onnx, plan.json and report.json, and they are
   files there (``complete=False``, what ``moco report`` needs, e.g. of a copy of the JSON files:
   plan.json and report.json, no manifest);
2. report.json and plan.json hold the keys moco's readers use, each of its kind
   (:mod:`moco_compile.build_schema`);
3. plan.json is a JSON object that reads as an ExitPlan with a valid build record (builds from
   before the record: layout nested, seed and planner configuration unknown);
4. frame.arrow, when there, loads (``complete=True`` only; the report page reads the frame itself
   and skips its plots when it cannot).

The runtime reads a build's graph through :func:`moco_compile.outputs.build_model` alone: a Build
holds an ExitPlan, a type of the passes, which the runtime never imports.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import onnx
import pyarrow as pa

from moco_compile.build_schema import PLAN_FIELDS, RECOMPILE, REPORT_FIELDS, shape_problem
from moco_compile.errors import BuildError, ModelError
from moco_compile.frame import ActivationFrame, load_frame
from moco_compile.outputs import BUILD_MODEL, build_files, staged_output_dir
from moco_compile.passes.planning.config import DEFAULT_BATCH_BUCKETS, DEFAULT_EXIT_LAYOUT, EXIT_LAYOUTS, PlannerConfig
from moco_compile.passes.planning.types import ExitPlan

MODEL_ONNX = BUILD_MODEL
PLAN_JSON = "plan.json"
REPORT_JSON = "report.json"
FRAME_ARROW = "frame.arrow"
@dataclass
class Build:
    """A compiled graph with its plan, report and frame, and how the graph was written.

    ``compile`` returns one with the graph in memory (``model``); :meth:`load` one read from
    ``directory``, whose graph stays on disk at :attr:`model_path` (``model`` is None) and whose
    frame is memory-mapped.  ``exit_layout``, ``seed`` and ``planner_config`` are what the compile
    used (the configuration as resolved for the model); a build from before they were recorded
    loads as nested, seed and configuration None.
    """

    model: onnx.ModelProto | None
    plan: ExitPlan
    report: dict
    frame: ActivationFrame | None = None
    exit_layout: str = DEFAULT_EXIT_LAYOUT
    seed: int | None = None
    planner_config: PlannerConfig | None = None
    directory: Path | None = None

    def __post_init__(self) -> None:
        if self.exit_layout not in EXIT_LAYOUTS:
            raise ValueError(f"exit_layout must be one of {EXIT_LAYOUTS}, got {self.exit_layout!r}")
        if self.planner_config is not None and self.planner_config.exit_layout != self.exit_layout:
            raise ValueError(f"exit_layout {self.exit_layout!r} differs from the planner configuration's "
                             f"{self.planner_config.exit_layout!r}")

    @property
    def batch_buckets(self) -> tuple[int, ...]:
        """The batch sizes a bucketed graph pads its stages to (the planner configuration's; the
        default for builds that recorded none)."""
        return DEFAULT_BATCH_BUCKETS if self.planner_config is None else self.planner_config.batch_buckets

    @property
    def model_path(self) -> Path | None:
        """Where the compiled graph of a loaded build is (None for one only in memory)."""
        return None if self.directory is None else self.directory / MODEL_ONNX

    def plan_record(self) -> dict:
        """What plan.json holds: the plan, then how its graph was written."""
        return {**self.plan.to_dict(), "exit_layout": self.exit_layout, "seed": self.seed,
                "planner_config": None if self.planner_config is None else self.planner_config.to_dict()}

    def save(self, out_dir: str | os.PathLike, *, inputs: Iterable[str | os.PathLike] = (),
             force: bool = False) -> Path:
        """Write model.onnx, plan.json, report.json and frame.arrow (when there is a frame) into
        ``out_dir``, all or nothing, with a manifest listing them.

        ``out_dir`` must be new, empty or (with ``force``) a previous moco output holding only
        what its manifest lists; ``inputs``: files whose directory must not be replaced
        (:func:`~moco_compile.outputs.staged_output_dir` has the rules).
        """
        if self.model is None and (self.model_path is None or not self.model_path.is_file()):
            raise BuildError(f"this build has no compiled graph to save ({MODEL_ONNX} is not in {self.directory}); "
                             "compile again")
        with staged_output_dir(out_dir, inputs, force) as staging:
            if self.model is not None:
                onnx.save(self.model, str(staging / MODEL_ONNX))
            else:
                shutil.copyfile(self.model_path, staging / MODEL_ONNX)
            (staging / PLAN_JSON).write_text(json.dumps(self.plan_record(), indent=1))
            (staging / REPORT_JSON).write_text(json.dumps(self.report, indent=2))
            if self.frame is not None:
                self.frame.save(staging / FRAME_ARROW)
        return Path(out_dir)

    @classmethod
    def load(cls, directory: str | os.PathLike, *, complete: bool = True) -> "Build":
        """The build in ``directory``, checked as the module docstring says (rules 1-4)."""
        directory = Path(directory)
        build_files(directory, [*([MODEL_ONNX] if complete else []), REPORT_JSON, PLAN_JSON], manifest=complete)
        report = _checked_json(directory / REPORT_JSON, "report", REPORT_FIELDS)
        path = directory / PLAN_JSON
        data = _checked_json(path, "plan", PLAN_FIELDS)
        plan = _plan(path, data)
        layout, seed, config = _record(path, data)
        frame = _frame(directory / FRAME_ARROW) if complete and (directory / FRAME_ARROW).exists() else None
        return cls(None, plan, report, frame, layout, seed, config, directory)

    def original_model(self, original: str | os.PathLike | None = None) -> Path:
        """The model this build was compiled from (an ONNX file, or a Hugging Face ``save_pretrained`` directory):
        ``original`` when given, else the one its report records, refused when gone or changed since (SHA-256)."""
        if original is not None:
            path = Path(original)
            if not path.exists():
                raise ModelError(f"--original {path} does not exist; give the ONNX model (or the Hugging Face "
                                 "directory) the build was compiled from")
            return path
        recorded = self.report.get("source_model") or {}
        if not recorded.get("path"):
            raise ModelError("the build does not record the model it was compiled from (an in-memory model); "
                             "pass --original with it (MODEL.onnx or a Hugging Face directory)")
        path = Path(recorded["path"])
        if not path.exists():
            raise ModelError(f"the model the build was compiled from, {path}, is gone; pass --original with it")
        if source_model(path)["sha256"] != recorded.get("sha256"):
            raise ModelError(f"{path} changed since the build was compiled (its SHA-256 differs); pass --original "
                             "with the model it was compiled from, or compile again")
        return path


def recorded_output(build: Build, original: onnx.ModelProto, source: str | os.PathLike) -> str | None:
    """The classifier output ``build`` records, checked to be one of ``original``'s outputs (``source``: where
    that model came from); None for builds that record none."""
    output = build.report.get("classifier_output")
    names = [value.name for value in original.graph.output]
    if output is not None and output not in names:
        raise ModelError(f"{source} has no output {output!r}, the build's classifier output (its outputs: "
                         f"{', '.join(names)}): it is not the model the build was compiled from (pass --original "
                         "with that one)")
    return output


def source_model(path: str | os.PathLike) -> dict:
    """Where a compiled model came from: its absolute path and the SHA-256 of its bytes (report.json's
    ``source_model``), so that later steps can find the original and tell whether it changed since.  A
    directory (a Hugging Face ``save_pretrained`` one) is hashed over its files' relative paths and bytes."""
    path = Path(path)
    digest = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]:
        if path.is_dir():
            digest.update(file.relative_to(path).as_posix().encode() + b"\0")
        with open(file, "rb") as stream:
            for block in iter(lambda: stream.read(1 << 20), b""):
                digest.update(block)
    return {"path": str(path.resolve()), "sha256": digest.hexdigest()}


def _checked_json(path: Path, what: str, fields: Mapping[str, tuple]) -> dict:
    """The JSON object in ``path``, holding the keys ``fields`` lists, each of its kind (rules 2 and 3)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise BuildError(f"{path} is not valid JSON ({error}); the build is damaged: {RECOMPILE}") from error
    problem = shape_problem(data, fields)
    if problem:
        raise BuildError(f"{path} is not a moco {what}: {problem}; it is damaged or another program's file: "
                         f"{RECOMPILE}")
    return data


def _plan(path: Path, data: Mapping) -> ExitPlan:
    """plan.json's plan (rule 3)."""
    try:
        return ExitPlan.from_dict(data)
    except KeyError as error:
        problem = f"key {error} is missing"
    except (TypeError, ValueError, IndexError, AttributeError) as error:
        problem = f"{type(error).__name__}: {error}"
    raise BuildError(f"{path} is not a moco plan ({problem}); the build is damaged: {RECOMPILE}")


def _record(path: Path, data: Mapping) -> tuple[str, int | None, PlannerConfig | None]:
    """How the graph was written, from plan.json: layout, seed, planner configuration (rule 3)."""
    layout, seed, config = (data.get("exit_layout", DEFAULT_EXIT_LAYOUT), data.get("seed"),
                            data.get("planner_config"))
    if layout not in EXIT_LAYOUTS:
        raise BuildError(f"{path}: exit_layout is {layout!r}, not one of {', '.join(EXIT_LAYOUTS)}; the build is "
                         "damaged: compile again")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise BuildError(f"{path}: seed is {seed!r}, not a whole number; the build is damaged: compile again")
    if config is None:
        return layout, seed, None
    try:
        if not isinstance(config, dict):
            raise TypeError(f"it is {type(config).__name__}, not an object")
        config = PlannerConfig.from_dict(config)
    except (TypeError, ValueError) as error:
        raise BuildError(f"{path}: planner_config does not read as a PlannerConfig ({error}); the build is damaged: "
                         "compile again") from error
    if config.exit_layout != layout:
        raise BuildError(f"{path}: exit_layout {layout!r} differs from planner_config's {config.exit_layout!r}; the "
                         "build is damaged: compile again")
    return layout, seed, config


def _frame(path: Path) -> ActivationFrame:
    """frame.arrow, memory-mapped (rule 4)."""
    try:
        return load_frame(path)
    except (OSError, ValueError, pa.ArrowException) as error:
        raise BuildError(f"{path} does not load as an activation frame ({error}); the build is damaged: compile "
                         "again") from error
