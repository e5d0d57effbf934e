"""Float64 linear algebra shared by the methods.

Why float64: λC0 + K Kᵀ has condition numbers of 1e6–1e10 on real models (C0 from few keys has
tiny eigenvalues; λ is 1e4); float32 solves lose most digits there. Everything here takes and
returns float64 and never forms an explicit inverse.

Why a factor: λC0 (+ε·I) is fixed for a layer across batches, so it is Cholesky-factored once
(O(d_k³)) and every batch reaches C⁻¹K through two triangular solves (O(d_k²·B)). MEMIT's
(C + K Kᵀ)⁻¹ then follows from the Woodbury identity with a B×B solve:

    R Kᵀ (C + K Kᵀ)⁻¹ = R (I + Kᵀ C⁻¹ K)⁻¹ (C⁻¹ K)ᵀ

and EMMET's R (Kᵀ C⁻¹ K + μ I)⁻¹ (C⁻¹ K)ᵀ has the same shape with μ = emmet_lambda: the two
methods differ only in the ridge μ on the B×B system (1 for MEMIT).
"""

from __future__ import annotations

import math

import torch

from fastmemit.errors import EditError, StatisticsError

F64 = torch.float64


class FactoredCov:
    """Cholesky factor of a symmetric positive definite d_k×d_k matrix C (float64).

    C and L are stored on C's device (``factor`` given: moved there); :meth:`solve` runs on the
    device of its right-hand side. Memory: 2 · 8 · d_k² bytes (C and L)."""

    def __init__(self, C: torch.Tensor, *, name: str = "C", factor: torch.Tensor | None = None) -> None:
        if C.ndim != 2 or C.shape[0] != C.shape[1]:
            raise StatisticsError(f"{name} must be square, got shape {tuple(C.shape)}")
        self.C = C.to(F64)  # (d_k, d_k)
        if not torch.isfinite(self.C).all():
            raise StatisticsError(f"{name} contains NaN or inf")
        if factor is not None:
            self.L = factor.to(device=self.C.device, dtype=F64)
            return
        L, info = torch.linalg.cholesky_ex(self.C)  # C = L Lᵀ, L: (d_k, d_k) lower
        if int(info) != 0:
            raise StatisticsError(
                f"{name} is singular or not positive definite (Cholesky failed at column {int(info)}): "
                "use more keys for the statistics (dynamic_multiplier ≥ 1, better ≥ 2), or add "
                "update_norm_lambda·I (EMMET) / a larger mom2_update_weight"
            )
        self.L = L

    @property
    def dim(self) -> int:
        return int(self.C.shape[0])

    def solve(self, K: torch.Tensor) -> torch.Tensor:
        """C⁻¹ K for K: (d_k, B) → (d_k, B), by two triangular solves (O(d_k²·B)) on K's device.

        The factor stays where it is stored (e.g. the CPU, to bound accelerator memory); a copy on K's
        device exists only during the solve."""
        return torch.cholesky_solve(K.to(F64), self.L.to(K.device))


def ridge_system_delta(R: torch.Tensor, K: torch.Tensor, F: FactoredCov, mu: float) -> torch.Tensor:
    """Δ = R (Kᵀ C⁻¹ K + μ I)⁻¹ (C⁻¹ K)ᵀ, (d, d_k), with C reached through its factor.

    R: (d, B) residuals; K: (d_k, B) keys. μ = 1 is MEMIT's least squares (Woodbury form of
    R Kᵀ (C + K Kᵀ)⁻¹), μ = emmet_lambda is EMMET, μ = 0 with B = 1 is ROME.
    """
    if K.shape[0] != F.dim:
        raise EditError(f"keys have dimension {K.shape[0]} but the statistics have {F.dim}")
    if R.shape[1] != K.shape[1]:
        raise EditError(f"{R.shape[1]} residuals for {K.shape[1]} keys")
    R, K = R.to(F64), K.to(F64)
    Y = F.solve(K)  # C⁻¹K: (d_k, B)
    G = K.T @ Y  # Kᵀ C⁻¹ K: (B, B), symmetric PSD
    G = (G + G.T) / 2
    if mu:
        G = G + mu * torch.eye(G.shape[0], dtype=F64, device=G.device)
    # (G)⁻¹ applied from the right to R: solve Gᵀ Xᵀ = Rᵀ → X = R G⁻¹ (G symmetric)
    X, info = _solve_checked(G, R.T)  # (B, d)
    if info:
        n = G.shape[0]
        if not mu:
            raise EditError(
                f"the {n}×{n} edit system is singular: the edited keys are linearly dependent "
                f"(duplicate facts, or batch size {K.shape[1]} too large for d_k = {F.dim}); "
                "use emmet_lambda > 0 or fewer edits per batch"
            )
        big = float(torch.linalg.eigvalsh(G)[-1])
        raise EditError(
            f"the {n}×{n} edit system is numerically singular: Kᵀ C⁻¹ K reaches {big:.3g} against μ = {mu:g}, "
            "so the statistics C are nearly singular along the edited keys (too few keys for C0, or keys "
            "grown by earlier sequential edits); use more keys (dynamic_multiplier ≥ 2), a larger "
            "mom2_update_weight or update_norm_lambda, or a larger emmet_lambda (EMMET)"
        )
    return X.T @ Y.T  # R G⁻¹ (C⁻¹K)ᵀ: (d, B) @ (B, d_k) = (d, d_k)


