"""One file per backbone behind one registry: ``get_model(name)`` builds any of them the same way."""

from __future__ import annotations

import torch
from torch import nn

from facesearch.nets import models
from facesearch.nets.backbone import Backbone
from facesearch.nets.models import BACKBONE_DEFAULTS, BACKBONES, get_model, load_model, save_model


def test_each_backbone_is_the_build_of_its_own_file():
    assert set(BACKBONES) == set(BACKBONE_DEFAULTS)
    for name, build in BACKBONES.items():
        assert (build.__module__, build.__name__) == (f"facesearch.nets.{name}", "build")


def test_a_new_backbone_is_a_build_function_and_a_registry_line(monkeypatch, tmp_path):
    def build(pretrained: bool, embedding_dim: int) -> Backbone:
        return Backbone(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()), 4)

    monkeypatch.setitem(BACKBONES, "tiny", build)
    monkeypatch.setitem(BACKBONE_DEFAULTS, "tiny", {"weights": "none", "img_size": 16})
    monkeypatch.setitem(models.PRETRAINED, "tiny", "none")
    torch.manual_seed(0)
    model = get_model("tiny", embedding_dim=8).eval()
    assert model(torch.zeros(2, 3, 16, 16)).shape == (2, 8)
    save_model(tmp_path / "tiny.pt", model)
    loaded, payload = load_model(tmp_path / "tiny.pt")
    assert payload["config"]["backbone"] == "tiny" and loaded.config == model.config
