"""How many CPU threads torch uses, from the CPUs this process may run on.

Inference (the embed stage, ``python -m facesearch`` commands, the photo index) uses one
thread per CPU the process may use: ``os.sched_getaffinity``, which ``taskset``, cgroup
cpusets, Slurm and container runtimes narrow, not the machine's core count. Training keeps
its fixed ``train.<backbone>.cpu_threads`` instead (float sums depend on the thread count:
:func:`facesearch.nets.training.set_deterministic`) and only warns when it exceeds the CPUs
available. How idle threads wait is set once, before torch loads, by the package itself
(``facesearch/__init__.py``: ``OMP_WAIT_POLICY=PASSIVE`` unless the user chose).
"""

from __future__ import annotations

import logging
import os

log = logging.getLogger("facesearch.threads")


def usable_cpus() -> int:
    """CPUs this process may run on (its affinity mask), at least 1.

    ``os.cpu_count()`` only where the platform has no affinity call (macOS).
    """
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:
        return max(1, os.cpu_count() or 1)


def use_usable_cpus() -> int:
    """Set torch's intra-op threads to :func:`usable_cpus` (for inference); returns the count.

    Unlike training, inference need not fix the count: measured here (torch 2.14, AVX-512),
    1 and 2 threads give bit-equal ResNet-50 and MobileNet-V2 embeddings in eval mode (the
    forward kernels split their work by output, the backward ones split sums).
    """
    import torch

    n = usable_cpus()
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)
    return n


def check_fixed_threads(threads: int, what: str) -> None:
    """Warn when a fixed thread count (training's ``cpu_threads``) exceeds the CPUs this process may use.

    Kept anyway, as the model's bytes depend on it; with passive waiting the threads share
    the CPUs at a cost in speed only.
    """
    available = usable_cpus()
    if threads > available:
        log.warning("%s uses %d threads (fixed: results depend on it) on %d usable CPU%s: slower, same result",
                    what, threads, available, "" if available == 1 else "s")  # fmt: skip
