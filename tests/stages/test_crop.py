from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import hostile as H
import numpy as np
import pandas as pd
import pytest
from conftest import broken_files, person_folders, run_crop, variants_of, write_params
from PIL import Image

from facesearch.data import manifest as M
from facesearch.data.celeba import ATTRIBUTE_FILE, ATTRIBUTE_NAMES, IDENTITY_FILE, storable_name
from facesearch.data.layouts import person_identity
from facesearch.data.packing import pack_crops
from facesearch.faces.config import face_crop
from facesearch.faces.cropping import crop_names, image_guards
from facesearch.faces.haar import DetectorConfig, detect_face
from stages import crop


@pytest.fixture
def messy_data(small_sample) -> Path:
    """The small sample plus every kind of bad file and broken annotation row."""
    img_dir = small_sample / "img_celeba"
    cfg = DetectorConfig()
    face_file = next(
        p for p in sorted(img_dir.glob("*.jpg")) if detect_face(np.asarray(Image.open(p).convert("RGB")), cfg).chosen
    )
    face = Image.open(face_file).convert("RGB")
    extra = {**broken_files(face_file.read_bytes()), **variants_of(face)}
    for name, data in extra.items():
        (img_dir / name).write_bytes(data)
    ids = (small_sample / IDENTITY_FILE).read_text().splitlines()
    identity = ids[0].split()[1]
    rows = [f"{name} {identity}" for name in extra] + ["999998.jpg 42", "broken row without id", "999999.jpg"]
    (small_sample / IDENTITY_FILE).write_text("\n".join(ids[1:] + rows) + "\n")  # ids[0]: image without identity
    attr = (small_sample / ATTRIBUTE_FILE).read_text().splitlines()
    (small_sample / ATTRIBUTE_FILE).write_text("\n".join(attr[:-3]) + "\n" + attr[-3][:30])  # truncated mid-row
    return small_sample


def test_every_input_is_accounted_for(messy_data, tmp_path):
    df, metrics = run_crop(tmp_path, messy_data)
    M.validate_manifest(df, base_dir=tmp_path)
    files = sorted(p.name for p in (messy_data / "img_celeba").iterdir())
    assert sorted(df[M.FILE_NAME]) == files
    reason = dict(zip(df[M.FILE_NAME], df[M.REASON], strict=True))
    status = dict(zip(df[M.FILE_NAME], df[M.STATUS], strict=True))
    expected = {
        "zero.jpg": "empty_file", "text.jpg": "not_an_image", "random.jpg": "not_an_image",
        "truncated.jpg": "truncated", "bomb.png": "too_large", "notes.txt": "not_an_image",
    }  # fmt: skip
    for name, why in expected.items():
        assert (status[name], reason[name]) == ("rejected", why), name
    assert reason["corrupt.jpg"] in ("corrupt", "truncated", "no_face", None)
    # Awkward but valid encodings of a detectable face are converted and kept.
    modes = dict(zip(df[M.FILE_NAME], df[M.SOURCE_MODE], strict=True))
    for name, mode in (("gray.jpg", "L"), ("cmyk.jpg", "CMYK"), ("rgba.png", "RGBA"), ("sixteen.png", "I;16")):
        assert status[name] == "kept", name
        assert modes[name] == mode
    first = messy_data / IDENTITY_FILE  # the image whose identity row was removed
    assert (df[M.REASON] == "no_identity").sum() == 1
    assert first.exists()
    ann = metrics["annotations"]
    assert ann["images_without_identity"] == 1
    assert ann["identity_rows_without_image"] == 1  # 999998.jpg
    assert ann["malformed_rows"][IDENTITY_FILE] == 2
    assert ann["malformed_rows"][ATTRIBUTE_FILE] == 1
    assert ann["images_without_attributes"] >= 3 + len(broken_files(b"x")) + 5
    assert metrics["n_input"] == len(files)
    assert metrics["n_kept"] + sum(metrics["rejected"].values()) == len(files)
    assert metrics["n_kept"] == int((df[M.STATUS] == "kept").sum())
    # Every kept crop exists at the recorded, repo-relative path, and is the configured size.
    for path in df.loc[df[M.STATUS] == "kept", M.CROP_PATH]:
        assert not Path(path).is_absolute()
        assert Image.open(tmp_path / path).size == (218, 218)
    # Attributes are nullable: rows without an attribute line are null, not False.
    assert df.loc[df[M.FILE_NAME] == "zero.jpg", "Male"].isna().all()
    assert Image.open(tmp_path / "reports/crops.png").size[0] > 0


