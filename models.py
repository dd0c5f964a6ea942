"""The two segmentation networks of the MFM paper (arXiv 2509.13801), and DeepLabV3+ for the semi-supervised VOC
benchmark, split into encoder and decoder for MFM.

DeepLabV2 (METHOD.md §2; the paper's DACS rows, GTA→CS 55.9 / SYN→CS 55.8 with MFM): a ResNet with layer3/layer4
dilated (2, 4) instead of strided (output stride 8: a 512 crop gives a 2048x64x64 map) and the DeepLabV2 "ASPP
classifier" (parallel dilated 3x3 convs, summed). Backbone "resnet101-v1c" is the benchmark code bases' ResNetV1c
(three 3x3 convs in the stem, open-mmlab's ImageNet weights); "resnet101"/"resnet50" are torchvision's;
"resnet18" is our CPU toy, not the paper's.

DAFormer (METHOD.md §7; the paper's MiT-B5 rows, DAFormer GTA→CS 68.3 -> 70.3 with MFM, also under HRDA/MIC):
the SegFormer Mix Transformer encoder MiT-B0...B5 (4 stages, strides 4, 8, 16, 32; module names = the keys of the
SegFormer ImageNet files `mit_bX.pth`, which users download themselves) and the DAFormer head (per-stage Linear
embeddings fused by parallel dilated depthwise branches). Written from METHOD.md's facts, no SegFormer code.

DeepLabV3+ ("deeplabv3plus-resnet101", -50, -18; the segmentor of UniMatch and the semi-supervised literature on
PASCAL VOC): torchvision's ResNet with layer4 dilated (output stride 16), ASPP (6, 12, 18) + image pooling, and the
decoder that fuses the ASPP output with layer1's map (stride 4). Facts from UniMatch's code (cited there).

All three have one face, so the training loop, MFM (Fig. 2) and the auxiliaries never ask which one they hold:

    model  = build_model(19, "mit_b5", pretrained="mit_b5.pth")   # or "resnet101-v1c", ...
    feats  = model.encode(x)      # x RGB in [0, 1]; DeepLabV2: (B, 2048, H/8, W/8); DAFormer: 4 maps, H/4 ... H/32
    logits = model.decode(feats)  # DeepLabV2: (B, K, H/8, W/8); DAFormer: (B, K, H/4, W/4)
                                  # DeepLabV3+: encode {"low": H/4, "high": H/16} -> (B, K, H/4, W/4)
    logits = upsample(logits, label.shape[-2:])

`feat_channels` is what mfm.Rebuilder(in_channels=...) takes, `feat_stride` the stride of the last map; `rebuild`,
`deepest` and `compile_encode_decode` answer what the training loop would otherwise ask of a network's kind (HRDA's
wrapper, hrda.py, answers them for its two views). From mfm.py only the loss (weighted_cross_entropy) is used.

    python models.py                # parameter counts and output shapes of every backbone (meta device, instant)
"""
import argparse
import copy
import itertools
import operator
import os
import re
import warnings
import zipfile
from collections import OrderedDict
from pathlib import Path

import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from mfm import weighted_cross_entropy

IMAGENET_MEAN = (0.485, 0.456, 0.406)  # RGB; torchvision's, open-mmlab's and SegFormer's ImageNet weights use them
IMAGENET_STD = (0.229, 0.224, 0.225)
RESNETS = ("resnet101-v1c", "resnet101", "resnet50", "resnet18")  # resnet18: our CPU toy, not the paper's
MITS = tuple(f"mit_b{i}" for i in range(6))
DLV3P = {f"deeplabv3plus-{r}": r for r in ("resnet101", "resnet50", "resnet18")}  # -> torchvision's ResNet
BACKBONES = RESNETS + MITS + tuple(DLV3P)
V1C_URL = "https://download.openmmlab.com/pretrain/third_party/resnet101_v1c-e67eebb6.pth"
MIT_DEPTHS = dict(mit_b0=(2, 2, 2, 2), mit_b1=(2, 2, 2, 2), mit_b2=(3, 4, 6, 3), mit_b3=(3, 4, 18, 3),
                  mit_b4=(3, 8, 27, 3), mit_b5=(3, 6, 40, 3))
MIT_HEADS, MIT_SR = (1, 2, 5, 8), (8, 4, 2, 1)  # all variants; MLP ratio 4 (METHOD.md §7)
CONV_BN = {"0": "conv", "1": "bn"}  # our conv + BN Sequentials' indices -> mmcv ConvModule's names (see DAFormer)


class WeightsError(Exception):
    """A weights file or option that cannot be used, or a checkpoint that cannot be written; the message
    names it and says what was expected."""


def upsample(logits, size):
    """Logits (B, K, h, w) -> (B, K, *size), bilinear, align_corners=False: the one resize to label size."""
    if tuple(logits.shape[-2:]) == tuple(size):
        return logits
    return F.interpolate(logits, size=size, mode="bilinear", align_corners=False)


class _EncoderDecoder(nn.Module):
    """The face both networks share; subclasses set `backbone` (the encoder) and `head` (the decoder)."""

    def __init__(self):
        super().__init__()
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def encode(self, x):
        """Images (B, 3, H, W), RGB in [0, 1], normalised here -> DeepLabV2: f (B, C, H/8, W/8); DAFormer:
        [(B, C_i, H/s_i, W/s_i)], s = 4, 8, 16, 32 (ceil); DeepLabV3+: {"low": H/4, "high": H/16} (ceil)."""
        return self.backbone((x - self.mean) / self.std)

    def decode(self, feats):
        """encode's output -> logits, DeepLabV2 (B, K, H/8, W/8), DAFormer (B, K, H/4, W/4). MFM runs this on
        the reconstructed features."""
        return self.head(feats)

    def seg_loss(self, out, label, weight=1.0):
        """decode's output -> the training loss against a label (B, H, W); a training framework such as HRDA
        overrides it. weight: scalar or (B, H, W) confidence."""
        return weighted_cross_entropy(upsample(out, label.shape[-2:]), label, weight)

    def forward(self, x):
        return self.decode(self.encode(x))

    def mmseg_names(self):
        """{our state-dict key: the same tensor's key in mmseg 0.16 (the segmentor inside a released DAFormer/HRDA/MIC
        checkpoint)} for every parameter and buffer, from the family's rename table `mmseg_rename`."""
        if not hasattr(self, "mmseg_rename"):
            raise WeightsError(f"the released DAFormer/HRDA/MIC checkpoints hold DeepLabV2 and DAFormer networks; "
                               f"{self.config['backbone']} has none of theirs.")
        return {key: rename(key, self.mmseg_rename) for key in self.state_dict()}

    def rebuild(self, rebuilder, feats):
        """MFM on this network: mfm.Rebuilder (or any such callable) on encode's output -> (rebuilt, mask)."""
        return rebuilder(feats)

    def deepest(self, feats):
        """The deepest map of encode's output (DAFormer's feature distance): DeepLabV2's map, MiT's last stage."""
        return feats[-1] if isinstance(feats, (list, tuple)) else feats

    def compile_encode_decode(self, backend="inductor"):
        """torch.compile encode and decode in place (train.py --compile)."""
        self.encode, self.decode = (torch.compile(f, backend=backend) for f in (self.encode, self.decode))


