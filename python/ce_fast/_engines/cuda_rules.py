"""The loss rules on a CUDA device: one generated kernel per rule and option set.

:func:`apply` runs a rule of :mod:`ce_fast._rules` (``_rules.loss``,
``_rules.grad_coef``) on the batch's device. The rule is traced once per option set
and shape (:mod:`ce_fast._symbolic`: the very code the CPU engine runs with NumPy) into
one kernel, compiled by NVRTC on first use; a call is then one launch that reads the
per-row statistics and writes the result. Reductions (sum, mean) run in that kernel,
in one block and a fixed order: a call gives the same bits every time, and nothing is
read back on the host.
"""

from __future__ import annotations

import dataclasses
import threading
from typing import Any

import numpy as np

from .. import _symbolic as sym
from .._types import Batch, GradCoef

RULE_BLOCK = 256  # threads of a rule kernel (a power of two: the reduction tree halves it)
MAX_TRACES = 256  # traced (rule, options, shape) entries kept

_traces: dict[tuple, tuple] = {}
_lock = threading.Lock()


def _placement(value: Any, xp: Any) -> str:
    """How a scalar-or-row input reaches the kernel: "float" (a constant of the trace),
    "host" (a host number, passed by value), "device" (a 0-d device array, by pointer) or
    "rows" (one value per row)."""
    if value is None or isinstance(value, float):
        return "float"
    on_device = isinstance(value, xp.ndarray)
    if getattr(value, "ndim", 0) == 0:
        return "device" if on_device else "host"
    return "rows"


def _one(name: str, value: Any, xp: Any) -> Any:
    """The symbol of a value common to every row, or of one value per row; plain floats
    stay floats (constants of the trace)."""
    where = _placement(value, xp)
    if where == "float":
        return value
    if where == "rows":
        return sym.row_input(name)
    return sym.one_input(name, where == "host")


def _symbolic(b: Batch, stats: tuple, xp: Any) -> tuple[Batch, tuple]:
    """A copy of the batch and statistics with symbols where the device arrays are."""
    repl: dict[str, Any] = {"xp": sym.xp}
    for name, dtype in (("target", sym.I64), ("valid", sym.BOOL), ("wy", sym.F64)):
        repl[name] = None if getattr(b, name) is None else sym.row_input(name, dtype)
    for name in ("weight", "alpha"):
        repl[name] = None if getattr(b, name) is None else sym.class_input(name)
    repl["weight_total"] = _one("weight_total", b.weight_total, xp)
    if b.grad_output is not None:
        repl["grad_output"] = _one("grad_output", b.grad_output, xp)
    ss = tuple(
        dataclasses.replace(s, **{f: None if v is None else sym.row_input(f) for f, v in _fields(s)}) for s in stats
    )
    return dataclasses.replace(b, **repl), ss


_field_names: dict[type, tuple[str, ...]] = {}


def _fields(stats: Any) -> list[tuple[str, Any]]:
    """(name, array or None) of each per-row statistic (Stats, KlStats)."""
    names = _field_names.get(type(stats))
    if names is None:
        names = _field_names[type(stats)] = tuple(f.name for f in dataclasses.fields(stats))
    return [(n, getattr(stats, n)) for n in names]


def _flatten(result: Any) -> tuple[list, list, Any]:
    """(output symbols, their kinds, a function building the result from the arrays)."""
    if isinstance(result, sym.Pack):  # one float64 array: apply passes pointers into it
        return list(result), [sym.ONE] * len(result), None
    if isinstance(result, sym.Sym):
        return [result], [sym.ROW if result.kind == sym.ROW else sym.ONE], lambda arrays: arrays[0]
    if isinstance(result, GradCoef):
        names = [f for f in ("a0", "b", "g") if isinstance(getattr(result, f), sym.Sym)]
        outs = [getattr(result, f) for f in names]

        def coef(arrays):
            return dataclasses.replace(result, **dict(zip(names, arrays)))

        return outs, [sym.ROW] * len(outs), coef  # the row kernels take one value per row
    raise sym.TraceError(f"a rule returned {type(result).__name__}, not a traced value or GradCoef")


def _trace(rule: Any, b: Batch, spec: Any, stats: tuple, options: dict, xp: Any) -> tuple:
    """(program, the shape of each output or None, the result builder) of a rule; `xp`: the
    engine's array module (which values are device arrays)."""
    sb, ss = _symbolic(b, stats, xp)
    outs, kinds, build = _flatten(rule(sb, spec, *ss, **options))
    program = sym.compile_program(outs, kinds, RULE_BLOCK)
    shapes = [o.shape for o in outs]
    return program, shapes, build


