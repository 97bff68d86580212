"""The README's Python examples run as written and say what they claim."""

import pathlib
import re

import pytest

README = pathlib.Path(__file__).resolve().parent.parent / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_has_examples():
    assert len(BLOCKS) >= 3


@pytest.mark.parametrize("code", BLOCKS, ids=[f"block{i}" for i in range(len(BLOCKS))])
def test_readme_example_runs(code):
    exec(compile(code, str(README), "exec"), {"__name__": "readme"})


def test_readme_moveaxis_matches_torch():
    import numpy as np
    import torch
    import torch.nn.functional as F

    import ce_fast

    x = np.random.default_rng(1).standard_normal((4, 10, 7, 7), dtype=np.float32)
    y = np.random.default_rng(2).integers(0, 10, size=(4, 7, 7))
    got = float(ce_fast.cross_entropy(np.moveaxis(x, 1, -1), y))
    want = F.cross_entropy(torch.from_numpy(x).double(), torch.from_numpy(y)).item()
    assert abs(got - want) <= 1e-6 * abs(want)
