"""What a build's report.json and plan.json must hold for moco's readers: the keys they read, checked
before anything is rendered, so a damaged or foreign file gets a clear error instead of a traceback."""
from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from typing import Any

# What moco's readers use from report.json and plan.json, checked when a build is loaded:
# key -> (required, kind, the fields of its items or of itself when an object).  An optional key may
# also be null.  Only the keys the page reads are listed; others are ignored.
_EXIT_ROW_FIELDS = {"exit_rate": (False, "number", None), "fraction_of_flops_before": (False, "number", None),
                    "module": (False, "string", None)}
_CERTIFICATE_FIELDS = {"curve": (False, "list of objects", None)}
RECOMPILE = "recompile with `moco compile MODEL.onnx --calib CALIB.npz --out DIR`"
REPORT_FIELDS = {
    "classifier_output": (True, "string", None),
    "compute_reduction": (True, "number", None),
    "exit_rate": (True, "number", None),
    "disagreement": (True, "number", None),
    "exits": (True, "list of objects", _EXIT_ROW_FIELDS),
    "bound": (True, "object", _CERTIFICATE_FIELDS),
    "latency": (False, "object", None),
    "splits": (False, "object", None),
    "verification": (False, "object", None),
    "ood_guard": (False, "number", None),
    "latency_note": (False, "string", None),
    "import_notes": (False, "list", None),
    "target": (False, "object", {"name": (True, "string", None), "serving_batch": (False, "number", None),
                                 "note": (False, "string", None)}),
}
PLAN_FIELDS = {
    "total_flops": (True, "number", None),
    "exits": (True, "list of objects", {"thresholds": (False, "list", None)}),
    "certificate": (False, "object", _CERTIFICATE_FIELDS),
}
_KINDS: dict[str, Callable[[Any], bool]] = {
    "number": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
    "object": lambda v: isinstance(v, dict),
    "string": lambda v: isinstance(v, str),
    "list": lambda v: isinstance(v, list),
    "list of objects": lambda v: isinstance(v, list) and all(isinstance(item, dict) for item in v),
}


def shape_problem(data: Any, fields: Mapping[str, tuple], where: str = "") -> str | None:
    """What about ``data`` (a JSON value found at path ``where``) does not fit ``fields``, or None."""
    if not isinstance(data, dict):
        found = {list: "a list", str: "a string", bool: "a boolean"}.get(type(data), "a number")
        found = "null" if data is None else found
        return f"{repr(where) if where else 'it'} should be a JSON object, it is {found}"
    for key, (required, kind, inner) in fields.items():
        path = f"{where}.{key}" if where else key
        value = data.get(key)
        if value is None:
            if required:
                return f"it has no {path!r}" if key not in data else f"{path!r} is null"
            continue
        if not _KINDS[kind](value):
            article = "an" if kind[0] in "aeiou" else "a"
            return f"{path!r} should be {article} {kind}, it is {json.dumps(value)[:60]}"
        items = [(path, value)] if kind == "object" else \
            [(f"{path}[{k}]", item) for k, item in enumerate(value)] if kind == "list of objects" else []
        for item_path, item in items if inner else []:
            problem = shape_problem(item, inner, item_path)
            if problem:
                return problem
    return None
