"""HRDA (Hoyer et al., ECCV 2022): multi-resolution training for domain-adaptive segmentation, behind the
networks' face, so the training loop, MFM (METHOD.md §3) and MIC never ask whether they hold an HRDA.

Training (HRDA.md §1): a crop (1024 px) is seen twice: a *context* view, the whole crop resized x0.5 (= 2x2 average
pooling), and a *detail* view, a random sub-crop of half the crop size at full resolution (one box per forward,
shared by the batch, offsets multiples of 8). The same network encodes and decodes both; a learned class-wise
*scale attention* on the context features decides, per pixel and class, how much of the detail logits to use
inside the box. Loss: 0.9 CE(fused) + 0.1 CE(detail logits, cropped label). Inference (HRDA.md §2) is always
sliding: detail crops at stride detail/2 cover the whole window (logits averaged), attention unmasked; images
larger than the crop are cut into windows of the crop size at stride crop/2, whose upsampled logits are averaged.

    net   = models.build_model(19, "mit_b5", pretrained="mit_b5.pth")        # any network of models.py
    model = HRDA(net, crop_size=1024)                                         # or build_model(19, "mit_b5", hrda={})
    out   = model.decode(model.encode(x))          # HRDAOutput(fused (B, K, 256, 256), detail (B, K, 128, 128), box)
    loss  = model.seg_loss(out, label, weight)     # label (B, 1024, 1024)
    logits = model(x_val)                          # sliding inference; (B, K, H, W) for images larger than the crop
    rebuild = functools.partial(model.rebuild, rebuilder)          # MFM: one Rebuilder on both views (§4.2)
    loss_mfm = mfm.mfm_loss(model.decode, rebuild, model.encode(x_tgt), pl, q, loss_fn=model.seg_loss)

MIC on HRDA needs nothing here: mask the full crop once, then encode/decode/seg_loss as above (HRDA.md §3).
For MFM, one Rebuilder serves both 512-px views (grid = crop * 0.5 // 32 = 16 at 1024), two calls, two masks.
"""
from typing import NamedTuple

import torch
from torch import nn

import models
from mfm import weighted_cross_entropy
from models import upsample


class HRDAFeatures(NamedTuple):
    """encode's output. context: features of the context view (net.encode of the x0.5 crop); detail: of the
    detail crop; box: (y0, x0, h, w) of the detail crop in full-resolution pixels, shared by the batch (training),
    or, for inference, a list of such boxes, detail then stacking one crop per box on the batch axis (box-major)."""
    context: object
    detail: object
    box: object


class HRDAOutput(NamedTuple):
    """decode's output. fused: (B, K, H/os, W/os), os = the network's logit stride (DAFormer 4, DeepLabV2 8);
    detail: the detail logits (B, K, h/os, w/os); box: as in HRDAFeatures."""
    fused: torch.Tensor
    detail: torch.Tensor
    box: object


# -> mmseg 0.16: HRDAHead's scale_attention is a second DAFormerHead whose fusion is one 1x1 ConvModule, or a
# DLV2Head (HRDA@09af319d:mmseg/models/decode_heads/hrda_head.py:44-61, 75); names as models.DAFormer's table
ATTENTION_RENAME = (
    (r"attention\.embed\.(\d)\.(.+)", r"decode_head.scale_attention.embed_layers.\1.proj.\2"),
    (r"attention\.fuse\.([01])\.(.+)",
     lambda m: f"decode_head.scale_attention.fuse_layer.{models.CONV_BN[m[1]]}.{m[2]}"),
    (r"attention\.classifier\.(.+)", r"decode_head.scale_attention.conv_seg.\1"),
    (r"attention\.head\.convs\.(\d+)\.(.+)", r"decode_head.scale_attention.aspp_modules.\1.conv.\2"))


