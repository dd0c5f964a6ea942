"""train.py's algorithm pieces against independent oracles (METHOD.md §3-4): the EMA teacher (alpha schedule,
BN buffers left alone), pseudo-labels (upsample logits, then softmax), the MFM branch of train_step (plain target
crop, the mixed loss's confidence weight), the paper's defaults, and that the flags reach the objects."""
import copy

import numpy as np
import pytest
import torch
from torch import nn

import models
import train
from mfm import Rebuilder, mfm_loss

TINY = ["--source", "toy-day", "--target", "toy-night", "--device", "cpu", "--backbone", "resnet18",
        "--pretrained", "none", "--crop-size", "32", "--mfm-dim", "64", "--mfm-heads", "4", "--mfm-grid", "4"]


# ----------------------------------------------------------------------------- EMA teacher
def bn_net():
    return nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4))


@pytest.mark.parametrize("alpha, schedule", [
    (0.99, [(0, 0.0), (1, 0.5), (3, 0.75), (9, 0.9), (99, 0.99), (5000, 0.99)]),
    (0.999, [(1, 0.5), (9, 0.9), (999, 0.999), (10**6, 0.999)])])
def test_ema_alpha_schedule(alpha, schedule):
    """alpha_t = min(1 - 1/(t+1), alpha), worked out by hand: teacher <- a*teacher + (1-a)*student."""
    torch.manual_seed(0)
    student, teacher = bn_net(), bn_net()
    for step, a in schedule:
        with torch.no_grad():
            for p in student.parameters():
                p.copy_(torch.randn_like(p))
        before = [p.clone() for p in teacher.parameters()]
        train.ema_update(teacher, student, step, alpha)
        for t, t0, s in zip(teacher.parameters(), before, student.parameters()):
            assert torch.allclose(t, a * t0 + (1 - a) * s, rtol=1e-5, atol=1e-6), (step, a)


def test_ema_leaves_batchnorm_buffers_alone():
    torch.manual_seed(0)
    student = bn_net()
    teacher = copy.deepcopy(student)
    student.train()(torch.randn(4, 3, 5, 5) * 3 + 2)  # moves the student's running statistics
    buffers = {k: v.clone() for k, v in teacher.named_buffers()}
    train.ema_update(teacher, student, step=5, alpha=0.99)
    for name, value in teacher.named_buffers():
        assert torch.equal(value, buffers[name]), name
    assert not torch.allclose(student[1].running_mean, teacher[1].running_mean)
    assert not torch.allclose(student[1].running_var, teacher[1].running_var)


# ----------------------------------------------------------------------------- pseudo-labels
def bilinear(a, size):
    """(K, h, w) -> (K, size, size), align_corners=False, written out: source coordinate (i + 0.5) h/size - 0.5,
    clamped at 0, between two neighbours (the last one repeated at the border)."""
    def taps(n_in):
        src = np.maximum((np.arange(size) + 0.5) * n_in / size - 0.5, 0)
        i0 = np.floor(src).astype(int)
        return i0, np.minimum(i0 + 1, n_in - 1), src - i0
    y0, y1, ly = taps(a.shape[1])
    x0, x1, lx = taps(a.shape[2])
    rows = a[:, y0] * (1 - ly[:, None]) + a[:, y1] * ly[:, None]
    return rows[:, :, x0] * (1 - lx) + rows[:, :, x1] * lx


def softmax(a):
    e = np.exp(a - a.max(0))
    return e / e.sum(0)


def test_pseudo_labels_upsample_logits_then_softmax():
    logits = np.array([[[6.0, 0.0], [0.0, 2.0]], [[0.0, 5.0], [1.0, 0.0]], [[0.0, 0.0], [3.0, 0.0]]])  # (3, 2, 2)

    class Teacher(nn.Module):
        def forward(self, x):
            return torch.tensor(logits, dtype=torch.float32)[None].expand(len(x), -1, -1, -1)

    threshold = 0.9
    prob = softmax(bilinear(logits, 8))
    expected_q = (prob.max(0) >= threshold).mean()
    other_q = (bilinear(softmax(logits), 8).max(0) >= threshold).mean()  # the wrong order, softmax first
    assert expected_q != pytest.approx(other_q, abs=0.05)  # these logits tell the two orders apart
    label, q = train.pseudo_label(Teacher(), torch.zeros(2, 3, 8, 8), threshold)
    assert label.shape == (2, 8, 8) and label.dtype == torch.int64
    assert (label == torch.from_numpy(prob.argmax(0))).all()
    assert q.item() == pytest.approx(expected_q, abs=1e-6)


