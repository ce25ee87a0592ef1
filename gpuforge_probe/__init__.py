"""The node GPU probe: NVML readings judged by gpuforge.health, served under dcgm-exporter's metric names.

It runs on the GPU nodes (a DaemonSet, or Slurm's HealthCheckProgram); the core gpuforge package never imports it.
"""
