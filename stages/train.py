"""Stage ``train@<backbone>``: fine-tune one backbone into a face embedding.

    python -m stages.train --backbone mobilenet_v2 --split data/split --arrays data/arrays/mobilenet_v2 \
        --out models/mobilenet_v2.pt --checkpoint models/checkpoints/mobilenet_v2.ckpt \
        --live metrics/train/mobilenet_v2

Reads ``params.yaml: train.<backbone>``. Losses: the report's offline triplets
(``loss: triplet``) or P x K batches with online ``semi_hard`` / ``batch_hard``
mining, or ``loss: distill`` with ``--teacher models/dlib_resnet.pt``: the
backbone (the student) learns to embed each augmented training crop where a
saved model (the teacher) embeds the same view, on P x K batches of the train
crops (:func:`facesearch.nets.losses.distillation_loss`). The teacher's validation
score is recorded beside the student's, and the student counts as having seen
every identity its teacher saw. GPU first (bf16 autocast, channels_last, optional ``torch.compile``),
CPU for small runs; several GPUs with ``torchrun --nproc_per_node N -m
stages.train ...`` (DDP; gloo on CPU), where an epoch of ``steps_per_epoch: 0``
is still one pass over the data: each of the N processes takes every Nth batch.
A checkpoint is written atomically after every epoch and a killed run resumes
from it when its params, inputs and code are unchanged; a finished run deletes
it. Curves (loss, share of active triplets, Rank-1/mAP on the validation
identities) are logged with dvclive.

Validation is retrieval among the split's validation identities (people in
neither train nor test), every image querying the others; the model saved is
the one of the epoch with the best validation mAP, and the file records which
epoch that was, the preprocessing its crops had (``params.yaml: crop``, see
:mod:`facesearch.nets.contract`), the train and val identities, and its verdict
threshold: the cosine similarity at which ``params.yaml: verification.far`` of
the validation identities' impostor pairs (different people) pass
(:func:`facesearch.retrieval.verification.calibrate`, with the saved weights, on unit-length
embeddings also under ``normalize: false``, as every verdict compares them). The test
identities (query/gallery) are never read here.

The loop is written for an accelerator: the next batches are read from the
memory-mapped arrays in a background thread (:class:`facesearch.nets.training.Prefetcher`,
pinned for an asynchronous copy on CUDA) while the current step runs, and the
step's loss and statistics stay on the device until the epoch ends
(:class:`facesearch.nets.training.StepStats`): no step waits for the GPU (the
losses of :mod:`facesearch.nets.losses` mine with fixed-shape masks, and the
anti-collapse guard chooses its loss on the device). The sampling, schedule, checkpoint and logging pieces live in
:mod:`facesearch.nets.training`.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.distributed as dist
from tqdm import tqdm

from facesearch.data import manifest as M
from facesearch.data.layouts import source_description
from facesearch.data.packing import load_array, read_info
from facesearch.faces.config import FaceConfig, chip_config, chip_record
from facesearch.nets.augment import AugmentConfig, augment
from facesearch.nets.contract import crop_params, identities_record, model_preprocessing, preprocessing_record
from facesearch.nets.inference import embed_array
from facesearch.nets.losses import (
    MINING,
    distillation_loss,
    negative_pairs,
    offline_triplet_loss,
    pairwise_distances,
    spread_out_loss,
)
from facesearch.nets.models import (
    EmbeddingNet,
    ModelConfig,
    ModelFileError,
    failure_line,
    load_model,
    resolve_device,
    save_model,
    seeded_model,
    trainable_parameters,
)
from facesearch.nets.training import (
    Dist,
    Prefetcher,
    StepStats,
    best_epoch,
    epoch_steps,
    epoch_streams,
    identity_groups,
    input_fingerprint,
    join_process_group,
    load_checkpoint,
    log_record,
    lr_factor,
    open_live,
    pk_batches,
    read_batch,
    run_digest,
    save_checkpoint,
    set_deterministic,
    triplet_batches,
    validation_at,
)
from facesearch.nets.transforms import resized, to_model_input
from facesearch.params import load_params
from facesearch.provenance import code_fingerprint
from facesearch.retrieval.metrics import leave_one_out_metrics
from facesearch.retrieval.verification import calibrate

log = logging.getLogger("facesearch.train")

# The repository whose stages/train.py and facesearch modules this run executes: their
# hashes are part of the resume key, so a checkpoint of older code is never resumed.
CODE_ROOT = Path(__file__).resolve().parents[1]
SCRIPT = "stages/train.py"

# Batches read ahead by the prefetch thread: one would do if reads always took the same
# time; two absorb a slow read (a cold page of the memory map) without holding much memory.
PREFETCH_BATCHES = 2
# The progress bar's running loss is read from the device every this many steps: each read
# is a host sync, which would otherwise stall the GPU's queue at every step.
POSTFIX_EVERY = 25
# Where and how fast, not what: left out of the resume key, so a run may resume elsewhere.
EXECUTION_KEYS = ("device", "compile", "eval_batch")


@dataclass(frozen=True)
class TrainConfig:
    """``params.yaml: train.<backbone>``; see the comments there for meaning and units.

    No field has a default: params.yaml is the one home of every value. The
    backbones' blocks differ (dlib_resnet's weights, layers, size, loss, margin,
    epochs, lr, ...), so a dataclass default could agree with one block at most
    and would silently stand in for a key left out of another; a missing key is
    an error instead.
    """

    weights: str
    trainable_layers: int
    embedding_dim: int
    normalize: bool
    img_size: int
    flip_tta: bool  # embed as the mean of the face and its mirror image (validation included)
    tta_jitters: int  # and of this many dlib-style jitters (validation included)
    loss: str  # triplet | semi_hard | batch_hard | distill (with --teacher)
    margin: float
    soft_margin: bool
    spread_weight: float  # weight of the spread-out term added to the triplet losses (0: off)
    head_bn: bool  # BatchNorm1d on the report's head output (ModelConfig.head_bn)
    semi_hard_epochs: int  # batch_hard only: semi-hard mining for these first epochs
    collapse_spread: float  # batch_hard only: below this mean pairwise distance, mine semi-hard
    distill_centre: bool  # distill only: targets are the teacher's embeddings less their train-crop mean
    p_identities: int
    k_images: int
    batch_triplets: int
    epochs: int
    steps_per_epoch: int  # 0: one pass over the images (P x K) or the triplets, all processes together
    lr: float
    weight_decay: float
    warmup_steps: int
    seed: int
    augment: AugmentConfig
    device: str  # auto | cpu | cuda
    amp: bool  # bf16 autocast on CUDA
    channels_last: bool
    compile: bool
    eval_batch: int
    cpu_threads: int  # torch.set_num_threads: results depend on it (see set_deterministic)
    keep: str  # best (validation mAP, the start included) | last (the final epoch)

    @classmethod
    def from_params(cls, params: dict) -> TrainConfig:
        params = dict(params)
        aug = dict(params.pop("augment", {}))
        for key in ("erase_scale", "erase_ratio"):
            if key in aug:
                aug[key] = tuple(aug[key])
        names = set(cls.__dataclass_fields__) - {"augment"}
        aug_names = set(AugmentConfig.__dataclass_fields__)
        unknown = sorted(set(params) - names) + [f"augment.{k}" for k in sorted(set(aug) - aug_names)]
        if unknown:
            raise ValueError(f"unknown train params {unknown}")
        missing = sorted(names - set(params)) + [f"augment.{k}" for k in sorted(aug_names - set(aug))]
        if missing:
            raise ValueError(f"missing train params {missing} (params.yaml: train.<backbone> lists every key)")
        for name, f in cls.__dataclass_fields__.items():
            # Otherwise a word where a number belongs fails deep inside the optimiser.
            if f.type == "float" and isinstance(params.get(name), str):
                raise ValueError(f"train param {name}: {params[name]!r} is not a number")
        cfg = cls(**params, augment=AugmentConfig(**aug))
        best_epoch([], cfg.keep)  # a bad value fails now, not after the last epoch
        return cfg


def check_crops(arrays: Path, face: FaceConfig) -> None:
    """The packed chips must be those ``params.yaml: crop`` + ``chips.<backbone>`` describe, or the model file
    would lie. Their size is checked by ``load_array(crop_side=...)``; the rest by the cut the chips stage recorded."""
    for name in ("train", "val"):
        recorded = read_info(arrays / f"{name}.npy").get("face")
        if recorded is not None and recorded != chip_record(face):
            raise SystemExit(f"train: {arrays / name}.npy was cut otherwise than params.yaml's crop and "
                             "chips blocks say: re-run the chips stage (dvc repro)")  # fmt: skip


@dataclass(frozen=True)
class Teacher:
    """A saved model a student is distilled from (``--teacher``), frozen, with what it was trained on."""

    model: EmbeddingNet
    img_size: int
    record: dict  # the student's payload["teacher"]: file, fingerprint, backbone, identities

    def targets(self, view: torch.Tensor, centre: torch.Tensor | None, amp: bool) -> torch.Tensor:
        """The teacher's embeddings of a model-input batch at its side (less ``centre``, when given)."""
        with torch.no_grad(), torch.autocast(view.device.type, dtype=torch.bfloat16, enabled=amp):
            out = self.model(view).float()
        return out if centre is None else out - centre


