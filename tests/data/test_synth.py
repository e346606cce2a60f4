from __future__ import annotations

import hashlib

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from facesearch.data.celeba import ATTRIBUTE_NAMES, find_image_dir, list_images, read_annotations
from facesearch.data.synth import SampleSpec, generate_sample
from facesearch.faces.haar import DetectorConfig, detect_face


def digest(root) -> dict[str, str]:
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def test_same_spec_same_bytes(tmp_path):
    spec = SampleSpec(identities=3, images_per_identity=2, seed=5)
    generate_sample(spec, tmp_path / "a")
    generate_sample(spec, tmp_path / "b")
    assert digest(tmp_path / "a") == digest(tmp_path / "b")
    generate_sample(SampleSpec(identities=3, images_per_identity=2, seed=6), tmp_path / "c")
    assert digest(tmp_path / "a") != digest(tmp_path / "c")


def test_workers_and_chunks_do_not_change_the_bytes(tmp_path):
    spec = SampleSpec(identities=3, images_per_identity=3, seed=5)
    generate_sample(spec, tmp_path / "a")
    # Chunks of 2 photos over 2 workers: results come back from several tasks, in order.
    generate_sample(spec, tmp_path / "b", n_jobs=2, chunk=2)
    assert digest(tmp_path / "a") == digest(tmp_path / "b")


def test_photo_width_sets_the_size_of_the_photos(tmp_path):
    def sizes(spec, out):
        generate_sample(spec, out)
        return [Image.open(p).size for p in sorted((out / "img_celeba").glob("*.jpg"))]

    for lo, hi in [(100, 112), (220, 340)]:
        found = sizes(SampleSpec(identities=2, images_per_identity=4, seed=1, photo_width=[lo, hi]), tmp_path / str(lo))
        assert all(lo <= w < hi and 0.8 * w - 1 <= h <= 1.3 * w for w, h in found), found
    assert SampleSpec().photo_width == (220, 340)  # the renderer's historical range: same bytes as before
    with pytest.raises(ValueError, match="photo_width"):
        SampleSpec(photo_width=(64, 64))


def test_layout_is_celeba_and_complete(sample_factory):
    root = sample_factory(identities=8, images_per_identity=5, seed=2)
    names = list_images(find_image_dir(root))
    assert names == [f"{i:06d}.jpg" for i in range(1, 41)]
    ann = read_annotations(root)
    assert set(ann.identities) == set(names) and len(set(ann.identities.values())) == 8
    assert set(ann.partitions) == set(names)
    assert ann.report.attribute_header_count == 40 and ann.report.attribute_rows == 40
    assert not any(ann.report.malformed_rows.values()) and not ann.report.missing_files
    assert list(ann.attributes.columns) == list(ATTRIBUTE_NAMES)
    # The partition is identity-disjoint, as CelebA's is.
    part = pd.Series(ann.partitions).groupby(pd.Series(ann.identities)).nunique()
    assert (part == 1).all()


def test_attributes_are_consistent_with_the_drawing_rules(sample_factory):
    root = sample_factory(identities=20, images_per_identity=6, seed=4)
    ann = read_annotations(root)
    attrs = ann.attributes.astype(bool)
    ids = pd.Series(ann.identities).reindex(attrs.index)
    hair = attrs[["Black_Hair", "Blond_Hair", "Brown_Hair", "Gray_Hair"]].sum(axis=1)
    assert (hair <= 1).all()
    assert not (attrs["Bald"] & (hair > 0)).any()
    assert not (attrs["Mustache"] & ~attrs["Male"]).any()
    assert not (attrs["Goatee"] & attrs["No_Beard"]).any()
    # Traits of the person are constant per identity; accessories and expression vary.
    per_identity = attrs.groupby(ids).nunique()
    for trait in ("Male", "Pale_Skin", "Bald", "Black_Hair", "Blond_Hair", "No_Beard", "Mustache", "Young"):
        assert (per_identity[trait] == 1).all(), trait
    for varying in ("Smiling", "Wearing_Hat"):
        assert (per_identity[varying] > 1).any(), varying
    for common in ("Male", "Smiling", "Eyeglasses", "Wearing_Hat", "Black_Hair"):
        assert 0 < attrs[common].mean() < 1, common


def test_haar_finds_at_least_90_percent_of_drawn_faces(sample_factory):
    spec = dict(identities=25, images_per_identity=4, seed=11, face_prob=1.0)
    root = sample_factory(**spec)
    cfg = DetectorConfig()
    photos = sorted((root / "img_celeba").glob("*.jpg"))
    found = sum(detect_face(np.asarray(Image.open(p).convert("RGB")), cfg).chosen is not None for p in photos)
    assert found / len(photos) >= 0.9, f"{found}/{len(photos)}"


def test_face_prob_zero_gives_no_faces(sample_factory):
    root = sample_factory(identities=3, images_per_identity=3, seed=0, face_prob=0.0)
    cfg = DetectorConfig(profile_fallback=False)
    photos = sorted((root / "img_celeba").glob("*.jpg"))
    found = sum(detect_face(np.asarray(Image.open(p).convert("RGB")), cfg).chosen is not None for p in photos)
    assert found <= 1  # clutter may rarely look like a face, as in real photos
