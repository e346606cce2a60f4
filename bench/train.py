"""Training-step throughput, peak memory and the data path's share of the step, per backbone.

    python bench/train.py                          # CPU, both backbones, 64 px, batch 32
    python bench/train.py --device cuda --img-size 218 --batch 128 --compile   # on a GPU

For each backbone, in one process each (so peak memory is that backbone's), three
sources of batches feed the same forward + backward + Adam step (channels-last, P x K
batches of 4 images per identity, semi-hard loss; bf16 autocast on CUDA):

- ``ready``: one normalised input tensor, reused: no data path at all (the baseline);
- ``prefetch``: the train stage's data path (:mod:`facesearch.nets.training`): P x K
  indices, a background thread gathering the uint8 crops from a memory-mapped packed
  array (as ``stages/pack.py`` writes) ``PREFETCH_BATCHES`` ahead, then resize,
  normalise and augment as tensors on the device;
- ``inline``: the same data path with the gather on the main thread (what the
  prefetcher saves).

Printed per source: images/s and the data path's share of the step time, split into
``wait`` (the main thread blocked on the next batch) and ``prep`` (to_model_input and
augment). ``overhead`` is ``ready / prefetch - 1`` images/s, measured in the same run;
the target is at most 10%. On CUDA the wall clock is read between
``torch.cuda.synchronize()`` calls around each timed run (the GPU's queue drained), and
``prep`` is GPU time between CUDA events recorded around it, as host timers would only
see the kernel launches; ``--compile`` adds a ``torch.compile`` run of ``ready``. Peak
memory: process max RSS on CPU, ``torch.cuda.max_memory_allocated`` on CUDA.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import facesearch  # noqa: F401  (before torch: sets how its threads wait, facesearch/__init__.py)

WARMUP = 2  # untimed steps per run: allocator, compile, caches, the prefetch queue filling
SOURCES = ("ready", "prefetch", "inline")


def worker(args: argparse.Namespace) -> dict:
    import numpy as np
    import torch

    from facesearch.nets.augment import AugmentConfig, augment
    from facesearch.nets.losses import semi_hard_loss
    from facesearch.nets.models import get_model, resolve_device
    from facesearch.nets.training import Prefetcher, identity_groups, pk_batches, read_batch
    from facesearch.nets.transforms import to_model_input
    from stages.train import PREFETCH_BATCHES

    device = resolve_device(args.device)
    cuda = device.type == "cuda"
    torch.set_num_threads(args.cpu_threads)
    torch.manual_seed(0)
    # A packed array of crops at the crop stage's size, memory-mapped as in training.
    n = max(512, args.batch * 8)
    path = Path(tempfile.mkdtemp()) / "train.npy"
    arr = np.lib.format.open_memmap(path, mode="w+", dtype=np.uint8, shape=(n, args.crop_size, args.crop_size, 3))
    arr[:] = np.random.default_rng(0).integers(0, 256, size=arr.shape, dtype=np.uint8)
    arr.flush()
    del arr
    images = np.load(path, mmap_mode="r")
    labels = np.arange(n) // 4  # identities of 4 images: P x K = batch/4 x 4
    groups = identity_groups(labels)
    aug = AugmentConfig()  # the report's recipe: flips, RandomErasing and region dropout all on

    def run(model, source: str, steps: int) -> dict:
        opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-4)
        gen = torch.Generator(device=device).manual_seed(0)
        batches = pk_batches(groups, args.batch // 4, 4, steps + WARMUP, np.random.default_rng(1))
        fixed, fixed_ids = read_batch(images, np.arange(args.batch), labels)
        ready = to_model_input(fixed, args.img_size, device, True)
        ready_ids = fixed_ids.to(device)

        def read(idx):
            return read_batch(images, idx, labels, pin=cuda)

        prefetcher = Prefetcher(batches, read, PREFETCH_BATCHES) if source == "prefetch" else None
        loader = prefetcher if prefetcher is not None else (read(idx) for idx in batches)
        wait = prep = 0.0
        events = []
        try:
            for step in range(steps + WARMUP):
                if step == WARMUP:  # the timed run starts with the GPU's queue empty
                    if cuda:
                        torch.cuda.synchronize()
                    start, wait, prep = time.perf_counter(), 0.0, 0.0
                t0 = time.perf_counter()
                if source == "ready":
                    x, ids = ready, ready_ids
                    t1 = t2 = time.perf_counter()
                else:
                    batch, ids = next(loader)
                    t1 = time.perf_counter()
                    e0 = torch.cuda.Event(enable_timing=True) if cuda else None
                    if cuda:
                        e0.record()
                    x = augment(to_model_input(batch, args.img_size, device, True), aug, gen)
                    ids = ids.to(device, non_blocking=True)
                    t2 = time.perf_counter()
                    if cuda:
                        e1 = torch.cuda.Event(enable_timing=True)
                        e1.record()
                        if step >= WARMUP:
                            events.append((e0, e1))
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
                    loss, _ = semi_hard_loss(model(x), ids)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                if step >= WARMUP:
                    wait += t1 - t0
                    prep += t2 - t1  # CPU: the work itself; CUDA: only its launches, replaced below
            if cuda:
                torch.cuda.synchronize()
            total = time.perf_counter() - start
        finally:
            if prefetcher is not None:
                prefetcher.close()
        if cuda:
            prep = sum(a.elapsed_time(b) for a, b in events) / 1000
        return {"ips": steps * args.batch / total, "wait": wait / total, "prep": prep / total}

    model = get_model(args.backbone, weights="none", trainable_layers=-1, img_size=args.img_size).to(device).train()
    model = model.to(memory_format=torch.channels_last)  # as the train stage does on every device
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    runs = {s: [] for s in SOURCES}
    # Alternate the sources so drift (thermal, other load) hits all alike.
    for _ in range(args.repeats):
        for source in SOURCES:
            runs[source].append(run(model, source, args.steps))
    out = {"backbone": args.backbone}
    for source, results in runs.items():
        best = sorted(results, key=lambda r: r["ips"])[len(results) // 2]  # the median run
        out[source] = best
    if args.compile:
        out["compiled_ready"] = run(torch.compile(model), "ready", args.steps)
    if cuda:
        out["peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
    else:
        out["peak_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    path.unlink()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbones", default="resnet50,mobilenet_v2")
    parser.add_argument("--device", default="cpu", help="cpu | cuda | auto")
    parser.add_argument("--img-size", type=int, default=64, help="model input side, px")
    parser.add_argument("--crop-size", type=int, default=218, help="side of the packed crops, px")
    parser.add_argument("--batch", type=int, default=32, help="images per step (a multiple of 4)")
    parser.add_argument("--steps", type=int, default=8, help="timed steps per measurement")
    parser.add_argument("--repeats", type=int, default=3, help="alternating measurements per source")
    parser.add_argument("--cpu-threads", type=int, default=2, help="torch threads (the train stage's cpu_threads)")
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        args.backbone = args.worker
        print(json.dumps(worker(args)))
        return
    print(f"device={args.device} img_size={args.img_size} crop_size={args.crop_size} batch={args.batch} "
          f"steps={args.steps} repeats={args.repeats} cpu_threads={args.cpu_threads}")  # fmt: skip
    worst = 0.0
    for backbone in args.backbones.split(","):
        cmd = [sys.executable, __file__, "--worker", backbone, *sys.argv[1:]]
        r = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1])
        overhead = r["ready"]["ips"] / r["prefetch"]["ips"] - 1
        worst = max(worst, overhead)
        line = f"{backbone:13s} ready {r['ready']['ips']:7.1f} img/s"
        for source in ("prefetch", "inline"):
            s = r[source]
            line += (f" | {source} {s['ips']:7.1f} img/s, data path {100 * (s['wait'] + s['prep']):4.1f}% of the step "
                     f"(wait {100 * s['wait']:4.1f}%, prep {100 * s['prep']:4.1f}%)")  # fmt: skip
        line += f" | overhead {100 * overhead:5.1f}%  peak {r['peak_mb']:.0f} MB"
        if "compiled_ready" in r:
            speedup = r["compiled_ready"]["ips"] / r["ready"]["ips"]
            line += f"  compiled {r['compiled_ready']['ips']:.1f} img/s ({speedup:.2f}x eager)"
        print(line, flush=True)
    print(f"worst overhead (ready / prefetch - 1): {100 * worst:.1f}% (target <= 10%)")


if __name__ == "__main__":
    main()
