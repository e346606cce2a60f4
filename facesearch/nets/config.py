"""What a saved model is: :class:`ModelConfig`, the fields every model file records to rebuild its network.

Apart from :mod:`facesearch.nets.models` (which builds networks from it) so that a fused model
(:mod:`facesearch.nets.fused`), which the models module loads, can name its own config too.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ModelConfig:
    """Everything needed to rebuild a model; saved inside every checkpoint.

    The defaults are library defaults, the report's fine-tuning setting for the
    torchvision backbones (ImageNet weights, last 10 layers, 218 px);
    ``get_model`` replaces ``weights`` and ``img_size`` by the backbone's own
    (:data:`facesearch.nets.models.BACKBONE_DEFAULTS`). The pipeline always passes every field from
    ``params.yaml: train.<backbone>``, whose sample defaults differ on purpose
    (random init, all layers, 64 px: a laptop CPU run).
    """

    backbone: str
    weights: str = "imagenet"  # PRETRAINED[backbone] ("imagenet"; dlib_resnet "dlib", sface "opencv_zoo") or "none"
    embedding_dim: int = 128
    normalize: bool = True  # L2-normalise the embedding
    trainable_layers: int = 10  # see freeze_all_but_last; -1 = everything trainable
    img_size: int = 218  # input side the model is trained and served at, px
    # Test-time augmentation: a face's embedding is the (re-normalised) mean of the face's and
    # its mirror image's (facesearch.inference.embed_array, the one function every path embeds
    # with). Part of the model, not of a caller, so validation, its threshold, the embed stage,
    # `evaluate`, the index and the app all embed the same way; False in files saved before it.
    flip_tta: bool = False
    # dlib-style jitter (dlib's num_jitters): also average this many slightly rotated, zoomed and
    # shifted views (facesearch.transforms.jittered); each is one more forward pass. 0 in older files.
    tta_jitters: int = 0
    # BatchNorm1d on the report's head output, before the L2 norm ("BNNeck", Luo et al. 2019): every
    # embedding dimension centred and scaled alike, so no shared large direction dominates the
    # cosine (docs/pipeline.md "Train", the sample's embeddings). Not for a backbone's own head. False in older files.
    head_bn: bool = False


# Fields added to ModelConfig after model files were first fingerprinted (a photo index knows its model
# by a hash of its config, preprocessing and weights; pretrained ships calibrations bound to it), with
# the value that changes nothing. A config holding that value is fingerprinted as if it lacked the
# field, so adding a field does not turn every model into "another model".
ADDED_FIELDS = {"head_bn": False}


def fingerprinted_config(config: dict) -> dict:
    """``config`` as a fingerprint sees it: :data:`ADDED_FIELDS` at their neutral value left out."""
    return {k: v for k, v in config.items() if not (k in ADDED_FIELDS and v == ADDED_FIELDS[k])}
