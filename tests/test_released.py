"""The released checkpoints of DAFormer, HRDA and MIC (mmseg 0.16 `latest.pth` files) in eval.py and train.py: the
rename table against the official module names written out here from the official code (every key and shape of the
full-size networks, on the meta device), checkpoints laid out as the anchors publish them (built from our networks:
student under model., teacher under ema_model., ImageNet copy under imnet_model., with meta and optimizer state)
evaluating with identical logits, fine-tuning starting from them, and a clear error for each file that does not fit.

    python -m pytest tests/test_released.py -q
"""
import json
import math
import re

import pytest
import torch
import torchvision

import data
import eval as evaluation
import hrda
import models
import train
from test_snippets import readme_blocks

HEADS, K = 256, 19  # DAFormer's embedding / fusion width; Cityscapes classes
B5 = (64, 128, 320, 512)
BUFFERS = ("running_mean", "running_var", "num_batches_tracked")


# ------------------------------------------------------------------ the official names, from the official code
def bn(p, c):
    return {**{f"{p}.{n}": (c,) for n in ("weight", "bias", "running_mean", "running_var")},
            f"{p}.num_batches_tracked": ()}


def ln(p, c):
    return {f"{p}.weight": (c,), f"{p}.bias": (c,)}


def linear(p, cin, cout):
    return {f"{p}.weight": (cout, cin), f"{p}.bias": (cout,)}


def official_mit(widths, depths):
    """mmseg's MixVisionTransformer (DAFormer@438603d1:mmseg/models/backbones/mix_transformer.py): OverlapPatchEmbed
    proj (7x7, then 3x3) + norm, Blocks (norm1, attn.q/kv/proj, attn.sr/norm where sr > 1, norm2, mlp.fc1/dwconv/fc2),
    a norm per stage; no classification head."""
    keys, cin = {}, 3
    for i, (c, depth, sr) in enumerate(zip(widths, depths, (8, 4, 2, 1)), start=1):
        k = 7 if i == 1 else 3
        keys |= {f"backbone.patch_embed{i}.proj.weight": (c, cin, k, k), f"backbone.patch_embed{i}.proj.bias": (c,)}
        keys |= ln(f"backbone.patch_embed{i}.norm", c) | ln(f"backbone.norm{i}", c)
        for j in range(depth):
            b = f"backbone.block{i}.{j}"
            keys |= ln(f"{b}.norm1", c) | linear(f"{b}.attn.q", c, c) | linear(f"{b}.attn.kv", c, 2 * c)
            keys |= linear(f"{b}.attn.proj", c, c) | ln(f"{b}.norm2", c) | linear(f"{b}.mlp.fc1", c, 4 * c)
            keys |= {f"{b}.mlp.dwconv.dwconv.weight": (4 * c, 1, 3, 3), f"{b}.mlp.dwconv.dwconv.bias": (4 * c,)}
            keys |= linear(f"{b}.mlp.fc2", 4 * c, c)
            if sr > 1:
                keys |= {f"{b}.attn.sr.weight": (c, c, sr, sr), f"{b}.attn.sr.bias": (c,)} | ln(f"{b}.attn.norm", c)
        cin = c
    return keys


def official_daformer_head(p, widths):
    """DAFormerHead with the separable ASPP fusion (daformer_head.py:139-151, ASPPWrapper :47-60; the config
    daformer_sepaspp_mitb5.py: dilations (1, 6, 12, 18), no pooling): mmcv ConvModules (conv + bn, no conv bias)."""
    cat, a = HEADS * len(widths), f"{p}.fuse_layer.aspp_modules"
    keys = {k: s for i, c in enumerate(widths) for k, s in linear(f"{p}.embed_layers.{i}.proj", c, HEADS).items()}
    keys |= {f"{a}.0.conv.weight": (HEADS, cat, 1, 1)} | bn(f"{a}.0.bn", HEADS)
    for i in (1, 2, 3):
        keys |= {f"{a}.{i}.depthwise_conv.conv.weight": (cat, 1, 3, 3)} | bn(f"{a}.{i}.depthwise_conv.bn", cat)
        keys |= {f"{a}.{i}.pointwise_conv.conv.weight": (HEADS, cat, 1, 1)} | bn(f"{a}.{i}.pointwise_conv.bn", HEADS)
    keys |= {f"{p}.fuse_layer.bottleneck.conv.weight": (HEADS, 4 * HEADS, 3, 3)}
    keys |= bn(f"{p}.fuse_layer.bottleneck.bn", HEADS)
    return keys | {f"{p}.conv_seg.weight": (K, HEADS, 1, 1), f"{p}.conv_seg.bias": (K,)}


