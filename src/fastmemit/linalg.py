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

import torch

from fastmemit.errors import EditError, StatisticsError

F64 = torch.float64


class FactoredCov:
    """Cholesky factor of a symmetric positive definite d_k×d_k matrix C (float64)."""

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
        """C⁻¹ K for K: (d_k, B) → (d_k, B), by two triangular solves (O(d_k²·B))."""
        return torch.cholesky_solve(K.to(F64), self.L)


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