def memory_format(device):
    """channels_last on CUDA (cuDNN's fast convolutions want NHWC), the default layout elsewhere."""
    return torch.channels_last if torch.device(device).type == "cuda" else torch.contiguous_format


# ---------------------------------------------------------------- DeepLabV2 (ResNet)
def _dilated_resnet(name, dilate=(False, True, True)):
    """Torchvision ResNet, fc/avgpool removed later, with the layers 2-4 that `dilate` names dilated instead of
    strided (each doubling the dilation): layer3/layer4 (2, 4) = output stride 8 (DeepLabV2); layer4 (2) = 16."""
    if name != "resnet18":  # resnet50, resnet101 and resnet101-v1c (whose stem DeepLabV2 replaces)
        resnet = getattr(torchvision.models, name.removesuffix("-v1c"))
        return resnet(weights=None, replace_stride_with_dilation=list(dilate))
    # torchvision refuses dilation in BasicBlock, so resnet18 is built strided and converted in place.
    net = torchvision.models.resnet18(weights=None)
    dilations = itertools.accumulate((2 if d else 1 for d in dilate), operator.mul)  # (1, 2, 4) or (1, 1, 2)
    for layer, dilate_layer, dilation in zip((net.layer2, net.layer3, net.layer4), dilate, dilations):
        for module in layer.modules() if dilate_layer else ():
            if isinstance(module, nn.Conv2d):
                module.stride = (1, 1)
                if module.kernel_size == (3, 3):
                    module.dilation, module.padding = (dilation, dilation), (dilation, dilation)
    return net


def _v1c_stem():
    """ResNetV1c stem: 3x3 conv + BN + ReLU three times, 3->32 (stride 2)->32->64. Conv/BN at indices 0/1, 3/4,
    6/7, as open-mmlab's `stem.*` keys; init as torchvision's ResNet convs (kaiming fan-out)."""
    layers = []
    for cin, cout, stride in ((3, 32, 2), (32, 32, 1), (32, 64, 1)):
        conv = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
        layers += [conv, nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]
    return nn.Sequential(*layers)


class ASPPClassifier(nn.Module):
    """DeepLabV2 head: sum of 3x3 convs C->K with dilation = padding (METHOD.md §2; (6, 12) as in DACS/DAFormer)."""

    def __init__(self, in_channels, num_classes, dilations=(6, 12)):
        super().__init__()
        self.convs = nn.ModuleList(
            nn.Conv2d(in_channels, num_classes, 3, padding=d, dilation=d, bias=True) for d in dilations)
        for conv in self.convs:  # N(0, 0.01) as DeepLabV2, bias 0 as mmseg's DLV2 head
            nn.init.normal_(conv.weight, 0.0, 0.01)
            nn.init.zeros_(conv.bias)

    def forward(self, feats):
        """(B, C, h, w) -> (B, K, h, w)"""
        return sum(conv(feats) for conv in self.convs)


class DeepLabV2(_EncoderDecoder):
    """backbone: the torchvision layout as nn.Sequential(conv1, bn1, relu, maxpool, layer1..4) (indices 0..7,
    as its existing checkpoints); for resnet101-v1c named (stem, maxpool, layer1..4), as open-mmlab's keys."""
    feat_stride = 8
    # -> mmseg 0.16. resnet101-v1c: the same names as mmseg's ResNetV1c (stem.0/1/3/4/6/7, layerN.M.conv1-3/bn1-3/
    # downsample.0/1: DAFormer@438603d1:mmseg/models/backbones/resnet.py _make_stem_layer, ResLayer); torchvision
    # layout: indices 0, 1, 4-7 = mmseg's plain ResNet conv1, bn1, layer1-4. DLV2Head: no conv_seg, one conv with
    # bias per dilation wrapped as ConvModule `.conv` (DAFormer@438603d1:mmseg/models/decode_heads/dlv2_head.py:17-26,
    # aspp_head.py:33-41).
    mmseg_rename = ((r"backbone\.0\.(.+)", r"backbone.conv1.\1"), (r"backbone\.1\.(.+)", r"backbone.bn1.\1"),
                    (r"backbone\.([4-7])\.(.+)", lambda m: f"backbone.layer{int(m[1]) - 3}.{m[2]}"),
                    (r"backbone\.(.+)", r"backbone.\1"),
                    (r"head\.convs\.(\d+)\.(.+)", r"decode_head.aspp_modules.\1.conv.\2"))

    def __init__(self, num_classes=19, backbone="resnet101", aspp_dilations=(6, 12), pretrained=None):
        super().__init__()
        if backbone not in RESNETS:
            raise WeightsError(f"--backbone {backbone!r} is no DeepLabV2 backbone; choose one of {', '.join(RESNETS)}.")
        self.config = dict(num_classes=num_classes, backbone=backbone, aspp_dilations=tuple(aspp_dilations))
        net = _dilated_resnet(backbone)
        if backbone == "resnet101-v1c":
            self.backbone = nn.Sequential(OrderedDict(stem=_v1c_stem(), maxpool=net.maxpool, layer1=net.layer1,
                                                      layer2=net.layer2, layer3=net.layer3, layer4=net.layer4))
        else:
            self.backbone = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool,
                                          net.layer1, net.layer2, net.layer3, net.layer4)
        self.feat_channels = net.fc.in_features  # 2048 for resnet50/101, 512 for resnet18
        self.head = ASPPClassifier(self.feat_channels, num_classes, aspp_dilations)
        if pretrained not in (None, "none"):
            load_pretrained(self, pretrained)
        elif backbone == "resnet101-v1c":  # from scratch: mmseg ResNet's zero_init_residual, each block starts as
            for block in self.backbone.modules():  # the identity (*choice*: torchvision's resnets keep its init)
                if isinstance(block, torchvision.models.resnet.Bottleneck):
                    nn.init.zeros_(block.bn3.weight)

    def param_groups(self, lr):
        """Optimizer groups: backbone at lr, head at 10x lr (METHOD.md §4)."""
        return [dict(params=list(self.backbone.parameters()), lr=lr, name="backbone"),
                dict(params=list(self.head.parameters()), lr=10 * lr, name="head")]


