"""Pooling of a cut tensor into one feature vector per row, as ONNX nodes.

A pooling *variant* concatenates one or more *pieces*:

* ``mean``: global average over spatial axes (``[N, C, *S] -> [N, C]``);
* ``max``: global maximum over spatial axes;
* ``grid``: average over a 2x2 grid of spatial quadrants (``[N, C, H, W] -> [N, 4C]``),
  which keeps where in the image a pattern sits, cheaply: one AveragePool whose window is
  fixed by the calibration size, or, where the graph lets ``H`` and ``W`` vary at run time
  (``fixed_size=False``), Slices sized by ``Shape`` and a mean per cell;
* ``grid3``: the same over a 3x3 grid (``[N, 9C]``), for heads that tell classes apart by
  where their parts sit (reference CNN, MLP heads at 0.995 precision: 53% of held-out rows
  admitted at the first exit with ``grid+max``, 64% with ``grid3+max``);
* ``flat``: a ``[N, D]`` tensor as it is;
* ``token_mean@<mask>``: for a ``[N, S, D]`` sequence tensor, the mean over the tokens that
  the graph input ``<mask>`` (e.g. ``attention_mask``, ``[N, S]``, 1 = real token) marks,
  so padding never changes a row's features; ``token_mean``: the mean over every token, for
  token states without a mask (a vision transformer's patches);
* ``first_token``: for a ``[N, S, D]`` sequence tensor, token 0 (``[CLS]`` in BERT);
* ``last_token@<mask>``: the last token ``<mask>`` marks (right or left padding), the one
  token a causal decoder (GPT-2, Llama) has let see the whole text.

A piece may name a graph input after ``@``; the rewrite compresses that input along
with the cut tensor and renames it inside each exit's remainder (``pooling_inputs``).

The same nodes are used when calibrating and inside the compiled graph, so the
features a rule was fitted on are exactly the features it sees at run time.
Nodes are valid ONNX from opset 13 on; where an operator changed form later (the axes
of ReduceMean/ReduceMax became an input at opset 18) they follow the ``opset`` given
(:func:`reduce_nodes`).
"""
from __future__ import annotations

import math
from collections.abc import Mapping

import onnx
from onnx import helper


SEQUENCE_PIECES = ("token_mean", "first_token", "last_token")
SUMMARY_TOKENS = ("first_token", "last_token")  # the token that sums a sequence up: encoders, decoders
GRID_CELLS = {"grid": 2, "grid3": 3}  # grid piece -> cells per spatial axis


def pieces_for(shape: tuple[int, ...], sequence_mask: str = "", summary_token: str = "first_token",
               tokens: bool = False) -> list[str]:
    """Pieces that can be computed from a tensor of this (batch-first) shape.

    ``tokens``: a rank-3 tensor is read as ``[N, S, D]`` token states rather than ``[N, C, L]``
    channels, pooled by the mean over its tokens and by ``summary_token`` (one of
    :data:`SUMMARY_TOKENS`); ``sequence_mask`` (implies ``tokens``) names the ``[N, S]`` mask input
    of a text model, which the mean and the last token then read.
    """
    if len(shape) == 2:
        return ["flat"]
    if (sequence_mask or tokens) and len(shape) == 3:
        if summary_token not in SUMMARY_TOKENS:
            raise ValueError(f"summary_token must be one of {SUMMARY_TOKENS}, got {summary_token!r}")
        if not sequence_mask:
            return ["token_mean", "first_token"]
        token = f"last_token@{sequence_mask}" if summary_token == "last_token" else "first_token"
        return [f"token_mean@{sequence_mask}", token]
    pieces = ["mean", "max"]
    if len(shape) == 4:
        pieces += [piece for piece, cells in GRID_CELLS.items() if min(shape[2:]) >= cells]
    return pieces


def variants_for(shape: tuple[int, ...], sequence_mask: str = "", summary_token: str = "first_token",
                 tokens: bool = False) -> list[str]:
    """Pooling variants worth trying at a cut, cheapest first (arguments: :func:`pieces_for`'s)."""
    pieces = pieces_for(shape, sequence_mask, summary_token, tokens)
    if pieces == ["flat"]:
        return ["flat"]
    if (sequence_mask or tokens) and len(shape) == 3:
        mean, first = pieces
        return [first, mean, f"{mean}+{first}"]
    grids = [piece for piece in GRID_CELLS if piece in pieces]
    return ["mean", "mean+max"] + [variant for grid in grids for variant in (grid, f"{grid}+max")]


def variant_pieces(variant: str) -> list[str]:
    return variant.split("+")


def piece_kind(piece: str) -> str:
    """The piece without its input argument: ``token_mean@attention_mask`` -> ``token_mean``."""
    return piece.split("@", 1)[0]


