"""models.py: shapes, parameter counts (METHOD.md §2), weight loading and its errors."""
import urllib.error

import pytest
import torch
import torchvision

import models
from models import DeepLabV2, WeightsError


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


@pytest.mark.parametrize("dilations, expected", [((6, 12), 43_200_614), ((6, 12, 18, 24), 43_901_068)])
def test_parameter_counts(dilations, expected):
    model = DeepLabV2(aspp_dilations=dilations)
    assert models.count_parameters(model) == expected
    assert models.count_parameters(model.backbone) == 42_500_160


def test_head_init_and_resnet18_stride():
    model = DeepLabV2(backbone="resnet18", num_classes=7)
    assert model.feat_channels == 512
    w = model.head.convs[0].weight
    assert abs(w.std().item() - 0.01) < 0.001
    assert model.encode(torch.rand(1, 3, 64, 64)).shape == (1, 512, 8, 8)


def test_upsample_is_bilinear_half_pixel():
    logits = torch.randn(1, 3, 4, 4)
    out = models.upsample(logits, (16, 16))
    expected = torch.nn.functional.interpolate(logits, scale_factor=4, mode="bilinear", align_corners=False)
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
    loaded, ckpt = models.model_from_checkpoint(path)
    x = torch.rand(1, 3, 32, 32)
    model.eval()
    assert torch.equal(loaded(x), model(x))
    warm = DeepLabV2(backbone="resnet18", num_classes=5, pretrained=str(path))
    assert torch.equal(warm.head.convs[0].weight, model.head.convs[0].weight)
    with pytest.raises(WeightsError, match="number of classes"):
        DeepLabV2(backbone="resnet18", num_classes=19, pretrained=str(path))
    torch.save(model.state_dict(), path)
    with pytest.raises(WeightsError, match="not a checkpoint written by train.py"):
        models.load_checkpoint(path)


def test_unknown_backbone():
    with pytest.raises(WeightsError, match="resnet101"):
        DeepLabV2(backbone="vgg16")
