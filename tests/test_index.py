"""The photo index and the search command: every face indexed, add/remove/info, crashes, the JSON lines."""

from __future__ import annotations

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

from facesearch import index as X
from facesearch import manifest as M
from facesearch import photos
from facesearch.cli import main as cli
from facesearch.contract import FALLBACK_THRESHOLD, preprocessing_record, verdict
from facesearch.faces import FaceConfig
from facesearch.images import ImageRejected, decode_image
from facesearch.manifest import SchemaError
from facesearch.models import get_model, save_model
from facesearch.transforms import to_model_input

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
        faces.append(photos.crops(rgb, photos.detect(rgb, CROP).boxes, CROP))
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


# --- build -----------------------------------------------------------------------------------
def test_build_indexes_every_face_named_by_folder(models, people, tmp_path):
    photos_dir = copy_of(people, tmp_path)
    report = X.build(str(models["a"]), str(photos_dir), tmp_path / "idx")
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
    assert set(index.faces[X.PERSON]) == named(photos_dir) and report.people == len(named(photos_dir))
    assert index.photos[X.PHOTO].tolist() == sorted(expected, key=lambda r: r.split("/"))
    # The embedding of a face is the model's embedding of the crop photos.crop cuts of its box.
    row = index.faces.iloc[0]
    rgb = decode_image((photos_dir / row[X.PHOTO]).read_bytes(), 40_000_000).rgb
    crop = photos.crop(rgb, tuple(int(row[c]) for c in (X.BOX_X, X.BOX_Y, X.BOX_W, X.BOX_H)), CROP)
    own = X.Embedder.load(models["a"]).embed(crop[None])
    assert np.allclose(index.embeddings[0], own[0], atol=1e-5)
    assert np.allclose(np.linalg.norm(index.embeddings, axis=1), 1, atol=1e-5)
    assert index.record["model"]["fingerprint"] == X.model_fingerprint(torch.load(models["a"], weights_only=True))
    assert index.record["structure"] == "exact" and not (tmp_path / "idx" / index.version / X.GRAPH).exists()


def test_boxes_are_in_the_photos_own_pixels(models, people, tmp_path):
    """A photo three times larger has its face box three times larger (not in a shrunk copy's pixels)."""
    small = next(p for p in all_files(people) if len(faces_of(p)) == 1)
    img = Image.open(small)
    big = img.resize((img.width * 3, img.height * 3), Image.LANCZOS)
    (tmp_path / "p").mkdir()
    shutil.copy(small, tmp_path / "p" / "small.jpg")
    (tmp_path / "p" / "big.jpg").write_bytes(jpeg_bytes(big, quality=95))
    X.build(str(models["a"]), str(tmp_path / "p"), tmp_path / "idx")
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
    report = X.build(str(models["a"]), str(photos_dir), tmp_path / "idx")
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
    assert X.build(str(models["a"]), str(mixed), tmp_path / "auto").people == 0  # not all one folder deep: plain
    assert X.load_index(tmp_path / "auto").faces[X.PERSON].isna().all()
    report = X.build(str(models["a"]), str(mixed), tmp_path / "folders", layout="folders")
    assert [(s.photo, s.reason) for s in report.skips] == [("loose.jpg", M.Reason.NOT_IN_A_PERSON_FOLDER)]
    assert report.people == len(named(mixed))
    flat = tmp_path / "flat"
    flat.mkdir()
    shutil.copy(loose, flat / "one.jpg")
    assert X.build(str(models["a"]), str(flat), tmp_path / "plain").people == 0
    nested = X.build(str(models["a"]), str(people), tmp_path / "named", layout="plain")
    assert nested.people == 0 and nested.faces > 0


def test_build_refuses_to_overwrite(models, people, tmp_path):
    X.build(str(models["a"]), str(people), tmp_path / "idx")
    with pytest.raises(X.PhotoIndexError, match="index already"):
        X.build(str(models["a"]), str(people), tmp_path / "idx")
    first = X.load_index(tmp_path / "idx").version
    X.build(str(models["a"]), str(people), tmp_path / "idx", force=True)
    assert X.load_index(tmp_path / "idx").version.startswith("v000002") and first.startswith("v000001")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "keep.txt").write_text("mine")
    with pytest.raises(X.PhotoIndexError, match="not a photo index"):
        X.build(str(models["a"]), str(people), tmp_path / "other")


