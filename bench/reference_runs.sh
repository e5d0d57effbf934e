#!/usr/bin/env bash
# The fixed 20-case reference runs of the redesign (issue 9): EMMET and AlphaEdit, batched and
# sequential, built-in smollm2 hparams, the file's own case order. Run it with two versions of the
# code and compare the folders with bench/compare_runs.py:
#   OMP_NUM_THREADS=1 bash bench/reference_runs.sh /tmp/ref_new
#   python bench/compare_runs.py /tmp/ref_old /tmp/ref_new
set -euo pipefail
OUT=$1
DATA=${FASTMEMIT_SHARED_DATA:-$(dirname "$0")/../../shared/data}
for alg in EMMET AlphaEdit; do
  for seq in true false; do
    python -m fastmemit evaluate --alg_name "$alg" --num_edits 10 --model_name smollm2-135m --ds_name cf \
      --data "$DATA/counterfact-train.json" --dataset_size_limit 20 --sequential "$seq" \
      --out "$OUT/${alg}_seq_$seq" --plots false --sample_num none
  done
done
