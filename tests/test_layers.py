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
