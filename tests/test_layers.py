import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from hf_lowrank import LowRankLinear


def _dense(kind, n_in=24, n_out=40):
    torch.manual_seed(0)
    if kind == "linear":
        return nn.Linear(n_in, n_out)
    layer = Conv1D(n_out, n_in)
    nn.init.normal_(layer.bias)
    return layer


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
@pytest.mark.parametrize("has_sigma", [True, False])
def test_full_rank_factorization_reproduces_dense(kind, has_sigma):
    dense = _dense(kind)
    layer = LowRankLinear.from_dense(dense, rank=24, has_sigma=has_sigma)
    x = torch.randn(5, 7, 24)
    torch.testing.assert_close(layer(x), dense(x), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(layer.weight, dense.weight.detach(), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(layer.to_dense()(x), dense(x), atol=1e-5, rtol=1e-4)
    assert type(layer.to_dense()) is type(dense)


def test_truncation_is_the_best_rank_r_approximation():
    dense = _dense("linear", 30, 30)
    layer = LowRankLinear.from_dense(dense, rank=5, has_sigma=False)
    s = torch.linalg.svdvals(dense.weight.detach())
    err = torch.linalg.matrix_norm(layer.dense_matrix().detach() - dense.weight.detach())
    torch.testing.assert_close(err, s[5:].square().sum().sqrt(), atol=1e-4, rtol=1e-4)
    assert layer.stored_params() == 5 * (30 + 30) + 30  # S folded into U and V


def test_chain_and_materialized_forward_agree_and_choice_follows_cost():
    dense = _dense("linear", 64, 64)
    low = LowRankLinear.from_dense(dense, rank=8, has_sigma=True)
    full = LowRankLinear.from_dense(dense, rank=64, has_sigma=True)
    assert low.chain_is_cheaper(tokens=512)
    assert not full.chain_is_cheaper(tokens=512)
    x = torch.randn(512, 64)
    chain = torch.nn.functional.linear(torch.nn.functional.linear(x @ low.V, low.S), low.U, low.bias)
    torch.testing.assert_close(low(x), chain)
    torch.testing.assert_close(
        torch.nn.functional.linear(x, low.dense_matrix(), low.bias), chain, atol=1e-5, rtol=1e-4)


def test_trainable_factors_and_gradients():
    layer = LowRankLinear.from_dense(_dense("linear"), rank=6, has_sigma=True)
    assert layer.trainable_factors() == ["S"]
    layer(torch.randn(3, 24)).sum().backward()
    assert layer.S.grad is not None and layer.U.grad is None and layer.V.grad is None
    with pytest.raises(ValueError, match="Cannot train"):
        LowRankLinear.from_dense(_dense("linear"), rank=6, has_sigma=False, trainable=("S",))


def test_rank_outside_range_is_rejected():
    with pytest.raises(ValueError, match="outside"):
        LowRankLinear(10, 20, 11, has_sigma=False)


def test_weight_property_is_not_a_parameter_and_is_flagged_for_hf_init():
    layer = LowRankLinear.from_dense(_dense("conv1d"), rank=4, has_sigma=False)
    assert "weight" not in dict(layer.named_parameters())
    assert layer.weight.shape == (24, 40) and layer.weight._is_hf_initialized


def _reference(layer, x):
    """The layer's output through the dense reconstruction, by plain autograd."""
    return torch.nn.functional.linear(x, layer.dense_matrix(), layer.bias)


@pytest.mark.parametrize("trainable", [("S",), ("U", "S", "V"), ("U",), ("V",), ("S", "V"), ()])
@pytest.mark.parametrize("input_grad", [True, False])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("tokens", [64, 3])  # more tokens than outputs (U S first), fewer ((x V) Sᵀ first)
def test_sigma_chain_gradients_match_autograd_through_the_dense_weight(trainable, input_grad, bias, tokens):
    torch.manual_seed(1)
    layer = LowRankLinear.from_dense(nn.Linear(48, 40, bias=bias), rank=6, has_sigma=True, trainable=trainable)
    assert layer.chain_is_cheaper(tokens=2 * tokens, backward=True, input_grad=input_grad)
    x = torch.randn(2, tokens, 48, requires_grad=input_grad)
    dy = torch.randn(2, tokens, 40)
    params = [p for p in layer.parameters() if p.requires_grad]
    y = layer(x)
    assert y.shape == (2, tokens, 40)
    torch.testing.assert_close(y, _reference(layer, x), atol=1e-5, rtol=1e-4)
    wrt = params + ([x] if input_grad else [])
    if not wrt:  # nothing trains: no graph at all
        assert not y.requires_grad
        return
    got = torch.autograd.grad(y, wrt, dy)
    want = torch.autograd.grad(_reference(layer, x), wrt, dy)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("has_sigma", [True, False])
def test_frozen_factors_get_no_gradient_on_either_path(has_sigma):
    for rank in (4, 24):  # chain and materialized
        layer = LowRankLinear.from_dense(_dense("linear"), rank=rank, has_sigma=has_sigma)
        layer(torch.randn(50, 24, requires_grad=True)).sum().backward()
        for name in layer.factor_names():
            p = getattr(layer, name)
            assert (p.grad is not None) == p.requires_grad, (rank, name)
        assert layer.bias.grad is not None


def test_cost_model_counts_the_backward_and_follows_it(monkeypatch):
    # 16→64 at full rank with S trainable, U and V frozen: materializing W is cheaper for a forward alone,
    # but in training it costs dW = dyᵀx plus its projection Uᵀ dW V, so the chain is cheaper.
    torch.manual_seed(0)
    layer = LowRankLinear.from_dense(nn.Linear(16, 64), rank=16, has_sigma=True)
    assert not layer.chain_is_cheaper(tokens=256, backward=False)
    assert layer.chain_is_cheaper(tokens=256, backward=True, input_grad=True)
    chain, materialized = layer.path_costs(256, backward=True)
    assert chain < materialized
    calls = []
    real = LowRankLinear.dense_matrix
    monkeypatch.setattr(LowRankLinear, "dense_matrix", lambda self: calls.append(1) or real(self))
    x = torch.randn(256, 16, requires_grad=True)
    layer(x)
    assert not calls                      # training call: the chain
    with torch.no_grad():
        y = layer(x)
    assert calls                          # forward only: materialized
    torch.testing.assert_close(y, torch.nn.functional.linear(x, real(layer), layer.bias), atol=1e-5, rtol=1e-4)
    # a layer that trains nothing costs the forward only, whatever grad mode says
    layer.set_trainable(())
    layer.bias.requires_grad_(False)
    assert layer.chain_is_cheaper(tokens=256) == layer.chain_is_cheaper(tokens=256, backward=False)


@pytest.mark.parametrize("has_sigma", [True, False])
@pytest.mark.parametrize("rank", [4, 24])
def test_bf16_autocast_forward_and_backward(has_sigma, rank):
    layer = LowRankLinear.from_dense(_dense("conv1d"), rank=rank, has_sigma=has_sigma)
    x = torch.randn(3, 40, 24, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16
    y.float().square().mean().backward()  # backward outside the autocast context, as usual
    for p in layer.parameters():
        if p.requires_grad:
            assert p.grad is not None and p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all()
    assert x.grad.dtype == torch.float32
    ref = _reference(layer, x.detach())
    torch.testing.assert_close(y.float(), ref, atol=0.1, rtol=0.05)
