"""The README's code snippets for using mfm.py in someone else's training loop, executed as written: each test
reads its block out of README.md (no copy here), so a snippet that drifts from the code fails the suite."""
import re
from pathlib import Path

import pytest
import torch
import torchvision

import models
from mfm import Rebuilder

README = Path(__file__).resolve().parents[1] / "README.md"


def readme_blocks(heading):
    """The ```python blocks of the README section under `heading` (up to the next heading of any level)."""
    lines, section, inside, fence = README.read_text().splitlines(), None, False, False
    for line in lines:
        if line.startswith("```"):
            fence = not fence
        if not fence and line.startswith("#"):
            if inside:
                break
            inside = line == heading
        elif inside:
            section = (section or []) + [line]
    assert section, f"README.md has no section {heading!r}"
    blocks = re.findall(r"^```python\n(.*?)^```$", "\n".join(section) + "\n", re.S | re.M)
    assert blocks, f"README.md section {heading!r} has no python block"
    return blocks


def assert_gradients(modules):
    """Every parameter of every module got a finite gradient, and each module a nonzero one."""
    for name, module in modules.items():
        grads = [p.grad for p in module.parameters()]
        assert all(g is not None and torch.isfinite(g).all() for g in grads), name
        assert sum(g.abs().sum() for g in grads) > 0, name


def test_snippet_in_your_own_training_loop():
    (code,) = readme_blocks("## Using MFM in your own training loop")
    torch.manual_seed(0)
    student = models.DeepLabV2(19, "resnet50")  # 2048 channels, as the snippet's Rebuilder
    optimizer = torch.optim.AdamW(student.parameters(), lr=6e-5)
    pl = torch.randint(0, 19, (2, 64, 64))
    pl[:, :4] = 255
    ns = dict(device="cpu", student=student, optimizer=optimizer, x_tgt=torch.rand(2, 3, 64, 64), pl=pl,
              q=torch.tensor(0.7), lambda_mfm=1.0)
    exec(compile(code, "README.md", "exec"), ns)
    rebuilder = ns["rebuilder"]
    assert isinstance(rebuilder, Rebuilder)
    assert [id(p) for p in optimizer.param_groups[-1]["params"]] == [id(p) for p in rebuilder.parameters()]
    assert_gradients(dict(backbone=student.backbone, head=student.head, rebuilder=rebuilder))


def fake_imagenet_download(calls):
    """Stands in for the download of torchvision's ImageNet backbone weights: a fresh model's state dict of the
    architecture behind the URL (random weights; what matters is that they load strictly)."""
    def load(url, *args, **kwargs):
        calls.append(url)
        for arch in ("resnet50", "mobilenet_v3_large"):
            if torchvision.models.get_model_weights(arch).IMAGENET1K_V1.url == url:
                return torchvision.models.get_model(arch, weights=None).state_dict()
        raise AssertionError(f"unexpected download {url}")
    return load


def variant(code, arch, extra):
    """The main snippet adapted as the README's text says: fcn_resnet50 changes only the constructor; LR-ASPP
    replaces the lines that assign the names its block assigns."""
    if arch != "lraspp_mobilenet_v3_large":
        return code.replace("deeplabv3_resnet50", arch)
    lines = code.splitlines()
    for new in extra.splitlines():
        name = new.split(" = ")[0]
        (i,) = [i for i, line in enumerate(lines) if line.lstrip().startswith(name + " = ")]
        lines[i] = lines[i][:len(lines[i]) - len(lines[i].lstrip())] + new
    return "\n".join(lines)


@pytest.mark.parametrize("arch", ["deeplabv3_resnet50", "fcn_resnet50", "lraspp_mobilenet_v3_large"])
def test_snippet_torchvision_segmentation_models(arch, tmp_path, monkeypatch):
    """The torchvision loop trains 2 steps at 64 px: finite loss, gradients in backbone, classifier and Rebuilder,
    and model.pt is the plain torchvision model (same keys; loads strictly into a fresh one)."""
    code, extra = readme_blocks("### torchvision's segmentation models")
    assert f"`{arch}`" in README.read_text()
    calls = []
    monkeypatch.setattr(torchvision.models._api, "load_state_dict_from_url", fake_imagenet_download(calls))
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    y_src = torch.randint(0, 19, (2, 64, 64))
    y_src[:, -4:] = 255
    loader = [(torch.randn(2, 3, 64, 64), y_src, torch.randn(2, 3, 64, 64)) for _ in range(2)]
    assert "confidence >= 0.968" in code
    code = code.replace("confidence >= 0.968", "confidence >= 0.0")  # an untrained teacher: q = 1, not 0
    ns = dict(loader=loader)
    exec(compile(variant(code, arch, extra), "README.md", "exec"), ns)
    model, rebuilder = ns["model"], ns["rebuilder"]
    assert len(calls) == 1, "the snippet's model starts from torchvision's ImageNet backbone"
    assert type(model).__module__.startswith("torchvision.models.segmentation")
    assert torch.isfinite(ns["loss"]) and torch.isfinite(ns["loss_mfm"])
    assert_gradients(dict(backbone=model.backbone, classifier=model.classifier, rebuilder=rebuilder))
    plain = torchvision.models.get_model(arch, weights=None, weights_backbone=None, num_classes=19)
    state = torch.load(tmp_path / "model.pt", weights_only=True)
    assert list(state) == list(plain.state_dict())
    plain.load_state_dict(state)
    assert not any(isinstance(m, Rebuilder) for m in model.modules())

