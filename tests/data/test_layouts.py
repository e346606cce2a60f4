"""facesearch.data.layouts: which layout a folder is in, who is in each photo, every entry listed once."""

from __future__ import annotations

import os

import hostile as H
import pytest
from conftest import person_folders

from facesearch.data import manifest as M
from facesearch.data.celeba import DatasetError, read_annotations
from facesearch.data.layouts import (
    CELEBA,
    FOLDERS,
    PLAIN,
    PhotoFile,
    assign_people,
    dataset_source,
    list_photo_files,
    person_identity,
    read_dataset,
    same_source,
)

JPEG = H.jpeg(H.photo(1))


def put(path, data: bytes = JPEG) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as fh:
        fh.write(data)


def test_auto_detects_celeba_then_folders(sample_factory, tmp_path):
    celeba = sample_factory(identities=6, images_per_identity=4, seed=3)
    assert read_dataset(celeba).layout == CELEBA
    folders = read_dataset(person_folders(celeba, tmp_path / "people"))
    assert folders.layout == FOLDERS and folders.image_dir == "."
    # The same photos, the same grouping: a folder's identity is its name's number.
    celeba_ids = read_annotations(celeba).identities
    got = {e.name.split("/")[1]: (folders.annotations.identities[e.name], e.person) for e in folders.entries}
    assert got == {n: (person_identity(f"Person_{i:05d}"), f"Person_{i:05d}") for n, i in celeba_ids.items()}
    assert folders.annotations.attributes.empty and folders.annotations.partitions == {}
    assert all(e.problem is None for e in folders.entries)


def test_auto_refuses_unlabelled_folders(tmp_path):
    put(tmp_path / "plain" / "a.jpg")
    put(tmp_path / "plain" / "alice" / "b.jpg")
    with pytest.raises(DatasetError, match=r"needs labelled photos.*celeba.*folders.*index build") as err:
        read_dataset(tmp_path / "plain")
    assert "a.jpg" in str(err.value)  # names what is in the way
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="no photos"):
        read_dataset(tmp_path / "empty")
    with pytest.raises(DatasetError, match="does not exist"):
        read_dataset(tmp_path / "missing")
    with pytest.raises(DatasetError, match="plain folders have no identities"):
        read_dataset(tmp_path / "plain", PLAIN)


def test_folder_identities_sorted_names_nested_and_loose(tmp_path):
    root = tmp_path / "d"
    for rel in ("bob/1.jpg", "Ada Lovelace/1.png", "alice/1.jpg", "alice/2019/2.jpg", "loose.jpg"):
        put(root / rel)
    data = read_dataset(root, FOLDERS)  # forced: the loose photo is a reject row, not an error
    rows = {e.image_path: (e.problem, e.person, data.annotations.identities.get(e.name)) for e in data.entries}
    ada, alice, bob = (person_identity(n) for n in ("Ada Lovelace", "alice", "bob"))
    assert rows == {
        "Ada Lovelace/1.png": (None, "Ada Lovelace", ada),  # whitespace is fine without annotation files
        "alice/1.jpg": (None, "alice", alice),
        "alice/2019/2.jpg": (None, "alice", alice),  # a sub-folder of a person folder is that person's
        "bob/1.jpg": (None, "bob", bob),
        "loose.jpg": (M.Reason.NOT_IN_A_PERSON_FOLDER, None, None),
    }
    # A person's number is their name's: another person folder changes nobody's.
    put(root / "Aaron" / "1.jpg")
    again = read_dataset(root, FOLDERS).annotations.identities
    assert {n: again[n] for n in data.annotations.identities} == data.annotations.identities
    assert len({ada, alice, bob, person_identity("Aaron")}) == 4 and min(ada, alice, bob) > 0
    assert [e.image_path for e in data.entries] == sorted(rows)
    assert all(e.name == e.image_path and os.path.isabs(e.path) for e in data.entries)
    with pytest.raises(DatasetError, match=r"loose\.jpg"):
        read_dataset(root)


