"""baselines.py: block masks (ratio, alignment, border), MIC's masked input and gradients, class-wise masked
image modeling (a class's loss ignores other classes' pixels; equals a brute-force single-class pass), the
DAFormer feature distance (numpy brute force, zero-with-graph when empty) and pseudo-label crop rows."""
import numpy as np
import pytest
import torch
from torch import nn

import baselines
import data
import models
from baselines import ClassWiseReconstructor, cmim_loss, feature_distance_loss, mic_loss, pseudo_label_crop
from conftest import Recorder


def deeplab(seed=0):
    torch.manual_seed(seed)
    return models.DeepLabV2(num_classes=19, backbone="resnet18", pretrained=None)


def striped_label(batch, size, classes=(0, 13, 10)):
    """(B, size, size): vertical stripes of the given classes, the first image's order reversed in the second."""
    stripes = torch.tensor(classes).repeat_interleave(-(-size // len(classes)))[:size]
    label = stripes.view(1, 1, size).expand(batch, size, size).clone()
    label[1::2] = label[1::2].flip(-1)
    return label


def grads_reach(*modules):
    return all(p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0
               for m in modules for p in m.parameters())


def test_random_block_mask_is_block_aligned_cut_at_border_and_has_the_ratio():
    torch.manual_seed(0)
    keep = baselines.random_block_mask(3, 50, 70, 16, 0.7, "cpu")  # 4 x 5 blocks, the last row/column partial
    assert keep.shape == (3, 1, 50, 70)
    assert set(keep.unique().tolist()) <= {0.0, 1.0}
    rows = torch.arange(50) // 16
    cols = torch.arange(70) // 16
    corner = keep[:, :, ::16, ::16]  # the value of each block at its top-left pixel
    assert torch.equal(keep, corner[:, :, rows][:, :, :, cols])
    fractions = torch.stack([1 - baselines.random_block_mask(8, 64, 64, 8, 0.7, "cpu").mean() for _ in range(200)])
    assert abs(fractions.mean().item() - 0.7) < 0.01
    assert fractions.std() > 0  # Bernoulli per block, not an exact count


def test_mic_student_sees_the_masked_image_and_learns_the_pseudo_labels():
    torch.manual_seed(0)
    x = torch.rand(2, 3, 32, 32)
    student = Recorder(stride=8)
    pl = torch.randint(0, 19, (2, 32, 32))
    loss, keep = mic_loss(student, x, pl, 0.5, block=8, ratio=0.7, augment=None, return_mask=True)
    fill = torch.tensor(models.IMAGENET_MEAN).view(1, 3, 1, 1).expand_as(x)
    assert torch.equal(student.seen[0], torch.where(keep.bool(), x, fill))
    assert 0 < keep.mean() < 1
    logits = models.upsample(student.conv(student.seen[0])[..., ::8, ::8], (32, 32))
    expected = 0.5 * torch.nn.functional.cross_entropy(logits, pl)
    assert torch.allclose(loss, expected)


def test_mic_loss_with_deeplab_is_finite_and_reaches_the_student():
    student = deeplab()
    x, pl = torch.rand(2, 3, 32, 32), torch.randint(0, 19, (2, 32, 32))
    loss = mic_loss(student, x, pl, torch.rand(2, 32, 32))  # default colour jitter + blur
    assert torch.isfinite(loss)
    loss.backward()
    assert grads_reach(student.backbone[0], student.head)


def test_cmim_loss_is_finite_and_reaches_encoder_and_head():
    student = deeplab()
    head = ClassWiseReconstructor(student.feat_channels, hidden=16)
    x, pl = torch.rand(2, 3, 32, 32), striped_label(2, 32)
    loss = cmim_loss(student, head, x, pl, 0.8, patch=8)
    assert torch.isfinite(loss) and loss > 0
    loss.backward()
    assert grads_reach(student.backbone[0], head)


def test_cmim_trains_a_from_scratch_mit_at_the_toy_size_with_a_gradient_of_the_usual_order():
    """The case that gave NaN at step 0 (`--backbone mit_b0 --aux cmim --pretrained none` on the toy): a class image
    is mostly fill, and a fill of 0 after normalisation made exactly-zero tokens whose LayerNorm gradients overflow.
    The same backward through the segmentation loss gives a norm of about 5; CMIM's must stay of that order."""
    torch.manual_seed(0)
    student = models.DAFormer(19, "mit_b0")
    head = ClassWiseReconstructor(student.feat_channels[-1], student.feat_stride)
    toy = data.build_dataset("toy-night", crop_size=64, seed=0)
    x, pl = (torch.stack(t) for t in zip(*(toy[k] for k in range(2))))  # two 64-px toy crops and their labels
    cmim_loss(student, head, x, pl, 1.0).backward()
    norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in student.parameters() if p.grad is not None]))
    assert torch.isfinite(norm) and 0 < norm < 50, norm


