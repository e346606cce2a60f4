"""facesearch: face image retrieval as a staged, reproducible DVC pipeline.

Code shared by several stages (``stages/``) and the app lives here; every
module is import-safe (no work at import time), with one deliberate exception
below: importing the package sets how torch's CPU threads wait.
"""

import os

__version__ = "0.1.0"

# Why at import, and here: torch's CPU thread pool is GNU OpenMP (libgomp, shipped in torch's
# wheel; MKL's matmuls and oneDNN's convolutions run on the same pool), and libgomp reads its wait
# policy from the environment once, when `import torch` loads it; torch.set_num_threads cannot
# change it later. Unset, an idle thread spins (~300,000 iterations) at every barrier before it
# sleeps: alone that saves a wake-up, but beside another busy process the thread a barrier waits
# for is off the CPU while its partner spins away the time slice, and two 2-thread trainings on
# 2 cores each ran ~20x slower (bench/contention.py). PASSIVE sleeps at once. Every entry point
# imports this package before torch: `python -m facesearch`, the app (app/main.py imports
# facesearch.gallery.app_core), `python -m stages.*` (stages/__init__.py imports facesearch first) and
# bench/*.py. A value the user set is kept; it changes only how threads wait, never what they
# compute: results are the same bytes either way.
if "GOMP_SPINCOUNT" not in os.environ:
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
