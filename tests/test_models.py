"""models.py: shapes, parameter counts (METHOD.md §2, §7), weight loading and its errors, for both networks."""
import math
import urllib.error

import pytest
import torch
import torch.nn.functional as F
import torchvision

import eval as evaluation
import models
from models import DAFormer, DeepLabV2, WeightsError


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return DeepLabV2().eval()


def test_output_stride_and_shapes(model):
    x = torch.rand(2, 3, 64, 96)
    with torch.no_grad():
        feats = model.encode(x)
        logits = model.decode(feats)
        assert feats.shape == (2, 2048, 8, 12)
        assert logits.shape == (2, 19, 8, 12)
        assert torch.equal(model(x), logits)


@pytest.mark.parametrize("backbone, dilations, expected, expected_backbone", [
    ("resnet101", (6, 12), 43_200_614, 42_500_160), ("resnet101", (6, 12, 18, 24), 43_901_068, 42_500_160),
    ("resnet101-v1c", (6, 12), 43_219_846, 42_519_392)])  # METHOD.md §2
def test_parameter_counts(backbone, dilations, expected, expected_backbone):
    with torch.device("meta"):  # counts only: no memory, no init arithmetic
        model = models.build_model(19, backbone, aspp_dilations=dilations)
    assert models.count_parameters(model) == expected
    assert models.count_parameters(model.backbone) == expected_backbone


def test_head_init_and_resnet18_stride():
    model = DeepLabV2(backbone="resnet18", num_classes=7)
    assert model.feat_channels == 512
    w = model.head.convs[0].weight
    assert abs(w.std().item() - 0.01) < 0.001
    assert model.encode(torch.rand(1, 3, 64, 64)).shape == (1, 512, 8, 8)


def test_seg_loss_is_weighted_ce_at_label_size():
    """_EncoderDecoder.seg_loss: decode's output upsampled to the label, CE times the weight, 255 ignored."""
    model = DeepLabV2(backbone="resnet18", num_classes=7)
    out = torch.randn(2, 7, 8, 8)
    label = torch.randint(0, 7, (2, 64, 64))
    label[:, :3] = 255
    weight = torch.rand(2, 64, 64)
    expected = (F.cross_entropy(models.upsample(out, (64, 64)), label, ignore_index=255, reduction="none")
                * weight).mean()
    assert model.seg_loss(out, label, weight).item() == pytest.approx(expected.item(), rel=1e-6)
    assert model.seg_loss(out, label).item() == pytest.approx(
        F.cross_entropy(models.upsample(out, (64, 64)), label, ignore_index=255, reduction="none").mean().item())


def test_upsample_is_bilinear_half_pixel():
    logits = torch.randn(1, 3, 4, 4)
    out = models.upsample(logits, (16, 16))
    expected = F.interpolate(logits, scale_factor=4, mode="bilinear", align_corners=False)
    assert torch.allclose(out, expected)
    assert models.upsample(logits, (4, 4)) is logits


def test_normalisation_is_inside_encode():
    """A constant image equal to the ImageNet mean is all zeros after normalisation: conv1 sees nothing."""
    model = DeepLabV2(backbone="resnet18")
    mean = torch.tensor(models.IMAGENET_MEAN).view(1, 3, 1, 1).expand(1, 3, 32, 32)
    seen = {}
    model.backbone[0].register_forward_pre_hook(lambda m, inp: seen.update(x=inp[0]))
    model.encode(mean)
    assert seen["x"].abs().max() < 1e-6


def test_param_groups_cover_everything_once(model):
    groups = model.param_groups(6e-5)
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids)) == len(list(model.parameters()))
    lrs = {g["name"]: g["lr"] for g in groups}
    assert lrs["head"] == pytest.approx(10 * lrs["backbone"])


def test_loads_torchvision_state_dict(tmp_path):
    reference = torchvision.models.resnet50()
    path = tmp_path / "resnet50.pth"
    torch.save(reference.state_dict(), path)
    model = DeepLabV2(backbone="resnet50", pretrained=str(path))
    assert torch.equal(model.backbone[0].weight, reference.conv1.weight)
    assert torch.equal(model.backbone[7][2].conv3.weight, reference.layer4[2].conv3.weight)
    assert torch.equal(model.backbone[1].running_var, reference.bn1.running_var)


