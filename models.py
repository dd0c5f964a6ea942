"""DeepLabV2 with a dilated ResNet backbone: the segmentation network of the MFM paper's DACS experiments.

METHOD.md §2. A torchvision ResNet with layer3/layer4 dilated (2, 4) instead of strided (output stride 8, so a
512x512 crop gives a 2048x64x64 feature map) and the DeepLabV2 "ASPP classifier": parallel dilated 3x3 convs
whose outputs are summed. The network is split the way MFM needs it (arXiv 2509.13801, Fig. 2):

    feats  = model.encode(x)        # f = E(x), (B, 2048, H/8, W/8); x is RGB in [0, 1]
    logits = model.decode(feats)    # D(f),     (B, K, H/8, W/8)
    logits = upsample(logits, label.shape[-2:])

Nothing here knows about the Rebuilder (mfm.py): it exists only during training.

    python models.py                # prints parameter counts and output shapes
"""
import argparse
import os
from pathlib import Path

import torch
import torch.nn.functional as F
import torchvision
from torch import nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)  # RGB, the statistics torchvision's ImageNet weights were trained with
IMAGENET_STD = (0.229, 0.224, 0.225)
BACKBONES = ("resnet101", "resnet50", "resnet18")  # resnet18: our addition for the CPU toy demo, not the paper's


class WeightsError(Exception):
    """A weights file or option that cannot be used, or a checkpoint that cannot be written; the message
    names it and says what was expected."""


def upsample(logits, size):
    """Logits (B, K, h, w) -> (B, K, *size), bilinear, align_corners=False: the one resize to label size."""
    if tuple(logits.shape[-2:]) == tuple(size):
        return logits
    return F.interpolate(logits, size=size, mode="bilinear", align_corners=False)


def _dilated_resnet(name):
    """Torchvision ResNet, fc/avgpool removed later, with layer3/layer4 dilated (2, 4): output stride 8."""
    if name in ("resnet50", "resnet101"):
        return getattr(torchvision.models, name)(weights=None, replace_stride_with_dilation=[False, True, True])
    # torchvision refuses dilation in BasicBlock, so resnet18 is built strided and converted in place.
    net = torchvision.models.resnet18(weights=None)
    for layer, dilation in ((net.layer3, 2), (net.layer4, 4)):
        for module in layer.modules():
            if isinstance(module, nn.Conv2d):
                module.stride = (1, 1)
                if module.kernel_size == (3, 3):
                    module.dilation, module.padding = (dilation, dilation), (dilation, dilation)
    return net


class ASPPClassifier(nn.Module):
    """DeepLabV2 head: sum of 3x3 convs C->K with dilation = padding (METHOD.md §2; (6, 12) as in DACS/DAFormer)."""

    def __init__(self, in_channels, num_classes, dilations=(6, 12)):
        super().__init__()
        self.convs = nn.ModuleList(
            nn.Conv2d(in_channels, num_classes, 3, padding=d, dilation=d, bias=True) for d in dilations)
        for conv in self.convs:
            nn.init.normal_(conv.weight, 0.0, 0.01)  # as DeepLabV2; the bias keeps PyTorch's default init (choice)

    def forward(self, feats):
        """(B, C, h, w) -> (B, K, h, w)"""
        return sum(conv(feats) for conv in self.convs)


class DeepLabV2(nn.Module):
    def __init__(self, num_classes=19, backbone="resnet101", aspp_dilations=(6, 12), pretrained=None):
        super().__init__()
        if backbone not in BACKBONES:
            raise WeightsError(f"--backbone {backbone!r} is not supported; choose one of {', '.join(BACKBONES)}.")
        self.config = dict(num_classes=num_classes, backbone=backbone, aspp_dilations=tuple(aspp_dilations))
        net = _dilated_resnet(backbone)
        self.backbone = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool,
                                      net.layer1, net.layer2, net.layer3, net.layer4)
        self.feat_channels = net.fc.in_features  # 2048 for resnet50/101, 512 for resnet18
        self.head = ASPPClassifier(self.feat_channels, num_classes, aspp_dilations)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        if pretrained not in (None, "none"):
            load_pretrained(self, pretrained)

    def encode(self, x):
        """Images (B, 3, H, W), RGB in [0, 1] -> last encoder feature f (B, C, H/8, W/8)."""
        return self.backbone((x - self.mean) / self.std)

    def decode(self, feats):
        """Features (B, C, h, w) -> logits (B, K, h, w). MFM runs this on the reconstructed features."""
        return self.head(feats)

    def forward(self, x):
        return self.decode(self.encode(x))

    def param_groups(self, lr):
        """Optimizer groups: backbone at lr, head at 10x lr (METHOD.md §4)."""
        return [dict(params=list(self.backbone.parameters()), lr=lr, name="backbone"),
                dict(params=list(self.head.parameters()), lr=10 * lr, name="head")]