# --- add, remove -----------------------------------------------------------------------------
def test_add_embeds_only_new_photos(models, people, tmp_path, monkeypatch):
    photos_dir = copy_of(people, tmp_path, only=2)
    X.build(str(models["a"]), str(photos_dir), tmp_path / "idx")
    before = X.load_index(tmp_path / "idx")
    for person in people.iterdir():  # the third photo of everyone arrives
        for photo in sorted(person.iterdir())[2:]:
            shutil.copy(photo, photos_dir / person.name / photo.name)
    new = [p for p in all_files(photos_dir) if p.relative_to(photos_dir).as_posix() not in set(before.photos[X.PHOTO])]
    calls = count_embeds(monkeypatch)
    report = X.add(tmp_path / "idx", str(photos_dir))
    assert sum(calls) == sum(len(faces_of(p)) for p in new) == report.added_faces > 0
    assert {s.reason for s in report.skips} == {X.ALREADY_INDEXED} and len(report.skips) == len(before.photos)
    after = X.load_index(tmp_path / "idx")
    assert np.array_equal(after.embeddings[: len(before.faces)], before.embeddings)  # old faces untouched
    # The same index a build of everything gives (same faces, boxes and embeddings).
    X.build(str(models["a"]), str(photos_dir), tmp_path / "all")
    whole = X.load_index(tmp_path / "all")
    key = [X.PHOTO, X.FACE]
    a, w = after.faces.sort_values(key), whole.faces.sort_values(key)
    assert a.reset_index(drop=True).equals(w.reset_index(drop=True))
    assert np.allclose(after.embeddings[a.index], whole.embeddings[w.index], atol=1e-5)
    # Nothing new: no forward pass, no new version.
    calls.clear()
    again = X.add(tmp_path / "idx", str(photos_dir))
    assert calls == [] and again.version is None and X.load_index(tmp_path / "idx").version == after.version


def test_add_replaces_an_edited_photo(models, people, tmp_path):
    photos_dir = copy_of(people, tmp_path, only=2)
    X.build(str(models["a"]), str(photos_dir), tmp_path / "idx")
    before = X.load_index(tmp_path / "idx")
    edited = all_files(photos_dir)[0]
    edited.write_bytes(jpeg_bytes(Image.open(edited).convert("L").convert("RGB")))  # same path, new content
    report = X.add(tmp_path / "idx", str(photos_dir))
    after = X.load_index(tmp_path / "idx")
    rel = edited.relative_to(photos_dir).as_posix()
    assert report.removed_photos == 1 and len(after.photos) == len(before.photos)
    assert after.photos.set_index(X.PHOTO).at[rel, X.SHA256] == hashlib.sha256(edited.read_bytes()).hexdigest()


def test_remove_by_path_folder_or_content(models, people, tmp_path):
    photos_dir = copy_of(people, tmp_path)
    X.build(str(models["a"]), str(photos_dir), tmp_path / "idx")
    before = X.load_index(tmp_path / "idx")
    files = all_files(photos_dir)
    elsewhere = tmp_path / "copy.jpg"
    shutil.copy(files[1], elsewhere)  # found by its content
    person = sorted(photos_dir.iterdir())[-1]
    stored = files[2].relative_to(photos_dir).as_posix()
    report = X.remove(tmp_path / "idx", [str(files[0]), str(elsewhere), stored, str(person), "nothing.jpg"])
    gone = {f.relative_to(photos_dir).as_posix() for f in (files[0], files[1], files[2], *person.iterdir())}
    after = X.load_index(tmp_path / "idx")
    assert report.unmatched == ["nothing.jpg"] and report.removed_photos == len(gone)
    assert set(after.photos[X.PHOTO]) == set(before.photos[X.PHOTO]) - gone
    kept = ~before.faces[X.PHOTO].isin(gone).to_numpy()
    assert np.array_equal(after.embeddings, before.embeddings[kept])
    assert X.remove(tmp_path / "idx", ["nothing.jpg"]).version is None