def test_same_params_byte_identical_manifest(small_sample, tmp_path):
    run_crop(tmp_path, small_sample)
    first = (tmp_path / "data/manifest.parquet").read_bytes()
    crops = {p.name: p.read_bytes() for p in (tmp_path / "data/crops").iterdir()}
    run_crop(tmp_path, small_sample)
    assert (tmp_path / "data/manifest.parquet").read_bytes() == first
    assert {p.name: p.read_bytes() for p in (tmp_path / "data/crops").iterdir()} == crops


def test_loky_workers_match_sequential(small_sample, tmp_path):
    seq, _ = run_crop(tmp_path / "seq", small_sample)
    _, seq_metrics = run_crop(tmp_path / "seq", small_sample)
    par, metrics = run_crop(tmp_path / "par", small_sample, {"execution.n_jobs": 2, "execution.backend": "loky"})
    pd.testing.assert_frame_equal(seq, par)
    # Execution changes speed only: metrics identical, speed is not in them.
    assert metrics == seq_metrics
    assert not {"seconds", "images_per_second", "n_jobs"} & set(metrics)


def test_failed_run_leaves_previous_outputs_untouched(small_sample, tmp_path, monkeypatch):
    run_crop(tmp_path, small_sample)
    before = {p.relative_to(tmp_path): p.read_bytes() for p in sorted(tmp_path.rglob("*")) if p.is_file()}

    def boom(*args, **kwargs):
        raise RuntimeError("killed half-way")

    monkeypatch.setattr(crop, "build_manifest", boom)
    with pytest.raises(RuntimeError, match="half-way"):
        run_crop(tmp_path, small_sample, {"crop.margin": 0.4})
    after = {p.relative_to(tmp_path): p.read_bytes() for p in sorted(tmp_path.rglob("*")) if p.is_file()}
    after.pop(Path("params.yaml"))
    before.pop(Path("params.yaml"))
    assert after == before  # no half-written output, no temp files left behind


def test_missing_identity_file_fails_before_writing(small_sample, tmp_path):
    (small_sample / IDENTITY_FILE).unlink()
    with pytest.raises(Exception, match="identity file is required"):
        run_crop(tmp_path / "work", small_sample)
    assert sorted(p.name for p in (tmp_path / "work").iterdir()) == ["params.yaml"]


def test_single_policy_and_unknown_detector_key(small_sample, tmp_path):
    df, _ = run_crop(tmp_path, small_sample, {"crop.policy": "single"})
    M.validate_manifest(df, base_dir=tmp_path)
    assert df[[*M.LANDMARK_COLUMNS, M.SCORE]].isna().all().all()  # haar locates no landmarks
    write_params(tmp_path / "bad.yaml", {"crop.haar.polcy": "single"})
    with pytest.raises(ValueError, match="unknown keys"):
        crop.load_crop_params(str(tmp_path / "bad.yaml"))
    write_params(tmp_path / "bad2.yaml", {"crop.detector": "mtcnn"})
    with pytest.raises(ValueError, match=r"crop\.detector must be one of"):
        crop.load_crop_params(str(tmp_path / "bad2.yaml"))
    # A params.yaml of before the chips blocks: where the keys went, not a silent default.
    write_params(tmp_path / "old.yaml", {"crop.align": "landmarks"})
    with pytest.raises(ValueError, match=r"crop\.align is gone.*chips\.<backbone>"):
        crop.load_crop_params(str(tmp_path / "old.yaml"))


def test_png_format_writes_the_crop_losslessly_and_packs(small_sample, tmp_path):
    """crop.format png: .png crops holding exactly the pixels face_crop cuts (what the app feeds a model)."""
    df, _ = run_crop(tmp_path, small_sample, {"crop.format": "png"})
    M.validate_manifest(df, base_dir=tmp_path)
    kept = df[df[M.STATUS] == "kept"]
    assert len(kept) and all(p.endswith(".png") for p in kept[M.CROP_PATH])
    cfg = crop.load_crop_params(str(tmp_path / "params.yaml"))["face"]
    for row in kept.head(5).itertuples(index=False):
        row = row._asdict()
        rgb = np.asarray(Image.open(small_sample / row[M.IMAGE_PATH]).convert("RGB"))
        box = tuple(int(row[c]) for c in (M.BBOX_X, M.BBOX_Y, M.BBOX_W, M.BBOX_H))
        with Image.open(tmp_path / row[M.CROP_PATH]) as img:
            assert img.format == "PNG"
            assert np.array_equal(np.asarray(img.convert("RGB")), face_crop(rgb, box, cfg))
    paths = [str(tmp_path / p) for p in kept[M.CROP_PATH]]
    assert pack_crops(paths, tmp_path / "packed.npy") == len(kept)
    jpeg, _ = run_crop(tmp_path / "jpeg", small_sample)  # the default: the same faces, .jpg names
    assert list(jpeg[M.CROP_PATH].str.replace(".jpg", ".png")) == list(df[M.CROP_PATH])
    write_params(tmp_path / "bad.yaml", {"crop.format": "webp"})
    with pytest.raises(ValueError, match=r"crop\.format must be one of"):
        crop.load_crop_params(str(tmp_path / "bad.yaml"))


