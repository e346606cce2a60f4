"""The photo index and the search command: every face indexed, one named after its person, add/remove/info
following the files, full disks and broken files as one line, the JSON lines."""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import broken_files, jpeg_bytes
from PIL import Image

from facesearch.data import manifest as M
from facesearch.data.images import ImageRejected, decode_image
from facesearch.data.manifest import SchemaError
from facesearch.faces.config import FaceConfig
from facesearch.gallery import build as XB
from facesearch.gallery import embedder as XE
from facesearch.gallery import people as XP
from facesearch.gallery import photos
from facesearch.gallery import search as XS
from facesearch.gallery import store as X
from facesearch.nets.contract import preprocessing_record
from facesearch.nets.models import get_model, save_model
from facesearch.nets.transforms import to_model_input
from facesearch.retrieval.verdict import FALLBACK_THRESHOLD, verdict
from facesearch.tools.cli import main as cli

CROP = FaceConfig(size=40)  # the tiny models' preprocessing


def tiny_model(path: Path, seed: int, faces: np.ndarray) -> Path:
    """An untrained 16-d MobileNet-V2 at 32 px that records its crops, as a trained model file does.

    Its batch-norm statistics are those of ``faces`` (crops): with the initial ones every photo
    embeds to nearly the same vector (cosines of 1.0000 between different people), with these
    they spread (0.5-0.98), so a face's nearest neighbour is itself, not float32 noise.
    """
    torch.manual_seed(seed)
    model = get_model("mobilenet_v2", weights="none", embedding_dim=16, img_size=32, trainable_layers=-1)
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.reset_running_stats()
            module.momentum = None  # a plain average over the batch below
    model.train()
    with torch.no_grad():
        model(to_model_input(torch.from_numpy(faces), 32, "cpu"))
    save_model(path, model.eval(), extra={"preprocessing": preprocessing_record(CROP, 32)})
    return path


@pytest.fixture(scope="module")
def models(people, tmp_path_factory) -> dict[str, Path]:
    faces = []
    for path in all_files(people):
        rgb = decode_image(path.read_bytes(), 40_000_000).rgb
        faces.append(photos.crops(rgb, photos.detect(rgb, CROP), CROP))
    d = tmp_path_factory.mktemp("models")
    return {name: tiny_model(d / f"{name}.pt", seed, np.concatenate(faces)) for name, seed in (("a", 0), ("b", 1))}


@pytest.fixture(scope="module")
def people(sample_factory, tmp_path_factory) -> Path:
    """``<root>/<person>/*.jpg``: 4 synthetic people x 3 photos (a few with a bystander or no face)."""
    src = sample_factory(identities=4, images_per_identity=3, seed=5)
    root = tmp_path_factory.mktemp("people") / "photos"
    for line in (src / "identity_CelebA.txt").read_text().splitlines():
        name, ident = line.split()
        (root / f"person{ident}").mkdir(parents=True, exist_ok=True)
        shutil.copy(src / "img_celeba" / name, root / f"person{ident}" / name)
    return root


def copy_of(people: Path, tmp_path: Path, only: int | None = None) -> Path:
    """A private copy of ``people``; ``only``: the first ``only`` photos of each person."""
    dst = tmp_path / "photos"
    for person in sorted(people.iterdir()):
        (dst / person.name).mkdir(parents=True)
        for photo in sorted(person.iterdir())[:only]:
            shutil.copy(photo, dst / person.name / photo.name)
    return dst


def all_files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file())


def faces_of(path: Path) -> tuple:
    """What the detector finds in a photo at full resolution, independently of the index."""
    return photos.detect(decode_image(path.read_bytes(), 40_000_000).rgb, CROP).boxes


def named(root: Path) -> set[str]:
    """The person folders under ``root`` in which the detector finds a face."""
    return {p.parent.name for p in all_files(root) if p.parent != root and faces_of(p)}


def count_embeds(monkeypatch) -> list[int]:
    """Record how many crops each forward pass of the index embeds."""
    calls: list[int] = []
    real = photos.embed

    def spy(model, crops, *args, **kwargs):
        calls.append(len(crops))
        return real(model, crops, *args, **kwargs)

    monkeypatch.setattr(photos, "embed", spy)
    return calls


def search_lines(capsys, *args: str) -> list[dict]:
    capsys.readouterr()
    cli(["search", *args, "--json"])
    return [json.loads(line) for line in capsys.readouterr().out.splitlines()]


def flat(line: dict) -> list[dict]:
    """A search line's faces in rank order: each entry's best face, then its person's other faces."""
    return [face for r in line["results"] for face in (r, *r["also"])]


def failure(args: list[str]) -> str:
    """The message of a command that must fail with one line and a non-zero exit."""
    with pytest.raises(SystemExit) as exc:
        cli(args)
    message = str(exc.value.code)
    assert exc.value.code not in (0, None) and "\n" not in message and "Traceback" not in message
    return message


def versions(folder: Path) -> list[str]:
    return sorted(d.name for d in folder.iterdir() if d.is_dir())


# --- build -----------------------------------------------------------------------------------
def test_build_indexes_every_face_named_by_folder(models, people, tmp_path):
    photos_dir = copy_of(people, tmp_path)
    report = XB.build(str(models["a"]), str(photos_dir), tmp_path / "idx")
    index = X.load_index(tmp_path / "idx")
    expected = {p.relative_to(photos_dir).as_posix(): faces_of(p) for p in all_files(photos_dir)}
    assert sum(map(len, expected.values())) == len(index.faces) == report.faces > 0
    assert any(len(b) > 1 for b in expected.values())  # a photo with a bystander: both faces are indexed
    for rel, boxes in expected.items():
        rows = index.faces[index.faces[X.PHOTO] == rel]
        assert [tuple(r) for r in rows[[X.BOX_X, X.BOX_Y, X.BOX_W, X.BOX_H]].to_numpy()] == list(boxes)
        assert rows[X.FACE].tolist() == list(range(1, len(boxes) + 1))
        photo = index.photos[index.photos[X.PHOTO] == rel].iloc[0]
        assert photo[X.SHA256] == hashlib.sha256((photos_dir / rel).read_bytes()).hexdigest()
        assert photo[X.PERSON] == rel.split("/")[0] and photo[X.ROOT] == str(photos_dir)
        assert photo[X.N_FACES] == len(boxes)
        assert photo[X.REASON] == "no_face" if not boxes else pd.isna(photo[X.REASON])
    # One face of each photo is named after its person (the tiny model's faces all agree at the fallback
    # threshold): the lone face, or the one of two most like the person's other photos; the other stays unnamed.
    with_faces = index.photos[index.photos[X.N_FACES] > 0]
    named_faces = index.faces[index.faces[X.PERSON].notna()]
    assert sorted(named_faces[X.SHA256]) == sorted(with_faces[X.SHA256]) and not report.person_notes
    assert (named_faces[X.PERSON] == named_faces[X.PHOTO].str.split("/").str[0]).all()
    assert index.faces[X.PERSON].isna().sum() == len(index.faces) - len(with_faces) > 0  # the bystander
    assert set(named_faces[X.PERSON]) == named(photos_dir) and report.people == len(named(photos_dir))
    assert index.record["roots"] == {str(photos_dir): "folders"}
    assert index.record["people"] == {"threshold": FALLBACK_THRESHOLD, "source": "fallback"}
    assert index.photos[X.PHOTO].tolist() == sorted(expected, key=lambda r: r.split("/"))
    # The embedding of a face is the model's embedding of the crop photos.crop cuts of its box.
    row = index.faces.iloc[0]
    rgb = decode_image((photos_dir / row[X.PHOTO]).read_bytes(), 40_000_000).rgb
    crop = photos.crop(rgb, tuple(int(row[c]) for c in (X.BOX_X, X.BOX_Y, X.BOX_W, X.BOX_H)), CROP)
    own = XE.Embedder.load(models["a"]).embed(crop[None])
    assert np.allclose(index.embeddings[0], own[0], atol=1e-5)
    assert np.allclose(np.linalg.norm(index.embeddings, axis=1), 1, atol=1e-5)
    assert index.record["model"]["fingerprint"] == XE.model_fingerprint(torch.load(models["a"], weights_only=True))
    assert index.record["structure"] == "exact" and not (tmp_path / "idx" / index.version / X.GRAPH).exists()