def test_another_model_is_refused(models, people, tmp_path):
    X.build(str(models["a"]), str(people), tmp_path / "idx")
    with pytest.raises(X.PhotoIndexError, match="not the model this index was built with"):
        X.add(tmp_path / "idx", str(people), model=str(models["b"]))
    with pytest.raises(X.PhotoIndexError, match="not the model this index was built with"):
        list(X.search(tmp_path / "idx", [str(all_files(people)[0])], model=str(models["b"])))
    with pytest.raises(SystemExit, match="not the model"):
        cli(["search", "--index", str(tmp_path / "idx"), str(all_files(people)[0]), "--model", str(models["b"])])
    # The same weights and crops re-saved with new metadata (a threshold) are the same model.
    payload = torch.load(models["a"], weights_only=True)
    payload["threshold"] = {"similarity": 0.9, "far": 1e-3, "source": "validation identities"}
    torch.save(payload, tmp_path / "moved.pt")
    assert X.add(tmp_path / "idx", str(people), model=str(tmp_path / "moved.pt")).added_faces == 0
    shutil.move(models["a"], tmp_path / "away.pt")  # the index's model moved: say so, take --model
    try:
        with pytest.raises(X.PhotoIndexError, match="pass --model"):
            list(X.search(tmp_path / "idx", [str(all_files(people)[0])]))
        assert list(X.search(tmp_path / "idx", [str(all_files(people)[0])], model=str(tmp_path / "away.pt")))
    finally:
        shutil.move(tmp_path / "away.pt", models["a"])
    # Different crops are a different model, whatever the weights.
    payload["preprocessing"] = preprocessing_record(FaceConfig(size=48), 32)
    torch.save(payload, tmp_path / "recropped.pt")
    with pytest.raises(X.PhotoIndexError, match="not the model"):
        X.add(tmp_path / "idx", str(people), model=str(tmp_path / "recropped.pt"))


@pytest.mark.parametrize("crash_at", ["write_parquet_atomic", "write_json_atomic", "write_bytes_atomic"])
def test_a_killed_add_or_remove_leaves_the_index_as_it_was(models, people, tmp_path, monkeypatch, crash_at):
    """Killed after some of the new version is written (tables, record, the pointer's temporary file)."""
    photos_dir = copy_of(people, tmp_path, only=2)
    X.build(str(models["a"]), str(photos_dir), tmp_path / "idx")
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
    for change in (lambda: X.add(tmp_path / "idx", str(photos_dir)),
                   lambda: X.remove(tmp_path / "idx", [str(all_files(photos_dir)[0])])):  # fmt: skip
        with pytest.raises(KeyboardInterrupt):
            change()
        now = X.load_index(tmp_path / "idx")
        assert now.version == before.version and now.faces.equals(before.faces) and now.photos.equals(before.photos)
        assert np.array_equal(now.embeddings, before.embeddings)
    assert len([d for d in (tmp_path / "idx").iterdir() if d.is_dir()]) == 3  # the live one and two half-written
    monkeypatch.setattr(X, crash_at, real)
    assert X.add(tmp_path / "idx", str(photos_dir)).added_faces > 0
    versions = sorted(d.name for d in (tmp_path / "idx").iterdir() if d.is_dir())
    assert versions == sorted([before.version, X.load_index(tmp_path / "idx").version])  # half-written ones gone


def test_a_second_writer_is_turned_away(models, people, tmp_path):
    X.build(str(models["a"]), str(people), tmp_path / "idx")
    with X.writing(tmp_path / "idx"), pytest.raises(X.PhotoIndexError, match="another index command"):
        X.remove(tmp_path / "idx", [str(all_files(people)[0])])


# --- search, info ----------------------------------------------------------------------------
def test_search_json_lines(models, people, tmp_path, capsys):
    X.build(str(models["a"]), str(people), tmp_path / "idx")
    assert len(X.load_index(tmp_path / "idx").faces) >= 9
    multi = next(p for p in all_files(people) if len(faces_of(p)) > 1)
    blank = tmp_path / "blank.jpg"
    Image.new("RGB", (200, 160), (90, 120, 150)).save(blank)
    (tmp_path / "text.jpg").write_text("not a photo")
    queries = [str(multi), str(blank), str(tmp_path / "text.jpg")]
    lines = search_lines(capsys, "--index", str(tmp_path / "idx"), *queries, "--top", "3", "--threshold", "0.5")
    assert [line["photo"] for line in lines] == [str(multi)] * len(faces_of(multi)) + queries[1:]
    for line, box in zip(lines, faces_of(multi), strict=False):  # the photo's lines, one per face
        assert set(line) == {"photo", "box", "verdict", "results"} and line["box"] == list(box)
        assert [r["rank"] for r in line["results"]] == [1, 2, 3]
        assert all(set(r) == {"rank", "similarity", "photo", "box", "name"} for r in line["results"])
        sims = [r["similarity"] for r in line["results"]]
        assert sims == sorted(sims, reverse=True)
        top = line["results"][0]  # an indexed photo finds its own face first
        assert (top["photo"], top["box"]) == (str(multi), list(box)) and top["similarity"] == pytest.approx(1, abs=1e-4)
        assert top["name"] == multi.parent.name and line["verdict"] == "match"
    assert lines[-2] == {"photo": str(blank), "box": None, "verdict": "no_match", "reason": "no_face", "results": []}
    assert lines[-1]["box"] is None and lines[-1]["reason"] == "not_an_image"
    # The verdict is the threshold's: nothing reaches a similarity above 1.
    above = search_lines(capsys, "--index", str(tmp_path / "idx"), str(multi), "--threshold", "1.01")
    assert {line["verdict"] for line in above} == {"no_match"} and len(above[0]["results"]) == 9


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
    X.build(str(tmp_path / "strict.pt"), str(people), tmp_path / "idx")
    lines = search_lines(capsys, "--index", str(tmp_path / "idx"), str(all_files(people)[0]))
    assert lines and {line["verdict"] for line in lines} == {"no_match"}  # 1.5 is out of reach
    assert X.info(tmp_path / "idx")["threshold"]["similarity"] == 1.5


