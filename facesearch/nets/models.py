"""Embedding networks: torchvision backbones with the report's 128-d head, and the face networks (dlib, SFace).

``get_model(name)`` is the one factory the training stage, the export and the
app use; backbones are data (``params.yaml: train.<backbone>``), not code paths.
Each backbone is one file (``facesearch/nets/<name>.py``: ``build``) and a line of
:data:`BACKBONES` and :data:`BACKBONE_DEFAULTS`.

ImageNet weights come through torchvision's weights API and its cache
(:mod:`facesearch.nets.backbone`: where they are neither cached nor downloadable,
``WeightsUnavailable`` names the exact file and folder to put it in). ``dlib_resnet``
is face-pretrained instead: dlib's recognition network, read from the
``face_recognition_models`` package (see :mod:`facesearch.nets.dlib_resnet`), so it
needs no download.
"""

from __future__ import annotations

import errno
import os
import pickle
from collections.abc import Callable
from dataclasses import asdict

import torch
import torch.nn.functional as F
from torch import nn

from facesearch.nets import dlib_resnet, fused, mobilenet_v2, resnet50, sface
from facesearch.nets.backbone import Backbone
from facesearch.nets.config import ModelConfig

# ImageNet statistics the torchvision weights were trained with (RGB, 0..1 scale).


class ModelFileError(ValueError):
    """A file that is no model :func:`save_model` wrote: empty, truncated, another format, another network."""


def failure_line(exc: BaseException) -> str:
    """``exc`` as the one line a command prints (``<command>: <line>``) for a file it cannot use.

    For the failures every command expects of the files it is given: a :class:`ModelFileError`,
    a missing, unreadable or misplaced path (OSError). Those that name their path (``open``,
    numpy, torch) read ``<path>: <reason>``, not Python's ``[Errno 2] ...: '<path>'``; pandas
    raises FileNotFoundError with the bare path, which gets the same form. Any other message is
    kept, its line breaks folded into spaces. Here rather than in :mod:`facesearch.io`, which
    every stage imports: a change to it would re-run them all, the crop stage included.
    """
    bare_path = isinstance(exc, FileNotFoundError) and exc.errno is None and len(str(exc).split()) == 1
    if isinstance(exc, OSError) and exc.filename is not None:
        text = f"{os.fsdecode(exc.filename)}: {exc.strerror or exc}"
    elif bare_path:
        text = f"{exc}: No such file or directory"
    else:
        text = str(exc) or type(exc).__name__
    return " ".join(text.split())


# One file per backbone: build(pretrained, embedding_dim) -> Backbone (facesearch.nets.backbone).
BACKBONES: dict[str, Callable[[bool, int], Backbone]] = {
    "resnet50": resnet50.build,
    "mobilenet_v2": mobilenet_v2.build,
    "dlib_resnet": dlib_resnet.build,
    "sface": sface.build,
}
# Each backbone's own ModelConfig defaults, which get_model applies before the caller's
# overrides: its pretrained weights and the input side those weights expect (dlib's
# network was trained on 150 px aligned chips; the report fed the torchvision ones 218 px).
BACKBONE_DEFAULTS: dict[str, dict] = {
    "resnet50": {"weights": "imagenet", "img_size": 218},
    "mobilenet_v2": {"weights": "imagenet", "img_size": 218},
    "dlib_resnet": {"weights": "dlib", "img_size": 150},
    # OpenCV Zoo's SFace (facesearch.nets.sface), on its 112 px ArcFace-template chips.
    "sface": {"weights": "opencv_zoo", "img_size": 112},
}
# The `weights` value that means "pretrained" for each backbone.
PRETRAINED = {name: d["weights"] for name, d in BACKBONE_DEFAULTS.items()}


def resolve_device(name: str = "auto", index: int | None = None) -> torch.device:
    """``auto``: the GPU when there is one, else the CPU; any other name as given.

    ``index`` picks the GPU of a ``cuda`` device (a DDP process passes its
    LOCAL_RANK); a CPU ignores it. Asking for CUDA where there is none fails here,
    with the reason, rather than at the first tensor moved.
    """
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device {name!r} requested but no CUDA device is available")
    if device.type == "cuda" and index is not None:
        device = torch.device("cuda", index)
    return device


class EmbeddingNet(nn.Module):
    """backbone -> head [-> L2 norm].

    The head is the report's AdaptiveAvgPool -> Flatten -> Linear(C, d) -> ReLU -> Linear(d, d)
    [-> BatchNorm1d(d) with ``config.head_bn``], unless the backbone brings its own (dlib's ResNet does).
    """

    def __init__(self, features: nn.Module, channels: int, config: ModelConfig, head: nn.Module | None = None):
        super().__init__()
        self.config = config
        self.backbone = features
        d = config.embedding_dim
        if head is not None and config.head_bn:
            raise ValueError(f"{config.backbone}: head_bn applies to the report's head, not the backbone's own")
        self.head = head or nn.Sequential(
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, d), nn.ReLU(inplace=True), nn.Linear(d, d),
            *([nn.BatchNorm1d(d)] if config.head_bn else []),
        )  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.head(self.backbone(x))
        return F.normalize(z.float(), dim=1) if self.config.normalize else z.float()

    def train(self, mode: bool = True) -> EmbeddingNet:
        super().train(mode)
        # Frozen batch-norm layers keep their (pretrained) running statistics:
        # updating them from small fine-tuning batches would shift the features
        # the frozen convolutions were trained to produce.
        for module in self.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm) and not any(
                p.requires_grad for p in module.parameters()
            ):
                module.eval()
        return self


