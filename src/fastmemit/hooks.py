"""Hooks, only as context managers: every hook is removed on exit, even when the body raises.

- :class:`Trace` records the inputs and/or outputs of named modules.
- ``Trace(..., stop=True)`` cuts the forward pass short once the *last* traced module has been
  reached (its input recorded) by raising :class:`StopForward`, which ``Trace.__exit__`` swallows:
  statistics need only the layers up to the deepest edited one.
- :func:`edit_output` rewrites a module's output (e.g. add δ at given token positions).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from torch import nn

from fastmemit.errors import ConfigurationError, UnsupportedArchitectureError
from fastmemit.models.arch import get_module


class StopForward(Exception):
    """Raised inside a hook to end a forward pass early; swallowed by the context manager."""


def _first_tensor(x: Any) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x
    if isinstance(x, (tuple, list)) and x and isinstance(x[0], torch.Tensor):
        return x[0]
    raise UnsupportedArchitectureError(f"expected a module output that is a tensor or a tuple starting with one, got {type(x).__name__}")


def _replace_first(x: Any, new: torch.Tensor) -> Any:
    if isinstance(x, torch.Tensor):
        return new
    return (new, *x[1:]) if isinstance(x, tuple) else [new, *x[1:]]


class Trace:
    """Record inputs/outputs of modules addressed by dotted names.

    >>> with Trace(model, ["model.layers.3.mlp.down_proj"], retain_input=True, stop=True) as tr:
    ...     model(input_ids)
    >>> tr.inputs["model.layers.3.mlp.down_proj"]  # (B, T, d_k)

    ``stop=True`` stops the forward pass at the input of the last name in ``names`` (the module
    itself does not run); use it only when nothing after that point is needed. ``detach`` (default)
    stores detached tensors; pass ``detach=False`` to keep the graph.
    """

    def __init__(
        self,
        model: nn.Module,
        names: Iterable[str],
        *,
        retain_input: bool = False,
        retain_output: bool = True,
        stop: bool = False,
        detach: bool = True,
    ) -> None:
        self.model = model
        self.names = list(dict.fromkeys(names))
        if not self.names:
            raise ConfigurationError("Trace needs at least one module name")
        self.retain_input = retain_input
        self.retain_output = retain_output
        self.stop = stop
        self.detach = detach
        self.inputs: dict[str, torch.Tensor] = {}
        self.outputs: dict[str, torch.Tensor] = {}
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    def _keep(self, t: torch.Tensor) -> torch.Tensor:
        return t.detach() if self.detach else t

    def __enter__(self) -> Trace:
        modules = [(n, get_module(self.model, n)) for n in self.names]  # resolve all before hooking any
        try:
            for i, (name, module) in enumerate(modules):
                is_last = i == len(modules) - 1
                if self.retain_input or (self.stop and is_last):
                    self._handles.append(module.register_forward_pre_hook(self._pre_hook(name, self.stop and is_last)))
                if self.retain_output and not (self.stop and is_last):
                    self._handles.append(module.register_forward_hook(self._post_hook(name)))
        except BaseException:
            self._remove()
            raise
        return self

    def _pre_hook(self, name: str, stop_here: bool) -> Callable[..., None]:
        def hook(_module: nn.Module, args: tuple[Any, ...]) -> None:
            if self.retain_input:
                self.inputs[name] = self._keep(_first_tensor(args))
            if stop_here:
                raise StopForward(name)

        return hook

    def _post_hook(self, name: str) -> Callable[..., None]:
        def hook(_module: nn.Module, _args: tuple[Any, ...], output: Any) -> None:
            self.outputs[name] = self._keep(_first_tensor(output))

        return hook

    def _remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: Any) -> bool:
        self._remove()
        return exc_type is not None and issubclass(exc_type, StopForward)


@contextlib.contextmanager
def edit_output(
    model: nn.Module, name: str, fn: Callable[[torch.Tensor], torch.Tensor]
) -> Iterator[None]:
    """Replace the (first tensor of the) output of module ``name`` by ``fn(output)``."""
    module = get_module(model, name)

    def hook(_module: nn.Module, _args: tuple[Any, ...], output: Any) -> Any:
        return _replace_first(output, fn(_first_tensor(output)))

    handle = module.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def add_at_positions(delta: torch.Tensor, positions: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    """An ``edit_output`` function adding ``delta[r]`` at ``positions[r]`` of batch row ``rows[r]``.

    ``delta`` is (R, d), one vector per batch row; ``positions`` is (R,) token indices. Rows
    beyond R are left alone. Addition is out of place so autograd can flow into ``delta``.
    """

    def fn(h: torch.Tensor) -> torch.Tensor:  # h: (B, T, d)
        rows = torch.arange(positions.shape[0], device=h.device)
        mask = torch.zeros(h.shape[0], h.shape[1], 1, dtype=h.dtype, device=h.device)
        mask[rows, positions] = 1.0
        full = torch.zeros(h.shape[0], 1, h.shape[2], dtype=delta.dtype, device=h.device)
        full = full.index_copy(0, rows, delta.to(h.device).unsqueeze(1))  # (B, 1, d)
        return h + mask * full.to(h.dtype)  # (B, T, d)

    return fn