class AttentionHead(nn.Module):
    """Scale attention (HRDA.md §1.3), raw logits (B, K, h_1, w_1); HRDA applies the sigmoid.
    feat_channels a list (DAFormer): per level Linear C_i->256, resized to level 1, concat, 1x1 conv + BN + ReLU,
    Dropout2d(0.1), 1x1 classifier (MiT-B5 530,707 params at K=19). An int (DeepLabV2): the ASPP classifier,
    dilations (6, 12) (ResNet-101 700,454)."""

    def __init__(self, feat_channels, num_classes, embed=256):
        super().__init__()
        if isinstance(feat_channels, int):
            self.head = models.ASPPClassifier(feat_channels, num_classes, (6, 12))  # DLV2Head: N(0, 0.01), bias 0
            return
        self.head = None
        self.embed = nn.ModuleList(nn.Linear(c, embed) for c in feat_channels)
        self.fuse = models._conv_bn_relu(embed * len(feat_channels), embed)  # HRDA: ASPP fusion -> 1x1 conv
        self.dropout = nn.Dropout2d(0.1)
        self.classifier = nn.Conv2d(embed, num_classes, 1)
        models.init_decode_head(self)
        nn.init.normal_(self.classifier.weight, 0.0, 0.01)  # mmseg decode-head default: initial attention ~ 0.5
        nn.init.zeros_(self.classifier.bias)

    def forward(self, feats):
        """DAFormer: [(B, C_i, h_i, w_i)] -> (B, K, h_1, w_1); DeepLabV2: (B, C, h, w) -> (B, K, h, w)"""
        if self.head is not None:
            return self.head(feats)
        size = feats[0].shape[-2:]
        x = torch.cat([upsample(embed(f.permute(0, 2, 3, 1)).permute(0, 3, 1, 2), size)
                       for embed, f in zip(self.embed, feats)], dim=1)
        return self.classifier(self.dropout(self.fuse(x)))


