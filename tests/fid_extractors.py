"""Tiny random feature extractors plugged into each FID library through its own extension point
(torch-fidelity's FeatureExtractorBase registry, clean-fid's ``custom_feat_extractor``), so the
libraries' FID/KID/IS code runs end to end in tests without Inception weights."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch_fidelity.feature_extractor_base import FeatureExtractorBase

DIMS = 16


def _seeded_conv() -> nn.Conv2d:
    conv = nn.Conv2d(3, DIMS, 3, stride=2)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        conv.weight.copy_(torch.randn(conv.weight.shape, generator=g) * 0.2)
        conv.bias.copy_(torch.randn(conv.bias.shape, generator=g) * 0.1)
    return conv


class TinyTorchFidelity(FeatureExtractorBase):
    """16 features and 10 logits of a random conv layer; reads uint8 NCHW like Inception."""

    def __init__(self, name, features_list, **kwargs):
        super().__init__(name, features_list)
        self.conv = _seeded_conv()
        self.head = nn.Linear(DIMS, 10)
        with torch.no_grad():
            self.head.weight.copy_(torch.randn(10, DIMS, generator=torch.Generator().manual_seed(1)))
            self.head.bias.zero_()

    @staticmethod
    def get_provided_features_list():
        return (str(DIMS), "logits_unbiased")

    @staticmethod
    def get_default_feature_layer_for_metric(metric):
        return "logits_unbiased" if metric == "isc" else str(DIMS)

    @staticmethod
    def can_be_compiled():
        return False

    @staticmethod
    def get_dummy_input_for_compile():
        return torch.zeros(1, 3, 16, 16, dtype=torch.uint8)

    def forward(self, x):
        assert x.dtype == torch.uint8, "torch-fidelity hands extractors uint8 images"
        features = self.conv(x.float() / 127.5 - 1).relu().mean((2, 3)).double()
        out = {str(DIMS): features, "logits_unbiased": self.head(features.float()).double()}
        return tuple(out[name] for name in self.features_list)


class TinyCleanFID(nn.Module):
    """clean-fid custom extractor: float NCHW images in 0-255 (299² after its resizing) → 16 features."""

    def __init__(self):
        super().__init__()
        self.conv = _seeded_conv()

    def forward(self, x):
        x = F.adaptive_avg_pool2d(x.float() / 127.5 - 1, 32)
        return self.conv(x).relu().mean((2, 3))
