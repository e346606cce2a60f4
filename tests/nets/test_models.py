from __future__ import annotations

import urllib.error

import pytest
import torch
from torch import nn
from torchvision import models as tvm

from facesearch.nets import models
from facesearch.nets.backbone import WeightsUnavailable, weights_cache_path
from facesearch.nets.models import (
    ModelFileError,
    get_model,
    load_model,
    parameter_layers,
    save_model,
    trainable_parameters,
)


@pytest.fixture
def torch_home(tmp_path, monkeypatch):
    """An empty torchvision cache, and no network: a download attempt fails at once."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))

    def no_network(url, dst, *args, **kwargs):
        raise urllib.error.URLError("network unreachable (test)")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    return tmp_path


@pytest.mark.parametrize(("name", "channels"), [("mobilenet_v2", 1280), ("resnet50", 2048)])
def test_head_shape_and_normalisation(name, channels):
    torch.manual_seed(0)
    model = get_model(name, weights="none", embedding_dim=16, img_size=32).eval()
    head = list(model.head)
    assert [type(m) for m in head] == [nn.AdaptiveAvgPool2d, nn.Flatten, nn.Linear, nn.ReLU, nn.Linear]
    assert head[2].in_features == channels and head[4].out_features == 16
    with torch.no_grad():
        z = model(torch.randn(3, 3, 32, 32))
    assert z.shape == (3, 16)
    assert torch.allclose(z.norm(dim=1), torch.ones(3), atol=1e-5)
    raw = get_model(name, weights="none", embedding_dim=16, normalize=False).eval()
    with torch.no_grad():
        assert not torch.allclose(raw(torch.randn(2, 3, 32, 32)).norm(dim=1), torch.ones(2))


@pytest.mark.parametrize("name", ["mobilenet_v2", "resnet50"])
def test_head_bn_normalises_the_head_output(name):
    torch.manual_seed(0)
    model = get_model(name, weights="none", embedding_dim=16, img_size=32, head_bn=True)
    assert isinstance(model.head[-1], nn.BatchNorm1d) and model.head[-1].num_features == 16
    assert model.config.head_bn
    with torch.no_grad():
        z = model.train()(torch.randn(4, 3, 32, 32))
    assert torch.allclose(z.norm(dim=1), torch.ones(4), atol=1e-5)
    with pytest.raises(ValueError, match="head_bn"):
        get_model("dlib_resnet", weights="none", head_bn=True)  # dlib's own head is the point of that backbone


def test_freeze_last_n_layers_counts_parameter_layers():
    model = get_model("mobilenet_v2", weights="none", trainable_layers=10)
    layers = parameter_layers(model)
    trainable = [m for m in layers if all(p.requires_grad for p in m.parameters())]
    assert trainable == layers[-10:]
    assert isinstance(layers[-1], nn.Linear) and isinstance(layers[-2], nn.Linear)  # the head counts
    assert trainable_parameters(model) == sum(p.numel() for m in layers[-10:] for p in m.parameters())
    everything = get_model("mobilenet_v2", weights="none", trainable_layers=-1)
    assert trainable_parameters(everything) == sum(p.numel() for p in everything.parameters())


def test_frozen_batchnorm_stays_in_eval_mode():
    model = get_model("mobilenet_v2", weights="none", trainable_layers=4).train()
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    frozen = [m for m in bns if not any(p.requires_grad for p in m.parameters())]
    assert frozen and all(not m.training for m in frozen)
    assert all(m.training for m in bns if m not in frozen)


def test_imagenet_weights_load_from_torchvision_cache(torch_home):
    weights = tvm.MobileNet_V2_Weights.IMAGENET1K_V2
    path = weights_cache_path(weights)
    assert path == torch_home / "hub" / "checkpoints" / "mobilenet_v2-7ebf99e0.pth"
    reference = tvm.mobilenet_v2(weights=None)
    with torch.no_grad():
        reference.features[0][0].weight.fill_(0.125)  # a recognisable "pretrained" value
    path.parent.mkdir(parents=True)
    torch.save(reference.state_dict(), path)
    model = get_model("mobilenet_v2", weights="imagenet")
    assert torch.all(model.backbone[0][0].weight == 0.125)


def test_missing_weights_name_the_file(torch_home):
    with pytest.raises(WeightsUnavailable) as info:
        get_model("resnet50", weights="imagenet")
    message = str(info.value)
    assert str(torch_home / "hub" / "checkpoints" / "resnet50-11ad3fa6.pth") in message
    assert "https://download.pytorch.org/models/resnet50-11ad3fa6.pth" in message
    assert "weights: none" in message


def test_bad_names_are_clear():
    with pytest.raises(ValueError, match="unknown backbone"):
        get_model("vgg16")
    with pytest.raises(ValueError, match="weights must be"):
        get_model("resnet50", weights="imagenet21k")


def test_save_load_roundtrip_and_seeded_init(tmp_path):
    torch.manual_seed(3)
    model = get_model("mobilenet_v2", weights="none", embedding_dim=8, img_size=40, trainable_layers=5).eval()
    save_model(tmp_path / "m.pt", model, extra={"note": "x"})
    loaded, payload = load_model(tmp_path / "m.pt")
    assert payload["note"] == "x" and loaded.config == model.config
    x = torch.randn(2, 3, 40, 40)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    assert trainable_parameters(loaded) == trainable_parameters(model)
    torch.manual_seed(3)
    again = get_model("mobilenet_v2", weights="none", embedding_dim=8, img_size=40, trainable_layers=5).eval()
    with torch.no_grad():
        assert torch.equal(again(x), model(x))  # the untrained network is reproducible from its seed


def test_a_file_that_is_no_model_is_named_in_one_error(tmp_path):
    # Each command that takes a model file turns this one type into its message, not a traceback.
    model = get_model("mobilenet_v2", weights="none", embedding_dim=8, img_size=40).eval()
    save_model(tmp_path / "m.pt", model)
    payload = torch.load(tmp_path / "m.pt", weights_only=True)
    torch.save({"state_dict": payload["state_dict"]}, tmp_path / "no_config.pt")
    torch.save({**payload, "config": {**payload["config"], "embedding_dim": 16}}, tmp_path / "other_shape.pt")
    (tmp_path / "empty.pt").write_bytes(b"")
    (tmp_path / "text.pt").write_text("not a model")
    (tmp_path / "truncated.pt").write_bytes((tmp_path / "m.pt").read_bytes()[:5000])
    torch.save(torch.zeros(3), tmp_path / "tensor.pt")  # payload["config"] of a tensor: an IndexError
    torch.save([1, 2], tmp_path / "list.pt")
    torch.save({**payload, "config": {**payload["config"], "backbone": "vgg"}}, tmp_path / "other_backbone.pt")
    for name in ("empty", "text", "no_config", "other_shape", "truncated", "tensor", "list", "other_backbone"):
        with pytest.raises(ModelFileError, match=rf"{name}\.pt is not a facesearch model file \(."):
            load_model(tmp_path / f"{name}.pt")
    with pytest.raises(FileNotFoundError):  # a missing file stays what it is
        load_model(tmp_path / "absent.pt")


def test_each_backbone_gets_its_own_defaults(monkeypatch):
    built = []
    monkeypatch.setattr(models, "_build", lambda config, pretrained: built.append(config) or nn.Linear(1, 1))
    get_model("dlib_resnet")
    get_model("mobilenet_v2")
    get_model("resnet50", img_size=64)
    assert [(c.weights, c.img_size) for c in built] == [("dlib", 150), ("imagenet", 218), ("imagenet", 64)]
