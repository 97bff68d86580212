"""A small symbolic array module: runs the loss rules of :mod:`ce_fast._rules` once on
symbols instead of arrays and turns what they computed into one CUDA kernel.

The rules are written against an array module ``xp`` (NumPy on the CPU). Given this
module instead, the same code records an expression graph: per-row values (``row``),
values common to every row (``one``: options, 0-d inputs, results of reductions) and
per-class values (``cls``: the class weights). :func:`kernel_source` emits one
``extern "C"`` kernel that evaluates the graph: reductions over rows or classes run in
one block, in a fixed order (each thread sums a fixed stride of rows, then a fixed
tree), so a result does not depend on timing; per-row outputs are written in a
grid-stride loop. Without reductions any grid does.

Only what the rules use is here; anything else fails loudly while tracing, never
silently at run time. Every floating constant becomes a kernel parameter (so a new
label_smoothing value reuses the compiled kernel); the graph's shape, i.e. which
options are on, decides the source.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field
from typing import Any

ROW, ONE, CLS = "row", "one", "cls"
F64, F32, BOOL, I64 = "f64", "f32", "bool", "i64"
_CTYPE = {F64: "double", F32: "float", BOOL: "bool", I64: "long long"}
_BINARY = {"add": "+", "sub": "-", "mul": "*", "div": "/", "lt": "<", "le": "<=", "gt": ">", "ge": ">="}
_BINARY.update({"eq": "==", "ne": "!=", "and": "&&", "or": "||"})
_COMPARE = ("lt", "le", "gt", "ge", "eq", "ne")
_REDUCE = ("sum", "min")


class TraceError(TypeError):
    """A rule did something the symbolic module cannot record."""


class Sym:
    """One node of the expression graph."""

    __slots__ = ("op", "args", "kind", "dtype", "value", "shape")

    def __init__(self, op: str, args: tuple = (), kind: str = ONE, dtype: str = F64, value: Any = None):
        self.op, self.args, self.kind, self.dtype, self.value = op, args, kind, dtype, value
        self.shape: tuple | None = None  # set by reshape: the shape a row output takes

    # -- arithmetic, comparisons, logic
    def _bin(self, op, other, swap=False):
        a, b = (wrap(other), self) if swap else (self, wrap(other))
        return _binary(op, a, b)

    def __add__(self, o):
        return self._bin("add", o)

    def __radd__(self, o):
        return self._bin("add", o, True)

    def __sub__(self, o):
        return self._bin("sub", o)

    def __rsub__(self, o):
        return self._bin("sub", o, True)

    def __mul__(self, o):
        return self._bin("mul", o)

    def __rmul__(self, o):
        return self._bin("mul", o, True)

    def __truediv__(self, o):
        return self._bin("div", o)

    def __rtruediv__(self, o):
        return self._bin("div", o, True)

    def __pow__(self, o):
        return _call("pow", self, wrap(o))

    def __neg__(self):
        return Sym("neg", (self,), self.kind, self.dtype)

    def __lt__(self, o):
        return self._bin("lt", o)

    def __le__(self, o):
        return self._bin("le", o)

    def __gt__(self, o):
        return self._bin("gt", o)

    def __ge__(self, o):
        return self._bin("ge", o)

    def __eq__(self, o):
        return self._bin("eq", o)

    def __ne__(self, o):
        return self._bin("ne", o)

    def __and__(self, o):
        return self._bin("and", o)

    def __rand__(self, o):
        return self._bin("and", o, True)

    def __or__(self, o):
        return self._bin("or", o)

    def __ror__(self, o):
        return self._bin("or", o, True)

    def __invert__(self):
        if self.dtype != BOOL:
            raise TraceError("~ of a non-boolean value")
        return Sym("not", (self,), self.kind, BOOL)

    __hash__ = object.__hash__

    def __bool__(self):
        raise TraceError("a traced value has no truth value: a rule branched on device data")

    def __float__(self):
        raise TraceError("a traced value cannot become a host number (that would be a device sync)")

    __int__ = __float__

    # -- array methods
    def sum(self):
        return _reduce("sum", self)

    def min(self):
        return _reduce("min", self)

    def astype(self, dtype):
        return _cast(self, _dtype(dtype))

    def reshape(self, *shape):
        out = Sym("id", (self,), self.kind, self.dtype)
        out.shape = tuple(shape[0]) if len(shape) == 1 and isinstance(shape[0], tuple) else tuple(shape)
        return out

    def __getitem__(self, index):
        index = wrap(index)
        if self.op != "in" or self.kind != CLS or index.dtype != I64 or index.kind == CLS:
            raise TraceError("only a class input indexed by integer row values is supported")
        return Sym("gather", (self, index), index.kind, self.dtype)


def wrap(v: Any) -> Sym:
    """A symbol, or a Python number as a constant (floats become kernel parameters)."""
    if isinstance(v, Sym):
        return v
    if isinstance(v, bool):
        return Sym("lit", (), ONE, BOOL, v)
    if isinstance(v, int):
        return Sym("lit", (), ONE, I64, v)
    if isinstance(v, float):
        return Sym("const", (), ONE, F64, v)
    raise TraceError(f"cannot trace a value of type {type(v).__name__}")


def _kind(*args: Sym) -> str:
    kinds = {a.kind for a in args} - {ONE}
    if len(kinds) > 1:
        raise TraceError("per-row and per-class values cannot be combined")
    return kinds.pop() if kinds else ONE


def _promote(*args: Sym) -> str:
    dts = {a.dtype for a in args}
    if F64 in dts:
        return F64
    if F32 in dts:
        return F32
    return I64 if I64 in dts else BOOL


def _binary(op: str, a: Sym, b: Sym) -> Sym:
    if op in ("and", "or"):
        if a.dtype != BOOL or b.dtype != BOOL:
            raise TraceError(f"{op} of non-boolean values")
        return Sym(op, (a, b), _kind(a, b), BOOL)
    if a.op == "lit" and a.dtype == I64 and b.dtype != I64:  # 2.0 * x, not an int literal
        a = Sym("const", (), ONE, F64, float(a.value))
    if b.op == "lit" and b.dtype == I64 and a.dtype != I64:
        b = Sym("const", (), ONE, F64, float(b.value))
    dtype = BOOL if op in _COMPARE else _promote(a, b)
    if op == "div" and dtype == I64:
        raise TraceError("integer division is not supported")
    return Sym(op, (a, b), _kind(a, b), dtype)


def _call(fn: str, *args: Sym) -> Sym:
    return Sym(fn, args, _kind(*args), F64 if fn != "isfinite" and fn != "isnan" else BOOL)


def _cast(a: Sym, dtype: str) -> Sym:
    return a if a.dtype == dtype else Sym("cast", (a,), a.kind, dtype)


def _reduce(how: str, a: Sym) -> Sym:
    if a.kind == ONE:
        return a  # the sum or min of one value
    if a.dtype not in (F64, BOOL):
        raise TraceError(f"{how} of {a.dtype} values")
    return Sym(how, (_cast(a, F64),), ONE, F64)


def _dtype(d: Any) -> str:
    if isinstance(d, str) and d in _CTYPE:
        return d
    name = getattr(d, "__name__", str(d))
    for key, names in ((F64, ("float64", "double")), (F32, ("float32",)), (BOOL, ("bool", "bool_")), (I64, ("int64",))):
        if name in names:
            return key
    raise TraceError(f"dtype {d!r} is not supported")


class SymbolicModule:
    """The subset of NumPy's namespace the rules use, recording instead of computing."""

    inf = math.inf
    nan = math.nan
    float64, float32, bool_, int64 = F64, F32, BOOL, I64

    @staticmethod
    def where(cond, a, b):
        if isinstance(cond, bool):  # a condition known on the host picks a branch now
            return a if cond else b
        cond, a, b = wrap(cond), wrap(a), wrap(b)
        if cond.dtype != BOOL:
            raise TraceError("where needs a boolean condition")
        dtype = _promote(a, b)
        return Sym("where", (cond, _cast(a, dtype), _cast(b, dtype)), _kind(cond, a, b), dtype)

    @staticmethod
    def isfinite(a):
        return _call("isfinite", wrap(a))

    @staticmethod
    def isnan(a):
        return _call("isnan", wrap(a))

    @staticmethod
    def maximum(a, b):
        a, b = wrap(a), wrap(b)
        dtype = _promote(a, b)
        return Sym("max", (_cast(a, dtype), _cast(b, dtype)), _kind(a, b), dtype)

    @staticmethod
    def exp(a):
        return _call("exp", _cast(wrap(a), F64))

    @staticmethod
    def expm1(a):
        return _call("expm1", _cast(wrap(a), F64))

    @staticmethod
    def log(a):
        return _call("log", _cast(wrap(a), F64))

    @staticmethod
    def asarray(a, dtype=None):
        a = wrap(a)
        return a if dtype is None else _cast(a, _dtype(dtype))

    @staticmethod
    def broadcast_to(a, shape):
        return wrap(a)  # a value common to every row stands for all of them

    @staticmethod
    def full(shape, value, dtype=None):
        return SymbolicModule.asarray(value, dtype)

    @staticmethod
    def zeros(shape, dtype=None):
        return SymbolicModule.asarray(0.0, dtype)

    @staticmethod
    def arange(n):
        return Sym("cidx", (), CLS, F64)  # the class index: only over the class axis

    @staticmethod
    def stack(values):
        values = [wrap(v) for v in values]
        if any(v.kind != ONE for v in values):
            raise TraceError("only values common to every row can be stacked")
        return Pack(values)


