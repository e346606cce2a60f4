"""Shared fixtures: tiny synthetic data sets, bad files, and the real-face subset."""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image

from facesearch.data import manifest as M
from facesearch.data.celeba import ATTRIBUTE_NAMES
from facesearch.data.synth import SampleSpec, generate_sample

REPO = Path(__file__).resolve().parents[1]
CELEBA_DEV = REPO.parent / "shared" / "data" / "celeba-dev"


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO


@pytest.fixture(scope="session")
def celeba_dev() -> Path:
    if not (CELEBA_DEV / "identity_CelebA.txt").is_file():
        pytest.skip(f"real-face subset not found at {CELEBA_DEV} (CI provides it beside the repo)")
    return CELEBA_DEV


@pytest.fixture(scope="session")
def sample_factory(tmp_path_factory):
    """Generate (and cache per session) a synthetic CelebA-layout folder for a spec."""
    cache: dict[SampleSpec, Path] = {}

    def make(**kwargs) -> Path:
        spec = SampleSpec(**kwargs)
        if spec not in cache:
            out = tmp_path_factory.mktemp("sample")
            generate_sample(spec, out)
            cache[spec] = out
        return cache[spec]

    return make


@pytest.fixture
def small_sample(sample_factory, tmp_path) -> Path:
    """A private copy of a 6-identity x 4-photo sample that a test may modify."""
    src = sample_factory(identities=6, images_per_identity=4, seed=3)
    dst = tmp_path / "data"
    shutil.copytree(src, dst)
    return dst


def person_folders(celeba_root: Path, dst: Path) -> Path:
    """The photos of a CelebA-layout folder rearranged one folder per person: ``dst/Person_<id>/<name>``.

    Zero-padded ids: the sorted folder names follow the CelebA ids.
    """
    for line in (celeba_root / "identity_CelebA.txt").read_text().splitlines():
        name, ident = line.split()
        (dst / f"Person_{int(ident):05d}").mkdir(parents=True, exist_ok=True)
        shutil.copy(celeba_root / "img_celeba" / name, dst / f"Person_{int(ident):05d}" / name)
    return dst


def jpeg_bytes(img: Image.Image, **kwargs) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", **kwargs)
    return buf.getvalue()


def png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def bomb_png(width: int = 100_000, height: int = 100_000) -> bytes:
    """A tiny, valid-headed PNG that claims a huge canvas (a decompression bomb's header)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def variants_of(face: Image.Image) -> dict[str, bytes]:
    """The same face photo in awkward but valid encodings."""
    gray = face.convert("L")
    sixteen = Image.fromarray(np.asarray(gray, dtype=np.uint16) * 257)  # mode I;16
    rgba = face.convert("RGBA")
    rgba.putalpha(200)
    return {
        "gray.jpg": jpeg_bytes(gray),
        "cmyk.jpg": jpeg_bytes(face.convert("CMYK")),
        "rgba.png": png_bytes(rgba),
        "sixteen.png": png_bytes(sixteen),
        "palette.png": png_bytes(face.convert("P")),
    }


def broken_files(good_jpeg: bytes) -> dict[str, bytes]:
    """File name -> bytes for each kind of unusable input."""
    return {
        "zero.jpg": b"",
        "text.jpg": b"this is not an image\n" * 20,
        "random.jpg": np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes(),
        "truncated.jpg": good_jpeg[: len(good_jpeg) // 2],
        "corrupt.jpg": good_jpeg[:200] + b"\x00" * 50 + good_jpeg[250:400],
        "bomb.png": bomb_png(),
        "notes.txt": b"readme\n",
    }


BAD_MODELS = ("missing", "empty", "truncated", "cut_short", "text", "tensor", "other_shape", "folder")


def bad_model_files(folder: Path) -> dict[str, Path]:
    """Each of :data:`BAD_MODELS` -> a path a command must refuse in one line (``missing`` is not written).

    Also ``folder/good.pt``: a model with no more than :func:`~facesearch.nets.models.save_model` writes.
    """
    import torch

    from facesearch.nets.models import get_model, save_model

    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    save_model(folder / "good.pt", get_model("mobilenet_v2", weights="none", embedding_dim=8, img_size=32))
    good = (folder / "good.pt").read_bytes()
    payload = torch.load(folder / "good.pt", weights_only=True)
    out = {kind: folder / f"{kind}.pt" for kind in BAD_MODELS}
    out["empty"].write_bytes(b"")
    out["truncated"].write_bytes(good[: len(good) // 2])  # torch: no zip directory
    out["cut_short"].write_bytes(good[:5000])  # torch: OSError EINVAL, reading past the end
    out["text"].write_text("not a model\n")
    torch.save(torch.zeros(3), out["tensor"])
    torch.save({**payload, "config": {**payload["config"], "embedding_dim": 16}}, out["other_shape"])
    out["folder"].mkdir(exist_ok=True)
    return out


def write_params(path: Path, overrides: dict | None = None) -> Path:
    """Copy the repo's params.yaml to ``path`` with dotted-key overrides ({"execution.n_jobs": 1})."""
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    for dotted, value in (overrides or {}).items():
        node = params
        *parents, leaf = dotted.split(".")
        for key in parents:
            node = node.setdefault(key, {})  # a block the repo's params leave empty ({}), e.g. fusions
        node[leaf] = value
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    return path


