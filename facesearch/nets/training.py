"""The training loop's machinery: batch sampling, background reads, the learning-rate
schedule, per-step statistics kept on the device, checkpoints and the curves' logger.

``stages/train.py`` is the loop that calls these: functions and small classes that
take what they act on as arguments (no paths or params read behind the caller's back),
each tested on its own in ``tests/test_training.py``.

Sampling under DDP: an epoch's batches are one sequence, drawn from one stream per
epoch that every process seeds alike; process ``r`` of ``W`` takes batches ``r, r+W,
r+2W, ...`` of it. So ``W`` processes together train on exactly the batches one
process would draw in ``W`` times as many steps (the offline triplets: each once
per pass, never on two processes), and a single process draws what it always drew.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import queue
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from unittest import mock

import numpy as np
import torch
import torch.distributed as dist

from facesearch.io import atomic_path
from facesearch.threads import check_fixed_threads

log = logging.getLogger(__name__)


# ---------------------------------------------------------------- sampling ---
def identity_groups(labels: np.ndarray, min_size: int = 2) -> list[np.ndarray]:
    """Row indices per identity (sorted by identity) for identities with >= ``min_size`` rows."""
    order = np.argsort(labels, kind="stable")
    _, starts = np.unique(labels[order], return_index=True)
    groups = np.split(order, starts[1:])
    return [g for g in groups if len(g) >= min_size]


def pk_batch(groups: list[np.ndarray], p: int, k: int, rng: np.random.Generator) -> np.ndarray:
    """P identities x K images each (images repeat only when an identity has fewer than K)."""
    chosen = rng.choice(len(groups), size=min(p, len(groups)), replace=False)
    return np.concatenate([rng.choice(groups[c], size=k, replace=len(groups[c]) < k) for c in chosen])


def epoch_steps(items: int, batch: int, world: int = 1, steps_per_epoch: int = 0) -> int:
    """Optimizer steps per epoch: ``steps_per_epoch``, or (0) one pass over ``items`` by all processes together."""
    return steps_per_epoch or max(1, items // (batch * world))


def epoch_streams(seed: int, epoch: int, world: int = 1) -> tuple[np.random.Generator, list[int]]:
    """The epoch's sampling stream (the same on every process) and one augmentation seed per process.

    Process 0's seed is the stream's first draw, as it always was for a single
    process (the key ``[seed, epoch]`` seeds what ``[seed, epoch, 0]`` did:
    SeedSequence pads a short key with zeros); process ``r > 0`` draws its seed
    from its own key ``[seed, epoch, r]``. So the stream's batches after that
    draw are the same whatever the process count.
    """
    rng = np.random.default_rng([seed, epoch])
    first = int(rng.integers(2**62))
    return rng, [first] + [int(np.random.default_rng([seed, epoch, r]).integers(2**62)) for r in range(1, world)]


def pk_batches(
    groups: list[np.ndarray], p: int, k: int, steps: int, rng: np.random.Generator, rank: int = 0, world: int = 1
) -> Iterator[np.ndarray]:
    """Process ``rank``'s ``steps`` P x K batches: each step draws all processes' batches, keeps its own."""
    for _ in range(steps):
        drawn = [pk_batch(groups, p, k, rng) for _ in range(world)]
        yield drawn[rank]


def triplet_batches(
    triplets: np.ndarray, batch: int, steps: int, rng: np.random.Generator, rank: int = 0, world: int = 1
) -> Iterator[np.ndarray]:
    """Process ``rank``'s ``steps`` batches of offline (anchor, positive, negative) row triplets.

    One shuffled pass, dealt out in turn; a batch's rows are its anchors, then
    its positives, then its negatives. Past the end the pass wraps around.
    """
    order = rng.permutation(len(triplets))
    for step in range(steps):
        first = (step * world + rank) * batch
        yield triplets[order[(np.arange(batch) + first) % len(order)]].T.reshape(-1)


def read_batch(
    images: np.ndarray, idx: np.ndarray, labels: np.ndarray | None = None, pin: bool = False
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Rows ``idx`` (in that order) of a memory-mapped uint8 (N, H, W, 3) array, and their labels.

    ``pin``: in page-locked memory, so the copy to the GPU runs asynchronously.
    """
    uniq, inverse = np.unique(idx, return_inverse=True)  # sorted reads are kind to a memory map
    batch = torch.from_numpy(np.asarray(images[uniq])[inverse])
    ids = None if labels is None else torch.from_numpy(labels[idx])
    if pin:
        batch, ids = batch.pin_memory(), None if ids is None else ids.pin_memory()
    return batch, ids