def test_boxes_are_in_the_photos_own_pixels(models, people, tmp_path):
    """A photo three times larger has its face box three times larger (not in a shrunk copy's pixels)."""
    small = next(p for p in all_files(people) if len(faces_of(p)) == 1)
    img = Image.open(small)
    big = img.resize((img.width * 3, img.height * 3), Image.LANCZOS)
    (tmp_path / "p").mkdir()
    shutil.copy(small, tmp_path / "p" / "small.jpg")
    (tmp_path / "p" / "big.jpg").write_bytes(jpeg_bytes(big, quality=95))
    XB.build(str(models["a"]), str(tmp_path / "p"), tmp_path / "idx")
    faces = X.load_index(tmp_path / "idx").faces.set_index(X.PHOTO)
    b, s = faces.loc["big.jpg"], faces.loc["small.jpg"]
    assert b[X.BOX_W] == pytest.approx(3 * s[X.BOX_W], rel=0.15)
    assert b[X.BOX_X] == pytest.approx(3 * s[X.BOX_X], abs=0.15 * 3 * s[X.BOX_W])


def test_hostile_files_are_counted_skips(models, people, tmp_path):
    photos_dir = copy_of(people, tmp_path, only=1)
    good = all_files(photos_dir)[0].read_bytes()
    expected_names = named(photos_dir)
    bad = photos_dir / "person_bad"
    bad.mkdir()
    expected = {}
    for name, data in broken_files(good).items():
        (bad / name).write_bytes(data)
        try:
            decode_image(data, 40_000_000)
        except ImageRejected as exc:  # the decoder's reason is the photo's
            expected[f"person_bad/{name}"] = exc.reason
    (bad / ".DS_Store").write_bytes(b"\0\1")
    os.mkfifo(bad / "pipe.jpg")  # opening it would block the run
    (bad / "loop").symlink_to(bad, target_is_directory=True)  # followed, it would never end
    (bad / "dangling.jpg").symlink_to(bad / "nowhere.jpg")
    (bad / "copy.jpg").write_bytes(good)  # the same content twice is indexed once
    Image.new("RGB", (200, 160), (90, 120, 150)).save(bad / "blank.jpg")
    report = XB.build(str(models["a"]), str(photos_dir), tmp_path / "idx")
    index = X.load_index(tmp_path / "idx")
    reasons = dict(zip(index.photos[X.PHOTO], index.photos[X.REASON], strict=True))
    assert len(expected) == len(broken_files(good)) and {r: reasons[r] for r in expected} == expected
    assert {reasons[f"person_bad/{n}"] for n in ("text.jpg", "zero.jpg", "bomb.png", "truncated.jpg")} == {
        "not_an_image", "empty_file", "too_large", "truncated"}  # fmt: skip
    assert reasons["person_bad/blank.jpg"] == "no_face"
    skips = {s.photo: s.reason for s in report.skips}
    assert skips == {"person_bad/.DS_Store": "hidden_file", "person_bad/pipe.jpg": "not_a_file",
                     "person_bad/loop": "not_a_file", "person_bad/dangling.jpg": "not_a_file",
                     "person_bad/copy.jpg": "duplicate"}  # fmt: skip
    assert report.photos == int((index.photos[X.N_FACES] > 0).sum()) == index.faces[X.SHA256].nunique()
    assert set(index.faces[X.PERSON]) == expected_names  # the bad folder gave no face


def test_layouts(models, people, tmp_path):
    mixed = copy_of(people, tmp_path, only=1)
    loose = all_files(people)[-1]
    shutil.copy(loose, mixed / "loose.jpg")
    assert XB.build(str(models["a"]), str(mixed), tmp_path / "auto").people == 0  # not all one folder deep: plain
    assert X.load_index(tmp_path / "auto").faces[X.PERSON].isna().all()
    assert X.load_index(tmp_path / "auto").record["roots"] == {str(mixed): "plain"}
    report = XB.build(str(models["a"]), str(mixed), tmp_path / "folders", layout="folders")
    assert [(s.photo, s.reason) for s in report.skips] == [("loose.jpg", M.Reason.NOT_IN_A_PERSON_FOLDER)]
    assert report.people == len(named(mixed))
    flat = tmp_path / "flat"
    flat.mkdir()
    shutil.copy(loose, flat / "one.jpg")
    assert XB.build(str(models["a"]), str(flat), tmp_path / "plain").people == 0
    nested = XB.build(str(models["a"]), str(people), tmp_path / "named", layout="plain")
    assert nested.people == 0 and nested.faces > 0


def test_build_refuses_to_overwrite(models, people, tmp_path):
    XB.build(str(models["a"]), str(people), tmp_path / "idx")
    with pytest.raises(XE.PhotoIndexError, match="index already"):
        XB.build(str(models["a"]), str(people), tmp_path / "idx")
    first = X.load_index(tmp_path / "idx").version
    XB.build(str(models["a"]), str(people), tmp_path / "idx", force=True)
    assert X.load_index(tmp_path / "idx").version.startswith("v000002") and first.startswith("v000001")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "keep.txt").write_text("mine")
    with pytest.raises(XE.PhotoIndexError, match="not a photo index"):
        XB.build(str(models["a"]), str(people), tmp_path / "other")


# --- add, remove -----------------------------------------------------------------------------
def test_add_embeds_only_new_photos(models, people, tmp_path, monkeypatch):
    photos_dir = copy_of(people, tmp_path, only=2)
    XB.build(str(models["a"]), str(photos_dir), tmp_path / "idx")
    before = X.load_index(tmp_path / "idx")
    for person in people.iterdir():  # the third photo of everyone arrives
        for photo in sorted(person.iterdir())[2:]:
            shutil.copy(photo, photos_dir / person.name / photo.name)
    new = [p for p in all_files(photos_dir) if p.relative_to(photos_dir).as_posix() not in set(before.photos[X.PHOTO])]
    calls = count_embeds(monkeypatch)
    report = XB.add(tmp_path / "idx", str(photos_dir))
    assert sum(calls) == sum(len(faces_of(p)) for p in new) == report.added_faces > 0
    assert {s.reason for s in report.skips} == {XB.ALREADY_INDEXED} and len(report.skips) == len(before.photos)
    after = X.load_index(tmp_path / "idx")
    assert np.array_equal(after.embeddings[: len(before.faces)], before.embeddings)  # old faces untouched
    # The same index a build of everything gives (same faces, boxes and embeddings).
    XB.build(str(models["a"]), str(photos_dir), tmp_path / "all")
    whole = X.load_index(tmp_path / "all")
    key = [X.PHOTO, X.FACE]
    a, w = after.faces.sort_values(key), whole.faces.sort_values(key)
    assert a.reset_index(drop=True).equals(w.reset_index(drop=True))
    assert np.allclose(after.embeddings[a.index], whole.embeddings[w.index], atol=1e-5)
    # Nothing new: no forward pass, no new version.
    calls.clear()
    again = XB.add(tmp_path / "idx", str(photos_dir))
    assert calls == [] and again.version is None and X.load_index(tmp_path / "idx").version == after.version