# ---------------------------------------------------------------- DAFormer (MiT encoder + DAFormer head)
class DropPath(nn.Module):
    """Stochastic depth: in training, a residual branch is zeroed for whole samples with probability p and the
    kept samples are scaled by 1/(1-p) (so the expectation is unchanged); identity in eval mode."""

    def __init__(self, p=0.0):
        super().__init__()
        self.p = p

    def forward(self, x):
        if not self.training or self.p == 0.0:
            return x
        keep = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(1.0 - self.p)
        return x * keep / (1.0 - self.p)


def _to_map(tokens, h, w):
    """(B, h*w, C) -> (B, C, h, w)"""
    return tokens.transpose(1, 2).reshape(tokens.shape[0], -1, h, w)


def _to_tokens(x):
    """(B, C, h, w) -> (B, h*w, C)"""
    return x.flatten(2).transpose(1, 2)


class OverlapPatchEmbed(nn.Module):
    """Conv2d(k, stride s, padding k//2) -> tokens -> LayerNorm eps 1e-5: (B, C_in, H, W) -> (B, h*w, C), h, w."""

    def __init__(self, in_channels, dim, kernel, stride):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, dim, kernel, stride, kernel // 2)
        self.norm = nn.LayerNorm(dim, eps=1e-5)

    def forward(self, x):
        x = self.proj(x)
        return self.norm(_to_tokens(x)), x.shape[2], x.shape[3]


class EfficientAttention(nn.Module):
    """Multi-head attention whose keys/values come from the map shrunk by a stride-`sr` conv (+ LayerNorm eps
    1e-5) when sr > 1. Scale head_dim ** -0.5 (SDPA's default). (B, N, C) -> (B, N, C)."""

    def __init__(self, dim, num_heads, sr):
        super().__init__()
        self.num_heads, self.sr_ratio = num_heads, sr
        self.q, self.kv, self.proj = nn.Linear(dim, dim), nn.Linear(dim, 2 * dim), nn.Linear(dim, dim)
        if sr > 1:
            self.sr = nn.Conv2d(dim, dim, sr, sr)
            self.norm = nn.LayerNorm(dim, eps=1e-5)

    def forward(self, x, h, w):
        B, N, C = x.shape
        q = self.q(x).view(B, N, self.num_heads, -1).transpose(1, 2)  # (B, nh, N, hd)
        if self.sr_ratio > 1:
            x = self.norm(_to_tokens(self.sr(_to_map(x, h, w))))  # (B, N / sr^2, C)
        k, v = self.kv(x).view(B, x.shape[1], 2, self.num_heads, -1).permute(2, 0, 3, 1, 4)  # k: first C channels
        return self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, N, C))


class MixFFN(nn.Module):
    """fc1 C->4C -> depthwise 3x3 on the map (MiT's only position cue) -> GELU -> fc2 4C->C: (B, N, C) -> same."""

    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)
        self.dwconv = nn.ModuleDict({"dwconv": nn.Conv2d(hidden, hidden, 3, 1, 1, groups=hidden)})  # key: dwconv.dwconv

    def forward(self, x, h, w):
        return self.fc2(F.gelu(_to_tokens(self.dwconv["dwconv"](_to_map(self.fc1(x), h, w)))))


class MiTBlock(nn.Module):
    """Pre-norm (eps 1e-6): x += DropPath(Attn(norm1(x))); x += DropPath(MixFFN(norm2(x)))."""

    def __init__(self, dim, num_heads, sr, drop_path):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim, eps=1e-6), nn.LayerNorm(dim, eps=1e-6)
        self.attn, self.mlp = EfficientAttention(dim, num_heads, sr), MixFFN(dim, 4 * dim)
        self.drop_path = DropPath(drop_path)

    def forward(self, x, h, w):
        x = x + self.drop_path(self.attn(self.norm1(x), h, w))
        return x + self.drop_path(self.mlp(self.norm2(x), h, w))


def _init_weights(module):
    """The MiT encoder's init, SegFormer's rule (it does not matter once ImageNet weights load): Linear
    trunc-normal(0.02) with zero bias; LayerNorm 1/0; convs normal with std sqrt(2 / fan_out),
    fan_out = k*k*C_out/groups, zero bias. (Decode heads follow mmcv instead: init_decode_head.)"""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
        elif isinstance(m, nn.Conv2d):
            fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels // m.groups
            nn.init.normal_(m.weight, 0.0, (2.0 / fan_out) ** 0.5)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
        if isinstance(m, (nn.Linear, nn.Conv2d, nn.LayerNorm)) and m.bias is not None:
            nn.init.zeros_(m.bias)


def mit_widths(variant):
    """Channels of the four MiT stages (METHOD.md §7)."""
    return [32, 64, 160, 256] if variant == "mit_b0" else [64, 128, 320, 512]


