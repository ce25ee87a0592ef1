import sys

from gpuforge_probe.probe import main

sys.exit(main())