class Pack(list):
    """Values common to every row written side by side into one float64 array (so they can
    be read back at once)."""


xp = SymbolicModule()


def row_input(name: str, dtype: str = F64) -> Sym:
    return Sym("in", (), ROW, dtype, name)


def class_input(name: str) -> Sym:
    return Sym("in", (), CLS, F64, name)


def one_input(name: str, by_value: bool) -> Sym:
    """A value common to every row: a host number passed by value, or a 0-d device array."""
    return Sym("in", (), ONE, F64, (name, by_value))


# ---------------------------------------------------------------- code generation


@dataclass
class Program:
    """A traced rule as one kernel: its source and how to call it."""

    name: str
    source: str
    inputs: list = field(default_factory=list)  # (name, "ptr" | "val") in parameter order
    consts: list = field(default_factory=list)  # float values of the k parameters, in order
    outputs: list = field(default_factory=list)  # (kind, C type, shape or None) in parameter order
    reduces: bool = False  # True: must run as one block

    @property
    def params(self) -> list:
        """(parameter name, kind) as ce_fast._engines.cuda.kernel_args types them."""
        ps = [("rows", "q"), ("C", "q")]
        ps += [(f"in_{n}", "p" if how == "ptr" else "d") for n, how in self.inputs]
        ps += [(f"k{i}", "d") for i in range(len(self.consts))]
        ps += [(f"out{i}", "p") for i in range(len(self.outputs))]
        return ps


