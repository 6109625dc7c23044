import glob
import json
import os

import numpy as np
import pytest
import torch
from datasets import Dataset
from transformers import Trainer, TrainerCallback, TrainingArguments

from hf_lowrank import LowRankConfig, LowRankLinear, get_lowrank_model
from hf_lowrank.diagnostics import (CumulativeRankCallback, LowRankDiagnosticsCallback, basis_stability,
                                    cumulative_update_rank, layer_matrix, load_rank_history, plot_rank_history,
                                    polar_factor)

from conftest import tiny_gpt2

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def random_orthogonal(n, seed):
    q, r = torch.linalg.qr(torch.randn(n, n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64))
    return (q * torch.sign(torch.diagonal(r))).float()


def numpy_stability(a, b, rank):
    """Reference implementation of OIALR's stability with numpy, independent of the library."""
    def polar(m):
        u, _, vh = np.linalg.svd(m.astype(np.float64), full_matrices=False)
        p = u[:, :rank] @ vh[:rank]
        return p.T if p.shape[0] < p.shape[1] else p
    pa, pb = polar(a), polar(b)
    cos = (pa * pb).sum(0) / (np.linalg.norm(pa, axis=0) * np.linalg.norm(pb, axis=0))
    return cos.mean()


def numpy_cumrank(delta, tau):
    s = np.linalg.svd(delta.astype(np.float64), compute_uv=False)
    energy = np.cumsum(s ** 2) / np.sum(s ** 2)
    return int(np.argmax(energy >= tau - 1e-12)) + 1


# --- measures -------------------------------------------------------------------------------------------

def test_basis_stability_of_a_rotated_basis():
    w = torch.randn(24, 24, generator=torch.Generator().manual_seed(0))
    q = random_orthogonal(24, seed=1)
    b0 = polar_factor(w)
    assert basis_stability(b0, b0) == pytest.approx(1.0, abs=1e-5)
    assert basis_stability(b0, polar_factor(3.0 * w)) == pytest.approx(1.0, abs=1e-5)  # scale does not move it
    # polar(W Q) = polar(W) Q, so column j's cosine is Q[j, j]
    assert basis_stability(b0, polar_factor(w @ q)) == pytest.approx(torch.trace(q).item() / 24, abs=1e-4)


def test_polar_factor_is_tall_truncated_and_sign_invariant():
    u = random_orthogonal(40, seed=2)[:, :5]
    v = random_orthogonal(16, seed=3)[:, :5]
    w = u @ torch.diag(torch.tensor([5.0, 4.0, 3.0, 2.0, 1.0])) @ v.t()  # 40×16, rank 5
    b = polar_factor(w, rank=5)
    assert b.shape == (40, 16)
    torch.testing.assert_close(b, u @ v.t(), atol=1e-5, rtol=0)
    # flipping the sign of a singular pair gives the same factor; a wide matrix gives the transposed one
    flip = torch.ones(5)
    flip[1] = -1
    torch.testing.assert_close(polar_factor((u * flip) @ torch.diag(torch.arange(5.0, 0, -1)) @ (v * flip).t(), 5),
                               b, atol=1e-5, rtol=0)
    torch.testing.assert_close(polar_factor(w.t(), rank=5), b, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="same layer"):
        basis_stability(b, b[:, :8])


def test_cumulative_update_rank():
    u, v = random_orthogonal(20, 4), random_orthogonal(12, 5)
    s = torch.tensor([3.0, 2.0, 1.0] + [0.05] * 9)
    delta = u[:, :12] @ torch.diag(s) @ v.t()
    # energies 9, 4, 1 of 14.0225: 64% after one, 92.7% after two
    assert cumulative_update_rank(delta, 0.9) == 2
    assert cumulative_update_rank(delta, 0.6) == 1
    assert cumulative_update_rank(delta, 0.99) == 3
    assert cumulative_update_rank(delta, 1.0) == 12
    assert cumulative_update_rank(torch.zeros(5, 4), 0.9) == 0
    with pytest.warns(UserWarning, match="non-finite"):
        assert cumulative_update_rank(torch.full((3, 3), float("nan"))) is None


# --- history and plots ----------------------------------------------------------------------------------

HISTORY = {"method": "oialr", "history": [
    {"step": 0, "event": "convert", "ranks": {"a": 32, "b": 32}, "params": 2000, "dense_params": 2000},
    {"step": 50, "event": "update", "ranks": {"a": 20, "b": 12}, "params": 1000, "dense_params": 2000},
    {"step": 100, "event": "update", "ranks": {"a": 8, "b": 12}, "params": 600, "dense_params": 2000},
]}