def test_mismatched_state_dict_names_the_keys(tmp_path):
    state = torchvision.models.resnet18().state_dict()
    state["layer9.weight"] = torch.zeros(1)
    del state["layer1.0.conv1.weight"]
    path = tmp_path / "bad.pth"
    torch.save(state, path)
    with pytest.raises(WeightsError) as err:
        DeepLabV2(backbone="resnet18", pretrained=str(path))
    assert "layer9.weight" in str(err.value) and "4.0.conv1.weight" in str(err.value)
    assert str(path) in str(err.value)
    torch.save(torchvision.models.resnet18().state_dict(), path)
    with pytest.raises(WeightsError, match="wrong shape"):
        DeepLabV2(backbone="resnet50", pretrained=str(path))


def test_corrupt_and_missing_files(tmp_path):
    path = tmp_path / "truncated.pth"
    torch.save(torchvision.models.resnet18().state_dict(), path)
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(WeightsError, match="truncated.pth"):
        DeepLabV2(backbone="resnet18", pretrained=str(path))
    with pytest.raises(WeightsError, match="does not exist"):
        DeepLabV2(backbone="resnet18", pretrained=str(tmp_path / "nope.pth"))


def test_imagenet_offline_says_what_to_do(monkeypatch):
    def offline(self, *args, **kwargs):
        raise urllib.error.URLError("no network")
    monkeypatch.setattr(torchvision.models.WeightsEnum, "get_state_dict", offline)
    with pytest.raises(WeightsError) as err:
        DeepLabV2(backbone="resnet18", pretrained="imagenet")
    assert "--pretrained PATH" in str(err.value) and "--pretrained none" in str(err.value)


def test_checkpoint_roundtrip(tmp_path):
    torch.manual_seed(1)
    model = DeepLabV2(backbone="resnet18", num_classes=5)
    path = tmp_path / "model.pt"
    torch.save({"model": model.state_dict(), "model_config": model.config}, path)
    loaded, ckpt = evaluation.model_from_checkpoint(path)
    x = torch.rand(1, 3, 32, 32)
    model.eval()
    assert torch.equal(loaded(x), model(x))
    warm = DeepLabV2(backbone="resnet18", num_classes=5, pretrained=str(path))
    assert torch.equal(warm.head.convs[0].weight, model.head.convs[0].weight)
    with pytest.raises(WeightsError, match="number of classes"):
        DeepLabV2(backbone="resnet18", num_classes=19, pretrained=str(path))
    torch.save(model.state_dict(), path)
    with pytest.raises(WeightsError, match="not a checkpoint written by train.py"):
        evaluation.read_checkpoint(path)


def test_unknown_backbone():
    with pytest.raises(WeightsError, match="resnet101"):
        DeepLabV2(backbone="vgg16")


# ---------------------------------------------------------------- ResNetV1c-101 (METHOD.md §2, last bullet)
def v1c_file_state():
    """An open-mmlab-style resnet101_v1c state dict built from the published key layout, not from our model:
    stem.{0,3,6} convs / stem.{1,4,7} BNs, layer1..4 named as torchvision's, fc.*; random values."""
    state = {k: torch.randn_like(v.float()).to(v.dtype) if v.is_floating_point() else v
             for k, v in torchvision.models.resnet101().state_dict().items() if not k.startswith(("conv1.", "bn1."))}
    for conv, bn, cin, cout in ((0, 1, 3, 32), (3, 4, 32, 32), (6, 7, 32, 64)):
        state[f"stem.{conv}.weight"] = torch.randn(cout, cin, 3, 3)
        for name in ("weight", "bias", "running_mean"):
            state[f"stem.{bn}.{name}"] = torch.randn(cout)
        state[f"stem.{bn}.running_var"] = torch.rand(cout) + 0.5
        state[f"stem.{bn}.num_batches_tracked"] = torch.tensor(7)
    return state