def _torch_load(path):
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"weights file {path} does not exist. Pass a torchvision ResNet state dict (.pth), "
                           "a model.pt/ckpt.pt written by train.py, 'imagenet' or 'none'.")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # a truncated zip, a pickle of arbitrary objects, not a torch file at all, ...
        raise WeightsError(f"cannot read weights file {path}: {err}. It may be truncated (killed while "
                           "writing?) or not a PyTorch file.") from err


def _load_strict(module, state, what, source):
    """load_state_dict that names missing / unexpected / wrongly shaped keys in a WeightsError."""
    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = [f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
              for k in sorted(set(own) & set(state)) if state[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        lines = [f"{source} does not fit the {what}:"]
        for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", shapes)):
            if keys:
                lines.append(f"  {label} ({len(keys)}): {', '.join(keys[:5])}{' ...' if len(keys) > 5 else ''}")
        raise WeightsError("\n".join(lines))
    module.load_state_dict(state)


def load_pretrained(model, pretrained):
    """Initialise `model` from 'imagenet' (torchvision's weights) or a file: a torchvision ResNet state dict
    (backbone only) or a checkpoint of ours (model.pt / ckpt.pt: the whole network)."""
    rename = {"conv1": "0", "bn1": "1", "layer1": "4", "layer2": "5", "layer3": "6", "layer4": "7"}
    if pretrained == "imagenet":
        weights = torchvision.models.get_model_weights(model.config["backbone"]).IMAGENET1K_V1
        try:
            state = weights.get_state_dict(progress=True)
        except Exception as err:  # offline: URLError, socket errors, ... all mean "no download"
            raise WeightsError(
                f"could not download torchvision's ImageNet weights for {model.config['backbone']} ({err}). "
                f"Offline, download {weights.url} elsewhere and pass the file: --pretrained PATH, "
                "or train from scratch with --pretrained none.") from err
        source = f"torchvision {weights}"
    else:
        state = _torch_load(pretrained)
        source = str(pretrained)
    if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):  # our checkpoints
        _load_strict(model, state["model"], "model (check --backbone and the number of classes)", source)
        return
    if not isinstance(state, dict):
        raise WeightsError(f"{source} holds a {type(state).__name__}, expected a state dict.")
    state = {k: v for k, v in state.items() if not k.startswith("fc.")}  # the ImageNet classifier is unused
    ours = {}  # torchvision names -> our nn.Sequential indices
    for key, value in state.items():
        top, _, rest = key.partition(".")
        ours[f"{rename[top]}.{rest}" if top in rename else key] = value
    _load_strict(model.backbone, ours, f"{model.config['backbone']} backbone", source)


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


def load_checkpoint(path):
    """Read a model.pt / ckpt.pt written by train.py: a dict with 'model' (state dict) and 'model_config'."""
    ckpt = _torch_load(path)
    if not isinstance(ckpt, dict) or "model" not in ckpt or "model_config" not in ckpt:
        raise WeightsError(f"{path} is not a checkpoint written by train.py (expected the keys 'model' and "
                           "'model_config'; a bare torchvision state dict belongs in --pretrained).")
    return ckpt


def model_from_checkpoint(path, device="cpu"):
    """Rebuild the DeepLabV2 described by a train.py checkpoint and load its weights. -> (model, checkpoint)"""
    ckpt = load_checkpoint(path)
    model = DeepLabV2(**ckpt["model_config"])
    _load_strict(model, ckpt["model"], "model described by its own model_config", str(path))
    return model.to(device).eval(), ckpt


def count_parameters(module):
    return sum(p.numel() for p in module.parameters())


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=512, help="square input size for the shape check")
    args = parser.parse_args()
    for backbone in BACKBONES:
        for dilations in ((6, 12), (6, 12, 18, 24)):
            model = DeepLabV2(backbone=backbone, aspp_dilations=dilations).eval()
            with torch.no_grad():
                feats = model.encode(torch.zeros(1, 3, args.size, args.size))
            print(f"{backbone:10s} head {dilations!s:16s} params {count_parameters(model):>11,d} "
                  f"(backbone {count_parameters(model.backbone):,d}, head {count_parameters(model.head):,d}) "
                  f"features {tuple(feats.shape[1:])}")
