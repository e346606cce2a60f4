"""``python -m stages.embed`` refuses a model or data folder it cannot use in one line: ``embed: <reason>``."""

from __future__ import annotations

import pytest
import torch
from conftest import BAD_MODELS, REPO, bad_model_files

from facesearch.nets.models import get_model, save_model
from stages import embed

PARAMS = str(REPO / "params.yaml")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return bad_model_files(tmp_path_factory.mktemp("models"))


def one_line_failure(argv: list[str]) -> str:
    with pytest.raises(SystemExit) as exc:
        embed.main(argv)
    message = exc.value.code
    assert isinstance(message, str) and message.startswith("embed: "), message  # status 1, printed
    assert "\n" not in message and "Traceback" not in message, message
    return message


def argv(model, split, arrays, out) -> list[str]:
    return ["--model", str(model), "--split", str(split), "--arrays", str(arrays), "--out", str(out),
            "--params", PARAMS]  # fmt: skip


@pytest.mark.parametrize("kind", BAD_MODELS)
def test_a_model_file_that_is_no_model(kind, models, tmp_path):
    assert str(models[kind]) in one_line_failure(argv(models[kind], tmp_path, tmp_path, tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_a_model_the_train_stage_did_not_write(models, tmp_path):
    # "before" is rebuilt from the training seed, which only the train stage records.
    message = one_line_failure(argv(models["empty"].parent / "good.pt", tmp_path, tmp_path, tmp_path / "out"))
    assert "has no training record" in message


def test_a_missing_data_folder(tmp_path):
    torch.manual_seed(0)
    model = get_model("mobilenet_v2", weights="none", embedding_dim=8, img_size=32)
    save_model(tmp_path / "m.pt", model, extra={"train_config": {"seed": 0}})
    gone = tmp_path / "gone"
    message = one_line_failure(argv(tmp_path / "m.pt", gone, gone, tmp_path / "out"))
    assert message == f"embed: {gone / 'query.parquet'}: No such file or directory"
    assert not (tmp_path / "out").exists()  # nothing half-written