class MiT(nn.Module):
    """Mix Transformer encoder MiT-B0...B5. Stage i (1..4): patch_embed{i} (7x7 stride 4, then 3x3 stride 2) ->
    block{i}.* -> norm{i} (eps 1e-6) -> map. (B, 3, H, W) -> [(B, C_i, ceil(H/s_i), ceil(W/s_i))], s = 4, 8, 16, 32.
    Drop-path rates rise linearly from 0 to drop_path over all blocks."""

    def __init__(self, variant="mit_b5", drop_path=0.1):
        super().__init__()
        if variant not in MIT_DEPTHS:
            raise WeightsError(f"unknown MiT variant {variant!r}; choose one of {', '.join(MITS)}.")
        depths = MIT_DEPTHS[variant]
        self.channels = mit_widths(variant)
        n = sum(depths)
        rates = iter(drop_path * k / max(n - 1, 1) for k in range(n))  # plain floats: works on the meta device
        for i, (dim, depth) in enumerate(zip(self.channels, depths), start=1):
            cin, kernel, stride = (3, 7, 4) if i == 1 else (self.channels[i - 2], 3, 2)
            setattr(self, f"patch_embed{i}", OverlapPatchEmbed(cin, dim, kernel, stride))
            setattr(self, f"block{i}", nn.ModuleList(
                MiTBlock(dim, MIT_HEADS[i - 1], MIT_SR[i - 1], next(rates)) for _ in range(depth)))
            setattr(self, f"norm{i}", nn.LayerNorm(dim, eps=1e-6))
        _init_weights(self)

    def forward(self, x):
        feats = []
        for i in range(1, 5):
            x, h, w = getattr(self, f"patch_embed{i}")(x)
            for block in getattr(self, f"block{i}"):
                x = block(x, h, w)
            x = _to_map(getattr(self, f"norm{i}")(x), h, w)
            feats.append(x)
        return feats


