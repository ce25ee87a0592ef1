"""The `gpuforge` command line: parses arguments, loads the config, hands over to a flow, the lab or the probe."""
