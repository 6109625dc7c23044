"""The contract every method keeps, on every architecture (PEFT's TEST_CASES style): a new method gets all of
these checks by adding a row to METHODS.

- at every rank change, each target layer's new weight is the best approximation of its old weight at the new
  rank (Eckart–Young): exact where the rank did not drop (InRank's growth, layers held dense), the dropped
  singular values' energy where it did (OIALR's cuts, InRank's freeze, svd);
- optimizer state has the shapes of its parameters, every trainable parameter is optimized, no frozen one is;
- the Auto-class round trip gives identical outputs;
- the Trainer resumes exactly from a checkpoint taken after a rank change;
- two real processes end with identical ranks and parameters (GPT-2; tests/test_distributed.py).
"""

import json
import os
import subprocess
import sys

import pytest
import torch
from transformers import (AutoModelForCausalLM, AutoModelForImageClassification, AutoModelForSequenceClassification,
                          TrainerCallback, TrainingArguments)

from hf_lowrank import LowRankConfig, LowRankController, LowRankLinear, LowRankTrainer, get_lowrank_model
from hf_lowrank.diagnostics.measures import layer_matrix
from hf_lowrank.targets import find_targets

from conftest import tiny_bert, tiny_gpt2, tiny_vit

# Schedules that change ranks within a few optimizer steps on tiny models (width 32); starting ranks below
# break-even, so layers are factorized rather than held dense.
METHODS = {
    "oialr": dict(method="oialr", delay_steps=2, update_every=2, sigma_cutoff=0.9, rank_pattern={".*": 0.25}),
    "inrank": dict(method="inrank", init_rank=2, buffer_rank=2, rank_warmup_steps=2, check_every=2, freeze_step=6,
                   explained_ratio=0.99),
    "svd": dict(method="svd", rank_fraction=0.25),
}
ARCHITECTURES = {
    "gpt2": (tiny_gpt2, AutoModelForCausalLM),
    "bert": (tiny_bert, AutoModelForSequenceClassification),
    "vit": (tiny_vit, AutoModelForImageClassification),
}
CASES = [(m, a) for m in METHODS for a in ARCHITECTURES]
# InRank's efficient mode re-initializes at injection (the best rank-(r+b) approximation rescaled to the init's
# norm: a from-scratch start, see InRankMethod._efficient_start); the others approximate the weights they get.
REINITIALIZES = {"inrank"}


def _batch(arch, seed, n=4):
    g = torch.Generator().manual_seed(seed)
    if arch == "gpt2":
        ids = torch.randint(0, 128, (n, 16), generator=g)
        return {"input_ids": ids, "labels": ids}
    labels = torch.randint(0, 3, (n,), generator=g)
    if arch == "bert":
        return {"input_ids": torch.randint(0, 128, (n, 16), generator=g), "labels": labels}
    return {"pixel_values": torch.randn(n, 3, 16, 16, generator=g), "labels": labels}


def _dataset(arch, n=64):
    from datasets import Dataset

    batch = _batch(arch, 123, n)
    return Dataset.from_dict({k: v.tolist() for k, v in batch.items()})


def _outputs(model, arch):
    model.eval()
    inputs = {k: v for k, v in _batch(arch, 99).items() if k != "labels"}
    with torch.no_grad():
        out = model(**inputs).logits
    model.train()
    return out


def _model(method, arch, seed=0):
    return get_lowrank_model(ARCHITECTURES[arch][0](seed), LowRankConfig(**METHODS[method]))


def _assert_best_approximation(old, new, name):
    """`new` is the best approximation of `old` at `new`'s rank (Eckart–Young), up to float32 rounding."""
    s = torch.linalg.svdvals(old.double())
    rank = int(torch.linalg.matrix_rank(new.double(), rtol=1e-6))
    expected = s[rank:].square().sum()
    error = (new.double() - old.double()).square().sum()
    scale = s.square().sum()
    assert abs(error - expected) <= 1e-5 * scale + 1e-12, (name, rank, float(error), float(expected))