def test_crop_names_never_collide():
    # The reproduced leak: vcol.jpg (identity A) and vcol_jpg.jpg (identity B) shared one crop.
    names = crop_names(["vcol.jpg", "vcol.png", "vcol_jpg.jpg", "a.jpg", "a.png", "b.jpg"])
    assert len(set(names.values())) == len(names)
    assert names["vcol.jpg"].startswith("vcol_") and names["vcol_jpg.jpg"].startswith("vcol-jpg_")
    png = crop_names(list(names), fmt="png")  # the same names but for the extension
    assert png == {n: c.removesuffix(".jpg") + ".png" for n, c in names.items()}


def linked_subset(celeba_dev: Path, dst: Path, step: int) -> tuple[Path, list[str]]:
    """Every ``step``-th celeba-dev photo in a CelebA-layout folder of symlinks (nothing copied)."""
    (dst / "img_celeba").mkdir(parents=True)
    names = sorted(p.name for p in (celeba_dev / "img_celeba").iterdir())[::step]
    for name in names:
        (dst / "img_celeba" / name).symlink_to(celeba_dev / "img_celeba" / name)
    for name in ("identity_CelebA.txt", "list_attr_celeba.txt", "list_eval_partition.txt"):
        (dst / name).symlink_to(celeba_dev / name)
    return dst, names


@pytest.mark.slow
def test_real_faces_keep_rate(celeba_dev, tmp_path):
    """The stage on 120 real in-the-wild CelebA photos."""
    data, names = linked_subset(celeba_dev, tmp_path / "celeba", 18)
    df, metrics = run_crop(tmp_path / "work", data)
    M.validate_manifest(df, base_dir=tmp_path / "work")
    assert metrics["n_input"] == len(names)
    assert metrics["keep_rate"] >= 0.85, metrics
    assert metrics["annotations"]["images_without_attributes"] == int(df["Male"].isna().sum())
    shutil.rmtree(tmp_path / "work" / "data" / "crops")


@pytest.mark.parametrize("detector", ["dlib_hog", "haar"])
def test_dlib_detection_on_real_faces(celeba_dev, tmp_path, detector):
    """dlib's HOG detector in the stage: boxes in the manifest, square display crops of crop.size."""
    pytest.importorskip("dlib", reason="dlib not installed: pip install -r requirements-face.txt")
    data, names = linked_subset(celeba_dev, tmp_path / "celeba", 100)
    df, metrics = run_crop(tmp_path / "work", data, {"crop.detector": detector, "crop.size": 150})
    M.validate_manifest(df, base_dir=tmp_path / "work")
    kept = df[df[M.STATUS] == "kept"]
    assert len(kept) >= 0.8 * len(names), metrics
    assert kept[list(M.LANDMARK_COLUMNS)].isna().all().all()
    assert set(kept[M.DETECTOR]) <= ({"dlib_hog"} if detector == "dlib_hog" else {"haar_frontal", "haar_frontal_retry",
                                                                                   "haar_profile"})  # fmt: skip
    for path in kept[M.CROP_PATH]:
        assert Image.open(tmp_path / "work" / path).size == (150, 150)


@pytest.fixture
def hostile_data(small_sample) -> tuple[Path, dict[str, str], str]:
    """The small sample plus every hostile entry, BOM-prefixed identities, bad ids and one conflicting row."""
    img_dir = small_sample / "img_celeba"
    cfg = DetectorConfig()
    face_file = next(
        p for p in sorted(img_dir.glob("*.jpg")) if detect_face(np.asarray(Image.open(p).convert("RGB")), cfg).chosen
    )
    expected = H.hostile_folder(img_dir, face_file.read_bytes())
    H.make_sparse(img_dir / "huge_no_id.jpg")  # no identity row: only the contact sheet might touch it
    expected["huge_no_id.jpg"] = "no_identity"
    for name in ("superscript_id.jpg", "overflow_id.jpg"):
        (img_dir / name).write_bytes(face_file.read_bytes())
        expected[name] = "no_identity"  # their rows are malformed
    ids = (small_sample / IDENTITY_FILE).read_text().splitlines()
    ambiguous = ids[-1].split()[0]
    expected[ambiguous] = "ambiguous_identity"
    rows = [f"{n} 90001" for n in H.identity_names(expected) if n not in expected or expected[n] != "no_identity"]
    rows += [f"{ambiguous} 77777", "superscript_id.jpg \u00b2", f"overflow_id.jpg {2**64}"]
    (small_sample / IDENTITY_FILE).write_bytes(("\ufeff" + "\n".join(ids + rows) + "\n").encode())
    return small_sample, expected, ids[0].split()[0]


