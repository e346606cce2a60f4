"""The app's latency from uploaded bytes to 9 results, model forward included.

    python bench/app.py                      # 40k gallery, the pipeline's trained models
    python bench/app.py --gallery 200000
    python bench/app.py --hostile            # cost of hostile uploads vs a normal photo (no pipeline needed)

Per photo: check and decode the bytes, detect faces, choose the default face, crop, embed with the
model, search the gallery. The gallery is ``--gallery`` synthetic 128-d
embeddings (the size the target names; the pipeline's own sample gallery is
small); the photos are the built-in sample's. Baseline in the same run: the
same path with the original design's cKDTree index instead of exact search.
Target: p50 at most 200 ms on this CPU.

``--hostile``: time and peak memory (growth of this process's peak RSS, reset
before each upload through /proc/self/clear_refs) of check + decode + detect +
whole-image crop for uploads built to hurt (a 40000 x 1000 JPEG, 40 MP at the
10:1 aspect cap, 39.9 MP PNGs in 8-bit RGB, palette, 16-bit, RGBA, LA and 16-bit
RGBA, an RGBA TIFF, WebPs lossy and lossless, opaque and translucent, among them
the issue's 1.5 KB 6000 x 6600 lossless RGBA one, 12 MP WebPs at the app's cap for
WebPs PIL decodes, a 100000 x 1 strip), each against a normal 1024 x 768 photo,
ratio printed. Embedding and search see a fixed-size crop whatever the upload, so
they are left out. Target: at most ~200 MB per upload (before the caps, 40000 x 1000
took 20 s and 5.4 GB; before strip flattening and the WebP header check, RGBA PNGs
took ~400 MB and WebPs ~620 MB).
"""

from __future__ import annotations

import argparse
import ctypes
import dataclasses
import gc
import io
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import facesearch  # noqa: F401  (before torch: sets how its threads wait, facesearch/__init__.py)

# isort: split
import cv2
import numpy as np
import torch
from PIL import Image

from facesearch.faces.config import FaceConfig
from facesearch.gallery import app_core as core
from facesearch.params import load_params
from facesearch.retrieval.knn import ExactIndex, KDTreeIndex

ROOT = Path(__file__).resolve().parents[1]


def run(gallery: core.Gallery, photos: list[bytes]) -> np.ndarray:
    times = []
    for data in photos:
        t0 = time.perf_counter()
        image = core.read_upload(data)
        detection = core.find_faces(image, gallery.settings)
        box = core.default_face(core.face_choices(image, detection))
        face = core.crop_face(image, None if box is None else box.box, gallery.settings)
        core.search(gallery, face)
        times.append((time.perf_counter() - t0) * 1000)
    return np.array(times)