@pytest.mark.parametrize("method,arch", CASES)
def test_each_rank_change_is_the_best_approximation_and_optimizer_state_fits(method, arch):
    dense = ARCHITECTURES[arch][0](0)
    targets = find_targets(dense, LowRankConfig(**METHODS[method]))
    before = {n: layer_matrix(dense.get_submodule(n)) for n in targets}
    model = get_lowrank_model(dense, LowRankConfig(**METHODS[method]))  # the initial changes (svd truncates)
    for name in targets if method not in REINITIALIZES else ():
        _assert_best_approximation(before[name], layer_matrix(model.get_submodule(name)), name)

    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    controller = LowRankController(model, optimizer=opt)
    changes = 0
    for step in range(8):
        model(**_batch(arch, step)).loss.backward()
        opt.step()
        opt.zero_grad()
        before = {n: layer_matrix(model.get_submodule(n)) for n in targets}
        events = len(controller.history)
        controller.step()
        changes += len(controller.history) > events
        for name in targets:
            _assert_best_approximation(before[name], layer_matrix(model.get_submodule(name)), name)
        optimized = [p for group in opt.param_groups for p in group["params"]]
        assert {id(p) for p in optimized} == {id(p) for p in model.parameters() if p.requires_grad}
        for p in optimized:
            for key, value in opt.state.get(p, {}).items():
                if torch.is_tensor(value) and value.dim():
                    assert value.shape == p.shape, (key, tuple(value.shape), tuple(p.shape))
    if method != "svd":  # svd changes ranks once, at injection
        assert changes >= 2, controller.history
    assert any(isinstance(m, LowRankLinear) for m in model.modules())


@pytest.mark.parametrize("method,arch", CASES)
def test_auto_class_round_trip(method, arch, tmp_path):
    model = _model(method, arch)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    controller = LowRankController(model, optimizer=opt)
    for step in range(4):
        model(**_batch(arch, step)).loss.backward()
        opt.step()
        opt.zero_grad()
        controller.step()
    model.save_pretrained(tmp_path)
    reloaded = ARCHITECTURES[arch][1].from_pretrained(tmp_path)
    ranks = {n: m.rank for n, m in model.named_modules() if isinstance(m, LowRankLinear)}
    assert ranks and ranks == {n: m.rank for n, m in reloaded.named_modules() if isinstance(m, LowRankLinear)}
    assert torch.equal(_outputs(reloaded, arch), _outputs(model, arch))


class _StopAt(TrainerCallback):
    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        control.should_training_stop = state.global_step >= self.step


def _trainer(method, arch, out, callbacks=(), **overrides):
    args = dict(output_dir=str(out), per_device_train_batch_size=8, learning_rate=1e-2, max_steps=8,
                save_strategy="steps", save_steps=5, report_to=[], use_cpu=True, seed=0, disable_tqdm=True,
                logging_steps=100)
    args.update(overrides)
    return LowRankTrainer(model=_model(method, arch, seed=1), args=TrainingArguments(**args),
                          train_dataset=_dataset(arch), callbacks=list(callbacks))


@pytest.mark.parametrize("method,arch", CASES)
def test_trainer_resumes_exactly_across_a_rank_change(method, arch, tmp_path):
    full = _trainer(method, arch, tmp_path / "full", save_strategy="no")
    full.train()
    interrupted = _trainer(method, arch, tmp_path / "run", callbacks=[_StopAt(6)])
    interrupted.train()
    if method != "svd":
        assert any(h["step"] and h["step"] <= 5 for h in interrupted.lowrank.history[1:]), interrupted.lowrank.history
    resumed = _trainer(method, arch, tmp_path / "run")
    resumed.train(resume_from_checkpoint=str(tmp_path / "run" / "checkpoint-5"))
    assert resumed.lowrank.history == full.lowrank.history
    expected = full.model.state_dict()
    got = resumed.model.state_dict()
    assert got.keys() == expected.keys()
    for name, value in expected.items():
        torch.testing.assert_close(got[name], value, atol=1e-6, rtol=0, msg=name)


WORKER = os.path.join(os.path.dirname(__file__), "dist_worker.py")


@pytest.mark.parametrize("method", ["inrank", "svd"])  # oialr: tests/test_distributed.py
def test_two_processes_end_identical(method, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WORKER_CONFIG": json.dumps(METHODS[method])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
           str(29600 + os.getpid() % 1000), WORKER, "raw", str(tmp_path)]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    first, second = (json.loads((tmp_path / f"rank{i}.json").read_text()) for i in range(2))
    assert first["num_processes"] == 2 and first["ranks"] and first["ranks"] == second["ranks"]
    assert first["checksums"] == second["checksums"]
    if method == "inrank":
        assert "grow" in first["events"] and "freeze" in first["events"], first["events"]
