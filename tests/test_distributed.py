"""Two real processes on CPU (gloo DDP): identical ranks and parameters after conversion and cuts, and the
same losses as one process with the same global batch."""

import json
import os
import subprocess
import sys

import pytest
import torch

WORKER = os.path.join(os.path.dirname(__file__), "dist_worker.py")


def _run(mode, out, processes, **env_extra):
    env = {**os.environ, "OMP_NUM_THREADS": "1", **env_extra}
    if processes == 1:
        cmd = [sys.executable, WORKER, mode, str(out)]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes),
               "--master_port", str(29500 + os.getpid() % 1000), WORKER, mode, str(out)]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    return [json.loads((out / f"rank{i}.json").read_text()) for i in range(processes)]


@pytest.mark.parametrize("mode", ["trainer", "raw"])
def test_two_processes_stay_identical_and_match_one_process(mode, tmp_path):
    (tmp_path / "two").mkdir()
    (tmp_path / "one").mkdir()
    two = _run(mode, tmp_path / "two", 2)
    one = _run(mode, tmp_path / "one", 1)[0]
    for record in two:
        assert record["num_processes"] == 2 and "MULTI_CPU" in record["distributed_type"]
    first, second = two
    assert "convert" in first["events"] and "update" in first["events"]
    assert any(r < 8 for r in first["ranks"].values())  # at least one cut below the starting rank 8
    assert first["ranks"] == second["ranks"] == one["ranks"]
    assert first["checksums"] == second["checksums"]  # bit-identical parameters on both processes
    assert first["events"] == one["events"]
    torch.testing.assert_close(torch.tensor(first["losses"]), torch.tensor(one["losses"]), atol=2e-4, rtol=1e-4)
    (name, dense_two), = first["dense"].items()
    torch.testing.assert_close(torch.tensor(dense_two), torch.tensor(one["dense"][name]), atol=2e-4, rtol=1e-3)


def test_two_processes_with_bf16(tmp_path):
    two = _run("trainer", tmp_path, 2, WORKER_BF16="1")
    assert two[0]["ranks"] == two[1]["ranks"] and two[0]["checksums"] == two[1]["checksums"]
