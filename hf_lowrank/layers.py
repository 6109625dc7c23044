"""`LowRankLinear`: the one factorized layer every method shares.

The weight is `W = U S Vᵀ` (`U`: out×r, `S`: r×r, `V`: in×r) or `W = U Vᵀ` when no `S` is held. The layer
replaces either an `nn.Linear` (weight stored out×in) or a GPT-2 `Conv1D` (weight stored in×out); both
compute `y = x Wᵀ + b`, so the factors are the same and only `.weight`/`to_dense()` differ.
"""

from __future__ import annotations

from typing import Iterable, Optional

import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

from .linalg import factors_from_svd, svd_f32

LINEAR_TYPES = (nn.Linear, Conv1D)
# Attribute of a model naming its target layers held dense (at or above break-even), with the reason.
DENSE_LAYERS_ATTR = "lowrank_dense_layers"
FACTOR_NAMES = ("U", "S", "V")


def dense_weight_of(module: nn.Module) -> torch.Tensor:
    """The weight of an `nn.Linear` or `Conv1D` as an out×in matrix (a view, no copy)."""
    return module.weight.t() if is_conv1d(module) else module.weight


def linear_shape(module: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of an `nn.Linear`, a `Conv1D` or a `LowRankLinear`."""
    if isinstance(module, Conv1D):
        return module.nx, module.nf
    return module.in_features, module.out_features


def is_conv1d(module: nn.Module) -> bool:
    """The one rule for GPT-2's `Conv1D` layout (weight stored in×out): a `Conv1D`, or a `LowRankLinear` that
    replaced one. Everything that builds, exports or merges a layer asks this."""
    if isinstance(module, LowRankLinear):
        return module.fan_in_fan_out
    return isinstance(module, Conv1D)


def break_even_rank(in_features: int, out_features: int, has_sigma: bool) -> int:
    """The largest rank at which a factorized layer stores fewer weight elements than the dense one:
    `r·(in+out) [+ r²] < in·out`. It also bounds compute: the factor chain costs about `T·r·(in+out[+r])`
    multiply-adds per `T` tokens against `T·in·out` dense."""
    n = in_features * out_features
    rank = n // (in_features + out_features)
    while rank > 0 and rank * (in_features + out_features) + (rank * rank if has_sigma else 0) >= n:
        rank -= 1
    return rank


class LowRankLinear(nn.Module):
    """A linear layer stored as factors `U (out×r)`, optional `S (r×r)`, `V (in×r)` and a bias.

    Frozen factors are `nn.Parameter`s with `requires_grad=False` (not buffers: DDP broadcasts buffers on
    every forward). The forward picks, per call, the cheaper of the factor chain `((x V) Sᵀ) Uᵀ` and the
    materialized weight, by multiply-add count.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank: int,
        *,
        has_sigma: bool,
        bias: bool = True,
        has_base: bool = False,
        fan_in_fan_out: bool = False,
        trainable: Optional[Iterable[str]] = None,
        device=None,
        dtype=None,
    ):
        super().__init__()
        if not 0 <= rank <= min(in_features, out_features):
            raise ValueError(f"rank {rank} is outside [0, {min(in_features, out_features)}] for a "
                             f"{in_features}→{out_features} layer.")
        kw = {"device": device, "dtype": dtype}
        self.in_features, self.out_features = in_features, out_features
        self.fan_in_fan_out = fan_in_fan_out  # True when it replaces a GPT-2 Conv1D (weight stored in×out)
        self.U = nn.Parameter(torch.zeros(out_features, rank, **kw))
        self.S = nn.Parameter(torch.zeros(rank, rank, **kw)) if has_sigma else None
        self.V = nn.Parameter(torch.zeros(in_features, rank, **kw))
        self.bias = nn.Parameter(torch.zeros(out_features, **kw)) if bias else None
        # Frozen dense W0 (out×in) for cumulative InRank, W = W0 + U Vᵀ; None for a purely factorized layer.
        self.base = nn.Parameter(torch.zeros(out_features, in_features, **kw), requires_grad=False) if has_base else None
        self.set_trainable(trainable if trainable is not None else (("S",) if has_sigma else ("U", "V")))

    # --- construction ---------------------------------------------------------------------------------
    @classmethod
    def from_dense(cls, module: nn.Module, rank: int, *, has_sigma: bool, trainable=None) -> "LowRankLinear":
        """Factorize an `nn.Linear` or `Conv1D` by a float32 SVD truncated to `rank`.

        With `S` the layer holds `U`, `diag(s)`, `V`; without it `s` is split evenly into the bases
        (`U √s`, `V √s`), so a rank-r layer stores only `r·(in+out)` plus bias.
        """
        weight = dense_weight_of(module)
        layer = build_lowrank_linear(module, rank, has_sigma=has_sigma, trainable=trainable)
        decomposition = svd_f32(weight)
        if decomposition is None:
            raise ValueError("Cannot factorize a layer whose weight is not finite or whose SVD fails.")
        u, s, vh = (t[..., :rank] if i != 2 else t[:rank] for i, t in enumerate(decomposition))
        layer.set_factors(*factors_from_svd(u, s, vh.t(), has_sigma))
        if module.bias is not None:
            layer.bias.data.copy_(module.bias.detach())
        return layer

    def set_factors(self, U: torch.Tensor, S: Optional[torch.Tensor], V: torch.Tensor) -> bool:
        """Replace the factors' values. A factor whose shape changes becomes a new Parameter (same
        trainability): autograd caches a leaf's shape in its gradient accumulator, which a DDP reducer keeps
        alive, so resizing a Parameter in place breaks the next backward. Returns True if any was replaced."""
        replaced = False
        for name, value in (("U", U), ("S", S), ("V", V)):
            old = getattr(self, name)
            if old is None:
                continue
            value = value.detach().to(device=old.device, dtype=old.dtype).contiguous()
            if value.shape == old.shape:
                old.data = value
            else:
                setattr(self, name, nn.Parameter(value, requires_grad=old.requires_grad))
                replaced = True
        return replaced

    def set_trainable(self, factors: Iterable[str]) -> None:
        """Make exactly the named factors (`"U"`, `"S"`, `"V"`) trainable; a held `base` (`W0`) is frozen. The bias
        keeps its own flag."""
        factors = set(factors)
        unknown = factors - set(FACTOR_NAMES)
        if unknown or ("S" in factors and self.S is None):
            raise ValueError(f"Cannot train factors {sorted(factors)} of a layer holding "
                             f"{self.factor_names()}.")
        for name in self.factor_names():
            getattr(self, name).requires_grad_(name in factors)
        if self.base is not None:  # loading replaces parameters by trainable ones: W0 must stay frozen
            self.base.requires_grad_(False)

    # --- properties -----------------------------------------------------------------------------------
    @property
    def rank(self) -> int:
        return self.U.shape[1]

    @property
    def max_rank(self) -> int:
        return min(self.in_features, self.out_features)

    def factor_names(self) -> list[str]:
        return [n for n in FACTOR_NAMES if getattr(self, n) is not None]

    def trainable_factors(self) -> list[str]:
        return [n for n in self.factor_names() if getattr(self, n).requires_grad]

    def dense_matrix(self) -> torch.Tensor:
        """The layer's weight `[W0 +] U S Vᵀ` as an out×in matrix (differentiable)."""
        product = self._factor_product()
        return product if self.base is None else self.base + product

    def _factor_product(self) -> torch.Tensor:
        if self.S is None:
            return self.U @ self.V.t()
        if self.out_features <= self.in_features:   # cheaper association: r·r·min(in, out) for the S side
            return (self.U @ self.S) @ self.V.t()
        return self.U @ (self.S @ self.V.t())

    @property
    def weight(self) -> torch.Tensor:
        """Dense reconstruction in the replaced module's layout (not a Parameter, detached).

        Transformers' init and tying code touch `.weight`; `_is_hf_initialized` keeps v5's `_init_weights`
        from "re-initializing" this throw-away tensor. Each access costs a reconstruction: no hot path uses it.
        """
        with torch.no_grad():
            w = self.dense_matrix()
            w = w.t() if self.fan_in_fan_out else w
        w._is_hf_initialized = True
        return w

    def stored_params(self) -> int:
        """Every stored element: factors, `S` if held, bias."""
        return sum(p.numel() for p in self.parameters())

    def dense_params(self) -> int:
        """Parameters of the same layer dense, bias included."""
        return self.in_features * self.out_features + (self.out_features if self.bias is not None else 0)

    # --- compute --------------------------------------------------------------------------------------
    def path_costs(self, tokens: int, *, backward: bool = True, input_grad: bool = True) -> tuple[int, int]:
        """Multiply-adds of one call on `tokens` input rows by the factor chain and by materializing `W`.

        Counts the forward and, when `backward`, the backward of exactly the gradients that will be computed:
        those of the trainable factors and, when `input_grad`, of the input. The backward matters: with `S`
        trainable and `U`, `V` frozen (OIALR) the materialized path pays `dW = dyᵀx` plus its projection
        `Uᵀ dW V`, while the chain pays only rank-sized products. Biases are not counted (same on both paths).
        """
        T, r, n_in, n_out = tokens, self.rank, self.in_features, self.out_features
        g_u, g_v = backward and self.U.requires_grad, backward and self.V.requires_grad
        g_s = backward and self.S is not None and self.S.requires_grad
        g_x = backward and input_grad
        if self.S is None:
            chain = T * r * (n_in + n_out)                       # h = x V, y = h Uᵀ
            chain += T * n_out * r * (g_u + (g_v or g_x))        # dU = dyᵀ h, g = dy U
            chain += T * n_in * r * (g_v + g_x)                  # dV = xᵀ g, dx = g Vᵀ
            materialized = n_out * r * n_in + T * n_in * n_out   # W = U Vᵀ, y = x Wᵀ
            materialized += T * n_in * n_out * (g_x + (g_u or g_v))    # dx = dy W, dW = dyᵀ x
            materialized += n_out * n_in * r * (g_u + g_v)       # dU = dW V, dV = dWᵀ U
            return chain, materialized
        # with S: see _SigmaChain for the chain's products
        chain = T * r * (n_in + n_out) + min(T, n_out) * r * r   # h = x V, then U S or h Sᵀ (_SigmaChain), y
        need_g = g_s or g_v or g_x
        chain += T * n_out * r * need_g                          # g = dy U
        chain += (T * n_out * r + n_out * r * r) * g_u           # dU = (dyᵀ h) Sᵀ
        chain += T * r * r * g_s                                 # dS = gᵀ h
        if g_v:
            chain += T * r * r + T * n_in * r                    # g1 = g S, dV = xᵀ g1
            chain += T * r * n_in * g_x                          # dx = g1 Vᵀ
        elif g_x:
            chain += n_in * r * r + T * r * n_in                 # dx = g (S Vᵀ)
        small = min(n_in, n_out)
        materialized = small * r * r + n_out * r * n_in + T * n_in * n_out   # W = U S Vᵀ, y = x Wᵀ
        materialized += T * n_in * n_out * (g_x + (g_u or g_s or g_v))       # dx = dy W, dW = dyᵀ x
        materialized += (n_out * n_in * r + small * r * r) * (g_u or g_s)    # dW V (or Uᵀ dW), then S-side
        materialized += n_out * n_in * r * g_v
        return chain, materialized

    def chain_is_cheaper(self, tokens: int, *, backward: Optional[bool] = None, input_grad: bool = True) -> bool:
        """Whether the factor chain costs no more multiply-adds than materializing `W` (see `path_costs`).

        `backward=None` means: a backward follows when grad mode is on and some factor trains.
        """
        if backward is None:
            backward = torch.is_grad_enabled() and any(p.requires_grad for p in self.parameters())
        chain, materialized = self.path_costs(tokens, backward=backward, input_grad=input_grad)
        return chain <= materialized

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.base is not None:  # W0 costs a dense product anyway: add the factors to it and multiply once
            return F.linear(x, self.dense_matrix(), self.bias)
        tokens = x.numel() // self.in_features
        grad = torch.is_grad_enabled()
        backward = grad and (x.requires_grad or any(p.requires_grad for p in self.parameters()))
        if not self.chain_is_cheaper(tokens, backward=backward, input_grad=grad and x.requires_grad):
            return F.linear(x, self.dense_matrix(), self.bias)
        if self.S is None:  # plain autograd already computes exactly the chain's needed products
            return F.linear(torch.matmul(x, self.V), self.U, self.bias)
        U, S, V, bias = self.U, self.S, self.V, self.bias
        device_type = x.device.type
        if torch.is_autocast_enabled(device_type):
            # Cast once here (differentiable casts bring the grads back to the parameters' dtype) and run
            # the Function without autocast, so its forward and backward see one dtype whatever the
            # autocast state is when `backward()` runs.
            dtype = torch.get_autocast_dtype(device_type)
            x, U, S, V = (t.to(dtype) for t in (x, U, S, V))
            bias = bias.to(dtype) if bias is not None else None
            with torch.autocast(device_type, enabled=False):
                y = _SigmaChain.apply(x.reshape(-1, self.in_features), U, S, V, bias)
        else:
            y = _SigmaChain.apply(x.reshape(-1, self.in_features), U, S, V, bias)
        return y.reshape(*x.shape[:-1], self.out_features)

    def to_dense(self) -> nn.Module:
        """An `nn.Linear` (or `Conv1D`, matching what was replaced) holding `U S Vᵀ`."""
        with torch.no_grad():
            w = self.dense_matrix()
            if self.fan_in_fan_out:
                dense = Conv1D(self.out_features, self.in_features).to(device=w.device, dtype=w.dtype)
                dense.weight.copy_(w.t())
            else:
                dense = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                                  device=w.device, dtype=w.dtype)
                dense.weight.copy_(w)
            if self.bias is not None:
                dense.bias.copy_(self.bias)
            elif self.fan_in_fan_out:
                dense.bias.zero_()
        return dense

    def extra_repr(self) -> str:
        kind = "Conv1D" if self.fan_in_fan_out else "Linear"
        return (f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, "
                f"sigma={self.S is not None}, trainable={self.trainable_factors()}, replaces={kind}")


