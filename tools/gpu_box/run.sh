#!/usr/bin/env bash
# The GPU-box side of tools/gpu_box/prepare.sh (developer tool): run from the checkout's root on an
# offline GPU box, with the prepared .whl/ and .gpx/ beside it and OUT set to a folder the caller
# collects afterwards. This is how the H100 runs of the transfer study and of `bench sweep` in
# docs/results.md and docs/performance.md were made. Usage: bash .gpx/run.sh STEP...
#   gguf          join the GGUF parts .gpx/gguf.a? carried by earlier calls (kept in $S)
#   bench:MODEL   bench sweep (env MODES, SCORERS, TRIALS, STEPS, VAL_EVERY, VAL_LIMIT, EVAL_LIMIT, BENCH_S, TAG)
#   benchstart:MODEL  the same in a detached process (runs on between calls while the machine is
#                 held: one invocation may outlast a call's limit); benchwait:N follows it
#   studystart    the study's three phases (phase 1, phase 2 replicates, the control arm) in a
#                 detached process, each until done or STUDY_END (epoch seconds) - 75 s; once
#                 phase 1 is done and phase 2 planned, phase 2 and the control arm run side by side
#                 (PARALLEL=0: one after the other, so that the first finishes sooner)
#   wait:N        follow it for up to N s (or until it ends), then snap
#   snap          the study without weights ($OUT/study.txz.a?, 15 MiB parts; databases copied
#                 consistently into db-snapshot/; new predictions compacted first): only files
#                 newer than the tree's copy, so unpack it over the tree's results/smollm2-study
# The study starts from the tree's results/smollm2-study (phase 1 and its restored .db), copied
# to $S/study: each call may copy the tree again, which must not overwrite a running study's files.
# Trained on spelling, evaluated on position and count only.
set -uo pipefail
S=/tmp/sx
mkdir -p "$S" "$OUT"
export PYTHONUNBUFFERED=1 SPELLXFER_CACHE=$S/cache SPELLXFER_GIT_COMMIT=${COMMIT:-unknown}
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 WANDB_MODE=disabled SPELLXFER_PROGRESS_EVERY=${PROGRESS_EVERY:-30}
if [ ! -f "$S/.site" ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$S/site" .whl/*.whl || exit 3
  touch "$S/.site"
fi
if [ -f .gpx/bundle.tar.xz ] && [ ! -f "$S/.bundle" ]; then tar -xJf .gpx/bundle.tar.xz -C "$S" && touch "$S/.bundle"; fi
for part in .gpx/gguf.a?; do [ -f "$part" ] && cp "$part" "$S/"; done
export PYTHONPATH=$S/site:$PWD
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader > "$OUT/gpu.txt" 2>&1
cat "$OUT/gpu.txt"
mkdir -p results/data && ln -sfn "$S/data/full" results/data/full
R=$S/study  # a copy: each call re-copies the tree, which must not overwrite a running study's files
# the tree's copy: a snapshot returns only what is newer than it (the tree has the rest)
[ -d "$R" ] || { cp -r results/smollm2-study "$R" && sleep 1 && touch "$S/.copied"; }

left() { echo $(( ${STUDY_END:-0} - $(date +%s) )); }

run_until_end() {  # run "$@" until it ends, or SIGINT at STUDY_END - 75 s and SIGKILL 45 s later
  local t; t=$(( $(left) - 75 ))
  if [ "$t" -lt 120 ]; then echo "skip (only $(left) s left): $*"; return 0; fi
  echo "== $(date +%T) run for ≤ ${t}s: $*"
  timeout -s INT -k 45 "$t" "$@"
  echo "== $(date +%T) rc=$?"
}

complete_count() {  # complete trials of study $1 in the study's own database
  python3 - "$1" "$R" <<'EOF'
import sys, pathlib, optuna
optuna.logging.set_verbosity(optuna.logging.ERROR)
name = sys.argv[1]
db = pathlib.Path(sys.argv[2]) / "sweeps" / f"{name}.db"
if not db.is_file():
    print(0); raise SystemExit
s = optuna.load_study(study_name=name, storage=f"sqlite:///{db}")
print(sum(t.state == optuna.trial.TrialState.COMPLETE for t in s.trials))
EOF
}

plan_ids() {  # the configuration ids of phase 2's replicate plan ($1), comma-separated
  python3 -c "import json,sys; print(','.join(str(c['config_id']) for c in json.load(open(sys.argv[1]))['configurations']))" "$1"
}

pack_study() {
  local common=(--results_dir "$R" --pack 16 --pack_window true --pack_scorers "${SCORERS:-4}")
  local plan=$R/sweeps/smollm2-study/replicate-plan.json
  phase() {  # the spelling study's sweep, with any extra flags (phase 2's)
    run_until_end python3 -m spellxfer sweep --space configs/sweeps/smollm2_study.yaml --study smollm2-study \
      "${common[@]}" "$@"
  }
  control() {  # the control arm: phase 2's five configurations, seeds 0-2, on the control file
    local ids; ids=$(plan_ids "$plan")
    echo "control ids: $ids"
    run_until_end python3 -m spellxfer sweep --space configs/sweeps/smollm2_study_control.yaml \
      --study smollm2-study-control "${common[@]}" --from_study smollm2-study --replicate_configs "$ids" --replicates 3
  }
  if [ -f "$plan" ] && [ "${PARALLEL:-1}" = 1 ]; then  # phase 2 planned: it and the control arm at once
    echo "phase 2 and the control arm side by side (control log: control.log)"
    control > "$S/control.log" 2>&1 &
    sleep 30  # the control reads phase 1's database once, before phase 2 writes to it
    phase --replicate_configs auto:5 --replicates 3
    wait
  else
    phase
    echo "phase 1 complete: $(complete_count smollm2-study)"
    phase --replicate_configs auto:5 --replicates 3
    [ -f "$plan" ] && control
  fi
  echo "phase 1+2 complete: $(complete_count smollm2-study)"
  echo "control complete: $(complete_count smollm2-study-control)"
  echo "== $(date +%T) phases done"
}

snapshot() {  # the study without weights (consistent copies of its databases), in 15 MiB parts
  rm -rf "$S/snap" && mkdir -p "$S/snap/db-snapshot"
  for db in "$R"/sweeps/*.db; do
    [ -f "$db" ] && python3 -c "import sqlite3,sys; a=sqlite3.connect(sys.argv[1]); b=sqlite3.connect(sys.argv[2]); a.backup(b); b.close()" "$db" "$S/snap/db-snapshot/$(basename "$db")"
  done
  local skip=()  # while the study runs, its predictions are being written: leave them out
  if running "$S/study.pid"; then
    skip=(! -name 'predictions*'); echo "study still running: snapshot without predictions"
  else  # one process per run directory: xz -9 of ~50 runs one after another takes minutes
    find "$R"/sweeps -name 'predictions.jsonl' -o -name 'predictions.jsonl.gz' | xargs -r -n 1 dirname \
      | xargs -r -P 16 -n 1 python3 tools/compact_predictions.py | tail -3
  fi
  local newer=()  # only what changed since the tree's copy (when known)
  [ -f "$S/.copied" ] && newer=(-newer "$S/.copied")
  (cd "$R" && find . -type f "${newer[@]}" ! -name '*.safetensors' ! -name '*.ckpt' ! -name '*.pt' \
    ! -path './sweeps/*.db' ! -name '*.db-journal' "${skip[@]}") > "$S/snap.files"
  echo "snapshot: $(wc -l < "$S/snap.files") files"
  tar -cf - -C "$R" -T "$S/snap.files" -C "$S/snap" db-snapshot | xz -T8 -1 | split -b 15M - "$OUT/study.txz."
  cp "$S/study.log" "$S/control.log" "$OUT/" 2>/dev/null
  ls -la "$OUT"
}

running() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }  # the process in pid file $1 is alive

follow() {  # wait while the process in pid file $1 runs, for at most $2 s
  local t0; t0=$(date +%s)
  while running "$1" && [ $(( $(date +%s) - t0 )) -lt "$2" ]; do sleep 5; done
}

bench_sweep() {  # bench sweep of model $1 (env MODES, SCORERS, TRIALS, STEPS, VAL_EVERY, VAL_LIMIT,
  # EVAL_LIMIT, BENCH_S; TAG names another JSON, e.g. a variant that would replace a mode's row)
  local m=$1
  mkdir -p "$S/res"
  # shellcheck disable=SC2086
  timeout -s INT -k 30 "${BENCH_S:-500}" python3 -m spellxfer bench sweep --model "$m" \
    --trials "${TRIALS:-16}" --max_steps "${STEPS:-25}" --validate_every_steps "${VAL_EVERY:-25}" \
    --val_limit "${VAL_LIMIT:-100}" --eval_limit "${EVAL_LIMIT:-100}" --kernel_steps 0 \
    --modes ${MODES:-pack:16} --pack_scorers "${SCORERS:-0}" --append true \
    --out "$S/res/sweep-$m${TAG:-}.json" --work_dir "$S/bw-$m${TAG:-}"
}

for step in "$@"; do
  case "$step" in
    gguf)
      mkdir -p "$S/cache/assets"
      cat "$S"/gguf.a? > "$S/cache/assets/SmolLM2-135M-Instruct.Q4_1.gguf"
      sha256sum "$S/cache/assets/SmolLM2-135M-Instruct.Q4_1.gguf" ;;
    bench:*)
      bench_sweep "${step#bench:}" 2>&1 | tail -c 20000
      cp "$S"/res/sweep-*.json "$OUT/" ;;
    benchstart:*)  # bench:MODEL in its own process session, to follow with benchwait:N
      if running "$S/bench.pid"; then echo "already running"; continue; fi
      m=${step#benchstart:}  # MODES, SCORERS, TAG, BENCH_S … reach it from this script's environment
      setsid nohup bash .gpx/run.sh "benchrun:$m" > "$S/bench-$m${TAG:-}.log" 2>&1 < /dev/null &
      echo $! > "$S/bench.pid"; echo "started bench $m${TAG:-}: $(cat "$S/bench.pid")" ;;
    benchrun:*) bench_sweep "${step#benchrun:}"; echo "== $(date +%T) bench rc=$?" ;;
    benchwait:*)  # follow the detached bench for up to N s (or until it ends), then bring back JSON and logs
      follow "$S/bench.pid" "${step#benchwait:}"
      running "$S/bench.pid" && echo "bench still running"
      for f in "$S"/bench-*.log; do echo "### $f"; grep -E "^==|Traceback|Error|makespan|complete" "$f" | tail -20; tail -c 3000 "$f"; done
      nvidia-smi --query-gpu=memory.used,utilization.gpu --format=csv,noheader
      cp "$S"/bench-*.log "$OUT/"; cp "$S"/res/sweep-*.json "$OUT/" 2>/dev/null; ls -la "$OUT" ;;
    studystart)  # the phases in their own process session: they run on between calls while the machine is held
      if running "$S/study.pid"; then echo "already running"; continue; fi
      STUDY_END=$STUDY_END setsid nohup bash .gpx/run.sh phases > "$S/study.log" 2>&1 < /dev/null &
      echo $! > "$S/study.pid"; echo "started $(cat "$S/study.pid") until $(date -d @"$STUDY_END" +%T)" ;;
    phases) pack_study ;;
    snap) snapshot ;;
    wait:*)  # follow the detached study for up to N s (or until it ends), then snapshot
      follow "$S/study.pid" "${step#wait:}"
      grep -E "^==|complete|control ids|Traceback|Error|error" "$S/study.log" | tail -40
      tail -c 4000 "$S/study.log"
      [ -f "$S/control.log" ] && grep -E "^==|Traceback|Error|error" "$S/control.log" | tail -10 && tail -c 2500 "$S/control.log"
      nvidia-smi --query-gpu=memory.used,utilization.gpu --format=csv,noheader
      snapshot ;;
    *) echo "unknown step $step"; exit 2 ;;
  esac
done
