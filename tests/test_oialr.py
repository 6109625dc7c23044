import copy

import pytest
import torch

from hf_lowrank import LowRankConfig, LowRankController, LowRankLinear, get_lowrank_model, lowrank_summary
from hf_lowrank.methods.oialr import oialr_rank

from conftest import tiny_gpt2

# Starting ranks below break-even (a quarter of full rank), so that conversion factorizes every layer; at full
# rank a layer stays dense (test_held_dense_*).
QUARTER = {"c_attn|c_proj|c_fc": 0.25}


def _batch(seed=0, n=4, length=16):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 128, (n, length), generator=g)
    return {"input_ids": ids, "labels": ids}


def _train(model, optimizer, steps, controller=None, seed=0):
    losses = []
    for i in range(steps):
        loss = model(**_batch(seed + i)).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
        if controller is not None:
            controller.step()
    return losses


def _logits(model, seed=99):
    model.eval()
    with torch.no_grad():
        out = model(input_ids=_batch(seed)["input_ids"]).logits
    model.train()
    return out


def test_cut_rule_matches_reference_table():
    s = torch.tensor([10.0, 5.0, 2.0, 0.5, 0.1, 0.05, 0.01, 0.001])
    assert oialr_rank(s, 8, cutoff=0.1, max_cut_fraction=0.5, floor=1) == 4  # keep 3, capped at 50 % cut
    assert oialr_rank(s[:6], 6, cutoff=0.1, max_cut_fraction=0.5, floor=1) == 3  # keep exactly 3
    assert oialr_rank(s, 8, cutoff=0.0, max_cut_fraction=0.5, floor=1) == 8  # nothing below cutoff
    assert oialr_rank(s, 8, cutoff=0.9, max_cut_fraction=1.0, floor=2) == 2  # floor
    assert oialr_rank(torch.zeros(4), 4, cutoff=0.1, max_cut_fraction=0.5, floor=1) == 4


def test_conversion_truncates_exactly_and_projects_adam_moments():
    model = get_lowrank_model(tiny_gpt2(), LowRankConfig(method="oialr", delay_steps=3, update_every=100,
                                                         sigma_cutoff=0.0, rank_pattern=QUARTER))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    controller = LowRankController(model, optimizer=opt)
    _train(model, opt, 3, None)
    dense = model.transformer.h[0].mlp.c_fc
    m_w, v_w = (opt.state[dense.weight][k].t().clone() for k in ("exp_avg", "exp_avg_sq"))  # Conv1D: in×out
    u, s, vh = torch.linalg.svd(dense.weight.detach().t())
    best = u[:, :8] @ torch.diag(s[:8]) @ vh[:8]  # the best rank-8 approximation of the trained weight
    controller.global_step = 2
    assert controller.step()  # optimizer step 3: conversion, parameters replaced
    layer = model.transformer.h[0].mlp.c_fc
    assert isinstance(layer, LowRankLinear) and layer.rank == 8 and layer.bias is dense.bias
    torch.testing.assert_close(layer.dense_matrix().detach(), best, atol=1e-5, rtol=1e-4)
    state = opt.state[layer.S]
    torch.testing.assert_close(state["exp_avg"], layer.U.t() @ m_w @ layer.V, atol=1e-7, rtol=1e-4)
    torch.testing.assert_close(state["exp_avg_sq"], layer.U.square().t() @ v_w @ layer.V.square(),
                               atol=1e-10, rtol=1e-4)
    assert int(state["step"]) == 3 and dense.weight not in opt.state
    assert not layer.U.requires_grad and not layer.V.requires_grad and layer.S.requires_grad
    in_optimizer = [p for g in opt.param_groups for p in g["params"]]
    assert any(p is layer.S for p in in_optimizer) and not any(p is layer.U or p is dense.weight for p in in_optimizer)


def _step_delta(model, opt, seed):
    before = {n: l.dense_matrix().detach().clone() for n, l in model.named_modules() if isinstance(l, LowRankLinear)}
    _train(model, opt, 1, None, seed=seed)
    return {n: model.get_submodule(n).dense_matrix().detach() - w for n, w in before.items()}


def _relative(a, b):
    return max(float((a[n] - b[n]).norm() / b[n].norm()) for n in b)