class _SigmaChain(torch.autograd.Function):
    """`y = x V Sᵀ Uᵀ + b` for 2-D `x`, computing only the gradients that are needed.

    Compared with autograd over `((x V) Sᵀ) Uᵀ`, it never forms `T×r` products with `S` that are not needed:
    the forward uses `U S` (out·r² instead of T·r²) when there are more tokens than outputs, `(x V) Sᵀ` when there
    are fewer (generation), and with `U`, `V` frozen (OIALR) the backward is
    `g = dy U`, `dS = gᵀ (x V)`, `dx = g (S Vᵀ)`; only `x V` (T×r) is saved, not `x`, unless `V` trains.
    """

    @staticmethod
    def forward(ctx, x, U, S, V, bias):
        h = x @ V
        if x.shape[0] < U.shape[0]:  # few tokens (generation): T·r² for (h Sᵀ) beats out·r² for U S
            left, right = h @ S.t(), U
        else:
            left, right = h, U @ S
        y = torch.addmm(bias, left, right.t()) if bias is not None else left @ right.t()
        need_x, need_u, need_s, need_v, need_b = ctx.needs_input_grad
        ctx.has_bias = bias is not None
        ctx.save_for_backward(x if need_v else None, h if (need_u or need_s) else None, U, S, V)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, h, U, S, V = ctx.saved_tensors
        need_x, need_u, need_s, need_v, need_b = ctx.needs_input_grad
        dx = dU = dS = dV = db = None
        dy = dy.contiguous()
        if need_u:
            dU = (dy.t() @ h) @ S.t()
        if need_x or need_s or need_v:
            g = dy @ U
            if need_s:
                dS = g.t() @ h
            if need_v:
                g1 = g @ S
                dV = x.t() @ g1
                if need_x:
                    dx = g1 @ V.t()
            elif need_x:
                dx = g @ (S @ V.t())
        if need_b and ctx.has_bias:
            db = dy.sum(0)
        return dx, dU, dS, dV, db


