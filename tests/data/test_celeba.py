from __future__ import annotations

import pytest

from facesearch.data.celeba import (
    ATTRIBUTE_FILE,
    ATTRIBUTE_NAMES,
    IDENTITY_FILE,
    PARTITION_FILE,
    AnnotationReport,
    DatasetError,
    find_image_dir,
    list_images,
    read_annotations,
    read_attributes,
    read_identities,
    read_partitions,
)


def attr_line(name: str, values: list[int]) -> str:
    return name + "  " + " ".join(f"{v:2d}" for v in values)


def test_identities_skip_malformed_and_duplicate_rows(tmp_path):
    path = tmp_path / IDENTITY_FILE
    path.write_bytes(b"000001.jpg 2880\r\n000002.jpg   17\r\ngarbage\r\n000003.jpg x\r\n000001.jpg 2880\r\n\r\n")
    report = AnnotationReport()
    ids = read_identities(path, report)
    assert ids == {"000001.jpg": 2880, "000002.jpg": 17}
    assert report.malformed_rows[IDENTITY_FILE] == 2
    assert report.duplicate_rows[IDENTITY_FILE] == 1  # an identical repeat; conflicting ones: see below


def test_missing_identity_file_is_a_clear_error(tmp_path):
    with pytest.raises(DatasetError, match="identity file is required"):
        read_identities(tmp_path / IDENTITY_FILE, AnnotationReport())


def test_truncated_crlf_attribute_file(tmp_path):
    ones = [1, -1] * 20
    rows = [attr_line("000001.jpg", ones), attr_line("000002.jpg", [-1] * 40)]
    text = "202599\r\n" + " ".join(ATTRIBUTE_NAMES) + "\r\n" + "\r\n".join(rows) + "\r\n000003.jpg -1  1  1 -1"
    path = tmp_path / ATTRIBUTE_FILE
    path.write_bytes(text.encode())
    report = AnnotationReport()
    attrs = read_attributes(path, report)
    assert list(attrs.index) == ["000001.jpg", "000002.jpg"]
    assert list(attrs.columns) == list(ATTRIBUTE_NAMES)
    assert str(attrs.dtypes.iloc[0]) == "boolean"
    assert bool(attrs.loc["000001.jpg", "5_o_Clock_Shadow"]) is True
    assert bool(attrs.loc["000001.jpg", "Arched_Eyebrows"]) is False
    assert report.attribute_header_count == 202599
    assert report.attribute_rows == 2
    assert report.malformed_rows[ATTRIBUTE_FILE] == 1  # the cut-off last line


def test_attribute_file_with_wrong_header_is_ignored_not_misread(tmp_path):
    path = tmp_path / ATTRIBUTE_FILE
    path.write_text("2\nA B C\n000001.jpg 1 -1 1\n")
    report = AnnotationReport()
    assert read_attributes(path, report).empty
    assert report.malformed_rows[ATTRIBUTE_FILE] == 2


def test_optional_files_missing(tmp_path):
    report = AnnotationReport()
    assert read_attributes(tmp_path / ATTRIBUTE_FILE, report).empty
    assert read_partitions(tmp_path / PARTITION_FILE, report) == {}
    assert report.missing_files == [ATTRIBUTE_FILE, PARTITION_FILE]


def test_partitions(tmp_path):
    path = tmp_path / PARTITION_FILE
    path.write_text("000001.jpg 0\n000002.jpg 2\n000003.jpg 7\n")
    report = AnnotationReport()
    assert read_partitions(path, report) == {"000001.jpg": 0, "000002.jpg": 2}
    assert report.malformed_rows[PARTITION_FILE] == 1


def test_image_dir_and_listing(tmp_path):
    with pytest.raises(DatasetError, match="no image folder"):
        find_image_dir(tmp_path)
    (tmp_path / "img_align_celeba").mkdir()
    for name in ("b.jpg", "a.jpg", ".hidden"):
        (tmp_path / "img_align_celeba" / name).write_bytes(b"x")
    (tmp_path / "img_align_celeba" / "subdir").mkdir()
    assert find_image_dir(tmp_path).name == "img_align_celeba"
    assert list_images(find_image_dir(tmp_path)) == ["a.jpg", "b.jpg"]
    with pytest.raises(DatasetError, match="does not exist"):
        find_image_dir(tmp_path / "nope")


