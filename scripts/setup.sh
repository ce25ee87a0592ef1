#!/usr/bin/env bash
# Installs everything gpuforge and its lab need on a fresh Debian 12 machine; cheap when already done.
#   - Debian packages: the lab's real daemons (Slurm, munge, Prometheus, sshd, etcd), iproute2, and PostgreSQL
#     (the tests start a private one for a production-shaped Prefect server)
#   - .venv with gpuforge and its dev tools
#   - the lab's binaries built from Go modules (Kubernetes control plane at the pin and at the previous pin, kwok,
#     Helm), cached by version
set -euo pipefail
cd "$(dirname "$0")/.."

packages=(slurm-wlm munge prometheus openssh-server iproute2 etcd-server postgresql)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  echo "setup: installing Debian packages: ${missing[*]}" >&2
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
# The lab runs private instances of these daemons; without systemd, Debian starts none of its own.

if [[ ! -x .venv/bin/python ]]; then
  python3 -m venv .venv
fi
if ! .venv/bin/python -c "import gpuforge, prefect, pytest" 2>/dev/null \
   || [[ pyproject.toml -nt .venv/.gpuforge-installed ]]; then
  echo "setup: installing Python packages into .venv" >&2
  .venv/bin/pip install -q --upgrade pip
  .venv/bin/pip install -q -e '.[dev]'
  touch .venv/.gpuforge-installed
fi

bash lab/build/build-binaries.sh >/dev/null
# The previous pin's control plane (Kubernetes 1.34.3, Kubespray v2.30.0's): the upgrade lab tests put the lab there
# and let `gpuforge upgrade apply` bring it to the pin (tests/test_upgrade_kubernetes_lab.py). Cached like the above.
K8S_VERSION=1.34.3 bash lab/build/build-binaries.sh >/dev/null

# Kubespray's own venv (its requirements.txt: ansible 11.13 / core 2.18), built once into the cache from the
# pinned release tarball beside the project, so the lab's first kubespray phase does not pay for it.
kubespray_tarball=../shared/upstream/kubespray-v2.31.0.tar.gz
if [[ -f $kubespray_tarball ]]; then
  .venv/bin/python - "$kubespray_tarball" <<'PY' >/dev/null
import sys
from pathlib import Path

from gpuforge.pins import KUBESPRAY_VERSION
from tasks.kubespray import kubespray_venv, resolve_checkout

print(kubespray_venv(resolve_checkout(Path(sys.argv[1]).resolve(), KUBESPRAY_VERSION)))
PY
fi
