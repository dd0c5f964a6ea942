"""The comparison auxiliaries (MIC, class-wise masked image modeling) and the DAFormer extras (METHOD.md §4, §6).

Each auxiliary takes the training loop's pseudo-labels `pl` (B, H, W) and confidence weight `w` (scalar q or
(B, H, W)), returns one unweighted loss term, and is scaled by its λ in the caller, as mfm.mfm_loss is; train.py's
AUXILIARIES table says how the loop calls each.

    mic_loss(student, x_tgt, pl, w, block=32, ratio=0.7)        MIC: CE on the block-masked, augmented target
    mic_loss(..., src=(x_src, y_src))                           MIC's `separate` mode: half source, half target
    cmim_loss(student, head, x_tgt, pl, w)                      class-wise MIM, our reading of S4MIM (see there)
    ClassWiseReconstructor(in_channels, stride=8)               the light pixel head cmim_loss trains
    feature_distance_loss(f_student, f_imagenet, y_src)         DAFormer's ImageNet feature distance, λ LAMBDA_FD
    pseudo_label_crop(w, pl)                                    DAFormer's pseudo-label crop (HRDA's side margins)

The frozen ImageNet copy of the feature distance is made once, before training, from the pretrained student
(train.build_run) and never EMA-updated; DAFormer's pseudo-label crop zeroes rows 0-14 and the last 120 of 512 crops.
"""
import torch
import torch.nn.functional as F
from torch import nn

import data
import models
from mfm import IGNORE_INDEX

MIC_BLOCK, MIC_RATIO = 32, 0.7  # MIC at the 512-crop / half-resolution setting (64 px at full resolution)
CMIM_PATCH, CMIM_RATIO = 16, 0.5  # choice (S4MIM's values are unknown)
CMIM_LAMBDA_AGG, CMIM_MAX_CLASSES = 0.1, 3  # choice
# CMIM_FILL, *choice*: a class image's masked and other-class pixels take the mean colour of the class's visible
# pixels (what the pair may see: no other class leaks in), not MIC's fill, the dataset mean, which is 0 after
# normalisation. A class image is mostly fill; a from-scratch MiT (zero biases) turns a 0 fill into tokens that stay
# exactly 0 through every stage, and each LayerNorm scales their gradient by 1/sqrt(eps) (1000 at eps 1e-6): NaN at
# step 0 of `--backbone mit_b0 --aux cmim` from scratch, a gradient norm of 3.7e6 even with the pairs without a
# visible pixel left out. With the class's mean it is DACS's order. S4MIM is silent on the fill.
LAMBDA_FD = 0.005  # DAFormer ImageNet feature distance weight
FD_RATIO = 0.75  # a cell counts if one class covers >= 75% of it (DAFormer)
THING_CLASSES = (6, 7, 11, 12, 13, 14, 15, 16, 17, 18)  # trainIds: lights, signs, person ... bicycle (DAFormer)
CROP_TOP, CROP_BOTTOM, CROP_REFERENCE = 15, 120, 512  # DAFormer pseudo-label crop, rows at a 512 crop
CROP_SIDE = 15  # HRDA's v2 crop adds 30 image columns at each side at 1024 crops (15 at the 512 reference)
MASK_FILL = models.IMAGENET_MEAN  # 0 after normalisation, as MIC's multiplication of the normalised image


