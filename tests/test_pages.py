"""Fresh gradients the size of the logits are asked to live on huge pages (Linux
madvise(MADV_HUGEPAGE), see rust/pages.rs): torch's allocator does not ask, and the
first write of a 2 GiB gradient otherwise takes half a million page faults."""

from __future__ import annotations

import os
import re

import pytest
import torch

import ce_fast.torch as ct

THP = "/sys/kernel/mm/transparent_hugepage/enabled"
pytestmark = pytest.mark.skipif(not os.path.exists(THP), reason="no transparent huge pages on this kernel")

MIB = 1 << 20


def vm_flags(addr: int) -> set[str]:
    """The VmFlags of the mapping holding `addr`, from /proc/self/smaps."""
    inside = False
    with open("/proc/self/smaps") as f:
        for line in f:
            m = re.match(r"^([0-9a-f]+)-([0-9a-f]+) ", line)
            if m:
                inside = int(m.group(1), 16) <= addr < int(m.group(2), 16)
            elif inside and line.startswith("VmFlags:"):
                return set(line.split()[1:])
    raise LookupError(f"no mapping holds {addr:#x}")


# 64 MiB of float32: above glibc's largest mmap threshold (32 MiB), so every such tensor
# is a mapping of its own, and the control below cannot share the gradient's.
SHAPE = (64, 262144)


@pytest.mark.parametrize("options", [{}, {"label_smoothing": 0.1}], ids=["plain", "general"])
def test_large_fresh_gradient_asks_for_huge_pages(options):
    g = torch.Generator().manual_seed(0)
    z = torch.randn(*SHAPE, generator=g).requires_grad_()
    y = torch.randint(0, SHAPE[1], SHAPE[:1], generator=g)
    ct.cross_entropy(z, y, **options).backward()
    assert "hg" in vm_flags(z.grad.data_ptr() + 8 * MIB)
    control = torch.empty(SHAPE)
    assert "hg" not in vm_flags(control.data_ptr() + 8 * MIB)


def test_in_place_gradient_leaves_the_logits_mapping_alone():
    z = torch.randn(*SHAPE)
    leaf = z.clone().requires_grad_()
    logits = leaf * 1.0
    ct.cross_entropy(logits, torch.zeros(SHAPE[0], dtype=torch.int64), inplace_backward=True).backward()
    assert "hg" not in vm_flags(logits.data_ptr() + 8 * MIB)  # the logits' own memory