def _status_mb(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def peak_rss_growth(fn, *args):
    """``fn(*args)``, how far it raised this process's peak RSS above the RSS it started at (MB),
    and its wall time (s).

    Linux only: writing 5 to /proc/self/clear_refs resets the peak (VmHWM) to the
    current RSS, so one process can measure many calls. RSS, not tracemalloc:
    PIL and OpenCV allocate outside Python's allocator. Freed heap memory is handed
    back first (glibc's malloc_trim): pages still resident from earlier work would
    be reused without raising RSS, hiding the call's cost.
    """
    gc.collect()
    libc = ctypes.CDLL(None)
    if hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    start = _status_mb("VmRSS")
    t0 = time.perf_counter()
    result = fn(*args)
    seconds = time.perf_counter() - t0
    return result, _status_mb("VmHWM") - start, seconds


def query_until_crop(data: bytes, settings: FaceConfig) -> str:
    """What an upload costs before embedding: check, decode, detect, crop (the whole image if no face)."""
    try:
        image = core.read_upload(data)
        detection = core.find_faces(image, settings)
        core.crop_face(image, detection.chosen, settings)
    except core.UploadError as exc:
        return f"refused: {exc}"
    return f"searched at {image.width} x {image.height}"


def encoded(img: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **({"compress_level": 1} if fmt == "PNG" else {}), **kwargs)
    return buf.getvalue()


def png16(rgba: np.ndarray) -> bytes:
    """A 16-bit-per-channel RGBA PNG (PIL writes none; OpenCV does, from BGRA order)."""
    ok, buf = cv2.imencode(".png", cv2.cvtColor(rgba, cv2.COLOR_RGBA2BGRA).astype(np.uint16) * 257,
                           [cv2.IMWRITE_PNG_COMPRESSION, 1])  # fmt: skip
    assert ok
    return buf.tobytes()


def hostile_uploads() -> dict[str, bytes]:
    rng = np.random.default_rng(0)
    # Smooth, posterised noise: something for the detector to scan that still compresses,
    # so 40 MP fit in the 10 MB upload limit even as PNG.
    noise = Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).resize((1000, 1000), Image.BILINEAR)
    texture = np.asarray(noise) // 32 * 32
    side = 6320  # 39.9 MP: the largest square the pixel cap accepts
    tiled = np.tile(texture, (7, 7, 1))[:side, :side]
    # Half to fully opaque, in the texture's own pattern: compositing has something to do.
    alpha = np.tile(texture[..., 1] // 2 + 128, (7, 7))[:side, :side].astype(np.uint8)
    rgba = Image.fromarray(np.dstack([tiled, alpha]))
    tiled = Image.fromarray(tiled)
    solid = Image.new("RGBA", (6000, 6600), (200, 100, 50, 128))
    return {
        "normal 1024x768 JPEG": encoded(Image.fromarray(texture).resize((1024, 768)), "JPEG"),
        "40000x1000 JPEG": encoded(Image.fromarray(np.tile(texture, (1, 40, 1))), "JPEG"),
        "20000x2000 JPEG (40 MP, 10:1)": encoded(Image.fromarray(np.tile(texture, (2, 20, 1))), "JPEG"),
        f"{side}x{side} PNG RGB": encoded(tiled, "PNG"),
        f"{side}x{side} PNG palette": encoded(tiled.convert("P", dither=Image.Dither.NONE), "PNG"),
        f"{side}x{side} PNG 16-bit": encoded(Image.fromarray(np.asarray(tiled)[..., 0].astype(np.uint16) * 257), "PNG"),
        f"{side}x{side} PNG RGBA": encoded(rgba, "PNG"),
        f"{side}x{side} PNG LA": encoded(rgba.convert("LA"), "PNG"),
        f"{side}x{side} PNG 16-bit RGBA": png16(np.asarray(rgba)),
        # The case: 1.5 KB that claim 39.6 MP of one translucent colour.
        "6000x6600 WebP lossless RGBA": encoded(solid, "WEBP", lossless=True),
        f"{side}x{side} WebP lossless RGBA": encoded(rgba, "WEBP", lossless=True, method=0),
        f"{side}x{side} WebP lossy RGB": encoded(tiled, "WEBP", quality=80, method=0),
        f"{side}x{side} WebP lossy RGBA": encoded(rgba, "WEBP", quality=80, method=0),
        # The most a WebP decoded through PIL's canvases may have (images.WEBP_CANVAS_MAX_PIXELS).
        "4000x3000 WebP lossless RGBA": encoded(rgba.crop((0, 0, 4000, 3000)), "WEBP", lossless=True, method=0),
        "4000x3000 WebP lossy RGBA": encoded(rgba.crop((0, 0, 4000, 3000)), "WEBP", quality=80, method=0),
        f"{side}x{side} TIFF RGBA": encoded(rgba, "TIFF", compression="tiff_adobe_deflate"),
        "100000x1 PNG": encoded(Image.new("RGB", (100_000, 1)), "PNG"),
    }  # fmt: skip


def _measure(data: bytes, warm_up: bytes, settings: FaceConfig) -> list:
    query_until_crop(warm_up, settings)  # cascades, OpenCV buffers, thread pools: not the upload's cost
    outcome, mb, seconds = peak_rss_growth(query_until_crop, data, settings)
    return [seconds, mb, outcome]


def upload_costs(uploads: dict[str, bytes], warm_up: bytes, settings: FaceConfig) -> dict[str, list]:
    """Name -> [seconds, peak MB above the start, outcome] of :func:`query_until_crop`.

    Each upload runs in its own forked child: in a shared process, memory that PIL's
    block cache or malloc keep after one upload would hide the next one's cost. The
    parent only imports (no thread pool is forked); a child killed for memory reads
    as ``killed``.
    """
    costs = {}
    for name, data in uploads.items():
        read_end, write_end = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: measure, report through the pipe, leave without cleanup
            os.close(read_end)
            try:
                report = json.dumps(_measure(data, warm_up, settings))
            except BaseException as exc:
                report = json.dumps([float("nan"), float("nan"), f"crashed: {exc!r}"])
            with os.fdopen(write_end, "w") as pipe:
                pipe.write(report)
            os._exit(0)
        os.close(write_end)
        with os.fdopen(read_end) as pipe:
            report = pipe.read()
        _, status = os.waitpid(pid, 0)
        costs[name] = json.loads(report) if report else [float("nan"), float("nan"), f"killed ({status})"]
    return costs


def hostile(settings: FaceConfig) -> None:
    uploads = hostile_uploads()
    normal_name = next(iter(uploads))
    rows = upload_costs(uploads, uploads[normal_name], settings)
    base_s, base_mb, _ = rows[normal_name]
    print(f"check + decode + detect + crop, each upload in a fresh process; normal photo: {base_s * 1000:.1f} ms, "
          f"peak +{base_mb:.1f} MB")  # fmt: skip
    for name, (sec, mb, outcome) in rows.items():
        print(f"{name:30s} {len(uploads[name]) / 1e3:7.0f} KB | {sec * 1000:7.1f} ms ({sec / base_s:5.1f}x normal) | "
              f"peak +{mb:6.1f} MB ({mb / max(base_mb, 1.0):5.1f}x normal's, floor 1 MB; {mb / 200:.2f} of 200 MB) | "
              f"{outcome}")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gallery", type=int, default=40_000)
    parser.add_argument("--photos", type=int, default=40)
    parser.add_argument("--hostile", action="store_true", help="cost of hostile uploads instead of latency")
    args = parser.parse_args()
    torch.set_num_threads(2)
    if args.hostile:
        built = core.available(ROOT)
        settings = (core.crop_settings(ROOT, built[0][0]) if built
                    else FaceConfig.from_params(load_params(ROOT / "params.yaml")["crop"]))  # fmt: skip
        return hostile(settings)
    photo_paths = sorted((ROOT / "data" / "sample" / "img_celeba").glob("*.jpg"))[: args.photos]
    if not photo_paths or not core.available(ROOT):
        raise SystemExit("run `dvc repro` first: the benchmark uses the pipeline's models and sample photos")
    photos = [p.read_bytes() for p in photo_paths]
    rng = np.random.default_rng(0)
    emb = rng.normal(size=(args.gallery, 128)).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    print(f"{len(photos)} sample photos, gallery of {args.gallery} embeddings, {torch.get_num_threads()} threads")
    for backbone, state in core.available(ROOT):
        if state != "after":
            continue
        real = core.load_gallery(ROOT, backbone, state)
        # Rows cycle the real gallery's so result formatting costs what it does in the app.
        reps = -(-args.gallery // len(real.table))
        table = real.table.iloc[np.tile(np.arange(len(real.table)), reps)[: args.gallery]].reset_index(drop=True)
        attributes = np.tile(real.attributes, (reps, 1))[: args.gallery]
        gallery = dataclasses.replace(real, embeddings=emb, index=ExactIndex(emb), table=table, attributes=attributes)
        model = gallery.model
        run(gallery, photos[:3])  # warm-up
        exact = run(gallery, photos)
        kd = run(dataclasses.replace(gallery, index=KDTreeIndex(emb)), photos)
        print(f"{backbone:13s} ({model.config.img_size} px) exact: p50 {np.percentile(exact, 50):6.1f} ms "
              f"p99 {np.percentile(exact, 99):6.1f} ms | cKDTree baseline p50 {np.percentile(kd, 50):6.1f} ms "
              f"| ratio {np.percentile(kd, 50) / np.percentile(exact, 50):.2f}x | "
              f"p50 / 200 ms budget = {np.percentile(exact, 50) / 200:.2f}")  # fmt: skip


if __name__ == "__main__":
    main()
