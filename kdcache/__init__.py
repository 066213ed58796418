"""kdcache: the teacher runs once over augmented views; students replay them with cached soft labels."""

import os

__version__ = "0.3.0"

# OpenMP threads (torch's, and numba's in the FFCV loader) spin while they wait for work. On a machine with
# few cores shared with another process, the spinning threads burn each other's time slices: a student's
# epoch went from 2.7 s to 12.3 s next to a second training, against 2.9 s and 5.0 s with passive waiting
# (tools/bench_shared_cores.py, BENCHMARKS.md). Read when OpenMP starts, so set here, before torch is
# imported; a value the user set wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
