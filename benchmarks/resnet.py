"""ResNet-50 (torchvision's v1.5 layout: stride on the 3x3 conv) so bench_model.py needs no torchvision.

Module names match torchvision's resnet50, so state_dicts load into either. fused=True builds the blocks
from fastbn's fused modules: bn1/bn2 as BatchNormReLU2d and bn3 as BatchNormAddReLU2d (the residual add
and ReLU inside the BN op); parameters and buffers are the same, so a plain model's state_dict loads.
"""
import torch
from torch import nn

from shapes import RESNET50_STAGES


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, inplanes, planes, stride=1, downsample=None, fused=False):
        super().__init__()
        if fused:
            import fastbn

            bn_relu, bn_add_relu = fastbn.BatchNormReLU2d, fastbn.BatchNormAddReLU2d
        else:
            bn_relu = bn_add_relu = nn.BatchNorm2d
        width = planes
        self.conv1 = nn.Conv2d(inplanes, width, 1, bias=False)
        self.bn1 = bn_relu(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride=stride, padding=1, bias=False)
        self.bn2 = bn_relu(width)
        self.conv3 = nn.Conv2d(width, planes * self.expansion, 1, bias=False)
        self.bn3 = bn_add_relu(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.fused = fused

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        if self.fused:
            out = self.bn2(self.conv2(self.bn1(self.conv1(x))))
            return self.bn3(self.conv3(out), identity)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        out += identity
        return self.relu(out)


class ResNet50(nn.Module):
    def __init__(self, num_classes=1000, fused=False):
        super().__init__()
        if fused:
            import fastbn

            stem_bn = fastbn.BatchNormReLU2d(64)
        else:
            stem_bn = nn.BatchNorm2d(64)
        self.fused = fused
        self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = stem_bn
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        inplanes = 64
        for index, (planes, blocks, _) in enumerate(RESNET50_STAGES):
            stride = 1 if index == 0 else 2
            downsample = nn.Sequential(
                nn.Conv2d(inplanes, planes * Bottleneck.expansion, 1, stride=stride, bias=False),
                nn.BatchNorm2d(planes * Bottleneck.expansion),
            )
            if fused:
                downsample = fastbn.convert(downsample)
            layers = [Bottleneck(inplanes, planes, stride, downsample, fused)]
            inplanes = planes * Bottleneck.expansion
            layers += [Bottleneck(inplanes, planes, fused=fused) for _ in range(1, blocks)]
            setattr(self, f"layer{index + 1}", nn.Sequential(*layers))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(inplanes, num_classes)
        for m in self.modules():  # torchvision's initialisation
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x):
        x = self.bn1(self.conv1(x))
        if not self.fused:
            x = self.relu(x)
        x = self.maxpool(x)
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))