def run_crop(workdir: Path, data: Path, overrides: dict | None = None) -> tuple[pd.DataFrame, dict]:
    """Run the crop stage in ``workdir`` (as DVC would, from the repo root); its manifest and every metric."""
    workdir.mkdir(parents=True, exist_ok=True)
    params = write_params(workdir / "params.yaml", {"execution.n_jobs": 1, **(overrides or {})})
    from stages import crop

    cwd = os.getcwd()
    os.chdir(workdir)
    try:
        crop.main(
            ["--data", str(data), "--crops", "data/crops", "--manifest", "data/manifest.parquet",
             "--metrics", "metrics/crop.json", "--details", "metrics/details/crop.json", "--sheet", "reports/crops.png",
             "--source", "data/source.json", "--params", str(params)]
        )  # fmt: skip
    finally:
        os.chdir(cwd)
    details = json.loads((workdir / "metrics/details/crop.json").read_text())
    return pd.read_parquet(workdir / "data/manifest.parquet"), details


def fake_manifest(counts: dict[int, int], partitions: dict[int, int] | None = None) -> pd.DataFrame:
    """A manifest with ``counts[identity]`` kept images per identity and one rejected row."""
    rows = []
    for ident, n in counts.items():
        for k in range(n):
            name = f"{ident:05d}_{k}.jpg"
            rows.append({
                M.IMAGE_PATH: f"img_celeba/{name}", M.FILE_NAME: name, M.IDENTITY: ident,
                M.PARTITION: (partitions or {}).get(ident), M.STATUS: "kept", M.REASON: None,
                M.SOURCE_MODE: "RGB", M.WIDTH: 100, M.HEIGHT: 100, M.N_FACES: 1, M.DETECTOR: "haar_frontal",
                M.BBOX_X: 10, M.BBOX_Y: 10, M.BBOX_W: 50, M.BBOX_H: 50, M.CROP_PATH: f"crops/{name}",
                M.SHA256: "0" * 64, **{a: None for a in ATTRIBUTE_NAMES},
            })  # fmt: skip
    rows.append({M.IMAGE_PATH: "img_celeba/zzz.jpg", M.FILE_NAME: "zzz.jpg", M.STATUS: "rejected", M.REASON: "no_face"})
    df = pd.DataFrame(rows).reindex(columns=list(M.MANIFEST_COLUMNS))
    df = M.conform(df.sort_values(M.IMAGE_PATH), M.MANIFEST_DTYPES)
    M.validate_manifest(df)
    return df


# --- a tiny prepared pipeline (crops, split, packed arrays) for train/embed/evaluate tests ---
TINY = {
    "weights": "none", "trainable_layers": -1, "embedding_dim": 16, "img_size": 32, "loss": "semi_hard",
    "p_identities": 3, "k_images": 2, "batch_triplets": 4, "epochs": 2, "steps_per_epoch": 2, "warmup_steps": 1,
    "eval_batch": 16,
}  # fmt: skip
# The face settings of ``prepared``: 40 px square chips for both torchvision backbones (so either trains
# on its arrays, cut as chips.mobilenet_v2 says); train checks them and records them in the model.
TINY_CROP = {"crop.size": 40, "chips.resnet50.size": 40, "chips.mobilenet_v2.size": 40}


@pytest.fixture(scope="module")
def prepared(sample_factory, tmp_path_factory) -> Path:
    """A working directory with crops, split and chip arrays of a tiny sample (``data/arrays``: mobilenet_v2's
    chips, which are resnet50's too under TINY_CROP)."""
    work = tmp_path_factory.mktemp("train")
    data = sample_factory(identities=8, images_per_identity=5, seed=4)
    run_crop(work, data, TINY_CROP)
    write_params(work / "params.yaml", TINY_CROP | {"split.val_fraction": 0.25, "split.test_fraction": 0.5})
    from stages import chips, split

    cwd = os.getcwd()
    os.chdir(work)
    try:
        split.main(["--manifest", "data/manifest.parquet", "--out", "data/split", "--metrics", "m.json",
                    "--details", "md.json"])  # fmt: skip
        chips.main(["--backbone", "mobilenet_v2", "--data", str(data), "--split", "data/split", "--out", "data/arrays"])
    finally:
        os.chdir(cwd)
    return work


