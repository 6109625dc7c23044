"""The benchmarks' own machinery: what they change in a run must be what they say they change.

Timings are not checked (benchmarks measure, tests check behaviour); these tests check the levers of
`benchmarks/pretrain_compare.py` and that `benchmarks/bench_step.py` runs and reports its guard.
"""

import json
import os
import subprocess
import sys

import pytest
import torch
from transformers import TrainerCallback, TrainingArguments

from hf_lowrank import LowRankConfig, LowRankLinear, LowRankTrainer, get_lowrank_model

from conftest import tiny_gpt2

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import pretrain_compare  # noqa: E402


class RecordLRs(TrainerCallback):
    """Per optimizer step: the LR of every param group and which groups hold Σ parameters."""

    def __init__(self):
        self.trainer, self.steps = None, {}

    def on_step_end(self, args, state, control, optimizer=None, **kwargs):
        sigmas = {id(m.S) for m in self.trainer.model.modules() if isinstance(m, LowRankLinear) and m.S is not None}
        self.steps[state.global_step] = [(g["lr"], any(id(p) in sigmas for p in g["params"]))
                                         for g in optimizer.param_groups]


def run_with_levers(tmp_path, levers):
    torch.manual_seed(0)
    model = get_lowrank_model(tiny_gpt2(), LowRankConfig(method="oialr", delay_steps=4, update_every=4,
                                                         sigma_cutoff=0.5))
    data = [{"input_ids": torch.randint(0, 64, (16,)), "labels": torch.randint(0, 64, (16,))} for _ in range(32)]
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=2, max_steps=12,
                             learning_rate=1e-2, lr_scheduler_type="constant", save_strategy="no", report_to=[],
                             use_cpu=True, disable_tqdm=True)
    trainer = LowRankTrainer(model=model, args=args, train_dataset=data)
    callbacks = []
    lever = pretrain_compare.lever_callback(levers)
    if lever is not None:
        lever.trainer = trainer
        callbacks.append(lever)
    record = RecordLRs()
    record.trainer = trainer
    for callback in callbacks + [record]:
        trainer.add_callback(callback)
    trainer.train()
    changes = [h["step"] for h in trainer.lowrank.history if h["event"] != "start"]
    return record.steps, changes


def test_levers_change_exactly_the_learning_rates_they_name(tmp_path):
    lr = 1e-2
    plain, changes = run_with_levers(tmp_path / "plain", {})
    assert changes and all(rate == pytest.approx(lr) for groups in plain.values() for rate, _ in groups)

    scaled, _ = run_with_levers(tmp_path / "scaled", {"sigma_lr_scale": 3.0})
    after = scaled[max(scaled)]
    assert any(has_sigma for _, has_sigma in after)
    assert [rate for rate, has_sigma in after] == pytest.approx([3 * lr if has_sigma else lr for _, has_sigma in after])
    assert all(rate == pytest.approx(lr) for rate, _ in scaled[min(scaled)])  # dense phase: no Σ yet, no change

    rewarm, changes = run_with_levers(tmp_path / "rewarm", {"rewarm_steps": 3})
    first = changes[0]
    for into in (1, 2, 3):  # the LR the coming step uses, as set at the end of the step before
        assert [rate for rate, _ in rewarm[first + into - 1]] == pytest.approx([lr * into / 3] * len(rewarm[first]))
    assert all(rate == pytest.approx(lr) for rate, _ in rewarm[first + 3])


def test_lever_knobs_are_checked_before_any_run():
    assert pretrain_compare.parse_row("oialr:sigma_lr_scale=2").knobs == {"sigma_lr_scale": 2}
    with pytest.raises(SystemExit, match="OIALR levers"):
        pretrain_compare.parse_row("inrank:rewarm_steps=3")
    with pytest.raises(SystemExit, match="positive number"):
        pretrain_compare.parse_row("oialr:sigma_lr_scale=-1")


def test_bench_step_reports_rows_and_guard(tmp_path, one_thread):
    out = tmp_path / "step.json"
    result = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "bench_step.py"), "--quick",
                             "--repeats", "1", "--warmup", "0", "--json", str(out)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "# guard (every factorized row >= 80% of its Amdahl limit)" in result.stdout
    rows = {row["row"]: row for row in json.loads(out.read_text())["rows"]}
    assert set(rows) == {"dense", "free", "oialr 0.25", "inrank 0.25"}
    assert rows["dense"]["layer_flop_ratio"] == pytest.approx(1.0) and rows["free"]["layer_flop_ratio"] == 0.0
    # the factorized rows' layer FLOPs: below dense, above zero, OIALR's (r² Σ, frozen bases) below InRank's
    assert 0 < rows["oialr 0.25"]["layer_flop_ratio"] < rows["inrank 0.25"]["layer_flop_ratio"] < 1
