"""Two-process `torchrun` (gloo, CPU) DHKD training matches the single-process loss curve and saves once."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).with_name("ddp_distill_script.py")


def _run(out: Path, nproc: int, bs: int) -> dict:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port",
           str(29500 + nproc + os.getpid() % 500), str(SCRIPT), str(out), str(bs)]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(SCRIPT.parent)}
    subprocess.run(cmd, check=True, env=env, timeout=600)
    return json.loads((out / "curve.json").read_text())


@pytest.mark.slow
def test_torchrun_two_processes_match_single_process(tmp_path):
    single = _run(tmp_path / "single", 1, 16)
    ddp = _run(tmp_path / "ddp", 2, 8)
    assert ddp["world"] == 2 and ddp["wrapped"] == "DistributedDataParallel"
    losses_1 = [r["loss"] for r in single["history"]]
    losses_2 = [r["loss"] for r in ddp["history"]]
    assert len(losses_1) == len(losses_2) == 6
    assert losses_1[-1] < losses_1[0]
    for a, b in zip(losses_1, losses_2):
        assert b == pytest.approx(a, rel=2e-3, abs=1e-4)
    for key in ("loss_ce", "loss_kd", "loss_logit_aux"):
        assert ddp["history"][-1][key] == pytest.approx(single["history"][-1][key], rel=2e-3, abs=1e-4)
    # exactly one checkpoint: one weights file in the output folder, written by rank 0
    weights = sorted(p.name for p in (tmp_path / "ddp").glob("*.safetensors"))
    assert weights == ["model.safetensors"]