# ----------------------------------------------------------------------------- the MFM branch of train_step
def tiny_run(*extra):
    torch.manual_seed(0)
    args = train.parse_args([*TINY, *extra])
    return args, train.build_run(args, 19)


def tiny_batch():
    g = torch.Generator().manual_seed(1)
    y_src = torch.randint(0, 4, (2, 4, 4), generator=g).repeat_interleave(8, 1).repeat_interleave(8, 2)
    return torch.rand(2, 3, 32, 32, generator=g), y_src, torch.rand(2, 3, 32, 32, generator=g)


def test_mfm_runs_on_the_plain_target_crop_with_the_mixed_confidence_weight(monkeypatch):
    args, run = tiny_run()
    x_src, y_src, x_tgt = tiny_batch()
    student, teacher = run.student, run.teacher
    with torch.no_grad():  # before the step: the weights train_step uses (BatchNorm in train mode, batch stats)
        feats_tgt = student.encode(x_tgt)
        confidence = torch.softmax(models.upsample(teacher(x_tgt), (32, 32)), 1).max(1)[0]
    args.pseudo_threshold = confidence.median().item()  # so that 0 < q < 1: weight 1.0 would show
    label_tgt, q = train.pseudo_label(teacher, x_tgt, args.pseudo_threshold)
    assert 0 < q < 1

    calls, real_mfm, real_mix = {}, train.mfm_loss, train.mix_loss

    def mfm_spy(decoder, rebuilder, feats, pseudo_label, weight, **kw):
        calls["mfm"] = dict(decoder=decoder, rebuilder=rebuilder, feats=feats.detach().clone(),
                            pseudo_label=pseudo_label.clone(), weight=weight)
        return real_mfm(decoder, rebuilder, feats, pseudo_label, weight, **kw)

    def mix_spy(student_, x_mix, y_mix, w_mix):
        calls["w_mix"] = w_mix.clone()
        return real_mix(student_, x_mix, y_mix, w_mix)

    monkeypatch.setattr(train, "mfm_loss", mfm_spy)
    monkeypatch.setattr(train, "mix_loss", mix_spy)
    values, _ = train.train_step(run, x_src, y_src, x_tgt.clone(), 0, args)
    got = calls["mfm"]
    assert got["decoder"] == student.decode  # the network applies the run's Rebuilder (HRDA: to each view)
    assert got["rebuilder"].func == student.rebuild and got["rebuilder"].args == (run.heads["rebuilder"],)
    assert torch.allclose(got["feats"], feats_tgt, atol=1e-6)  # E(x_tgt), not E(x_mix)
    assert torch.equal(got["pseudo_label"], label_tgt)
    assert torch.as_tensor(got["weight"]).item() == pytest.approx(q.item())
    w_mix = calls["w_mix"]
    assert (w_mix == 1).any() and (w_mix != 1).any()
    assert torch.allclose(w_mix[w_mix != 1], torch.as_tensor(got["weight"]))  # the same weight as the mixed loss
    assert values["confidence"] == pytest.approx(q.item()) and np.isfinite(values["loss_mfm"])


def test_an_auxiliary_is_one_table_entry(monkeypatch):
    """A new entry in train.AUXILIARIES (its loss function and head) gets --aux NAME and --lambda-NAME, its head in
    the optimizer (at --lr-rebuilder) and in ckpt.pt, and its weighted loss in the step; nothing else changes."""
    seen = []

    def branch(m, x_tgt, pl, weight, args, src):
        seen.append((x_tgt.shape, pl.shape))
        return m.heads["probe"](x_tgt).square().mean(), dict(probe_map=x_tgt[:, :1])
    probe = train.Auxiliary(branch, "probe", head="probe", build=lambda student, args: nn.Conv2d(3, 1, 1))
    monkeypatch.setitem(train.AUXILIARIES, "probe", probe)
    args, run = tiny_run("--aux", "mfm,probe", "--lambda-probe", "0.25", "--lr-rebuilder", "0.5")
    assert set(run.heads) == {"rebuilder", "probe"} and args.lambda_probe == 0.25
    group = next(g for g in run.optimizer.param_groups if g["name"] == "probe")
    assert group["lr"] == 0.5 and group["params"] == list(run.heads["probe"].parameters())
    before = run.heads["probe"].weight.detach().clone()
    values, maps = train.train_step(run, *tiny_batch(), 0, args)
    assert seen == [((2, 3, 32, 32), (2, 32, 32))] and "probe_map" in maps and "mfm_mask" in maps
    assert {"loss_mfm", "loss_probe"} <= set(values) and not torch.equal(before, run.heads["probe"].weight)
    assert train.leaves_parameters_unused(args) is True  # MFM's Rebuilder sits out the last backward


