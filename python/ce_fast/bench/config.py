"""The options of ``ce-fast bench`` as one value, their defaults and their parsers.

Nothing here knows about argparse: the parsers raise :class:`ValueError` with the
message the command line shows.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

DEFAULT_SIZES = "4096x32000,4096x128256,1024x256000"
GPU_DEFAULT_SIZES = "16384x32000,16384x128256,16384x262144"  # --device cuda
DEFAULT_DTYPES = "float32,bfloat16"
DEFAULT_OPS = "fwd,fwd+bwd,inplace"
DEFAULT_REPEAT = {"cpu": 3, "cuda": 20}
DEFAULT_WARMUP = {"cpu": 1, "cuda": 3}
GPU_DTYPES = ("float32", "bfloat16", "float16")  # what the CUDA kernels take
OPS = ("fwd", "fwd+bwd", "fwd+bwd in-place")
OP_ALIASES: Mapping[str, str] = {
    "fwd": "fwd",
    "forward": "fwd",
    "fwd+bwd": "fwd+bwd",
    "fwdbwd": "fwd+bwd",
    "grad": "fwd+bwd",
    "inplace": "fwd+bwd in-place",
    "in-place": "fwd+bwd in-place",
    "fwd+bwd in-place": "fwd+bwd in-place",
}
DTYPE_ALIASES: Mapping[str, str] = {
    "float32": "float32",
    "f32": "float32",
    "fp32": "float32",
    "bfloat16": "bfloat16",
    "bf16": "bfloat16",
    "float16": "float16",
    "f16": "float16",
    "fp16": "float16",
    "half": "float16",
    "float64": "float64",
    "f64": "float64",
    "fp64": "float64",
}
SCHEMA = "ce_fast.bench/1"
LOSS_RTOL_NUMPY = 1e-5
# torch returns a bfloat16 / float16 loss for such input: its rounding alone is ~4e-3.
# torch's CPU bfloat16 loss is itself rounded and accumulated coarsely: 1.2e-2 off the
# float64 value was seen at 4096x32000 (ce_fast matched NumPy's float32 loss exactly).
LOSS_RTOL_TORCH = {"float32": 1e-5, "float64": 1e-9, "bfloat16": 3e-2, "float16": 2e-3}

Shape = tuple[int, ...]


def format_size(shape: Sequence[int]) -> str:
    """``(4096, 128256)`` -> ``"4096x128256"``."""
    return "x".join(str(int(d)) for d in shape)


def parse_sizes(text: str) -> list[Shape]:
    """Comma-separated logits shapes ``ROWSxCLASSES`` (or ``AxBxCLASSES``) as tuples.

    Raises :class:`ValueError` for a malformed or non-positive size, or none at all.
    """
    out = []
    for part in text.split(","):
        part = part.strip().lower()
        if not part:
            continue
        try:
            dims = tuple(int(d) for d in part.split("x"))
        except ValueError:
            raise ValueError(f"bad size {part!r}: expected ROWSxCLASSES like 4096x128256") from None
        if len(dims) < 2 or any(d <= 0 for d in dims):
            raise ValueError(f"bad size {part!r}: expected positive ROWSxCLASSES like 4096x128256")
        out.append(dims)
    if not out:
        raise ValueError("no sizes given")
    return out


def _parse_names(text: str, aliases: Mapping[str, str], what: str) -> list[str]:
    out: list[str] = []
    for part in text.split(","):
        key = part.strip().lower()
        if not key:
            continue
        if key not in aliases:
            choices = ", ".join(sorted(set(aliases.values())))
            raise ValueError(f"unknown {what} {part.strip()!r}; choose from {choices}")
        if aliases[key] not in out:
            out.append(aliases[key])
    if not out:
        raise ValueError(f"no {what} given")
    return out


def parse_dtypes(text: str) -> list[str]:
    """Comma-separated dtype names or aliases (``bf16``, ``f32``...) as canonical
    names, first occurrence kept. Raises :class:`ValueError` for an unknown one."""
    return _parse_names(text, DTYPE_ALIASES, "dtype")


def parse_ops(text: str) -> list[str]:
    """Comma-separated op names or aliases (``fwd``, ``fwd+bwd``, ``inplace``...) as
    names from :data:`OPS`, in the order given. Raises :class:`ValueError` for an
    unknown one."""
    return _parse_names(text, OP_ALIASES, "op")


@dataclass
class Config:
    """What one ``ce-fast bench`` run measures. :meth:`create` fills in the
    device-dependent defaults; the fields are the resolved values."""

    sizes: list[Shape]
    dtypes: list[str]
    ops: list[str]
    repeat: int = 3
    warmup: int = 1
    threads: int | None = None
    numpy: bool = True
    torch: bool = True
    copy: bool = True
    device: str = "cpu"
    slow_s: float = 1.0
    baseline_repeat: int | None = None
    seed: int = 0
    argv: list[str] = field(default_factory=list)
    compile: bool = True  # torch.compile baseline (--device cuda)
    arrays: str | None = None  # "torch" / "cupy" inputs for --device cuda (None: torch if it has CUDA)
    training: list[Shape] = field(default_factory=list)  # training-step table sizes (CPU, needs torch)

    @classmethod
    def create(
        cls,
        *,
        device: str = "cpu",
        sizes: str | Sequence[Shape] | None = None,
        dtypes: str | Sequence[str] = DEFAULT_DTYPES,
        ops: str | Sequence[str] = DEFAULT_OPS,
        repeat: int | None = None,
        warmup: int | None = None,
        argv: Sequence[str] = (),
        **options: object,
    ) -> Config:
        """A config with the defaults of ``device`` for whatever is ``None``: sizes
        (:data:`DEFAULT_SIZES`, or :data:`GPU_DEFAULT_SIZES` for ``"cuda"``), repeat and
        warm-up. Sizes, dtypes and ops may be given as text (parsed as the command line
        does) or as lists; ops are put in :data:`OPS` order. ``options`` are the other
        fields as they are."""
        if sizes is None:
            sizes = GPU_DEFAULT_SIZES if device == "cuda" else DEFAULT_SIZES
        size_list = parse_sizes(sizes) if isinstance(sizes, str) else [tuple(s) for s in sizes]
        dtype_list = parse_dtypes(dtypes) if isinstance(dtypes, str) else list(dtypes)
        op_list = parse_ops(ops) if isinstance(ops, str) else list(ops)
        return cls(
            sizes=size_list,
            dtypes=dtype_list,
            ops=[o for o in OPS if o in op_list],
            repeat=repeat if repeat is not None else DEFAULT_REPEAT.get(device, 3),
            warmup=warmup if warmup is not None else DEFAULT_WARMUP.get(device, 1),
            device=device,
            argv=list(argv),
            **options,  # type: ignore[arg-type]
        )

    def problem(self) -> str | None:
        """Why this combination of options cannot run (``None`` when it can)."""
        if self.device == "cuda" and any(d not in GPU_DTYPES for d in self.dtypes):
            missing = ", ".join(d for d in self.dtypes if d not in GPU_DTYPES)
            return f"--device cuda benches {', '.join(GPU_DTYPES)}; the CUDA engine has no {missing}"
        if self.arrays is not None and self.device != "cuda":
            return "--arrays applies to --device cuda only"
        return None

    def to_json(self) -> dict:
        """The options as recorded in the results' ``config``."""
        return {
            "sizes": [list(s) for s in self.sizes],
            "dtypes": self.dtypes,
            "ops": self.ops,
            "repeat": self.repeat,
            "warmup": self.warmup,
            "threads": self.threads,
            "numpy": self.numpy,
            "torch": self.torch,
            "device": self.device,
            "slow_s": self.slow_s,
            "baseline_repeat": self.baseline_repeat,
            "seed": self.seed,
            "compile": self.compile,
            "arrays": self.arrays,
            "training": [list(t) for t in self.training],
        }