def _launch_plan(program: Any) -> tuple:
    """What every launch of `program` repeats: its inputs ((name, by value?) in parameter
    order), its constants typed as kernel_args types them, and its outputs ((per row?,
    float32?) in order). Parameters: rows, C, the inputs, the constants, the outputs."""
    inputs = tuple((name, how == "val") for name, how in program.inputs)
    consts = tuple(np.float64(float(k)) for k in program.consts)
    outputs = tuple((kind == sym.ROW, ctype == "float") for kind, ctype, _ in program.outputs)
    expect = [("rows", "q"), ("C", "q")]
    expect += [(f"in_{n}", "d" if val else "p") for n, val in inputs]
    expect += [(f"k{i}", "d") for i in range(len(consts))] + [(f"out{i}", "p") for i in range(len(outputs))]
    if program.params != expect:  # pragma: no cover - apply passes the arguments in this order
        raise sym.TraceError(f"{program.name}: unexpected parameters {program.params}")
    return inputs, consts, outputs


def apply(engine: Any, rule: Any, b: Batch, spec: Any, *stats: Any, **options: Any) -> Any:
    """``rule(b, spec, *stats, **options)`` computed on the device by one kernel launch of
    `engine` (the ce_fast._engines.cuda module: its array module, compiler and launcher),
    on the current stream, with no host sync. `stats`: at most one set of per-row
    statistics (Stats, KlStats); `options`: hashable values the rule branches on or
    uses as constants (e.g. the focal gamma). Results are CuPy arrays: per-row values
    of shape (rows,) (or the rule's reshape), 0-d arrays for reductions, one float64
    array for values the rule stacks (``xp.stack``: read back at once)."""
    if len(stats) > 1:
        raise ValueError("a rule takes at most one set of statistics")
    rows = b.rows
    if rows == 0:
        return rule(b, spec, *stats, **options)  # CuPy on empty arrays: no kernel to build or launch
    opts = tuple(sorted(options.items())) if options else ()
    key: tuple = (rule, spec, opts, b.classes, b.x.shape[:-1], b.out_dtype)
    cp = engine.xp()
    key += _signature(b, stats, cp)
    hit = _traces.get(key)
    if hit is None:
        hit = _trace(rule, b, spec, stats, options, cp)
        hit += (_launch_plan(hit[0]),)
        with _lock:
            if len(_traces) >= MAX_TRACES:
                _traces.pop(next(iter(_traces)))
            _traces[key] = hit
    program, shapes, build, (inputs, consts, outputs) = hit
    kinds = engine._KINDS
    ptr, real = kinds["p"], kinds["d"]
    if build is None:  # stacked values: one array, the kernel writes each at its place
        packed = cp.empty(len(outputs), dtype=cp.float64)
        at = engine._ptr(packed)
        outs: list = [at + 8 * i for i in range(len(outputs))]
    elif len(outputs) == 1:
        per_row, single = outputs[0]
        outs = [cp.empty(rows if per_row else (), dtype=cp.float32 if single else cp.float64)]
    else:  # several outputs: views of one allocation, each at an 8-byte aligned offset
        sizes = [(rows if per_row else 1) * (4 if single else 8) for per_row, single in outputs]
        buf = cp.empty(sum(-(-n // 8) * 8 for n in sizes), dtype=cp.uint8)
        outs, at = [], 0
        for (per_row, single), n in zip(outputs, sizes):
            a = buf[at : at + n].view(cp.float32 if single else cp.float64)
            outs.append(a if per_row else a.reshape(()))
            at += -(-n // 8) * 8
    args = [kinds["q"](rows), kinds["q"](b.classes)]
    for name, by_value in inputs:
        v = _input(b, stats, name, cp)
        args.append(real(float(v)) if by_value else ptr(v))
    args += consts
    args += [ptr(a) for a in outs]
    if program.reduces:
        grid = 1
    else:
        sms, _ = engine._device_info(engine._device_id(b.x))
        grid = max(1, min(-(-rows // RULE_BLOCK), sms * 4))
    engine._generated(program)((grid,), (RULE_BLOCK,), tuple(args))
    if build is None:
        return packed
    return build([a.reshape(s) if s is not None and a.ndim == 1 else a for a, s in zip(outs, shapes)])


def _signature(b: Batch, stats: tuple, xp: Any) -> tuple:
    """What decides the traced program besides the rule, the options and the shape."""
    sig: list = [b.target is None, b.valid is None, b.wy is None, b.weight is None, b.alpha is None, b.soft is None]
    for v in (b.weight_total, b.grad_output):
        where = _placement(v, xp)
        sig.append(v if where == "float" else where)  # a float is a constant of the trace
    for s in stats:
        sig.append((type(s).__name__, tuple(v is None for _, v in _fields(s))))
    return tuple(sig)


def _input(b: Batch, stats: tuple, name: str, xp: Any) -> Any:
    if stats and name in _field_names[type(stats[0])]:
        return getattr(stats[0], name)
    v = getattr(b, name)
    if name == "grad_output" and getattr(v, "ndim", 0) != 0:
        return xp.ascontiguousarray(v).reshape(-1)  # one float64 per row
    return v