@pytest.mark.parametrize("through", ["root", "person folder"])
def test_add_replaces_an_edited_photo(models, people, tmp_path, through):
    """Overwritten with another person's photo, and added through the root or a sub-folder of it: one photo."""
    photos_dir = copy_of(people, tmp_path, only=2)
    XB.build(str(models["a"]), str(photos_dir), tmp_path / "idx")
    before = X.load_index(tmp_path / "idx")
    edited = all_files(photos_dir)[0]
    other = next(p for p in all_files(photos_dir) if p.parent != edited.parent and len(faces_of(p)) == 1)
    edited.write_bytes(jpeg_bytes(Image.open(other).transpose(Image.FLIP_LEFT_RIGHT)))  # same path, new content
    report = XB.add(tmp_path / "idx", str(photos_dir if through == "root" else edited.parent))
    after = X.load_index(tmp_path / "idx")
    rel = edited.relative_to(photos_dir).as_posix()
    assert report.replaced_photos == 1 and report.added_photos == 1 and len(after.photos) == len(before.photos)
    row = after.photos.set_index(X.PHOTO).loc[rel]
    assert row[X.SHA256] == hashlib.sha256(edited.read_bytes()).hexdigest() and row[X.ROOT] == str(photos_dir)
    assert row[X.PERSON] == edited.parent.name  # the folder's person, through either way in
    old_sha = before.photos.set_index(X.PHOTO).at[rel, X.SHA256]
    assert old_sha not in set(after.faces[X.SHA256]) and (after.faces[X.PHOTO] == rel).sum() == len(faces_of(edited))
    assert set(after.record["roots"]) == {str(photos_dir)}  # no second root for the sub-folder
    # The old content is gone for good: adding it again (elsewhere) is not "already indexed".
    (tmp_path / "later").mkdir()
    (tmp_path / "later" / "old.jpg").write_bytes((people / rel).read_bytes())
    assert XB.add(tmp_path / "idx", str(tmp_path / "later")).added_photos == 1
    assert XB.add(tmp_path / "idx", str(edited.parent)).version is None  # nothing new under the folder now


def test_add_through_a_sub_folder_keeps_the_roots_layout(models, people, tmp_path):
    """A new photo added through its person folder is that person's, under the indexed root."""
    photos_dir = copy_of(people, tmp_path, only=1)
    XB.build(str(models["a"]), str(photos_dir), tmp_path / "idx")
    person = sorted(photos_dir.iterdir())[0]
    new = next(p for p in sorted((people / person.name).iterdir())[1:] if len(faces_of(p)) == 1)
    shutil.copy(new, person / "new.jpg")
    report = XB.add(tmp_path / "idx", str(person))  # alone, this folder would be "plain" (photos in its root)
    index = X.load_index(tmp_path / "idx")
    row = index.photos.set_index(X.PHOTO).loc[f"{person.name}/new.jpg"]
    assert report.added_photos == 1 and row[X.ROOT] == str(photos_dir) and row[X.PERSON] == person.name
    assert index.faces.set_index(X.PHOTO).at[f"{person.name}/new.jpg", X.PERSON] == person.name
    with pytest.raises(XE.PhotoIndexError, match="indexed with layout folders"):
        XB.add(tmp_path / "idx", str(person), layout="plain")


def test_remove_by_path_folder_or_content(models, people, tmp_path, monkeypatch):
    photos_dir = copy_of(people, tmp_path)
    XB.build(str(models["a"]), str(photos_dir), tmp_path / "idx")
    before = X.load_index(tmp_path / "idx")
    files = all_files(photos_dir)
    elsewhere = tmp_path / "copy.jpg"
    shutil.copy(files[1], elsewhere)  # found by its content
    person = sorted(photos_dir.iterdir())[-1]
    monkeypatch.chdir(photos_dir)  # a relative path is taken from the current folder, as in a shell
    stored = files[2].relative_to(photos_dir).as_posix()
    report = XB.remove(tmp_path / "idx", [str(files[0]), str(elsewhere), stored, str(person), "nothing.jpg"])
    gone = {f.relative_to(photos_dir).as_posix() for f in (files[0], files[1], files[2], *person.iterdir())}
    after = X.load_index(tmp_path / "idx")
    assert report.unmatched == ["nothing.jpg"] and report.removed_photos == len(gone)
    assert set(after.photos[X.PHOTO]) == set(before.photos[X.PHOTO]) - gone
    kept = ~before.faces[X.PHOTO].isin(gone).to_numpy()
    assert np.array_equal(after.embeddings, before.embeddings[kept])
    assert XB.remove(tmp_path / "idx", ["nothing.jpg"]).version is None


def test_remove_means_that_path_under_that_root(models, people, tmp_path, monkeypatch):
    """Two roots holding the same relative path: removing it from inside one root leaves the other's."""
    one = copy_of(people, tmp_path / "one", only=1)
    two = tmp_path / "two" / "photos"
    for src in all_files(one):  # the same names, other contents
        (two / src.parent.name).mkdir(parents=True, exist_ok=True)
        (two / src.parent.name / src.name).write_bytes(jpeg_bytes(Image.open(src).transpose(Image.FLIP_LEFT_RIGHT)))
    XB.build(str(models["a"]), str(one), tmp_path / "idx")
    XB.add(tmp_path / "idx", str(two))
    rel = all_files(one)[0].relative_to(one).as_posix()
    monkeypatch.chdir(two)
    report = XB.remove(tmp_path / "idx", [rel])
    left = X.load_index(tmp_path / "idx").photos
    assert report.removed_photos == 1 and set(left.loc[left[X.PHOTO] == rel, X.ROOT]) == {str(one)}
    # A symlinked folder resolves to the indexed one.
    (tmp_path / "link").symlink_to(one, target_is_directory=True)
    monkeypatch.chdir(tmp_path)
    assert XB.remove(tmp_path / "idx", [f"link/{rel}"]).removed_photos == 1
    assert rel not in set(X.load_index(tmp_path / "idx").photos[X.PHOTO])


def test_another_model_is_refused(models, people, tmp_path):
    XB.build(str(models["a"]), str(people), tmp_path / "idx")
    with pytest.raises(XE.PhotoIndexError, match="not the model this index was built with"):
        XB.add(tmp_path / "idx", str(people), model=str(models["b"]))
    with pytest.raises(XE.PhotoIndexError, match="not the model this index was built with"):
        list(XS.search(tmp_path / "idx", [str(all_files(people)[0])], model=str(models["b"])))
    with pytest.raises(SystemExit, match="not the model"):
        cli(["search", "--index", str(tmp_path / "idx"), str(all_files(people)[0]), "--model", str(models["b"])])
    # The same weights and crops re-saved with new metadata (a threshold) are the same model.
    payload = torch.load(models["a"], weights_only=True)
    payload["threshold"] = {"similarity": 0.9, "far": 1e-3, "source": "validation identities"}
    torch.save(payload, tmp_path / "moved.pt")
    assert XB.add(tmp_path / "idx", str(people), model=str(tmp_path / "moved.pt")).added_faces == 0
    shutil.move(models["a"], tmp_path / "away.pt")  # the index's model moved: say so, take --model
    try:
        with pytest.raises(XE.PhotoIndexError, match="pass --model"):
            list(XS.search(tmp_path / "idx", [str(all_files(people)[0])]))
        assert list(XS.search(tmp_path / "idx", [str(all_files(people)[0])], model=str(tmp_path / "away.pt")))
    finally:
        shutil.move(tmp_path / "away.pt", models["a"])
    # Different crops are a different model, whatever the weights.
    payload["preprocessing"] = preprocessing_record(FaceConfig(size=48), 32)
    torch.save(payload, tmp_path / "recropped.pt")
    with pytest.raises(XE.PhotoIndexError, match="not the model"):
        XB.add(tmp_path / "idx", str(people), model=str(tmp_path / "recropped.pt"))


