"""`LowRankLinear`: the one factorized layer every method shares.

The weight is `W = U S Vᵀ` (`U`: out×r, `S`: r×r, `V`: in×r) or `W = U Vᵀ` when no `S` is held. The layer
replaces either an `nn.Linear` (weight stored out×in) or a GPT-2 `Conv1D` (weight stored in×out); both
compute `y = x Wᵀ + b`, so the factors are the same and only `.weight`/`to_dense()` differ.
"""

from __future__ import annotations

import warnings
from typing import Iterable, Optional

import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

LINEAR_TYPES = (nn.Linear, Conv1D)
FACTOR_NAMES = ("U", "S", "V")


def dense_weight_of(module: nn.Module) -> torch.Tensor:
    """The weight of an `nn.Linear` or `Conv1D` as an out×in matrix (a view, no copy)."""
    return module.weight.t() if isinstance(module, Conv1D) else module.weight


def linear_shape(module: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of an `nn.Linear`, a `Conv1D` or a `LowRankLinear`."""
    if isinstance(module, Conv1D):
        return module.nx, module.nf
    return module.in_features, module.out_features


def svd_f32(matrix: torch.Tensor) -> Optional[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Thin SVD in float32 (bf16/fp16 SVD is not supported on CPU): `(U, s, Vh)`, or `None` with a warning
    when the input is not finite or the SVD does not converge, so callers skip the update instead of crashing."""
    m = matrix.detach().float()
    if not torch.isfinite(m).all():
        warnings.warn(f"hf_lowrank: non-finite values in a {tuple(m.shape)} matrix; rank update skipped.")
        return None
    try:
        return torch.linalg.svd(m, full_matrices=False)
    except RuntimeError as err:  # LAPACK convergence failure (torch.linalg.LinAlgError subclasses it)
        warnings.warn(f"hf_lowrank: SVD failed on a {tuple(m.shape)} matrix ({err}); rank update skipped.")
        return None


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
        self.set_trainable(trainable if trainable is not None else (("S",) if has_sigma else ("U", "V")))

    # --- construction ---------------------------------------------------------------------------------
    @classmethod
    def from_dense(cls, module: nn.Module, rank: int, *, has_sigma: bool, trainable=None) -> "LowRankLinear":
        """Factorize an `nn.Linear` or `Conv1D` by a float32 SVD truncated to `rank`.

        With `S` the layer holds `U`, `diag(s)`, `V`; without it `s` is split evenly into the bases
        (`U √s`, `V √s`), so a rank-r layer stores only `r·(in+out)` plus bias.
        """
        in_f, out_f = linear_shape(module)
        weight = dense_weight_of(module)
        layer = cls(in_f, out_f, rank, has_sigma=has_sigma, bias=module.bias is not None,
                    fan_in_fan_out=isinstance(module, Conv1D), trainable=trainable,
                    device=weight.device, dtype=weight.dtype)
        decomposition = svd_f32(weight)
        if decomposition is None:
            raise ValueError("Cannot factorize a layer whose weight is not finite or whose SVD fails.")
        u, s, vh = (t[..., :rank] if i != 2 else t[:rank] for i, t in enumerate(decomposition))
        layer.set_factors(*factors_from_svd(u, s, vh.t(), has_sigma))
        if module.bias is not None:
            layer.bias.data.copy_(module.bias.detach())
        return layer

    def set_factors(self, U: torch.Tensor, S: Optional[torch.Tensor], V: torch.Tensor) -> None:
        """Replace the factors' data (shapes may change); the Parameter objects and their flags stay."""
        dtype, device = self.U.dtype, self.U.device
        self.U.data = U.detach().to(device=device, dtype=dtype).contiguous()
        self.V.data = V.detach().to(device=device, dtype=dtype).contiguous()
        if self.S is not None:
            self.S.data = S.detach().to(device=device, dtype=dtype).contiguous()

    def set_trainable(self, factors: Iterable[str]) -> None:
        """Make exactly the named factors (`"U"`, `"S"`, `"V"`) trainable; the bias always trains."""
        factors = set(factors)
        unknown = factors - set(FACTOR_NAMES)
        if unknown or ("S" in factors and self.S is None):
            raise ValueError(f"Cannot train factors {sorted(factors)} of a layer holding "
                             f"{self.factor_names()}.")
        for name in self.factor_names():
            getattr(self, name).requires_grad_(name in factors)

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
        """`U S Vᵀ` as an out×in matrix (differentiable)."""
        left = self.U if self.S is None else self.U @ self.S
        return left @ self.V.t()

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
        return self.in_features * self.out_features + (self.out_features if self.bias is not None else 0)

    # --- compute --------------------------------------------------------------------------------------
    def chain_is_cheaper(self, tokens: int) -> bool:
        """Multiply-adds of the factor chain vs. materializing W, for `tokens` input rows."""
        r, n_in, n_out = self.rank, self.in_features, self.out_features
        inner = r if self.S is not None else 0
        chain = tokens * r * (n_in + n_out + inner)
        materialized = n_out * r * (n_in + inner) + tokens * n_in * n_out
        return chain <= materialized

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = x.numel() // self.in_features
        if self.chain_is_cheaper(tokens):
            h = torch.matmul(x, self.V)
            if self.S is not None:
                h = F.linear(h, self.S)
            return F.linear(h, self.U, self.bias)
        return F.linear(x, self.dense_matrix(), self.bias)

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


def factors_from_svd(u: torch.Tensor, s: torch.Tensor, v: torch.Tensor, has_sigma: bool):
    """`(U, S, V)` from a truncated SVD `u diag(s) vᵀ`: `S = diag(s)`, or `s` folded evenly into the bases."""
    if has_sigma:
        return u, torch.diag(s), v
    root = s.clamp_min(0).sqrt()
    return u * root, None, v * root