def test_v1c_loads_open_mmlab_file(tmp_path):
    state = v1c_file_state()
    path = tmp_path / "resnet101_v1c.pth"
    torch.save({"state_dict": state, "meta": {"note": "synthetic"}}, path)
    model = models.build_model(backbone="resnet101-v1c", pretrained=str(path))
    assert isinstance(model, DeepLabV2) and model.feat_stride == 8 and model.feat_channels == 2048
    backbone = model.backbone
    assert torch.equal(backbone.stem[0].weight, state["stem.0.weight"])
    assert torch.equal(backbone.stem[6].weight, state["stem.6.weight"])
    assert torch.equal(backbone.stem[7].running_var, state["stem.7.running_var"])
    assert torch.equal(backbone.layer4[2].conv3.weight, state["layer4.2.conv3.weight"])
    assert torch.equal(backbone.layer1[0].downsample[1].running_mean, state["layer1.0.downsample.1.running_mean"])
    assert model.eval().encode(torch.rand(1, 3, 64, 64)).shape == (1, 2048, 8, 8)  # stride 2 stem + pool: still 8
    old = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}  # pre-1.0 files lack them
    torch.save({"state_dict": old}, path)
    models.build_model(backbone="resnet101-v1c", pretrained=str(path))
    del state["stem.4.weight"]
    torch.save({"state_dict": state}, path)
    with pytest.raises(WeightsError, match=r"missing \(1\): stem.4.weight"):
        models.build_model(backbone="resnet101-v1c", pretrained=str(path))


def test_v1c_imagenet_uses_hub_and_explains_offline(monkeypatch):
    calls = []

    def offline(url, **kwargs):
        calls.append((url, kwargs))
        raise urllib.error.URLError("no network")
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    with pytest.raises(WeightsError) as err:
        models.build_model(backbone="resnet101-v1c", pretrained="imagenet")
    url = "https://download.openmmlab.com/pretrain/third_party/resnet101_v1c-e67eebb6.pth"  # METHOD.md §2
    assert calls == [(url, dict(map_location="cpu", check_hash=True))]
    message = str(err.value)
    assert url in message and "--pretrained PATH" in message and "--pretrained none" in message


# ---------------------------------------------------------------- MiT + DAFormer head (METHOD.md §7)
MIT_B0 = dict(dims=(32, 64, 160, 256), depths=(2, 2, 2, 2), sr=(8, 4, 2, 1))


def segformer_file_state(dims, depths, sr):
    """A SegFormer-style mit_bX.pth (flat dict) built from the published key pattern, random values, with the
    ImageNet classifier head.weight/head.bias that a loader must drop."""
    state = {}

    def add(key, *shape):
        state[key] = torch.randn(*shape)
    for i, (dim, depth, r) in enumerate(zip(dims, depths, sr), start=1):
        cin, k = (3, 7) if i == 1 else (dims[i - 2], 3)
        add(f"patch_embed{i}.proj.weight", dim, cin, k, k)
        for name in ("patch_embed{i}.proj.bias", "patch_embed{i}.norm.weight", "patch_embed{i}.norm.bias",
                     "norm{i}.weight", "norm{i}.bias"):
            add(name.format(i=i), dim)
        for j in range(depth):
            b = f"block{i}.{j}"
            reduced = r > 1  # the key/value reduction (attn.sr, attn.norm) exists only where sr > 1
            for name in ("norm1", "norm2", "attn.q", "attn.proj", "mlp.fc2") + ("attn.sr", "attn.norm") * reduced:
                add(f"{b}.{name}.bias", dim)
            for name in ("norm1", "norm2") + ("attn.norm",) * reduced:
                add(f"{b}.{name}.weight", dim)
            add(f"{b}.attn.q.weight", dim, dim)
            add(f"{b}.attn.proj.weight", dim, dim)
            add(f"{b}.attn.kv.weight", 2 * dim, dim)
            add(f"{b}.attn.kv.bias", 2 * dim)
            if r > 1:
                add(f"{b}.attn.sr.weight", dim, dim, r, r)
            add(f"{b}.mlp.fc1.weight", 4 * dim, dim)
            add(f"{b}.mlp.fc1.bias", 4 * dim)
            add(f"{b}.mlp.dwconv.dwconv.weight", 4 * dim, 1, 3, 3)
            add(f"{b}.mlp.dwconv.dwconv.bias", 4 * dim)
            add(f"{b}.mlp.fc2.weight", dim, 4 * dim)
    add("head.weight", 1000, dims[-1])
    add("head.bias", 1000)
    return state