def official_resnet_v1c(blocks=(3, 4, 23, 3)):
    """mmseg's ResNetV1c (DAFormer@438603d1:mmseg/models/backbones/resnet.py): deep stem Sequential (conv, BN, ReLU)
    x3 (32, 32, 64 channels), Bottlenecks conv1-3/bn1-3, downsample (conv, BN) in each layer's first block."""
    keys = {}
    for i, (cin, cout) in zip((0, 3, 6), ((3, 32), (32, 32), (32, 64))):
        keys |= {f"backbone.stem.{i}.weight": (cout, cin, 3, 3)} | bn(f"backbone.stem.{i + 1}", cout)
    inplanes = 64
    for i, n in enumerate(blocks, start=1):
        planes = 64 * 2 ** (i - 1)
        for j in range(n):
            b = f"backbone.layer{i}.{j}"
            keys |= {f"{b}.conv1.weight": (planes, inplanes, 1, 1), f"{b}.conv2.weight": (planes, planes, 3, 3),
                     f"{b}.conv3.weight": (4 * planes, planes, 1, 1)}
            keys |= bn(f"{b}.bn1", planes) | bn(f"{b}.bn2", planes) | bn(f"{b}.bn3", 4 * planes)
            if j == 0:
                keys |= {f"{b}.downsample.0.weight": (4 * planes, inplanes, 1, 1)} | bn(f"{b}.downsample.1", 4 * planes)
            inplanes = 4 * planes
    return keys


def official_dlv2(p, cin=2048, n=2):
    """DLV2Head: no conv_seg; ASPPModule of ConvModules without norm (a conv with bias) (dlv2_head.py:17-26)."""
    return {k: s for i in range(n) for k, s in {f"{p}.aspp_modules.{i}.conv.weight": (K, cin, 3, 3),
                                                 f"{p}.aspp_modules.{i}.conv.bias": (K,)}.items()}


def official_hrda_attention(p, widths):
    """HRDAHead's scale_attention for a DAFormerHead: embed 256, fusion one 1x1 ConvModule (hrda_head.py:44-56)."""
    keys = {k: s for i, c in enumerate(widths) for k, s in linear(f"{p}.embed_layers.{i}.proj", c, HEADS).items()}
    keys |= {f"{p}.fuse_layer.conv.weight": (HEADS, HEADS * len(widths), 1, 1)} | bn(f"{p}.fuse_layer.bn", HEADS)
    return keys | {f"{p}.conv_seg.weight": (K, HEADS, 1, 1), f"{p}.conv_seg.bias": (K,)}


def params(keys):
    return sum(math.prod(shape) for k, shape in keys.items() if not k.endswith(BUFFERS))


MIT_B5 = official_mit(B5, (3, 6, 40, 3))
V1C_101 = official_resnet_v1c()
FULL_SIZE = {  # config -> (official keys and shapes, parameters: METHOD.md §2 and §7, HRDA.md §1.3)
    "mit_b5": (dict(backbone="mit_b5"), MIT_B5 | official_daformer_head("decode_head", B5), 85_155_283),
    "resnet101-v1c": (dict(backbone="resnet101-v1c"), V1C_101 | official_dlv2("decode_head"), 43_219_846),
    "mit_b5 HRDA": (dict(backbone="mit_b5", hrda=dict(crop_size=1024)), MIT_B5 | official_daformer_head(
        "decode_head.head", B5) | official_hrda_attention("decode_head.scale_attention", B5), 85_155_283 + 530_707),
    "resnet101-v1c HRDA": (dict(backbone="resnet101-v1c", hrda=dict(crop_size=1024)), V1C_101 | official_dlv2(
        "decode_head.head") | official_dlv2("decode_head.scale_attention"), 43_219_846 + 700_454)}


