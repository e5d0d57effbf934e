"""Singular values of a sequential run's accumulated edits against the unedited weights' (PRUNE's view).

PRUNE (arXiv 2405.16821; ``prune_log_base``) compresses the singular values of W − W0 above
σ_max(W0). This prints, per edited matrix of a ``fastmemit evaluate`` run folder's latest checkpoint
(or any delta file: the run's W − W0, as the runner saves them), σ_max(W0), the largest singular
values of W − W0, how many exceed σ_max(W0) (what PRUNE would change) and ‖W − W0‖_F / ‖W0‖_F.

    python bench/edit_spectrum.py /work/runs/lifelong/ENCORE-1000-b10
    python bench/edit_spectrum.py path/to/deltas.safetensors --model smollm2-135m
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch
from safetensors.torch import load_file

from fastmemit import load_model


def delta_file(path: Path) -> tuple[Path, str | None]:
    """(the delta file, the model named by the run folder or None)."""
    if path.is_file():
        return path, None
    files = sorted((path / "checkpoint").glob("deltas-*.safetensors"))
    if not files:
        raise SystemExit(f"{path}: no checkpoint/deltas-*.safetensors (a run folder with a checkpoint, or a delta file)")
    config = json.loads((path / "config.json").read_text()) if (path / "config.json").is_file() else {}
    return files[-1], config.get("run", {}).get("model")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("path", type=Path, help="a run folder (its latest checkpoint) or a delta file")
    ap.add_argument("--model", default=None, help="the unedited model (default: the run's)")
    ap.add_argument("--top", type=int, default=4, help="singular values shown per matrix")
    args = ap.parse_args()
    path, run_model = delta_file(args.path)
    model, _ = load_model(args.model or run_model or "smollm2-135m")
    params = dict(model.named_parameters())
    print(f"{path}\n")
    print("| matrix | σ_max(W0) | largest σ of W − W0 | σ > σ_max(W0) | PRUNE (α = e) would make the largest | ‖W − W0‖_F / ‖W0‖_F |")
    print("| --- | ---: | --- | ---: | ---: | ---: |")
    for name, D in load_file(str(path)).items():
        W0 = params[name].detach().double()  # the stored orientation: singular values do not depend on it
        cap = float(torch.linalg.matrix_norm(W0, ord=2))
        s = torch.linalg.svdvals(D.double())
        top = float(s[0])
        pruned = min(top, cap + math.log(top / cap)) if top > cap else top
        shown = ", ".join(f"{float(x):.2f}" for x in s[: args.top])
        print(f"| {name} | {cap:.2f} | {shown} | {int((s > cap).sum())} | {pruned:.2f} | "
              f"{float(D.double().norm() / W0.norm()):.3f} |")


if __name__ == "__main__":
    main()