def test_mit_and_daformer_parameter_counts():
    with torch.device("meta"):
        model = models.build_model(19, "mit_b5")
    assert isinstance(model, DAFormer)
    assert models.count_parameters(model.backbone) == 81_443_008  # METHOD.md §7
    assert len(model.backbone.state_dict()) == 1052
    assert models.count_parameters(model.head) == 3_712_275
    assert models.count_parameters(model) == 85_155_283
    assert model.feat_channels == [64, 128, 320, 512] and model.feat_stride == 32


def test_mit_layernorm_eps_and_drop_path_rates():
    model = DAFormer(backbone="mit_b0", drop_path=0.3)
    for name, module in model.backbone.named_modules():
        if isinstance(module, torch.nn.LayerNorm):  # METHOD.md §7: 1e-5 in patch embeds and attn.norm
            expected = 1e-5 if name.startswith("patch_embed") or name.endswith("attn.norm") else 1e-6
            assert module.eps == expected, name
    rates = [m.p for m in model.backbone.modules() if isinstance(m, models.DropPath)]
    assert len(rates) == 8 and rates == pytest.approx([0.3 * k / 7 for k in range(8)])


def test_segformer_file_loads_by_name(tmp_path):
    state = segformer_file_state(**MIT_B0)
    path = tmp_path / "mit_b0.pth"
    torch.save(state, path)
    model = models.build_model(5, "mit_b0", pretrained=str(path))
    own = model.backbone.state_dict()
    assert set(own) == set(state) - {"head.weight", "head.bias"}
    for key in own:
        assert torch.equal(own[key], state[key]), key
    assert torch.equal(model.backbone.block2[1].mlp.dwconv["dwconv"].weight, state["block2.1.mlp.dwconv.dwconv.weight"])
    torch.save({"state_dict": state}, path)  # wrapped files load too
    assert torch.equal(DAFormer(5, "mit_b0", str(path)).backbone.norm4.weight, state["norm4.weight"])


def test_segformer_file_with_wrong_keys_names_them(tmp_path):
    state = segformer_file_state(**MIT_B0)
    state["block1.0.attn.k.weight"] = state.pop("block1.0.attn.kv.weight")
    del state["norm3.bias"]
    path = tmp_path / "mit_b0.pth"
    torch.save(state, path)
    with pytest.raises(WeightsError) as err:
        DAFormer(backbone="mit_b0", pretrained=str(path))
    message = str(err.value)
    assert "block1.0.attn.k.weight" in message and "block1.0.attn.kv.weight" in message
    assert "norm3.bias" in message and str(path) in message
    torch.save(segformer_file_state(**MIT_B0), path)
    with pytest.raises(WeightsError, match="wrong shape"):  # a B0 file for a B1 network
        DAFormer(backbone="mit_b1", pretrained=str(path))


def test_mit_imagenet_says_where_to_get_weights(monkeypatch):
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", lambda *a, **k: pytest.fail("no download expected"))
    with pytest.raises(WeightsError) as err:
        models.build_model(backbone="mit_b0", pretrained="imagenet")
    message = str(err.value)
    assert "not be downloaded automatically" in message and "SegFormer" in message and "DAFormer" in message
    assert "--pretrained PATH/mit_b0.pth" in message and "--pretrained none" in message


@pytest.mark.parametrize("size", [(64, 64), (72, 40)])
def test_mit_stage_shapes_and_logit_stride(size):
    torch.manual_seed(0)
    model = DAFormer(7, "mit_b0").eval()
    x = torch.rand(2, 3, *size)
    with torch.no_grad():
        feats = model.encode(x)
        logits = model.decode(feats)
        assert torch.equal(model(x), logits)
    expected = [(2, c, math.ceil(size[0] / s), math.ceil(size[1] / s)) for c, s in zip(MIT_B0["dims"], (4, 8, 16, 32))]
    assert [tuple(f.shape) for f in feats] == expected
    assert logits.shape == (2, 7, math.ceil(size[0] / 4), math.ceil(size[1] / 4))