@pytest.mark.parametrize("crash_at", ["write_parquet_atomic", "write_json_atomic", "write_bytes_atomic"])
def test_a_killed_add_or_remove_leaves_the_index_as_it_was(models, people, tmp_path, monkeypatch, crash_at):
    """Killed after some of the new version is written (tables, record, the pointer's temporary file)."""
    photos_dir = copy_of(people, tmp_path, only=2)
    XB.build(str(models["a"]), str(photos_dir), tmp_path / "idx")
    before = X.load_index(tmp_path / "idx")
    for person in people.iterdir():
        for photo in sorted(person.iterdir())[2:]:
            shutil.copy(photo, photos_dir / person.name / photo.name)
    real = getattr(X, crash_at)

    def killed(path, *args, **kwargs):
        if crash_at == "write_bytes_atomic":  # the pointer's temporary file is half written
            with open(Path(path).parent / f".{Path(path).name}.partial.tmp", "wb") as fh:
                fh.write(b"v9")
        else:
            real(path, *args, **kwargs)  # this file is written; the kill comes before the next
        raise KeyboardInterrupt("killed")

    monkeypatch.setattr(X, crash_at, killed)
    for change in (lambda: XB.add(tmp_path / "idx", str(photos_dir)),
                   lambda: XB.remove(tmp_path / "idx", [str(all_files(photos_dir)[0])])):  # fmt: skip
        with pytest.raises(KeyboardInterrupt):
            change()
        now = X.load_index(tmp_path / "idx")
        assert now.version == before.version and now.faces.equals(before.faces) and now.photos.equals(before.photos)
        assert np.array_equal(now.embeddings, before.embeddings)
        # The live one and this kill's half-written one: the kill before it was cleaned by this command.
        assert len(versions(tmp_path / "idx")) == 2
    monkeypatch.setattr(X, crash_at, real)
    assert XB.add(tmp_path / "idx", str(photos_dir)).added_faces > 0
    assert versions(tmp_path / "idx") == sorted([before.version, X.load_index(tmp_path / "idx").version])
    assert not [p for p in (tmp_path / "idx").iterdir() if p.name.endswith(".tmp")]  # the pointer's too


@pytest.mark.parametrize("full_at", ["np.save", "write_parquet_atomic"])
def test_a_full_disk_is_one_line_and_leaves_nothing_behind(models, people, tmp_path, monkeypatch, full_at):
    photos_dir = copy_of(people, tmp_path, only=2)
    idx = str(tmp_path / "idx")
    cli(["index", "build", "--model", str(models["a"]), "--photos", str(photos_dir), "--out", idx])
    before = X.load_index(idx)
    for person in people.iterdir():
        for photo in sorted(person.iterdir())[2:]:
            shutil.copy(photo, photos_dir / person.name / photo.name)

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(*((np, "save") if full_at == "np.save" else (X, full_at)), full)
    commands = [
        ["index", "add", "--index", idx, "--photos", str(photos_dir)],
        ["index", "remove", "--index", idx, "--photos", str(all_files(photos_dir)[0])],
        ["index", "build", "--model", str(models["a"]), "--photos", str(photos_dir), "--out", idx, "--force"],
    ]
    for args in commands:
        message = failure(args)
        assert "No space left on device" in message and f"the index is unchanged (version {before.version})" in message
        now = X.load_index(idx)
        assert now.version == before.version and now.faces.equals(before.faces)
        assert np.array_equal(now.embeddings, before.embeddings)
        assert versions(tmp_path / "idx") == [before.version]  # no half version holds the space the next try needs
    # A first build on a full disk leaves no index, and a folder the next build may use.
    message = failure(["index", "build", "--model", str(models["a"]), "--photos", str(photos_dir), "--out",
                       str(tmp_path / "new")])  # fmt: skip
    assert "nothing was written" in message and versions(tmp_path / "new") == []
    monkeypatch.undo()
    assert XB.build(str(models["a"]), str(photos_dir), tmp_path / "new").faces > 0


def test_stale_versions_are_cleaned_by_the_next_command(models, people, tmp_path):
    """What a killed writer leaves (a version CURRENT never named, the pointer's temporary file) goes next time."""
    photos_dir = copy_of(people, tmp_path, only=1)
    XB.build(str(models["a"]), str(photos_dir), tmp_path / "idx")
    XB.remove(tmp_path / "idx", [str(all_files(photos_dir)[0])])
    live = X.load_index(tmp_path / "idx")
    previous = live.record["previous"]
    assert versions(tmp_path / "idx") == sorted([live.version, previous])
    stale = tmp_path / "idx" / "v000003-0123abcd"
    stale.mkdir()
    (stale / X.EMBEDDINGS).write_bytes(b"\0" * 1000)
    (tmp_path / "idx" / ".CURRENT.x1y2.tmp").write_bytes(b"v0")
    (tmp_path / "idx" / "notes.txt").write_text("mine")  # not the index's: left alone
    assert XB.remove(tmp_path / "idx", ["nothing.jpg"]).version is None  # a command that writes nothing still cleans
    assert versions(tmp_path / "idx") == sorted([live.version, previous])
    assert sorted(p.name for p in (tmp_path / "idx").iterdir() if p.is_file()) == [".lock", "CURRENT", "notes.txt"]


def test_a_second_writer_is_turned_away(models, people, tmp_path):
    XB.build(str(models["a"]), str(people), tmp_path / "idx")
    with X.writing(tmp_path / "idx"), pytest.raises(XE.PhotoIndexError, match="another index command"):
        XB.remove(tmp_path / "idx", [str(all_files(people)[0])])


# --- search, info ----------------------------------------------------------------------------
def test_search_json_lines(models, people, tmp_path, capsys):
    XB.build(str(models["a"]), str(people), tmp_path / "idx")
    index = X.load_index(tmp_path / "idx")
    multi = next(p for p in all_files(people) if len(faces_of(p)) > 1)
    blank = tmp_path / "blank.jpg"
    Image.new("RGB", (200, 160), (90, 120, 150)).save(blank)
    (tmp_path / "text.jpg").write_text("not a photo")
    queries = [str(multi), str(blank), str(tmp_path / "text.jpg"), str(tmp_path / "nowhere.jpg")]
    lines = search_lines(capsys, "--index", str(tmp_path / "idx"), *queries, "--top", "3", "--threshold", "0.5")
    assert [line["photo"] for line in lines] == [str(multi)] * len(faces_of(multi)) + queries[1:]
    person_of = {(ph, tuple(b)): (None if pd.isna(n) else n) for ph, n, *b in zip(
        [str(people / r) for r in index.faces[X.PHOTO]], index.faces[X.PERSON],
        *(index.faces[c] for c in (X.BOX_X, X.BOX_Y, X.BOX_W, X.BOX_H)), strict=True)}  # fmt: skip
    for line, box in zip(lines, faces_of(multi), strict=False):  # the photo's lines, one per face
        assert set(line) == {"photo", "box", "verdict", "person", "similarity", "threshold", "results"}
        assert line["box"] == list(box) and line["threshold"] == 0.5
        assert [r["rank"] for r in line["results"]] == [1, 2, 3]
        for r in line["results"]:
            assert set(r) == {"rank", "person", "similarity", "photo", "box", "photo_status", "also"}
            assert all(set(a) == {"similarity", "photo", "box", "photo_status"} for a in r["also"])
            # An entry is a person (their faces under them, in rank order) or one unnamed face.
            assert [person_of[(f["photo"], tuple(f["box"]))] for f in (r, *r["also"])] == [r["person"]] * (
                1 + len(r["also"])) and (r["person"] is not None or not r["also"])  # fmt: skip
            sims = [f["similarity"] for f in (r, *r["also"])]
            assert sims == sorted(sims, reverse=True) and {f["photo_status"] for f in (r, *r["also"])} == {"current"}
        named = [r["person"] for r in line["results"] if r["person"] is not None]
        assert len(named) == len(set(named))  # one person's photos do not crowd out the rest
        best = [r["similarity"] for r in line["results"]]
        assert best == sorted(best, reverse=True)
        top = line["results"][0]  # an indexed photo finds its own face first
        assert (top["photo"], top["box"]) == (str(multi), list(box)) and top["similarity"] == pytest.approx(1, abs=1e-4)
        assert line["verdict"] == "match" and line["person"] == top["person"] == person_of[(str(multi), box)]
        assert line["similarity"] == top["similarity"]
    # Of the photo's two faces one is its person, the other a bystander: the verdict names each.
    assert sorted(map(str, (line["person"] for line in lines[:2]))) == sorted([multi.parent.name, "None"])
    assert lines[-3] == {"photo": str(blank), "box": None, "verdict": "no_face", "person": None, "reason": "no_face",
                         "results": []}  # fmt: skip
    assert (lines[-2]["verdict"], lines[-2]["reason"]) == ("unreadable", "not_an_image")
    assert (lines[-1]["verdict"], lines[-1]["reason"]) == ("missing", "not_a_file")
    # The verdict is the threshold's: nothing reaches a similarity above 1, and the person is unknown.
    above = search_lines(capsys, "--index", str(tmp_path / "idx"), str(multi), "--threshold", "1.01")
    assert {line["verdict"] for line in above} == {"no_match"} and {line["person"] for line in above} == {"unknown"}
    # --top counts entries: all of them hold every indexed face once.
    wide = search_lines(capsys, "--index", str(tmp_path / "idx"), str(multi), "--top", "100", "--also", "100")
    assert sorted((f["photo"], tuple(f["box"])) for f in flat(wide[0])) == sorted(person_of)
    assert len(wide[0]["results"]) == len(set(person_of.values()) - {None}) + sum(v is None for v in person_of.values())
    capsys.readouterr()
    cli(["search", "--index", str(tmp_path / "idx"), str(multi), str(tmp_path / "nowhere.jpg"), "--top", "2"])
    text = capsys.readouterr().out
    assert f"match: {multi.parent.name} (similarity 1.000 >= threshold" in text and "match: an unnamed face" in text
    assert f"{tmp_path / 'nowhere.jpg'}: no such file (not_a_file)" in text and "also" in text


