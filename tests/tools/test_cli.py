"""Every ``python -m facesearch`` command refuses a path it cannot use in one line: ``<command>: <reason>``.

A missing model file, a file that is no model (empty, truncated, text, a torch file of another
shape, a folder) and a missing data folder are the user's to fix: one line saying which and
why, and a non-zero exit, never a traceback.
"""

from __future__ import annotations

import re
import subprocess
import sys

import pandas as pd
import pytest
import yaml
from conftest import BAD_MODELS, REPO, bad_model_files

from facesearch.data import manifest as M
from facesearch.data.celeba import DatasetError
from facesearch.nets.models import ModelFileError, failure_line
from facesearch.tools import cli

PARAMS = str(REPO / "params.yaml")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return bad_model_files(tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """split/ with a val.parquet (choose reads it before the model), arrays/, photos/, and tune's grids."""
    root = tmp_path_factory.mktemp("data")
    for folder in ("split", "arrays", "photos"):
        (root / folder).mkdir()
    pd.DataFrame({M.CROP_PATH: ["a.png", "b.png"], M.IDENTITY: [1, 2]}).to_parquet(root / "split" / "val.parquet")
    (root / "distil.yaml").write_text(yaml.safe_dump({"d": {"loss": "distill"}}))
    (root / "plain.yaml").write_text(yaml.safe_dump({"p": {"lr": 0.003}}))
    return root


def one_line_failure(command: str, argv: list[str]) -> str:
    with pytest.raises(SystemExit) as exc:
        cli.main(argv)
    message = exc.value.code
    # A str code: Python prints it to stderr and exits with status 1.
    # The index commands name their sub-command too ("index build: ...").
    assert isinstance(message, str) and re.match(rf"{command}( \w+)?: ", message), message
    assert "\n" not in message and "Traceback" not in message, message
    return message


def model_argv(command: str, model: str, data, out: str) -> list[str]:
    return {
        "evaluate": ["evaluate", "--model", model, "--data", str(data / "photos"), "--out", out],
        "choose": ["choose", "--model", model, "--split", str(data / "split"), "--arrays", str(data / "arrays"),
                   "--params", PARAMS, "--out", out],
        "tune": ["tune", "--backbone", "mobilenet_v2", "--grid", str(data / "distil.yaml"), "--teacher", model,
                 "--split", str(data / "split"), "--arrays", str(data / "arrays"), "--params", PARAMS, "--out", out],
        "index": ["index", "build", "--model", model, "--photos", str(data / "photos"), "--out", out],
    }[command]  # fmt: skip


@pytest.mark.parametrize("kind", BAD_MODELS)
@pytest.mark.parametrize("command", ["evaluate", "choose", "tune", "index"])
def test_a_model_file_that_is_no_model(command, kind, models, data, tmp_path):
    message = one_line_failure(command, model_argv(command, str(models[kind]), data, str(tmp_path / "out")))
    assert str(models[kind]) in message


def test_the_message_names_what_is_wrong(models, data, tmp_path):
    def line(kind):
        return one_line_failure("evaluate", model_argv("evaluate", str(models[kind]), data, str(tmp_path / "o")))

    assert line("missing").endswith("missing.pt: No such file or directory")
    assert line("folder").endswith("folder.pt: Is a directory")
    assert "is not a facesearch model file (it holds a Tensor" in line("tensor")
    # Not torch's advice to load it with weights_only=False, which would run the file's code.
    assert "weights_only" not in line("text") and "is not a facesearch model file" in line("text")


def test_a_missing_data_folder(models, data, tmp_path):
    gone, out, good = str(tmp_path / "gone"), str(tmp_path / "out"), str(models["other_shape"].parent / "good.pt")
    commands = {
        "evaluate": ["evaluate", "--model", good, "--data", gone, "--out", out],
        "choose": ["choose", "--model", good, "--split", gone, "--arrays", gone, "--params", PARAMS, "--out", out],
        "tune": ["tune", "--backbone", "mobilenet_v2", "--grid", str(data / "plain.yaml"), "--split", gone,
                 "--arrays", gone, "--params", PARAMS, "--out", out],
        "dlib-reference": ["dlib-reference", "--data", gone, "--split", str(data / "split"), "--out", out],
        "results": ["results", "--metrics", gone, "--backbones", "resnet50"],
        "check-data": ["check-data", gone],
        "index": ["index", "build", "--model", good, "--photos", gone, "--out", out],
        "search": ["search", "--index", gone, str(data / "photo.jpg")],
    }  # fmt: skip
    for command, argv in commands.items():
        assert gone in one_line_failure(command, argv), command


def test_results_refuses_a_file_that_is_no_metrics(tmp_path):
    (tmp_path / "resnet50.json").write_text("{not json")
    (tmp_path / "mobilenet_v2.json").write_text('{"after": {}}')
    for backbone in ("resnet50", "mobilenet_v2"):
        message = one_line_failure("results", ["results", "--metrics", str(tmp_path), "--backbones", backbone])
        assert f"{backbone}.json is no metrics file of the evaluate stage" in message


EXPECTED = [
    ModelFileError("m.pt is not a facesearch model file (EOFError)"),
    FileNotFoundError(2, "No such file or directory", "m.pt"),
    FileNotFoundError("data/split/val.parquet"),  # as pandas raises it: the bare path
    IsADirectoryError(21, "Is a directory", "m.pt"),
    PermissionError(13, "Permission denied", "m.pt"),
    DatasetError("data folder d does not exist"),
]
EVERY_COMMAND = [
    ["evaluate", "--model", "m.pt", "--data", "d", "--out", "o.json"],
    ["dlib-reference", "--data", "d", "--out", "o.json"],
    ["check-data", "d"],
    ["tune", "--backbone", "resnet50", "--grid", "g.yaml", "--out", "o.json"],
    ["choose", "--model", "m.pt", "--out", "o.json"],
    ["index", "build", "--model", "m.pt", "--photos", "d", "--out", "i"],
    ["index", "add", "--index", "i", "--photos", "d"],
    ["index", "remove", "--index", "i", "--photos", "d"],
    ["index", "info", "--index", "i"],
    ["search", "--index", "i", "me.jpg"],
    ["results"],
]


@pytest.mark.parametrize("exc", EXPECTED, ids=lambda e: type(e).__name__)
@pytest.mark.parametrize("argv", EVERY_COMMAND, ids=lambda a: a[0])
def test_every_command_words_the_expected_failures(monkeypatch, argv, exc):
    # The dispatcher's net, whichever command and module raised it (index and search included).
    def fail(args):
        raise exc

    monkeypatch.setattr(cli, "_run", fail)
    assert one_line_failure(argv[0], argv) == f"{argv[0]}: {failure_line(exc)}"


def test_failure_line():
    assert failure_line(FileNotFoundError(2, "No such file or directory", "m.pt")) == "m.pt: No such file or directory"
    assert failure_line(FileNotFoundError("a/val.parquet")) == "a/val.parquet: No such file or directory"
    assert failure_line(FileNotFoundError("crop settings file p.yaml does not exist")) == (
        "crop settings file p.yaml does not exist"
    )
    assert failure_line(ValueError("two\nlines")) == "two lines"


def test_the_command_line_prints_one_line_and_exits_1(models, data, tmp_path):
    out = subprocess.run([sys.executable, "-m", "facesearch", *model_argv("evaluate", str(models["text"]), data,
                          str(tmp_path / "o"))], cwd=REPO, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert out.returncode == 1 and "Traceback" not in out.stderr
    assert out.stderr.strip().splitlines()[-1].startswith(f"evaluate: {models['text']} is not a facesearch model")
