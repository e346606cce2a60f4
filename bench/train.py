"""Training-step throughput, peak memory and data-path overhead, per backbone.

    python bench/train.py                          # CPU, both backbones, 64 px, batch 32
    python bench/train.py --device cuda --img-size 218 --batch 128 --compile   # on a GPU

For each backbone, in one process each (so peak memory is that backbone's):
- ``ready``: forward + backward + Adam step on a ready normalised input tensor;
- ``cached``: the training loop's real data path first: gather uint8 crops from a
  memory-mapped packed array (as ``stages/pack.py`` writes), resize, normalise and
  augment as tensors, then the same step.
The data path's overhead is ``cached / ready - 1`` images/s (target: at most 10%).
Model and batches are channels-last (as in training); on CUDA the step runs under bf16
autocast, and ``--compile``
adds a ``torch.compile`` run. Peak memory: process max RSS on CPU,
``torch.cuda.max_memory_allocated`` on CUDA.
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


def worker(args: argparse.Namespace) -> dict:
    import numpy as np
    import torch

    from facesearch.data import AugmentConfig, augment, to_model_input
    from facesearch.losses import semi_hard_loss
    from facesearch.models import get_model

    device = torch.device(args.device)
    torch.manual_seed(0)
    cuda = device.type == "cuda"
    # A packed array of crops at the crop stage's size, memory-mapped as in training.
    n = max(512, args.batch * 4)
    path = Path(tempfile.mkdtemp()) / "train.npy"
    arr = np.lib.format.open_memmap(path, mode="w+", dtype=np.uint8, shape=(n, args.crop_size, args.crop_size, 3))
    arr[:] = np.random.default_rng(0).integers(0, 256, size=arr.shape, dtype=np.uint8)
    arr.flush()
    images = np.load(path, mmap_mode="r")
    labels = torch.arange(args.batch, device=device) // 4  # P x K = batch/4 x 4

    def run(model, source: str, steps: int) -> float:
        opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-4)
        rng = np.random.default_rng(1)
        gen = torch.Generator(device=device).manual_seed(0)
        ready = to_model_input(torch.from_numpy(np.array(images[: args.batch])), args.img_size, device, True)
        total = 0.0
        for step in range(steps + 2):  # 2 warm-up steps (allocator, compile, caches)
            if cuda:
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            if source == "cached":
                idx = np.sort(rng.choice(n, size=args.batch, replace=False))
                x = to_model_input(torch.from_numpy(images[idx]), args.img_size, device, True)
                x = augment(x, AugmentConfig(), gen)
            else:
                x = ready
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
                loss, _ = semi_hard_loss(model(x), labels)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if cuda:
                torch.cuda.synchronize()
            if step >= 2:
                total += time.perf_counter() - t0
        return steps * args.batch / total

    model = get_model(args.backbone, weights="none", trainable_layers=-1, img_size=args.img_size).to(device).train()
    model = model.to(memory_format=torch.channels_last)  # as the train stage does on every device
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    out = {"backbone": args.backbone}
    # Alternate the two sources so drift (thermal, other load) hits both alike.
    ready, cached = [], []
    for _ in range(args.repeats):
        ready.append(run(model, "ready", args.steps))
        cached.append(run(model, "cached", args.steps))
    out["ready_ips"], out["cached_ips"] = float(np.median(ready)), float(np.median(cached))
    if args.compile:
        compiled = torch.compile(model)
        out["compiled_ready_ips"] = run(compiled, "ready", args.steps)
    if cuda:
        out["peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
    else:
        out["peak_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    path.unlink()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbones", default="resnet50,mobilenet_v2")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--img-size", type=int, default=64, help="model input side, px")
    parser.add_argument("--crop-size", type=int, default=218, help="side of the packed crops, px")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=8, help="timed steps per measurement")
    parser.add_argument("--repeats", type=int, default=3, help="alternating ready/cached measurements")
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        args.backbone = args.worker
        print(json.dumps(worker(args)))
        return
    print(f"device={args.device} img_size={args.img_size} crop_size={args.crop_size} batch={args.batch}")
    for backbone in args.backbones.split(","):
        cmd = [sys.executable, __file__, "--worker", backbone, *sys.argv[1:]]
        r = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1])
        overhead = r["ready_ips"] / r["cached_ips"] - 1
        line = (f"{backbone:13s} ready {r['ready_ips']:8.1f} img/s  cached crops {r['cached_ips']:8.1f} img/s  "
                f"data-path overhead {100 * overhead:5.1f}%  peak {r['peak_mb']:.0f} MB")  # fmt: skip
        if "compiled_ready_ips" in r:
            speedup = r["compiled_ready_ips"] / r["ready_ips"]
            line += f"  compiled {r['compiled_ready_ips']:.1f} img/s ({speedup:.2f}x eager)"
        print(line, flush=True)


if __name__ == "__main__":
    main()
