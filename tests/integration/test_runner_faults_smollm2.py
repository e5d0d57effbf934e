"""A sequential evaluation on the real model, SIGKILLed at seeded random batches and resumed with the
same command each time, ends with exactly the per-case results and summary of an uninterrupted run."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers import SRC

pytestmark = [pytest.mark.integration, pytest.mark.slow]

N_CASES, BATCH = 6, 2  # 3 batches
TIMING = ("second", "time", "timing", "wall", "session")


def _command(shared_data: Path, out: Path, cache: Path) -> list[str]:
    return [sys.executable, "-m", "fastmemit", "evaluate", "--alg_name", "EMMET", "--model_name", "smollm2-135m",
            "--data", str(shared_data / "counterfact-train.json"), "--dataset_size_limit", str(N_CASES),
            "--num_edits", str(BATCH), "--sequential", "true", "--skip_generation_tests", "true", "--plots", "false",
            "--set", "v_num_grad_steps=6", "--set", "dynamic_multiplier=2", "--set", "context_template_length_params=[[5, 2]]",
            "--stats_cache_dir", str(cache), "--out", str(out)]


def _env() -> dict[str, str]:
    # the user cache holds the converted model (as for the smollm2 fixture); statistics go to the test's own
    return {**os.environ, "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1", "FASTMEMIT_PROGRESS": "0"}


def _batches_written(out: Path) -> int:
    path = out / "cases.jsonl"
    if not path.is_file():
        return 0
    lines = [json.loads(line) for line in path.read_text().splitlines() if line.strip().endswith("}")]
    return len({r["batch"] for r in lines})


def _run_until(cmd: list[str], env: dict[str, str], out: Path, kill_after: int | None) -> int:
    """Run ``cmd``; SIGKILL it once ``kill_after`` batches are in cases.jsonl (None: let it finish)."""
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 900
    try:
        while proc.poll() is None:
            if kill_after is not None and _batches_written(out) >= kill_after:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait(timeout=60)
                return proc.returncode
            if time.monotonic() > deadline:
                pytest.fail("the run did not finish in 15 minutes")
            time.sleep(0.05)
        assert proc.returncode == 0, proc.stderr.read()[-3000:]
        return 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _results(out: Path) -> tuple[list[dict], list[dict], dict]:
    def strip(obj):
        if isinstance(obj, dict):
            return {k: strip(v) for k, v in obj.items() if not any(t in k for t in TIMING) and k != "run_dir"}
        if isinstance(obj, list):
            return [strip(v) for v in obj]
        return obj

    cases = [strip(json.loads(line)) for line in (out / "cases.jsonl").read_text().splitlines() if line.strip()]
    final = [strip(json.loads(line)) for line in (out / "final.jsonl").read_text().splitlines() if line.strip()]
    summary = strip(json.loads((out / "summary.json").read_text()))
    return cases, final, summary


@pytest.mark.parametrize("seed", [0])
def test_sigkilled_at_random_batches_and_resumed_equals_uninterrupted(shared_data, tmp_path_factory, seed):
    if not (shared_data / "counterfact-train.json").is_file():
        pytest.skip("counterfact-train.json not in the shared data")
    cache = tmp_path_factory.mktemp("stats")  # statistics: computed once, shared by both runs
    env = _env()
    plain = tmp_path_factory.mktemp("plain") / "run"
    _run_until(_command(shared_data, plain, cache), env, plain, None)

    killed = tmp_path_factory.mktemp("killed") / "run"
    rng = random.Random(seed)
    kills = sorted(rng.sample(range(1, N_CASES // BATCH), 2 if N_CASES // BATCH > 2 else 1))
    for k in kills:  # each kill lands after batch k is written; the rerun resumes from the checkpoint
        assert _run_until(_command(shared_data, killed, cache), env, killed, k) == -signal.SIGKILL
    _run_until(_command(shared_data, killed, cache), env, killed, None)

    assert _results(killed) == _results(plain)
