"""One rank of the torch.distributed statistics tests (tests/test_scale_distributed.py), run by torchrun.

``python -m torch.distributed.run --standalone --nproc_per_node N tests/scale_dist_worker.py SETTINGS.json``

Every rank builds the same seeded tiny model, then:
1. computes the statistics of each scenario in ``SCENARIOS`` (every rank calls, as a user script under
   torchrun would) and saves what it got to ``OUT/rank<r>.pt``;
2. runs an edit on rank 0 while the other ranks serve its statistics passes (``lead_or_serve``),
   saving the deltas and the number of passes served;
3. runs ``fastmemit edit`` (the CLI's ``main``, in the same process group) the same way, each rank's
   stdout to ``OUT/cli<r>.txt``.
"""

from __future__ import annotations

import contextlib
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root: tests.helpers

from fastmemit.cli import main as cli_main  # noqa: E402
from fastmemit.editing import Editor  # noqa: E402
from fastmemit.errors import FastMemitError  # noqa: E402
from fastmemit.stats import ALL_KEYS, compute_layer_stats, service  # noqa: E402
from fastmemit.stats.distributed import session  # noqa: E402
from fastmemit.stats.service import lead_or_serve  # noqa: E402
from tests.helpers import gpt2_tokenizer, tiny_llm  # noqa: E402

# name -> compute_layer_stats keyword arguments (the corpus and cache_dir are added)
SCENARIOS: dict[str, dict] = {
    "count_mid_batch": dict(layers=[0, 2], n_keys=509, batch_size=4, seq_len=64, seed=0),
    "dynamic": dict(layers=[1], dynamic_multiplier=3, batch_size=3, seq_len=64, seed=None),
    "all_keys": dict(layers=[0], n_keys=ALL_KEYS, batch_size=8, seq_len=64, seed=0),
    "one_batch": dict(layers=[0, 1], n_keys=20, batch_size=4, seq_len=64, seed=0),  # rank 1 runs no batch
    "stats_on_cpu": dict(layers=[2], n_keys=301, batch_size=4, seq_len=32, seed=1, stats_device="cpu"),
}
CACHED = dict(layers=[0, 1], n_keys=300, batch_size=4, seq_len=64, seed=0)
EDIT_HP = dict(layers=[0, 1], v_num_grad_steps=3, context_template_length_params=[[3, 1]], dynamic=True,
               dynamic_multiplier=2, mom2_update_weight=100, stats_seq_len=64, stats_batch_size=4)
REQS = [{"prompt": "The mother tongue of {} is", "subject": "Danielle Darrieux", "target_new": "English"},
        {"prompt": "{} plays the", "subject": "Toko Yasuda", "target_new": "piano"}]


def record(stats: dict) -> dict:
    return {layer: (st.sum_kk.cpu(), st.count, st.cache_hit) for layer, st in stats.items()}


def failures(model: torch.nn.Module, tok, rank: int, settings: dict) -> dict[str, str | None]:
    """Calls that one rank cannot make as the others do: every rank must raise, none may wait forever."""
    cases = {"corpus_missing_on_rank1": dict(corpus=settings["corpus"] if rank == 0 else settings["out"] + "/none.jsonl"),
             "seed_differs": dict(corpus=settings["corpus"], seed=rank)}
    out: dict[str, str | None] = {}
    for name, kw in cases.items():
        try:
            compute_layer_stats(model, tok, [0], n_keys=50, cache=False, show_progress=False, **kw)
            out[name] = None
        except FastMemitError as e:
            out[name] = type(e).__name__
    return out


def main() -> None:
    settings = json.loads(Path(sys.argv[1]).read_text())
    out = Path(settings["out"])
    torch.set_num_threads(1)
    tok = gpt2_tokenizer()
    with session("cpu") as shard:
        assert shard is not None and shard.backend == "gloo"
        model = tiny_llm("llama", len(tok))
        got, forwards = {}, {}
        for name, kw in SCENARIOS.items():
            calls: list[int] = []  # the batches this rank ran the model on
            hook = model.register_forward_pre_hook(lambda _m, _a, calls=calls: calls.append(1))
            got[name] = record(compute_layer_stats(model, tok, corpus=settings["corpus"], cache=False,
                                                   show_progress=False, **kw))
            hook.remove()
            forwards[name] = len(calls)
        got["forwards"] = forwards
        got["errors"] = failures(model, tok, shard.rank, settings)
        kw = dict(corpus=settings["corpus"], cache=True, cache_dir=settings["cache"], show_progress=False, **CACHED)
        got["cached_first"] = record(compute_layer_stats(model, tok, **kw))
        got["cached_again"] = record(compute_layer_stats(model, tok, **kw))
        torch.save(got, out / f"rank{shard.rank}.pt")
        print(f"rank {shard.rank}: statistics done", flush=True)

        def edit_on_rank0() -> int:
            ed = Editor(model, tok, "EMMET", EDIT_HP, corpus=settings["corpus"], stats_cache_dir=settings["cache2"],
                        show_progress=False)
            torch.save(ed.edit(REQS).deltas, out / "served_deltas.pt")
            return 0

        passes = []  # the statistics passes this rank joined as a serving rank
        real = service.compute_layer_stats
        service.compute_layer_stats = lambda *a, **k: passes.append(k["layers"]) or real(*a, **k)
        rc = lead_or_serve(model, tok, shard, edit_on_rank0)
        service.compute_layer_stats = real
        (out / f"served{shard.rank}.json").write_text(json.dumps({"rc": rc, "passes": passes}))
        print(f"rank {shard.rank}: served edit done", flush=True)
        # the CLI, as `torchrun ... -m fastmemit edit ...` runs it (its session finds this process group)
        with open(out / f"cli{shard.rank}.txt", "w") as f, contextlib.redirect_stdout(f):
            rc = cli_main(settings["cli_edit"])
        (out / f"cli_rc{shard.rank}.json").write_text(json.dumps(rc))
        print(f"rank {shard.rank}: cli edit done", flush=True)


if __name__ == "__main__":
    main()
