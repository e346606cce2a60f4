"""facesearch.nets.inference: batched embedding, and the model's test-time flip and jitter."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from facesearch.nets.inference import embed_array
from facesearch.nets.models import get_model, load_model, save_model
from facesearch.nets.transforms import jittered, to_model_input

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    # resnet50: an untrained mobilenet_v2 maps every 32 px input to the same vector (nothing to flip).
    return get_model("resnet50", weights="none", embedding_dim=8, img_size=32, trainable_layers=-1).eval()


@pytest.fixture(scope="module")
def faces():
    return np.random.default_rng(0).integers(0, 256, (5, 40, 40, 3), dtype=np.uint8)


def with_flip(model, on: bool):
    model.config = dataclasses.replace(model.config, flip_tta=on)
    return model


def test_flip_is_the_normalised_mean_of_the_face_and_its_mirror(model, faces):
    plain = embed_array(with_flip(model, False), faces, 32, CPU, batch=2)
    mirror = embed_array(model, faces[:, :, ::-1], 32, CPU, batch=2)
    both = embed_array(with_flip(model, True), faces, 32, CPU, batch=2)
    mean = (plain + mirror) / 2
    assert np.allclose(both, mean / np.linalg.norm(mean, axis=1, keepdims=True), atol=1e-5)
    assert not np.allclose(both, plain, atol=1e-3)
    # So a face and its mirror image get the same embedding.
    assert np.allclose(embed_array(model, faces[:, :, ::-1], 32, CPU), both, atol=1e-5)
    with_flip(model, False)


def test_the_flip_travels_with_the_model_file(model, faces, tmp_path):
    path = tmp_path / "m.pt"
    save_model(path, with_flip(model, True))
    loaded, payload = load_model(path)
    assert payload["config"]["flip_tta"] is True and loaded.config.flip_tta
    assert np.allclose(embed_array(loaded, faces, 32, CPU), embed_array(model, faces, 32, CPU), atol=1e-6)
    with_flip(model, False)


def test_jitter_averages_the_flip_and_each_jittered_view(model, faces):
    model.config = dataclasses.replace(model.config, flip_tta=True, tta_jitters=3)
    try:
        got = embed_array(model, faces, 32, CPU, batch=2)
        with torch.no_grad():
            x = to_model_input(torch.from_numpy(faces), 32, CPU)
            views = [x, x.flip(-1), *jittered(x, 3)]
            mean = sum(model(v) for v in views).numpy() / len(views)
        assert np.allclose(got, mean / np.linalg.norm(mean, axis=1, keepdims=True), atol=1e-5)
        # the same warps whatever the batch: one photo's embedding does not depend on its neighbours
        assert np.allclose(embed_array(model, faces[2:3], 32, CPU), got[2:3], atol=1e-5)
        model.config = dataclasses.replace(model.config, tta_jitters=0)
        assert not np.allclose(embed_array(model, faces, 32, CPU), got, atol=1e-4)
    finally:
        model.config = dataclasses.replace(model.config, flip_tta=False, tta_jitters=0)


def test_jitters_travel_with_the_model_file(model, faces, tmp_path):
    model.config = dataclasses.replace(model.config, tta_jitters=2)
    try:
        save_model(tmp_path / "m.pt", model)
        loaded, payload = load_model(tmp_path / "m.pt")
        assert payload["config"]["tta_jitters"] == 2 and loaded.config.tta_jitters == 2
        assert np.allclose(embed_array(loaded, faces, 32, CPU), embed_array(model, faces, 32, CPU), atol=1e-6)
    finally:
        model.config = dataclasses.replace(model.config, tta_jitters=0)
