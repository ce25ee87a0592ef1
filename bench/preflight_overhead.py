"""What Prefect + ansible-runner add to the preflight playbook: gpuforge's preflight flow vs bare
`ansible-playbook` on the same 16-host inventory, measured side by side (interleaved) in one run.

Goal: overhead <= 10 %. Prints the medians and the ratio; asserts nothing about time.
Run: .venv/bin/python bench/preflight_overhead.py
"""

from __future__ import annotations

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
from lab.sshhosts import HostSpec, SshHosts  # noqa: E402
from tasks.ansible import host_key_env  # noqa: E402

HOSTS = 16
ROUNDS = 3


def config_text(key: Path) -> str:
    lines = [
        "cluster_name: bench-preflight",
        "ansible_user: root",
        "ansible_python_interpreter: /usr/bin/python3",
        f"ansible_ssh_private_key_file: {key}",
        "k8s_cluster_nodes:",
        '  - {ip: "198.51.100.200", name: pf-0, role: [control-plane, etcd, schedulable]}',
    ]
    lines += [
        f'  - {{ip: "198.51.100.{200 + i}", name: pf-{i}, role: [gpu-worker, schedulable], gpu_count: 8}}'
        for i in range(1, HOSTS)
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    from prefect.testing.utilities import prefect_test_harness

    from flows.common import ClusterParams
    from flows.preflight import preflight
    from gpuforge.config import load_config

    with tempfile.TemporaryDirectory(prefix="gpuforge-bench-") as tmp:
        work = Path(tmp)
        hosts = SshHosts(work / "lab")
        hosts.up([HostSpec(f"pf-{i}", f"198.51.100.{200 + i}", 0 if i == 0 else 8) for i in range(HOSTS)])
        os.environ["GPUFORGE_STATE"] = str(work / "state")
        try:
            cfg_path = work / "config.yml"
            cfg_path.write_text(config_text(hosts.key_path))
            inventory = work / "inventory"
            write_plan(load_config(cfg_path), inventory)
            bare_env = {
                **os.environ,
                **host_key_env("off"),  # the bare side does no host-key work; the flow's side pins keys
                "ANSIBLE_SSH_CONTROL_PATH_DIR": str(work / "cp"),
                "ANSIBLE_FORKS": "16",
                "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
            }
            bare, flow = [], []
            with prefect_test_harness(server_startup_timeout=180):
                for _ in range(ROUNDS):
                    started = time.perf_counter()
                    subprocess.run(
                        [
                            str(Path(sys.executable).parent / "ansible-playbook"),
                            "-i",
                            str(inventory / "hosts.yaml"),
                            "-f",
                            "16",
                            str(REPO / "playbooks" / "preflight.yml"),
                        ],
                        env=bare_env,
                        check=True,
                        capture_output=True,
                    )
                    bare.append(time.perf_counter() - started)
                    started = time.perf_counter()
                    state = preflight(ClusterParams(config=str(cfg_path)), return_state=True)
                    flow.append(time.perf_counter() - started)
                    assert state.is_completed(), state.message
            b, f = statistics.median(bare), statistics.median(flow)
            print(
                f"preflight on {HOSTS} SSH hosts: bare ansible-playbook {b:.2f}s, gpuforge flow {f:.2f}s "
                f"(medians of {ROUNDS}, interleaved) -> overhead {100 * (f / b - 1):+.1f}% (goal <= 10%)"
            )
        finally:
            hosts.down()


if __name__ == "__main__":
    main()
