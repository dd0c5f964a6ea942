"""hrda.py at the tiny CPU recipe of HRDA.md §5 (MiT-B0 and the toy resnet18, crop 128, detail 64, K=19): the
attention head's parameter counts (HRDA.md §1.3), the detail offsets, the fusion against a hand computation and
where the detail may not reach (§1.4), the 9-crop teacher and the 3-window test geometry (§2), the 0.9/0.1 loss
(§1.5), MFM on both views through HRDA.rebuild (§4.2), MIC's mask in both views (§3), optimiser groups and
rebuilding from config."""
import functools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import hrda
import mfm
import models
from hrda import HRDAFeatures, HRDAOutput

K = 19
OS = {"mit_b0": 4, "resnet18": 8}  # logit stride of each network


def count(module):
    return sum(p.numel() for p in module.parameters())


def tiny(backbone="mit_b0", **kw):
    torch.manual_seed(0)
    return hrda.build_model(K, backbone, hrda=dict(crop_size=128, **kw))


def views(model, x, box):
    """HRDA's two views for a chosen box, written from HRDA.md §1.2 (x0.5 context = 2x2 average)."""
    y0, x0, h, w = box
    return HRDAFeatures(model.net.encode(F.avg_pool2d(x, 2)), model.net.encode(x[..., y0:y0 + h, x0:x0 + w]), box)


def up(t, size):
    return F.interpolate(t, size=size, mode="bilinear", align_corners=False)


def distance_outside(size, box):
    """(size, size) Chebyshev distance of each canvas pixel to the box (y0, x0, h, w); 0 inside."""
    y0, x0, h, w = box
    r = torch.arange(size)
    dy = (y0 - r).clamp(min=0).maximum(r - (y0 + h - 1))
    dx = (x0 - r).clamp(min=0).maximum(r - (x0 + w - 1))
    return dy[:, None].maximum(dx[None, :])


class ConstAttention(nn.Module):
    """Attention logits of one value at the context logits' size: -1e4 -> sigmoid 0, +1e4 -> 1."""

    def __init__(self, value):
        super().__init__()
        self.value = value

    def forward(self, feats):
        f = feats[0] if isinstance(feats, list) else feats
        return torch.full((f.shape[0], K, *f.shape[-2:]), self.value)


@pytest.mark.parametrize("backbone, attention, total", [("mit_b5", 530_707, 85_685_990),
                                                         ("mit_b0", 399_635, 7_300_230),
                                                         ("resnet101-v1c", 700_454, 43_920_300),
                                                         ("resnet18", 175_142, None)])
def test_attention_head_parameters(backbone, attention, total):
    with torch.device("meta"):
        model = hrda.build_model(K, backbone, hrda={})
    assert count(model.attention) == attention
    assert total is None or count(model) == total