def _solve_checked(A: torch.Tensor, B: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """Solve A X = B (float64); report failure or a numerically singular A instead of raising."""
    X, info = torch.linalg.solve_ex(A, B)
    if int(info.max()) != 0 or not torch.isfinite(X).all():
        return X, True
    # relative condition check: the solve "succeeds" on exactly-dependent rows in floating point
    s = torch.linalg.svdvals(A)  # (B,)
    return X, bool(s[-1] <= s[0] * 1e-13)


def direct_memit_delta(R: torch.Tensor, K: torch.Tensor, C: torch.Tensor) -> torch.Tensor:
    """Reference: Δ = R Kᵀ (C + K Kᵀ)⁻¹ by a direct d_k×d_k solve (O(d_k³)); for tests/benchmarks."""
    R, K, C = R.to(F64), K.to(F64), C.to(F64)
    A = C + K @ K.T  # (d_k, d_k), symmetric
    return torch.linalg.solve(A, K @ R.T).T  # (A⁻¹ K Rᵀ)ᵀ = R Kᵀ A⁻¹: (d, d_k)


def direct_emmet_delta(R: torch.Tensor, K: torch.Tensor, C: torch.Tensor, mu: float) -> torch.Tensor:
    """Reference: EMMET's Δ with an explicit d_k×d_k solve for C⁻¹K (O(d_k³)); for tests/benchmarks."""
    R, K, C = R.to(F64), K.to(F64), C.to(F64)
    Y = torch.linalg.solve(C, K)  # (d_k, B)
    G = K.T @ Y + mu * torch.eye(K.shape[1], dtype=F64, device=K.device)  # (B, B)
    return torch.linalg.solve(G, R.T).T @ Y.T  # (d, d_k)


# ----------------------------------------------------------------------------- norm-constrained editing
#
# ENCORE's Frobenius-norm constraint (Gupta et al. 2025, arXiv 2502.01636; docs/lifelong.md) adds
# λ_n‖Ŵ − W_a‖² to the objective, W_a an anchor weight. With Ŵ = W + Δ (W the current weight),
#
#     min_Δ  tr(Δ C Δᵀ) − 2⟨P, Δ⟩ + (1/μ)‖Δ K − R‖²,   C = λC0 (+ε I) + λ_n I,   P = λ_n (W_a − W)
#
# (up to a constant), whose stationarity condition Δ (C + K Kᵀ/μ) = R Kᵀ/μ + P gives, by Woodbury
# with Y = C⁻¹K,
#
#     Δ = P C⁻¹ + (R − P Y) (Kᵀ Y + μ I)⁻¹ Yᵀ.
#
# μ = 1 is the least-squares (MEMIT) form, μ = emmet_lambda the EMMET form, μ → 0 the exact equality
# constraint Ŵ K = V. C is fixed for a layer, so one Cholesky factor serves every batch: the pull adds
# d right-hand sides to the triangular solves (O(d_k²·d)), the edit still needs only a B×B solve.
# P = 0 (anchor = the weight before the batch, ENCORE's released code) leaves only λ_n I inside C.


def norm_constrained_delta(
    R: torch.Tensor, K: torch.Tensor, F: FactoredCov, mu: float, pull: torch.Tensor | None = None
) -> torch.Tensor:
    """Δ = P C⁻¹ + (R − P Y)(Kᵀ Y + μ I)⁻¹ Yᵀ with Y = C⁻¹K, C reached through its factor F: (d, d_k).

    R: (d, B) residuals; K: (d_k, B) keys; F: factor of C = λC0 (+ε I) + λ_n I; pull: P = λ_n (W_a − W),
    (d, d_k), or None for P = 0 (then this is :func:`ridge_system_delta` exactly).
    """
    if pull is None:
        return ridge_system_delta(R, K, F, mu)  # (d, d_k)
    if pull.shape != (R.shape[0], F.dim):
        raise EditError(f"the pull towards the anchor weight has shape {tuple(pull.shape)}, expected {(R.shape[0], F.dim)}")
    P = pull.to(F64)  # (d, d_k)
    PCinv = F.solve(P.T).T  # P C⁻¹ = (C⁻¹ Pᵀ)ᵀ, C symmetric: (d, d_k)
    PY = PCinv @ K.to(F64)  # P C⁻¹ K = P Y: (d, B)
    return PCinv + ridge_system_delta(R.to(F64) - PY, K, F, mu)  # (d, d_k) + (d, d_k)


def direct_norm_constrained_delta(
    R: torch.Tensor, K: torch.Tensor, C: torch.Tensor, mu: float, pull: torch.Tensor | None = None
) -> torch.Tensor:
    """Reference for :func:`norm_constrained_delta` by direct d_k×d_k solves (O(d_k³)); for tests.

    μ > 0: Δ (C + K Kᵀ/μ) = R Kᵀ/μ + P. μ = 0: min tr(Δ C Δᵀ) − 2⟨P, Δ⟩ s.t. Δ K = R, by its Lagrange
    conditions Δ C = Λ Kᵀ + P, Δ K = R.
    """
    R, K, C = R.to(F64), K.to(F64), C.to(F64)
    P = torch.zeros(R.shape[0], C.shape[0], dtype=F64, device=R.device) if pull is None else pull.to(F64)  # (d, d_k)
    if mu > 0:
        A = C + K @ K.T / mu  # (d_k, d_k), symmetric
        return torch.linalg.solve(A, (R @ K.T / mu + P).T).T  # (d, d_k)
    Y = torch.linalg.solve(C, K)  # C⁻¹K: (d_k, B)
    PCinv = torch.linalg.solve(C, P.T).T  # P C⁻¹: (d, d_k)
    Lam = torch.linalg.solve((K.T @ Y).T, (R - PCinv @ K).T).T  # Λ (Kᵀ C⁻¹ K) = R − P C⁻¹ K: (d, B)
    return Lam @ Y.T + PCinv  # (d, B) @ (B, d_k) + (d, d_k)


def restrain_spectrum(D: torch.Tensor, cap: float, base: float = math.e) -> torch.Tensor:
    """PRUNE's restraint (Ma et al. 2025, arXiv 2405.16821) of a perturbation D (d, d_k), float64.

    Singular values σ > cap become min(σ, cap + log_base(σ / cap)); the others and the singular vectors
    stay. PRUNE takes D = the accumulated edit W − W0 and cap = σ_max(W0), which bounds the condition
    number of the edited matrix. The min() is ours: for cap < 1/ln(base) PRUNE's map would enlarge some σ.
    """
    if not (cap > 0 and base > 1):
        raise EditError(f"restrain_spectrum needs cap > 0 and base > 1, got cap={cap}, base={base}")
    U, S, Vh = torch.linalg.svd(D.to(F64), full_matrices=False)  # (d, r), (r,), (r, d_k), r = min(d, d_k)
    tamed = cap + torch.log(S.clamp_min(cap) / cap) / math.log(base)  # (r,)
    S = torch.where(S > cap, torch.minimum(S, tamed), S)  # (r,)
    return (U * S) @ Vh  # U diag(S) Vᵀ: (d, d_k)


def restrained_update(W: torch.Tensor, W0: torch.Tensor, delta: torch.Tensor, cap: float, base: float) -> torch.Tensor:
    """PRUNE as a projection after any solve: Δ' (d, d_k) float64 with W + Δ' − W0 = :func:`restrain_spectrum`
    of the accumulated edit W + Δ − W0 (W the weight before Δ, W0 the unedited weight, all (d, d_k) in math
    orientation). ``delta`` itself (the same tensor) when no singular value of W + Δ − W0 exceeds ``cap``."""
    drift = W.to(F64) - W0.to(F64)  # (d, d_k) the accumulated edit before this Δ
    D = drift + delta.to(F64)  # (d, d_k) and with it
    if float(torch.linalg.matrix_norm(D, ord=2)) <= cap:
        return delta
    return restrain_spectrum(D, cap, base) - drift  # (d, d_k)