def slide_boxes(size, window, stride):
    """mmseg's sliding grid: windows (y0, x0, h, w) of `window` (clipped to `size`) at `stride`, the last one per
    axis shifted back inside the image. (1024, 1024), 512, 256 -> 9 boxes; (1024, 2048), 1024, 512 -> 3."""
    (H, W), (h, w), (sh, sw) = size, window, stride
    h, w = min(h, H), min(w, W)
    ys = [min(i * sh, H - h) for i in range((H - h + sh - 1) // sh + 1)]
    xs = [min(i * sw, W - w) for i in range((W - w + sw - 1) // sw + 1)]
    return [(y, x, h, w) for y in ys for x in xs]


def average_tiles(tiles, offsets, size, batch):
    """tiles (n*B, K, h_i, w_i), box-major, pasted at offsets [(y, x)] on a (B, K, *size) canvas and averaged
    where they overlap; uncovered pixels stay 0. float32 canvas, as HRDA's decode_hr."""
    canvas = tiles.new_zeros(batch, tiles.shape[1], *size, dtype=torch.float32)
    count = tiles.new_zeros(1, 1, *size, dtype=torch.float32)
    for (y, x), tile in zip(offsets, tiles.split(batch)):
        h, w = tile.shape[-2:]
        canvas[..., y:y + h, x:x + w] += tile
        count[..., y:y + h, x:x + w] += 1
    return canvas / count.clamp(min=1)


class HRDA(nn.Module):
    """Wraps `net` (models.DeepLabV2 or models.DAFormer) behind the same face: encode, decode, seg_loss,
    forward (sliding inference), rebuild, deepest, compile_encode_decode, param_groups, config, feat_channels,
    feat_stride.

    crop_size: the training crop (int or (h, w)); inference windows have this size. scale: context resize
    (HRDA 0.5). detail: detail-crop size relative to the input (0.5: 512 of 1024). divisible: detail offsets
    are multiples of it (8). detail_loss_weight: the detail loss weight (0.1); the fused loss gets the rest."""

    def __init__(self, net, crop_size=1024, scale=0.5, detail=0.5, divisible=8, detail_loss_weight=0.1):
        super().__init__()
        self.net = net
        self.attention = AttentionHead(net.feat_channels, net.config["num_classes"])
        self.crop_size = (crop_size, crop_size) if isinstance(crop_size, int) else tuple(crop_size)
        self.scale, self.detail, self.divisible = scale, detail, divisible
        self.detail_loss_weight = detail_loss_weight
        self.config = dict(net.config, hrda=dict(crop_size=crop_size, scale=scale, detail=detail,
                                                 divisible=divisible, detail_loss_weight=detail_loss_weight))
        self.feat_channels, self.feat_stride = net.feat_channels, net.feat_stride

    def context_view(self, x):
        """(B, 3, H, W) -> (B, 3, H*scale, W*scale), bilinear, align_corners False (= avg_pool2d for x0.5)."""
        size = (int(x.shape[-2] * self.scale), int(x.shape[-1] * self.scale))
        return upsample(x, size)

    def detail_box(self, H, W):
        """A random detail box (y0, x0, h, w) for an (H, W) crop: offset = randint(0, (margin + 1) // 8) * 8 per
        axis, y then x (HRDA.md §1.2; at 1024: {0, 8, ..., 504}). Torch's CPU RNG: no device sync."""
        h, w = int(H * self.detail), int(W * self.detail)
        y0, x0 = (int(torch.randint(max((m + 1) // self.divisible, 1), (), device="cpu")) * self.divisible
                  for m in (H - h, W - w))  # HRDA raises when the box fills the crop; offset 0 here
        return y0, x0, h, w

    def encode(self, x):
        """Training views of a crop x (B, 3, H, W) -> HRDAFeatures(context = net.encode of the context view,
        detail = net.encode of the detail crop, box). Two encoder calls, as HRDA (BatchNorm statistics per view)."""
        box = self.detail_box(*x.shape[-2:])
        y0, x0, h, w = box
        return HRDAFeatures(self.net.encode(self.context_view(x)), self.net.encode(x[..., y0:y0 + h, x0:x0 + w]),
                            box)

    def decode(self, feats):
        """HRDAFeatures -> HRDAOutput (HRDA.md §1.4): context_seg, detail_seg = net.decode of each view; att =
        sigmoid(attention(context)), zeroed outside the box at the context resolution (training only); fused =
        up(att) * detail_inserted + up((1 - att) * context_seg) at the crop / os. Inference (a list of boxes): the
        crops' logits are averaged on the canvas (logit averaging) and the attention is not masked."""
        context, detail, box = feats
        context_seg, detail_seg = self.net.decode(context), self.net.decode(detail)
        att = torch.sigmoid(self.attention(context))
        boxes = box if isinstance(box, list) else [box]
        os = boxes[0][2] // detail_seg.shape[-2]  # logit stride: 4 (DAFormer) or 8 (DeepLabV2)
        size = (round(context_seg.shape[-2] / self.scale), round(context_seg.shape[-1] / self.scale))  # crop / os
        detail_inserted = average_tiles(detail_seg, [(y // os, x // os) for y, x, _, _ in boxes], size,
                                        context_seg.shape[0])
        if not isinstance(box, list):
            y0, x0, h, w = box
            r = os / self.scale  # context logit stride; int() truncates as HRDA (inexact for os 8: HRDA.md §1.4)
            keep = att.new_zeros(1, 1, *att.shape[-2:])
            keep[..., int(y0 / r):int((y0 + h) / r), int(x0 / r):int((x0 + w) / r)] = 1
            att = att * keep
        fused = upsample(att, size) * detail_inserted + upsample((1 - att) * context_seg, size)
        return HRDAOutput(fused, detail_seg, box)

    def seg_loss(self, out, label, weight=1.0):
        """HRDAOutput, label (B, H, W) int64, weight scalar or (B, H, W) -> (1 - w_d) CE(up(fused), label,
        weight) + w_d CE(up(detail), label and weight cropped to the box) (HRDA.md §1.5; w_d = 0.1)."""
        y0, x0, h, w = out.box
        crop = (..., slice(y0, y0 + h), slice(x0, x0 + w))
        detail_weight = weight[crop] if torch.is_tensor(weight) and weight.dim() == label.dim() else weight
        loss_fused = weighted_cross_entropy(upsample(out.fused, label.shape[-2:]), label, weight)
        loss_detail = weighted_cross_entropy(upsample(out.detail, (h, w)), label[crop], detail_weight)
        return (1 - self.detail_loss_weight) * loss_fused + self.detail_loss_weight * loss_detail

    def infer_window(self, x):
        """Teacher-style inference on windows x (B, 3, h, w) <= the crop -> fused logits (B, K, h/os, w/os):
        context of the whole window + detail crops at stride detail/2 (9 at a square crop), all crops in one
        encoder and one decoder call (HRDA.md §2)."""
        H, W = x.shape[-2:]
        d = (int(self.crop_size[0] * self.detail), int(self.crop_size[1] * self.detail))
        boxes = slide_boxes((H, W), d, (d[0] // 2, d[1] // 2))
        crops = torch.cat([x[..., y:y + h, x0:x0 + w] for y, x0, h, w in boxes])
        return self.decode(HRDAFeatures(self.net.encode(self.context_view(x)), self.net.encode(crops), boxes)).fused

    def forward(self, x):
        """Inference, always (teacher pseudo-labels and evaluation), in the caller's train/eval mode.
        x (B, 3, H, W) no larger than the crop -> infer_window's logits (B, K, H/os, W/os); larger -> windows of
        the crop size at stride crop/2, batched in one call, each upsampled to the window size and averaged
        -> (B, K, H, W) (mmseg's batched slide inference, HRDA.md §2 "Test")."""
        H, W = x.shape[-2:]
        if H <= self.crop_size[0] and W <= self.crop_size[1]:
            return self.infer_window(x)
        boxes = slide_boxes((H, W), self.crop_size, (self.crop_size[0] // 2, self.crop_size[1] // 2))
        windows = torch.cat([x[..., y:y + h, x0:x0 + w] for y, x0, h, w in boxes])
        tiles = upsample(self.infer_window(windows), boxes[0][2:])
        return average_tiles(tiles, [b[:2] for b in boxes], (H, W), x.shape[0])

    @property
    def backbone(self):
        """The wrapped network's encoder: ImageNet weights load here (models.load_pretrained)."""
        return self.net.backbone

    def mmseg_names(self):
        """{our key: its mmseg 0.16 name} (models.DAFormer.mmseg_names): the wrapped network's, with its decode head
        under decode_head.head (hrda_head.py:69), and the attention head's under decode_head.scale_attention."""
        inner = {f"net.{k}": name.replace("decode_head.", "decode_head.head.", 1)
                 for k, name in self.net.mmseg_names().items()}
        return {k: inner.get(k) or models.rename(k, ATTENTION_RENAME) for k in self.state_dict()}

    def param_groups(self, lr):
        """net's groups, plus the attention head in its own group at 10x lr (it sits in HRDA's decode head,
        which DAFormer's optimiser trains at 10x; HRDA.md §1.6 item 5)."""
        return self.net.param_groups(lr) + [dict(params=list(self.attention.parameters()), lr=10 * lr,
                                                 name="attention")]

    def rebuild(self, rebuilder, feats):
        """MFM on HRDA (HRDA.md §4.2): one shared Rebuilder on each view, two calls, two independent masks.
        HRDAFeatures -> (HRDAFeatures(rebuilt context, rebuilt detail, box), mask of the context call)."""
        context, mask = self.net.rebuild(rebuilder, feats.context)
        detail, _ = self.net.rebuild(rebuilder, feats.detail)
        return HRDAFeatures(context, detail, feats.box), mask

    def deepest(self, feats):
        """The deepest map of the context view (HRDA.md §1.6: the feature distance's feature_scale 0.5)."""
        return self.net.deepest(feats.context)

    def compile_encode_decode(self, backend="inductor"):
        """Compiles the wrapped network's encode/decode, whose input sizes do not change (this wrapper's detail box
        moves every step: one recompile per offset)."""
        self.net.compile_encode_decode(backend)


def build_model(num_classes=19, backbone="resnet101-v1c", pretrained=None, hrda=None, **kw):
    """models.build_model, wrapped in HRDA(net, **hrda) when hrda is a dict of its settings (HRDA.config adds
    them under "hrda"): build_model(**model.config) rebuilds either kind. An HRDA model loads `pretrained` after
    wrapping: ImageNet weights into its encoder, a whole network (ours, or a released HRDA/MIC one) everywhere."""
    if hrda is None:
        return models.build_model(num_classes, backbone, pretrained, **kw)
    if backbone in models.DLV3P:  # AttentionHead takes DeepLabV2's map or MiT's list, no dict
        raise models.WeightsError(f"--recipe hrda runs DeepLabV2 and DAFormer networks, not {backbone}.")
    hrda = {{"hr_loss_weight": "detail_loss_weight"}.get(k, k): v for k, v in hrda.items()}  # model.pt before #23
    model = HRDA(models.build_model(num_classes, backbone, **kw), **hrda)
    if pretrained not in (None, "none"):
        models.load_pretrained(model, pretrained)
    return model