@torch.no_grad()
def teacher_centre(teacher: Teacher, images: np.ndarray, device: torch.device, batch: int, channels_last: bool):
    """Mean of the teacher's raw embeddings (no test-time views) of the train crops, (d,) on ``device``.

    Why centre: a face network's descriptors share one large direction (dlib's: their mean has
    length 0.92 on celeba-dev's train crops, different people sit at cosine 0.84), so a cosine
    loss on them is low for any student that finds that direction, and what tells people apart
    is a small part of it. Less their mean, different people are at cosine ~0 and the loss
    is about telling them apart. On celeba-dev's validation identities it did not help (a
    MobileNet-V2 student of dlib_resnet, 3 seeds: val mAP 0.137 centred, 0.144 plain), so
    params.yaml leaves it off; it is there to be tried on data at scale.
    """
    total = torch.zeros(teacher.model.config.embedding_dim, device=device, dtype=torch.float64)
    for start in range(0, len(images), batch):
        x = to_model_input(torch.from_numpy(np.array(images[start : start + batch])), teacher.img_size, device,
                           channels_last)  # fmt: skip
        total += teacher.model(x).double().sum(0)
    return (total / max(1, len(images))).float()


def load_teacher(
    path: str, face: FaceConfig, cfg: TrainConfig, device: torch.device, val_identities: Iterable[int]
) -> Teacher:
    """The frozen teacher, after checking it can teach on these crops (or a clear SystemExit).

    Its crops must be the student's (the targets would describe other pixels otherwise),
    its embedding as long as the student's, and none of the student's validation people
    among those it was trained on: the student's epochs, recipes and "keeps X%" would be
    chosen on people the teacher has already learnt.
    """
    if Path(path).is_dir():
        raise SystemExit(f"train: teacher model {path} is a folder, not a model file")
    if not Path(path).is_file():
        raise SystemExit(f"train: teacher model {path} does not exist (train it first: dvc repro train@dlib_resnet)")
    try:
        model, payload = load_model(path, map_location="cpu")
    except ModelFileError as exc:
        raise SystemExit(f"train: teacher {exc}") from exc
    teacher_face, size = model_preprocessing(payload, fallback=face)
    if crop_params(teacher_face) != crop_params(face):
        raise SystemExit(f"train: teacher {path} was trained on crops cut otherwise than params.yaml: crop "
                         "says; distil on the crops the teacher expects")  # fmt: skip
    if model.config.embedding_dim != cfg.embedding_dim:
        raise SystemExit(f"train: teacher {path} embeds in {model.config.embedding_dim} dimensions, the student "
                         f"in {cfg.embedding_dim}: set embedding_dim to {model.config.embedding_dim}")  # fmt: skip
    identities = payload.get("identities")
    if identities is None:
        log.warning("teacher %s records no identities (saved by an older version): the student cannot say whom it "
                    "saw, and scores of it may count the teacher's training people as unseen", path)  # fmt: skip
        identities = {"train": [], "val": []}
    leaked = sorted(set(identities.get("train", [])) & {int(i) for i in val_identities})
    if leaked:
        raise SystemExit(f"train: teacher {path} was trained on {len(leaked)} of the student's validation identities "
                         f"(e.g. {leaked[:5]}): distil a teacher trained on this split, or split again")  # fmt: skip
    for p in model.parameters():
        p.requires_grad_(False)
    model = model.to(device).eval()
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    record = {"path": str(path), "fingerprint": input_fingerprint([Path(path)])[Path(path).name],
              "backbone": model.config.backbone, "config": payload["config"],
              "identities": identities}  # fmt: skip
    return Teacher(model, size, record)


