"""Linear algebra shared by the methods and diagnostics: float32 SVD with failure handling, factors from an
SVD, the energy rank of a spectrum, and the spectrum of a product of factors."""

from __future__ import annotations

import warnings
from typing import Optional

import torch


def svd_f32(matrix: torch.Tensor) -> Optional[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Thin SVD in float32 (bf16/fp16 SVD is not supported on CPU): `(U, s, Vh)`, or `None` with a warning
    when the input is not finite or the SVD does not converge, so callers skip the update instead of crashing."""
    m = matrix.detach().float()
    if m.device.type == "meta":
        raise ValueError("Cannot take the SVD of a tensor on the meta device: materialize the model's weights first "
                         "(load them, or build the model on the CPU) before factorizing it.")
    if not torch.isfinite(m).all():
        warnings.warn(f"hf_lowrank: non-finite values in a {tuple(m.shape)} matrix; rank update skipped.")
        return None
    try:
        return torch.linalg.svd(m, full_matrices=False)
    except RuntimeError as err:  # LAPACK convergence failure (torch.linalg.LinAlgError subclasses it)
        warnings.warn(f"hf_lowrank: SVD failed on a {tuple(m.shape)} matrix ({err}); rank update skipped.")
        return None


def factors_from_svd(u: torch.Tensor, s: torch.Tensor, v: torch.Tensor, has_sigma: bool):
    """`(U, S, V)` from a truncated SVD `u diag(s) vᵀ`: `S = diag(s)`, or `s` folded evenly into the bases."""
    if has_sigma:
        return u, torch.diag(s), v
    root = s.clamp_min(0).sqrt()
    return u * root, None, v * root


def energy_rank(singular_values: torch.Tensor, threshold: float) -> int:
    """The fewest leading singular values whose squares hold `threshold` of the total."""
    energy = singular_values.double().square()
    total = energy.sum()
    if total <= 0:
        return 1
    cumulative = energy.cumsum(0) / total
    return int(torch.searchsorted(cumulative, torch.tensor(threshold, dtype=cumulative.dtype) - 1e-12).item()) + 1


def product_spectrum(left: torch.Tensor, right: torch.Tensor) -> Optional[torch.Tensor]:
    """Singular values of `left @ right.T` from QR factors of each side (an (k×k) SVD, never the dense
    out×in product); None (with a warning) when not finite or the SVD fails."""
    r_left = torch.linalg.qr(left.detach().float())[1]
    r_right = torch.linalg.qr(right.detach().float())[1]
    decomposition = svd_f32(r_left @ r_right.t())
    return None if decomposition is None else decomposition[1]
