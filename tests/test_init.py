"""Where training starts, and what the teacher and --pl-crop do, pinned by behaviour that a wrong version changes:
- the heads trained from scratch are initialised as the official code bases do (mmcv/mmseg; METHOD.md §2, §7);
- the teacher makes pseudo-labels with DropPath/Dropout off (DAFormer), while the student keeps them on;
- --pl-crop (DAFormer's pseudo-label crop) reaches the weights of the mixed and MFM losses."""
import inspect

import pytest
import torch
import torchvision
from torch import nn

import models
import train


def assert_std(t, expected, rel=0.05):
    assert t.float().std().item() == pytest.approx(expected, rel=rel)
    assert t.float().mean().abs() < 4 * expected / t.numel() ** 0.5  # zero mean, within 4 standard errors


# ----------------------------------------------------------------------------- initialisation
def test_init_decode_head_is_mmcv_kaiming_fan_out_not_divided_by_groups():
    head = nn.Sequential(nn.Conv2d(16, 1024, 1), nn.Conv2d(1024, 1024, 3, groups=1024, bias=False),
                         nn.BatchNorm2d(1024), nn.Linear(64, 64))
    with torch.no_grad():
        head[2].weight.fill_(3.0)
        head[2].bias.fill_(3.0)
    linear = head[3].weight.clone()
    models.init_decode_head(head)
    assert_std(head[0].weight, (2 / 1024) ** 0.5)
    assert (head[0].bias == 0).all()
    assert_std(head[1].weight, (2 / (1024 * 9)) ** 0.5)  # 0.0147: mmcv's ConvModule, not 0.47 (/groups)
    assert (head[2].weight == 1).all() and (head[2].bias == 0).all()
    assert torch.equal(head[3].weight, linear)  # Linear keeps PyTorch's default


def test_daformer_head_init_is_mmseg_daformers():
    """Convs of the fusion and bottleneck: Kaiming normal fan_out = C_out*k*k (depthwise 3x3: 0.0147); BN 1/0;
    embeddings PyTorch's default Linear (uniform +-1/sqrt(C_in), bias too); classifier N(0, 0.01), bias 0."""
    torch.manual_seed(0)
    head = models.DAFormerHead([64, 128, 320, 512], 19)
    for m in head.modules():
        if isinstance(m, nn.Conv2d) and m is not head.classifier:
            assert_std(m.weight, (2 / (m.out_channels * m.kernel_size[0] * m.kernel_size[1])) ** 0.5)
        if isinstance(m, nn.BatchNorm2d):
            assert (m.weight == 1).all() and (m.bias == 0).all()
    depthwise = [m for m in head.modules() if isinstance(m, nn.Conv2d) and m.groups > 1]
    assert len(depthwise) == 3 and all(m.weight.std() < 0.02 for m in depthwise)
    for embed, c in zip(head.embed, [64, 128, 320, 512]):
        bound = c ** -0.5
        assert embed.weight.abs().max() <= bound and embed.bias.abs().max() <= bound
        assert_std(embed.weight, bound / 3 ** 0.5, rel=0.1)
        assert embed.bias.std() > bound / 4  # not zero: PyTorch's default bias
    assert_std(head.classifier.weight, 0.01, rel=0.1)
    assert (head.classifier.bias == 0).all()


def test_deeplabv2_classifier_is_normal_001_with_zero_bias():
    head = models.ASPPClassifier(512, 19, (6, 12, 18, 24))
    for conv in head.convs:
        assert_std(conv.weight, 0.01)
        assert (conv.bias == 0).all()  # mmseg's DLV2 head


@pytest.mark.parametrize("pretrained", [None, "none"])
def test_v1c_from_scratch_zero_inits_each_blocks_last_bn(pretrained):
    """mmseg's ResNetV1c (zero_init_residual): every bottleneck starts as the identity; the other BNs are 1/0."""
    model = models.DeepLabV2(19, "resnet101-v1c", pretrained=pretrained)
    blocks = [m for m in model.backbone.modules() if isinstance(m, torchvision.models.resnet.Bottleneck)]
    assert len(blocks) == 3 + 4 + 23 + 3
    for block in blocks:
        assert (block.bn3.weight == 0).all() and (block.bn3.bias == 0).all()
        assert (block.bn1.weight == 1).all() and (block.bn2.weight == 1).all()


