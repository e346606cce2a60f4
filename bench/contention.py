"""A training step alone and beside a competing process, before and after the thread wait policy.

    python bench/contention.py                          # resnet50, 64 px, P x K = 8 x 4, 2 threads
    python bench/contention.py --backbone mobilenet_v2 --competitors same --steps 20

Each measurement runs in fresh processes (libgomp reads its wait policy once, when torch
loads), the train stage's step on ready tensors: forward, semi-hard loss, backward, Adam, at
``train.<backbone>.cpu_threads`` threads (2), channels-last. Two variants, same run:

- ``before``: torch imported first, with ``OMP_WAIT_POLICY`` and ``GOMP_SPINCOUNT`` unset, so
  libgomp's default holds (an idle thread spins ~300,000 iterations at every barrier);
- ``after``: the package imported first, as every entry point now does, so its default holds
  (``OMP_WAIT_POLICY=PASSIVE``: facesearch/__init__.py).

Per variant, the median seconds per step of a training process alone, then beside each
competitor: ``same`` (a second process of the same variant running the same step, as two
trainings on one machine) and ``spin`` (one pure-Python busy loop per usable CPU, any
other job). Printed: each median and its ratio to the variant's own alone time, measured
in the same run; the target is a ratio of at most 2.5 beside one competitor. A competitor
starts first and is warm before the timed process starts. Timed runs stop after ``--steps``
steps or ``--max-seconds`` (at least 3 steps), so a 20x case does not take an hour.
Measure on an otherwise quiet machine: the load average is printed first.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

WARMUP = 2  # untimed steps: allocator, oneDNN's kernel choice
WAIT_VARS = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")
VARIANTS = {
    "before": "libgomp's default (torch loaded first, wait variables unset)",
    "after": "facesearch imported first (its OMP_WAIT_POLICY=PASSIVE)",
}


def worker(args: argparse.Namespace) -> None:
    """Run training steps; print one JSON line of step times (or, ``--forever``, "ready" and loop)."""
    if args.variant == "before":
        import torch  # first: libgomp loads with the environment as the parent left it (unset)

        import facesearch  # its default comes too late to matter: the point of "before"
    else:
        import facesearch  # noqa: F401  (first, as every entry point: sets the wait policy)

        # isort: split
        import torch
    from facesearch.nets.losses import semi_hard_loss
    from facesearch.nets.models import get_model

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = get_model(args.backbone, weights="none", trainable_layers=-1, img_size=args.img_size)
    model = model.to(memory_format=torch.channels_last).train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    batch = args.p * args.k
    x = torch.randn(batch, 3, args.img_size, args.img_size).contiguous(memory_format=torch.channels_last)
    labels = torch.arange(args.p).repeat_interleave(args.k)

    def step() -> None:
        loss, _ = semi_hard_loss(model(x), labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for _ in range(WARMUP):
        step()
    if args.forever:
        print("ready", flush=True)
        while True:
            step()
    times, start = [], time.perf_counter()
    while len(times) < args.steps and (len(times) < 3 or time.perf_counter() - start < args.max_seconds):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    print(json.dumps({"step_s": times}), flush=True)


def child_env() -> dict[str, str]:
    """This environment without the wait variables: each variant decides them itself."""
    return {k: v for k, v in os.environ.items() if k not in WAIT_VARS}


def worker_cmd(args: argparse.Namespace, variant: str, forever: bool = False) -> list[str]:
    return [sys.executable, __file__, "--worker", "--variant", variant, "--backbone", args.backbone,
            "--img-size", str(args.img_size), "--p", str(args.p), "--k", str(args.k), "--threads", str(args.threads),
            "--steps", str(args.steps), "--max-seconds", str(args.max_seconds),
            *(["--forever"] if forever else [])]  # fmt: skip


def start_competitors(args: argparse.Namespace, variant: str, kind: str) -> list[subprocess.Popen]:
    """Started and warm (a training competitor has done its warm-up steps) when this returns."""
    if kind == "spin":
        from facesearch.threads import usable_cpus

        return [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(usable_cpus())]
    proc = subprocess.Popen(worker_cmd(args, variant, forever=True), env=child_env(), stdout=subprocess.PIPE,
                            text=True)  # fmt: skip
    if proc.stdout.readline().strip() != "ready":
        proc.kill()
        raise SystemExit("bench/contention.py: the competing training process failed")
    return [proc]


def timed(args: argparse.Namespace, variant: str, competitor: str | None) -> float:
    """Median seconds per step of one training process (beside ``competitor``, if any)."""
    others = start_competitors(args, variant, competitor) if competitor else []
    try:
        out = subprocess.run(worker_cmd(args, variant), env=child_env(), capture_output=True, text=True, check=True)
    finally:
        for proc in others:
            proc.kill()
            proc.wait()
    return statistics.median(json.loads(out.stdout.strip().splitlines()[-1])["step_s"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default="resnet50")
    parser.add_argument("--img-size", type=int, default=64)
    parser.add_argument("--p", type=int, default=8, help="identities per batch (params.yaml: p_identities)")
    parser.add_argument("--k", type=int, default=4, help="images per identity (params.yaml: k_images)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (params.yaml: cpu_threads)")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per run (median reported)")
    parser.add_argument("--max-seconds", type=float, default=60.0, help="a timed run stops after this (>= 3 steps)")
    parser.add_argument("--variants", default="before,after", help=f"comma-separated, of {sorted(VARIANTS)}")
    parser.add_argument("--competitors", default="same,spin", help="comma-separated: same, spin")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--forever", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--variant", default="after", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)
    from facesearch.threads import usable_cpus

    variants, competitors = args.variants.split(","), args.competitors.split(",")
    print(f"{args.backbone}, {args.img_size} px, batch {args.p * args.k} (P {args.p} x K {args.k}), {args.threads} "
          f"threads, {usable_cpus()} usable CPUs; load average before the run {os.getloadavg()[0]:.2f}")  # fmt: skip
    header = ["variant", "alone s/step"] + [h for c in competitors for h in (f"beside {c} s/step", "ratio")]
    print("| " + " | ".join(header) + " |")
    print("|" + " --- |" * len(header))
    for variant in variants:
        alone = timed(args, variant, None)
        cells = [f"{variant}: {VARIANTS[variant]}", f"{alone:.3f}"]
        for competitor in competitors:
            beside = timed(args, variant, competitor)
            cells += [f"{beside:.3f}", f"{beside / alone:.2f}x"]
        print("| " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
