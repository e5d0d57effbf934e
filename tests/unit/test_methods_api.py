"""The method interface: registry, declared quirks, state hooks, the preserved matrix and its cache key.

No model: these check the contract that :mod:`fastmemit.editing` relies on, so that nothing outside
``methods/`` needs to know a method by name.
"""

from __future__ import annotations

import ast
import itertools
from pathlib import Path

import pytest
import torch

import fastmemit
from fastmemit.errors import EditError, StatisticsError
from fastmemit.linalg import FactoredCov
from fastmemit.methods import (
    AlphaEditHparams,
    EditHparams,
    EditMethod,
    LayerState,
    available_methods,
    get_method,
)
from fastmemit.methods import base as methods_base
from fastmemit.methods.memit import MEMIT
from fastmemit.stats.provider import PreservedMatrix

F64 = torch.float64
SRC = Path(fastmemit.__file__).resolve().parent
BUILTIN = ("AlphaEdit", "EMMET", "ENCORE", "FT", "MEMIT", "ROME")


@pytest.fixture
def private_registry(monkeypatch):
    """Registrations in a test go to a copy of the registry, dropped afterwards."""
    monkeypatch.setattr(methods_base, "_REGISTRY", dict(methods_base._REGISTRY))


# ----------------------------------------------------------------------------- registry


def test_available_methods_lists_the_builtin_methods_as_they_spell_themselves():
    assert available_methods() == list(BUILTIN)
    assert fastmemit.available_methods() == list(BUILTIN)
    for name in BUILTIN:
        assert get_method(name.lower()).name == name  # any case finds it


def test_register_method_refuses_a_taken_name_in_any_case(private_registry):
    class Other(MEMIT):
        name = "memit"

    with pytest.raises(EditError, match="'MEMIT' is already registered.*replace=True"):
        fastmemit.register_method(Other())
    assert type(get_method("MEMIT")) is MEMIT  # the refused method replaced nothing


def test_register_method_with_replace_and_a_new_name(private_registry):
    class Mine(MEMIT):
        name = "MyMethod"

    mine = fastmemit.register_method(Mine())
    assert get_method("mymethod") is mine and "MyMethod" in available_methods()
    again = Mine()
    assert fastmemit.register_method(again, replace=True) is again
    assert get_method("MyMethod") is again


def test_register_method_takes_a_method_instance(private_registry):
    with pytest.raises(EditError, match="EditMethod instance"):
        fastmemit.register_method(MEMIT)  # the class, not an instance


def test_unknown_method_names_the_available_ones():
    with pytest.raises(EditError, match="unknown method 'nope'; available: AlphaEdit, EMMET, ENCORE, FT, MEMIT, ROME"):
        get_method("nope")


# ----------------------------------------------------------------------------- declared quirks


def _class_attributes(cls: type) -> set[str]:
    """Plain (non-callable, non-dunder) attributes a method class sets in its own body."""
    return {k for k, v in vars(cls).items() if not k.startswith("_") and not callable(v)
            and not isinstance(v, (staticmethod, classmethod, property))}


@pytest.mark.parametrize("name", BUILTIN)
def test_every_per_method_attribute_is_declared_on_the_base_class(name):
    cls = type(get_method(name))
    undeclared = _class_attributes(cls) - set(EditMethod.__annotations__)
    assert not undeclared, f"{name} sets {sorted(undeclared)}, which EditMethod does not declare"
    hints = EditMethod.__annotations__  # strings: the base module has postponed annotations
    assert all(hints[k].startswith("ClassVar[") for k in _class_attributes(cls))


def test_the_declared_quirks_of_the_builtin_methods():
    rome, memit, emmet, alpha = (get_method(n) for n in ("ROME", "MEMIT", "EMMET", "AlphaEdit"))
    assert rome.single_layer and rome.one_request_at_a_time and not rome.weighted_identity
    for m in (memit, emmet, alpha):
        assert not m.single_layer and not m.one_request_at_a_time and m.weighted_identity
    assert not alpha.needs_factor and alpha.carried_state == {"Kp"}
    assert memit.carried_state == emmet.carried_state == rome.carried_state == frozenset()


