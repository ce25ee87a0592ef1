"""Pinned upstream versions: the defaults gpuforge installs when the config names none.

Sources: ../shared/reference/ (DeepOps 26.07 pins, Kubespray v2.31.0 defaults, GPU Operator v26.7.0,
kube-prometheus-stack 88.5.3, Slinky 1.2.1). A pin changes only in a reviewed commit, never at run time.
"""

from __future__ import annotations

KUBESPRAY_VERSION = "v2.31.0"
# Kubespray v2.31.0's newest checksums key; the lab's control plane is built at the same version.
KUBE_VERSION = "1.35.4"
# The Kubernetes versions Kubespray v2.31.0 can install: the keys of kubelet_checksums, kubeadm_checksums and
# kubectl_checksums (the same for amd64 and arm64) in roles/kubespray_defaults/vars/main/checksums.yml of its
# release tarball. Kubespray downloads nothing it has no checksum for, so any other version fails mid-install.
# Changes with KUBESPRAY_VERSION; tests/test_config.py checks it against the tarball.
KUBE_VERSIONS = (
    "1.35.4", "1.35.3", "1.35.2", "1.35.1", "1.35.0",
    "1.34.7", "1.34.6", "1.34.5", "1.34.4", "1.34.3", "1.34.2", "1.34.1", "1.34.0",
    "1.33.11", "1.33.10", "1.33.9", "1.33.8", "1.33.7", "1.33.6", "1.33.5", "1.33.4", "1.33.3", "1.33.2",
    "1.33.1", "1.33.0",
)  # fmt: skip

# service key -> list of Helm releases that service installs, in install order.
# Each release: (release name, namespace, chart repo, chart name, chart version).
CHARTS: dict[str, list[tuple[str, str, str, str, str]]] = {
    "monitoring_stack": [
        (
            "kube-prometheus-stack",
            "monitoring",
            "https://prometheus-community.github.io/helm-charts",
            "kube-prometheus-stack",
            "88.5.3",
        ),
    ],
    "gpu-operator": [
        ("gpu-operator", "gpu-operator", "https://helm.ngc.nvidia.com/nvidia", "gpu-operator", "v26.7.0"),
    ],
    "slurm": [
        ("cert-manager", "cert-manager", "oci://quay.io/jetstack/charts", "cert-manager", "v1.19.1"),
        (
            "slurm-operator-crds",
            "slinky",
            "oci://ghcr.io/slinkyproject/charts",
            "slurm-operator-crds",
            "1.2.1",
        ),
        ("slurm-operator", "slinky", "oci://ghcr.io/slinkyproject/charts", "slurm-operator", "1.2.1"),
        ("slurm", "slurm", "oci://ghcr.io/slinkyproject/charts", "slurm", "1.2.1"),
    ],
    "k8s-dashboard": [
        (
            "kubernetes-dashboard",
            "kubernetes-dashboard",
            "https://kubernetes.github.io/dashboard/",
            "kubernetes-dashboard",
            "7.13.0",
        ),
    ],
}


def release_namespace(release: str) -> str:
    """The namespace a release of gpuforge's lives in, its service enabled or not (the config cannot move one)."""
    return next(ns for charts in CHARTS.values() for name, ns, *_ in charts if name == release)


CUDA_SMOKE_IMAGE = "nvcr.io/nvidia/k8s/cuda-sample:vectoradd-cuda12.5.0-ubuntu22.04"
