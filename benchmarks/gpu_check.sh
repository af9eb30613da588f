#!/usr/bin/env bash
# One command, one GPU, no network, at most ~8 minutes: the GPU figures the CPU machines cannot give.
#
#   bash benchmarks/gpu_check.sh            # on a machine with one CUDA GPU
#   bash benchmarks/gpu_check.sh --smoke    # tiny models on the CPU: checks the plumbing only
#
# Each part (see benchmarks/gpu_check.py) runs in its own process under its own time box, so a part that
# fails or runs out of time becomes a "NOT measured" row and the others still run. The raw JSON of every
# part stays in the printed results folder. Time boxes add up to 470 s.
set -u
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
export HF_HUB_OFFLINE=1 WANDB_MODE=disabled PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
OUT=${GPU_CHECK_OUT:-$(mktemp -d -t cytosyn-gpu-check-XXXX)}
mkdir -p "$OUT"

# --smoke runs on a (possibly shared) CPU: the boxes are sized for a GPU, so stretch them there.
SCALE=1
[[ " $* " == *" --smoke "* ]] && SCALE=${GPU_CHECK_SMOKE_SCALE:-6}

run() {  # run PART SECONDS [args]: one time-boxed part → $OUT/PART.json (+ .log)
  local part=$1 limit=$(( $2 * SCALE )) rc
  shift 2
  echo "gpu_check: $part (at most ${limit} s)" >&2
  timeout --kill-after=10 "$limit" "$PY" benchmarks/gpu_check.py "$part" "$@" \
    > "$OUT/$part.json" 2> "$OUT/$part.log"
  rc=$?
  if (( rc != 0 )); then
    printf '{"part": "%s", "ok": false, "note": "exit %d%s; see %s"}\n' "$part" "$rc" \
      "$( (( rc == 124 || rc == 137 )) && echo " (time box of ${limit} s)" )" "$OUT/$part.log" > "$OUT/$part.json"
  fi
}

run peak 20 "$@"
run step 75 "$@"
run compiled 110 "$@"
run keys 15 "$@"
run agreement 20 "$@"
run sampling 45 "$@"
run featurize 30 "$@"
run ddp 70 "$@"
run deepspeed 85 "$@"

echo
echo "cytosyn GPU check ($(date -u +%Y-%m-%dT%H:%M:%SZ), $(hostname)); raw results: $OUT"
"$PY" benchmarks/gpu_check.py table "$OUT"