def test_search_exits_2_when_nothing_could_be_searched(models, people, tmp_path, capsys):
    photos_dir = copy_of(people, tmp_path, only=1)
    XB.build(str(models["a"]), str(photos_dir), tmp_path / "idx")
    blank = tmp_path / "blank.jpg"
    Image.new("RGB", (200, 160), (90, 120, 150)).save(blank)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        cli(["search", "--index", str(tmp_path / "idx"), str(tmp_path / "nowhere.jpg"), str(blank)])
    out, err = capsys.readouterr()
    assert exc.value.code == 2 and "nothing could be searched (missing 1, no_face 1)" in err
    assert "nowhere.jpg: no such file" in out and "blank.jpg: no usable face" in out
    cli(["search", "--index", str(tmp_path / "idx"), str(tmp_path / "nowhere.jpg"), str(all_files(photos_dir)[0])])


def test_search_never_vouches_for_a_changed_photo(models, people, tmp_path, capsys, monkeypatch):
    """A result whose file no longer holds the indexed content says so; only the results shown are read."""
    photos_dir = copy_of(people, tmp_path, only=1)
    XB.build(str(models["a"]), str(photos_dir), tmp_path / "idx")
    idx = str(tmp_path / "idx")
    target = next(p for p in all_files(photos_dir) if len(faces_of(p)) == 1)
    query = tmp_path / "query.jpg"
    shutil.copy(target, query)  # finds the indexed photo first (the same face)
    row = X.load_index(idx).photos.set_index(X.PHOTO).loc[target.relative_to(photos_dir).as_posix()]
    root, rel, sha = row[X.ROOT], target.relative_to(photos_dir).as_posix(), row[X.SHA256]

    def status() -> str:
        top = search_lines(capsys, "--index", idx, str(query), "--top", "1")[0]["results"][0]
        assert top["photo"] == str(target)
        return top["photo_status"]

    assert status() == "current" and X.photo_is_current(root, rel, sha)
    target.write_bytes(jpeg_bytes(Image.open(query).transpose(Image.FLIP_LEFT_RIGHT)))
    assert status() == "changed" and not X.photo_is_current(root, rel, sha)
    capsys.readouterr()
    cli(["search", "--index", idx, str(query), "--top", "1"])
    assert "[photo changed since indexed: not shown]" in capsys.readouterr().out
    target.unlink()
    assert status() == "missing" and X.source_status(X.photo_path(root, rel), sha) == "missing"
    target.mkdir()
    assert X.source_status(X.photo_path(root, rel), sha) == "missing"  # not a file: nothing to show
    # Lazily: a face's line reads the photos of its results only, each once a command.
    read: list = []
    real = X.source_status
    monkeypatch.setattr(XS, "source_status", lambda *a, **k: read.append(a[0]) or real(*a, **k))
    lines = list(XS.search(idx, [str(query), str(query)], top=2, also=0))
    shown = {(r["photo"]) for line in lines for r in line["results"]}
    assert len(read) == len(set(read)) == len(shown) == 2 < len(X.load_index(idx).photos)


def test_the_threshold_comes_from_the_model(models, people, tmp_path, caplog, capsys):
    payload = torch.load(models["a"], weights_only=True)
    v = verdict(payload, 10, 0.3)
    assert (v.similarity, v.source, v.fpir) == (0.3, "--threshold", None)
    with caplog.at_level(logging.WARNING):
        assert verdict(payload, 10).similarity == FALLBACK_THRESHOLD
    assert "no verdict threshold" in caplog.text
    payload["threshold"] = {"similarity": 1.5, "far": 1e-3, "source": "validation identities"}
    torch.save(payload, tmp_path / "strict.pt")  # same weights and crops: the index's model
    v = verdict(payload, 10)
    assert v.similarity == 1.5 and v.source == "model (1:1)" and "grows with the gallery" in v.meaning()
    XB.build(str(tmp_path / "strict.pt"), str(people), tmp_path / "idx")
    lines = search_lines(capsys, "--index", str(tmp_path / "idx"), str(all_files(people)[0]))
    assert lines and {line["verdict"] for line in lines} == {"no_match"}  # 1.5 is out of reach
    assert XB.info(tmp_path / "idx")["threshold"]["similarity"] == 1.5


def test_exact_and_hnsw_agree(models, people, tmp_path):
    half = copy_of(people, tmp_path, only=2)
    for name, threshold in (("exact", 10**6), ("hnsw", 1)):
        XB.build(str(models["a"]), str(half), tmp_path / name, hnsw_threshold=threshold)
    queries = [str(p) for p in all_files(people)]

    def answers(name):
        return [(line["box"], [(r["photo"], r["box"]) for r in flat(line)], [r["similarity"] for r in flat(line)])
                for line in XS.search(tmp_path / name, queries, top=5)]  # fmt: skip

    def agree():
        exact, hnsw = answers("exact"), answers("hnsw")
        assert len(exact) == len(hnsw) > 0
        for (box_e, res_e, sim_e), (box_h, res_h, sim_h) in zip(exact, hnsw, strict=True):
            assert box_e == box_h and np.allclose(sim_e, sim_h, atol=1e-5)
            for j, s in enumerate(sim_e):  # the same face at every rank but among near-ties
                if sum(abs(t - s) < 1e-5 for t in sim_e) == 1:
                    assert res_e[j] == res_h[j]

    agree()
    assert X.load_index(tmp_path / "hnsw").record["structure"] == "hnsw"
    assert X.load_index(tmp_path / "exact").record["structure"] == "exact"
    for name in ("exact", "hnsw"):  # the stored graph takes the added faces; remove rebuilds it
        XB.add(tmp_path / name, str(people))
    agree()
    for name in ("exact", "hnsw"):
        XB.remove(tmp_path / name, [queries[0], queries[5]])
    agree()
    hnsw = X.load_index(tmp_path / "hnsw")
    assert hnsw.graph.ntotal == len(hnsw.faces) and (tmp_path / "hnsw" / hnsw.version / X.GRAPH).is_file()


