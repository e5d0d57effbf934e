"""FT-L: constrained fine-tuning of the edited MLP down-projection weights (the seed's FT baseline).

Adam on the NLL of each request's ``target_new`` after its prompt, for ``num_steps`` passes over the
batch in chunks of ``batch_size`` requests; after every chunk the change is clipped elementwise to
``‖ΔW‖∞ ≤ norm_constraint`` around the weights the batch started from (false: unconstrained).
Like the seed, a chunk whose loss is below 1e-2 takes no step and a pass whose mean loss is below
1e-2 ends the fit. Nothing is written to the model while fitting: the free variable is Δ itself, run
through ``torch.func.functional_call`` with W_before + Δ in place of W, so that the Editor writes the
result like any other method's (exact undo, saved deltas, sequential runs).

``ft_loss``: ``"teacher_forced"`` (fastmemit's default) is the mean NLL of the target's tokens, each
after the prompt and the target's earlier tokens; ``"next_token"`` is the seed's (ROME's FT code): the
log-probabilities of all the target's tokens read from the one distribution after the prompt, the
same for one-token targets. Research-code files (the seed's FT files) default to ``"next_token"``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any, ClassVar

import torch
from torch import nn
from torch.func import functional_call

from fastmemit.errors import EditError
from fastmemit.lm import model_device, pad_id, pad_right, target_ids
from fastmemit.methods.base import EditMethod, FitResult, register_method
from fastmemit.methods.hparams import EditHparams, _help
from fastmemit.models.arch import get_arch, registered_architectures
from fastmemit.requests import EditRequest

F64 = torch.float64
FT_LOSSES = ("teacher_forced", "next_token")
STOP_LOSS = 1e-2  # the seed's: no step for a chunk below it, stop when a pass's mean is below it


@dataclass
class FTHparams(EditHparams):
    """The seed's FT fields; the v*/statistics fields of :class:`EditHparams` are not read by FT."""

    layers: list[int] = _help("layers whose MLP down-projection is fine-tuned", factory=lambda: [0])
    kl_factor: float = _help("research-code field of the FT files; FT does not read it (as in the seed)", 0.0)
    context_template_length_params: list[list[int]] = _help("FT uses no context templates", factory=list)
    num_steps: int = _help("passes over the batch (Adam steps per chunk)", 25)
    lr: float = _help("Adam learning rate", 5e-4)
    weight_decay: float | bool = _help("Adam's L2 weight decay on the fine-tuned weight (false: 0)", 0.0)
    norm_constraint: float | bool = _help("‖W − W_before‖∞ bound after every step; false (or 0): unconstrained", False)
    batch_size: int = _help("requests per forward pass", 64)
    wd_power_law: list[float] | None = _help(
        "research-code field: [a, b] for weight decay n^a·e^b; no effect (in the seed a JSON list is never the "
        "tuple its code tests for, so the seed never uses it either)", None)
    ft_loss: str = _help("teacher_forced (fastmemit) or next_token (the seed's FT: every target token scored at "
                         "the position after the prompt)", "teacher_forced")

    research_defaults: ClassVar[dict[str, Any]] = {"ft_loss": "next_token"}

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.weight_decay, bool):
            if self.weight_decay:
                raise EditError("hparams.weight_decay must be a number (false: 0), got true")
            self.weight_decay = 0.0
        if isinstance(self.norm_constraint, bool) and self.norm_constraint:
            raise EditError("hparams.norm_constraint must be a bound > 0 or false (unconstrained), got true")
        if self.norm_constraint == 0:  # the seed clips only when the value is a float: an integer 0 means none
            self.norm_constraint = False
        for name in ("num_steps", "batch_size"):
            if getattr(self, name) <= 0:
                raise EditError(f"hparams.{name} must be positive, got {getattr(self, name)}")
        for name in ("lr", "weight_decay", "norm_constraint"):
            if getattr(self, name) < 0 or (name == "lr" and not self.lr > 0):
                raise EditError(f"hparams.{name} must be {'positive' if name == 'lr' else 'non-negative'}, "
                                f"got {getattr(self, name)}")
        if self.ft_loss not in FT_LOSSES:
            raise EditError(f"hparams.ft_loss must be one of {', '.join(FT_LOSSES)}, got {self.ft_loss!r}")
        _check_module(self.rewrite_module_tmp)


def _check_module(template: str | None) -> None:
    """FT tunes the MLP down-projection of the architecture table; a file naming another module is refused."""
    if template is None:
        return
    sites = {get_arch(SimpleNamespace(model_type=mt)).mlp_down for mt in registered_architectures()}
    if template not in sites:
        raise EditError(
            f"hparams.rewrite_module_tmp = {template!r}: fastmemit's FT fine-tunes the MLP down-projection weight "
            f"(the site of every method here: {', '.join(sorted(sites))}); tuning another module (attention, a whole "
            "block) is not implemented")


