"""ResNet-50 (torchvision), ImageNet-pretrained: the report's backbone, its 2048-channel last stage."""

from __future__ import annotations

from torch import nn
from torchvision import models as tvm

from facesearch.nets.backbone import Backbone, load_pretrained_state_dict


def build(pretrained: bool, embedding_dim: int) -> Backbone:
    net = tvm.resnet50(weights=None)
    if pretrained:
        net.load_state_dict(load_pretrained_state_dict("resnet50", tvm.ResNet50_Weights.IMAGENET1K_V2))
    features = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool, net.layer1, net.layer2, net.layer3, net.layer4)
    return Backbone(features, 2048)
