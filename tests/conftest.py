"""Suite-wide settings, applied before any test module imports torch."""

import os

# The suite's torch work (in-process engines, the servers it starts, another suite on the same
# cores) shares 2 cores: OpenMP's default spin-wait lets one process's idle threads burn the
# cores another needs. Passive waits, as coserve.launch gives every server it starts.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