def test_real_celeba_dev_annotations(celeba_dev):
    ann = read_annotations(celeba_dev)
    assert len(ann.identities) == 202_599
    # The attribute file is truncated after 000001..020000 and its header still says 202,599.
    assert ann.report.attribute_header_count == 202_599
    assert ann.report.attribute_rows == 20_000
    images = list_images(find_image_dir(celeba_dev))
    assert len(images) == 2172
    assert sum(name in ann.attributes.index for name in images) == 205
    assert all(name in ann.identities for name in images)


def test_identity_ids_are_ascii_and_fit_int64(tmp_path):
    path = tmp_path / IDENTITY_FILE
    rows = ["a.jpg 1", "b.jpg \u00b2", "c.jpg \u0663", "d.jpg \uff11\uff12", f"e.jpg {2**63}", f"f.jpg {2**63 - 1}",
            "g.jpg -3", "h.jpg 1.0"]  # fmt: skip
    path.write_text("\n".join(rows) + "\n", encoding="utf-8")
    report = AnnotationReport()
    assert read_identities(path, report) == {"a.jpg": 1, "f.jpg": 2**63 - 1}
    assert report.malformed_rows[IDENTITY_FILE] == 6


def test_conflicting_identity_rows_are_ambiguous_not_first_wins(tmp_path):
    path = tmp_path / IDENTITY_FILE
    path.write_text("a.jpg 1\nb.jpg 2\na.jpg 3\nb.jpg 2\nc.jpg 4\na.jpg 1\n")
    report = AnnotationReport()
    ids = read_identities(path, report)
    assert ids == {"b.jpg": 2, "c.jpg": 4}  # a.jpg: 1 or 3? neither
    assert report.ambiguous_identities == {"a.jpg"}
    assert report.conflicting_rows[IDENTITY_FILE] == 1
    assert report.duplicate_rows[IDENTITY_FILE] == 2  # b.jpg 2 twice, a.jpg 1 twice: identical repeats


def test_byte_order_mark_loses_no_row(tmp_path):
    (tmp_path / IDENTITY_FILE).write_bytes("\ufeff000001.jpg 7\n000002.jpg 8\n".encode())
    rows = [attr_line("000001.jpg", [1] * 40), attr_line("000002.jpg", [-1] * 40)]
    attrs = ["\ufeff2", " ".join(ATTRIBUTE_NAMES), *rows]
    (tmp_path / ATTRIBUTE_FILE).write_bytes("\r\n".join(attrs).encode())
    (tmp_path / PARTITION_FILE).write_bytes("\ufeff000001.jpg 0\n".encode())
    ann = read_annotations(tmp_path)
    assert ann.identities == {"000001.jpg": 7, "000002.jpg": 8}
    assert list(ann.attributes.index) == ["000001.jpg", "000002.jpg"]
    assert ann.report.attribute_header_count == 2
    assert ann.partitions == {"000001.jpg": 0}


def test_conflicting_attribute_and_partition_rows_are_dropped(tmp_path):
    attrs = ["3", " ".join(ATTRIBUTE_NAMES), attr_line("a.jpg", [1] * 40), attr_line("a.jpg", [-1] * 40),
             attr_line("b.jpg", [1] * 40), attr_line("b.jpg", [1] * 40)]  # fmt: skip
    (tmp_path / ATTRIBUTE_FILE).write_text("\n".join(attrs) + "\n")
    (tmp_path / PARTITION_FILE).write_text("a.jpg 0\na.jpg 2\nb.jpg 1\n")
    report = AnnotationReport()
    assert list(read_attributes(tmp_path / ATTRIBUTE_FILE, report).index) == ["b.jpg"]
    assert read_partitions(tmp_path / PARTITION_FILE, report) == {"b.jpg": 1}
    assert report.conflicting_rows == {ATTRIBUTE_FILE: 1, PARTITION_FILE: 1}
    assert report.duplicate_rows[ATTRIBUTE_FILE] == 1


def test_listing_names_every_entry(tmp_path):
    import os

    from facesearch.data.celeba import list_entries

    d = tmp_path / "img_celeba"
    d.mkdir()
    (d / "a.jpg").write_bytes(b"x")
    (d / ".hidden").write_bytes(b"x")
    (d / "sub").mkdir()
    os.mkfifo(d / "fifo.jpg")
    (d / os.fsdecode(b"\xff.jpg")).write_bytes(b"x")
    got = {e.name: e.problem for e in list_entries(d)}
    assert got == {"a.jpg": None, ".hidden": "hidden_file", "sub": "not_a_file", "fifo.jpg": "not_a_file",
                   "\\xff.jpg": "bad_file_name"}  # fmt: skip
    assert list_images(d) == ["a.jpg"]