def test_info(models, people, tmp_path, capsys):
    XB.build(str(models["a"]), str(people), tmp_path / "idx")
    d = XB.info(tmp_path / "idx")
    index = X.load_index(tmp_path / "idx")
    assert d["people"] == len(named(people)) and d["names"] == sorted(named(people))
    assert d["faces"] == len(index.faces) and d["photos"] == int((index.photos[X.N_FACES] > 0).sum())
    assert d["model"]["path"] == str(models["a"]) and d["model"]["file_matches"] is True
    assert (d["threshold"]["similarity"], d["threshold"]["source"]) == (FALLBACK_THRESHOLD, "fallback")
    assert d["threshold"]["gallery_faces"] == d["faces"] and "nothing is promised" in d["threshold"]["meaning"]
    assert d["search"] == {"structure": "exact", "hnsw_threshold": X.DEFAULT_HNSW_THRESHOLD}
    assert d["person_not_found"] == 0 and d["roots"] == {str(people): "folders"} and d["model"]["problem"] is None
    capsys.readouterr()
    cli(["index", "info", "--index", str(tmp_path / "idx")])
    text = capsys.readouterr().out
    for word in (f"people: {d['people']}", f"faces: {d['faces']}", "mobilenet_v2", "threshold: 0.4500"):
        assert word in text
    cli(["index", "info", "--index", str(tmp_path / "idx"), "--json"])
    assert json.loads(capsys.readouterr().out) == json.loads(json.dumps(d))
    with pytest.raises(SystemExit, match="not a photo index"):
        cli(["index", "info", "--index", str(tmp_path)])


def test_cli_build_add_remove(models, people, tmp_path, capsys):
    photos_dir = copy_of(people, tmp_path, only=1)
    idx = str(tmp_path / "idx")
    cli(["index", "build", "--model", str(models["a"]), "--photos", str(photos_dir), "--out", idx])
    assert "people" in capsys.readouterr().out
    cli(["index", "add", "--index", idx, "--photos", str(people)])
    assert "added:" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        cli(["index", "remove", "--index", idx, "--photos", str(tmp_path / "nothing.jpg")])
    assert set(X.load_index(idx).photos[X.ROOT]) == {str(photos_dir), str(people)}
    cli(["index", "remove", "--index", idx, "--photos", str(people)])  # a folder: every photo under it
    assert set(X.load_index(idx).photos[X.ROOT]) == {str(photos_dir)}


# --- following the files ---------------------------------------------------------------------
def test_moved_deleted_and_changed_photos_are_found_and_followed(models, people, tmp_path, capsys, monkeypatch):
    photos_dir = copy_of(people, tmp_path, only=2)
    idx = tmp_path / "idx"
    XB.build(str(models["a"]), str(photos_dir), idx)
    before = X.load_index(idx)
    files = [p for p in all_files(photos_dir) if faces_of(p)]
    first, crossing, deleted, changed = files[0], files[2], files[-2], files[-1]
    assert len({first.parent, crossing.parent}) == 2 and crossing.parent != files[-3].parent
    renamed = first.parent / "renamed.jpg"
    first.rename(renamed)  # within its person's folder
    crossed = files[-3].parent / "crossed.jpg"
    crossing.rename(crossed)  # into another person's folder
    deleted.unlink()
    changed.write_bytes(jpeg_bytes(Image.open(changed).transpose(Image.FLIP_LEFT_RIGHT)))

    def rel(p: Path) -> str:
        return p.relative_to(photos_dir).as_posix()

    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        cli(["index", "info", "--index", str(idx), "--check", "--json"])
    check = json.loads(capsys.readouterr().out)["check"]
    assert exc.value.code == 1 and check["checked"] == len(before.photos) and check["unreadable"] == []
    assert (check["missing"], check["changed"]) == ([str(deleted)], [str(changed)])
    assert sorted((m["from"], m["to"]) for m in check["moved"]) == sorted(
        [(str(first), str(renamed)), (str(crossing), str(crossed))]
    )
    # add follows them: a moved photo is not embedded again, a changed one is; the deleted one is reported.
    calls = count_embeds(monkeypatch)
    report = XB.add(idx, str(photos_dir))
    assert sum(calls) == len(faces_of(changed)) == report.added_faces
    assert (report.moved_photos, report.replaced_photos, report.gone, report.pruned) == (2, 1, [str(deleted)], False)
    assert "gone: 1 indexed photos no longer there" in "\n".join(report.lines())
    after = X.load_index(idx)
    paths = set(after.photos[X.PHOTO])
    assert {rel(renamed), rel(crossed), rel(deleted), rel(changed)} <= paths and not {rel(first), rel(crossing)} & paths
    old_sha = before.photos.set_index(X.PHOTO)[X.SHA256]
    for moved, was in ((renamed, first), (crossed, crossing)):
        sha = old_sha[rel(was)]
        assert np.array_equal(after.embeddings[(after.faces[X.SHA256] == sha).to_numpy()],
                              before.embeddings[(before.faces[X.SHA256] == sha).to_numpy()])  # fmt: skip
        assert after.photos.set_index(X.SHA256).at[sha, X.PHOTO] == rel(moved)
    row = after.photos.set_index(X.PHOTO).loc[rel(crossed)]
    names = set(after.faces.loc[after.faces[X.PHOTO] == rel(crossed), X.PERSON].dropna())
    assert row[X.PERSON] == crossed.parent.name and names <= {crossed.parent.name}  # the new folder's person, if any
    # --prune drops the deleted one; then everything is where it was indexed.
    pruned = XB.add(idx, str(photos_dir), prune=True)
    assert pruned.gone == [str(deleted)] and pruned.pruned
    assert rel(deleted) not in set(X.load_index(idx).photos[X.PHOTO])
    assert XB.add(idx, str(photos_dir)).version is None
    d = XB.info(idx, check=True)["check"]
    assert (d["missing"], d["changed"], d["moved"], d["checked"]) == ([], [], [], len(before.photos) - 1)
    capsys.readouterr()
    cli(["index", "info", "--index", str(idx), "--check"])
    assert "are where they were indexed, unchanged" in capsys.readouterr().out


def test_a_copy_of_an_indexed_photo_is_not_a_move(models, people, tmp_path):
    photos_dir = copy_of(people, tmp_path, only=1)
    XB.build(str(models["a"]), str(photos_dir), tmp_path / "idx")
    original = all_files(photos_dir)[0]
    shutil.copy(original, original.parent / "copy.jpg")
    report = XB.add(tmp_path / "idx", str(photos_dir))
    assert report.version is None and report.moved_photos == 0
    assert (f"{original.parent.name}/copy.jpg", XB.ALREADY_INDEXED) in [(s.photo, s.reason) for s in report.skips]
    assert XB.info(tmp_path / "idx", check=True)["check"]["moved"] == []
    # Copied over another indexed photo: that photo is gone (its faces with it), the content stays indexed once.
    other = all_files(photos_dir)[-1]
    other_rel = other.relative_to(photos_dir).as_posix()
    shutil.copy(original, other)
    report = XB.add(tmp_path / "idx", str(photos_dir))
    index = X.load_index(tmp_path / "idx")
    assert report.replaced_photos == 1 and other_rel not in set(index.photos[X.PHOTO]).union(index.faces[X.PHOTO])
    assert XB.info(tmp_path / "idx", check=True)["check"] == {"checked": len(index.photos), "missing": [],
                                                            "changed": [], "unreadable": [], "moved": []}  # fmt: skip