def build_lowrank_linear(like: nn.Module, rank: int, *, has_sigma: bool, has_base: bool = False,
                         bias: Optional[bool] = None, trainable: Optional[Iterable[str]] = None) -> LowRankLinear:
    """The one factory of `LowRankLinear`: an empty layer (zero factors) that can take the place of `like`.

    `like` is the dense layer it replaces (`nn.Linear` or GPT-2 `Conv1D`), or a `LowRankLinear` being rebuilt
    at another rank or form; shape, layout (`is_conv1d`), device and dtype come from it, and the bias too
    unless `bias` says otherwise. Injection, surgery, the quantizer (a saved structure, on the meta device)
    and restructuring for a resume all build layers here.

    Args:
        like (`nn.Module`): the layer to replace.
        rank (`int`): components to hold.
        has_sigma (`bool`): hold a separate r×r `S` (OIALR's training form).
        has_base (`bool`, *optional*, defaults to `False`): hold a frozen dense `W0` (`W = W0 + U Vᵀ`).
        bias (`bool`, *optional*): hold a bias; defaults to whether `like` has one.
        trainable (iterable of `str`, *optional*): the factors that train (default: `S`, else `U` and `V`).
    """
    n_in, n_out = linear_shape(like)
    reference = next(like.parameters(), None)
    kwargs = {} if reference is None else {"device": reference.device, "dtype": reference.dtype}
    return LowRankLinear(n_in, n_out, rank, has_sigma=has_sigma, has_base=has_base,
                         bias=(getattr(like, "bias", None) is not None) if bias is None else bias,
                         fan_in_fan_out=is_conv1d(like), trainable=trainable, **kwargs)
