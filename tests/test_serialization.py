import json
import subprocess
import sys

import pytest
import torch
from transformers import (AutoModelForCausalLM, AutoModelForImageClassification,
                          AutoModelForSequenceClassification)

import hf_lowrank
from hf_lowrank import LowRankConfig, LowRankLinear, get_lowrank_model, lowrank_summary

from conftest import tiny_bert, tiny_gpt2, tiny_vit

CASES = {
    "gpt2": (tiny_gpt2, AutoModelForCausalLM, lambda: {"input_ids": torch.randint(0, 128, (2, 12))},
             {"h.0.mlp.c_fc": 3, "h.1.attn.c_attn": 17}),
    "bert": (tiny_bert, AutoModelForSequenceClassification, lambda: {"input_ids": torch.randint(0, 128, (2, 12))},
             {"layer.0.intermediate.dense": 5, "layer.1.attention.self.query": 1}),
    "vit": (tiny_vit, AutoModelForImageClassification, lambda: {"pixel_values": torch.randn(2, 3, 16, 16)},
            {"layers.0.mlp.fc1": 6, "layers.1.attention.q_proj": 2}),
}


def _outputs(model, batch):
    model.eval()
    with torch.no_grad():
        return model(**batch).logits


@pytest.mark.parametrize("arch", list(CASES))
def test_svd_round_trip_through_auto_class(arch, tmp_path):
    build, auto_cls, make_batch, pattern = CASES[arch]
    torch.manual_seed(1)
    batch = make_batch()
    model = get_lowrank_model(build(), LowRankConfig(method="svd", rank_fraction=0.5, rank_pattern=pattern))
    ranks = {n: l.rank for n, l in lowrank_summary(model).layers.items()}
    assert len(set(ranks.values())) >= 3  # heterogeneous
    expected = _outputs(model, batch)
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert saved["quant_method"] == "hf_lowrank" and saved["rank_pattern"] == ranks
    assert not list(tmp_path.glob("*.bin"))

    reloaded = auto_cls.from_pretrained(tmp_path)
    assert type(reloaded) is type(model)
    assert {n: l.rank for n, l in lowrank_summary(reloaded).layers.items()} == ranks
    torch.testing.assert_close(_outputs(reloaded, batch), expected)
    assert reloaded.lowrank_config.method == "svd"

    # the reloaded model trains: loss goes down over a few steps
    reloaded.train()
    labels = {"labels": batch["input_ids"]} if arch == "gpt2" else {"labels": torch.tensor([0, 1])}
    opt = torch.optim.AdamW([p for p in reloaded.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(6):
        loss = reloaded(**batch, **labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


def test_reload_keeps_frozen_factors_frozen(tmp_path):
    model = get_lowrank_model(tiny_gpt2(), LowRankConfig(method="oialr", delay_steps=0, sigma_cutoff=0.0,
                                                         rank_pattern={"c_attn|c_proj|c_fc": 0.25}))
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    layer = reloaded.transformer.h[0].mlp.c_fc
    assert layer.trainable_factors() == ["S"] and not layer.U.requires_grad and not layer.V.requires_grad
    assert lowrank_summary(reloaded).trainable_params == lowrank_summary(model).trainable_params


def test_reload_in_bf16_and_float_cast(tmp_path):
    model = get_lowrank_model(tiny_gpt2(), LowRankConfig(method="svd"))
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16)
    assert reloaded.transformer.h[0].mlp.c_fc.U.dtype == torch.bfloat16
    assert reloaded.float().transformer.h[0].mlp.c_fc.U.dtype == torch.float32


@pytest.mark.parametrize("arch, layer", [("gpt2", "transformer.h.0.mlp.c_fc"), ("vit", "vit.layers.0.mlp.fc1")])
def test_inconsistent_directory_fails_clearly(arch, layer, tmp_path):
    build, auto_cls, _, _ = CASES[arch]
    model = get_lowrank_model(build(), LowRankConfig(method="svd", rank_fraction=0.5))
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["quantization_config"]["rank_pattern"][layer] = 5
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=f"rank 5 for {layer}"):
        auto_cls.from_pretrained(tmp_path)


def test_merge_and_unload_loads_without_the_package(tmp_path):
    model = get_lowrank_model(tiny_gpt2(), LowRankConfig(method="svd", rank_fraction=0.25))
    batch = {"input_ids": torch.randint(0, 128, (2, 10))}
    expected = _outputs(model, batch)
    dense = hf_lowrank.merge_and_unload(model)
    assert not any(isinstance(m, LowRankLinear) for m in dense.modules())
    torch.testing.assert_close(_outputs(dense, batch), expected, atol=1e-5, rtol=1e-4)
    dense.save_pretrained(tmp_path)
    assert "quantization_config" not in json.loads((tmp_path / "config.json").read_text())
    torch.save(batch["input_ids"], tmp_path / "ids.pt")
    torch.save(expected, tmp_path / "expected.pt")
    code = (
        "import sys, torch\n"
        "from transformers import AutoModelForCausalLM\n"
        f"m = AutoModelForCausalLM.from_pretrained({str(tmp_path)!r}).eval()\n"
        f"ids = torch.load({str(tmp_path / 'ids.pt')!r})\n"
        f"exp = torch.load({str(tmp_path / 'expected.pt')!r})\n"
        "torch.testing.assert_close(m(input_ids=ids).logits, exp, atol=1e-5, rtol=1e-4)\n"
        "assert 'hf_lowrank' not in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