def test_remove_missing_follows_moves_and_drops_the_rest(models, people, tmp_path, capsys):
    photos_dir = copy_of(people, tmp_path, only=2)
    XB.build(str(models["a"]), str(photos_dir), tmp_path / "idx")
    before = X.load_index(tmp_path / "idx")
    files = all_files(photos_dir)
    files[0].rename(files[0].parent / "moved.jpg")
    files[-1].unlink()
    capsys.readouterr()
    cli(["index", "remove", "--index", str(tmp_path / "idx"), "--missing"])
    assert "moved: 1 photos" in capsys.readouterr().out
    after = X.load_index(tmp_path / "idx")
    assert len(after.photos) == len(before.photos) - 1
    assert set(before.photos[X.PHOTO]) - set(after.photos[X.PHOTO]) == {
        files[0].relative_to(photos_dir).as_posix(), files[-1].relative_to(photos_dir).as_posix()}  # fmt: skip
    assert f"{files[0].parent.name}/moved.jpg" in set(after.photos[X.PHOTO])
    assert "name photos to remove" in failure(["index", "remove", "--index", str(tmp_path / "idx")])


# --- people ----------------------------------------------------------------------------------
PEOPLE = ("alice", "bob", "carol", "dave", "erin", "frank")


def fake_photo(path: Path, *people: str) -> Path:
    """A file the fake detector (``fake_faces``) reads as faces of ``people``, left to right."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(f"fake {path}: {' '.join(people)}".encode())  # its path in it: each file's content differs
    return path


@pytest.fixture
def fake_faces(monkeypatch):
    """Constructed faces: ``XE.file_faces`` reads a ``fake_photo``'s names, ``Embedder.embed`` embeds them.

    Each person is one axis of the 16-d embedding and each face that axis plus its own noise: a
    person's faces agree (cosine ~0.96), two people's do not (~0), far either side of the tiny
    models' threshold (the 0.45 fallback).
    """
    vectors: list[np.ndarray] = []

    def file_faces(data, settings, limits):
        text = data.decode(errors="replace")
        if not text.startswith("fake "):
            raise ImageRejected(M.Reason.NOT_AN_IMAGE)
        names = text.split(": ", 1)[1].split()
        rng = np.random.default_rng(int(hashlib.sha256(data).hexdigest()[:8], 16))
        crops = np.zeros((len(names), 2, 2, 3), np.uint8)
        for k, name in enumerate(names):
            crops[k, 0, 0, :2] = divmod(len(vectors), 256)  # which vector: the crop carries its number
            vectors.append(np.eye(16)[PEOPLE.index(name)] + rng.normal(0, 0.05, 16))
        return (60 * len(names) + 20, 70), tuple((10 + 60 * k, 10, 50, 50) for k in range(len(names))), crops, "fake"

    def embed(self, crops):
        return XE.unit(np.stack([vectors[256 * int(c[0, 0, 0]) + int(c[0, 0, 1])] for c in crops]))

    monkeypatch.setattr(XB, "file_faces", file_faces)  # embed_files reads photos through it
    monkeypatch.setattr(XS, "file_faces", file_faces)  # and search its queries
    monkeypatch.setattr(XE.Embedder, "embed", embed)


def test_find_person():
    rng = np.random.default_rng(0)

    def photo(*people: int) -> np.ndarray:
        return XE.unit(np.stack([np.eye(8)[p] + rng.normal(0, 0.05, 8) for p in people]))

    P, B, C = 0, 1, 2  # the person, a bystander, another
    none = np.zeros((0, 8), np.float32)
    found, lost, unclear = XP.PERSON_NOT_FOUND, XP.PERSON_AMBIGUOUS, None
    # The person is who most photos agree on, even when a bystander comes first, alone, or twice.
    photos = [photo(B), photo(P), photo(B, P), photo(P, C), photo(C, B), photo(P)]  # P in 4 photos, B in 3
    assert XP.find_person(none, photos, 0.45) == [(None, found), (0, None), (1, None), (0, None), (None, found),
                                                 (0, None)]  # fmt: skip
    # Faces enrolled before hold new photos to the person.
    assert XP.find_person(photo(P, P), [photo(B), photo(C, P), photo(P)], 0.45) == [(None, found), (1, None), (0, None)]
    # Nothing to compare with: a lone face is taken as the folder says, a group names nobody.
    assert XP.find_person(none, [photo(B)], 0.45) == [(0, unclear)]
    assert XP.find_person(none, [photo(P, B)], 0.45) == [(None, lost)]
    assert XP.find_person(none, [photo(P), photo(B), photo(C, B)], 0.45)[:2] == [(None, found), (0, None)]
    assert XP.find_person(none, [photo(P), photo(B)], 0.45) == [(0, None), (0, None)]  # two photos that disagree
    assert XP.find_person(none, [], 0.45) == []


def test_a_person_folder_names_only_its_person(models, tmp_path, fake_faces, capsys):
    root, idx = tmp_path / "people", tmp_path / "idx"
    fake_photo(root / "alice" / "1.jpg", "alice")
    fake_photo(root / "alice" / "2.jpg", "bob", "alice")  # a bystander first
    fake_photo(root / "alice" / "3.jpg", "alice", "carol")
    fake_photo(root / "alice" / "4.jpg", "bob")  # only a bystander
    fake_photo(root / "bob" / "1.jpg", "bob")
    fake_photo(root / "bob" / "2.jpg", "bob")
    fake_photo(root / "erin" / "1.jpg", "erin", "dave")  # her one photo has two faces: which is she?

    def who() -> dict:
        f = X.load_index(idx).faces
        return {(ph, n): None if pd.isna(p) else p for ph, n, p in zip(f[X.PHOTO], f[X.FACE], f[X.PERSON], strict=True)}

    report = XB.build(str(models["a"]), str(root), idx)
    built = {("alice/1.jpg", 1): "alice", ("alice/2.jpg", 1): None, ("alice/2.jpg", 2): "alice",
             ("alice/3.jpg", 1): "alice", ("alice/3.jpg", 2): None, ("alice/4.jpg", 1): None, ("bob/1.jpg", 1): "bob",
             ("bob/2.jpg", 1): "bob", ("erin/1.jpg", 1): None, ("erin/1.jpg", 2): None}  # fmt: skip
    assert who() == built and report.people == 2
    assert report.person_notes == {XP.PERSON_NOT_FOUND: 1, XP.PERSON_AMBIGUOUS: 1}
    assert "all indexed unnamed: person_ambiguous 1, person_not_found 1" in "\n".join(report.lines())
    assert XB.info(idx)["person_not_found"] == 2
    # Searches answer per person.
    queries = [fake_photo(tmp_path / "q" / f"{name}.jpg", name) for name in ("alice", "carol", "frank")]
    alice, carol, frank = search_lines(capsys, "--index", str(idx), *map(str, queries), "--top", "3")
    assert (alice["verdict"], alice["person"]) == ("match", "alice") and len(alice["results"]) == 3
    first = alice["results"][0]
    assert first["person"] == "alice" and len(first["also"]) == 2 and alice["results"][1]["person"] != "alice"
    assert {first["photo"], *(a["photo"] for a in first["also"])} == {str(root / f"alice/{n}.jpg") for n in (1, 2, 3)}
    assert (carol["verdict"], carol["person"]) == ("match", None)  # indexed, but only as a bystander
    assert carol["results"][0]["photo"] == str(root / "alice/3.jpg") and carol["results"][0]["box"][0] == 70
    assert (frank["verdict"], frank["person"]) == ("no_match", "unknown")
    assert XS.group_by_person(["a", None, "a", "b", "a", None, "c"], top=3, also=1) == [[0, 2], [1], [3]]
    # add holds new photos to the faces enrolled, and decides again the photos the person was not found in.
    fake_photo(root / "alice" / "5.jpg", "dave", "alice")
    fake_photo(root / "alice" / "6.jpg", "dave")
    fake_photo(root / "erin" / "2.jpg", "erin")  # now her group photo can be told
    report = XB.add(idx, str(root))
    added = {("alice/5.jpg", 1): None, ("alice/5.jpg", 2): "alice", ("alice/6.jpg", 1): None, ("erin/2.jpg", 1): "erin"}
    assert who() == built | added | {("erin/1.jpg", 1): "erin"} and report.person_notes == {XP.PERSON_NOT_FOUND: 1}
    # Removing a photo changes nobody else's name.
    XB.remove(idx, [str(root / "alice" / "1.jpg")])
    assert who() == {k: v for k, v in (built | added | {("erin/1.jpg", 1): "erin"}).items() if k[0] != "alice/1.jpg"}


def test_a_photo_moved_to_another_person_is_theirs(models, tmp_path, fake_faces):
    root, idx = tmp_path / "people", tmp_path / "idx"
    for n in (1, 2):
        fake_photo(root / "alice" / f"{n}.jpg", "alice")
        fake_photo(root / "bob" / f"{n}.jpg", "bob")
    fake_photo(root / "alice" / "3.jpg", "bob", "alice")
    XB.build(str(models["a"]), str(root), idx)
    (root / "alice" / "3.jpg").rename(root / "bob" / "3.jpg")  # filed under the wrong person, then fixed
    report = XB.add(idx, str(root))
    f = X.load_index(idx).faces.set_index([X.PHOTO, X.FACE])[X.PERSON]
    assert report.moved_photos == 1 and report.added_faces == 0
    assert (f[("bob/3.jpg", 1)], pd.isna(f[("bob/3.jpg", 2)])) == ("bob", True)


# --- failures: one line each -----------------------------------------------------------------
def test_a_broken_model_or_index_is_one_line(models, people, tmp_path, capsys):
    photos_dir = copy_of(people, tmp_path, only=1)
    model, idx = tmp_path / "model.pt", str(tmp_path / "idx")
    shutil.copy(models["a"], model)
    XB.build(str(model), str(photos_dir), idx)
    query = str(all_files(photos_dir)[0])
    model.write_bytes(b"not a model")  # replaced by something else
    for args in (
        ["search", "--index", idx, query],
        ["index", "add", "--index", idx, "--photos", str(photos_dir)],
        ["index", "build", "--model", str(model), "--photos", str(photos_dir), "--out", str(tmp_path / "b")],
    ):
        assert "is not a facesearch model file" in failure(args)
    capsys.readouterr()
    cli(["index", "info", "--index", idx])
    assert "is not a facesearch model file" in capsys.readouterr().out
    assert XB.info(idx)["model"]["file_matches"] is None
    model.unlink()
    assert "does not exist (the index's model): pass --model" in failure(["search", "--index", idx, query])
    shutil.copy(models["a"], model)
    live = tmp_path / "idx" / X.load_index(idx).version
    good = (live / X.FACES).read_bytes()
    (live / X.FACES).write_bytes(b"garbage")
    for args in (["search", "--index", idx, query], ["index", "info", "--index", idx],
                 ["index", "remove", "--index", idx, "--photos", query]):  # fmt: skip
        assert "cannot be read" in failure(args)
    (live / X.FACES).write_bytes(good)
    record = json.loads((live / X.RECORD).read_text())
    (live / X.RECORD).write_text(json.dumps(record | {"format": 1}))
    assert "rebuild it" in failure(["search", "--index", idx, query])
    (live / X.RECORD).write_text("{")
    assert "cannot be read" in failure(["index", "info", "--index", idx])


# --- the schema ------------------------------------------------------------------------------
def test_validator_rejects_inconsistent_versions(models, people, tmp_path):
    XB.build(str(models["a"]), str(people), tmp_path / "idx")
    i = X.load_index(tmp_path / "idx")
    X.validate_index(i.faces, i.photos, i.embeddings, i.dim)
    broken = {
        "embeddings off by a row": (i.faces, i.photos, i.embeddings[1:]),
        "not unit length": (i.faces, i.photos, i.embeddings * 2),
        "a face number skipped": (i.faces.assign(**{X.FACE: i.faces[X.FACE] + 1}), i.photos, i.embeddings),
        "a face of no photo": (i.faces, i.photos[i.photos[X.N_FACES] == 0], i.embeddings),
        "a person renamed": (i.faces.assign(**{X.PERSON: pd.array(["x"] * len(i.faces), "string")}), i.photos,
                             i.embeddings),
        "a bystander named": (i.faces.assign(**{X.PERSON: i.faces[X.PHOTO].str.split("/").str[0]}), i.photos,
                              i.embeddings),
        "a relative root": (i.faces, i.photos.assign(**{X.ROOT: "photos"}), i.embeddings),
        "a path out of its root": (i.faces.assign(**{X.PHOTO: "../" + i.faces[X.PHOTO]}),
                                   i.photos.assign(**{X.PHOTO: "../" + i.photos[X.PHOTO]}), i.embeddings),
        "a content twice": (i.faces, pd.concat([i.photos, i.photos.iloc[:1]], ignore_index=True), i.embeddings),
        "faces and a reason": (i.faces, i.photos.assign(**{X.REASON: pd.array(["no_face"] * len(i.photos),
                                                                                "string")}), i.embeddings),
        "a dtype": (i.faces.astype({X.BOX_X: "float64"}), i.photos, i.embeddings),
    }  # fmt: skip
    for name, (faces, table, emb) in broken.items():
        with pytest.raises(SchemaError):
            X.validate_index(faces, table, emb, i.dim)
            pytest.fail(name)
    # The validator runs before every write.
    with pytest.raises(SchemaError), X.writing(tmp_path / "idx"):
        X.write_version(tmp_path / "idx", i.record, i.embeddings[1:], i.faces, i.photos, None)
    assert X.load_index(tmp_path / "idx").version == i.version


def test_photos_module_is_what_the_app_uses(monkeypatch):
    """The app's find/crop/embed go through facesearch.gallery.photos (one home for the per-photo path)."""
    from facesearch.gallery import app_core as core

    def two_faces(rgb, settings):  # as a detector may return them: not in photo order
        return core.Detection(((50, 5, 10, 10), (5, 5, 10, 10)), "haar_frontal", (50, 5, 10, 10), None)

    monkeypatch.setattr(photos, "find_faces", two_faces)
    image = core.read_upload(jpeg_bytes(Image.new("RGB", (80, 60), (10, 20, 30))))
    detection = core.find_faces(image, CROP)
    assert detection.boxes == ((5, 5, 10, 10), (50, 5, 10, 10)) and detection.chosen == (50, 5, 10, 10)
    assert core.crop_face(image, detection.boxes[0], CROP).shape == (40, 40, 3)