def pooling_inputs(variant: str) -> list[str]:
    """Graph inputs (besides the cut tensor) that a variant's nodes read, e.g. a mask."""
    return [piece.split("@", 1)[1] for piece in variant_pieces(variant) if "@" in piece]


def pooling_cost(shape: tuple[int, ...], variant: str) -> float:
    """FLOPs per row of computing a variant from a tensor of this batch-1 shape."""
    if variant == "flat":
        return 0.0
    cost = 0.0
    for piece in variant_pieces(variant):
        kind = piece_kind(piece)
        if kind == "first_token":
            cost += shape[-1]
        elif kind == "last_token":  # position of the last masked token, then a gather
            cost += 2.0 * shape[1] + shape[-1]
        elif kind == "token_mean":  # multiply by the mask (when there is one), sum, divide
            cost += (2.0 if "@" in piece else 1.0) * math.prod(shape[1:]) + shape[-1]
        elif piece in GRID_CELLS:  # each window's elements, overlaps counted twice
            cells = GRID_CELLS[piece]
            cost += shape[1] * math.prod(cells * _grid_window(size, cells)[0] for size in shape[2:])
        else:
            cost += math.prod(shape[1:])
    return float(cost)


def variant_width(shape: tuple[int, ...], variant: str) -> int:
    """Features per row of a variant computed from a tensor of this batch-1 shape (what
    :func:`variant_nodes` writes)."""
    if variant == "flat":
        return math.prod(shape[1:])
    width = 0
    for piece in variant_pieces(variant):
        if piece_kind(piece) in SEQUENCE_PIECES:
            width += shape[-1]
        else:
            width += shape[1] * GRID_CELLS.get(piece, 1) ** (len(shape) - 2)
    return width


