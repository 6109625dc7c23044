"""The smallest form for use: Σ folded into the bases, layers not worth factorizing merged; reloads and merges
with the same outputs as the training form."""

import copy

import torch
from transformers import AutoModelForCausalLM
from transformers.pytorch_utils import Conv1D

import hf_lowrank
from hf_lowrank import LowRankConfig, LowRankController, LowRankLinear, get_lowrank_model, lowrank_summary
from hf_lowrank.cli import main

from conftest import tiny_gpt2

QUARTER = {"c_attn|c_proj|c_fc": 0.25}


def _ids(seed=0):
    return torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(seed))


def _logits(model):
    model.eval()
    with torch.no_grad():
        return model(input_ids=_ids(7)).logits


def _trained(config):
    """A tiny GPT-2 after a few optimizer steps under `config` (OIALR's Σ drifts off-diagonal)."""
    model = get_lowrank_model(tiny_gpt2(), config)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    controller = LowRankController(model, optimizer=opt, num_training_steps=4)
    for step in range(4):
        model(input_ids=_ids(step), labels=_ids(step)).loss.backward()
        opt.step()
        opt.zero_grad()
        controller.step()
    return model


def test_oialr_use_form_folds_sigma_and_keeps_outputs(tmp_path):
    model = _trained(LowRankConfig(method="oialr", delay_steps=0, sigma_cutoff=0.0, rank_pattern=QUARTER))
    sigma = model.transformer.h[0].mlp.c_fc.S.detach()
    assert (sigma - torch.diag(torch.diagonal(sigma))).abs().max() > 0  # a trained, non-diagonal Σ
    expected = _logits(model)
    training_params = lowrank_summary(model).params

    hf_lowrank.save_for_use(model, tmp_path)
    assert all(m.S is not None for m in model.modules() if isinstance(m, LowRankLinear))  # model untouched
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    layers = [m for m in reloaded.modules() if isinstance(m, LowRankLinear)]
    assert len(layers) == 8 and all(m.S is None for m in layers)
    for layer in layers:  # r·(in+out) plus bias
        assert layer.stored_params() == layer.rank * (layer.in_features + layer.out_features) + layer.out_features
    assert lowrank_summary(reloaded).params < training_params
    torch.testing.assert_close(_logits(reloaded), expected, atol=1e-5, rtol=1e-4)

    in_memory = hf_lowrank.to_use_form(copy.deepcopy(model))
    assert torch.equal(_logits(in_memory), _logits(reloaded))  # the export reloads bit-identically
    merged_from_use = _logits(hf_lowrank.merge_and_unload(reloaded))
    merged_from_training = _logits(hf_lowrank.merge_and_unload(copy.deepcopy(model)))
    torch.testing.assert_close(merged_from_use, merged_from_training, atol=1e-5, rtol=1e-4)


def test_cumulative_inrank_merges_to_dense_in_use_form():
    model = _trained(LowRankConfig(method="inrank", inrank_mode="cumulative", init_rank=2, buffer_rank=2,
                                   rank_warmup_steps=100, target_modules=["c_fc"]))
    assert all(m.base is not None for m in model.modules() if isinstance(m, LowRankLinear))
    expected = _logits(model)
    hf_lowrank.to_use_form(model)
    assert not any(isinstance(m, LowRankLinear) for m in model.modules())
    assert isinstance(model.transformer.h[0].mlp.c_fc, Conv1D)  # what was replaced, GPT-2's layout
    torch.testing.assert_close(_logits(model), expected, atol=1e-5, rtol=1e-4)


def test_cli_export_writes_the_smaller_form(tmp_path, capsys):
    model = _trained(LowRankConfig(method="oialr", delay_steps=0, sigma_cutoff=0.0, rank_pattern=QUARTER))
    model.save_pretrained(tmp_path / "training")
    assert main(["export", str(tmp_path / "training"), str(tmp_path / "use")]) == 0
    assert "Wrote the use form" in capsys.readouterr().out
    size = lambda d: (tmp_path / d / "model.safetensors").stat().st_size  # noqa: E731
    assert size("use") < size("training")
    torch.testing.assert_close(_logits(AutoModelForCausalLM.from_pretrained(tmp_path / "use")), _logits(model),
                               atol=1e-5, rtol=1e-4)
    assert main(["export", str(tmp_path / "training"), str(tmp_path / "training")]) == 1  # never in place


def test_reloaded_cumulative_inrank_keeps_its_base_frozen(tmp_path):
    model = get_lowrank_model(tiny_gpt2(), LowRankConfig(method="inrank", inrank_mode="cumulative", init_rank=2,
                                                         buffer_rank=2, target_modules=["c_fc"]))
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    layer = reloaded.transformer.h[0].mlp.c_fc
    assert layer.base is not None and not layer.base.requires_grad and layer.U.requires_grad
    assert lowrank_summary(reloaded).trainable_params == lowrank_summary(model).trainable_params


def test_trainer_never_writes_the_hub_token(tmp_path):
    from datasets import Dataset
    from transformers import TrainingArguments

    from hf_lowrank import LowRankTrainer

    ids = _ids(1).repeat(8, 1).tolist()
    args = TrainingArguments(str(tmp_path), max_steps=2, save_steps=1, per_device_train_batch_size=4, report_to=[],
                             use_cpu=True, hub_token="hf_SECRETtoken123")
    trainer = LowRankTrainer(model=get_lowrank_model(tiny_gpt2(), LowRankConfig(method="svd", rank_fraction=0.25)),
                             args=args, train_dataset=Dataset.from_dict({"input_ids": ids, "labels": ids}))
    trainer.train()
    trainer.save_model()
    written = list(tmp_path.rglob("training_args.bin"))
    assert len(written) >= 3  # two checkpoints and the final model
    assert all(b"hf_SECRETtoken123" not in path.read_bytes() for path in written)
    assert trainer.args.hub_token == "hf_SECRETtoken123"  # still there for the Trainer's own pushes