@pytest.mark.parametrize("rotate", [False, True])
def test_update_without_cut_keeps_outputs_and_next_adamw_step(rotate):
    cfg = LowRankConfig(method="oialr", delay_steps=0, update_every=5, sigma_cutoff=0.0, rotate_without_cut=rotate,
                        rank_pattern=QUARTER)
    model = get_lowrank_model(tiny_gpt2(), cfg)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    controller = LowRankController(model, optimizer=opt)
    _train(model, opt, 4, controller)
    twin, twin_opt = copy.deepcopy((model, opt))  # one deepcopy: twin_opt is bound to twin's parameters
    reset, reset_opt = copy.deepcopy((model, opt))
    S_before = model.transformer.h[1].mlp.c_fc.S.detach().clone()
    assert (S_before - torch.diag(torch.diagonal(S_before))).abs().max() > 0  # Σ drifted off-diagonal
    for m, o in ((model, opt), (twin, twin_opt), (reset, reset_opt)):
        _train(m, o, 1, None)
    assert controller.step_to(5) is False  # no shape changed: nothing to re-prepare
    S_after = model.transformer.h[1].mlp.c_fc.S.detach()
    assert torch.allclose(S_after, torch.diag(torch.diagonal(S_after))) == rotate
    torch.testing.assert_close(_logits(model), _logits(twin), atol=1e-5, rtol=1e-4)

    expected = _step_delta(twin, twin_opt, seed=50)
    ours = _step_delta(model, opt, seed=50)
    if not rotate:
        assert _relative(ours, expected) < 1e-5  # exactly the unrotated step
    else:
        # The reference code zeroes the moments at a rotation; carrying them (first moment exactly, second
        # by the element-wise squared rotation) must stay much closer to the unrotated step.
        LowRankController(reset, optimizer=None).step_to(5)
        for state in reset_opt.state.values():
            if state.get("exp_avg") is not None and state["exp_avg"].dim() == 2:
                state["exp_avg"].zero_()
                state["exp_avg_sq"].zero_()
        zeroed = _step_delta(reset, reset_opt, seed=50)
        assert _relative(ours, expected) < 0.5 * _relative(zeroed, expected)


