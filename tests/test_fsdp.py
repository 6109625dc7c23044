"""FSDP2 (`fully_shard`) with rank changes, two real gloo processes on CPU, and decisions spread over processes.

One `torchrun` launch runs both scenarios (tests/fsdp_worker.py); the one-process references run here."""

import json
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

import fsdp_worker
from conftest import tiny_gpt2
from hf_lowrank import LowRankConfig, get_lowrank_model
from hf_lowrank.sharding import ALLOW_FSDP2_ENV, assign_owners, check_sharded_training

WORKER = os.path.join(os.path.dirname(__file__), "fsdp_worker.py")


@pytest.fixture(scope="module")
def two(tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--master_port", str(30500 + os.getpid() % 1000), WORKER, str(out)]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    return [json.loads((out / f"rank{i}.json").read_text()) for i in range(2)]


def _dense(full, prefix):
    U, V = torch.as_tensor(full[prefix + ".U"]), torch.as_tensor(full[prefix + ".V"])
    S = torch.as_tensor(full[prefix + ".S"]) if prefix + ".S" in full else torch.eye(U.shape[1])
    return U @ S @ V.t()


@pytest.mark.parametrize("name,events", [("oialr", ["start", "convert", "update", "update"]),
                                         ("inrank", ["start", "grow", "grow", "freeze"])])
def test_rank_changes_under_fully_shard(two, name, events):
    first, second = (record[name] for record in two)
    assert two[0]["world"] == 2
    assert first["events"] == events
    assert first["sharded"] and first["stale_fsdp_params"] == 0  # re-sharded; no group gathers replaced params
    assert first["ranks"] == second["ranks"]
    assert first["checksums"] == second["checksums"]  # identical full parameters on both processes
    # one process, unsharded, whole global batch: same events, ranks, losses and weights
    losses, ranks, ref_events, state = fsdp_worker.reference(name)
    assert ref_events == events and ranks == first["ranks"]
    torch.testing.assert_close(torch.tensor(first["losses"]), torch.tensor(losses), atol=2e-4, rtol=1e-4)
    prefix = "transformer.h.1.mlp.c_fc"
    ref = {k: v for k, v in state.items() if k.startswith(prefix)}
    torch.testing.assert_close(_dense(first["full"], prefix), _dense(ref, prefix), atol=2e-4, rtol=1e-3)
    # resumed from a checkpoint taken after a rank change: the same weights as the uninterrupted run
    assert first["resume_same_names"] and first["resume_max_diff"] <= 1e-6 and second["resume_max_diff"] <= 1e-6


def test_spread_decisions_equal_process_zero_decisions(two):
    for name in ("oialr", "inrank"):
        compare = two[0][name]["compare"]
        assert compare and all(c["equal"] for c in compare), compare
        assert sum(c["changes"] for c in compare) > 0


def test_owners_cover_each_layer_once_and_balance_cost():
    model = get_lowrank_model(tiny_gpt2(n_layer=3), LowRankConfig(method="oialr", delay_steps=5))
    names = [n for n, m in model.named_modules() if n.endswith(("c_attn", "c_proj", "c_fc"))]
    owners = assign_owners(model, names, 2)
    assert set(owners) == set(names) and set(owners.values()) == {0, 1}
    assert assign_owners(model, names, 2) == owners  # deterministic: every process computes the same
    assert set(assign_owners(model, names, 1).values()) == {0}
    assert set(assign_owners(model, names[:1], 4).values()) == {0}  # more processes than layers


def test_accelerate_fsdp2_is_refused_without_the_opt_in(monkeypatch):
    from accelerate.utils import DistributedType

    fsdp2 = SimpleNamespace(distributed_type=DistributedType.FSDP, is_fsdp2=True)
    monkeypatch.delenv(ALLOW_FSDP2_ENV, raising=False)
    with pytest.raises(RuntimeError) as refused:
        check_sharded_training(fsdp2)
    assert f"{ALLOW_FSDP2_ENV}=1" in str(refused.value) and "fully_shard" in str(refused.value)  # names what works
    monkeypatch.setenv(ALLOW_FSDP2_ENV, "1")
    check_sharded_training(fsdp2)  # opted in: same code path as the raw loop
    for other in (SimpleNamespace(distributed_type=DistributedType.FSDP, is_fsdp2=False),
                  SimpleNamespace(distributed_type=DistributedType.DEEPSPEED)):
        with pytest.raises(RuntimeError, match="DDP"):
            check_sharded_training(other)
    check_sharded_training(SimpleNamespace(distributed_type=DistributedType.MULTI_CPU))


def test_gpu_check_script_exits_clearly_without_gpus():
    script = os.path.join(os.path.dirname(os.path.dirname(__file__)), "benchmarks", "gpu_fsdp2_check.py")
    result = subprocess.run([sys.executable, script, "--steps", "4"], capture_output=True, text=True, timeout=120)
    if torch.cuda.device_count() >= 2:
        pytest.skip("GPUs present: the script would run for real")
    assert result.returncode == 2 and "GPU" in result.stderr


def test_shares_decided_apart_equal_one_decision_with_progressive_rollout():
    """OIALR's rollout picks layers by position in the full list: restricting a process to its share must not
    change which layers are updated, nor how."""
    from hf_lowrank import LowRankController

    cfg = LowRankConfig(method="oialr", delay_steps=1, update_every=1, sigma_cutoff=0.9, progressive_rollout=0.5,
                        rank_pattern={"c_attn|c_proj|c_fc": 0.25})
    model = get_lowrank_model(tiny_gpt2(), cfg)
    controller = LowRankController(model, num_training_steps=10)
    controller.step_to(1)  # conversion
    method, targets = controller.method, controller.targets
    whole = {c.name: c for c in method.decide(model, targets, 2, 10)}
    owners = assign_owners(model, targets, 2)
    parts = {}
    for process in (0, 1):
        method.share = frozenset(n for n, o in owners.items() if o == process)
        parts.update({c.name: c for c in method.decide(model, targets, 2, 10)})
    method.share = None
    assert whole and parts.keys() == whole.keys() and len(whole) < len(targets)  # rollout: only some layers
    for name, change in whole.items():
        for key in ("U", "S", "V", "left", "right"):
            assert torch.equal(getattr(change, key), getattr(parts[name], key)), (name, key)