def test_efficient_attention_matches_brute_force():
    """softmax(q k^T / sqrt(head_dim)) v per head, k/v from the sr-shrunk, normalised map; kv = [k | v]."""
    torch.manual_seed(0)
    dim, heads, sr, h, w = 8, 2, 2, 4, 6
    attn = models.EfficientAttention(dim, heads, sr)
    x = torch.randn(3, h * w, dim)
    with torch.no_grad():
        out = attn(x, h, w)
        small = F.conv2d(x.transpose(1, 2).reshape(3, dim, h, w), attn.sr.weight, attn.sr.bias,
                                           stride=sr).flatten(2).transpose(1, 2)
        small = F.layer_norm(small, (dim,), attn.norm.weight, attn.norm.bias, eps=1e-5)
        kv = small @ attn.kv.weight.T + attn.kv.bias
        q, k, v = x @ attn.q.weight.T + attn.q.bias, kv[..., :dim], kv[..., dim:]
        hd = dim // heads
        heads_out = []
        for i in range(heads):
            sl = slice(i * hd, (i + 1) * hd)
            weights = torch.softmax(q[..., sl] @ k[..., sl].transpose(1, 2) / hd ** 0.5, dim=-1)
            heads_out.append(weights @ v[..., sl])
        expected = torch.cat(heads_out, dim=-1) @ attn.proj.weight.T + attn.proj.bias
    assert torch.allclose(out, expected, atol=1e-5)


def test_mit_block_matches_functional_reference():
    """Pre-norm residual block (eps 1e-6) whose Mix-FFN is fc1 -> depthwise 3x3 on the map -> GELU -> fc2."""
    torch.manual_seed(0)
    dim, h, w = 8, 3, 5
    block = models.MiTBlock(dim, num_heads=2, sr=1, drop_path=0.5).eval()  # eval: DropPath is the identity
    x = torch.randn(2, h * w, dim)
    mlp = block.mlp
    dw = mlp.dwconv["dwconv"]

    def mix_ffn(t):
        hidden = F.linear(t, mlp.fc1.weight, mlp.fc1.bias).transpose(1, 2).reshape(2, 4 * dim, h, w)
        hidden = F.conv2d(hidden, dw.weight, dw.bias, padding=1, groups=4 * dim).flatten(2).transpose(1, 2)
        return F.linear(F.gelu(hidden), mlp.fc2.weight, mlp.fc2.bias)
    with torch.no_grad():
        out = block(x, h, w)
        y = x + block.attn(F.layer_norm(x, (dim,), block.norm1.weight, block.norm1.bias, eps=1e-6), h, w)
        expected = y + mix_ffn(F.layer_norm(y, (dim,), block.norm2.weight, block.norm2.bias, eps=1e-6))
    assert torch.allclose(out, expected, atol=1e-5)


def test_daformer_head_matches_functional_reference():
    """METHOD.md §7 written out with torch.nn.functional (eval mode: BN uses its running statistics, no dropout).
    Stage 1 is 20x24, larger than the biggest dilation (18), so every branch's dilation shows."""
    torch.manual_seed(0)
    head = models.DAFormerHead([4, 8, 12, 16], num_classes=3, embed=8).eval()
    for m in head.modules():
        if isinstance(m, torch.nn.BatchNorm2d):  # non-trivial statistics, so BN placement matters
            for tensor, low, high in ((m.running_mean, -0.5, 0.5), (m.running_var, 0.5, 2.0),
                                      (m.weight.data, 0.5, 1.5), (m.bias.data, -0.5, 0.5)):
                tensor.uniform_(low, high)
    feats = [torch.randn(2, c, *s) for c, s in zip([4, 8, 12, 16], [(20, 24), (10, 12), (5, 6), (3, 3)])]

    def cbr(x, seq, **conv):  # conv (no bias) -> BN -> ReLU, with the weights of seq = Sequential(conv, bn, relu)
        bn = seq[1]
        y = F.conv2d(x, seq[0].weight, **conv)
        return F.relu(F.batch_norm(y, bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0, bn.eps))
    with torch.no_grad():
        out = head(feats)
        embedded = [F.linear(f.permute(0, 2, 3, 1), lin.weight, lin.bias).permute(0, 3, 1, 2)
                    for f, lin in zip(feats, head.embed)]
        x = torch.cat([F.interpolate(e, size=(20, 24), mode="bilinear", align_corners=False) for e in embedded], 1)
        branches = [cbr(x, head.fusion[0])]
        for branch, d in zip(head.fusion[1:], (6, 12, 18)):
            branches.append(cbr(cbr(x, branch[0], padding=d, dilation=d, groups=32), branch[1]))
        y = cbr(torch.cat(branches, 1), head.bottleneck, padding=1)
        expected = F.conv2d(y, head.classifier.weight, head.classifier.bias)
    assert out.shape == (2, 3, 20, 24)
    assert torch.allclose(out, expected, atol=1e-5)