def test_search_fpir_moves_the_verdict_with_the_promise(models, people, tmp_path):
    payload = torch.load(models["a"], weights_only=True)
    rng = np.random.default_rng(0)
    emb = rng.normal(size=(60, 16))
    labels = np.repeat(np.arange(12), 5)
    from facesearch.retrieval import verification as V

    payload["threshold"] = V.calibrate(emb, labels, 1e-2, (1e-2,), 1000, 0, fpir=0.01)
    torch.save(payload, tmp_path / "calibrated.pt")
    XB.build(str(tmp_path / "calibrated.pt"), str(people), tmp_path / "idx")
    photo = str(all_files(people)[0])
    loose, strict = (next(XS.search(tmp_path / "idx", [photo], fpir=f))["threshold"] for f in (0.1, 0.001))
    assert loose < next(XS.search(tmp_path / "idx", [photo]))["threshold"] < strict
    with pytest.raises(XE.PhotoIndexError, match="--fpir"):
        next(XS.search(tmp_path / "idx", [photo], fpir=1.5))


def test_a_field_added_to_the_config_keeps_older_fingerprints(models):
    """A model file written before ModelConfig had head_bn and one written after (head_bn false) are one model
    to an index; head_bn true is another."""
    payload = torch.load(models["a"], weights_only=True)
    old = {**payload, "config": {k: v for k, v in payload["config"].items() if k != "head_bn"}}
    assert XE.model_fingerprint(old) == XE.model_fingerprint({**payload, "config": {**old["config"], "head_bn": False}})
    assert XE.model_fingerprint(old) != XE.model_fingerprint({**payload, "config": {**old["config"], "head_bn": True}})
