"""Exact resume across rank changes, gradient accumulation, mixed precision (single process)."""

import os

import pytest
import torch
from transformers import TrainerCallback, TrainingArguments

from hf_lowrank import LowRankConfig, LowRankLinear, LowRankTrainer, get_lowrank_model, lowrank_summary
from hf_lowrank.trainer import COMPLETE_MARKER, last_complete_checkpoint

from conftest import tiny_gpt2

CFG = dict(method="oialr", delay_steps=6, update_every=4, sigma_cutoff=0.5, rank_pattern={"c_attn|c_proj|c_fc": 0.25})


class StopAt(TrainerCallback):
    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= self.step:
            control.should_training_stop = True


def _trainer(out, tokenizer, train, callbacks=(), **kw):
    model = get_lowrank_model(tiny_gpt2(vocab_size=len(tokenizer), n_embd=48), LowRankConfig(**CFG))
    args = dict(output_dir=str(out), per_device_train_batch_size=8, learning_rate=3e-3, max_steps=20,
                logging_steps=5, save_strategy="steps", save_steps=5, report_to=[], use_cpu=True, seed=0,
                disable_tqdm=True, warmup_steps=3)
    args.update(kw)
    return LowRankTrainer(model=model, args=TrainingArguments(**args), train_dataset=train,
                          callbacks=list(callbacks))


def _params(model):
    return {n: p.detach().clone() for n, p in model.state_dict().items()}


def test_resume_after_rank_change_matches_uninterrupted_run(tmp_path, tokenizer, lm_data):
    train = lm_data[0].select(range(200))
    full = _trainer(tmp_path / "full", tokenizer, train, save_strategy="no")
    full.train()
    expected = _params(full.model)

    interrupted = _trainer(tmp_path / "run", tokenizer, train, callbacks=[StopAt(11)])
    interrupted.train()
    checkpoint = tmp_path / "run" / "checkpoint-10"
    assert (checkpoint / COMPLETE_MARKER).exists()
    events = [h["event"] for h in interrupted.lowrank.history]
    assert "convert" in events and events.count("update") >= 1  # a cut happened before the checkpoint
    ranks_at_10 = dict(interrupted.lowrank.history[-1]["ranks"])

    resumed = _trainer(tmp_path / "run", tokenizer, train)  # a fresh, dense model
    assert not any(isinstance(m, LowRankLinear) for m in resumed.model.modules())
    resumed.train(resume_from_checkpoint=str(checkpoint))
    assert resumed.lowrank.history[len(events) - 1]["ranks"] == ranks_at_10
    got = _params(resumed.model)
    assert got.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], atol=1e-6, rtol=0, msg=name)
    assert lowrank_summary(resumed.model).rank_fraction == lowrank_summary(full.model).rank_fraction


def test_interrupted_checkpoint_is_skipped_and_refused(tmp_path, tokenizer, lm_data):
    train = lm_data[0].select(range(100))
    trainer = _trainer(tmp_path, tokenizer, train, max_steps=10)
    trainer.train()
    # simulate a kill while checkpoint-10 was being written: its completion marker is missing
    os.remove(tmp_path / "checkpoint-10" / COMPLETE_MARKER)
    assert last_complete_checkpoint(str(tmp_path)) == str(tmp_path / "checkpoint-5")
    with pytest.raises(ValueError, match="incomplete checkpoint"):
        _trainer(tmp_path, tokenizer, train, max_steps=12).train(resume_from_checkpoint=str(tmp_path / "checkpoint-10"))
    resumed = _trainer(tmp_path, tokenizer, train, max_steps=12)
    resumed.train(resume_from_checkpoint=True)  # picks checkpoint-5
    assert resumed.state.global_step == 12


def test_gradient_accumulation_counts_optimizer_steps(tmp_path, tokenizer, lm_data):
    train = lm_data[0].select(range(200))
    plain = _trainer(tmp_path / "a", tokenizer, train, save_strategy="no", max_steps=14)
    plain.train()
    accumulated = _trainer(tmp_path / "b", tokenizer, train, save_strategy="no", max_steps=14,
                           per_device_train_batch_size=4, gradient_accumulation_steps=2)
    accumulated.train()
    assert [h["step"] for h in plain.lowrank.history] == [h["step"] for h in accumulated.lowrank.history]
    assert plain.lowrank.history[-1]["ranks"] == accumulated.lowrank.history[-1]["ranks"]
    # factors are defined up to SVD signs: compare what they compute
    a, b = _functional_params(plain.model), _functional_params(accumulated.model)
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=1e-4, rtol=1e-3, msg=name)


def _functional_params(model):
    out = {n: p.detach() for n, p in model.named_parameters() if not n.endswith((".U", ".S", ".V"))}
    out.update({n: m.dense_matrix().detach() for n, m in model.named_modules() if isinstance(m, LowRankLinear)})
    return out


def test_bf16_autocast_trains_through_conversion_and_cuts(tmp_path, tokenizer, lm_data):
    trainer = _trainer(tmp_path, tokenizer, lm_data[0].select(range(100)), save_strategy="no", max_steps=12,
                       bf16=True)
    trainer.train()
    assert [h["event"] for h in trainer.lowrank.history][:2] == ["start", "convert"]
    assert all(p.dtype == torch.float32 for p in trainer.model.parameters())
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert all(torch.isfinite(torch.tensor(losses)))


def _raw_run(model, data, steps, accelerator, start=0, checkpoint=None, save_at=None, save_to=None):
    """A raw accelerate loop over fixed batches; resumes from `checkpoint` if given."""
    from hf_lowrank import LowRankController

    if checkpoint is not None:
        LowRankController.restructure(model, checkpoint)  # shapes before the optimizer and prepare
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0 / (1 + s))
    wrapped, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    controller = LowRankController(wrapped, optimizer=optimizer, accelerator=accelerator, num_training_steps=steps)
    if checkpoint is not None:
        accelerator.load_state(checkpoint)
        assert controller.load(checkpoint)
    for step in range(start, steps):
        loss = wrapped(**data[step]).loss
        accelerator.backward(loss)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
        if controller.step():
            wrapped = controller.reprepare(wrapped)
        if save_at == step + 1:  # "interrupted" here, right after saving
            accelerator.save_state(save_to)
            controller.save(save_to)
            return controller
    return controller


def test_raw_loop_save_state_load_state_resumes_exactly(tmp_path):
    from accelerate import Accelerator

    g = torch.Generator().manual_seed(5)
    data = [{"input_ids": (ids := torch.randint(0, 128, (4, 16), generator=g)), "labels": ids} for _ in range(14)]
    cfg = LowRankConfig(method="oialr", delay_steps=4, update_every=3, sigma_cutoff=0.9,
                        rank_pattern={"c_attn|c_proj|c_fc": 0.25})

    full = get_lowrank_model(tiny_gpt2(), cfg)
    _raw_run(full, data, 14, Accelerator(cpu=True))

    first = _raw_run(get_lowrank_model(tiny_gpt2(), cfg), data, 14, Accelerator(cpu=True), save_at=8,
                     save_to=str(tmp_path / "ckpt"))
    assert "update" in [h["event"] for h in first.history]

    resumed_model = get_lowrank_model(tiny_gpt2(seed=1), cfg)  # different init: everything must come from disk
    resumed = _raw_run(resumed_model, data, 14, Accelerator(cpu=True), start=8, checkpoint=str(tmp_path / "ckpt"))
    assert resumed.global_step == 14
    expected = dict(full.state_dict())
    for name, value in resumed_model.state_dict().items():
        torch.testing.assert_close(value, expected[name], atol=1e-6, rtol=0, msg=name)