class Prefetcher:
    """Iterates ``read(item)`` for each item of ``items``, computed ``depth`` items ahead in a thread.

    The thread reads the next batches (memory-map page faults, the gather) while
    the caller's step runs; numpy and torch release the GIL for both. The order is
    that of ``items``, so a seeded sampler stays reproducible; an exception in the
    thread (the sampler's, the read's) is raised by the ``next`` that would have
    returned its item. Use it as a context manager: leaving early stops the thread.
    """

    _END = object()

    def __init__(self, items: Iterable, read: Callable, depth: int = 2):
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._fill, args=(iter(items), read), daemon=True)
        self._thread.start()

    def _put(self, value) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(value, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _fill(self, items: Iterator, read: Callable) -> None:
        try:
            for item in items:
                if not self._put(("item", read(item))):
                    return
            self._put(("end", None))
        except BaseException as exc:  # KeyboardInterrupt too: the main thread re-raises it
            self._put(("raise", exc))

    def __iter__(self) -> Prefetcher:
        return self

    def __next__(self):
        kind, value = self._queue.get()
        if kind == "item":
            return value
        self._queue.put((kind, value))  # a later next() ends (or fails) the same way
        if kind == "raise":
            raise value
        raise StopIteration

    def close(self) -> None:
        self._stop.set()
        self._thread.join()

    def __enter__(self) -> Prefetcher:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# ---------------------------------------------------------------- schedule ---
def lr_factor(step: int, total: int, warmup: int) -> float:
    """Linear warm-up to 1, then cosine decay to 0 at ``total`` steps."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def best_epoch(history: list[dict], keep: str = "best") -> int:
    """The epoch with the highest validation mAP (the earliest of equals), the start included.

    ``keep="last"`` returns the final epoch whatever validation says (a fixed
    training budget; also how a test sees what training did).

    The starting network (epoch -1: the pretrained weights, or the random
    initialisation) is a candidate too: when no epoch of fine-tuning improves
    the validation identities, the stage keeps what it started from rather than
    a model that validation says is worse (early stopping at zero). Without
    validation scores (no val identities: mAP is NaN) the last epoch wins.
    """
    if keep not in ("best", "last"):
        raise ValueError(f"train param keep: {keep!r} is not best or last")
    if not history:
        return -1
    epochs = list(history)
    scores = [r.get("val_mAP", math.nan) for r in epochs]
    if keep == "last" or all(math.isnan(v) for v in scores):
        return epochs[-1]["epoch"]
    best = max(range(len(epochs)), key=lambda i: (-math.inf if math.isnan(scores[i]) else scores[i], -i))
    return epochs[best]["epoch"]


def validation_at(history: list[dict], epoch: int | None) -> dict[str, float]:
    """The ``val_*`` scores an epoch's history record holds (the kept one's, say); empty if none has it."""
    return {k: v for r in history if r["epoch"] == epoch for k, v in r.items() if k.startswith("val_")}


# ------------------------------------------------------------- step stats ---
class StepStats:
    """One epoch's per-step scalars, stored where the step computed them.

    ``add`` writes a device tensor with a device-side copy and a Python float
    with a fill: no host sync either way. The host reads them back once per
    epoch (:meth:`means`), or when asked for a running mean (a progress bar).
    Stored as float32: a step's float32 loss is kept exactly.
    """

    def __init__(self, names: Iterable[str], steps: int, device: torch.device | str = "cpu"):
        self.names = tuple(names)
        self.values = torch.zeros(len(self.names), steps, dtype=torch.float32, device=device)
        self.n = 0

    def add(self, **values: torch.Tensor | float) -> None:
        for i, name in enumerate(self.names):
            value = values[name]
            self.values[i, self.n] = value.detach() if isinstance(value, torch.Tensor) else value
        self.n += 1

    def running_mean(self, name: str) -> float:
        """The mean so far of ``name``: one host sync."""
        return float(self.values[self.names.index(name), : self.n].mean()) if self.n else math.nan

    def means(self, world: int = 1) -> dict[str, float]:
        """Each name's mean over the epoch's steps, of all ``world`` processes (a collective when > 1).

        Summed in float64 by numpy, as a mean of the steps' Python floats would be.
        """
        values = self.values[:, : self.n].contiguous()
        if world > 1:
            parts = [torch.empty_like(values) for _ in range(world)]
            dist.all_gather(parts, values)
            values = torch.cat(parts, dim=1)
        host = values.double().cpu().numpy()
        return {name: float(np.mean(host[i])) for i, name in enumerate(self.names)}


# ------------------------------------------------------- processes, state ---
def set_deterministic(cpu_threads: int) -> None:
    """Same params and inputs, same model bytes, on CPU (docs/pipeline.md, "Train": reproducibility).

    The thread count is a param, not the machine's core count: the CPU kernels
    (oneDNN convolutions, MKL matmuls) split their float sums by thread, so 1 and
    2 threads give different weights for every backbone (measured), while the
    same count gives the same bits run after run.
    """
    check_fixed_threads(cpu_threads, "training")
    torch.set_num_threads(cpu_threads)
    torch.use_deterministic_algorithms(True, warn_only=True)  # warn, not fail, for ops with no such kernel
    if torch.cuda.is_available():
        # cuBLAS needs a fixed workspace to be deterministic; must be set before its first use.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.backends.cudnn.benchmark = False


@dataclass(frozen=True)
class Dist:
    """This process's place among those torchrun started (one process: rank 0 of 1)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> Dist:
        """Read from torchrun's RANK, WORLD_SIZE and LOCAL_RANK."""
        env = os.environ if env is None else env
        return cls(int(env.get("RANK", "0")), int(env.get("WORLD_SIZE", "1")), int(env.get("LOCAL_RANK", "0")))


