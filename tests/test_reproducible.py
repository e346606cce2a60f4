"""Same params and inputs give the same model file, byte for byte, for every backbone (on CPU).

docs/pipeline.md ("Train": reproducibility) says where bit-equality cannot hold.
"""

from __future__ import annotations

import time

import pytest
import torch
from conftest import run_train

from facesearch.nets.models import get_model, save_model

# keep: last, so the model file holds what the steps did (not the seeded start validation may prefer).
FEW_STEPS = {"keep": "last", "epochs": 1, "steps_per_epoch": 2, "p_identities": 2, "k_images": 2, "embedding_dim": 8}


@pytest.mark.parametrize("backbone", ["resnet50", "mobilenet_v2", "dlib_resnet"])
def test_training_twice_gives_the_same_model_bytes(prepared, backbone):
    # A channels-last, Adam, augmenting run (flip and erasing drawn from the seeded generator).
    overrides = FEW_STEPS | {"weights": "none", "augment.flip_p": 0.5, "augment.erase_p": 0.5, "augment.dropout_p": 0.5}
    chips = {}
    if backbone == "dlib_resnet":
        overrides |= {"img_size": 112, "trainable_layers": -1}  # its unpadded convs need >= 112 px
        # On the prepared arrays' 40 px square chips, not dlib's own (which need dlib's predictor).
        chips = {"chips.dlib_resnet.align": "none", "chips.dlib_resnet.size": 40, "chips.dlib_resnet.landmarks": 5}
    start = time.perf_counter()
    first = run_train(prepared, f"rep_{backbone}_a", overrides, backbone=backbone, params=chips) / "model.pt"
    second = run_train(prepared, f"rep_{backbone}_b", overrides, backbone=backbone, params=chips) / "model.pt"
    a, b = (torch.load(p, weights_only=True)["state_dict"] for p in (first, second))
    for name in a:
        assert torch.equal(a[name], b[name]), name
    assert first.read_bytes() == second.read_bytes()
    print(f"{backbone}: two runs in {time.perf_counter() - start:.1f} s")


def test_thread_count_is_part_of_the_result(prepared):
    """Why cpu_threads is a param: another thread count sums floats in another order."""
    one = run_train(prepared, "threads_1", FEW_STEPS | {"cpu_threads": 1}) / "model.pt"
    two = run_train(prepared, "threads_2", FEW_STEPS | {"cpu_threads": 2}) / "model.pt"
    a, b = (torch.load(p, weights_only=True)["state_dict"] for p in (one, two))
    assert any(not torch.equal(a[k], b[k]) for k in a)


def test_equal_models_save_to_equal_bytes(tmp_path):
    torch.manual_seed(0)
    model = get_model("mobilenet_v2", weights="none", embedding_dim=8)
    save_model(tmp_path / "a.pt", model, extra={"x": 1})
    save_model(tmp_path / "sub" / "b.pt", model, extra={"x": 1})
    assert (tmp_path / "a.pt").read_bytes() == (tmp_path / "sub" / "b.pt").read_bytes()