def test_cuts_shrink_ranks_and_trainable_params_are_r_squared():
    cfg = LowRankConfig(method="oialr", delay_steps=2, update_every=2, sigma_cutoff=0.9, rank_pattern=QUARTER)
    model = get_lowrank_model(tiny_gpt2(), cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    controller = LowRankController(model, optimizer=opt)
    _train(model, opt, 8, controller)
    summary = lowrank_summary(model)
    assert summary.rank_fraction < 1.0
    untouched = sum(p.numel() for n, p in model.named_parameters() if not any(
        n.startswith(layer + ".") for layer in summary.layers))
    biases = sum(l.out_features for l in (model.get_submodule(n) for n in summary.layers))
    expected = sum(l.rank ** 2 for l in summary.layers.values()) + biases + untouched
    assert summary.trainable_params == expected
    optimized = {id(p) for g in opt.param_groups for p in g["params"]}
    assert all(id(p) in optimized for p in model.parameters() if p.requires_grad)
    events = [h["event"] for h in controller.history]
    assert events[0] == "start" and "convert" in events and "update" in events


def test_sgd_momentum_is_carried_and_unknown_optimizer_state_is_reset_with_warning():
    cfg = LowRankConfig(method="oialr", delay_steps=2, update_every=100, sigma_cutoff=0.0, rank_pattern=QUARTER)
    model = get_lowrank_model(tiny_gpt2(), cfg)
    opt = torch.optim.SGD(model.parameters(), lr=1e-2, momentum=0.9)
    controller = LowRankController(model, optimizer=opt)
    _train(model, opt, 2, controller)
    layer = model.transformer.h[0].mlp.c_fc
    assert opt.state[layer.S]["momentum_buffer"].shape == layer.S.shape
    assert opt.state[layer.S]["momentum_buffer"].abs().sum() > 0

    model = get_lowrank_model(tiny_gpt2(), cfg)
    opt = torch.optim.Adagrad(model.parameters(), lr=1e-2)
    controller = LowRankController(model, optimizer=opt)
    with pytest.warns(UserWarning, match="Adagrad"):
        _train(model, opt, 2, controller)
    layer = model.transformer.h[0].mlp.c_fc
    assert layer.S not in opt.state or not opt.state[layer.S]
    _train(model, opt, 1, controller)  # training goes on with fresh state


def test_non_finite_weight_skips_the_update_with_a_warning():
    cfg = LowRankConfig(method="oialr", delay_steps=1, update_every=1, sigma_cutoff=0.1, rank_pattern=QUARTER)
    model = get_lowrank_model(tiny_gpt2(), cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    controller = LowRankController(model, optimizer=opt)
    with torch.no_grad():
        model.transformer.h[0].mlp.c_fc.weight[0, 0] = float("nan")
    with pytest.warns(UserWarning, match="non-finite"):
        controller.step_to(1)
    assert not isinstance(model.transformer.h[0].mlp.c_fc, LowRankLinear)
    assert isinstance(model.transformer.h[1].mlp.c_fc, LowRankLinear)
    with torch.no_grad():
        model.transformer.h[0].mlp.c_fc.weight[0, 0] = 0.0
    controller.step_to(2)  # tried again at the next update
    assert isinstance(model.transformer.h[0].mlp.c_fc, LowRankLinear)


def test_fraction_schedules_need_the_run_length():
    model = get_lowrank_model(tiny_gpt2(), LowRankConfig(method="oialr", delay_steps=0.5, update_every=0.1))
    controller = LowRankController(model)
    with pytest.raises(ValueError, match="num_training_steps"):
        controller.step_to(1)
    controller = LowRankController(tiny_gpt2_with(LowRankConfig(method="oialr", delay_steps=0.5, update_every=0.1,
                                                                rank_pattern=QUARTER)), num_training_steps=20)
    assert not controller.step_to(9)
    assert controller.step_to(10)


def tiny_gpt2_with(config):
    return get_lowrank_model(tiny_gpt2(), config)


def _layer_sizes(model):
    """Stored elements of each target layer (weights and bias), whatever its form."""
    names = [n for n, m in model.named_modules() if n.endswith(("c_attn", "c_proj", "c_fc"))]
    return {n: sum(p.numel() for p in model.get_submodule(n).parameters()) for n in names}


def test_low_cutoff_never_leaves_a_layer_bigger_than_dense(tmp_path):
    """With a low cutoff ranks stay high: every layer above break-even stays dense, nothing grows past dense."""
    dense_model = tiny_gpt2()
    dense_sizes = _layer_sizes(dense_model)
    dense_model.save_pretrained(tmp_path / "dense")
    model = get_lowrank_model(tiny_gpt2(), LowRankConfig(method="oialr", delay_steps=2, update_every=2,
                                                         sigma_cutoff=0.05))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    controller = LowRankController(model, optimizer=opt)
    _train(model, opt, 12, controller)
    sizes = _layer_sizes(model)
    assert all(sizes[n] <= dense_sizes[n] for n in dense_sizes), sizes
    summary = lowrank_summary(model)
    assert summary.dense_layers and all("break-even" in r or "dense weight" in r for r in summary.dense_layers.values())
    assert all(layer.params < layer.dense_params for layer in summary.layers.values())
    model.save_pretrained(tmp_path / "lowrank")
    weights = lambda d: (tmp_path / d / "model.safetensors").stat().st_size  # noqa: E731
    assert weights("lowrank") <= weights("dense")
    # the reason survives a reload
    from transformers import AutoModelForCausalLM

    if summary.layers:
        assert lowrank_summary(AutoModelForCausalLM.from_pretrained(tmp_path / "lowrank")).dense_layers == \
            summary.dense_layers


def test_held_dense_at_a_decision_point_leaves_outputs_unchanged():
    model = get_lowrank_model(tiny_gpt2(), LowRankConfig(method="oialr", delay_steps=3, update_every=2,
                                                         sigma_cutoff=0.0))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    controller = LowRankController(model, optimizer=opt)
    _train(model, opt, 2, controller)
    before = _logits(model)
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    _train(model, opt, 0, controller)
    assert controller.step_to(3) is False  # the conversion step: every layer at full rank, above break-even
    assert not any(isinstance(m, LowRankLinear) for m in model.modules())
    assert torch.equal(_logits(model), before)  # bit-identical: nothing was truncated or re-factored
    assert all(torch.equal(p, weights[n]) for n, p in model.named_parameters())
    assert set(lowrank_summary(model).dense_layers) == {n for n in _layer_sizes(model)}


def test_held_dense_layer_converts_once_its_rank_falls_below_break_even():
    # cutoff 0.5: the first update may cut at most half the rank (32 -> 16, still above the 14 of the 32x32
    # c_proj); the second update continues the rule from 16 and converts.
    model = get_lowrank_model(tiny_gpt2(), LowRankConfig(method="oialr", delay_steps=2, update_every=2,
                                                         sigma_cutoff=0.9, target_modules=["attn.c_proj"]))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    controller = LowRankController(model, optimizer=opt)
    _train(model, opt, 2, controller)
    held = lowrank_summary(model).dense_layers
    assert set(held) == {"transformer.h.0.attn.c_proj", "transformer.h.1.attn.c_proj"}
    assert controller.method.dense_ranks == {n: 16 for n in held}
    _train(model, opt, 2, controller)
    layer = model.transformer.h[0].attn.c_proj
    assert isinstance(layer, LowRankLinear) and layer.rank == 8 and not lowrank_summary(model).dense_layers