def test_exact_and_hnsw_agree(models, people, tmp_path):
    half = copy_of(people, tmp_path, only=2)
    for name, threshold in (("exact", 10**6), ("hnsw", 1)):
        X.build(str(models["a"]), str(half), tmp_path / name, hnsw_threshold=threshold)
    queries = [str(p) for p in all_files(people)]

    def answers(name):
        return [(line["box"], [(r["photo"], r["box"]) for r in line["results"]], [r["similarity"] for r in
                 line["results"]]) for line in X.search(tmp_path / name, queries, top=5)]  # fmt: skip

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
        X.add(tmp_path / name, str(people))
    agree()
    for name in ("exact", "hnsw"):
        X.remove(tmp_path / name, [queries[0], queries[5]])
    agree()
    hnsw = X.load_index(tmp_path / "hnsw")
    assert hnsw.graph.ntotal == len(hnsw.faces) and (tmp_path / "hnsw" / hnsw.version / X.GRAPH).is_file()


def test_info(models, people, tmp_path, capsys):
    X.build(str(models["a"]), str(people), tmp_path / "idx")
    d = X.info(tmp_path / "idx")
    index = X.load_index(tmp_path / "idx")
    assert d["people"] == len(named(people)) and d["names"] == sorted(named(people))
    assert d["faces"] == len(index.faces) and d["photos"] == int((index.photos[X.N_FACES] > 0).sum())
    assert d["model"]["path"] == str(models["a"]) and d["model"]["file_matches"] is True
    assert (d["threshold"]["similarity"], d["threshold"]["source"]) == (FALLBACK_THRESHOLD, "fallback")
    assert d["threshold"]["gallery_faces"] == d["faces"] and "nothing is promised" in d["threshold"]["meaning"]
    assert d["search"] == {"structure": "exact", "hnsw_threshold": X.DEFAULT_HNSW_THRESHOLD}
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


# --- the schema ------------------------------------------------------------------------------
def test_validator_rejects_inconsistent_versions(models, people, tmp_path):
    X.build(str(models["a"]), str(people), tmp_path / "idx")
    i = X.load_index(tmp_path / "idx")
    X.validate_index(i.faces, i.photos, i.embeddings, i.dim)
    broken = {
        "embeddings off by a row": (i.faces, i.photos, i.embeddings[1:]),
        "not unit length": (i.faces, i.photos, i.embeddings * 2),
        "a face number skipped": (i.faces.assign(**{X.FACE: i.faces[X.FACE] + 1}), i.photos, i.embeddings),
        "a face of no photo": (i.faces, i.photos[i.photos[X.N_FACES] == 0], i.embeddings),
        "a person renamed": (i.faces.assign(**{X.PERSON: pd.array(["x"] * len(i.faces), "string")}), i.photos,
                             i.embeddings),
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
    """The app's find/crop/embed go through facesearch.photos (one home for the per-photo path)."""
    from facesearch import app_core as core

    def two_faces(rgb, settings):  # as a detector may return them: not in photo order
        return core.Detection(((50, 5, 10, 10), (5, 5, 10, 10)), "haar_frontal", (50, 5, 10, 10), None)

    monkeypatch.setattr(photos, "find_faces", two_faces)
    image = core.read_upload(jpeg_bytes(Image.new("RGB", (80, 60), (10, 20, 30))))
    detection = core.find_faces(image, CROP)
    assert detection.boxes == ((5, 5, 10, 10), (50, 5, 10, 10)) and detection.chosen == (50, 5, 10, 10)
    assert core.crop_face(image, detection.boxes[0], CROP).shape == (40, 40, 3)
