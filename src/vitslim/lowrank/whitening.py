"""Activation-aware (whitened) SVD of one weight matrix, in plain tensor functions.

**Stated** (arXiv 2402.06004): each selected weight is approximated to minimise the error of the
layer's *output* on real input activations X, not the error of the weight itself.

**Our reading**: with the input Gram matrix G = Σ x xᵀ = XᵀX and a factor G = L Lᵀ,
‖X(W − Ŵ)ᵀ‖²_F = ‖(W − Ŵ) L‖²_F. The SVD W L = U Σ Vᵀ then gives the best rank-k output
approximation Ŵ₁ = U_k Σ_k V_kᵀ L⁻¹, whose error is exactly Σ_{i>k} σ_i², so every layer's
error curve is known in closed form before anything is truncated.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# Relative ridge added to G before factorising: small enough not to change well-conditioned
# layers, large enough that a rank-deficient G (dead inputs, few tokens) still has an inverse.
DEFAULT_RIDGE = 1e-6


@dataclass
class WhitenedSpectrum:
    """The whitened SVD of one layer: ``W L = U diag(S) Vh``, plus ``L⁻¹`` to map back."""

    U: torch.Tensor  # (out, r)
    S: torch.Tensor  # (r,), descending
    Vh: torch.Tensor  # (r, in)
    L_inv: torch.Tensor  # (in, in)

    @property
    def energy(self) -> torch.Tensor:
        """σ², the output error each component removes when kept."""
        return self.S.square()

    def error_curve(self) -> torch.Tensor:
        """``curve[k]`` = output error ‖X(W − Ŵ_k)ᵀ‖² of the rank-k truncation, k = 0..r."""
        energy = self.energy
        tail = torch.flip(torch.cumsum(torch.flip(energy, [0]), 0), [0])
        return torch.cat([tail, energy.new_zeros(1)])

    def factors(self, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(up, down) with ``up @ down`` = the rank-k truncation: up (out, k), down (k, in)."""
        root = self.S[:rank].sqrt()
        up = self.U[:, :rank] * root
        down = (root[:, None] * self.Vh[:rank]) @ self.L_inv
        return up, down


def _regularised(gram: torch.Tensor, ridge: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(G + λI, λ) with λ = ridge · mean(diag G), in float64."""
    gram = gram.double()
    ridge_value = ridge * gram.diagonal().mean().clamp_min(torch.finfo(torch.float64).tiny)
    return gram + ridge_value * torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device), ridge_value


def whitening_factor(gram: torch.Tensor, ridge: float = DEFAULT_RIDGE) -> tuple[torch.Tensor, torch.Tensor]:
    """(L, L⁻¹) with L Lᵀ = G + λI, λ = ridge · mean(diag G).

    Cholesky first; when G is not numerically positive definite even with the ridge, an
    eigendecomposition with eigenvalues clamped to λ takes over (L = Q √Λ). Never returns NaN.
    """
    if not torch.isfinite(gram).all():
        raise ValueError("the Gram matrix holds NaN or Inf: the calibration activations were not finite")
    size = gram.shape[0]
    regularised, ridge_value = _regularised(gram, ridge)
    factor, info = torch.linalg.cholesky_ex(regularised)
    if int(info) == 0:
        inverse = torch.linalg.solve_triangular(factor, torch.eye(size, dtype=gram.dtype, device=gram.device), upper=False)
        if torch.isfinite(inverse).all():
            return factor, inverse
    values, vectors = torch.linalg.eigh((regularised + regularised.T) / 2)
    root = values.clamp_min(ridge_value).sqrt()
    return vectors * root, (vectors / root).T


def whitened_spectrum(weight: torch.Tensor, gram: torch.Tensor, ridge: float = DEFAULT_RIDGE) -> WhitenedSpectrum:
    """SVD of ``weight @ L`` for the layer's input Gram matrix (float64 throughout)."""
    factor, inverse = whitening_factor(gram, ridge)
    U, S, Vh = torch.linalg.svd(weight.double() @ factor, full_matrices=False)
    return WhitenedSpectrum(U=U, S=S, Vh=Vh, L_inv=inverse)


def whitened_energy(weight: torch.Tensor, gram: torch.Tensor, ridge: float = DEFAULT_RIDGE) -> torch.Tensor:
    """σ² of ``whitened_spectrum`` (descending) from the smaller side's eigenvalues: W G Wᵀ
    when the layer has fewer outputs than inputs, else Lᵀ WᵀW L with the (small) input factor.
    No SVD and, for wide-input layers (fc2), no factorisation of the large Gram matrix."""
    weight = weight.double()
    if weight.shape[0] <= weight.shape[1]:
        regularised, _ = _regularised(gram, ridge)
        product = weight @ regularised @ weight.T
    else:
        whitened = weight @ whitening_factor(gram, ridge)[0]
        product = whitened.T @ whitened
    return torch.linalg.eigvalsh((product + product.T) / 2).flip(0).clamp_min(0)


def plain_spectrum(weight: torch.Tensor) -> WhitenedSpectrum:
    """Ordinary SVD of the weight (the no-activation baseline): whitening with L = I."""
    eye = torch.eye(weight.shape[1], dtype=torch.float64, device=weight.device)
    U, S, Vh = torch.linalg.svd(weight.double(), full_matrices=False)
    return WhitenedSpectrum(U=U, S=S, Vh=Vh, L_inv=eye)


def diagonal_scale(gram: torch.Tensor, alpha: float = 0.5) -> torch.Tensor:
    """ASVD's per-input-channel scale ‖x_i‖^alpha = (G_ii)^(alpha/2), normalised to mean 1."""
    scale = gram.double().diagonal().clamp_min(torch.finfo(torch.float64).tiny).pow(alpha / 2)
    return scale / scale.mean()


def diagonal_spectrum(weight: torch.Tensor, gram: torch.Tensor, alpha: float = 0.5) -> WhitenedSpectrum:
    """ASVD-style baseline: scale input channel i by ``diagonal_scale`` instead of whitening."""
    scale = diagonal_scale(gram, alpha)
    U, S, Vh = torch.linalg.svd(weight.double() * scale, full_matrices=False)
    return WhitenedSpectrum(U=U, S=S, Vh=Vh, L_inv=torch.diag(1 / scale))
