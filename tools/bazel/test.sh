#!/usr/bin/env bash
# `make test-bazel` (and CI): the Bazel build and tests, offline, with Bazel 4.2.3.
#
#   1. installs Debian's bazel-bootstrap when `bazel` is missing (apt-get, non-interactive);
#   2. puts .venv/bin first on PATH: Bazel's auto-detected Python toolchain runs `python3`
#      from PATH, and the third-party packages (torch, torchrec, ...) come from the .venv;
#   3. `bazel test //...`: the launcher tests (//tests:*);
#   4. `bazel run //projects/twhin:run` on a tiny generated graph with 2 workers, checking
#      the exit code and that both workers wrote the final checkpoint;
#   5. always shuts the Bazel server down (it would otherwise stay resident for 3 hours).
#
# Environment: VENV (default .venv), BAZEL_ARGS (extra options for bazel test and run),
# TML_BAZEL_SKIP_RUN=1 skips step 4.
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT=$PWD
VENV=${VENV:-.venv}
read -r -a EXTRA <<< "${BAZEL_ARGS:-}"

log() { echo "[test-bazel] $*" >&2; }

if ! command -v bazel >/dev/null 2>&1; then
  log "bazel not found: installing Debian's bazel-bootstrap (Bazel 4.2.3)"
  SUDO=()
  if [ "$(id -u)" -ne 0 ]; then SUDO=(sudo); fi
  export DEBIAN_FRONTEND=noninteractive
  "${SUDO[@]}" apt-get update -qq
  "${SUDO[@]}" apt-get install -y -qq bazel-bootstrap >/dev/null
fi

case "$VENV" in
  /*) ;;
  *) VENV="$ROOT/$VENV" ;;
esac
if [ ! -x "$VENV/bin/python3" ]; then
  log "no $VENV/bin/python3: run \`make venv\` first"
  exit 1
fi
export PATH="$VENV/bin:$PATH"
log "python3 is $(command -v python3) ($(python3 --version 2>&1))"

SMOKE=""
cleanup() {
  local status=$?
  bazel shutdown >/dev/null 2>&1 || true
  if [ -n "$SMOKE" ]; then rm -rf "$SMOKE"; fi
  exit "$status"
}
trap cleanup EXIT

# Progress lines only clutter a CI log; the summary and failing tests' output remain.
COMMON=(--noshow_progress --color=no --curses=no)

start=$SECONDS
bazel test "${COMMON[@]}" --test_output=errors "${EXTRA[@]}" //...
log "bazel test //... passed in $((SECONDS - start)) s"

if [ "${TML_BAZEL_SKIP_RUN:-0}" = "1" ]; then
  exit 0
fi

# `bazel run //projects/twhin:run` trains, 2 workers, on a tiny graph.
start=$SECONDS
SMOKE=$(mktemp -d "${TMPDIR:-/tmp}/tml-bazel-run.XXXXXX")
STEPS=20
python3 -m projects.twhin.data.generate --out "$SMOKE/graph" --num_users 2000 \
  --num_tweets 500 --num_edges 20000 --num_communities 5
python3 - "$SMOKE" "$STEPS" <<'PY'
"""projects/twhin/config/local.yaml shrunk to the tiny graph."""
import sys

import yaml

smoke, steps = sys.argv[1], int(sys.argv[2])
with open("projects/twhin/config/local.yaml") as f:
    config = yaml.safe_load(f)
sizes = {"user": 2000, "tweet": 500}
for table in config["model"]["embeddings"]["tables"]:
    table["num_embeddings"] = sizes[table["name"]]
config["training"].update(num_train_steps=steps, checkpoint_every_n=steps,
                          train_log_every_n=10, num_eval_steps=2, eval_log_every_n=steps)
config["train_data"].update(data_root=f"{smoke}/graph/train", per_replica_batch_size=100)
config["validation_data"].update(data_root=f"{smoke}/graph/validation",
                                 per_replica_batch_size=100)
with open(f"{smoke}/twhin.yaml", "w") as f:
    yaml.safe_dump(config, f, sort_keys=False)
PY

status=0
bazel run "${COMMON[@]}" "${EXTRA[@]}" //projects/twhin:run -- \
  --config_yaml_path="$SMOKE/twhin.yaml" --save_dir="$SMOKE/save" --nproc_per_node=2 \
  2>"$SMOKE/run.log" || status=$?
cat "$SMOKE/run.log" >&2
if [ "$status" -ne 0 ]; then
  log "FAILED: bazel run //projects/twhin:run exited with $status"
  exit 1
fi
# Under Bazel the launcher must start torchrun as a subprocess (PYTHONPATH from runfiles).
if ! grep -q "torchrun as a subprocess with PYTHONPATH set" "$SMOKE/run.log"; then
  log "FAILED: bazel run //projects/twhin:run did not launch torchrun as a subprocess"
  exit 1
fi
# A complete DCP checkpoint of the last step, with one shard file per worker.
CKPT="$SMOKE/save/$STEPS"
for file in .metadata __0_0.distcp __1_0.distcp; do
  if [ ! -f "$CKPT/$file" ]; then
    log "FAILED: bazel run //projects/twhin:run left no $CKPT/$file"
    ls -laR "$SMOKE/save" >&2 || true
    exit 1
  fi
done
log "bazel run //projects/twhin:run trained 2 workers to step $STEPS in $((SECONDS - start)) s"
