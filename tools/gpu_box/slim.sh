#!/usr/bin/env bash
# Keep the committed studies' files off a GPU box call (developer tool). The device tool uploads
# every tracked file with each call (64 MiB in all, with what the call carries); the committed
# studies are most of that and no bench needs them. `on` takes them out of git's index for now and
# ignores them in .gitignore's working copy (its `!results/...` lines would un-ignore them);
# `off` puts both back exactly as committed. Nothing is committed or deleted: the files stay on
# disk. Do not commit while it is on. Usage (from the checkout's root): bash tools/gpu_box/slim.sh on|off
set -euo pipefail
DIRS=(results/smollm2-study results/smollm2-h100 results/smollm2-base)
size() { git ls-files -z | xargs -0 du -cb | tail -1 | cut -f1; }
case "${1:-}" in
  on)
    git diff --quiet -- .gitignore || { echo "slim: .gitignore has uncommitted changes; commit them first" >&2; exit 2; }
    git rm -r --cached -q -- "${DIRS[@]}"
    for d in "${DIRS[@]}"; do sed -i "\#^!$d/\$#d" .gitignore; done
    echo "slim on: $(size) bytes tracked (untracked, not ignored: $(git ls-files -o --exclude-standard | wc -l) files)" ;;
  off)
    git reset -q -- "${DIRS[@]}"
    git checkout -- .gitignore
    echo "slim off: $(size) bytes tracked" ;;
  *) echo "usage: bash tools/gpu_box/slim.sh on|off" >&2; exit 2 ;;
esac