def _name(v: Any) -> str:
    return v[0] if isinstance(v, tuple) else v


def compile_program(outputs: list, kinds: list, block: int, prefix: str = "ce_rules") -> Program:
    """One kernel computing `outputs` (symbols); `kinds[i]` is ROW (a per-row array is
    written, a common value broadcast) or ONE (a 0-d result) for output i."""
    order: list[Sym] = []
    seen: set[int] = set()

    def visit(n: Sym) -> None:
        stack = [(n, False)]
        while stack:
            node, done = stack.pop()
            if done:
                order.append(node)
                continue
            if id(node) in seen:
                continue
            seen.add(id(node))
            stack.append((node, True))
            for a in reversed(node.args):
                if id(a) not in seen:
                    stack.append((a, False))

    for o in outputs:
        visit(o)
    for o, k in zip(outputs, kinds):
        if k == ONE and o.kind != ONE:
            raise TraceError("a 0-d output holds a per-row value")
        if o.kind == CLS:
            raise TraceError("a per-class value cannot be an output")

    names = {id(n): f"v{i}" for i, n in enumerate(order)}
    inputs: list = []
    declared: dict[str, str] = {}  # input name -> its parameter declaration
    consts: list = []
    expr: dict[int, str] = {}
    level: dict[int, int] = {}
    for n in order:
        i = id(n)
        level[i] = max((level[id(a)] for a in n.args), default=0) + (1 if n.op in _REDUCE else 0)
        if n.op == "in":
            key = _name(n.value)
            by_value = isinstance(n.value, tuple) and n.value[1]
            if key not in declared:
                inputs.append((key, "val" if by_value else "ptr"))
                declared[key] = f"double in_{key}" if by_value else f"const {_CTYPE[n.dtype]}* __restrict__ in_{key}"
            if n.kind == ONE:
                expr[i] = f"in_{key}" if by_value else f"in_{key}[0]"
            else:
                expr[i] = f"in_{key}[{'r' if n.kind == ROW else 'c'}]"
        elif n.op == "const":
            expr[i] = f"k{len(consts)}"
            consts.append(float(n.value))
        elif n.op == "lit":
            expr[i] = ("true" if n.value else "false") if n.dtype == BOOL else f"{int(n.value)}LL"
        elif n.op in _REDUCE:
            expr[i] = names[i]  # computed by its reduction loop
        elif n.op == "cidx":
            expr[i] = "(double)c"
        elif n.op == "gather":  # the class input's pointer at a per-row index
            expr[i] = f"in_{_name(n.args[0].value)}[{names[id(n.args[1])]}]"
        else:
            expr[i] = _expression(n, [names[id(a)] for a in n.args])

    lines: list[str] = []
    out_params = []
    for k, o in zip(kinds, outputs):
        ctype = _CTYPE[o.dtype] if o.dtype in (F64, F32) else "double"
        out_params.append((k, ctype, o.shape))

    def emit(nodes, indent, kinds_here):
        for n in nodes:
            if n.kind in kinds_here and n.op not in _REDUCE:
                lines.append(f"{indent}const {_CTYPE[n.dtype]} {names[id(n)]} = {expr[id(n)]};")

    def needed(root: Sym, kind: str) -> list:
        """Nodes of `kind` (row or cls) that `root` depends on, in order, stopping at
        common values (already computed outside the loop)."""
        want: set[int] = set()
        stack = [root]
        while stack:
            n = stack.pop()
            if id(n) in want or n.kind != kind or n.op in _REDUCE:
                continue
            want.add(id(n))
            stack.extend(n.args)
        return [n for n in order if id(n) in want]

    reductions = [n for n in order if n.op in _REDUCE]
    # A kernel that reduces is one block: its loops take UNROLL rows a trip, and it may take
    # the registers for them. Without a reduction many blocks hide the latency instead.
    unroll, bounds = (UNROLL, f"{block}, 1") if reductions else (1, f"{block}")
    max_level = max((level[id(n)] for n in reductions), default=0)
    lines.append("    const int tid = threadIdx.x;")
    if reductions:
        lines.append(f"    __shared__ double ce_red[{block}];")
    done: set[int] = set()

    def emit_common(upto: int) -> None:
        """Common values whose reductions are done (in order, so their inputs come first)."""
        for n in order:
            if n.kind == ONE and id(n) not in done and level[id(n)] <= upto and n.op not in _REDUCE:
                lines.append(f"    const {_CTYPE[n.dtype]} {names[id(n)]} = {expr[id(n)]};")
                done.add(id(n))

    for lv in range(1, max_level + 1):
        emit_common(lv - 1)
        for domain, loop_var, bound in ((CLS, "c", "C"), (ROW, "r", "rows")):
            # Every reduction of this level over this axis shares one loop, then each has its tree.
            here = [n for n in reductions if level[id(n)] == lv and n.args[0].kind == domain]
            if not here:
                continue
            for n in here:
                ident = "0.0" if n.op == "sum" else "__longlong_as_double(0x7ff0000000000000LL)"
                for u in range(unroll):
                    lines.append(f"    double {names[id(n)]}_acc{u} = {ident};")
            wanted = {id(m) for n in here for m in needed(n.args[0], domain)}
            lines.append(_loop_head(loop_var, bound, "tid", "blockDim.x", unroll))
            for u in range(unroll):
                lines.append(_trip_head(loop_var, bound, u, "blockDim.x"))
                emit([m for m in order if id(m) in wanted], "            ", (domain,))
                for n in here:
                    acc = f"{names[id(n)]}_acc{u}"
                    lines.append(f"            if (ok) {acc} = {_combine(n.op, acc, names[id(n.args[0])])};")
                lines.append("        }")
            lines.append("    }")
            for n in here:
                a = [f"{names[id(n)]}_acc{u}" for u in range(unroll)]
                while len(a) > 1:  # the partial sums of a thread, in a fixed tree
                    a = [f"({_combine(n.op, a[j], a[j + 1])})" for j in range(0, len(a), 2)]
                lines.append(f"    ce_red[tid] = {a[0]};")
                lines.append("    __syncthreads();")
                lines.append(f"    for (int s = {block // 2}; s > 0; s >>= 1) {{")
                lines.append(f"        if (tid < s) ce_red[tid] = {_combine(n.op, 'ce_red[tid]', 'ce_red[tid + s]')};")
                lines.append("        __syncthreads();")
                lines.append("    }")
                lines.append(f"    const double {names[id(n)]} = ce_red[0];")
                lines.append("    __syncthreads();")
                done.add(id(n))
    emit_common(max_level)

    row_outs = [(i, o) for i, (o, k) in enumerate(zip(outputs, kinds)) if k == ROW]
    if row_outs:
        row_nodes: list = []
        for _, o in row_outs:
            row_nodes += needed(o, ROW)
        ids = {id(n) for n in row_nodes}
        step = "(long long)gridDim.x * blockDim.x"
        lines.append(_loop_head("r", "rows", "(long long)blockIdx.x * blockDim.x + tid", step, unroll))
        for u in range(unroll):
            lines.append(_trip_head("r", "rows", u, step))
            emit([n for n in order if id(n) in ids], "            ", (ROW,))
            for i, o in row_outs:
                lines.append(f"            if (ok) out{i}[r] = ({out_params[i][1]}){names[id(o)]};")
            lines.append("        }")
        lines.append("    }")
    one_outs = [(i, o) for i, (o, k) in enumerate(zip(outputs, kinds)) if k == ONE]
    if one_outs:
        lines.append("    if (blockIdx.x == 0 && tid == 0) {")
        for i, o in one_outs:
            lines.append(f"        out{i}[0] = ({out_params[i][1]}){names[id(o)]};")
        lines.append("    }")

    params = ["long long rows", "long long C"] + [declared[key] for key, _ in inputs]
    params += [f"double k{i}" for i in range(len(consts))]
    params += [f"{ctype}* __restrict__ out{i}" for i, (_, ctype, _) in enumerate(out_params)]
    body = "\n".join(lines)
    head = ",\n    ".join(params)

    digest = hashlib.sha256((head + body).encode()).hexdigest()[:16]
    name = f"{prefix}_{digest}"
    source = (
        "// Generated by ce_fast._symbolic from the loss rules of ce_fast._rules.\n"
        f'extern "C" __global__ void __launch_bounds__({bounds}) {name}(\n    {head}) {{\n{body}\n}}\n'
    )
    return Program(name, source, inputs, consts, out_params, bool(reductions))