def test_hostile_person_folders_are_rows_not_crashes(tmp_path):
    root = os.fsencode(tmp_path / "d")
    put(os.path.join(root, b"alice", b"1.jpg"))
    put(os.path.join(root, b"caf\xe9", b"1.jpg"))  # Latin-1 folder name: not UTF-8
    put(os.path.join(root, b"caf\xe9", b"2.jpg"))
    put(os.path.join(root, b".trash", b"1.jpg"))  # a hidden person folder is one entry
    put(os.path.join(root, b".trash", b"2.jpg"))
    put(os.path.join(root, b"back\\slash", b"1.jpg"))
    put(os.path.join(root, b"alice", b"new\nline.jpg"))
    put(os.path.join(root, b"alice", b".DS_Store"))
    H.make_fifo(tmp_path / "d" / "alice" / "pipe.jpg")
    os.symlink(tmp_path / "d" / "alice", tmp_path / "d" / "alias")  # a linked folder is not followed
    data = read_dataset(tmp_path / "d")
    rows = {e.image_path: (e.problem, e.person, data.annotations.identities.get(e.name)) for e in data.entries}
    assert rows == {
        "alice/1.jpg": (None, "alice", person_identity("alice")),
        "alice/new\nline.jpg": ("bad_file_name", "alice", person_identity("alice")),
        "alice/.DS_Store": ("hidden_file", None, None),
        "alice/pipe.jpg": ("not_a_file", None, None),
        "alias": ("not_a_file", None, None),
        "caf\\xe9/1.jpg": ("bad_file_name", None, None),
        "caf\\xe9/2.jpg": ("bad_file_name", None, None),
        ".trash": ("hidden_file", None, None),
        "back\\\\slash/1.jpg": ("bad_file_name", None, None),
    }
    assert [e.image_path for e in data.entries] == sorted(rows)


def test_index_people_stay_exactly_one_folder_deep():
    files = [PhotoFile(r, r.encode()) for r in ("alice/1.jpg", "alice/trip/2.jpg")]
    named, skips, used = assign_people(files, "folders")
    assert [f.person for f in named] == ["alice"] and used == FOLDERS
    assert [(s.photo, s.reason) for s in skips] == [("alice/trip/2.jpg", M.Reason.NOT_IN_A_PERSON_FOLDER)]
    assert assign_people(files, "auto")[2] == PLAIN  # albums in sub-folders are not people
    assert [f.person for f in assign_people(files, "folders", nested=True)[0]] == ["alice", "alice"]


def test_listing_skips_without_opening(tmp_path):
    put(tmp_path / "a" / "1.jpg")
    H.make_fifo(tmp_path / "a" / "f.jpg")
    files, skips = list_photo_files(tmp_path)
    assert [f.rel for f in files] == ["a/1.jpg"] and [(s.photo, s.reason) for s in skips] == [("a/f.jpg", "not_a_file")]


def test_partial_celeba_download_is_not_taken_for_one_person(tmp_path):
    root = tmp_path / "celeba"
    put(root / "img_celeba" / "000001.jpg")  # the identity file has not arrived yet
    with pytest.raises(DatasetError, match="identity file is required"):
        read_dataset(root)
    assert read_dataset(root, FOLDERS).entries[0].person == "img_celeba"  # unless forced


def test_dataset_source_says_where_identities_come_from(sample_factory, tmp_path):
    celeba = sample_factory(identities=6, images_per_identity=4, seed=3)
    source = dataset_source(celeba, CELEBA)
    assert source["synthetic"] is True and len(source["identity_file_sha256"]) == 64  # the generator's marker
    people = dataset_source(person_folders(celeba, tmp_path / "people"), FOLDERS)
    assert people == {"layout": FOLDERS, "name": "people", "synthetic": False}
    # The same identity file is the same people; any folder layout names people alike; else never.
    assert same_source(source, dict(source, name="copy")) and same_source(people, {"layout": FOLDERS})
    assert not same_source(source, dict(source, identity_file_sha256="0" * 64))
    assert not same_source(source, people) and not same_source(None, source)