def init_decode_head(module):
    """Initialise a decode head as mmcv's ConvModule (what DAFormer/mmseg heads use): every Conv2d Kaiming-normal,
    mode fan_out, ReLU gain, fan_out = C_out*k*k (not divided by groups: a depthwise 3x3 with 1024 channels gets
    std sqrt(2/(1024*9)) ~ 0.0147), zero bias; BatchNorm 1/0; nn.Linear keeps PyTorch's default (DAFormer keeps it
    for its embeddings). The caller then sets the classifier to Normal(0, 0.01), bias 0."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.normal_(m.weight, 0.0, (2.0 / (m.out_channels * m.kernel_size[0] * m.kernel_size[1])) ** 0.5)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.modules.batchnorm._BatchNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def _conv_bn_relu(cin, cout, kernel=1, dilation=1, groups=1):
    return nn.Sequential(nn.Conv2d(cin, cout, kernel, padding=dilation * (kernel // 2), dilation=dilation,
                                   groups=groups, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class DAFormerHead(nn.Module):
    """Per stage Linear C_i->embed; stages 2-4 resized to stage 1; concat; fusion = 1x1 branch + three depthwise
    3x3 branches (dilation 6, 12, 18) each -> 1x1, concat; 3x3 bottleneck; Dropout2d(0.1); 1x1 classifier."""

    def __init__(self, in_channels, num_classes, embed=256):
        super().__init__()
        self.embed = nn.ModuleList(nn.Linear(c, embed) for c in in_channels)
        cat = embed * len(in_channels)
        self.fusion = nn.ModuleList([_conv_bn_relu(cat, embed)] + [
            nn.Sequential(_conv_bn_relu(cat, cat, 3, d, groups=cat), _conv_bn_relu(cat, embed)) for d in (6, 12, 18)])
        self.bottleneck = _conv_bn_relu(embed * len(self.fusion), embed, 3)
        self.dropout = nn.Dropout2d(0.1)
        self.classifier = nn.Conv2d(embed, num_classes, 1)
        init_decode_head(self)  # its bias 0 also the classifier's
        nn.init.normal_(self.classifier.weight, 0.0, 0.01)  # DAFormer's classifier init (mmseg BaseDecodeHead)

    def forward(self, feats):
        """[(B, C_i, h_i, w_i)] -> logits (B, K, h_1, w_1)"""
        size = feats[0].shape[-2:]
        x = torch.cat([upsample(_to_map(embed(_to_tokens(f)), *f.shape[-2:]), size)
                       for embed, f in zip(self.embed, feats)], dim=1)
        x = torch.cat([branch(x) for branch in self.fusion], dim=1)
        return self.classifier(self.dropout(self.bottleneck(x)))


class DAFormer(_EncoderDecoder):
    """MiT encoder (`backbone`) + DAFormer head (`head`). encode: 4 maps at strides 4..32; decode: stride 4."""
    feat_stride = 32
    # -> mmseg 0.16. MiT: SegFormer's names, kept by DAFormer (DAFormer@438603d1:mmseg/models/backbones/
    # mix_transformer.py). Head (DAFormer@438603d1:mmseg/models/decode_heads/daformer_head.py:139-151, configs/_base_/
    # models/daformer_sepaspp_mitb5.py:9-16): embed_layers.i an MLP `.proj` (segformer_head.py:18-23); fuse_layer an
    # ASPPWrapper (daformer_head.py:47-60): aspp_modules.0 a 1x1 ConvModule, .1-.3 DepthwiseSeparableConvModules
    # (depthwise_conv, pointwise_conv: sep_aspp_head.py:18-27), bottleneck a 3x3 ConvModule; ConvModule = `.conv` +
    # `.bn` (mmcv@056372fb:mmcv/cnn/bricks/norm.py:53-54); classifier = BaseDecodeHead.conv_seg (decode_head.py:87).
    mmseg_rename = (
        (r"backbone\.(.+)", r"backbone.\1"), (r"head\.embed\.(\d)\.(.+)", r"decode_head.embed_layers.\1.proj.\2"),
        (r"head\.fusion\.0\.([01])\.(.+)", lambda m: f"decode_head.fuse_layer.aspp_modules.0.{CONV_BN[m[1]]}.{m[2]}"),
        (r"head\.fusion\.(\d)\.([01])\.([01])\.(.+)", lambda m: f"decode_head.fuse_layer.aspp_modules.{m[1]}."
         f"{('depthwise_conv', 'pointwise_conv')[int(m[2])]}.{CONV_BN[m[3]]}.{m[4]}"),
        (r"head\.bottleneck\.([01])\.(.+)", lambda m: f"decode_head.fuse_layer.bottleneck.{CONV_BN[m[1]]}.{m[2]}"),
        (r"head\.classifier\.(.+)", r"decode_head.conv_seg.\1"))

    def __init__(self, num_classes=19, backbone="mit_b5", pretrained=None, drop_path=0.1):
        super().__init__()
        self.config = dict(num_classes=num_classes, backbone=backbone, drop_path=drop_path)
        self.backbone = MiT(backbone, drop_path)
        self.feat_channels = list(self.backbone.channels)
        self.head = DAFormerHead(self.feat_channels, num_classes)
        if pretrained not in (None, "none"):
            load_pretrained(self, pretrained)

    def param_groups(self, lr):
        """DAFormer's rules (METHOD.md §7): encoder at lr; its LayerNorms (names containing "norm") without
        weight decay; head at 10x lr."""
        named = list(self.backbone.named_parameters())
        return [dict(params=[p for n, p in named if "norm" not in n], lr=lr, name="backbone"),
                dict(params=[p for n, p in named if "norm" in n], lr=lr, weight_decay=0.0, name="backbone_norm"),
                dict(params=list(self.head.parameters()), lr=10 * lr, name="head")]


# ---------------------------------------------------------------- DeepLabV3+ (ResNet), UniMatch's segmentor
class ResNetLevels(nn.Module):
    """A torchvision ResNet without avgpool/fc, under its own module names (its state dict loads 1:1), returning
    the two levels DeepLabV3+ reads: (B, 3, H, W) -> {"low": layer1 (B, C_1, H/4, W/4), "high": layer4 (B, C, h, w)}."""

    def __init__(self, net):
        super().__init__()
        self.conv1, self.bn1, self.relu, self.maxpool = net.conv1, net.bn1, net.relu, net.maxpool
        self.layer1, self.layer2, self.layer3, self.layer4 = net.layer1, net.layer2, net.layer3, net.layer4

    def forward(self, x):
        low = self.layer1(self.maxpool(self.relu(self.bn1(self.conv1(x)))))
        return {"low": low, "high": self.layer4(self.layer3(self.layer2(low)))}


class ASPP(nn.Module):
    """DeepLabV3's ASPP as UniMatch's (LiheYoung/UniMatch model/semseg/deeplabv3plus.py:73-120): a 1x1 branch, one
    3x3 branch per dilation (= padding) and image pooling (global mean -> 1x1, spread back over the map), each
    conv -> BN -> ReLU with C/8 channels (256 for 2048), concatenated and projected (1x1 conv, BN, ReLU) to C/8.
    (B, C, h, w) -> (B, C/8, h, w). Image pooling puts BatchNorm on one value per channel and image: in training
    it needs a batch of 2 or more."""

    def __init__(self, in_channels, dilations=(6, 12, 18)):
        super().__init__()
        out = in_channels // 8
        self.branches = nn.ModuleList([_conv_bn_relu(in_channels, out)] + [
            _conv_bn_relu(in_channels, out, 3, d) for d in dilations])
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), _conv_bn_relu(in_channels, out))
        self.project = _conv_bn_relu(out * (len(dilations) + 2), out)

    def forward(self, x):
        pooled = self.pool(x).expand(-1, -1, *x.shape[-2:])  # = UniMatch's bilinear upsampling of a 1x1 map
        return self.project(torch.cat([branch(x) for branch in self.branches] + [pooled], dim=1))


class DeepLabV3PlusHead(nn.Module):
    """UniMatch's decoder (deeplabv3plus.py:21-38, 59-70): ASPP on the high level, upsampled bilinearly
    (align_corners=True, as theirs) to the low level; low level reduced to 48 channels (1x1 conv, BN, ReLU);
    concatenated [low, high]; two 3x3 conv + BN + ReLU to 256; 1x1 classifier. PyTorch's default init, as theirs."""

    def __init__(self, low_channels, high_channels, num_classes, dilations=(6, 12, 18)):
        super().__init__()
        self.aspp = ASPP(high_channels, dilations)
        self.reduce = _conv_bn_relu(low_channels, 48)
        self.fuse = nn.Sequential(_conv_bn_relu(high_channels // 8 + 48, 256, 3), _conv_bn_relu(256, 256, 3))
        self.classifier = nn.Conv2d(256, num_classes, 1)

    def forward(self, feats):
        """{"low": (B, C_1, H/4, W/4), "high": (B, C, h, w)} -> logits (B, K, H/4, W/4)"""
        low = feats["low"]
        high = F.interpolate(self.aspp(feats["high"]), size=low.shape[-2:], mode="bilinear", align_corners=True)
        return self.classifier(self.fuse(torch.cat([self.reduce(low), high], dim=1)))


class DeepLabV3Plus(_EncoderDecoder):
    """DeepLabV3+ as UniMatch's VOC config (configs/pascal.yaml:19-22): layer4 dilated (output stride 16), ASPP
    dilations (6, 12, 18), the low-level skip from layer1. encode: {"low": stride 4, "high": stride 16} (the dict
    MFM's Rebuilder takes, as for torchvision's LR-ASPP); decode: logits at stride 4. Backbone: torchvision's
    ResNet (7x7 stem) with its ImageNet weights (IMAGENET1K_V1); UniMatch's is a deep-stem variant (3x3 convs
    3->64->64->128, model/backbone/resnet.py:70, 79-88) with their own ImageNet file, 59.5M parameters in their logs;
    ours, deeplabv3plus-resnet101 at 21 classes: 59,344,309 (backbone 42,500,160, head 16,844,149)."""
    feat_stride = 16

    def __init__(self, num_classes=21, backbone="deeplabv3plus-resnet101", aspp_dilations=(6, 12, 18),
                 pretrained=None):
        super().__init__()
        if backbone not in DLV3P:
            raise WeightsError(f"--backbone {backbone!r} is no DeepLabV3+ backbone; choose one of {', '.join(DLV3P)}.")
        self.config = dict(num_classes=num_classes, backbone=backbone, aspp_dilations=tuple(aspp_dilations))
        net = _dilated_resnet(DLV3P[backbone], dilate=(False, False, True))
        self.backbone = ResNetLevels(net)
        self.feat_channels = [net.layer2[0].conv1.in_channels, net.fc.in_features]  # [256, 2048]; resnet18 [64, 512]
        self.head = DeepLabV3PlusHead(*self.feat_channels, num_classes, aspp_dilations)
        if pretrained not in (None, "none"):
            load_pretrained(self, pretrained)

    def param_groups(self, lr):
        """Backbone at lr, head at 10x lr (UniMatch's lr_multi: configs/pascal.yaml:11, unimatch.py:57-59)."""
        return [dict(params=list(self.backbone.parameters()), lr=lr, name="backbone"),
                dict(params=list(self.head.parameters()), lr=10 * lr, name="head")]

    def deepest(self, feats):
        """The high level (stride 16) of encode's dict."""
        return feats["high"]


def build_model(num_classes=19, backbone="resnet101-v1c", pretrained=None, **kw):
    """DeepLabV2 for a ResNet (kw: aspp_dilations), DAFormer for a MiT (kw: drop_path), DeepLabV3+ for a
    deeplabv3plus-* (kw: aspp_dilations). build_model(**m.config) rebuilds m."""
    if backbone in MITS:
        return DAFormer(num_classes, backbone, pretrained, **kw)
    if backbone in RESNETS:
        return DeepLabV2(num_classes, backbone, pretrained=pretrained, **kw)
    if backbone in DLV3P:
        return DeepLabV3Plus(num_classes, backbone, pretrained=pretrained, **kw)
    raise WeightsError(f"--backbone {backbone!r} is not supported; choose one of {', '.join(BACKBONES)}.")


# ---------------------------------------------------------------- weights and checkpoints
def read_weights(path, mmap=False):
    """torch.load(weights_only=True) of a file from elsewhere, or a WeightsError naming it. mmap: the tensors stay in
    the file until used (a cheap look at what a file holds); files in torch's pre-1.6 format are read whole."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"weights file {path} does not exist. Pass a torchvision/open-mmlab ResNet or SegFormer "
                           "mit_bX.pth state dict, a model.pt/ckpt.pt written by train.py, a released DAFormer/HRDA/"
                           "MIC latest.pth, 'imagenet' or 'none'.")
    try:
        if mmap and zipfile.is_zipfile(path):  # torch.save's format since 1.6, the only one torch can map
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # a truncated zip, a pickle of arbitrary objects, not a torch file at all, ...
        raise WeightsError(f"cannot read weights file {path}: {err}. It may be truncated (killed while "
                           "writing?) or not a PyTorch file.") from err


def load_strict(module, state, what, source):
    """load_state_dict that names missing / unexpected / wrongly shaped keys in a WeightsError. BatchNorm's
    num_batches_tracked may be absent (older files; PyTorch's own loader allows it): the model's value stays."""
    own = module.state_dict()
    state = {**{k: v for k, v in own.items() if k.endswith("num_batches_tracked")}, **state}
    check_keys(own, state, what, source)
    module.load_state_dict(state)


def check_keys(own, state, what, source, hint=""):
    """A WeightsError naming the keys of `state` missing from / unexpected in / shaped otherwise than `own`."""
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = [f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
              for k in sorted(set(own) & set(state)) if state[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        lines = [f"{source} does not fit the {what}:"]
        for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", shapes)):
            if keys:
                lines.append(f"  {label} ({len(keys)}): {', '.join(keys[:5])}{' ...' if len(keys) > 5 else ''}")
        raise WeightsError("\n".join(lines) + hint)


def _imagenet_state(backbone):
    """Download (or take from torch's hub cache) a ResNet's ImageNet weights -> (state dict, URL). MiT: an error
    saying where to get them."""
    if backbone in MITS:
        raise WeightsError(
            f"the SegFormer ImageNet weights of {backbone} cannot be downloaded automatically. Get {backbone}.pth "
            "from the links in the SegFormer (github.com/NVlabs/SegFormer) or DAFormer (github.com/lhoyer/DAFormer) "
            f"README and pass --pretrained PATH/{backbone}.pth, or train from scratch with --pretrained none.")
    if backbone == "resnet101-v1c":
        url, get = V1C_URL, lambda: torch.hub.load_state_dict_from_url(V1C_URL, map_location="cpu", check_hash=True)
    else:
        weights = torchvision.models.get_model_weights(DLV3P.get(backbone, backbone)).IMAGENET1K_V1
        url, get = weights.url, lambda: weights.get_state_dict(progress=True)
    try:
        return get(), url
    except Exception as err:  # offline: URLError, socket errors, a bad hash, ... all mean "no usable download"
        raise WeightsError(f"could not download the ImageNet weights for {backbone} ({err}). Offline, download "
                           f"{url} elsewhere and pass the file: --pretrained PATH, or train from scratch with "
                           "--pretrained none.") from err


def load_pretrained(model, pretrained):
    """Initialise `model` (either family, or an HRDA wrapper: hrda.build_model) from 'imagenet' or a file: a whole
    network (a checkpoint of ours, model.pt / ckpt.pt; or the student of a released DAFormer/HRDA/MIC checkpoint),
    or encoder weights: torchvision's ResNet state dict, open-mmlab's resnet101_v1c file (under `state_dict`),
    SegFormer's mit_bX.pth (flat; its `head.*` dropped). Encoder files load strictly 1:1 into model.backbone."""
    backbone = model.config["backbone"]
    state, source = _imagenet_state(backbone) if pretrained == "imagenet" else (read_weights(pretrained), pretrained)
    source = str(source)
    if not isinstance(state, dict):
        raise WeightsError(f"{source} holds a {type(state).__name__}, expected a state dict.")
    if "model" in state and "model_config" in state:  # our checkpoints
        load_strict(model, state["model"], "model (check --backbone, the number of classes and --recipe hrda)", source)
        return
    if mmseg_checkpoint(state):
        load_released(model, state, source)
        return
    for wrapper in ("state_dict", "model"):  # open-mmlab files, some SegFormer re-uploads
        if isinstance(state.get(wrapper), dict):
            state = state[wrapper]
            break
    drop = "head." if backbone in MITS else "fc."  # the ImageNet classifier is unused
    state = {k: v for k, v in state.items() if not k.startswith(drop)}
    if backbone in ("resnet101", "resnet50", "resnet18"):  # torchvision names -> our nn.Sequential indices
        rename = {"conv1": "0", "bn1": "1", "layer1": "4", "layer2": "5", "layer3": "6", "layer4": "7"}
        ours = {}
        for key, value in state.items():
            top, _, rest = key.partition(".")
            ours[f"{rename[top]}.{rest}" if top in rename else key] = value
        state = ours
    load_strict(model.backbone, state, f"{backbone} backbone", source)


# ---------------------------------------------------------------- released checkpoints of DAFormer, HRDA and MIC
# An mmseg 0.16 file (`latest.pth` of each run folder they publish): {'meta', 'state_dict', 'optimizer'}; its
# state_dict holds the UDA wrapper's networks, each a whole segmentor (backbone.*, decode_head.*), under its name:
# DAFormer@438603d1:mmseg/models/uda/uda_decorator.py:29 (model), dacs.py:72-78 (ema_model; imnet_model with the
# feature distance); HRDA@09af319d:mmseg/models/uda/dacs.py:79-85; MIC's DACS adds `mic`, without weights when it
# shares the teacher (MIC@2d673279:seg/mmseg/models/uda/masking_consistency_module.py:37-41). The anchors evaluate
# the student: tools/test.py builds the plain segmentor and loads the file with 'model.' stripped, so that the
# ema_/imnet_ keys go unused (DAFormer@438603d1:tools/test.py:134-144; HRDA's and MIC's are the same), and the
# wrapper's own inference runs get_model() = the student (uda_decorator.py:34-35, 87, 91).
UDA_PARTS = {"student": "model.", "teacher": "ema_model.", "imagenet": "imnet_model."}
# HRDA's settings in the released runs: 1024 crops, context x0.5, 512 detail crops, offsets divisible by 8; test
# windows of 1024 at stride 512 (HRDA.md §1.2, §2): HRDA's defaults in hrda.py
RELEASED_HRDA = dict(crop_size=1024)


def rename(key, table):
    """`key` through the first (regex, replacement) of `table` that matches all of it (a replacement is a template
    or a function of the match)."""
    for pattern, replacement in table:
        match = re.fullmatch(pattern, key)
        if match:
            return replacement(match) if callable(replacement) else match.expand(replacement)
    raise KeyError(f"{key}: no rule in the mmseg rename table")  # a layer the table misses: our bug, not the file's


def mmseg_checkpoint(ckpt):
    """Whether a loaded file is an mmseg segmentation checkpoint: a dict whose 'state_dict' holds whole networks
    (a UDA wrapper's model.* / ema_model.*, or a plain segmentor's decode_head.*), not encoder weights."""
    state = ckpt.get("state_dict") if isinstance(ckpt, dict) else None
    return isinstance(state, dict) and any(k.startswith(("model.", "ema_model.", "decode_head.")) for k in state)


def released_state(ckpt, source, part="student"):
    """One network of a released DAFormer/HRDA/MIC checkpoint, part 'student' (what the anchors evaluate),
    'teacher' or 'imagenet' (UDA_PARTS) -> its state dict under the official names, the prefix removed."""
    state, prefix = ckpt["state_dict"], UDA_PARTS[part]
    if not any(k.startswith(("model.", "ema_model.")) for k in state):
        raise WeightsError(f"{source} is a plain mmseg segmentor checkpoint (keys backbone.*, decode_head.*), not one "
                           "of DAFormer, HRDA or MIC: those hold the UDA wrapper's networks, model.* (student), "
                           "ema_model.* (teacher), imnet_model.* (ImageNet copy), and only those are read here.")
    picked = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    if not picked:
        found = ", ".join(sorted({k.split(".")[0] + ".*" for k in state}))
        raise WeightsError(f"{source} holds no {part} network ({prefix}*), only {found}.")
    return picked


def mmseg_config(state, source):
    """The network a released state dict (official names, released_state) holds, read from its keys and shapes ->
    hrda.build_model's kwargs (hrda=RELEASED_HRDA for an HRDA network). A WeightsError names what is none of ours:
    MiT-B0...B5 + DAFormer head, ResNet (V1c-101, 101, 50, 18) + DeepLabV2 head."""
    hr = any(k.startswith("decode_head.scale_attention.") for k in state)  # HRDA@09af319d:.../hrda_head.py:69, 75
    if hr:  # the segmentation head, shared by both scales, sits under decode_head.head
        state = {k.replace("decode_head.head.", "decode_head.", 1): v for k, v in state.items()
                 if not k.startswith("decode_head.scale_attention.")}

    def count(prefix):  # the distinct blocks under prefix
        return len({k[len(prefix):].split(".")[0] for k in state if k.startswith(prefix)})
    if "decode_head.embed_layers.0.proj.weight" in state and "decode_head.conv_seg.weight" in state:
        family, config = MITS, dict(num_classes=state["decode_head.conv_seg.weight"].shape[0])
    elif "decode_head.aspp_modules.0.conv.weight" in state:  # the dilations are not in the weights: 2 convs are
        # the benchmarks' (6, 12), 4 DeepLabV2's own (DAFormer@438603d1:configs/_base_/models/deeplabv2red_r50-d8.py:6,
        # deeplabv2_r50-d8.py:21)
        dilations = {2: (6, 12), 4: (6, 12, 18, 24)}.get(count("decode_head.aspp_modules."))
        family = RESNETS if dilations else ()
        config = dict(num_classes=state["decode_head.aspp_modules.0.conv.weight"].shape[0], aspp_dilations=dilations)
    else:
        heads = ", ".join(sorted({".".join(k.split(".")[:2]) + ".*" for k in state if k.startswith("decode_head.")}))
        raise WeightsError(f"{source}: its decode head ({heads or 'none'}) is neither DAFormer's (embed_layers, "
                           "fuse_layer, conv_seg) nor a DeepLabV2 head with 2 or 4 dilations (aspp_modules).")
    if "backbone.patch_embed1.proj.weight" in state:
        depths = tuple(count(f"backbone.block{i}.") for i in range(1, 5))
        widths = [state.get(f"backbone.patch_embed{i}.proj.weight", torch.empty(0)).shape[0] for i in range(1, 5)]
        found = f"MiT with depths {depths} and widths {widths}"
        backbone = next((v for v in MITS if MIT_DEPTHS[v] == depths and mit_widths(v) == widths), found)
    elif "backbone.layer1.0.conv1.weight" in state:
        blocks = tuple(count(f"backbone.layer{i}.") for i in range(1, 5))
        bottleneck = "backbone.layer1.0.conv3.weight" in state
        depth = {(3, 4, 23, 3, True): 101, (3, 4, 6, 3, True): 50, (2, 2, 2, 2, False): 18}.get(blocks + (bottleneck,))
        v1c = "backbone.stem.0.weight" in state  # ResNetV1c's deep stem instead of conv1
        backbone = f"resnet{depth}{'-v1c' * v1c}" if depth else f"ResNet with {blocks} blocks"
        found = f"ResNet{'V1c' * v1c}-{depth or '?'}"
    else:
        backbone = found = "backbone " + ", ".join(sorted({".".join(k.split(".")[:2]) for k in state
                                                            if k.startswith("backbone.")}) or ["missing"])
    if backbone not in family:
        raise WeightsError(f"{source} holds a {found} with a {'DAFormer' if family is MITS else 'DeepLabV2'} head: "
                           "not a network of ours (MiT-B0...B5 + DAFormer head, ResNet (V1c-101, 101, 50, 18) + "
                           "DeepLabV2 head with dilations (6, 12) or (6, 12, 18, 24)).")
    return dict(config, backbone=backbone, **(dict(hrda=dict(RELEASED_HRDA)) if hr else {}))


def describe(config):
    """build_model kwargs in words: 'mit_b5 + DAFormer head, 19 classes, HRDA'."""
    head = "DAFormer head" if config["backbone"] in MITS else f"DeepLabV2 head {config.get('aspp_dilations', (6, 12))}"
    return f"{config['backbone']} + {head}, {config['num_classes']} classes" + ", HRDA" * ("hrda" in config)


def from_mmseg(model, state, source):
    """A released network's state dict (official names) -> the same tensors under `model`'s names, checked 1:1
    against model.mmseg_names() first: a WeightsError names, in the file's names, every key missing, unexpected or
    of another shape, and says which network the file holds. `model` may live on the meta device."""
    names = model.mmseg_names()
    own = {names[k]: v for k, v in model.state_dict().items()}
    filled = {**{k: v for k, v in own.items() if k.endswith("num_batches_tracked")}, **state}  # as load_strict
    try:
        hint = f"\n  The file holds {describe(mmseg_config(state, source))}."
    except WeightsError as err:
        hint = f"\n  {err}"
    check_keys(own, filled, f"network {describe(model.config)}", source, hint)
    ours = {official: key for key, official in names.items()}
    return {ours[k]: v for k, v in state.items()}


def load_released(model, ckpt, source, part="student"):
    """`part` of a released DAFormer/HRDA/MIC checkpoint (a torch.load'ed dict) into `model`, every key checked."""
    load_strict(model, from_mmseg(model, released_state(ckpt, source, part), source), "model", source)


def imagenet_copy(student, pretrained):
    """DAFormer's frozen ImageNet network for the feature distance: a copy of `student` before any training, in eval
    mode, without gradients. Started from a released DAFormer/HRDA/MIC checkpoint: that run's own ImageNet copy
    (imnet_model.*), not the adapted student it starts from."""
    frozen = copy.deepcopy(student).eval().requires_grad_(False)  # the file was read to build the student: look
    ckpt = None if pretrained in (None, "none", "imagenet") else read_weights(pretrained, mmap=True)  # again lazily
    if mmseg_checkpoint(ckpt) and any(k.startswith(UDA_PARTS["imagenet"]) for k in ckpt["state_dict"]):
        load_released(frozen, ckpt, str(pretrained), "imagenet")
    elif mmseg_checkpoint(ckpt):  # *choice*: a run without the feature distance saved no ImageNet copy
        warnings.warn(f"{pretrained} holds no imnet_model.*: the feature distance pulls towards its student instead")
    return frozen


def atomic_save(obj, path, keep_previous=False):
    """torch.save to a temp file, then rename: a crash mid-write never leaves a half-written `path`. With
    keep_previous, the file it replaces stays as *.prev.pt. A full disk or unwritable folder raises
    WeightsError; nothing is lost."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        torch.save(obj, tmp)
        if keep_previous and path.exists():
            os.replace(path, path.with_name(path.stem + ".prev.pt"))
        os.replace(tmp, path)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        raise WeightsError(f"could not write {path}: {err}. The previous checkpoint, if any, is intact; free disk "
                          "space or choose another --out, then --resume.") from err


def count_parameters(module):
    return sum(p.numel() for p in module.parameters())


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=512, help="square input size for the shape check")
    args = parser.parse_args()
    configs = [dict(backbone=b, aspp_dilations=d) for b in RESNETS for d in ((6, 12), (6, 12, 18, 24))]
    configs += [dict(backbone=b) for b in MITS] + [dict(backbone=b, num_classes=21, aspp_dilations=(6, 12, 18))
                                                     for b in DLV3P]
    with torch.device("meta"), torch.no_grad():  # shapes and counts only: no memory, no arithmetic
        for config in configs:
            model = build_model(**config).eval()
            feats = model.encode(torch.zeros(1, 3, args.size, args.size))
            levels = list(feats.values()) if isinstance(feats, dict) else feats
            shapes = [tuple(f.shape[1:]) for f in levels] if isinstance(levels, list) else tuple(feats.shape[1:])
            print(f"{config['backbone']:13s} {str(config.get('aspp_dilations', 'DAFormer head')):16s} params "
                  f"{count_parameters(model):>11,d} (backbone {count_parameters(model.backbone):,d}, head "
                  f"{count_parameters(model.head):,d}) features {shapes}, logits "
                  f"{tuple(model.decode(feats).shape[1:])}")
