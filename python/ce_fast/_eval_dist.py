"""All-reduce of an evaluation state over ``torch.distributed``: the counts and the exact
fixed-point loss sum travel as int64 limbs, so the sum over ranks stays exact."""

from __future__ import annotations

from typing import Any

LIMB_BITS = 32
#: 80 limbs of 32 bits hold |sum| < 2**2560: every double's 2**1074-scaled value times 2**400 rows.
LIMBS = 80


def to_limbs(v: int) -> list[int]:
    """Signed 32-bit-limb digits of `v` (each |limb| < 2**32, all of v's sign); sums of up
    to 2**31 such vectors fit int64 and recombine exactly with :func:`from_limbs`."""
    sign, mag = (-1 if v < 0 else 1), abs(v)
    if mag >> (LIMB_BITS * LIMBS):
        raise OverflowError("loss sum too large to all-reduce")
    mask = (1 << LIMB_BITS) - 1
    return [sign * ((mag >> (LIMB_BITS * i)) & mask) for i in range(LIMBS)]


def from_limbs(limbs: list[int]) -> int:
    return sum(int(v) << (LIMB_BITS * i) for i, v in enumerate(limbs))


def all_reduce_state(values: list[int], group: Any = None) -> list[int]:
    """Sums of the ints `values` (counts, then the fixed-point loss sum, then more counts)
    over the ranks of `group`. Index 2 is the big fixed-point sum."""
    import torch
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("all_reduce needs torch.distributed initialised (torch.distributed.init_process_group)")
    counts = values[:2] + values[3:]
    flat = counts + to_limbs(values[2])
    backend = str(dist.get_backend(group)).lower()
    device = torch.device("cpu")
    if "nccl" in backend:
        device = torch.device("cuda", torch.cuda.current_device())
    t = torch.tensor(flat, dtype=torch.int64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group)
    out = [int(v) for v in t.cpu().tolist()]
    n = len(counts)
    summed = out[:n]
    return summed[:2] + [from_limbs(out[n:])] + summed[2:]
