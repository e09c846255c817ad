#!/usr/bin/env bash
# Prepare what an offline GPU box needs to run spellxfer's sweeps and benches (developer tool).
# The box has torch, transformers, peft, accelerate, lightning, torchmetrics, rich, pandas, scipy,
# statsmodels, matplotlib and pyarrow, but no internet; this writes, into ignored folders of the
# checkout (add /.whl/ and /.gpx/ to .git/info/exclude):
#   .whl/               the missing wheels for CPython 3.12, manylinux x86_64 (about 10 MB)
#   .gpx/bundle.tar.xz  the built data (data/full, data/demo) and the spellxfer cache without the
#                       GGUF (qwen.tiktoken, tokenizers/qwen3): nothing is built or fetched there
#   .gpx/gguf.a?        the SmolLM2-135M-Instruct GGUF (94 MB) in parts of PART_MB (default 24)
#   .gpx/run.sh         a copy of tools/gpu_box/run.sh
# Each part travels in its own call if the calls' upload is limited; run.sh joins them (step gguf).
# Usage (from the checkout's root, after `make setup`): bash tools/gpu_box/prepare.sh
set -euo pipefail
PY=${PY:-.venv/bin/python}
B=$(mktemp -d)
mkdir -p .whl .gpx
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d .whl jsonargparse==4.53.0 docstring_parser==0.18.0 typeshed_client==2.15.0 optuna==5.1.0 \
  alembic==1.20.1 colorlog==6.12.0 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 gguf==0.19.0 \
  Mako==1.4.3 SQLAlchemy==2.1.9 pydantic==2.14.4 pydantic_core==2.50.5 annotated-types==0.8.0 \
  typing-inspection==0.4.5
export SPELLXFER_CACHE=$B/cache
"$PY" -m spellxfer assets fetch
"$PY" -m spellxfer data build --out "$B/data/full" --profile full --seed 0 --overwrite true
"$PY" -m spellxfer data build --out "$B/data/demo" --profile demo --seed 0 --overwrite true
tar --exclude='*.gguf' -cJf .gpx/bundle.tar.xz -C "$B" data cache
rm -f .gpx/gguf.a?
split -b "${PART_MB:-24}M" "$B/cache/assets/SmolLM2-135M-Instruct.Q4_1.gguf" .gpx/gguf.
cp tools/gpu_box/run.sh .gpx/run.sh
rm -rf "$B"
du -sh .whl .gpx/*