def run_train(
    work: Path, name: str, overrides: dict | None = None, backbone: str = "mobilenet_v2", params: dict | None = None,
    args: tuple[str, ...] = (),
) -> Path:  # fmt: skip
    """Train ``backbone`` on ``work``'s arrays: ``overrides`` of its train block, ``params`` dotted ones elsewhere.

    ``args``: more command-line arguments of the stage (``--teacher``).
    """
    train_block = {f"train.{backbone}.{k}": v for k, v in (TINY | (overrides or {})).items()}
    params = write_params(work / f"{name}.yaml", TINY_CROP | train_block | (params or {}))
    from stages import train

    out = work / name
    cwd = os.getcwd()
    os.chdir(work)
    try:
        train.main(["--backbone", backbone, "--split", "data/split", "--arrays", "data/arrays",
                    "--out", f"{name}/model.pt", "--checkpoint", f"{name}/ckpt/last.ckpt", "--live", f"{name}/live",
                    *(["--source", "data/source.json"] if (work / "data" / "source.json").is_file() else []),
                    "--params", str(params), *args])  # fmt: skip
    finally:
        os.chdir(cwd)
    return out


# The app tests' model: long enough to tell the sample's faces apart on any CPU. Their searches
# expect a photo to find itself first, which holds only when different photos' embeddings differ by
# more than float rounding: this from-scratch 32 px MobileNet-V2 embeds every face alike for its
# first steps (measured: every pair of gallery faces at similarity 1 - 1e-7 after 2 to 60 steps,
# the ties then broken by rounding, so by the CPU kind), and after these 100 steps the closest two
# are at 0.9996. keep: last, as validation may prefer the alike start.
APP_RECIPE = {"epochs": 5, "steps_per_epoch": 20, "keep": "last"}


@pytest.fixture(scope="module")
def app_root(prepared) -> Path:
    """``prepared`` plus what the app reads: models/mobilenet_v2.pt and its gallery embeddings."""
    from stages import embed

    out = run_train(prepared, "app", APP_RECIPE)
    (prepared / "models").mkdir(exist_ok=True)
    shutil.copy(out / "model.pt", prepared / "models" / "mobilenet_v2.pt")
    cwd = os.getcwd()
    os.chdir(prepared)
    try:
        embed.main(["--model", "models/mobilenet_v2.pt", "--split", "data/split", "--arrays", "data/arrays",
                    "--out", "data/embeddings/mobilenet_v2"])  # fmt: skip
    finally:
        os.chdir(cwd)
    return prepared


# --- temporary copies of this repository, for tests that run DVC itself ---------------------
GIT = ["git", "-c", "user.name=test", "-c", "user.email=test@example.invalid"]
# Two backbones cut two ways (mobilenet_v2 a wider margin): with the same chips their arrays would have one
# hash, and a fresh clone's `dvc repro` would check the second out of the cache instead of running it.
TINY_PIPELINE = {"sample.identities": 8, "sample.images_per_identity": 5, "execution.n_jobs": 1, "crop.size": 48,
                 "split.test_fraction": 0.25, "split.val_fraction": 0.25,
                 "chips.mobilenet_v2.margin": 0.25}  # fmt: skip
for _backbone in ("resnet50", "mobilenet_v2"):
    TINY_PIPELINE |= {f"train.{_backbone}.epochs": 1, f"train.{_backbone}.steps_per_epoch": 1,
                      f"train.{_backbone}.img_size": 32, f"train.{_backbone}.p_identities": 2}  # fmt: skip


def copy_repo(src: Path, dst: Path) -> None:
    """Copy the files git would check out (tracked and untracked-not-ignored), nothing built."""
    listed = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
        cwd=src, check=True, capture_output=True, text=True,
    ).stdout.split("\0")  # fmt: skip
    for rel in filter(None, listed):
        if (src / rel).is_file():
            (dst / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src / rel, dst / rel)


def dvc(repo: Path, *args: str) -> str:
    """Run ``dvc *args`` in ``repo``; fails the test with DVC's output if it fails."""
    env = {**os.environ, "DVC_NO_ANALYTICS": "1"}
    out = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=repo, env=env, capture_output=True, text=True)
    assert out.returncode == 0, f"dvc {' '.join(args)}:\n{out.stdout}{out.stderr}"
    return out.stdout


def repro(repo: Path) -> set[str]:
    """``dvc repro``; returns the names of the stages that ran."""
    return set(re.findall(r"Running stage '([\w@.-]+)'", dvc(repo, "repro")))


def tiny_repo_copy(src: Path, dst: Path) -> Path:
    """A committed git repository with this project's files and tiny pipeline params."""
    copy_repo(src, dst)
    (dst / "dvc.lock").unlink(missing_ok=True)
    write_params(dst / "params.yaml", TINY_PIPELINE)
    subprocess.run(["git", "init", "-q"], cwd=dst, check=True)
    # A clone has commits; dvclive reads HEAD and fails in a repository without any.
    subprocess.run([*GIT, "add", "-A"], cwd=dst, check=True)
    subprocess.run([*GIT, "commit", "-qm", "copy"], cwd=dst, check=True)
    return dst