# ---------------------------------------------------------------- training ---
def compute_loss(model, x, labels, cfg: TrainConfig, epoch: int, triplet_mode: bool, target=None):
    """Loss and stats for one batch: ``active`` triplets, embedding ``spread``, ``fallback`` step.

    ``target``: the teacher's embeddings of ``x`` (``loss: distill``). The triplet losses add
    ``spread_weight`` times the spread-out term on the batch's pairs of different people
    (:func:`facesearch.nets.losses.spread_out_loss`). All stay device tensors (or Python
    constants): a step has no host sync.
    """
    emb = model(x)
    spread = pairwise_distances(emb.detach().float()).mean()
    if target is not None:
        loss, stats = distillation_loss(emb, target)
        return loss, {**stats, "spread": spread, "fallback": 0.0}
    loss, stats = triplet_loss(emb, labels, cfg, epoch, triplet_mode, spread)
    if cfg.spread_weight > 0:
        negatives = triplet_negatives(len(emb) // 3, emb.device) if triplet_mode else negative_pairs(labels)
        loss = loss + cfg.spread_weight * spread_out_loss(emb, negatives)
    return loss, {**stats, "spread": spread}


def triplet_loss(emb, labels, cfg: TrainConfig, epoch: int, triplet_mode: bool, spread: torch.Tensor):
    """The triplet loss ``cfg.loss`` names, with its ``active`` share and whether the guard ``fallback`` fired."""
    if triplet_mode:
        a, p, n = emb.chunk(3)
        loss, stats = offline_triplet_loss(a, p, n, cfg.margin, cfg.soft_margin)
        return loss, {**stats, "fallback": 0.0}
    mining = cfg.loss
    if mining == "batch_hard" and epoch < cfg.semi_hard_epochs:
        mining = "semi_hard"  # anti-collapse: easier negatives first
    elif mining == "batch_hard" and cfg.collapse_spread > 0:
        # Anti-collapse guard: the batch's embeddings are closing in on one point, which
        # batch-hard mining drives to a total collapse; semi-hard negatives push them apart
        # again. Both losses are computed (a batch-sized matrix each, nothing next to the
        # network) and the device picks one, so the step never waits for the GPU.
        collapsed = spread < cfg.collapse_spread
        hard, hard_stats = MINING["batch_hard"](emb, labels, cfg.margin, cfg.soft_margin)
        semi, semi_stats = MINING["semi_hard"](emb, labels, cfg.margin, cfg.soft_margin)
        active = torch.where(collapsed, semi_stats["active"], hard_stats["active"])
        return torch.where(collapsed, semi, hard), {"active": active, "fallback": collapsed.float()}
    loss, stats = MINING[mining](emb, labels, cfg.margin, cfg.soft_margin)
    return loss, {**stats, "fallback": 0.0}


def triplet_negatives(n: int, device: torch.device) -> torch.Tensor:
    """(3n, 3n) bool: each offline triplet's anchor and negative (rows in anchor/positive/negative thirds)."""
    i = torch.arange(n, device=device)
    mask = torch.zeros(3 * n, 3 * n, dtype=torch.bool, device=device)
    mask[i, 2 * n + i] = True
    return mask | mask.T


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", required=True)
    parser.add_argument("--split", required=True, help="folder with train/val/triplets .parquet")
    parser.add_argument("--arrays", required=True, help="folder with the packed train/val .npy")
    parser.add_argument("--out", required=True, help="the trained model, models/<backbone>.pt")
    parser.add_argument("--checkpoint", required=True, help="resumable per-epoch checkpoint")
    parser.add_argument("--live", required=True, help="dvclive folder for metrics and curves")
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--teacher", help="loss distill: the saved model to distil, e.g. models/dlib_resnet.pt")
    parser.add_argument("--source", default=None, help="the crop stage's data/source.json: where the identities "
                        "come from (recorded in the model: evaluate knows whom it has seen in other data)")  # fmt: skip
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    args = parse_args(argv)
    try:
        run(args)
    except OSError as exc:  # a missing or unreadable params file, split or arrays: why, in one line
        raise SystemExit(f"train: {failure_line(exc)}") from None


def run(args: argparse.Namespace) -> None:
    params = load_params(args.params)
    cfg = TrainConfig.from_params(params["train"][args.backbone])
    try:
        face = chip_config(params, args.backbone)  # crop's detection + chips.<backbone>'s cut: the model's input
    except ValueError as exc:
        raise SystemExit(f"train: {exc}") from None
    verification = params["verification"]
    set_deterministic(cfg.cpu_threads)
    ctx = Dist.from_env()
    try:
        device = resolve_device(cfg.device, ctx.local_rank)  # one GPU per process under torchrun
    except RuntimeError as exc:
        raise SystemExit(f"train: {exc}") from exc
    if device.type == "cuda":
        torch.cuda.set_device(device)  # NCCL and any bare .cuda() use this process's GPU
    join_process_group(ctx, device)
    try:
        train(args, cfg, face, verification, ctx, device)
    finally:
        if ctx.world > 1:
            dist.destroy_process_group()


def train(
    args: argparse.Namespace, cfg: TrainConfig, face: FaceConfig, verification: dict, ctx: Dist, device: torch.device
) -> None:
    # ---- data: tables in memory, images memory-mapped ----
    split, arrays = Path(args.split), Path(args.arrays)
    train_df = pd.read_parquet(split / "train.parquet")
    val_df = pd.read_parquet(split / "val.parquet")
    if (cfg.loss == "distill") != bool(args.teacher):
        raise SystemExit("train: loss distill needs --teacher MODEL, and --teacher needs loss: distill")
    teacher = load_teacher(args.teacher, face, cfg, device, val_df[M.IDENTITY]) if args.teacher else None
    # The teacher reads the arrays at its own side: they must hold both.
    min_side = max(cfg.img_size, teacher.img_size if teacher else 0)
    train_img = load_array(arrays / "train.npy", len(train_df), crop_side=face.size, min_side=min_side)
    val_img = load_array(arrays / "val.npy", len(val_df), crop_side=face.size, min_side=min_side)
    check_crops(arrays, face)
    labels = train_df[M.IDENTITY].to_numpy(dtype=np.int64)
    if args.backbone == "dlib_resnet" and cfg.weights != "none" and face.align != "landmarks":
        # It runs, but dlib's network was trained on aligned chips: square crops cost it accuracy.
        log.warning("dlib_resnet on unaligned chips: set chips.dlib_resnet align landmarks, landmarks 68, size 150 "
                    "(and crop.detector dlib_hog)")  # fmt: skip
    triplet_mode = cfg.loss == "triplet"
    if triplet_mode:
        trip = pd.read_parquet(split / "triplets.parquet")
        row = {p: i for i, p in enumerate(train_df[M.CROP_PATH])}
        triplets = np.stack([trip[c].map(row).to_numpy(dtype=np.int64) for c in (M.ANCHOR, M.POSITIVE, M.NEGATIVE)], 1)
        steps = epoch_steps(len(triplets), cfg.batch_triplets, ctx.world, cfg.steps_per_epoch)
    elif cfg.loss in MINING or cfg.loss == "distill":
        groups = identity_groups(labels)
        if len(groups) < 2:
            raise SystemExit("train: P x K sampling needs at least two identities with two images")
        steps = epoch_steps(len(train_df), cfg.p_identities * cfg.k_images, ctx.world, cfg.steps_per_epoch)
    else:
        raise SystemExit(f"train: unknown loss {cfg.loss!r}; choose triplet, semi_hard, batch_hard or distill")

    # ---- model and optimiser ----
    # Seeded build: the untrained network ("before fine-tuning") is reproducible
    # from the saved config and seed (see facesearch.nets.models.seeded_model).
    model_config = ModelConfig(
        args.backbone, weights=cfg.weights, embedding_dim=cfg.embedding_dim, normalize=cfg.normalize,
        trainable_layers=cfg.trainable_layers, img_size=cfg.img_size, flip_tta=cfg.flip_tta,
        tta_jitters=cfg.tta_jitters, head_bn=cfg.head_bn,
    )  # fmt: skip
    model = seeded_model(model_config, cfg.seed).to(device)
    channels_last = cfg.channels_last  # NHWC pays on CUDA and on CPU (oneDNN) alike
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    n_trainable = trainable_parameters(model)
    if ctx.main:
        log.info("%s: %d trainable of %d parameters (last %s layers), %d steps/epoch on %s x%d",
                 args.backbone, n_trainable, sum(p.numel() for p in model.parameters()), cfg.trainable_layers,
                 steps, device.type, ctx.world)  # fmt: skip
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    total = cfg.epochs * steps
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, total, cfg.warmup_steps))

    # ---- resume a killed run of these params, inputs and code ----
    start_epoch, history, best_state = 0, [], None
    ckpt_path = Path(args.checkpoint)
    inputs = input_fingerprint([split / "train.parquet", split / "val.parquet", split / "triplets.parquet",
                                arrays / "train.npy", arrays / "val.npy"])  # fmt: skip
    if teacher is not None:
        inputs["teacher"] = teacher.record["fingerprint"]  # another teacher: another run
    resume_params = {k: v for k, v in asdict(cfg).items() if k not in EXECUTION_KEYS}
    digest = run_digest(resume_params, inputs, code_fingerprint(SCRIPT, CODE_ROOT), crop_params(face))
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

    val_labels = val_df[M.IDENTITY].to_numpy()

    def val_embeddings() -> np.ndarray:
        return embed_array(model, val_img, cfg.img_size, device, cfg.eval_batch, cfg.amp, channels_last)

    def validate() -> dict[str, float]:
        """Rank-k and mAP among the validation identities' images (each queries the rest)."""
        return leave_one_out_metrics(val_embeddings(), val_labels)

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
    centre = None
    if teacher is not None and cfg.distill_centre:
        centre = teacher_centre(teacher, train_img, device, cfg.eval_batch, channels_last)
    teacher_val = None
    if teacher is not None and ctx.main:
        # What the student is measured against: the teacher on the same validation identities.
        teacher_val = leave_one_out_metrics(
            embed_array(teacher.model, val_img, teacher.img_size, device, cfg.eval_batch, cfg.amp, channels_last),
            val_labels)  # fmt: skip
        log.info("teacher %s: validation %s", teacher.record["backbone"],
                 {k: round(v, 4) for k, v in teacher_val.items()})  # fmt: skip

    # ---- the loop ----
    use_amp = cfg.amp and device.type == "cuda"
    pin = device.type == "cuda"  # page-locked batches: the copy to the GPU overlaps the step

    def read(idx: np.ndarray) -> tuple[torch.Tensor, torch.Tensor | None]:
        return read_batch(train_img, idx, None if triplet_mode else labels, pin)

    for epoch in range(start_epoch, cfg.epochs):
        rng, augment_seeds = epoch_streams(cfg.seed, epoch, ctx.world)
        gen = torch.Generator(device=device).manual_seed(augment_seeds[ctx.rank])
        if triplet_mode:
            batches = triplet_batches(triplets, cfg.batch_triplets, steps, rng, ctx.rank, ctx.world)
        else:
            batches = pk_batches(groups, cfg.p_identities, cfg.k_images, steps, rng, ctx.rank, ctx.world)
        net.train()
        stats = StepStats(("loss", "active", "spread", "fallback"), steps, device)
        with Prefetcher(batches, read, PREFETCH_BATCHES) as loader:
            bar = tqdm(loader, total=steps, desc=f"{args.backbone} epoch {epoch + 1}/{cfg.epochs}",
                       disable=not ctx.main, unit="step")  # fmt: skip
            for step, (images, batch_labels) in enumerate(bar):
                target = None
                if teacher is None:
                    x = augment(to_model_input(images, cfg.img_size, device, channels_last), cfg.augment, gen)
                else:
                    # One augmented view for both, at the arrays' side: each network reads it resized
                    # once to its own side, as evaluate resizes a crop once (flip and erasing are
                    # relative to the side, so the view is the same at any side).
                    view = augment(to_model_input(images, images.shape[1], device, channels_last), cfg.augment, gen)
                    target = teacher.targets(resized(view, teacher.img_size, channels_last), centre, use_amp)
                    x = resized(view, cfg.img_size, channels_last)
                if batch_labels is not None:  # None: offline triplets, rows in anchor/positive/negative thirds
                    batch_labels = batch_labels.to(device, non_blocking=True)
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
                    loss, step_stats = compute_loss(net, x, batch_labels, cfg, epoch, triplet_mode, target)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                scheduler.step()
                stats.add(loss=loss, **step_stats)
                if ctx.main and ((step + 1) % POSTFIX_EVERY == 0 or step + 1 == steps):
                    bar.set_postfix(loss=f"{stats.running_mean('loss'):.4f}",
                                    active=f"{stats.running_mean('active'):.2f}")  # fmt: skip
        epoch_means = stats.means(ctx.world)  # the epoch's one read of the step stats, over all processes
        if ctx.main:
            val = validate()
            record = {"epoch": epoch, **epoch_means, "lr": scheduler.get_last_lr()[0],
                      **{f"val_{k}": v for k, v in val.items()}}  # fmt: skip
            history.append(record)
            log_record(live, record)
            log.info("epoch %d: %s", epoch + 1, {k: round(v, 4) for k, v in record.items() if k != "epoch"})
            if best_epoch(history, cfg.keep) == epoch:
                # A copy: the live tensors keep changing in the next epoch's steps.
                best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
            save_checkpoint(ckpt_path, model, optimizer, scheduler, epoch, digest, history, best_state)
        if ctx.world > 1:
            dist.barrier()  # nobody starts the next epoch before the checkpoint is safe

    # ---- the model file: the kept epoch's weights and what they were trained on ----
    if ctx.main:
        best = best_epoch(history, cfg.keep)
        model.load_state_dict(best_state)
        best_val = validation_at(history, best)
        # The verdict threshold of these weights, chosen on people the loss never saw: a cosine of unit
        # rows whatever train.<backbone>.normalize says (calibrate scales them), as the index and the app compare.
        source = json.loads(Path(args.source).read_text()) if args.source else None
        data = {"description": source_description(source or {}, val_df[M.IDENTITY].nunique(), len(val_df)),
                "synthetic": bool(source and source.get("synthetic")), "identities": "validation"}  # fmt: skip
        threshold = calibrate(val_embeddings(), val_labels, verification["far"], verification["fars"],
                              verification["impostor_pairs"], verification["seed"], verification["fpir"],
                              data)  # fmt: skip
        if threshold is None:
            log.warning("fewer than two validation identities: the model gets no verdict threshold")
        elif not threshold["resolved"]:
            log.warning("%d validation impostor pairs cannot measure a FAR of %g: the threshold %.4f rejects every "
                        "one", threshold["n_impostor"], threshold["far"], threshold["similarity"])  # fmt: skip
        seen = {"train": list(train_df[M.IDENTITY]), "val": list(val_df[M.IDENTITY])}
        # Under the folder layout a person is a name: what evaluate matches in another folder.
        people = None
        if source and source.get("layout") == "folders":
            people = {k: list(df[M.PERSON].dropna()) for k, df in (("train", train_df), ("val", val_df))}
        if teacher is not None:
            # What the teacher learnt from, the student learnt from too: no score may count those people.
            for key in seen:
                seen[key] += teacher.record["identities"].get(key, [])
        save_model(args.out, model, extra={
            "train_config": asdict(cfg), "history": history, "trainable_parameters": n_trainable,
            "best_epoch": best, "preprocessing": preprocessing_record(face, cfg.img_size),
            "identities": identities_record(seen["train"], seen["val"], source, people),
            **({"threshold": threshold} if threshold is not None else {}),
            **({"teacher": {**teacher.record, "val": teacher_val,
                            "centre": None if centre is None else centre.cpu().tolist()}} if teacher else {}),
        })  # fmt: skip
        live.summary["best"] = {"epoch": best, "val": {k[4:]: v for k, v in best_val.items()}}
        if teacher_val is not None:
            live.summary["teacher"] = {"backbone": teacher.record["backbone"], "val": teacher_val}
            log.info("the student keeps %.1f%% of its teacher's validation mAP (%.4f of %.4f)",
                     100 * best_val.get("val_mAP", math.nan) / teacher_val["mAP"], best_val.get("val_mAP", math.nan),
                     teacher_val["mAP"])  # fmt: skip
        live.end()
        # The model is safe: a checkpoint left behind would only be stale state.
        ckpt_path.unlink(missing_ok=True)
        chosen = f"epoch {best + 1} of {cfg.epochs}" if best >= 0 else "the starting network: no epoch improved it"
        log.info("wrote %s (%s, best validation mAP %.4f)", args.out, chosen, best_val.get("val_mAP", math.nan))
        if threshold is not None:
            log.info("verdict threshold %.4f at FAR %g on the validation identities (TAR %.4f)",
                     threshold["similarity"], threshold["far"],
                     math.nan if threshold["tar"] is None else threshold["tar"])  # fmt: skip


if __name__ == "__main__":
    main()
