"""Embedding throughput of saved models, as every search path embeds (``facesearch.nets.inference.embed_array``).

    python bench/embed.py models/dlib_resnet.pt models/mobilenet_v2.pt          # CPU, 2 threads
    python bench/embed.py teacher.pt student.pt --images data/arrays/val.npy    # real crops

Each model embeds the same images at its own input side with its own test-time views
(flip, jitters: each one more forward pass), in eval mode, batch ``--batch``. Printed per
model: images/s, forward passes per image, parameters, and the ratio of its images/s to
the first model's, measured in the same run (the first is the baseline: put the teacher
first to read a distilled student's speed-up). Each model's validation mAP recorded in its
file (train stage's kept epoch) is printed beside it, so speed and accuracy are read together.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import facesearch  # noqa: F401  (before torch: sets how its threads wait, facesearch/__init__.py)

WARMUP_BATCHES = 1  # untimed: allocator, oneDNN kernel choice


def throughput(model, images, size: int, batch: int, repeats: int) -> float:
    """Images per second of ``embed_array`` over ``images``, best of ``repeats`` timed passes."""
    import torch

    from facesearch.nets.inference import embed_array

    device = torch.device("cpu")
    embed_array(model, images[: batch * WARMUP_BATCHES], size, device, batch)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        embed_array(model, images, size, device, batch)
        best = min(best, time.perf_counter() - start)
    return len(images) / best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("models", nargs="+", help="saved model files; the first is the baseline")
    parser.add_argument("--images", help="a packed uint8 array (N, S, S, 3), e.g. data/arrays/val.npy; else random")
    parser.add_argument("--n", type=int, default=256, help="images embedded per pass (default 256)")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3, help="timed passes per model; the best counts")
    parser.add_argument("--cpu-threads", type=int, default=2)
    args = parser.parse_args()

    import numpy as np
    import torch

    from facesearch.data.packing import load_array
    from facesearch.nets.models import load_model
    from facesearch.nets.training import validation_at

    torch.set_num_threads(args.cpu_threads)
    loaded = [(path, *load_model(path)) for path in args.models]
    side = max(m.config.img_size for _, m, _ in loaded)
    if args.images:
        images = np.asarray(load_array(args.images)[: args.n])
        if images.shape[1] < side:
            raise SystemExit(f"bench/embed.py: {args.images} holds {images.shape[1]} px crops, a model reads {side}")
    else:
        images = np.random.default_rng(0).integers(0, 256, (args.n, side, side, 3), dtype=np.uint8)
    print(f"{len(images)} images of {images.shape[1]} px, batch {args.batch}, {args.cpu_threads} CPU threads")
    base = None
    for path, model, payload in loaded:
        cfg = model.config
        ips = throughput(model, images, cfg.img_size, args.batch, args.repeats)
        base = base or ips
        views = 1 + int(cfg.flip_tta) + cfg.tta_jitters
        params = sum(p.numel() for p in model.parameters())
        val = validation_at(payload.get("history", []), payload.get("best_epoch")).get("val_mAP")
        print(f"{Path(path).name:28s} {cfg.backbone:13s} {cfg.img_size:4d} px  {views:2d} views  "
              f"{params / 1e6:5.1f}M params  {ips:7.1f} img/s  {ips / base:5.2f}x the first"
              + ("" if val is None else f"  val mAP {val:.4f}"))  # fmt: skip


if __name__ == "__main__":
    main()
