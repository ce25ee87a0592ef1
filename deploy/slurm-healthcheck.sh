#!/usr/bin/env bash
# Slurm HealthCheckProgram for GPU nodes: runs `gpuforge probe --slurm-healthcheck` (NVML on this node,
# judged by gpuforge.health) and drains the node with gpuforge's one-line reason when a GPU is unhealthy,
# unknown or missing, or when NVML cannot start (no driver). It resumes only nodes that it drained itself
# (reason starting with "gpuforge:"), never a drain set by an administrator or by another check.
#
# slurm.conf (all nodes; `scontrol reconfigure` after editing):
#   HealthCheckProgram=/usr/local/sbin/gpuforge-slurm-healthcheck
#   HealthCheckInterval=300            # seconds between runs on every node
#   HealthCheckNodeState=ANY,CYCLE     # idle, allocated and mixed nodes; spread runs over the interval
#
# slurmd runs it as root on each node at start-up and every HealthCheckInterval; it ignores the exit status
# (logged only), so the drain is done here with scontrol. Keep it fast: it is killed after a timeout.
#
# Environment (optional):
#   GPUFORGE_CMD            command to run, default "gpuforge probe" (split on spaces, no quoting)
#   GPUFORGE_CONFIG         thresholds/cluster config passed as --config
#   GPUFORGE_EXPECTED_GPUS  expected GPU count passed as --expected-gpus (a missing GPU then drains);
#                           "gres" reads it from this node's Gres=gpu:...:N. Needs a CLI with that flag
#                           (`python3 -m gpuforge_probe` has it).
#   GPUFORGE_TIMEOUT        seconds before the probe counts as hung, default 45
set -u
NODE=${SLURMD_NODENAME:-$(hostname -s)}
export NODE_NAME=${NODE_NAME:-$NODE}  # the node name gpuforge puts in its reasons
read -r -a CMD <<< "${GPUFORGE_CMD:-gpuforge probe}"
args=(--slurm-healthcheck)
[ -n "${GPUFORGE_CONFIG:-}" ] && args+=(--config "$GPUFORGE_CONFIG")
expected=${GPUFORGE_EXPECTED_GPUS:-}
if [ "$expected" = gres ]; then
  expected=$(scontrol show node -o "$NODE" 2>/dev/null | sed -n 's/.* Gres=gpu\(:[^ ,(]*\)*:\([0-9][0-9]*\).*/\2/p')
fi
[ -n "$expected" ] && args+=(--expected-gpus "$expected")

out=$(timeout "${GPUFORGE_TIMEOUT:-45}" "${CMD[@]}" "${args[@]}" 2>&1)
rc=$?
reason=$(printf '%s\n' "$out" | sed '/^[[:space:]]*$/d' | tail -n 1)
case $rc in
  0) ;;
  124) reason="gpuforge: GPU health check timed out after ${GPUFORGE_TIMEOUT:-45} s" ;;
  *) case $reason in gpuforge:*) ;; *) reason="gpuforge: probe failed (rc $rc): $reason" ;; esac ;;
esac
reason=$(printf '%s' "$reason" | tr -d '"' | cut -c1-200)

if [ "$rc" -ne 0 ]; then
  logger -t gpuforge-healthcheck -- "draining $NODE: $reason" 2>/dev/null || true
  scontrol update NodeName="$NODE" State=DRAIN Reason="$reason"
  exit 1
fi

# Healthy: lift our own drain, if any.
node_line=$(scontrol show node -o "$NODE" 2>/dev/null)
case $node_line in
  *" State="*DRAIN*" Reason=gpuforge:"*)
    logger -t gpuforge-healthcheck -- "resuming $NODE: $reason" 2>/dev/null || true
    scontrol update NodeName="$NODE" State=RESUME
    ;;
esac
exit 0