def test_torchvision_resnets_keep_torchvisions_init():
    model = models.DeepLabV2(19, "resnet50")
    bn3 = [m.bn3 for m in model.backbone.modules() if isinstance(m, torchvision.models.resnet.Bottleneck)]
    assert len(bn3) == 16 and all((bn.weight == 1).all() for bn in bn3)


def test_v1c_with_weights_takes_them_as_they_are(tmp_path):
    """The zero-init is for training from scratch only: a weights file's last BNs load unchanged."""
    state = {k: torch.full_like(v, 0.5) if v.is_floating_point() else v
             for k, v in models.DeepLabV2(19, "resnet101-v1c").backbone.state_dict().items()}
    torch.save(dict(state_dict=state), tmp_path / "v1c.pth")
    model = models.DeepLabV2(19, "resnet101-v1c", pretrained=tmp_path / "v1c.pth")
    assert (model.backbone.layer1[0].bn3.weight == 0.5).all()


# ----------------------------------------------------------------------------- teacher and --pl-crop (train.py)
def tiny_run(*extra):
    torch.manual_seed(0)
    args = train.parse_args(["--source", "toy-day", "--target", "toy-night", "--backbone", "mit_b0",
                             "--pretrained", "none", "--crop-size", "64", "--device", "cpu", *extra])
    return args, train.build_run(args, 19)


def test_teacher_pseudo_labels_without_droppath_or_dropout():
    """MiT-B0 has DropPath and the DAFormer head Dropout2d: two pseudo-label passes of the teacher on one input
    are identical (BatchNorm in train mode uses the batch's statistics, the same both times), while two forward
    passes of the student differ."""
    args, run = tiny_run()
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        assert not torch.equal(run.student(x), run.student(x))  # the stochastic layers are there
        assert torch.equal(run.teacher(x), run.teacher(x))
    label_1, q_1 = train.pseudo_label(run.teacher, x, 0.2)
    label_2, q_2 = train.pseudo_label(run.teacher, x, 0.2)
    assert torch.equal(label_1, label_2) and torch.equal(q_1, q_2)


def recorder(fn, calls, key):
    """fn, recording the confidence weight it receives (the argument named w_mix or weight) under calls[key]."""
    signature = inspect.signature(fn)

    def wrapped(*args, **kwargs):
        bound = signature.bind(*args, **kwargs).arguments
        calls[key] = torch.as_tensor(bound.get("w_mix", bound.get("weight"))).detach().clone()
        return fn(*args, **kwargs)
    return wrapped


@pytest.mark.parametrize("pl_crop", [True, False])
def test_pl_crop_reaches_the_mixed_and_mfm_weights(pl_crop, monkeypatch):
    """Threshold 0 makes q = 1, so the only zeros in the weights are DAFormer's cropped rows (top 15 and bottom
    120 of 512, scaled to the crop: 2 and 15 of 64). MFM's weight is exactly that row mask; the mixed image's
    is 0 on the target pixels of those rows and 1 everywhere else."""
    args, run = tiny_run("--pseudo-threshold", "0", *(["--pl-crop"] if pl_crop else []))
    calls = {}
    monkeypatch.setattr(train, "mix_loss", recorder(train.mix_loss, calls, "mix"))
    monkeypatch.setattr(train, "mfm_loss", recorder(train.mfm_loss, calls, "mfm"))
    g = torch.Generator().manual_seed(1)
    y_src = torch.randint(0, 19, (2, 8, 8), generator=g).repeat_interleave(8, 1).repeat_interleave(8, 2)
    train.train_step(run, torch.rand(2, 3, 64, 64, generator=g), y_src, torch.rand(2, 3, 64, 64, generator=g), 0,
                     args)
    rows = torch.ones(64)
    if pl_crop:
        rows[:round(15 * 64 / 512)] = 0
        rows[64 - round(120 * 64 / 512):] = 0
    kept = rows.view(1, 64, 1).expand(2, 64, 64)
    assert torch.equal(calls["mfm"].expand(2, 64, 64), kept)
    w_mix = calls["mix"]
    assert w_mix.shape == (2, 64, 64) and torch.equal(w_mix[kept == 1], torch.ones_like(w_mix[kept == 1]))
    cropped = w_mix[kept == 0]
    assert (cropped == 0).any() if pl_crop else cropped.numel() == 0
    assert ((cropped == 0) | (cropped == 1)).all()  # 1: source pixels pasted by ClassMix