@pytest.mark.parametrize("name", FULL_SIZE)
def test_full_size_networks_map_one_to_one_onto_the_official_names(name):
    config, official, count = FULL_SIZE[name]
    with torch.device("meta"):
        model = hrda.build_model(K, **config)
    names = model.mmseg_names()
    ours = {names[k]: tuple(v.shape) for k, v in model.state_dict().items()}
    assert len(ours) == len(names) == len(official)  # 1:1, no two of our keys on one official name
    assert sorted(set(official) - set(ours)) == [] and sorted(set(ours) - set(official)) == []
    assert ours == official  # every shape
    assert params(official) == count
    if "mit_b5" in name:
        assert len([k for k in official if k.startswith("backbone.")]) == 1052  # the mit_b5.pth tensors
    state = {k: torch.empty(s, device="meta") for k, s in official.items()}
    assert models.mmseg_config(state, "f") == dict(config, num_classes=K, **(
        {} if "mit" in name else dict(aspp_dilations=(6, 12))))  # read back from the keys and shapes alone


def test_spot_checks_of_the_rename_table():
    with torch.device("meta"):
        names = {**models.DAFormer(K, "mit_b0").mmseg_names(), **models.DeepLabV2(K, "resnet18").mmseg_names()}
    aspp = "decode_head.fuse_layer.aspp_modules"
    assert names["head.fusion.2.1.1.running_var"] == f"{aspp}.2.pointwise_conv.bn.running_var"
    assert names["head.fusion.3.0.0.weight"] == f"{aspp}.3.depthwise_conv.conv.weight"
    assert names["head.fusion.0.1.num_batches_tracked"] == f"{aspp}.0.bn.num_batches_tracked"
    assert names["head.embed.3.bias"] == "decode_head.embed_layers.3.proj.bias"
    assert names["backbone.5.0.downsample.1.weight"] == "backbone.layer2.0.downsample.1.weight"  # torchvision layout
    assert names["backbone.0.weight"] == "backbone.conv1.weight" and names["backbone.1.bias"] == "backbone.bn1.bias"


# ------------------------------------------------------------------ checkpoints laid out as the anchors publish them
def network(config, seed):
    """One of our networks with random weights and BatchNorm statistics (so that the buffers matter), eval mode."""
    torch.manual_seed(seed)
    model = hrda.build_model(K, **config)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.normal_()
            m.running_var.uniform_(0.5, 2.0)
            m.num_batches_tracked.fill_(40_000)
    return model.eval()


def write_released(path, student, teacher=None, imagenet=None, trained_on="GTADataset"):
    """An mmseg 0.16 UDA checkpoint as DAFormer/HRDA/MIC publish it (mmcv's save_checkpoint of the DACS wrapper)."""
    state = {}
    for prefix, net in (("model.", student), ("ema_model.", teacher), ("imnet_model.", imagenet)):
        if net is not None:
            names = net.mmseg_names()
            state |= {prefix + names[k]: v.clone() for k, v in net.state_dict().items()}
    meta = dict(mmseg_version="0.16.0+abc1234", config=f"data = dict(train=dict(source=dict(type='{trained_on}')))",
                CLASSES=data.CLASS_NAMES, PALETTE=[[128, 64, 128]] * K, env_info="sys.platform: linux", seed=0,
                exp_name="gtaHR2csHR_hrda_246ef", iter=40_000, epoch=1, mmcv_version="1.3.7", time="Tue Feb 15")
    optimizer = dict(state={0: dict(step=40_000, exp_avg=torch.zeros(3), exp_avg_sq=torch.zeros(3))},
                     param_groups=[dict(lr=0.0, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01, amsgrad=False,
                                        initial_lr=6e-5, params=[0])])
    torch.save(dict(meta=meta, state_dict=state, optimizer=optimizer), path)
    return path


CONFIGS = {"mit_b0": dict(backbone="mit_b0"), "mit_b0 HRDA": dict(backbone="mit_b0", hrda=dict(crop_size=1024)),
           "resnet18": dict(backbone="resnet18"), "resnet18 HRDA": dict(backbone="resnet18", hrda=dict(crop_size=1024))}