def _grid_window(size: int, cells: int) -> tuple[int, int]:
    """Kernel and stride splitting ``size`` into ``cells`` equal windows that cover it, overlapping where
    it does not divide: the smallest kernel of at least ``ceil(size / cells)`` whose windows end at
    ``size`` exactly (``size - kernel`` a multiple of ``cells - 1``); the run-time twin is
    :func:`_grid_mean_nodes`."""
    kernel = -(-size // cells)
    kernel += (size - kernel) % (cells - 1)
    return kernel, (size - kernel) // (cells - 1)


def reduce_nodes(op: str, data: str, axes: list[int], output: str, name: str, opset: int,
                 keepdims: int = 0) -> list[onnx.NodeProto]:
    """``op`` (``ReduceMax``, ``ReduceMean``, ``ReduceSum``, ...) of ``data`` over ``axes``, for ``opset``.

    The axes are an input from opset 18 (ReduceSum: 13) and an attribute before.
    """
    if opset < (13 if op == "ReduceSum" else 18):
        return [helper.make_node(op, [data], [output], name=name, axes=axes, keepdims=keepdims)]
    return [_int64_constant(f"{name}/axes", axes),
            helper.make_node(op, [data, f"{name}/axes"], [output], name=name, keepdims=keepdims)]


def _int64_constant(name: str, values: int | list[int]) -> onnx.NodeProto:
    """A Constant node (named as its output ``name``) of int64 ``values``: a scalar for an int."""
    dims, values = ([], [values]) if isinstance(values, int) else ([len(values)], values)
    return helper.make_node("Constant", [], [name], name=name,
                            value=helper.make_tensor(name.rsplit("/", 1)[-1], onnx.TensorProto.INT64, dims, values))


def piece_nodes(tensor: str, piece: str, shape: tuple[int, ...], output: str,
                prefix: str, inputs: Mapping[str, str] | None = None, *,
                fixed_size: bool = True, opset: int = 18) -> list[onnx.NodeProto]:
    """Nodes writing the ``[N, width]`` features of one piece to ``output``.

    ``inputs`` renames the graph inputs a piece reads (e.g. the mask compressed to the
    rows left inside an exit's remainder); names not in it are used as they are.
    ``fixed_size=False``: the tensor's non-batch dims may differ from ``shape`` at run
    time, so no piece may bake them in. ``opset``: the graph's opset.
    """
    kind = piece_kind(piece)
    if kind in SEQUENCE_PIECES:
        return _sequence_nodes(tensor, piece, output, prefix, inputs or {}, opset)
    if piece == "flat":
        return [helper.make_node("Identity", [tensor], [output], name=f"{prefix}/flat")]
    pooled = f"{prefix}/{piece}_pooled"
    if piece == "mean":
        pool = helper.make_node("GlobalAveragePool", [tensor], [pooled], name=f"{prefix}/mean")
    elif piece == "max":
        pool = helper.make_node("GlobalMaxPool", [tensor], [pooled], name=f"{prefix}/max")
    elif piece in GRID_CELLS and not fixed_size:
        return _grid_mean_nodes(tensor, GRID_CELLS[piece], output, f"{prefix}/{piece}", opset)
    elif piece in GRID_CELLS:
        windows = [_grid_window(size, GRID_CELLS[piece]) for size in shape[2:]]
        pool = helper.make_node("AveragePool", [tensor], [pooled], name=f"{prefix}/{piece}",
                                kernel_shape=[k for k, _ in windows], strides=[s for _, s in windows])
    else:
        raise ValueError(f"unknown pooling piece {piece!r}")
    return [pool, helper.make_node("Flatten", [pooled], [output], name=f"{prefix}/{piece}_flatten", axis=1)]


def _grid_mean_nodes(tensor: str, cells: int, output: str, p: str, opset: int) -> list[onnx.NodeProto]:
    """A grid piece for ``[N, C, H, W]`` of any ``H, W``: the mean of each of ``cells x cells`` windows,
    features ordered as the fixed-size AveragePool's (channel, then cells row by row).

    Each axis's windows are :func:`_grid_window`'s, computed from its ``Shape`` at run time:
    ``kernel = ceil(size / cells)``, plus ``(size - kernel) mod (cells - 1)``; stride
    ``(size - kernel) / (cells - 1)``.
    """
    nodes = [_int64_constant(f"{p}/{name}", [value]) for name, value in
             (("zero", 0), ("gaps", cells - 1), ("cells", cells), ("rows_axis", 2), ("columns_axis", 3))]
    nodes += [_int64_constant(f"{p}/cell{cell}", [cell]) for cell in range(1, cells)]
    windows = {}
    for axis in (2, 3):
        size, kernel, stride = f"{p}/size{axis}", f"{p}/kernel{axis}", f"{p}/stride{axis}"
        nodes.extend([
            helper.make_node("Shape", [tensor], [size], name=size, start=axis, end=axis + 1),
            helper.make_node("Add", [size, f"{p}/gaps"], [f"{size}_up"], name=f"{size}_up"),
            helper.make_node("Div", [f"{size}_up", f"{p}/cells"], [f"{kernel}_least"], name=f"{kernel}_least"),
            helper.make_node("Sub", [size, f"{kernel}_least"], [f"{kernel}_rest"], name=f"{kernel}_rest"),
            helper.make_node("Mod", [f"{kernel}_rest", f"{p}/gaps"], [f"{kernel}_pad"], name=f"{kernel}_pad"),
            helper.make_node("Add", [f"{kernel}_least", f"{kernel}_pad"], [kernel], name=kernel),
            helper.make_node("Sub", [size, kernel], [f"{stride}_span"], name=f"{stride}_span"),
            helper.make_node("Div", [f"{stride}_span", f"{p}/gaps"], [stride], name=stride),
        ])
        windows[axis] = [(f"{p}/zero", kernel)]
        for cell in range(1, cells):
            begin, end = f"{p}/begin{axis}_{cell}", f"{p}/end{axis}_{cell}"
            nodes.extend([helper.make_node("Mul", [stride, f"{p}/cell{cell}"], [begin], name=begin),
                          helper.make_node("Add", [begin, kernel], [end], name=end)])
            windows[axis].append((begin, end))
    means = []
    for row, (row_begin, row_end) in enumerate(windows[2]):
        rows = f"{p}/rows{row}"
        nodes.append(helper.make_node("Slice", [tensor, row_begin, row_end, f"{p}/rows_axis"], [rows], name=rows))
        for column, (column_begin, column_end) in enumerate(windows[3]):
            window = f"{p}/window{row}{column}"
            nodes.append(helper.make_node("Slice", [rows, column_begin, column_end, f"{p}/columns_axis"],
                                          [window], name=window))
            means.append(f"{window}_mean")
            nodes.extend(reduce_nodes("ReduceMean", window, [2, 3], means[-1], means[-1], opset, keepdims=1))
    nodes.append(helper.make_node("Concat", means, [f"{p}/windows"], name=f"{p}/windows", axis=3))
    nodes.append(helper.make_node("Flatten", [f"{p}/windows"], [output], name=f"{p}/flatten", axis=1))
    return nodes


def _sequence_nodes(tensor: str, piece: str, output: str, prefix: str,
                    inputs: Mapping[str, str], opset: int) -> list[onnx.NodeProto]:
    """``[N, S, D] -> [N, D]`` float32: token 0, the last token the mask keeps, or the mean over
    the tokens the mask keeps (summed in float32 whatever the states' type, so pieces
    concatenate in any model).

    A row whose mask is all zero gets zeros from the mean (its token count is clamped to 1)
    and token 0 from the last-token piece.
    """
    kind = piece_kind(piece)
    p = f"{prefix}/{kind}"
    if kind == "first_token":
        return [_int64_constant(f"{p}/index", 0),
                helper.make_node("Gather", [tensor, f"{p}/index"], [f"{p}/token"], name=p, axis=1),
                helper.make_node("Cast", [f"{p}/token"], [output], name=f"{p}/cast", to=onnx.TensorProto.FLOAT)]
    if "@" not in piece:  # token_mean over every token
        return [helper.make_node("Cast", [tensor], [f"{p}/states"], name=f"{p}/cast_states", to=onnx.TensorProto.FLOAT),
                *reduce_nodes("ReduceMean", f"{p}/states", [1], output, p, opset)]
    mask = piece.split("@", 1)[1]
    mask = inputs.get(mask, mask)
    if kind == "last_token":
        return _last_token_nodes(tensor, mask, output, p)
    return [
        _int64_constant(f"{p}/token_axis", [1]),
        _int64_constant(f"{p}/feature_axis", [2]),
        helper.make_node("Constant", [], [f"{p}/one"], name=f"{p}/one",
                         value=helper.make_tensor("one", onnx.TensorProto.FLOAT, [], [1.0])),
        helper.make_node("Cast", [mask], [f"{p}/mask"], name=f"{p}/cast_mask", to=onnx.TensorProto.FLOAT),
        helper.make_node("Unsqueeze", [f"{p}/mask", f"{p}/feature_axis"], [f"{p}/mask3"],
                         name=f"{p}/unsqueeze"),
        helper.make_node("Cast", [tensor], [f"{p}/states"], name=f"{p}/cast_states", to=onnx.TensorProto.FLOAT),
        helper.make_node("Mul", [f"{p}/states", f"{p}/mask3"], [f"{p}/masked"], name=f"{p}/mul"),
        helper.make_node("ReduceSum", [f"{p}/masked", f"{p}/token_axis"], [f"{p}/sum"], name=f"{p}/sum",
                         keepdims=0),
        helper.make_node("ReduceSum", [f"{p}/mask", f"{p}/token_axis"], [f"{p}/count"], name=f"{p}/count",
                         keepdims=1),
        helper.make_node("Max", [f"{p}/count", f"{p}/one"], [f"{p}/count1"], name=f"{p}/clamp"),
        helper.make_node("Div", [f"{p}/sum", f"{p}/count1"], [output], name=f"{p}/div"),
    ]


def _last_token_nodes(tensor: str, mask: str, output: str, p: str) -> list[onnx.NodeProto]:
    """The state at the largest position the mask keeps: ArgMax of ``mask * position``, GatherND."""
    return [
        _int64_constant(f"{p}/zero", 0), _int64_constant(f"{p}/one", 1),
        helper.make_node("Cast", [mask], [f"{p}/mask"], name=f"{p}/cast_mask", to=onnx.TensorProto.INT64),
        helper.make_node("Shape", [f"{p}/mask"], [f"{p}/length"], name=f"{p}/length", start=1, end=2),
        helper.make_node("Squeeze", [f"{p}/length"], [f"{p}/tokens"], name=f"{p}/tokens"),
        helper.make_node("Range", [f"{p}/zero", f"{p}/tokens", f"{p}/one"], [f"{p}/positions"],
                         name=f"{p}/positions"),
        helper.make_node("Mul", [f"{p}/mask", f"{p}/positions"], [f"{p}/kept_positions"], name=f"{p}/mul"),
        helper.make_node("ArgMax", [f"{p}/kept_positions"], [f"{p}/index"], name=f"{p}/argmax", axis=1,
                         keepdims=1),
        helper.make_node("GatherND", [tensor, f"{p}/index"], [f"{p}/token"], name=p, batch_dims=1),
        helper.make_node("Cast", [f"{p}/token"], [output], name=f"{p}/cast", to=onnx.TensorProto.FLOAT),
    ]


def variant_nodes(tensor: str, variant: str, shape: tuple[int, ...], output: str,
                  prefix: str, inputs: Mapping[str, str] | None = None, *,
                  fixed_size: bool = True, opset: int = 18) -> list[onnx.NodeProto]:
    """Nodes writing the concatenated pieces of ``variant`` to ``output``.

    ``inputs`` renames graph inputs that pieces read (see :func:`pooling_inputs`);
    ``fixed_size`` and ``opset`` as for :func:`piece_nodes`.
    """
    pieces = variant_pieces(variant)
    if len(pieces) == 1:
        return piece_nodes(tensor, pieces[0], shape, output, prefix, inputs, fixed_size=fixed_size, opset=opset)
    nodes, names = [], []
    for piece in pieces:
        kind = piece_kind(piece)
        names.append(f"{prefix}/{kind}_features" if kind in SEQUENCE_PIECES else f"{prefix}/{piece}")
        nodes.extend(piece_nodes(tensor, piece, shape, names[-1], prefix, inputs, fixed_size=fixed_size,
                                 opset=opset))
    nodes.append(helper.make_node("Concat", names, [output], name=f"{prefix}/concat", axis=1))
    return nodes
