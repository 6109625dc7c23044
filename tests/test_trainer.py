import json
import math

import pytest
import torch
from transformers import AutoModelForCausalLM, TrainingArguments

from hf_lowrank import LowRankConfig, LowRankLinear, LowRankTrainer, get_lowrank_model, lowrank_summary

from conftest import tiny_gpt2


def _args(out, **kw):
    base = dict(output_dir=str(out), per_device_train_batch_size=8, learning_rate=3e-3, max_steps=60,
                logging_steps=5, save_strategy="no", report_to=[], use_cpu=True, seed=0, disable_tqdm=True,
                lr_scheduler_type="constant", weight_decay=0.0)
    base.update(kw)
    return TrainingArguments(**base)


def _model(tokenizer, cfg):
    return get_lowrank_model(tiny_gpt2(vocab_size=len(tokenizer), n_embd=64), cfg)


def test_oialr_trainer_on_real_text(tmp_path, tokenizer, lm_data):
    train, evaluation = lm_data
    cfg = LowRankConfig(method="oialr", delay_steps=30, update_every=10, sigma_cutoff=0.25)
    model = _model(tokenizer, cfg)
    trainer = LowRankTrainer(model=model, args=_args(tmp_path), train_dataset=train, eval_dataset=evaluation)
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    losses = {h["step"]: h["loss"] for h in logs}
    assert losses[60] < losses[5]
    assert losses[35] < losses[30] * 1.05  # no spike at the conversion (after step 30)
    summary = lowrank_summary(model)
    assert len(summary.layers) == 8 and summary.rank_fraction < 0.9  # ranks shrank
    untouched = sum(p.numel() for n, p in model.named_parameters()
                    if not any(n.startswith(layer + ".") for layer in summary.layers))
    biases = sum(model.get_submodule(n).out_features for n in summary.layers)
    assert summary.trainable_params == sum(l.rank ** 2 for l in summary.layers.values()) + biases + untouched
    assert logs[-1]["lowrank/rank_fraction"] == pytest.approx(summary.rank_fraction)
    assert logs[0]["lowrank/rank_fraction"] == 1.0
    assert math.isfinite(trainer.evaluate()["eval_loss"])

    trainer.save_model(tmp_path / "final")
    history = json.loads((tmp_path / "final" / "lowrank_history.json").read_text())
    assert [h["event"] for h in history["history"]][:2] == ["start", "convert"]
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "final")
    batch = torch.tensor(train[0]["input_ids"])[None]
    model.eval()
    torch.testing.assert_close(reloaded(input_ids=batch).logits, model(input_ids=batch).logits)
    assert {n: l.rank for n, l in lowrank_summary(reloaded).layers.items()} == {
        n: l.rank for n, l in summary.layers.items()}


def test_save_before_conversion_is_dense_and_reloads(tmp_path, tokenizer, lm_data):
    cfg = LowRankConfig(method="oialr", delay_steps=100, update_every=10)
    model = _model(tokenizer, cfg)
    trainer = LowRankTrainer(model=model, args=_args(tmp_path, max_steps=3), train_dataset=lm_data[0])
    trainer.train()
    trainer.save_model(tmp_path / "dense")
    config = json.loads((tmp_path / "dense" / "config.json").read_text())
    assert "quantization_config" not in config
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "dense")
    assert not any(isinstance(m, LowRankLinear) for m in reloaded.modules())


def test_trainer_requires_a_prepared_model(tmp_path):
    with pytest.raises(ValueError, match="get_lowrank_model"):
        LowRankTrainer(model=tiny_gpt2(), args=_args(tmp_path))