def random_block_mask(batch, height, width, block, ratio, device=None):
    """keep (B, 1, H, W): 1 = visible. Blocks of block x block pixels from the top-left corner (the last row and
    column of blocks are cut at the border), each masked independently with probability `ratio`."""
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"mask ratio must lie in [0, 1], got {ratio}")
    rows, cols = -(-height // block), -(-width // block)
    keep = (torch.rand(batch, 1, rows, cols, device=device) >= ratio).float()
    return keep.repeat_interleave(block, 2).repeat_interleave(block, 3)[..., :height, :width]


def constant(values, like):
    """Small constant tensor on like's device and dtype, filled there: torch.tensor(values, device=cuda) copies
    from pageable host memory, which waits for the GPU to finish its queue."""
    return torch.stack([torch.full((), v, dtype=like.dtype, device=like.device) for v in values])


def mask_image(x, keep, fill=None):
    """x (B, 3, H, W) in [0, 1], keep (B, 1, H, W) -> x where keep is 1, `fill` elsewhere (a tensor that
    broadcasts to x; default MASK_FILL, MIC's)."""
    fill = constant(MASK_FILL, x).view(1, 3, 1, 1) if fill is None else fill
    keep = keep.to(x.dtype)
    return x * keep + fill * (1 - keep)


# ----------------------------------------------------------------------------- MIC (METHOD.md §6)
def mic_loss(student, x_tgt, pseudo_label, weight=1.0, block=MIC_BLOCK, ratio=MIC_RATIO,
             augment=data.strong_augment, return_mask=False, src=None):
    """L_mic = CE(student(mask(augment(x_t))) upsampled, teacher's pseudo-label of the unmasked x_t) * weight.

    student: a network of models.py / hrda.py (encode, decode, seg_loss); x_tgt (B, 3, H, W) in [0, 1];
    pseudo_label (B, H, W) int64; weight scalar or (B, H, W); augment: colour jitter + blur as DACS (None =
    off): MIC's `separatetrgaug` mode (its GTA/SYNTHIA -> Cityscapes runs). src = (x_src (B, 3, H, W), y_src
    (B, H, W)): its `separate` mode (CS -> ACDC / Dark Zurich, M:seg/experiments.py:401-405): the masked batch is
    [source crop 0 with its label, weight 1; target crop 0 with its pseudo-label and weight], not augmented
    (M:seg/mmseg/models/uda/masking_consistency_module.py:96-104); MIC asserts a batch of 2, ours (*choice*) takes
    the first B // 2 source and B - B // 2 target crops, still B crops. Returns the loss, or (loss, keep (B, 1, H,
    W), 1 = visible) with return_mask=True."""
    if src is not None:
        n, b = x_tgt.shape[0] // 2, x_tgt.shape[0]
        weight = torch.as_tensor(weight, device=x_tgt.device).float().expand(pseudo_label.shape)
        weight = torch.cat([torch.ones_like(weight[:n]), weight[:b - n]])
        pseudo_label = torch.cat([src[1][:n], pseudo_label[:b - n]])
        x_tgt, augment = torch.cat([src[0][:n], x_tgt[:b - n]]), None
    x = augment(x_tgt) if augment is not None else x_tgt
    keep = random_block_mask(x.shape[0], x.shape[2], x.shape[3], block, ratio, x.device)
    # one mask on the whole crop, before a multi-resolution student (HRDA) cuts its views (HRDA.md §3)
    loss = student.seg_loss(student.decode(student.encode(mask_image(x, keep))), pseudo_label, weight)
    return (loss, keep) if return_mask else loss


# ----------------------------------------------------------------------------- CMIM after S4MIM (METHOD.md §6)
class ClassWiseReconstructor(nn.Module):
    """Light pixel head: features (N, C, h, w) -> RGB (N, 3, H, W). 1x1 conv -> GELU -> 1x1 conv to 3*s*s
    channels -> pixel shuffle by s (the encoder's output stride), resized to (H, W) if h*s differs. in_channels: C,
    or a network's feat_channels (a list of levels: the deepest, which cmim_loss reads)."""

    def __init__(self, in_channels, stride=8, hidden=256):
        super().__init__()
        in_channels = in_channels if isinstance(in_channels, int) else in_channels[-1]
        self.net = nn.Sequential(nn.Conv2d(in_channels, hidden, 1), nn.GELU(),
                                 nn.Conv2d(hidden, 3 * stride * stride, 1), nn.PixelShuffle(stride))

    def forward(self, feats, size):
        return models.upsample(self.net(feats), size)


def _masked_mean(values, valid):
    """Mean of values (N,) over valid (N,) entries; 0 (with graph) when none is valid. No host sync. The other
    entries are selected away, not multiplied by 0, so whatever they hold (inf too) reaches neither sum nor grad."""
    return torch.where(valid, values, 0).sum() / valid.float().sum().clamp(min=1)


def _prototype(feats, area):
    """feats (N, C, h, w), area (N, 1, h, w) fractions -> area-weighted mean feature (N, C)."""
    return (feats * area).flatten(2).sum(2) / area.flatten(2).sum(2).clamp(min=1e-6)


def cmim_loss(student, head, x_tgt, pseudo_label, weight=1.0, patch=CMIM_PATCH, ratio=CMIM_RATIO,
              lambda_agg=CMIM_LAMBDA_AGG, max_classes=CMIM_MAX_CLASSES, return_parts=False):
    """L_cmim = mean over (image, class) pairs of [L1 of head(E(x_c)) on c's masked pixels, weighted]
    + lambda_agg * mean over pairs of [1 - cos(masked prototype of c, visible prototype of c)].

    Our reading of S4MIM (arXiv 2411.08756; only its abstract is known: masked regions are reconstructed per class
    from visible pixels of the same class only, and a feature-aggregation loss pulls masked and visible features of
    one class together). Everything else is *choice*:
      - classes come from the teacher's pseudo-labels, in the semi-supervised setting too (train.py --labeled: the
        unlabelled batch; the labelled batch's ground truth is not used), so the auxiliary is the same in both;
      - random_block_mask with 16-px patches, ratio 0.5; per (image, class) pair the input keeps only the visible
        pixels of that class, the rest filled with their mean colour (CMIM_FILL); pairs stacked on the batch
        (one encoder pass), at most `max_classes` random classes per image (cost); a pair whose class has no
        visible pixel has nothing to rebuild from: it is selected out of the loss (its gradient is exactly 0);
      - target: the RGB image in [0, 1]; L1 (SimMIM) averaged over the class's masked pixels, times the confidence
        weight; pairs averaged. Head: 1x1 conv -> GELU -> 1x1 conv to 3*s*s -> pixel shuffle (s = output stride);
      - aggregation: the feature pooled over c's masked pixels is pulled toward the one pooled over c's visible
        pixels (1 - cosine, the visible prototype detached), weight lambda_agg = 0.1 times c's mean confidence;
      - "masked modeling in semantic space" (the abstract's third part) is left out: MIC's masked CE and MFM are
        the semantic-space variants this project compares.
    Classes are independent exactly when the encoder treats samples separately (eval-mode BatchNorm or none); in
    train mode the stacked class images share batch statistics and move the running statistics (as MIC's do).

    student: a network of models.py (encode, deepest); head: a
    ClassWiseReconstructor; x_tgt (B, 3, H, W) in [0, 1]; pseudo_label (B, H, W) int64 (IGNORE_INDEX pixels
    belong to no class); weight scalar or (B, H, W); max_classes: classes per image (random subset; None = all).
    Returns the loss, or (loss, parts) with return_parts=True: parts["recon"], parts["agg"] (N,) per pair,
    parts["sample"], parts["cls"] (N,) which image and class each pair is, parts["keep"] (B, 1, H, W)."""
    B, _, H, W = x_tgt.shape
    keep = random_block_mask(B, H, W, patch, ratio, x_tgt.device)
    ids = pseudo_label.reshape(B, -1)
    present = torch.zeros(B, 256, device=x_tgt.device).scatter_(1, ids, 1.0) > 0  # (B, 256) classes per image
    present[:, IGNORE_INDEX] = False
    per_image = int(present.sum(1).max()) if max_classes is None else max_classes  # None: one host sync
    # A fixed number of (image, class) pairs, classes in a random order per image, drawn on the device: no
    # torch.unique / .cpu() per image. Images with fewer classes get empty pairs, which count nowhere below.
    keys = torch.rand(B, 256, device=x_tgt.device).masked_fill(~present, 2.0)
    cls = keys.argsort(1)[:, :max(per_image, 1)]  # (B, M)
    valid = present.gather(1, cls).flatten()
    sample = torch.arange(B, device=x_tgt.device).repeat_interleave(cls.shape[1])
    cls = cls.flatten()
    region = ((pseudo_label[sample] == cls.view(-1, 1, 1)) & valid.view(-1, 1, 1)).unsqueeze(1).float()
    visible, masked = region * keep[sample], region * (1 - keep[sample])
    w = torch.as_tensor(weight, device=x_tgt.device).float().expand(B, H, W)[sample].unsqueeze(1)

    usable = valid & (visible.flatten(1).sum(1) > 0)  # a class with no visible pixel has nothing to rebuild from
    images = x_tgt[sample]
    fill = (images * visible).sum((2, 3), keepdim=True) / visible.sum((2, 3), keepdim=True).clamp(min=1)  # CMIM_FILL
    feats = student.deepest(student.encode(mask_image(images, visible, fill)))  # (N, C, h, w): c's visible pixels
    error = (head(feats, (H, W)).float() - x_tgt[sample].float()).abs().mean(1, keepdim=True)  # (N, 1, H, W)
    count = masked.flatten(1).sum(1)
    recon = (error * masked * w).flatten(1).sum(1) / count.clamp(min=1)

    size = feats.shape[-2:]
    area_vis, area_mask = F.adaptive_avg_pool2d(visible, size), F.adaptive_avg_pool2d(masked, size)
    feats = feats.float()
    proto_mask, proto_vis = _prototype(feats, area_mask), _prototype(feats, area_vis).detach()
    confidence = (w * region).flatten(1).sum(1) / region.flatten(1).sum(1).clamp(min=1)
    agg = (1 - F.cosine_similarity(proto_mask, proto_vis, dim=1)) * confidence
    has_both = (area_mask.flatten(1).sum(1) > 0) & (area_vis.flatten(1).sum(1) > 0)

    loss = _masked_mean(recon, usable & (count > 0)) + lambda_agg * _masked_mean(agg, has_both)
    if return_parts:
        return loss, dict(recon=recon, agg=agg * has_both, sample=sample, cls=cls, keep=keep)
    return loss


# ----------------------------------------------------------------------------- DAFormer extras (METHOD.md §4)
def feature_distance_loss(student_feats, imagenet_feats, label, thing_classes=THING_CLASSES, ratio=FD_RATIO):
    """DAFormer's ImageNet feature distance on source images: mean over qualifying cells of
    ||f_student - f_imagenet||_2 (over channels). A cell qualifies if one thing class covers >= ratio of it,
    computed by area-pooling the label's class masks to the feature grid (DAFormer: 8x8 cells, 75%).

    student_feats (B, C, h, w) with grad; imagenet_feats (B, C, h, w) from the frozen copy (detached here);
    label (B, H, W) int64 source labels. Returns a scalar; 0 * sum (graph kept) when no cell qualifies.
    Multiply by LAMBDA_FD in the caller. ratio must exceed 0.5 (then at most one class can reach it)."""
    if not 0.5 < ratio <= 1.0:
        raise ValueError(f"ratio must lie in (0.5, 1], got {ratio}")
    things = constant(thing_classes, label).view(1, -1, 1, 1)
    share = F.adaptive_avg_pool2d((label.unsqueeze(1) == things).float(), student_feats.shape[-2:])  # (B, T, h, w)
    cells = (share >= ratio).any(1).float()  # (B, h, w)
    dist = torch.linalg.vector_norm(student_feats.float() - imagenet_feats.detach().float(), dim=1)  # (B, h, w)
    return (dist * cells).sum() / cells.sum().clamp(min=1)


def pseudo_label_crop(weight, pseudo_label, top=CROP_TOP, bottom=CROP_BOTTOM, reference=CROP_REFERENCE, side=0,
                      frame=None):
    """Confidence weight scalar q or (B, H, W) -> per-pixel weight (B, H, W) with the top and bottom rows 0, and
    (side > 0, HRDA) the image columns within `side` of the image's left and right edges.

    DAFormer uses fixed rows (15, 120) at 512 crops; for a crop of height H we scale them by H / reference
    (rounded), so a 512 crop gets exactly DAFormer's rows, a 1024 crop HRDA's (30, 240) and a 64-px toy crop 2 and
    15; `side` scales alike (HRDA: 30 at 1024). frame (B, 3) int64 = each crop's (x offset, flipped, image width)
    from the dataset (data.build_dataset(frame=True)); without it no columns are cut. pseudo_label gives the
    shape and device. Apply before ClassMix (pasted source pixels get weight 1 anyway)."""
    B, H, W = pseudo_label.shape
    w = torch.as_tensor(weight, device=pseudo_label.device).float().expand(B, H, W).clone()
    rows_top, rows_bottom = round(top * H / reference), round(bottom * H / reference)
    w[:, :rows_top] = 0
    w[:, H - rows_bottom:] = 0
    if side and frame is not None:  # the crop's columns in image coordinates (mirrored when flipped)
        cols, margin = torch.arange(W, device=w.device), round(side * H / reference)
        x0, flipped, width = (frame[:, i:i + 1].to(w.device) for i in range(3))
        image_col = x0 + torch.where(flipped > 0, W - 1 - cols, cols)  # (B, W)
        w *= ((image_col >= margin) & (image_col < width - margin)).unsqueeze(1)
    return w