def test_attention_head_init():
    torch.manual_seed(0)
    head = hrda.AttentionHead([32, 64, 160, 256], K)
    assert head.classifier.weight.std().item() == pytest.approx(0.01, rel=0.1)
    assert not head.classifier.bias.any() and head.fuse[0].bias is None
    assert head.fuse[0].weight.std().item() == pytest.approx((2 / 256) ** 0.5, rel=0.1)  # kaiming fan_out
    feats = [torch.randn(2, c, 16 // 2 ** i, 16 // 2 ** i) for i, c in enumerate([32, 64, 160, 256])]
    assert torch.sigmoid(head(feats)).mean().item() == pytest.approx(0.5, abs=0.02)  # HRDA.md §1.3
    dlv2 = hrda.AttentionHead(512, K).head
    assert isinstance(dlv2, models.ASPPClassifier) and [c.dilation for c in dlv2.convs] == [(6, 6), (12, 12)]
    assert all(not c.bias.any() and c.weight.std().item() == pytest.approx(0.01, rel=0.1) for c in dlv2.convs)


def test_slide_boxes_at_paper_sizes():
    assert {b[:2] for b in hrda.slide_boxes((1024, 1024), (512, 512), (256, 256))} == {
        (y, x) for y in (0, 256, 512) for x in (0, 256, 512)}
    assert hrda.slide_boxes((1024, 2048), (1024, 1024), (512, 512)) == [
        (0, 0, 1024, 1024), (0, 512, 1024, 1024), (0, 1024, 1024, 1024)]


def test_detail_offsets():
    torch.manual_seed(0)
    model = tiny()
    boxes = [model.detail_box(128, 128) for _ in range(500)]
    assert {b[2:] for b in boxes} == {(64, 64)}
    assert {b[0] for b in boxes} == {b[1] for b in boxes} == set(range(0, 57, 8))
    paper = {model.detail_box(1024, 1024)[0] for _ in range(3000)}
    assert paper == set(range(0, 505, 8))  # 512 never drawn (HRDA.md §1.2)
    coarse = tiny(divisible=16)
    assert {coarse.detail_box(128, 128)[1] for _ in range(300)} == set(range(0, 49, 16))


@pytest.mark.parametrize("backbone", ["mit_b0", "resnet18"])
def test_views_and_shapes(backbone):
    model = tiny(backbone)
    feats = model.encode(torch.rand(2, 3, 128, 128))
    shapes = ([(32, 16, 16), (64, 8, 8), (160, 4, 4), (256, 2, 2)] if backbone == "mit_b0" else (512, 8, 8))
    for view in (feats.context, feats.detail):
        got = [tuple(f.shape[1:]) for f in view] if isinstance(view, list) else tuple(view.shape[1:])
        assert got == shapes
    out = model.decode(feats)
    assert out.fused.shape == (2, K, 128 // OS[backbone], 128 // OS[backbone])
    assert out.detail.shape == (2, K, 64 // OS[backbone], 64 // OS[backbone]) and out.box == feats.box


@pytest.mark.parametrize("backbone, att_rows, att_cols, detail_rows, detail_cols", [
    ("mit_b0", slice(3, 11), slice(5, 13), slice(6, 22), slice(10, 26)),  # box / 8 and box / 4
    ("resnet18", slice(1, 5), slice(2, 6), slice(3, 11), slice(5, 13))])  # int(box / 16) truncated, box / 8
def test_fusion_equals_hand_computation(backbone, att_rows, att_cols, detail_rows, detail_cols):
    model = tiny(backbone).eval()  # eval: dropout off, so net.decode here and inside decode agree
    torch.manual_seed(1)
    x = torch.rand(2, 3, 128, 128)
    feats = views(model, x, (24, 40, 64, 64))
    size = 128 // OS[backbone]
    with torch.no_grad():
        fused = model.decode(feats).fused
        context_seg, detail_seg = model.net.decode(feats.context), model.net.decode(feats.detail)
        att = torch.sigmoid(model.attention(feats.context))
    masked = torch.zeros_like(att)
    masked[..., att_rows, att_cols] = att[..., att_rows, att_cols]
    inserted = torch.zeros(2, K, size, size)
    inserted[..., detail_rows, detail_cols] = detail_seg
    expect = up(masked, size) * inserted + up((1 - masked) * context_seg, size)
    torch.testing.assert_close(fused, expect, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("backbone, box, far", [("mit_b0", (24, 40, 64, 64), 2),   # os 4: exact slices
                                                ("resnet18", (24, 40, 64, 64), 3),  # os 8, box = 8 mod 16
                                                ("resnet18", (32, 48, 64, 64), 2)])  # os 8, box = 0 mod 16
def test_detail_only_inside_the_box(backbone, box, far):
    model = tiny(backbone).eval()
    torch.manual_seed(1)
    feats = views(model, torch.rand(2, 3, 128, 128), box)
    os, size = OS[backbone], 128 // OS[backbone]
    dist = distance_outside(size, [v // os for v in box])
    with torch.no_grad():
        context_up = up(model.net.decode(feats.context), size)
        detail_seg = model.net.decode(feats.detail)
        fused = model.decode(feats).fused  # the learned (initial) attention: any attention
        assert torch.equal(fused[..., dist >= far], context_up[..., dist >= far])
        assert not torch.allclose(fused[..., dist == far - 1], context_up[..., dist == far - 1])  # the bound is tight
        model.attention = ConstAttention(-1e4)
        assert torch.equal(model.decode(feats).fused, context_up)
        model.attention = ConstAttention(1e4)
        y, x = box[0] // os, box[1] // os
        fused = model.decode(feats).fused[..., y + 1:y + 64 // os - 1, x + 1:x + 64 // os - 1]
        if box[0] % 16 == 0:  # exact attention slice: the box interior is pure detail
            torch.testing.assert_close(fused, detail_seg[..., 1:-1, 1:-1])


def encoder_batches(model, monkeypatch):
    """The batch size of every call of model.net.encode from now on (a list that fills as they happen)."""
    batches, encode = [], model.net.encode
    monkeypatch.setattr(model.net, "encode", lambda t: batches.append(len(t)) or encode(t))
    return batches


@pytest.mark.parametrize("backbone", ["mit_b0", "resnet18"])
def test_teacher_is_context_plus_nine_averaged_crops(backbone, monkeypatch):
    model = tiny(backbone).eval()
    torch.manual_seed(1)
    x = torch.rand(2, 3, 128, 128)
    batches = encoder_batches(model, monkeypatch)
    with torch.no_grad():
        out = model(x)
    assert batches == [2, 18]  # one context call, one call for all 9 crops of both images
    monkeypatch.undo()
    os, size = OS[backbone], 128 // OS[backbone]
    with torch.no_grad():
        context = model.net.encode(F.avg_pool2d(x, 2))
        context_seg, att = model.net.decode(context), torch.sigmoid(model.attention(context))
        canvas, counts = torch.zeros(2, K, size, size), torch.zeros(size, size)
        for y in (0, 32, 64):
            for x0 in (0, 32, 64):
                seg = model.net.decode(model.net.encode(x[..., y:y + 64, x0:x0 + 64]))
                canvas[..., y // os:(y + 64) // os, x0 // os:(x0 + 64) // os] += seg
                counts[y // os:(y + 64) // os, x0 // os:(x0 + 64) // os] += 1
    band = torch.tensor([1.0, 2, 2, 1]).repeat_interleave(size // 4)
    assert torch.equal(counts, band[:, None] * band[None, :])  # corners 1, edges 2, centre 4
    expect = up(att, size) * canvas / counts + up((1 - att) * context_seg, size)  # unmasked attention
    torch.testing.assert_close(out, expect, atol=1e-5, rtol=1e-4)


def test_test_time_windows(monkeypatch):
    model = tiny().eval()
    torch.manual_seed(1)
    x = torch.rand(2, 3, 128, 256)
    batches = encoder_batches(model, monkeypatch)
    with torch.no_grad():
        out = model(x)
        assert batches == [6, 54]  # 3 windows batched: 3B contexts, 27B detail crops
        windows = [up(model(x[..., x0:x0 + 128]), (128, 128)) for x0 in (0, 64, 128)]
    assert out.shape == (2, K, 128, 256)
    canvas = torch.zeros(2, K, 128, 256)
    for x0, logits in zip((0, 64, 128), windows):
        canvas[..., x0:x0 + 128] += logits
    counts = torch.tensor([1.0, 2, 2, 1]).repeat_interleave(64)  # per 64-px band along x
    torch.testing.assert_close(out, canvas / counts, atol=1e-5, rtol=1e-4)
    monkeypatch.setattr(model.net, "decode", lambda f: torch.full((len(f[0]), K, *f[0].shape[-2:]), 3.0))
    with torch.no_grad():
        torch.testing.assert_close(model(x), torch.full((2, K, 128, 256), 3.0))


def test_loss_is_fused_0_9_plus_detail_0_1():
    model = tiny()
    torch.manual_seed(1)
    box = (24, 40, 64, 64)
    out = HRDAOutput(torch.randn(2, K, 32, 32), torch.randn(2, K, 16, 16), box)
    label = torch.randint(0, K, (2, 128, 128))
    label[:, :30] = 255
    weight = torch.rand(2, 128, 128)

    def ce(logits, y, w):
        per_pixel = F.cross_entropy(up(logits, y.shape[-2:]), y, ignore_index=255, reduction="none")
        return (per_pixel * w).mean()

    crop = (slice(None), slice(24, 88), slice(40, 104))
    expect = 0.9 * ce(out.fused, label, weight) + 0.1 * ce(out.detail, label[crop], weight[crop])
    torch.testing.assert_close(model.seg_loss(out, label, weight), expect)
    expect = 0.9 * ce(out.fused, label, 0.7) + 0.1 * ce(out.detail, label[crop], 0.7)
    torch.testing.assert_close(model.seg_loss(out, label, 0.7), expect)


@pytest.mark.parametrize("backbone, channels", [("mit_b0", [32, 64, 160, 256]), ("resnet18", 512)])
def test_mfm_gradients_reach_every_part(backbone, channels):
    model = tiny(backbone)
    rebuilder = mfm.Rebuilder(channels, embed_dim=64, grid=2, num_heads=4)  # grid = 64 / 32
    torch.manual_seed(1)
    x, pl, w = torch.rand(2, 3, 128, 128), torch.randint(0, K, (2, 128, 128)), torch.rand(2, 128, 128)
    rebuild = functools.partial(model.rebuild, rebuilder)
    loss = mfm.mfm_loss(model.decode, rebuild, model.encode(x), pl, w, loss_fn=model.seg_loss)
    loss.backward()
    for part in (model.net.backbone, model.net.head, model.attention, rebuilder):
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in part.parameters())
    assert all(p.grad is not None for p in model.attention.parameters())
    assert rebuilder.mask_token.grad.abs().sum() > 0


def test_rebuild_draws_one_mask_per_view(monkeypatch):
    model = tiny("resnet18")
    torch.manual_seed(0)
    rebuilder = mfm.Rebuilder(512, embed_dim=64, grid=2, num_heads=4)
    keeps, draw = [], rebuilder.random_masking
    monkeypatch.setattr(rebuilder, "random_masking", lambda b, d: keeps.append(draw(b, d)) or keeps[-1])
    f = torch.randn(4, 512, 8, 8)
    rebuilt, mask = model.rebuild(rebuilder, HRDAFeatures(f, f.clone(), (8, 16, 64, 64)))
    assert len(keeps) == 2 and not torch.equal(keeps[0], keeps[1])
    assert torch.equal(mask, 1 - F.interpolate(keeps[0], size=(8, 8), mode="nearest"))  # the context's mask
    assert rebuilt.box == (8, 16, 64, 64) and not torch.equal(rebuilt.context, rebuilt.detail)


def test_mic_mask_shows_in_both_views(monkeypatch):
    model = tiny()
    torch.manual_seed(1)
    x = torch.rand(2, 3, 128, 128)
    blocks = (torch.rand(2, 1, 16, 16) > 0.7).float()  # MIC block 8 at crop 128 (64 at 1024)
    masked = x * F.interpolate(blocks, scale_factor=8.0, mode="nearest")
    seen, encode = [], model.net.encode
    monkeypatch.setattr(model.net, "encode", lambda t: seen.append(t) or encode(t))
    y0, x0, h, w = model.encode(masked).box
    torch.testing.assert_close(seen[0], F.avg_pool2d(masked, 2))  # context = x0.5 bilinear = 2x2 average
    torch.testing.assert_close(seen[0], F.avg_pool2d(x, 2) * F.interpolate(blocks, scale_factor=4.0))
    detail_blocks = blocks[..., y0 // 8:(y0 + h) // 8, x0 // 8:(x0 + w) // 8]  # whole blocks: offsets % 8 == 0
    assert torch.equal(seen[1], x[..., y0:y0 + h, x0:x0 + w] * F.interpolate(detail_blocks, scale_factor=8.0))


@pytest.mark.parametrize("backbone", ["mit_b0", "resnet18"])
def test_param_groups(backbone):
    model = tiny(backbone)
    groups = model.param_groups(1e-3)
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids)) and set(ids) == {id(p) for p in model.parameters()}
    attention = {id(p) for p in model.attention.parameters()}
    for g in groups:
        if attention & {id(p) for p in g["params"]}:
            assert g["lr"] == pytest.approx(1e-2) and attention == {id(p) for p in g["params"]}


def test_rebuild_from_config():
    model = tiny(scale=0.5, detail=0.5, divisible=16)
    assert model.config == dict(num_classes=K, backbone="mit_b0", drop_path=0.1, hrda=dict(
        crop_size=128, scale=0.5, detail=0.5, divisible=16, detail_loss_weight=0.1))
    clone = hrda.build_model(**model.config)
    assert isinstance(clone, hrda.HRDA) and clone.config == model.config and clone.crop_size == (128, 128)
    assert {k: v.shape for k, v in clone.state_dict().items()} == {k: v.shape for k, v in model.state_dict().items()}
    assert (clone.feat_channels, clone.feat_stride) == ([32, 64, 160, 256], 32)
    assert type(hrda.build_model(K, "resnet18")) is models.DeepLabV2
    older = dict(model.config, hrda=dict(crop_size=128, hr_loss_weight=0.2))  # model.pt files before the renaming
    assert hrda.build_model(**older).detail_loss_weight == 0.2
