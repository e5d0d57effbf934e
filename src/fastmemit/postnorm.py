"""Value targets through a norm after the MLP (Gemma 2/3's ``post_feedforward_layernorm``).

The edited matrix's output m reaches the residual stream as N(m), with the RMSNorm

    N(x) = g ⊙ x / r(x),   r(x) = sqrt(mean(x²) + eps),   g = norm_weight_offset + weight   (d,)

(transformers' Gemma2/Gemma3RMSNorm: computed in float32, ``(x · rsqrt(mean(x²) + eps)) · (1 + w)``).
A change of W adds linearly to m, not to the block output, so the solve needs its residual in m's
space. N is invariant to the scale of x (up to eps): its Jacobian at x,

    J(x) = diag(g) / r · (I − x xᵀ / (d r²)),

maps the radial direction x to ~0 (eigenvalue d·eps / (‖x‖² + d·eps)) and a tangent Δx ⊥ x to
g ⊙ Δx / r exactly. Everything here runs in float64 on the model's (B, d) reads: the maps are
applied to a few vectors per request, and the gains of a real model span five orders of magnitude
(gemma3-270m: |g| from 0 to ~1600), which float32 would not carry through the inverse.
See docs/postnorm.md for how the Editor uses these maps.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from fastmemit.errors import UnsupportedArchitectureError
from fastmemit.models.arch import get_arch, get_module

# Damping of the tangent inverse, relative to the root mean square of the gains: a dimension whose
# gain is far below it (a norm output that barely depends on that input) is not asked to carry the
# residual; without it the inverse divides by gains of 0 and a multi-layer edit blows up r(x).
DAMPING = 1e-2
# Gauss-Newton steps of the last layer's preimage (each re-evaluates N exactly)
PREIMAGE_STEPS = 5


@dataclass(frozen=True)
class PostNorm:
    """The RMSNorm after one layer's MLP: gain (d,) float64 and eps, read from the module."""

    gain: torch.Tensor  # (d,) float64
    eps: float
    name: str

    @classmethod
    def of(cls, model: nn.Module, layer: int) -> PostNorm | None:
        """The post-MLP norm of ``layer``, or None when the family adds the MLP output as it is."""
        arch = get_arch(model)
        if not arch.has("post_mlp_norm"):
            return None
        name = arch.site("post_mlp_norm", layer)
        module = get_module(model, name)
        weight, eps = getattr(module, "weight", None), getattr(module, "eps", getattr(module, "variance_epsilon", None))
        if not isinstance(weight, torch.Tensor) or not isinstance(eps, float):
            raise UnsupportedArchitectureError(f"{name!r} is not an RMSNorm with a weight and an eps")
        return cls(arch.norm_weight_offset + weight.detach().double().cpu(), eps, name)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """N(x) for x (B, d), float64."""
        x = x.double()
        r = (x.pow(2).mean(-1, keepdim=True) + self.eps).sqrt()  # (B, 1)
        return self.gain * x / r  # (B, d)

    def check(self, model: nn.Module, x: torch.Tensor) -> None:
        """The module computes this formula on x (B, d) (within its dtype's rounding), else an error."""
        module = get_module(model, self.name)
        p = next(module.parameters())
        with torch.no_grad():
            got = module(x.to(device=p.device, dtype=p.dtype)).double().cpu()  # (B, d)
        want = self(x)
        tol = max(1e-4, 8 * torch.finfo(p.dtype).eps)
        err = float((got - want).norm() / want.norm().clamp(min=1e-30))
        if not err <= tol:
            raise UnsupportedArchitectureError(
                f"{self.name} does not compute x·rsqrt(mean(x²)+eps)·(offset + weight) with the architecture table's "
                f"offset (relative difference {err:.2e}); fix the ArchSpec's norm_weight_offset")

    def tangent_solve(self, x: torch.Tensor, e: torch.Tensor, damping: float = DAMPING) -> torch.Tensor:
        """Δx ⊥ x with J(x) Δx ≈ e, the damped least-squares inverse of the norm's Jacobian.

        With Δx = r v, v ⊥ u = x/‖x‖: minimize ‖g ⊙ v − e‖² + α²‖v‖² (α = damping · rms(g)), so
        v = (g² + α²)⁻¹ ⊙ (g ⊙ e − c u) with c making uᵀv = 0. α → 0 is the Moore–Penrose
        pseudo-inverse of J restricted to the tangent space. x, e: (B, d); returns (B, d) float64.
        """
        x, e = x.double(), e.double()
        g = self.gain.to(x.device)  # (d,)
        alpha2 = (damping ** 2) * float(g.pow(2).mean())
        w = 1.0 / (g.pow(2) + alpha2)  # (d,) (g² + α²)⁻¹
        u = x / x.norm(dim=-1, keepdim=True).clamp(min=1e-300)  # (B, d)
        ge = g * e  # (B, d)
        c = (u * w * ge).sum(-1, keepdim=True) / (u * w * u).sum(-1, keepdim=True)  # (B, 1)
        v = w * (ge - c * u)  # (B, d), ⊥ u
        r = (x.pow(2).mean(-1, keepdim=True) + self.eps).sqrt()  # (B, 1)
        return r * v  # (B, d)

    def preimage(self, y: torch.Tensor, start: torch.Tensor, steps: int = PREIMAGE_STEPS,
                 damping: float = DAMPING) -> torch.Tensor:
        """x with N(x) ≈ y, by Gauss–Newton steps x ← x + tangent_solve(x, y − N(x)) from ``start``.

        Steps are tangent, so x keeps the scale of ``start`` (N ignores it); when y = N(start), x is
        ``start`` itself. y, start: (B, d); returns (B, d) float64.
        """
        x = start.double().clone()
        for _ in range(steps):
            x = x + self.tangent_solve(x, y.double() - self(x), damping)  # (B, d)
        return x