def join_process_group(ctx: Dist, device: torch.device) -> None:
    """Join torchrun's process group (NCCL between GPUs, gloo on CPU); nothing for one process."""
    if ctx.world > 1:
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")


def input_fingerprint(paths: list[Path]) -> dict[str, str]:
    """Cheap identity of the training inputs: content hash of tables, size+mtime of big arrays.

    Hashing a 20 GB array at every start would cost minutes; the pack stage
    rewrites the arrays whole, so a new array always has a new mtime.
    """
    out = {}
    for path in paths:
        if path.suffix == ".parquet":
            out[path.name] = hashlib.sha256(path.read_bytes()).hexdigest()
        else:
            st = path.stat()
            out[path.name] = f"{st.st_size}:{st.st_mtime_ns}"
    return out


def run_digest(params: dict, inputs: dict[str, str], code: dict[str, str], crop: dict) -> str:
    """Identifies the run a checkpoint belongs to: these params and crop settings,
    on these inputs (:func:`input_fingerprint`), with this code (file -> sha256,
    :func:`facesearch.provenance.code_fingerprint`)."""
    d = dict(params) | {"inputs": inputs, "code": code, "crop": crop}
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


def save_checkpoint(
    path: Path, model, optimizer, scheduler, epoch: int, digest: str, history: list, best_state: dict
) -> None:
    payload = {
        "model": model.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
        "epoch": epoch, "digest": digest, "history": history, "best_state": best_state,
    }  # fmt: skip
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)


def load_checkpoint(path: Path, digest: str) -> dict | None:
    """The checkpoint at ``path`` if it belongs to this run (params, inputs, code), else None."""
    if not path.is_file():
        return None
    try:
        payload = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # a checkpoint from another torch version, a damaged file, ...
        log.warning("ignoring unreadable checkpoint %s (%s)", path, exc)
        return None
    if payload.get("digest") != digest:
        log.info("checkpoint %s is from other params, inputs or code: starting fresh", path)
        return None
    return payload


# ------------------------------------------------------------------ curves ---
def open_live(path: str):
    """A dvclive logger at ``path`` that never takes the training run down with it.

    dvclive 3.49 reads HEAD before checking whether the repository has any
    commit, so in a fresh ``git init`` it raises scmrepo's SCMError; the curves
    do not need git, so then we log without dvclive's git integration.
    """
    import dvclive.live
    from dvclive import Live  # imported here: only rank 0 logs

    try:
        return Live(path, resume=False, save_dvc_exp=False, dvcyaml=False)
    except Exception as exc:  # scmrepo.exceptions.SCMError is not importable from dvclive
        log.warning("dvclive could not read the git repository (%s); logging without it", exc)
        with mock.patch.object(dvclive.live, "get_dvc_repo", return_value=None):
            return Live(path, resume=False, save_dvc_exp=False, dvcyaml=False)


LIVE_NAMES = {"loss": "train/loss", "active": "train/active_triplets", "spread": "train/embedding_spread",
              "fallback": "train/semi_hard_fallback", "lr": "train/lr"}  # fmt: skip


def log_record(live, record: dict) -> None:
    """One dvclive step per epoch record (step 0: the untrained network)."""
    for key, value in record.items():
        if key in LIVE_NAMES:
            live.log_metric(LIVE_NAMES[key], value)
        elif key.startswith("val_"):
            live.log_metric(f"val/{key[4:]}", value)
    live.next_step()