@pytest.mark.parametrize("name", CONFIGS)
def test_a_released_checkpoint_evaluates_with_identical_logits(tmp_path, name):
    student, teacher, imagenet = (network(CONFIGS[name], seed) for seed in (1, 2, 3))
    path = write_released(tmp_path / "latest.pth", student, teacher, imagenet)
    x = torch.rand(1, 3, 64, 96)
    for part, expected in (("student", student), ("teacher", teacher)):
        model, ckpt = evaluation.model_from_checkpoint(path, part=part)
        assert type(model) is type(student) and not model.training
        assert model.config == student.config  # read from the keys and shapes
        with torch.no_grad():
            assert torch.equal(model(x), expected(x))
        assert ckpt["config"]["resize_scale"] == (2.0 if "HRDA" in name else 1.0) and ckpt["config"]["source"] is None
        assert f"the {part} (" in ckpt["released"]
    frozen = models.imagenet_copy(student, path)  # the FD network of a run started from the file: its imnet_model
    with torch.no_grad():
        assert torch.equal(frozen(x), imagenet(x)) and not frozen.training
    assert not any(p.requires_grad for p in frozen.parameters())


def test_eval_py_scores_a_released_checkpoint_as_the_anchors_test(fake_data, tmp_path, monkeypatch, capsys):
    """eval.py on a released DAFormer and an HRDA checkpoint: HRDA at twice the resolution (the anchors' tests:
    DAFormer's whole image 1024x512, HRDA's windows over 2048x1024; scaled down here), the student by default."""
    monkeypatch.setitem(data.RESIZE, "cityscapes", (128, 64))
    sizes = []
    build = data.build_dataset
    monkeypatch.setattr(data, "build_dataset", lambda *a, **kw: sizes.append(kw["resize"]) or build(*a, **kw))
    for name, size in (("mit_b0", (128, 64)), ("mit_b0 HRDA", (256, 128))):
        student, teacher = network(CONFIGS[name], 1), network(CONFIGS[name], 2)
        path = write_released(tmp_path / f"{name}.pth", student, teacher, trained_on="SynthiaDataset")
        evaluation.main(["--ckpt", str(path), "--target", "cityscapes", "--data-root", str(fake_data), "--workers",
                         "0", "--device", "cpu", "--out", str(tmp_path / name)])
        result = json.loads((tmp_path / name / "metrics.json").read_text())
        assert sizes[-1] == size and "mIoU16" in result  # SYNTHIA, read from the training config in meta
        expected = evaluation.evaluate(student, data.build_dataset("cityscapes", fake_data, "val", train=False,
                                                                   resize=size), source="synthia", progress=False)
        assert result["mIoU"] == expected["mIoU"] and result["iou"] == evaluation.json_safe(expected)["iou"]
    out = capsys.readouterr().out
    assert "mit_b0.pth: the student (model.*) of a released checkpoint, mit_b0 + DAFormer head, 19 classes; scored " \
        "as the anchors test: whole image at 1x the DAFormer size, trained on SYNTHIA (meta)" in out
    assert f"{path}: the student (model.*) of a released checkpoint, mit_b0 + DAFormer head, 19 classes, HRDA; " \
        "scored as the anchors test: HRDA's sliding windows (1024, stride 512) over the image at 2x the DAFormer " \
        "size, trained on SYNTHIA (meta)" in out


def test_fine_tuning_starts_from_a_released_checkpoint(fake_data, tmp_path):
    """train.py --pretrained latest.pth: the student starts as the file's student (HRDA's attention head included),
    the teacher as its copy, the feature distance's frozen network as the file's imnet_model; two steps run."""
    small = ["--source", "gta", "--target", "cityscapes", "--backbone", "mit_b0", "--resize-scale", "0.125",
             "--crop-size", "64", "--mfm-dim", "64", "--mfm-heads", "4", "--data-root", str(fake_data), "--device",
             "cpu"]
    for recipe in ("daformer", "hrda"):
        config = CONFIGS["mit_b0 HRDA" if recipe == "hrda" else "mit_b0"]
        student, teacher, imagenet = (network(config, seed) for seed in (1, 2, 3))
        path = write_released(tmp_path / f"{recipe}.pth", student, teacher, imagenet)
        args = train.parse_args([*small, "--recipe", recipe, "--pretrained", str(path), "--iters", "2",
                                 "--eval-every", "2", "--out", str(tmp_path / recipe)])
        run = train.build_run(args, K)
        for ours, released in ((run.student, student), (run.teacher, student), (run.imagenet, imagenet)):
            assert ours.state_dict().keys() == released.state_dict().keys()
            assert all(torch.equal(v, released.state_dict()[k]) for k, v in ours.state_dict().items())
    result = train.main([*small, "--recipe", "hrda", "--pretrained", str(path), "--iters", "2", "--eval-every", "2",
                         "--out", str(tmp_path / "run")])
    assert 0 <= result["mIoU"] <= 100


