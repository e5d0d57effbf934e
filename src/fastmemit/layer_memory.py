"""What an :class:`~fastmemit.Editor` keeps for its edited layers from one batch to the next.

One :class:`~fastmemit.methods.LayerState` a layer: E[k kᵀ] and the factor of the method's C from the
:class:`~fastmemit.stats.provider.PreservedStats` provider (prepared when first needed, recomputed when
the hparams ask), the weight W₀ the layer had before the Editor's first edit, and the method's own
memory (``extra``), which survives recomputed statistics and is checkpointed through
:meth:`LayerMemory.state_dict`. Nothing here touches the model's weights.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from fastmemit.errors import EditError
from fastmemit.methods import EditHparams, EditMethod, LayerState
from fastmemit.stats.provider import PreservedStats

__all__ = ["LayerMemory"]


class LayerMemory:
    """The :class:`LayerState` of each edited layer, kept across batches (see the module docstring)."""

    def __init__(self, method: EditMethod, hp: EditHparams, stats: PreservedStats, w0: Mapping[int, torch.Tensor]) -> None:
        self.method, self.hp, self.stats = method, hp, stats
        self.w0 = dict(w0)  # layer -> (d, d_k) math orientation, the weight's dtype and device
        self.states: dict[int, LayerState] = {}

    def prepare(self, force: bool = False, layers: Sequence[int] | None = None) -> None:
        """Statistics (one pass over every edited layer that lacks them) and factors, as the method needs.

        ``force``: recompute them on the model as it is now; the method carries its memory over.
        ``layers``: only these (default: every edited layer).
        """
        layers = [layer for layer in (self.hp.layers if layers is None else layers) if force or layer not in self.states]
        if not layers:
            return
        matrix = self.method.preserved(self.hp) if self.method.needs_factor else None
        got = self.stats.layers(layers, mom2=self.method.needs_mom2(self.hp), matrix=matrix, recompute=force)
        for layer in layers:
            state = LayerState(layer, got[layer].mom2, got[layer].factor, w0=self.w0[layer])
            old = self.states.get(layer)
            if old is not None:  # the method's memory of earlier batches survives recomputed statistics
                self.method.carry_over(old, state)
            self.states[layer] = state

    @property
    def per_layer(self) -> bool:
        """``recompute_stats: 'layer'`` for a method that reads the statistics (the seed's ``dynamic``): each
        layer's statistics are recomputed just before its solve, on the model with the batch's earlier layers written."""
        return self.hp.recompute_stats == "layer" and self.method.needs_mom2(self.hp)

    def before_batch(self) -> None:
        """The statistics a batch starts from: prepared once, or recomputed on the edited model before every
        batch when the hparams ask (``recompute_stats``); nothing here when :attr:`per_layer`."""
        if not self.per_layer:
            self.prepare(force=bool(self.hp.recompute_stats) and bool(self.states) and self.method.needs_mom2(self.hp))

    def before_layer(self, layer: int) -> None:
        """:attr:`per_layer`: ``layer``'s statistics on the model as edited so far."""
        if self.per_layer:
            self.prepare(force=True, layers=[layer])

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The method's memory of earlier batches, ``{"<layer>/<name>": tensor}`` on the CPU."""
        return {f"{layer}/{k}": v.detach().cpu().contiguous() for layer, st in self.states.items()
                for k, v in self.method.state_dict(st).items()}

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        """Restore :meth:`state_dict` (statistics of the edited layers are prepared first if needed)."""
        per_layer: dict[int, dict[str, torch.Tensor]] = {}
        for key, v in state.items():
            layer, _, name = key.partition("/")
            if not layer.isdigit() or int(layer) not in self.hp.layers or name not in self.method.carried_state:
                raise EditError(f"{self.method.name} state has an entry {key!r} that this editor does not keep")
            per_layer.setdefault(int(layer), {})[name] = v
        if per_layer and not self.states:
            self.prepare()
        for layer, tensors in per_layer.items():  # on the storage device, beside the statistics
            self.method.load_state_dict(self.states[layer], {k: v.to(self.stats.storage_device) for k, v in tensors.items()})

    def snapshot(self) -> dict[int, dict[str, torch.Tensor]]:
        """The method's memory as it is (before a batch), for :meth:`rollback`."""
        return {layer: dict(st.extra) for layer, st in self.states.items()}

    def rollback(self, memory: Mapping[int, dict[str, torch.Tensor]]) -> None:
        """The memory of :meth:`snapshot` back (e.g. AlphaEdit's keys of a batch that was never applied)."""
        for layer, extra in memory.items():
            self.states[layer].extra = extra