# Rows (or classes) a thread of a reducing rule kernel takes per loop trip: their loads are
# in flight together (that kernel is one block, so a trip's memory latency is its time).
UNROLL = 4


def _loop_head(var: str, bound: str, start: str, step: str, unroll: int) -> str:
    """A strided loop over `var` < `bound` taking `unroll` values a trip (see _trip_head)."""
    # No trip count (unroll 1): a 64-bit division, with a stack frame.
    return f"#pragma unroll 1\n    for (long long {var}0 = {start}; {var}0 < {bound}; {var}0 += {unroll}LL * {step}) {{"


def _trip_head(var: str, bound: str, u: int, step: str) -> str:
    """The scope of value `u` of a loop trip. Past the end (`ok` false) it reads the last
    value again and neither accumulates nor stores: every load of a trip is then free of a
    branch, and they all go out together. Accumulators are named per `u`: no array that
    could land in local memory."""
    at = f"{var}0 + {u}LL * {step}"
    return (
        f"        {{\n            const bool ok = {at} < {bound};\n"
        f"            const long long {var} = ok ? {at} : {bound} - 1;"
    )


def _combine(op: str, a: str, b: str) -> str:
    if op == "sum":
        return f"{a} + {b}"
    return f"(({a}) != ({a}) || ({a}) < ({b})) ? ({a}) : ({b})"  # NaN-propagating min, as NumPy's


def _expression(n: Sym, a: list) -> str:
    op = n.op
    if op in _BINARY:
        return f"({a[0]} {_BINARY[op]} {a[1]})"
    if op == "neg":
        return f"(-{a[0]})"
    if op == "not":
        return f"(!{a[0]})"
    if op == "id":
        return a[0]
    if op == "cast":
        return f"(({_CTYPE[n.dtype]}){a[0]})"
    if op == "where":
        return f"({a[0]} ? {a[1]} : {a[2]})"
    if op == "isfinite":
        return f"({a[0]} - {a[0]} == 0.0)"  # false for inf and NaN, without math headers
    if op == "isnan":
        return f"({a[0]} != {a[0]})"
    if op == "max":
        if n.dtype == I64:
            return f"({a[0]} > {a[1]} ? {a[0]} : {a[1]})"
        return f"(({a[0]} != {a[0]} || {a[0]} > {a[1]}) ? {a[0]} : {a[1]})"  # NaN-propagating, as NumPy's
    if op in ("exp", "expm1", "log", "pow"):
        return f"{op}({', '.join(a)})"
    raise TraceError(f"no code for {op}")  # pragma: no cover - every op above has code