def test_daformer_param_groups():
    model = DAFormer(backbone="mit_b0")
    groups = {g["name"]: g for g in model.param_groups(6e-5)}
    ids = [id(p) for g in groups.values() for p in g["params"]]
    assert len(ids) == len(set(ids)) == len(list(model.parameters()))
    norms = {id(p) for m in model.backbone.modules() if isinstance(m, torch.nn.LayerNorm) for p in m.parameters()}
    no_decay = [g for g in groups.values() if g.get("weight_decay") == 0.0]
    assert len(no_decay) == 1 and {id(p) for p in no_decay[0]["params"]} == norms
    assert groups["head"]["lr"] == pytest.approx(10 * 6e-5) and "weight_decay" not in groups["head"]
    assert {id(p) for p in groups["head"]["params"]} == {id(p) for p in model.head.parameters()}
    assert all(g["lr"] == pytest.approx(6e-5) for name, g in groups.items() if name != "head")


def test_drop_path_drops_whole_samples():
    drop = models.DropPath(0.5)
    x = torch.ones(2000, 3, 4)
    assert torch.equal(drop.eval()(x), x)
    torch.manual_seed(0)
    out = drop.train()(x)
    per_sample = out.flatten(1)
    assert torch.equal(per_sample.min(1).values, per_sample.max(1).values)  # each sample all-kept or all-dropped
    assert set(per_sample[:, 0].tolist()) == {0.0, 2.0}  # survivors scaled by 1/(1-p)
    assert abs((per_sample[:, 0] == 0).float().mean().item() - 0.5) < 0.05


def test_daformer_checkpoint_roundtrip(tmp_path):
    torch.manual_seed(2)
    model = DAFormer(4, "mit_b0", drop_path=0.2)
    path = tmp_path / "model.pt"
    torch.save({"model": model.state_dict(), "model_config": model.config}, path)
    loaded, _ = evaluation.model_from_checkpoint(path)
    assert isinstance(loaded, DAFormer) and loaded.config == model.config and not loaded.training
    x = torch.rand(1, 3, 64, 32)
    with torch.no_grad():
        assert torch.equal(loaded(x), model.eval()(x))
    warm = models.build_model(**model.config, pretrained=str(path))  # our checkpoint: the whole network
    assert torch.equal(warm.head.classifier.weight, model.head.classifier.weight)


def test_build_model_rejects_unknown_backbone():
    with pytest.raises(WeightsError) as err:
        models.build_model(backbone="mit_b9")
    assert "mit_b5" in str(err.value) and "resnet101-v1c" in str(err.value)


@pytest.mark.parametrize("zipped", [True, False])
def test_read_weights_mapped_equals_read_whole(tmp_path, zipped):
    """mmap=True (a lazy look at a file) gives the same tensors as a whole read, for torch.save's zip format and,
    read whole, for the pre-1.6 format torch cannot map."""
    state = {"a": torch.randn(3, 4), "b": {"c": torch.arange(5)}}
    path = tmp_path / "w.pth"
    torch.save(state, path, _use_new_zipfile_serialization=zipped)
    mapped, whole = models.read_weights(path, mmap=True), models.read_weights(path)
    assert torch.equal(mapped["a"], whole["a"]) and torch.equal(mapped["b"]["c"], state["b"]["c"])


def test_the_feature_distance_copy_looks_at_the_pretrained_file_lazily(tmp_path, monkeypatch):
    """build_run read the --pretrained file whole to build the student; the frozen ImageNet copy only checks whether
    it is a released checkpoint with an imnet_model, through a mapped read."""
    student = DeepLabV2(num_classes=19, backbone="resnet18")
    path = tmp_path / "resnet18.pth"
    torch.save({f"backbone.{k}": v for k, v in student.state_dict().items()}, path)
    calls, read = [], models.read_weights
    monkeypatch.setattr(models, "read_weights", lambda p, mmap=False: calls.append(mmap) or read(p, mmap))
    frozen = models.imagenet_copy(student, path)
    assert calls == [True] and not frozen.training and not any(p.requires_grad for p in frozen.parameters())