def test_load_rank_history(tmp_path):
    assert load_rank_history(tmp_path) is None  # no file: the card works without it
    (tmp_path / "lowrank_history.json").write_text(json.dumps(HISTORY))
    assert load_rank_history(tmp_path) == HISTORY
    assert load_rank_history(tmp_path / "lowrank_history.json") == HISTORY
    assert load_rank_history(HISTORY["history"]) == {"history": HISTORY["history"]}
    (tmp_path / "bad.json").write_text(json.dumps({"history": [{"ranks": {}}]}))
    with pytest.raises(ValueError, match="not a rank history"):
        load_rank_history(tmp_path / "bad.json")


def test_plot_rank_history(tmp_path):
    path = tmp_path / "ranks.png"
    fig = plot_rank_history(HISTORY, str(path), max_ranks={"a": 32, "b": 32})
    assert path.read_bytes().startswith(PNG_MAGIC)
    ranks_ax, totals_ax = fig.axes
    lines = {line.get_label(): line for line in ranks_ax.get_lines()}
    assert set(lines) == {"a", "b"}
    assert list(lines["a"].get_ydata()) == [32, 20, 8] and list(lines["a"].get_xdata()) == [0, 50, 100]
    totals = {line.get_label(): list(line.get_ydata()) for line in totals_ax.get_lines()}
    assert totals["stored / dense parameters"] == pytest.approx([1.0, 0.5, 0.3])
    assert totals["total rank / full rank"] == pytest.approx([1.0, 0.5, 20 / 64])
    # without full ranks only the parameter fraction can be drawn
    fig = plot_rank_history(HISTORY)
    assert [line.get_label() for line in fig.axes[1].get_lines()] == ["stored / dense parameters"]


# --- callbacks in a Trainer -----------------------------------------------------------------------------

def lm_dataset(n=16, length=16):
    ids = torch.randint(0, 128, (n, length), generator=torch.Generator().manual_seed(0)).tolist()
    return Dataset.from_dict({"input_ids": ids, "labels": ids})


def train(model, tmp_path, callbacks=(), steps=4, report_to=(), attach=False):
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=steps, per_device_train_batch_size=4,
                             learning_rate=5e-3, logging_steps=2, save_strategy="no", report_to=list(report_to),
                             use_cpu=True, disable_tqdm=True)
    trainer = Trainer(model=model, args=args, train_dataset=lm_dataset())
    for callback in callbacks:
        if attach:
            callback.trainer = trainer
        trainer.add_callback(callback)
    trainer.train()
    return trainer


def test_cumulative_rank_callback_on_a_dense_model(tmp_path):
    model = tiny_gpt2()
    names = ["transformer.h.0.mlp.c_fc", "transformer.h.1.attn.c_attn"]
    w0 = {n: layer_matrix(model.get_submodule(n)).clone() for n in names}
    callback = CumulativeRankCallback(every=2, explained_ratio=0.9, targets=["c_fc", "c_attn"], plot_dir=str(tmp_path))
    trainer = train(model, tmp_path, [callback])

    assert [r["step"] for r in callback.history] == [2, 4]
    last = callback.history[-1]
    assert set(last["ranks"]) == {"transformer.h.0.mlp.c_fc", "transformer.h.0.attn.c_attn",
                                  "transformer.h.1.mlp.c_fc", "transformer.h.1.attn.c_attn"}
    for name in names:  # independent recomputation from the snapshot taken before training
        delta = (layer_matrix(model.get_submodule(name)) - w0[name]).numpy()
        assert last["ranks"][name] == numpy_cumrank(delta, 0.9)
        assert last["fractions"][name] == pytest.approx(last["ranks"][name] / 32)
        assert 1 <= last["ranks"][name] <= 32
    assert last["mean_fraction"] == pytest.approx(np.mean(list(last["fractions"].values())))
    logged = [e for e in trainer.state.log_history if "cumrank/mean_fraction" in e]
    assert [e["step"] for e in logged] == [2, 4]
    assert logged[-1]["cumrank/transformer.h.0.mlp.c_fc"] == last["ranks"]["transformer.h.0.mlp.c_fc"]
    assert (tmp_path / "lowrank_cumulative_rank.png").read_bytes().startswith(PNG_MAGIC)


def test_cumulative_rank_callback_on_a_factorized_model():
    model = get_lowrank_model(tiny_gpt2(), LowRankConfig(method="svd", rank_fraction=0.25))
    callback = CumulativeRankCallback(every=1)
    callback.snapshot(model)
    assert len(callback.initial) == 8
    with torch.no_grad():
        layer = model.transformer.h[0].mlp.c_fc
        assert isinstance(layer, LowRankLinear)
        layer.U[:, 0] += 1.0  # a rank-1 update of that layer only
    record = callback.measure(model, step=1)
    assert record["ranks"]["transformer.h.0.mlp.c_fc"] == 1
    assert record["ranks"]["transformer.h.1.mlp.c_fc"] == 0