def test_hrda_build_model_loads_encoder_files_into_its_encoder_and_whole_networks_everywhere(tmp_path):
    """--recipe hrda --pretrained: ImageNet weights reach the wrapped network's encoder (HRDA.backbone), a whole HRDA
    network of ours (written by train.py) every layer, the attention head included."""
    resnet = torchvision.models.resnet18()
    torch.save(resnet.state_dict(), tmp_path / "resnet18.pth")
    model = hrda.build_model(K, "resnet18", str(tmp_path / "resnet18.pth"), hrda=dict(crop_size=64))
    assert torch.equal(model.net.backbone[7][1].conv2.weight, resnet.layer4[1].conv2.weight)
    ours = network(CONFIGS["resnet18 HRDA"], 4)
    torch.save(dict(model=ours.state_dict(), model_config=ours.config), tmp_path / "model.pt")
    warm = hrda.build_model(K, "resnet18", str(tmp_path / "model.pt"), hrda=dict(crop_size=64))
    assert all(torch.equal(v, ours.state_dict()[k]) for k, v in warm.state_dict().items())


def test_readme_snippet_loads_a_released_checkpoint(tmp_path, monkeypatch, capsys):
    (code,) = readme_blocks("## Released checkpoints (DAFormer, HRDA, MIC)")
    student = network(CONFIGS["mit_b0 HRDA"], 1)
    write_released(tmp_path / "latest.pth", student, network(CONFIGS["mit_b0 HRDA"], 2))
    monkeypatch.chdir(tmp_path)
    ns = dict(images=torch.rand(2, 3, 64, 96))
    exec(compile(code, "README.md", "exec"), ns)
    with torch.no_grad():
        assert torch.equal(ns["logits"], student(ns["images"]))
    assert "the student (model.*) of a released checkpoint, mit_b0 + DAFormer head" in capsys.readouterr().out


# ------------------------------------------------------------------ files that do not fit: one clear error each
@pytest.fixture(scope="module")
def released(tmp_path_factory):
    """A released MiT-B0 DAFormer checkpoint and its student."""
    student = network(CONFIGS["mit_b0"], 1)
    return write_released(tmp_path_factory.mktemp("released") / "latest.pth", student, network(CONFIGS["mit_b0"], 2),
                          network(CONFIGS["mit_b0"], 3)), student


def edited(path, out, edit):
    ckpt = torch.load(path, weights_only=True)
    edit(ckpt["state_dict"])
    torch.save(ckpt, out)
    return out


def head_of_another_kind(state):
    for k in [k for k in state if ".decode_head." in k]:
        state[k.replace("embed_layers", "linear_c").replace("fuse_layer", "linear_fuse")] = state.pop(k)


def mit_b0_with_one_block_less(state):
    for k in [k for k in state if ".backbone.block1.1." in k]:
        del state[k]


def resnet34_like(state):  # BasicBlocks, 3-4-6-3
    state.clear()
    for prefix in ("model.", "ema_model."):
        state |= {prefix + k: torch.zeros(s) for k, s in official_dlv2("decode_head", 512).items()}
        for i, n in enumerate((3, 4, 6, 3), start=1):
            state |= {f"{prefix}backbone.layer{i}.{j}.conv1.weight": torch.zeros(1) for j in range(n)}


