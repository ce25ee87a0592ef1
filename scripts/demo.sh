#!/usr/bin/env bash
# `make demo`: start the lab, install the whole stack into it, validate it, and say where to look.
set -euo pipefail
cd "$(dirname "$0")/.."
config="${1:-deployments/lab/config.yml}"
G=.venv/bin/gpuforge
export PREFECT_HOME="${PREFECT_HOME:-$PWD/.lab/prefect}"   # the demo's runs and artifacts live here

$G lab up --config "$config"
start=$(date +%s)
$G install --config "$config"
echo "install finished in $(( $(date +%s) - start ))s" >&2
$G validate --config "$config"

cat <<MSG

Done. The lab keeps running (stop it with: make lab-down).
See the runs, their logs and artifacts (install-summary, preflight-report, kubespray-recap,
gpu-operator-status, validation-report, ...) in the Prefect UI:
    PREFECT_HOME=$PREFECT_HOME .venv/bin/prefect server start --host 127.0.0.1 --port 4200
    then open http://127.0.0.1:4200/runs
Or from the shell:
    PREFECT_HOME=$PREFECT_HOME .venv/bin/prefect artifact ls
MSG
