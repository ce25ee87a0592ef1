#!/usr/bin/env bash
# Real-GPU check of the gpuforge probe (issue 7), run once on a lent GPU machine from the repo root:
#
#   run(command="bash bench/device_check.sh", carry=[".whl"], timeout_s=300)
#
# It records the raw NVML readings (-> tests/fixtures/nvml/h200.json) and `nvidia-smi -q`, serves the probe
# on 127.0.0.1, scrapes it twice over HTTP and judges the scraped values with gpuforge.health (the fleet
# code path), prints the verdict table and every series, shows the GPU turn `degraded` with a config that
# lowers the max GPU temperature to 10 °C, runs the Slurm health check and the probe/health tests (whose
# real-NVML tests only run where a driver is present). Needs only python3 and the wheels in .whl/
# (pydantic & co., prometheus-client, nvidia-ml-py for Python 3.12; see bench/README or the device notes):
# no Prefect, no gpuforge CLI. On a CPU machine, GPUFORGE_FIXTURE=tests/fixtures/nvml/h100x8_synthetic.json
# rehearses the same steps from a recorded fixture.
set -u
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/gpuforge-device-check}
PORT=${PORT:-19400}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
exec > >(tee "$OUT/device_check.log") 2>&1

if [ -z "${SKIP_WHEELS:-}" ] && [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "wheel install failed"; exit 3; }
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
fi
FIX=()
if [ -n "${GPUFORGE_FIXTURE:-}" ]; then FIX=(--fixture "$GPUFORGE_FIXTURE"); fi
probe() { $PY -m gpuforge_probe "${FIX[@]}" "$@"; }
step() { echo; echo "=== $* ==="; }
T0=$(date +%s)

step "environment"
uname -a
$PY -c 'import sys, pydantic, prometheus_client, pynvml
from importlib.metadata import version
print(sys.version.split()[0], "pydantic", pydantic.VERSION, "prometheus_client", version("prometheus_client"),
      "nvidia-ml-py", version("nvidia-ml-py"))'
if command -v nvidia-smi >/dev/null; then
  nvidia-smi -L
  nvidia-smi --query-gpu=name,temperature.gpu,temperature.memory,power.draw,power.limit,ecc.errors.uncorrected.volatile.total,clocks_event_reasons.active --format=csv
  nvidia-smi -q > "$OUT/nvidia-smi-q.txt" 2>&1; echo "nvidia-smi -q: $(wc -l < "$OUT/nvidia-smi-q.txt") lines"
fi

step "record raw NVML readings"
probe --record "$OUT/h200.json" && $PY - "$OUT/h200.json" <<'EOF'
import json, sys
d = json.load(open(sys.argv[1]))
print("driver", d.get("driver_version"), "nvml", d.get("nvml_version"))
for g in d["gpus"]:
    print(g["index"], g.get("name"), g.get("uuid"), "lost" if g.get("lost") else "")
    print("  values:", json.dumps(g["values"], sort_keys=True))
    print("  unsupported:", g["unsupported"], "errors:", g["errors"])
EOF

step "serve on 127.0.0.1:$PORT"
probe --serve "127.0.0.1:$PORT" -v &
SERVER=$!
for _ in $(seq 50); do
  $PY -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:$PORT/metrics', timeout=1)" 2>/dev/null && break
  sleep 0.2
done
step "listening sockets of the probe (must be 127.0.0.1 only)"
(command -v ss >/dev/null && ss -ltnp 2>/dev/null | grep ":$PORT") || $PY - "$PORT" <<'EOF'
import sys
port = int(sys.argv[1])
for line in open("/proc/net/tcp").read().splitlines()[1:]:
    f = line.split()
    ip, p = f[1].split(":")
    if int(p, 16) == port and f[3] == "0A":
        print("LISTEN", ".".join(str(int(ip[i:i + 2], 16)) for i in (6, 4, 2, 0)), port)
EOF

for n in 1 2; do
  step "scrape $n: every series, then the verdicts from the scraped values"
  probe --scrape "http://127.0.0.1:$PORT/metrics" | tee "$OUT/scrape$n.txt"
  echo "scrape $n rc=${PIPESTATUS[0]}"
  sleep 2
done
kill "$SERVER" 2>/dev/null; wait "$SERVER" 2>/dev/null

step "table with the default thresholds"
probe; echo "rc=$?"
step "table with a config lowering max GPU temp to 10 °C (expect degraded)"
echo '{"thresholds": {"default": {"max_gpu_temp_c": 10}}}' > /tmp/gpuforge-cold.json
probe --config /tmp/gpuforge-cold.json; echo "rc=$?"
probe --config /tmp/gpuforge-cold.json --json > "$OUT/verdicts_cold.json"

step "Slurm health check"
probe --slurm-healthcheck; echo "rc=$?"

step "tests (real-NVML tests run here)"
timeout 120 $PY -m pytest -q -p no:cacheprovider -o addopts="" tests/test_health.py tests/test_probe.py -rs 2>&1 | tail -25
echo "pytest rc=${PIPESTATUS[0]}"
echo; echo "device_check done in $(( $(date +%s) - T0 )) s"