def test_cmim_pairs_without_a_visible_pixel_carry_no_loss_and_no_gradient(monkeypatch):
    """A class whose every pixel is masked has nothing to rebuild from: its pair is selected out of the loss, so no
    gradient reaches the encoder through it (the others' do)."""
    x, pl = torch.rand(1, 3, 32, 32), striped_label(1, 32, classes=(0, 13))  # left half 0, right half 13
    keep = torch.ones(1, 1, 32, 32)
    keep[..., 16:] = 0  # class 13 entirely masked
    keep[..., :4, :8] = 0  # class 0 partly masked: something to rebuild from what is visible
    monkeypatch.setattr(baselines, "random_block_mask", lambda *a, **k: keep)
    feats = []

    class Probe(nn.Module):  # an encoder whose output gradient we can read per pair
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 3, padding=1)

        def encode(self, images):
            feats.append(self.conv(images))
            feats[-1].retain_grad()
            return feats[-1]

        def deepest(self, f):
            return f
    student, head = Probe(), ClassWiseReconstructor(8, stride=1, hidden=8)
    loss, parts = cmim_loss(student, head, x, pl, 1.0, max_classes=2, return_parts=True)
    loss.backward()
    grad = feats[0].grad.flatten(1).abs().sum(1)  # (pairs,)
    dead = parts["cls"] == 13
    assert dead.sum() == 1 and grad[dead].item() == 0 and (grad[~dead] > 0).all()
    assert torch.allclose(loss, parts["recon"][~dead].sum() + 0.1 * parts["agg"][~dead].sum())
    assert parts["recon"][dead].item() > 0  # it had masked pixels to count, but nothing to rebuild them from


def test_masked_mean_selects_rather_than_multiplies():
    """An entry left out (an empty or unusable pair) may hold inf: 0 * inf would be NaN in the sum and its grad."""
    values = torch.tensor([1.0, 3.0, float("inf")], requires_grad=True)
    mean = baselines._masked_mean(values, torch.tensor([True, True, False]))
    mean.backward()
    assert mean.item() == 2.0 and values.grad.tolist() == [0.5, 0.5, 0.0]


def test_cmim_class_loss_ignores_other_classes_pixels_and_equals_a_single_class_pass():
    student = deeplab().eval()  # eval-mode BatchNorm: each stacked class image is processed on its own
    head = ClassWiseReconstructor(student.feat_channels, hidden=16)
    x, pl = torch.rand(2, 3, 32, 32), striped_label(2, 32)
    torch.manual_seed(1)
    _, parts = cmim_loss(student, head, x, pl, patch=8, max_classes=None, return_parts=True)
    changed = torch.where((pl == 10).unsqueeze(1), torch.rand_like(x), x)  # new pixels for sky only
    torch.manual_seed(1)
    _, parts_changed = cmim_loss(student, head, changed, pl, patch=8, max_classes=None, return_parts=True)
    assert torch.equal(parts["keep"], parts_changed["keep"]) and len(parts["cls"]) == 6
    others = parts["cls"] != 10
    for key in ("recon", "agg"):
        assert torch.allclose(parts[key][others], parts_changed[key][others], atol=1e-6)
    assert not torch.allclose(parts["recon"][~others], parts_changed["recon"][~others])

    i = 1  # brute force for one (image, class) pair, independent of the batching
    b, c = parts["sample"][i].item(), parts["cls"][i].item()
    region = (pl[b] == c).float()
    visible, masked = region * parts["keep"][b, 0], region * (1 - parts["keep"][b, 0])
    fill = (x[b] * visible).sum((1, 2)) / visible.sum()  # the class's visible mean colour (CMIM_FILL)
    image = x[b:b + 1] * visible + fill.view(1, 3, 1, 1) * (1 - visible)
    with torch.no_grad():
        rec = head(student.encode(image), (32, 32))[0]
    expected = ((rec - x[b]).abs().mean(0) * masked).sum() / masked.sum()
    assert torch.allclose(parts["recon"][i], expected, atol=1e-5)