ERRORS = {  # edit of the file's state_dict -> what the error says
    "missing key": (lambda s: s.pop("model.decode_head.conv_seg.bias"),
                    r"missing \(1\): decode_head\.conv_seg\.bias"),
    "unexpected key": (lambda s: s.update({"model.decode_head.image_pool.1.conv.weight": torch.zeros(1)}),
                       r"unexpected \(1\): decode_head\.image_pool\.1\.conv\.weight"),
    "wrong shape": (lambda s: s.update({"model.decode_head.embed_layers.0.proj.weight": torch.zeros(HEADS, 33)}),
                    r"wrong shape \(1\): decode_head\.embed_layers\.0\.proj\.weight: file \(256, 33\) vs model "
                    r"\(256, 32\)"),
    "SegFormer head": (head_of_another_kind, r"decode head \(decode_head\.conv_seg\.\*, decode_head\.linear_c\.\*, "
                                             r"decode_head\.linear_fuse\.\*\) is neither DAFormer's"),
    "MiT of other depths": (mit_b0_with_one_block_less, r"MiT with depths \(1, 2, 2, 2\) and widths \[32, 64, 160, "
                                                        r"256\] with a DAFormer head: not a network of ours"),
    "ResNet-34": (resnet34_like, r"ResNet-\? with a DeepLabV2 head: not a network of ours"),
    "plain mmseg checkpoint": (lambda s: [s.update({k[6:]: s.pop(k)}) if k.startswith("model.") else s.pop(k)
                                          for k in list(s)],
                               r"plain mmseg segmentor checkpoint \(keys backbone\.\*, decode_head\.\*\), not one of "
                               r"DAFormer, HRDA or MIC"),
    "no student": (lambda s: [s.pop(k) for k in list(s) if k.startswith("model.")],
                   r"holds no student network \(model\.\*\), only ema_model\.\*, imnet_model\.\*\."),
}


@pytest.mark.parametrize("name", ERRORS)
def test_each_file_that_does_not_fit_gets_one_clear_error(released, tmp_path, name):
    edit, message = ERRORS[name]
    path = edited(released[0], tmp_path / "edited.pth", edit)
    with pytest.raises(models.WeightsError, match=message):
        evaluation.main(["--ckpt", str(path), "--device", "cpu"])


def test_errors_of_truncated_files_wrong_flags_and_missing_parts(released, fake_data, tmp_path):
    path, student = released
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(models.WeightsError, match=f"cannot read weights file {re.escape(str(truncated))}: .* It may "
                                                  "be truncated"):
        evaluation.main(["--ckpt", str(truncated), "--device", "cpu"])
    teacherless = edited(path, tmp_path / "teacherless.pth", lambda s: [s.pop(k) for k in list(s) if "ema_" in k])
    with pytest.raises(models.WeightsError, match=r"holds no teacher network \(ema_model\.\*\), only imnet_model"):
        evaluation.main(["--ckpt", str(teacherless), "--uda-model", "teacher", "--device", "cpu"])
    without_fd = edited(path, tmp_path / "without_fd.pth", lambda s: [s.pop(k) for k in list(s) if "imnet_" in k])
    with pytest.warns(UserWarning, match="holds no imnet_model"):  # a run without the feature distance
        frozen = models.imagenet_copy(student, without_fd)
    assert all(torch.equal(v, student.state_dict()[k]) for k, v in frozen.state_dict().items())
    flags = ["--source", "gta", "--target", "cityscapes", "--data-root", str(fake_data), "--device", "cpu",
             "--pretrained", str(path), "--out", str(tmp_path / "run")]
    with pytest.raises(SystemExit, match=r"(?s)does not fit the network resnet18 \+ DeepLabV2 head \(6, 12\), "
                                         r"19 classes:\n  missing \(.*The file holds mit_b0 \+ DAFormer head"):
        train.main([*flags, "--backbone", "resnet18"])
    with pytest.raises(SystemExit, match=r"(?s)missing \(\d+\): decode_head\.head\..*unexpected \(\d+\): "
                                         r"decode_head\.conv_seg.*The file holds mit_b0 \+ DAFormer"):
        train.main([*flags, "--backbone", "mit_b0", "--recipe", "hrda"])  # a DAFormer file lacks HRDA's attention
    with pytest.raises(models.WeightsError, match="a released DAFormer/HRDA/MIC checkpoint belongs in --pretrained"):
        evaluation.read_checkpoint(path)  # --resume reads our checkpoints only