def test_hostile_folder_every_entry_one_row(hostile_data, tmp_path):
    data, expected, first = hostile_data
    base, _ = run_crop(tmp_path / "base", data, {"crop.max_file_bytes": 2**20})  # for the good photos' outcome
    # Two loky workers: the strict JPEG check and the guards work in worker processes too.
    df, metrics = run_crop(tmp_path / "work", data, {"crop.max_file_bytes": 2**20, "execution.n_jobs": 2})
    M.validate_manifest(df, base_dir=tmp_path / "work")
    entries = sorted(storable_name(n) for n in os.listdir(os.fsencode(data / "img_celeba")))
    assert sorted(df[M.FILE_NAME]) == entries  # every entry exactly once, FIFOs and bad names included
    got = dict(zip(df[M.FILE_NAME], df[M.REASON].fillna("kept"), strict=True))
    assert {n: got[n] for n in expected} == expected
    # The good photos are unaffected by their hostile neighbours.
    good = base[~base[M.FILE_NAME].isin(expected)]
    assert good[M.STATUS].eq("kept").sum() >= len(good) - 3
    pd.testing.assert_series_equal(
        df.set_index(M.FILE_NAME).loc[good[M.FILE_NAME], M.STATUS], good.set_index(M.FILE_NAME)[M.STATUS]
    )
    # The BOM did not eat the first row's identity.
    assert df.loc[df[M.FILE_NAME] == first, M.IDENTITY].notna().all()
    ann = metrics["annotations"]
    assert ann["conflicting_rows"][IDENTITY_FILE] == 1 and ann["ambiguous_identity_images"] == 1
    assert ann["malformed_rows"][IDENTITY_FILE] == 2
    assert metrics["n_kept"] + sum(metrics["rejected"].values()) == metrics["n_input"] == len(entries)
    assert Image.open(tmp_path / "work/reports/crops.png").size[0] > 0
    crops = df.loc[df[M.STATUS] == "kept", M.CROP_PATH]
    assert crops.is_unique and all(len(Path(c).name) <= 64 for c in crops)