# ----------------------------------------------------------------------------- defaults and flags
def test_defaults_are_the_papers():
    """METHOD.md §3-4, copied from the document: DACS + MFM on GTA -> Cityscapes."""
    args = train.parse_args(["--source", "gta", "--target", "cityscapes", "--device", "cpu"])
    paper = dict(lr=6e-5, pseudo_threshold=0.968, ema=0.99, weight_decay=0.01, mask_ratio=0.4, lr_rebuilder=2e-4,
                 lambda_mfm=1.0, iters=40_000, warmup=1500, crop_size=512, batch_size=2, mfm_grid=16, mfm_dim=512,
                 mfm_depth=2, mfm_heads=16)
    assert {k: getattr(args, k) for k in paper} == paper
    assert args.mode == "dacs+mfm"


def test_flags_reach_the_rebuilder_and_the_optimizer():
    args, run = tiny_run("--mask-ratio", "0.3", "--mfm-grid", "8", "--mfm-depth", "3", "--lr", "1e-4",
                         "--lr-rebuilder", "3e-4", "--iters", "20", "--warmup", "10")
    rebuilder = run.heads["rebuilder"]
    assert rebuilder.mask_ratio == 0.3 and rebuilder.grid == 8
    assert rebuilder.embed.out_features == 64 and len(rebuilder.blocks) == 3 and rebuilder.blocks[0].num_heads == 4
    groups = {g["name"]: g for g in run.optimizer.param_groups}
    base = dict(backbone=1e-4, head=1e-3, rebuilder=3e-4)  # backbone lr, head 10x, Rebuilder its own
    assert {k: pytest.approx(g["base_lr"]) for k, g in groups.items()} == base
    assert all(g["weight_decay"] == 0.01 for g in groups.values())
    ids = {k: {id(p) for p in g["params"]} for k, g in groups.items()}
    assert ids["rebuilder"] == {id(p) for p in rebuilder.parameters()}
    assert ids["head"] == {id(p) for p in run.student.head.parameters()}

    step = 4
    factor = (1 - step / 20) * (1 - (1 - step / 10) * (1 - 1e-6))  # poly decay x mmcv linear warm-up from 1e-6
    assert train.lr_factor(step, args) == pytest.approx(factor)
    train.train_step(run, *tiny_batch(), step, args)
    for name, g in groups.items():
        assert g["lr"] == pytest.approx(base[name] * factor), name


def test_mfm_gradients_reach_every_mit_stage_and_the_daformer_head():
    """Multi-level MFM on MiT-B0 + DAFormer head: the loss reaches all four encoder stages, the whole head and
    every Rebuilder parameter."""
    torch.manual_seed(0)
    net = models.build_model(19, "mit_b0")
    rebuilder = Rebuilder(net.feat_channels, embed_dim=32, grid=2, num_heads=4)
    keep = torch.tensor([[1.0, 0.0], [0.0, 1.0]]).expand(2, 1, 2, 2)  # visible and masked cells in both images
    rebuilder.random_masking = lambda batch, device: keep  # (a random 2x2 draw may mask all or nothing)
    label = torch.randint(0, 19, (2, 64, 64))
    mfm_loss(net.decode, rebuilder, net.encode(torch.rand(2, 3, 64, 64)), label, 0.5).backward()

    def reached(module):
        return all(p.grad is not None and p.grad.abs().sum() > 0 for p in module.parameters())
    for i in range(1, 5):
        assert reached(getattr(net.backbone, f"patch_embed{i}")) and reached(getattr(net.backbone, f"block{i}")), i
    assert reached(net.head) and reached(rebuilder)
