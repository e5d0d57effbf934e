"""Covariance statistics of the real offline model smollm2-135m (d_k = 1536), through the API and the CLI."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fastmemit.stats import compute_layer_stats

pytestmark = pytest.mark.integration

LAYERS = [3, 4, 5, 6, 7]
D_K = 1536


@pytest.fixture(scope="module")
def enwiki(shared_data) -> Path:
    path = shared_data / "enwiki-sample.jsonl"
    if not path.is_file():
        pytest.skip(f"{path} not found")
    return path


def test_five_layers_in_one_pass_at_dynamic_multiplier_10(smollm2, enwiki, tmp_path):
    model, tok = smollm2
    kw = dict(dynamic_multiplier=10, cache_dir=tmp_path / "stats", show_progress=False)
    stats = compute_layer_stats(model, tok, LAYERS, enwiki, **kw)
    assert list(stats) == LAYERS
    for layer, st in stats.items():
        assert st.count == 10 * D_K == 15360
        assert st.site == f"model.layers.{layer}.mlp.down_proj"
        assert not st.cache_hit
        c = st.mom2  # (d_k, d_k) float64
        assert c.shape == (D_K, D_K) and c.dtype == torch.float64
        assert torch.isfinite(c).all()
        assert torch.equal(c, c.T)
        torch.linalg.cholesky(c)  # raises unless positive definite
    # layers differ: each hook saw its own layer's keys
    assert not torch.allclose(stats[3].sum_kk, stats[7].sum_kk)

    again = compute_layer_stats(model, tok, LAYERS, enwiki, **kw)
    for layer in LAYERS:
        assert again[layer].cache_hit
        assert torch.equal(again[layer].sum_kk, stats[layer].sum_kk)


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "FASTMEMIT_PROGRESS": "0"}
    return subprocess.run([sys.executable, "-m", "fastmemit", "stats", "--model", "smollm2-135m", *args],
                          capture_output=True, text=True, env=env, timeout=300)


def test_cli_stats_json_then_cache_hit(smollm2, enwiki, tmp_path):
    # smollm2 (the fixture) makes sure the one-time GGUF conversion is done before the subprocesses
    args = ["--layers", "3-4", "--dynamic-multiplier", "1", "--corpus", str(enwiki), "--cache-dir", str(tmp_path), "--json"]
    for expect_hit in (False, True):
        proc = _cli(*args)
        assert proc.returncode == 0, proc.stderr
        rows = [json.loads(line) for line in proc.stdout.splitlines() if line.strip()]
        assert [r["layer"] for r in rows] == [3, 4]
        for r in rows:
            assert r["count"] == D_K == 1536
            assert r["d_k"] == D_K
            assert r["cache_hit"] is expect_hit
            # exactly d_k keys: full rank at best, so only the scale is checked here
            assert r["max_eig"] > 0 and r["trace"] > 0 and math.isfinite(r["trace"])


def test_cli_layer_out_of_range_exits_2(smollm2, enwiki, tmp_path):
    proc = _cli("--layers", "99-100", "--dynamic-multiplier", "1", "--corpus", str(enwiki), "--cache-dir", str(tmp_path))
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    assert "[99, 100]" in proc.stderr and "out of range" in proc.stderr
    assert "30 layers" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert proc.stdout == ""