def test_contact_sheet_failure_never_fails_the_stage(small_sample, tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise MemoryError("sheet")

    monkeypatch.setattr(crop, "contact_sheet", broken)
    df, _ = run_crop(tmp_path, small_sample)
    assert len(df) and Image.open(tmp_path / "reports/crops.png").size == (128, 128)


def test_timing_is_written_apart_from_metrics(small_sample, tmp_path):
    run_crop(tmp_path, small_sample)
    params = tmp_path / "params.yaml"
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        crop.main(["--data", str(small_sample), "--crops", "data/crops", "--manifest", "data/manifest.parquet",
                   "--metrics", "metrics/crop.json", "--details", "metrics/details/crop.json",
                   "--sheet", "reports/crops.png", "--params", str(params),
                   "--timing", "reports/crop_timing.json"])  # fmt: skip
    finally:
        os.chdir(cwd)
    timing = json.loads((tmp_path / "reports/crop_timing.json").read_text())
    assert timing["n_jobs"] == 1 and timing["images_per_second"] > 0
    details = json.loads((tmp_path / "metrics/details/crop.json").read_text())
    assert not {"seconds", "images_per_second", "images_per_second_per_job", "n_jobs"} & set(details)
    # The headline (what `dvc metrics show` prints for crop) is the details' few keys, the same values.
    headline = json.loads((tmp_path / "metrics/crop.json").read_text())
    assert headline == {k: details[k] for k in crop.HEADLINE}
    assert headline == {"n_input": details["n_input"], "keep_rate": details["keep_rate"]}


def test_execution_knobs_left_in_crop_block_fail_loudly(tmp_path):
    write_params(tmp_path / "old.yaml", {"crop.n_jobs": 4})
    with pytest.raises(ValueError, match="execution"):
        crop.load_crop_params(str(tmp_path / "old.yaml"))
    write_params(tmp_path / "typo.yaml", {"execution.njobs": 4})
    with pytest.raises(ValueError, match="unknown keys"):
        crop.load_execution(str(tmp_path / "typo.yaml"))


def test_folder_layout_manifest_matches_celeba(small_sample, tmp_path):
    # The same photos one folder per person: the same kept rows and identities, named, no attributes.
    celeba, celeba_metrics = run_crop(tmp_path / "celeba", small_sample)
    people = person_folders(small_sample, tmp_path / "people")
    folders, metrics = run_crop(tmp_path / "folders", people)
    M.validate_manifest(folders, base_dir=tmp_path / "folders")
    assert metrics["layout"] == "folders" and celeba_metrics["layout"] == "celeba"
    assert celeba[M.PERSON].isna().all()
    assert folders[M.IMAGE_PATH].tolist() == sorted(str(p.relative_to(people)) for p in people.rglob("*.jpg"))
    same = [M.STATUS, M.REASON, M.SHA256, M.N_FACES, M.DETECTOR, M.BBOX_X, M.BBOX_Y, M.BBOX_W, M.BBOX_H]
    by_name = folders.assign(**{M.FILE_NAME: folders[M.FILE_NAME].str.split("/").str[1]}).set_index(M.FILE_NAME)
    expected = celeba.set_index(M.FILE_NAME).loc[by_name.index]
    pd.testing.assert_frame_equal(by_name[same], expected[same], check_index_type=False)
    # A person folder's identity is a function of its name (layouts.person_identity), not of its rank.
    assert by_name[M.IDENTITY].tolist() == [person_identity(f"Person_{i:05d}") for i in expected[M.IDENTITY]]
    assert by_name[M.PERSON].tolist() == [f"Person_{i:05d}" for i in expected[M.IDENTITY]]
    assert folders[list(ATTRIBUTE_NAMES)].isna().all().all() and folders[M.PARTITION].isna().all()
    assert metrics["n_kept"] == celeba_metrics["n_kept"]
    # Byte-identical manifests for the same folder and params.
    first = (tmp_path / "folders/data/manifest.parquet").read_bytes()
    run_crop(tmp_path / "folders", people)
    assert (tmp_path / "folders/data/manifest.parquet").read_bytes() == first


def test_folder_layout_hostile_entries_one_row_each(small_sample, tmp_path):
    people = person_folders(small_sample, tmp_path / "people")
    good = next(people.rglob("*.jpg")).read_bytes()
    raw = os.fsencode(people)
    for rel in (b"caf\xe9/1.jpg", b".hidden/1.jpg", b"loose.jpg"):
        os.makedirs(os.path.dirname(os.path.join(raw, rel)), exist_ok=True)
        with open(os.path.join(raw, rel), "wb") as fh:
            fh.write(good)
    H.make_fifo(people / "Person_00872" / "pipe.jpg")
    (people / "Person_00872" / "notes.txt").write_text("not a photo")
    with pytest.raises(Exception, match="not a labelled layout"):
        run_crop(tmp_path / "auto", people)  # loose.jpg: auto refuses to guess
    df, metrics = run_crop(tmp_path / "work", people, {"data.layout": "folders"})
    M.validate_manifest(df, base_dir=tmp_path / "work")
    reason = dict(zip(df[M.IMAGE_PATH], df[M.REASON], strict=True))
    assert {k: reason[k] for k in ("caf\\xe9/1.jpg", ".hidden", "loose.jpg", "Person_00872/pipe.jpg",
                                  "Person_00872/notes.txt")} == {
        "caf\\xe9/1.jpg": "bad_file_name", ".hidden": "hidden_file", "loose.jpg": "not_in_a_person_folder",
        "Person_00872/pipe.jpg": "not_a_file", "Person_00872/notes.txt": "not_an_image",
    }  # fmt: skip
    photos = {str(p.relative_to(people)) for p in people.glob("Person_*/*.jpg")} - {"Person_00872/pipe.jpg"}
    assert len(df) == len(photos) + 5 == metrics["n_input"]
    assert metrics["n_kept"] + sum(metrics["rejected"].values()) == len(df)


def test_image_guards_are_params_keys_with_defaults(repo_root):
    # The evaluate CLI reads and writes chips with these: each must be a crop.* key of params.yaml
    # (a renamed key would silently fall back to its default), and an empty block gives the defaults.
    from facesearch.params import load_params

    block = load_params(repo_root / "params.yaml")["crop"]
    guards = image_guards(block)
    assert set(guards) <= set(block)
    assert guards == {k: block[k] for k in guards}
    assert image_guards({})["format"] == "jpeg" and image_guards({"max_aspect": 3.0})["max_aspect"] == 3.0
