"""Stage ``train@<backbone>``: fine-tune one backbone into a face embedding.

    python -m stages.train --backbone mobilenet_v2 --split data/split --arrays data/arrays \
        --out models/mobilenet_v2.pt --checkpoint models/checkpoints/mobilenet_v2.ckpt \
        --live metrics/train/mobilenet_v2

Reads ``params.yaml: train.<backbone>``. Losses: the report's offline triplets
(``loss: triplet``) or P x K batches with online ``semi_hard`` / ``batch_hard``
mining. GPU first (bf16 autocast, channels_last, optional ``torch.compile``),
CPU for small runs; several GPUs with ``torchrun --nproc_per_node N -m
stages.train ...`` (DDP; gloo on CPU). A checkpoint is written atomically after
every epoch and a killed run resumes from it when its params, inputs and code
are unchanged; a finished run deletes it. Curves (loss, share of active
triplets, Rank-1/mAP on the validation identities) are logged with dvclive.

Validation is retrieval among the split's validation identities (people in
neither train nor test), every image querying the others; the model saved is
the one of the epoch with the best validation mAP, and the file records which
epoch that was, the preprocessing its crops had (``params.yaml: crop``, see
:mod:`facesearch.contract`) and the train and val identities. The test
identities (query/gallery) are never read here.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from unittest import mock

import numpy as np
import pandas as pd
import torch
import torch.distributed as dist
from tqdm import tqdm

from facesearch import manifest as M
from facesearch.contract import crop_params, identities_record, preprocessing_record
from facesearch.data import AugmentConfig, augment, embed_array, to_model_input
from facesearch.faces import FaceConfig
from facesearch.io import atomic_path
from facesearch.losses import MINING, offline_triplet_loss, pairwise_distances
from facesearch.models import ModelConfig, save_model, seeded_model, trainable_parameters
from facesearch.packing import load_array
from facesearch.params import load_params
from facesearch.provenance import code_fingerprint
from facesearch.retrieval import leave_one_out_metrics

log = logging.getLogger("facesearch.train")

# The repository whose stages/train.py and facesearch modules this run executes: their
# hashes are part of the resume key, so a checkpoint of older code is never resumed.
CODE_ROOT = Path(__file__).resolve().parents[1]
SCRIPT = "stages/train.py"


@dataclass(frozen=True)
class TrainConfig:
    """``params.yaml: train.<backbone>``; see the comments there for meaning and units.

    The defaults are library defaults (the report's GPU recipe); the pipeline
    passes every key from params.yaml, whose sample values differ on purpose.
    """

    weights: str = "imagenet"
    trainable_layers: int = 10
    embedding_dim: int = 128
    normalize: bool = True
    img_size: int = 218
    loss: str = "semi_hard"  # triplet | semi_hard | batch_hard
    margin: float = 0.2
    soft_margin: bool = False
    semi_hard_epochs: int = 1  # batch_hard only: semi-hard mining for these first epochs
    collapse_spread: float = 0.0  # batch_hard only: below this mean pairwise distance, mine semi-hard
    p_identities: int = 16
    k_images: int = 4
    batch_triplets: int = 32
    epochs: int = 10
    steps_per_epoch: int = 0  # 0: one pass over the images (P x K) or the triplets
    lr: float = 3e-4
    weight_decay: float = 1e-4
    warmup_steps: int = 50
    seed: int = 0
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    device: str = "auto"  # auto | cpu | cuda
    amp: bool = True  # bf16 autocast on CUDA
    channels_last: bool = True
    compile: bool = False
    eval_batch: int = 128
    cpu_threads: int = 2  # torch.set_num_threads: results depend on it (see set_deterministic)
    keep: str = "best"  # best (validation mAP, the start included) | last (the final epoch)

    @classmethod
    def from_params(cls, params: dict) -> TrainConfig:
        params = dict(params)
        aug = dict(params.pop("augment", {}))
        for key in ("erase_scale", "erase_ratio"):
            if key in aug:
                aug[key] = tuple(aug[key])
        unknown = set(params) - {f for f in cls.__dataclass_fields__}
        if unknown:
            raise ValueError(f"unknown train params {sorted(unknown)}")
        for name, f in cls.__dataclass_fields__.items():
            # Otherwise a word where a number belongs fails deep inside the optimiser.
            if f.type == "float" and isinstance(params.get(name), str):
                raise ValueError(f"train param {name}: {params[name]!r} is not a number")
        cfg = cls(**params, augment=AugmentConfig(**aug))
        best_epoch([], cfg.keep)  # a bad value fails now, not after the last epoch
        return cfg

    def digest(self, inputs: dict[str, str] | None = None, code: dict[str, str] | None = None,
               crop: dict | None = None) -> str:  # fmt: skip
        """Identifies the run a checkpoint belongs to: these params and crop settings,
        on these inputs, with this code (file -> sha256, :func:`code_fingerprint`).

        Device and compile settings are excluded: a run may resume elsewhere.
        """
        d = asdict(self)
        for key in ("device", "compile", "eval_batch"):
            d.pop(key)
        d |= {"inputs": inputs or {}, "code": code or {}, "crop": crop or {}}
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


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


def check_crops(table: pd.DataFrame, face: FaceConfig) -> None:
    """The packed crops must be those ``params.yaml: crop`` describes, or the model file would lie.

    Their size is checked by ``load_array(crop_side=...)``: the arrays are packed at the input side.
    """
    aligns = set(table[M.ALIGN].dropna())
    if aligns - {face.alignment}:
        raise SystemExit(f"train: crops were cut with align {sorted(aligns)} but crop settings say "
                         f"{face.alignment!r}: re-run crop and pack (dvc repro)")  # fmt: skip


def set_deterministic(cpu_threads: int) -> None:
    """Same params and inputs, same model bytes, on CPU (README "Train", Reproducibility).

    The thread count is a param, not the machine's core count: the CPU kernels
    (oneDNN convolutions, MKL matmuls) split their float sums by thread, so 1 and
    2 threads give different weights for every backbone (measured), while the
    same count gives the same bits run after run.
    """
    torch.set_num_threads(cpu_threads)
    torch.use_deterministic_algorithms(True, warn_only=True)  # warn, not fail, for ops with no such kernel
    if torch.cuda.is_available():
        # cuBLAS needs a fixed workspace to be deterministic; must be set before its first use.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.backends.cudnn.benchmark = False


# ----------------------------------------------------------------- devices ---
@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup_distributed(device_kind: str) -> Dist:
    """Join the process group when started by torchrun (WORLD_SIZE > 1)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    backend = "nccl" if device_kind == "cuda" else "gloo"
    dist.init_process_group(backend=backend)
    return Dist(rank=dist.get_rank(), world=world, local_rank=int(os.environ.get("LOCAL_RANK", "0")))


def pick_device(name: str, ctx: Dist) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit("train: device cuda requested but no CUDA device is available")
        torch.cuda.set_device(ctx.local_rank)
        return torch.device("cuda", ctx.local_rank)
    return torch.device("cpu")


# ---------------------------------------------------------------- training ---
def compute_loss(model, x, labels, cfg: TrainConfig, epoch: int, triplet_mode: bool):
    """Loss and stats for one batch: ``active`` triplets, embedding ``spread``, ``fallback`` step."""
    emb = model(x)
    spread = float(pairwise_distances(emb.detach().float()).mean())
    if triplet_mode:
        a, p, n = emb.chunk(3)
        loss, stats = offline_triplet_loss(a, p, n, cfg.margin, cfg.soft_margin)
        return loss, {**stats, "spread": spread, "fallback": 0.0}
    mining, fallback = cfg.loss, 0.0
    if mining == "batch_hard" and epoch < cfg.semi_hard_epochs:
        mining = "semi_hard"  # anti-collapse: easier negatives first
    elif mining == "batch_hard" and spread < cfg.collapse_spread:
        # Anti-collapse guard: the batch's embeddings are closing in on one point,
        # which batch-hard mining drives to a total collapse; semi-hard negatives
        # push them apart again.
        mining, fallback = "semi_hard", 1.0
    loss, stats = MINING[mining](emb, labels, cfg.margin, cfg.soft_margin)
    return loss, {**stats, "spread": spread, "fallback": fallback}


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


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", required=True)
    parser.add_argument("--split", required=True, help="folder with train/val/triplets .parquet")
    parser.add_argument("--arrays", required=True, help="folder with the packed train/val .npy")
    parser.add_argument("--out", required=True, help="the trained model, models/<backbone>.pt")
    parser.add_argument("--checkpoint", required=True, help="resumable per-epoch checkpoint")
    parser.add_argument("--live", required=True, help="dvclive folder for metrics and curves")
    parser.add_argument("--params", default="params.yaml")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    args = parse_args(argv)
    params = load_params(args.params)
    cfg = TrainConfig.from_params(params["train"][args.backbone])
    face = FaceConfig.from_params(params["crop"])
    set_deterministic(cfg.cpu_threads)
    ctx = setup_distributed("cuda" if cfg.device != "cpu" and torch.cuda.is_available() else "cpu")
    device = pick_device(cfg.device, ctx)
    try:
        train(args, cfg, face, ctx, device)
    finally:
        if ctx.world > 1:
            dist.destroy_process_group()


def train(args: argparse.Namespace, cfg: TrainConfig, face: FaceConfig, ctx: Dist, device: torch.device) -> None:
    split, arrays = Path(args.split), Path(args.arrays)
    train_df = pd.read_parquet(split / "train.parquet")
    val_df = pd.read_parquet(split / "val.parquet")
    train_img = load_array(arrays / "train.npy", len(train_df), crop_side=face.size, min_side=cfg.img_size)
    val_img = load_array(arrays / "val.npy", len(val_df), crop_side=face.size, min_side=cfg.img_size)
    check_crops(train_df, face)
    labels = train_df[M.IDENTITY].to_numpy(dtype=np.int64)
    aligned = train_df[M.ALIGN].str.startswith("landmarks").all()
    if args.backbone == "dlib_resnet" and cfg.weights != "none" and not aligned:
        # It runs, but dlib's network was trained on aligned chips: square crops cost it accuracy.
        log.warning("dlib_resnet on unaligned crops: set crop.detector dlib_hog, crop.align landmarks, crop.size 150")
    triplet_mode = cfg.loss == "triplet"
    if triplet_mode:
        trip = pd.read_parquet(split / "triplets.parquet")
        row = {p: i for i, p in enumerate(train_df[M.CROP_PATH])}
        triplets = np.stack([trip[c].map(row).to_numpy(dtype=np.int64) for c in (M.ANCHOR, M.POSITIVE, M.NEGATIVE)], 1)
        steps = cfg.steps_per_epoch or max(1, len(triplets) // cfg.batch_triplets)
    elif cfg.loss in MINING:
        groups = identity_groups(labels)
        if len(groups) < 2:
            raise SystemExit("train: P x K sampling needs at least two identities with two images")
        steps = cfg.steps_per_epoch or max(1, len(train_df) // (cfg.p_identities * cfg.k_images))
    else:
        raise SystemExit(f"train: unknown loss {cfg.loss!r}; choose triplet, semi_hard or batch_hard")

    # Seeded build: the untrained network ("before fine-tuning") is reproducible
    # from the saved config and seed (see facesearch.models.seeded_model).
    model_config = ModelConfig(
        args.backbone, weights=cfg.weights, embedding_dim=cfg.embedding_dim, normalize=cfg.normalize,
        trainable_layers=cfg.trainable_layers, img_size=cfg.img_size,
    )  # fmt: skip
    model = seeded_model(model_config, cfg.seed).to(device)
    channels_last = cfg.channels_last  # NHWC pays on CUDA and on CPU (oneDNN) alike
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    n_trainable = trainable_parameters(model)
    if ctx.main:
        log.info("%s: %d trainable of %d parameters (last %s layers), %d steps/epoch on %s x%d",
                 args.backbone, n_trainable, sum(p.numel() for p in model.parameters()), cfg.trainable_layers,
                 steps, device, ctx.world)  # fmt: skip
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    total = cfg.epochs * steps
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, total, cfg.warmup_steps))

    start_epoch, history, best_state = 0, [], None
    ckpt_path = Path(args.checkpoint)
    inputs = input_fingerprint([split / "train.parquet", split / "val.parquet", split / "triplets.parquet",
                                arrays / "train.npy", arrays / "val.npy"])  # fmt: skip
    digest = cfg.digest(inputs, code_fingerprint(SCRIPT, CODE_ROOT), crop_params(face))
    ckpt = load_checkpoint(ckpt_path, digest)
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        start_epoch, history, best_state = ckpt["epoch"] + 1, ckpt["history"], ckpt["best_state"]
        if ctx.main:
            log.info("resuming from %s after epoch %d", ckpt_path, ckpt["epoch"])

    net = model
    if ctx.world > 1:
        ids = [device.index] if device.type == "cuda" else None
        net = torch.nn.parallel.DistributedDataParallel(model, device_ids=ids)
    if cfg.compile:
        net = torch.compile(net)

    def validate() -> dict[str, float]:
        """Rank-k and mAP among the validation identities' images (each queries the rest)."""
        emb = embed_array(model, val_img, cfg.img_size, device, cfg.eval_batch, cfg.amp, channels_last)
        return leave_one_out_metrics(emb, val_df[M.IDENTITY].to_numpy())

    live = None
    if ctx.main:
        # Always a fresh log: DVC removes the old one before the stage runs, and
        # a resumed run replays the checkpoint's history so the curves are whole.
        live = open_live(args.live)
        if start_epoch == 0:
            # Step 0: the untrained network, the baseline the curves start from.
            base = validate()
            history.append({"epoch": -1, **{f"val_{k}": v for k, v in base.items()}})
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}  # the start is a candidate
        for record in history:
            log_record(live, record)

    use_amp = cfg.amp and device.type == "cuda"
    for epoch in range(start_epoch, cfg.epochs):
        rng = np.random.default_rng([cfg.seed, epoch, ctx.rank])
        gen = torch.Generator(device=device).manual_seed(int(rng.integers(2**62)))
        order = rng.permutation(len(triplets)) if triplet_mode else None
        net.train()
        losses, active, spread, fallback = [], [], [], []
        bar = tqdm(range(steps), desc=f"{args.backbone} epoch {epoch + 1}/{cfg.epochs}", disable=not ctx.main,
                   unit="step")  # fmt: skip
        for step in bar:
            if triplet_mode:
                sel = triplets[order[(np.arange(cfg.batch_triplets) + step * cfg.batch_triplets) % len(order)]]
                idx, batch_labels = sel.T.reshape(-1), None  # anchors, then positives, then negatives
            else:
                idx = pk_batch(groups, cfg.p_identities, cfg.k_images, rng)
                batch_labels = torch.from_numpy(labels[idx]).to(device)
            uniq, inverse = np.unique(idx, return_inverse=True)  # sorted reads are kind to a memory map
            batch = torch.from_numpy(np.ascontiguousarray(train_img[uniq]))[torch.from_numpy(inverse)]
            x = augment(to_model_input(batch, cfg.img_size, device, channels_last), cfg.augment, gen)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
                loss, stats = compute_loss(net, x, batch_labels, cfg, epoch, triplet_mode)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            losses.append(loss.item())
            active.append(stats["active"])
            spread.append(stats["spread"])
            fallback.append(stats["fallback"])
            bar.set_postfix(loss=f"{np.mean(losses):.4f}", active=f"{np.mean(active):.2f}")
        if ctx.main:
            val = validate()
            record = {"epoch": epoch, "loss": float(np.mean(losses)), "active": float(np.mean(active)),
                      "spread": float(np.mean(spread)), "fallback": float(np.mean(fallback)),
                      "lr": scheduler.get_last_lr()[0], **{f"val_{k}": v for k, v in val.items()}}  # fmt: skip
            history.append(record)
            log_record(live, record)
            log.info("epoch %d: %s", epoch + 1, {k: round(v, 4) for k, v in record.items() if k != "epoch"})
            if best_epoch(history, cfg.keep) == epoch:
                # A copy: the live tensors keep changing in the next epoch's steps.
                best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
            save_checkpoint(ckpt_path, model, optimizer, scheduler, epoch, digest, history, best_state)
        if ctx.world > 1:
            dist.barrier()  # nobody starts the next epoch before the checkpoint is safe

    if ctx.main:
        best = best_epoch(history, cfg.keep)
        model.load_state_dict(best_state)
        best_val = {k: v for r in history if r["epoch"] == best for k, v in r.items() if k.startswith("val_")}
        save_model(args.out, model, extra={
            "train_config": asdict(cfg), "history": history, "trainable_parameters": n_trainable,
            "best_epoch": best, "preprocessing": preprocessing_record(face, cfg.img_size),
            "identities": identities_record(train_df[M.IDENTITY], val_df[M.IDENTITY]),
        })  # fmt: skip
        live.summary["best"] = {"epoch": best, "val": {k[4:]: v for k, v in best_val.items()}}
        live.end()
        # The model is safe: a checkpoint left behind would only be stale state.
        ckpt_path.unlink(missing_ok=True)
        chosen = f"epoch {best + 1} of {cfg.epochs}" if best >= 0 else "the starting network: no epoch improved it"
        log.info("wrote %s (%s, best validation mAP %.4f)", args.out, chosen, best_val.get("val_mAP", math.nan))


if __name__ == "__main__":
    main()
