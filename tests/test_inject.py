import pytest
import torch

import hf_lowrank
from hf_lowrank import LowRankConfig, LowRankLinear, get_lowrank_model, lowrank_summary
from hf_lowrank.inject import find_targets

from conftest import tiny_bert, tiny_gpt2, tiny_vit


def test_all_linear_skips_output_head_and_classifier():
    gpt2 = tiny_gpt2()
    targets = find_targets(gpt2, LowRankConfig(method="svd"))
    assert "lm_head" not in targets and len(targets) == 8
    bert_targets = find_targets(tiny_bert(), LowRankConfig(method="svd"))
    assert "classifier" not in bert_targets and any(t.endswith("intermediate.dense") for t in bert_targets)
    vit_targets = find_targets(tiny_vit(), LowRankConfig(method="svd"))
    assert "classifier" not in vit_targets and any(t.endswith("mlp.fc1") for t in vit_targets)


def test_suffix_list_regex_and_exclude():
    gpt2 = tiny_gpt2()
    assert find_targets(gpt2, LowRankConfig(target_modules=["c_fc"])) == [
        "transformer.h.0.mlp.c_fc", "transformer.h.1.mlp.c_fc"]
    assert find_targets(gpt2, LowRankConfig(target_modules=r".*\.1\.mlp\..*")) == [
        "transformer.h.1.mlp.c_fc", "transformer.h.1.mlp.c_proj"]
    assert "transformer.h.0.attn.c_attn" not in find_targets(
        gpt2, LowRankConfig(exclude_modules=["h.0.attn.c_attn"]))


def test_svd_compresses_at_rank_fraction_and_pattern():
    model = get_lowrank_model(tiny_gpt2(), LowRankConfig(method="svd", rank_fraction=0.25,
                                                         rank_pattern={"h.1.mlp.c_fc": 3}))
    summary = lowrank_summary(model)
    assert summary.layers["transformer.h.1.mlp.c_fc"].rank == 3
    assert summary.layers["transformer.h.0.mlp.c_fc"].rank == 8  # 0.25 × min(32, 128)
    layer = summary.layers["transformer.h.0.attn.c_attn"]
    assert layer.params == layer.rank * (32 + 96) + 96
    assert summary.params == sum(l.params for l in summary.layers.values()) < summary.dense_params
    assert model.lowrank_config.method == "svd"


def test_energy_threshold_chooses_rank_from_spectrum():
    model = tiny_gpt2()
    w = model.transformer.h[0].mlp.c_fc.weight.detach().t()
    s2 = torch.linalg.svdvals(w).square()
    expected = int((s2.cumsum(0) / s2.sum() < 0.6).sum()) + 1
    get_lowrank_model(model, LowRankConfig(method="svd", energy_threshold=0.6))
    assert model.transformer.h[0].mlp.c_fc.rank == expected


@pytest.mark.parametrize("kwargs, message", [
    (dict(method="pca"), "Unknown method"),
    (dict(method="svd", rank_pattern={"c_fc": 0}), "rank_pattern"),
    (dict(method="svd", rank_fraction=0.0), "rank_fraction"),
    (dict(method="oialr", sigma_cutoff=1.5), "sigma_cutoff"),
    (dict(method="oialr", update_every=0), "update_every"),
    (dict(method="inrank", explained_ratio=1.5), "explained_ratio"),
    (dict(method="inrank", freeze_step=10, rank_warmup_steps=20), "freeze_step"),
])
def test_bad_config_values_are_rejected_clearly(kwargs, message):
    with pytest.raises(ValueError, match=message):
        LowRankConfig(**kwargs)


def test_bad_targets_and_ranks_are_rejected_clearly():
    with pytest.raises(ValueError, match="matches no layer.*c_fc"):
        get_lowrank_model(tiny_gpt2(), LowRankConfig(target_modules=["nonexistent"]))
    with pytest.raises(ValueError, match="LayerNorm"):
        get_lowrank_model(tiny_gpt2(), LowRankConfig(target_modules=["ln_f"]))
    with pytest.raises(ValueError, match="rank_pattern key 'h.9.mlp.c_fc' matches no"):
        get_lowrank_model(tiny_gpt2(), LowRankConfig(method="svd", rank_pattern={"h.9.mlp.c_fc": 2}))
    with pytest.raises(ValueError, match=r"outside \[1, 32\]"):
        get_lowrank_model(tiny_gpt2(), LowRankConfig(method="svd", rank_pattern={"c_fc": 33}))
    model = get_lowrank_model(tiny_gpt2(), LowRankConfig(method="svd"))
    with pytest.raises(ValueError, match="once"):
        get_lowrank_model(model, LowRankConfig(method="svd"))


def test_config_round_trip_and_unknown_keys(tmp_path):
    cfg = LowRankConfig(method="svd", rank_pattern={"c_fc": 4}, rank_fraction=0.3)
    cfg.save_pretrained(tmp_path)
    assert LowRankConfig.from_pretrained(tmp_path) == cfg
    with pytest.warns(UserWarning, match="future_knob"):
        restored = LowRankConfig.from_dict({**cfg.to_dict(), "future_knob": 1})
    assert restored == cfg


def test_dense_targets_stay_dense_for_oialr_until_conversion():
    model = get_lowrank_model(tiny_gpt2(), LowRankConfig(method="oialr", delay_steps=10))
    assert not any(isinstance(m, LowRankLinear) for m in model.modules())
    converted = get_lowrank_model(tiny_gpt2(), LowRankConfig(method="oialr", delay_steps=0, sigma_cutoff=0.0))
    assert all(l.rank == l.max_rank for l in lowrank_summary(converted).layers.values())
    assert hf_lowrank.lowrank_summary(converted).trainable_params == sum(
        p.numel() for p in converted.parameters() if p.requires_grad)


def test_plain_torch_modules_work_too():
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 8))
    x = torch.randn(3, 16)
    model(x)  # runs dense
    get_lowrank_model(model, LowRankConfig(method="svd", rank_fraction=0.25))
    assert isinstance(model[0], LowRankLinear) and isinstance(model[2], LowRankLinear)
    assert model[0].rank == 4 and model[0](x).shape == (3, 32)
    # at full rank a factorization would be bigger than the layer: it stays dense, exactly as it was
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 8))
    get_lowrank_model(model, LowRankConfig(method="svd", rank_fraction=1.0))
    assert not any(isinstance(m, LowRankLinear) for m in model.modules())
    assert set(lowrank_summary(model).dense_layers) == {"0", "2"}
    x = torch.randn(3, 16)
    torch.testing.assert_close(model(x), torch.nn.Sequential(*model)(x))
