"""Measures of a layer: its matrix and rank, the polar factor and OIALR's basis stability, and InRank's rank of
the cumulative update `W_t - W_0`."""

from __future__ import annotations

import warnings
from typing import Optional, Union

import torch
from torch import nn

from ..config import LowRankConfig
from ..layers import LowRankLinear, dense_weight_of, linear_shape
from ..linalg import energy_rank, svd_f32
from ..targets import find_targets


def layer_matrix(module: nn.Module) -> torch.Tensor:
    """A layer's weight as a detached out×in float32 matrix, whether it is dense or factorized."""
    with torch.no_grad():
        matrix = module.dense_matrix() if isinstance(module, LowRankLinear) else dense_weight_of(module)
    return matrix.detach().float()


def layer_rank(module: nn.Module) -> int:
    """Components a layer holds now: its rank if factorized, its full rank `min(in, out)` if dense."""
    return module.rank if isinstance(module, LowRankLinear) else min(linear_shape(module))


def _polar_from_svd(u: torch.Tensor, vh: torch.Tensor, rank: Optional[int]) -> torch.Tensor:
    if rank is not None:
        u, vh = u[:, :rank], vh[:rank]
    b = u @ vh
    # Tall orientation: its columns are the orthonormal side, so every column has a well-defined direction.
    return b.t() if b.shape[0] < b.shape[1] else b


def polar_factor(matrix: torch.Tensor, rank: Optional[int] = None) -> Optional[torch.Tensor]:
    """The orthogonal polar factor `B = U Vᴴ` of `matrix` (from its float32 SVD), oriented tall.

    `B` is invariant to the sign and rotation ambiguity of singular vectors, which makes it comparable across
    checks. With `rank`, only the top `rank` components are used (a factorized layer's weight is rank-deficient).
    Returns `None` (with a warning) when the matrix is not finite or the SVD fails.
    """
    decomposition = svd_f32(matrix)
    if decomposition is None:
        return None
    u, _, vh = decomposition
    return _polar_from_svd(u, vh, rank)


def basis_stability(previous: torch.Tensor, current: torch.Tensor) -> float:
    """OIALR's stability of a basis between two checks: the mean over columns `j` of
    `cos(B_t[:, j], B_prev[:, j])` for the polar factors `B` of the same layer (1.0: the basis did not move)."""
    if previous.shape != current.shape:
        raise ValueError(f"Polar factors of shapes {tuple(previous.shape)} and {tuple(current.shape)} cannot be "
                         "compared: they are not from the same layer.")
    a, b = previous.float(), current.float()
    cos = (a * b).sum(0) / (a.norm(dim=0) * b.norm(dim=0)).clamp_min(1e-12)
    return cos.mean().item()


def cumulative_update_rank(delta: torch.Tensor, explained_ratio: float = 0.9) -> Optional[int]:
    """The smallest `k` whose top-k singular values of `delta` hold at least `explained_ratio` of its squared
    Frobenius norm (InRank's rank of the cumulative update `W_t - W_0`). 0 when `delta` is zero; `None` (with a
    warning) when it is not finite."""
    d = delta.detach().float()
    if not torch.isfinite(d).all():
        warnings.warn(f"hf_lowrank: non-finite values in a {tuple(d.shape)} weight update; cumulative rank skipped.")
        return None
    s = torch.linalg.svdvals(d)
    if s.numel() == 0 or s[0] == 0:
        return 0
    return energy_rank(s, explained_ratio)


def resolve_targets(model: nn.Module, targets: Union[str, list, None] = None) -> list[str]:
    """Layer names to watch: `targets` (as `LowRankConfig.target_modules`: "all-linear", suffixes or a regex),
    or, when `None`, the layers the model's own `LowRankConfig` selects (else "all-linear")."""
    config = getattr(model, "lowrank_config", None)
    if targets is not None or config is None:
        config = LowRankConfig(target_modules=targets or "all-linear")
    return find_targets(model, config)
