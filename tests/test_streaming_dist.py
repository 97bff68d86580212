"""StreamingCrossEntropy.all_reduce over torch.distributed: two gloo processes on this
machine end with the state of all rows, bitwise the single-process result."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

import ce_fast
from ce_fast.streaming import StreamingCrossEntropy

WORKER = textwrap.dedent(
    """
    import json, sys
    from datetime import timedelta
    import numpy as np
    import torch.distributed as dist
    from ce_fast import StreamingCrossEntropy

    rank, world, port, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=60))
    rng = np.random.default_rng(0)
    x = rng.standard_normal((90, 17)).astype(np.float32) * 4
    y = rng.integers(0, 17, 90)
    y[::7] = -100
    acc = StreamingCrossEntropy()
    for a in range(rank * 10, 90, world * 10):  # rank r takes every world-th block of 10 rows
        acc.update(x[a : a + 10], y[a : a + 10])
    assert acc.all_reduce() is acc
    with open(out, "w") as f:
        json.dump(acc.state_dict(), f)
    dist.destroy_process_group()
    """
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_all_reduce_two_gloo_processes(tmp_path):
    pytest.importorskip("torch.distributed")
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    env = dict(os.environ)
    # The workers import the same ce_fast as this test (installed, or the checkout's).
    pkg_root = Path(ce_fast.__file__).resolve().parent.parent
    env["PYTHONPATH"] = os.pathsep.join([str(pkg_root), env.get("PYTHONPATH", "")])
    env["OMP_NUM_THREADS"] = "1"
    port = _free_port()
    outs = [tmp_path / f"rank{r}.json" for r in range(2)]
    procs = [
        subprocess.Popen(
            [sys.executable, str(script), str(r), "2", str(port), str(outs[r])],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        for r in range(2)
    ]
    logs = []
    try:
        for p in procs:
            out, _ = p.communicate(timeout=120)  # a hung rank fails the test, never the suite
            logs.append(out.decode(errors="replace")[-3000:])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    assert [p.returncode for p in procs] == [0, 0], "\n".join(logs)
    import json

    states = [json.loads(o.read_text()) for o in outs]
    rng = np.random.default_rng(0)
    x = rng.standard_normal((90, 17)).astype(np.float32) * 4
    y = rng.integers(0, 17, 90)
    y[::7] = -100
    whole = StreamingCrossEntropy().update(x, y)
    assert states[0] == states[1] == whole.state_dict()
    assert StreamingCrossEntropy().load_state_dict(states[0]).result() == whole.result()


def test_all_reduce_needs_an_initialised_group():
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():  # pragma: no cover
        pytest.skip("a process group is already initialised")
    with pytest.raises(RuntimeError, match="all_reduce needs torch.distributed initialised"):
        StreamingCrossEntropy().all_reduce()


def test_limbs_round_trip():
    from ce_fast._eval_dist import from_limbs, to_limbs

    for v in (0, 1, -1, (1 << 2200) + 12345, -((1 << 1500) - 1)):
        assert from_limbs(to_limbs(v)) == v
    assert from_limbs([a + b for a, b in zip(to_limbs(1 << 1000), to_limbs(-(1 << 999)))]) == 1 << 999