def test_feature_distance_matches_brute_force_cells():
    torch.manual_seed(0)
    label = torch.full((2, 16, 16), 0)  # road (stuff) everywhere; feature cells are 4x4 pixels
    label[0, :4, :4] = 13  # car cell, 100%
    label[0, :4, 4:8] = 13
    label[0, 0, 4:8] = 0  # 12/16 = 75% car: counts
    label[0, 4:8, :4] = 11
    label[0, 4, :4] = 255
    label[0, 5, :1] = 0  # 11/16 person: does not count
    label[1, 8:12, 8:12] = 255  # ignored cell: no class, does not count
    f_student, f_imagenet = torch.randn(2, 8, 4, 4, requires_grad=True), torch.randn(2, 8, 4, 4)
    loss = feature_distance_loss(f_student, f_imagenet, label)
    lbl = label.numpy()
    dists = []
    for b in range(2):
        for i in range(4):
            for j in range(4):
                cell = lbl[b, 4 * i:4 * i + 4, 4 * j:4 * j + 4]
                values, counts = np.unique(cell, return_counts=True)
                top = values[counts.argmax()]
                if top in baselines.THING_CLASSES and counts.max() / 16 >= 0.75:
                    dists.append(np.linalg.norm((f_student - f_imagenet)[b, :, i, j].detach().numpy()))
    assert len(dists) == 2
    assert torch.allclose(loss, torch.tensor(np.mean(dists), dtype=torch.float32))
    loss.backward()
    assert f_student.grad.abs().sum() > 0


def test_feature_distance_is_zero_with_graph_on_stuff_and_positive_on_things():
    student = deeplab()
    imagenet = deeplab(seed=1).eval().requires_grad_(False)
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        f_imagenet = imagenet.encode(x)
    stuff = torch.randint(0, 6, (2, 32, 32))  # trainIds 0-5 and 8-10 are stuff
    loss = feature_distance_loss(student.encode(x), f_imagenet, stuff)
    assert loss.item() == 0 and loss.requires_grad
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in student.backbone.parameters() if p.grad is not None)
    thing = torch.full((2, 32, 32), 13)
    loss = feature_distance_loss(student.encode(x), f_imagenet, thing)
    assert loss > 0
    loss.backward()
    assert grads_reach(student.backbone[0])


@pytest.mark.parametrize("height, top, bottom", [(512, 15, 120), (64, 2, 15)])
def test_pseudo_label_crop_zeroes_exactly_the_top_and_bottom_rows(height, top, bottom):
    pl = torch.zeros(2, height, 5, dtype=torch.long)
    for weight in (torch.tensor(0.9), torch.rand(2, height, 5) + 0.1):
        w = pseudo_label_crop(weight, pl)
        assert w.shape == (2, height, 5)
        zero_rows = (w == 0).all(2).all(0).nonzero().flatten().tolist()
        assert zero_rows == list(range(top)) + list(range(height - bottom, height))
        inside = slice(top, height - bottom)
        assert torch.equal(w[:, inside], weight.expand(2, height, 5)[:, inside])


def test_mask_image_fills_the_imagenet_mean():
    x, keep = torch.rand(1, 3, 4, 4), torch.zeros(1, 1, 4, 4)
    normalised = (baselines.mask_image(x, keep) - torch.tensor(models.IMAGENET_MEAN).view(1, 3, 1, 1))
    assert torch.allclose(normalised, torch.zeros_like(x))  # 0 after normalisation, as MIC