def _strings_compared_or_looked_up(path: Path) -> set[str]:
    """String constants a module compares with (``name != "ROME"``), indexes by (``extra["Kp"]``) or
    looks up (``.get("Kp")``); a default argument such as ``method="EMMET"`` is not a branch."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Compare):
            parts = [node.left, *node.comparators]
        elif isinstance(node, ast.Subscript):
            parts = [node.slice]
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in (
                "get", "pop", "setdefault", "getattr"):
            parts = list(node.args[:1])
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ("getattr", "hasattr"):
            parts = list(node.args[1:2])
        else:
            continue
        found |= {p.value for p in parts if isinstance(p, ast.Constant) and isinstance(p.value, str)}
    return found


OUTSIDE_METHODS = sorted(str(p.relative_to(SRC)) for p in SRC.rglob("*.py") if "methods" not in p.relative_to(SRC).parts)


@pytest.mark.parametrize("module", OUTSIDE_METHODS)
def test_no_method_name_or_method_state_key_outside_methods(module):
    names = {n.upper() for n in available_methods()}
    keys = set().union(*(get_method(n).carried_state for n in available_methods())) | {"P", "one_request_at_a_time"}
    found = sorted(s for s in _strings_compared_or_looked_up(SRC / module) if s.upper() in names or s in keys)
    assert not found, f"{module} branches on {found}: give the method a ClassVar or a hook instead"


# ----------------------------------------------------------------------------- the preserved matrix


def _variants() -> list[tuple[str, EditHparams]]:
    out = []
    for name, adjust, identity, lam, eps in itertools.product(
        ("ROME", "MEMIT", "EMMET"), (True, False), (False, True), (1.0, 100.0), (0.0, 0.5)
    ):
        hp = EditHparams(layers=[0], mom2_adjustment=adjust, identity_cov=identity, mom2_update_weight=lam,
                         update_norm_lambda=eps)
        out.append((name, hp))
    return out


def test_the_factor_cache_key_names_everything_the_matrix_depends_on():
    """Equal keys (for the same statistics) mean equal C, bit for bit, across methods and hparams."""
    g = torch.Generator().manual_seed(0)
    K0 = torch.randn(6, 40, generator=g, dtype=F64)
    mom2 = K0 @ K0.T / 40  # (6, 6)
    by_key: dict[str, torch.Tensor] = {}
    for name, hp in _variants():
        spec = get_method(name).preserved(hp)
        C = spec.build(mom2 if spec.from_stats else None, 6)
        key = repr(sorted(spec.cache_key().items()))
        if key in by_key:
            assert torch.equal(by_key[key], C), f"{name} {hp}: same key {key}, different C"
        by_key[key] = C
        assert torch.equal(C, get_method(name).preserved_matrix(hp, mom2))


def test_rome_without_statistics_factors_the_identity_and_memit_lambda_identity():
    hp = EditHparams(layers=[0], mom2_adjustment=False, mom2_update_weight=100.0)
    rome, memit = get_method("ROME").preserved(hp), get_method("MEMIT").preserved(hp)
    assert rome == PreservedMatrix(False, 1.0, 0.0) and memit == PreservedMatrix(False, 100.0, 0.0)
    assert rome.cache_key() != memit.cache_key()
    assert torch.equal(memit.build(None, 4), 100.0 * torch.eye(4, dtype=F64))
    # with the statistics on, every batched method and ROME factor the same λ E[k kᵀ] + ε I
    on = EditHparams(layers=[0], mom2_update_weight=100.0, update_norm_lambda=0.5)
    assert len({get_method(n).preserved(on) for n in ("ROME", "MEMIT", "EMMET")}) == 1


def test_needs_mom2_follows_the_hparams_and_alphaedit_always_reads_the_statistics():
    on, off = EditHparams(layers=[0]), EditHparams(layers=[0], mom2_adjustment=False)
    identity = EditHparams(layers=[0], identity_cov=True)
    for name in ("ROME", "MEMIT", "EMMET"):
        m = get_method(name)
        assert m.needs_mom2(on) and not m.needs_mom2(off) and not m.needs_mom2(identity)
    alpha = get_method("AlphaEdit")
    assert alpha.needs_mom2(AlphaEditHparams(layers=[0], mom2_adjustment=False))


def test_preserved_matrix_from_statistics_needs_them():
    with pytest.raises(StatisticsError, match="needs E\\[k kᵀ\\]"):
        PreservedMatrix(True, 1.0).build(None, 4)


# ----------------------------------------------------------------------------- state across batches


def _alpha_state(d_k: int = 8) -> tuple[EditMethod, AlphaEditHparams, LayerState]:
    g = torch.Generator().manual_seed(1)
    Q, _ = torch.linalg.qr(torch.randn(d_k, d_k, generator=g, dtype=F64))
    evals = torch.tensor([1.0] * (d_k // 2) + [1e-4] * (d_k - d_k // 2), dtype=F64)
    state = LayerState(3, Q @ torch.diag(evals) @ Q.T)
    return get_method("AlphaEdit"), AlphaEditHparams(layers=[3]), state


def test_alphaedit_state_dict_holds_its_earlier_keys_but_not_the_derived_projector():
    m, hp, state = _alpha_state()
    K, R = torch.randn(8, 2, dtype=F64), torch.randn(4, 2, dtype=F64)
    m.layer_delta(hp, state, K, R, torch.zeros(4, 8, dtype=F64))
    m.commit(hp, state, K)
    assert set(state.extra) == {"P", "Kp"}
    sd = m.state_dict(state)
    assert set(sd) == {"Kp"} and torch.equal(sd["Kp"], K)


def test_load_state_dict_restores_and_refuses_entries_the_method_does_not_keep():
    m, hp, state = _alpha_state()
    Kp = torch.randn(8, 3, dtype=F64)
    m.load_state_dict(state, {"Kp": Kp})
    assert torch.equal(state.extra["Kp"], Kp)
    with pytest.raises(EditError, match=r"AlphaEdit state of layer 3 has entries \['P'\]"):
        m.load_state_dict(state, {"P": torch.eye(8, dtype=F64)})
    with pytest.raises(EditError, match=r"MEMIT state of layer 3 has entries \['Kp'\]"):
        get_method("MEMIT").load_state_dict(state, {"Kp": Kp})


def test_carry_over_keeps_the_memory_and_drops_what_the_old_statistics_derived():
    m, hp, old = _alpha_state()
    K = torch.randn(8, 2, dtype=F64)
    m.layer_delta(hp, old, K, torch.randn(4, 2, dtype=F64), torch.zeros(4, 8, dtype=F64))
    m.commit(hp, old, K)
    new = LayerState(3, old.mom2 * 2, w0=old.w0)
    m.carry_over(old, new)
    assert set(new.extra) == {"Kp"} and torch.equal(new.extra["Kp"], K)


def test_existing_methods_ignore_the_current_weight():
    _, _, st = _alpha_state()
    g = torch.Generator().manual_seed(2)
    K, R = torch.randn(8, 1, generator=g, dtype=F64), torch.randn(4, 1, generator=g, dtype=F64)
    for name in BUILTIN:
        m = get_method(name)
        if m.fits_weights:  # FT: no closed-form layer_delta (tests/test_seed_ft.py)
            continue
        hp = m.hparams_cls(layers=[0])
        deltas = []
        for W in (torch.zeros(4, 8, dtype=F64), torch.randn(4, 8, generator=g, dtype=F64)):
            factor = FactoredCov(m.preserved_matrix(hp, st.mom2)) if m.needs_factor else None
            deltas.append(m.layer_delta(hp, LayerState(0, st.mom2, factor), K, R, W))
        assert torch.equal(deltas[0], deltas[1]) and float(deltas[0].norm()) > 0, name