def parameter_layers(model: nn.Module) -> list[nn.Module]:
    """The model's "layers" in forward order: every leaf module that owns parameters.

    That is each convolution, batch norm and linear layer (activations, pooling
    and dropout own no parameters and do not count). Registration order is
    forward order for the torchvision backbones used here, then the head.
    """
    return [m for m in model.modules() if not list(m.children()) and list(m.parameters(recurse=False))]


def freeze_all_but_last(model: nn.Module, n: int) -> int:
    """Make only the last ``n`` parameter layers trainable (``n < 0``: all); returns trainable params."""
    layers = parameter_layers(model)
    keep = set(map(id, layers if n < 0 else layers[len(layers) - n :] if n else []))
    for layer in layers:
        for p in layer.parameters(recurse=False):
            p.requires_grad = id(layer) in keep
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def get_model(name: str, **overrides) -> EmbeddingNet:
    """Build the embedding network ``name`` (``resnet50``, ``mobilenet_v2``, ``dlib_resnet``, ``sface``).

    ``overrides`` are :class:`ModelConfig` fields (weights, embedding_dim,
    normalize, trainable_layers, img_size); those not given come from
    :data:`BACKBONE_DEFAULTS`, then :class:`ModelConfig`. Random initialisation
    follows the global torch seed, so seed first for a reproducible untrained network.
    """
    if name not in BACKBONES:
        raise ValueError(f"unknown backbone {name!r}; choose from {sorted(BACKBONES)}")
    config = ModelConfig(backbone=name, **(BACKBONE_DEFAULTS[name] | overrides))
    if config.weights not in (PRETRAINED[name], "none"):
        raise ValueError(f"{name}: weights must be {PRETRAINED[name]!r} or 'none', not {config.weights!r}")
    model = _build(config, pretrained=config.weights != "none")
    freeze_all_but_last(model, config.trainable_layers)
    return model


def _build(config: ModelConfig, pretrained: bool) -> EmbeddingNet:
    """The architecture of ``config``, with the backbone's pretrained weights when ``pretrained``."""
    spec = BACKBONES[config.backbone](pretrained, config.embedding_dim)
    return EmbeddingNet(spec.features, spec.channels, config, spec.head)


def seeded_model(config: ModelConfig, seed: int) -> EmbeddingNet:
    """The network exactly as training starts it: seed, then build.

    The train stage builds its model with this, so the export stage can rebuild
    the untrained network ("before fine-tuning") from the saved config and seed.
    """
    torch.manual_seed(seed)
    fields = {k: v for k, v in asdict(config).items() if k != "backbone"}
    return get_model(config.backbone, **fields)


def trainable_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def save_model(path: str | os.PathLike, model: EmbeddingNet, extra: dict | None = None) -> None:
    """Save a servable model: config + weights (+ ``extra`` metadata), atomically.

    Equal payloads give equal bytes (DVC's hash of the model is reproducible).
    """
    from facesearch.io import atomic_path

    payload = {"config": asdict(model.config), "state_dict": model.state_dict(), **(extra or {})}
    # Saved through a file object: given a path, torch.save names the zip's records after
    # the file, here atomic_path's random temporary name, and equal models got unequal bytes.
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        torch.save(payload, f)


def load_model(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> tuple[EmbeddingNet, dict]:
    """Load a model saved by :func:`save_model`; returns (model in eval mode, the saved payload).

    A file that exists but holds no such model raises :class:`ModelFileError` naming it, one
    type for every way it can fail (torch's unpickler, a missing key, weights of another shape),
    so each command that takes a model file can turn it into its message. A missing file raises
    FileNotFoundError, a folder or an unreadable file its own OSError: those are about the path
    (:func:`failure_line` words them all).
    """
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
        if not isinstance(payload, dict):  # a bare tensor would answer payload["config"] with an IndexError
            raise TypeError(f"it holds a {type(payload).__name__}, not a saved model's dict")
        config = ModelConfig(**payload["config"])
        if config.backbone == fused.FUSED:  # several member networks behind one chip sheet
            model = fused.rebuild(payload, lambda member: _build(ModelConfig(**member), pretrained=False))
        else:
            model = _build(config, pretrained=False)  # weights come from the file
        model.load_state_dict(payload["state_dict"])
    except FileNotFoundError:
        raise
    except OSError as exc:
        # torch's zip reader seeks past the end of some truncated files (EINVAL); any other
        # OSError (a folder, no permission, a failing disk) is about the path, not its content.
        if exc.errno != errno.EINVAL:
            raise
        raise ModelFileError(f"{path} is not a facesearch model file (truncated? {exc.strerror})") from exc
    except pickle.UnpicklingError as exc:
        # torch's message for it advises loading with weights_only=False: running the file's code.
        reason = "not a torch file, or one holding more than tensors and plain data"
        raise ModelFileError(f"{path} is not a facesearch model file ({reason})") from exc
    except (EOFError, RuntimeError, KeyError, TypeError, ValueError) as exc:
        # All its lines, folded: a state_dict mismatch says which weights only after its first.
        reason = " ".join(str(exc).split()) or type(exc).__name__
        raise ModelFileError(f"{path} is not a facesearch model file ({reason[:200]})") from exc
    freeze_all_but_last(model, config.trainable_layers)
    return model.eval(), payload
