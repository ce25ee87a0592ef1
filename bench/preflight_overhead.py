"""What Prefect + ansible-runner add to the preflight playbook: gpuforge's preflight flow vs bare
`ansible-playbook` on the same inventory of 16 and of 64 SSH hosts, measured side by side (interleaved) in one run.

Goal: overhead <= 10 % at each size. Prints the medians, the raw times and the ratio; asserts nothing about time.
Run: .venv/bin/python bench/preflight_overhead.py [--hosts 16,64] [--rounds 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")

from gpuforge.plan import write_plan  # noqa: E402
from lab.sshhosts import HostSpec, SshHosts, free_lab_ips  # noqa: E402
from tasks.ansible import host_key_env  # noqa: E402

FORKS = 16  # tasks.ansible.run_playbook's default, which the preflight flow uses


def config_text(key: Path, ips: list[str], size: int) -> str:
    lines = [
        f"cluster_name: bench-preflight-{size}",
        "ansible_user: root",
        "ansible_python_interpreter: /usr/bin/python3",
        f"ansible_ssh_private_key_file: {key}",
        "k8s_cluster_nodes:",
        f'  - {{ip: "{ips[0]}", name: pf-0, role: [control-plane, etcd, schedulable]}}',
    ]
    lines += [
        f'  - {{ip: "{ips[i]}", name: pf-{i}, role: [gpu-worker, schedulable], gpu_count: 8}}' for i in range(1, size)
    ]
    return "\n".join(lines) + "\n"


def measure(work: Path, hosts: SshHosts, ips: list[str], size: int, rounds: int) -> tuple[list[float], list[float]]:
    """(bare times, flow times) on the first `size` hosts, alternating bare and flow."""
    from flows.common import ClusterParams
    from flows.preflight import preflight
    from gpuforge import desired
    from gpuforge.config import load_config

    cfg_path = work / f"config-{size}.yml"
    cfg_path.write_text(config_text(hosts.key_path, ips, size))
    inventory = work / f"inventory-{size}"
    write_plan(desired.build(load_config(cfg_path)), inventory)
    bare_env = {
        **os.environ,
        **host_key_env("off"),  # the bare side does no host-key work; the flow's side pins keys
        "ANSIBLE_SSH_CONTROL_PATH_DIR": str(work / "cp"),
        "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
    }
    argv = [
        str(Path(sys.executable).parent / "ansible-playbook"),
        *("-i", str(inventory / "hosts.yaml"), "-f", str(FORKS)),
        str(REPO / "playbooks" / "preflight.yml"),
    ]
    bare, flow = [], []
    for _ in range(rounds):
        started = time.perf_counter()
        subprocess.run(argv, env=bare_env, check=True, capture_output=True)
        bare.append(time.perf_counter() - started)
        started = time.perf_counter()
        state = preflight(ClusterParams(config=str(cfg_path)), return_state=True)
        flow.append(time.perf_counter() - started)
        assert state.is_completed(), state.message
        print(f"  {size} hosts: bare {bare[-1]:.1f}s, flow {flow[-1]:.1f}s", flush=True)
    return bare, flow


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hosts", default="16,64", help="SSH host counts, comma-separated")
    ap.add_argument("--rounds", type=int, default=3, help="bare/flow pairs per size")
    args = ap.parse_args()
    sizes = [int(n) for n in args.hosts.split(",")]

    from prefect.testing.utilities import prefect_test_harness

    with tempfile.TemporaryDirectory(prefix="gpuforge-bench-") as tmp:
        work = Path(tmp)
        ips = free_lab_ips(max(sizes))
        hosts = SshHosts(work / "lab")
        started = time.perf_counter()
        hosts.up([HostSpec(f"pf-{i}", ip, 0 if i == 0 else 8) for i, ip in enumerate(ips)])
        print(f"{len(ips)} SSH hosts up in {time.perf_counter() - started:.1f}s; load {os.getloadavg()}", flush=True)
        os.environ["GPUFORGE_STATE"] = str(work / "state")
        results = []
        try:
            with prefect_test_harness(server_startup_timeout=180):
                for size in sizes:
                    results.append((size, *measure(work, hosts, ips, size, args.rounds)))
        finally:
            hosts.down()
        for size, bare, flow in results:
            b, f = statistics.median(bare), statistics.median(flow)
            print(
                f"preflight on {size} SSH hosts, forks {FORKS}: bare ansible-playbook {b:.2f}s, gpuforge flow {f:.2f}s "
                f"(medians of {len(bare)}, interleaved; bare {[round(t, 1) for t in bare]}, "
                f"flow {[round(t, 1) for t in flow]}) -> overhead {100 * (f / b - 1):+.1f}% (goal <= 10%)"
            )
        print(f"load average at the end: {os.getloadavg()}")


if __name__ == "__main__":
    main()