@dataclass(frozen=True)
class _Row:
    ids: list[int]  # the model's input: the prompt (next_token) or prompt + target[:-1] (teacher_forced)
    at: list[int]  # position whose next-token distribution scores each target token
    target: list[int]  # the target's token ids


def _rows(tok: Any, requests: Sequence[EditRequest], loss: str) -> list[_Row]:
    rows = []
    for r in requests:
        ctx, tgt = target_ids(tok, r.text, r.target_new)  # (context ids, ids of " " + target_new)
        if loss == "next_token":
            rows.append(_Row(ctx, [len(ctx) - 1] * len(tgt), tgt))
        else:
            rows.append(_Row(ctx + tgt[:-1], list(range(len(ctx) - 1, len(ctx) + len(tgt) - 1)), tgt))
    return rows


def _chunk_loss(model: nn.Module, weights: Mapping[str, torch.Tensor], rows: Sequence[_Row], pad: int,
                device: torch.device) -> torch.Tensor:
    """Mean over the rows of each row's mean target NLL, with ``weights`` in place of the model's parameters."""
    ids, mask, _ = pad_right([r.ids for r in rows], pad)  # (N, T) each
    logits = functional_call(model, dict(weights), args=(), kwargs={
        "input_ids": ids.to(device), "attention_mask": mask.to(device)}).logits  # (N, T, V)
    logp = torch.log_softmax(logits.float(), dim=-1)  # (N, T, V)
    losses = [-logp[i, r.at, r.target].mean() for i, r in enumerate(rows)]  # N × ()
    return torch.stack(losses).mean()


class FT(EditMethod):
    name = "FT"
    hparams_cls = FTHparams
    needs_factor = False
    fits_weights = True

    def fit_deltas(self, hp: EditHparams, model: nn.Module, tok: Any, requests: Sequence[EditRequest],
                   params: Mapping[int, str]) -> FitResult:
        assert isinstance(hp, FTHparams)
        named = dict(model.named_parameters())
        frozen = {n: p.detach() for n, p in named.items()}  # no gradient reaches the model's own parameters
        w0 = {layer: frozen[name] for layer, name in params.items()}
        work = {layer: w.dtype if w.dtype in (torch.float32, F64) else torch.float32 for layer, w in w0.items()}
        deltas = {layer: torch.zeros_like(w, dtype=work[layer], requires_grad=True) for layer, w in w0.items()}
        opt = torch.optim.Adam(list(deltas.values()), lr=hp.lr)  # weight decay below: it acts on W, not on Δ
        rows = _rows(tok, requests, hp.ft_loss)
        chunks = [rows[i:i + hp.batch_size] for i in range(0, len(rows), hp.batch_size)]
        pad, device = pad_id(tok), model_device(model)
        passes: list[float] = []
        for _ in range(hp.num_steps):
            total = 0.0
            for chunk in chunks:
                opt.zero_grad()
                weights = {**frozen, **{params[layer]: (w0[layer].to(work[layer]) + d).to(w0[layer].dtype)
                                        for layer, d in deltas.items()}}
                loss = _chunk_loss(model, weights, chunk, pad, device)
                value = float(loss.detach())
                total += value * len(chunk)
                if value >= STOP_LOSS:
                    loss.backward()
                    self._step(hp, opt, deltas, w0)
                if hp.norm_constraint:
                    with torch.no_grad():
                        for d in deltas.values():
                            d.clamp_(-float(hp.norm_constraint), float(hp.norm_constraint))
            passes.append(total / len(rows))
            if passes[-1] < STOP_LOSS:
                break
        out = {layer: d.detach().to(F64) for layer, d in deltas.items()}  # (stored shape of each weight)
        if not all(torch.isfinite(d).all() for d in out.values()):
            raise EditError("FT produced a non-finite update (lower lr?)")
        return FitResult(out, {"ft_loss": passes, "ft_passes": len(passes)})

    @staticmethod
    def _step(hp: FTHparams, opt: torch.optim.Optimizer, deltas: Mapping[int, torch.Tensor],
              w0: Mapping[int, torch.Tensor]) -> None:
        """One Adam step on Δ; Adam's weight decay (grad += wd·W) on W = W_before + Δ, as the seed's Adam on W."""
        if hp.weight_decay:
            with torch.no_grad():
                for layer, d in deltas.items():
                    if d.grad is not None:
                        d.grad += float(hp.weight_decay) * (w0[layer].to(d.dtype) + d)
        opt.step()


register_method(FT())