def scalars_and_images(log_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    files = glob.glob(os.path.join(log_dir, "**", "events.out.tfevents.*"), recursive=True)
    assert files, f"no TensorBoard event file under {log_dir}"
    tags = {"scalars": set(), "images": set()}
    for directory in {os.path.dirname(f) for f in files}:
        acc = EventAccumulator(directory, size_guidance={"scalars": 0, "images": 0})
        acc.Reload()
        tags["scalars"] |= set(acc.Tags()["scalars"])
        tags["images"] |= set(acc.Tags()["images"])
    return tags


class LogRecorder(TrainerCallback):
    """Stands for any `report_to` integration: sees what `Trainer.log` dispatches."""

    def __init__(self):
        self.logs = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.logs.append(dict(logs))


def test_diagnostics_callback_logs_through_the_trainer_to_tensorboard(tmp_path):
    model = get_lowrank_model(tiny_gpt2(), LowRankConfig(method="svd", rank_fraction=0.4))
    callback, recorder = LowRankDiagnosticsCallback(every=2), LogRecorder()
    trainer = train(model, tmp_path, [callback, recorder], report_to=["tensorboard"], attach=True)

    assert [r["step"] for r in callback.history] == [0, 2, 4]
    assert callback.history[0]["stability"] == {}
    for record in callback.history[1:]:
        assert len(record["stability"]) == 8
        assert all(-1.0 <= v <= 1.0 + 1e-6 for v in record["stability"].values())
        assert record["stability_mean"] == pytest.approx(np.mean(list(record["stability"].values())))
    assert callback.history[-1]["rank_fraction"] == pytest.approx(13 / 32)  # every layer has full rank 32
    logged = [e for e in trainer.state.log_history if "stability/mean" in e]
    assert [e["step"] for e in logged] == [2, 4] and "epoch" in logged[0]
    assert len([logs for logs in recorder.logs if "stability/mean" in logs]) == 2  # dispatched by Trainer.log
    for name in ("lowrank_rank_evolution.png", "lowrank_singular_values.png", "lowrank_stability.png"):
        assert (tmp_path / name).read_bytes().startswith(PNG_MAGIC)
    saved = json.loads((tmp_path / "lowrank_diagnostics.json").read_text())
    assert [r["step"] for r in saved["history"]] == [0, 2, 4] and len(saved["spectra"]) == 8

    tags = scalars_and_images(tmp_path / "runs")
    # the Trainer's TensorBoard callback names training scalars "train/<key>"
    expected = {"train/stability/mean", "train/rank/fraction", "train/stability/transformer.h.0.mlp.c_fc"}
    assert expected <= tags["scalars"]
    assert {"lowrank/ranks", "lowrank/singular_values", "lowrank/stability"} <= tags["images"]


def test_diagnostics_callback_without_trainer_reference(tmp_path):
    model = get_lowrank_model(tiny_gpt2(), LowRankConfig(method="svd", rank_fraction=0.4))
    callback = LowRankDiagnosticsCallback(every=2, per_layer=False, images=False, plot_dir=str(tmp_path / "plots"))
    trainer = train(model, tmp_path, [callback], report_to=["tensorboard"])
    logged = [e for e in trainer.state.log_history if "stability/mean" in e]
    assert [e["step"] for e in logged] == [2, 4]
    assert not any(k.startswith("rank/transformer") for e in logged for k in e)
    assert (tmp_path / "plots" / "lowrank_stability.png").exists()
    tags = scalars_and_images(tmp_path / "runs" / "hf_lowrank")  # its own writer, beside the Trainer's run
    assert {"train/stability/mean", "train/rank/fraction"} <= tags["scalars"] and not tags["images"]


def test_diagnostics_check_matches_an_independent_stability():
    model = get_lowrank_model(tiny_gpt2(), LowRankConfig(method="svd", rank_fraction=0.4))
    callback = LowRankDiagnosticsCallback(every=1)
    name = "transformer.h.0.mlp.c_fc"
    before = layer_matrix(model.get_submodule(name)).numpy()
    callback.check(model, 0)
    with torch.no_grad():
        layer = model.get_submodule(name)
        layer.U.add_(0.3 * torch.randn(layer.U.shape, generator=torch.Generator().manual_seed(7)))
    after = layer_matrix(model.get_submodule(name)).numpy()
    record = callback.check(model, 1)
    assert record["ranks"][name] == 13 and record["max_ranks"][name] == 32
    assert record["stability"][name] == pytest.approx(numpy_stability(before, after, 13), abs=1e-4)
    assert record["stability"][name] < 0.99
    assert record["stability"]["transformer.h.1.mlp.c_fc"] == pytest.approx(1.0, abs=1e-4)  # untouched layer
