"""MobileNet-v2 (torchvision), ImageNet-pretrained: the report's light backbone, 1280 channels."""

from __future__ import annotations

from torchvision import models as tvm

from facesearch.nets.backbone import Backbone, load_pretrained_state_dict


def build(pretrained: bool, embedding_dim: int) -> Backbone:
    net = tvm.mobilenet_v2(weights=None)
    if pretrained:
        net.load_state_dict(load_pretrained_state_dict("mobilenet_v2", tvm.MobileNet_V2_Weights.IMAGENET1K_V2))
    return Backbone(net.features, 1280)
