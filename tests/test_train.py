"""train.py and eval.py end to end through the real command lines, on a tiny fake GTA + Cityscapes tree and on
the toy pair; plus the algorithm's small pieces (EMA, schedule, pseudo-labels, mixing)."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import data
import eval as evaluation
import models
import train

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--backbone", "resnet18", "--pretrained", "none", "--crop-size", "64", "--batch-size", "2",
        "--mfm-grid", "4", "--mfm-dim", "64", "--mfm-heads", "4"]


def cli(script, *args, check=True):
    out = subprocess.run([sys.executable, str(ROOT / script), *map(str, args)], capture_output=True, text=True,
                         timeout=600, cwd=ROOT)
    if check:
        assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    return out


@pytest.mark.parametrize("script, flags", [("train.py", ["--lambda-mfm", "--resume", "--no-mfm", "--mask-ratio"]),
                                           ("eval.py", ["--ckpt", "--save-pred", "--target"])])
def test_help(script, flags):
    out = cli(script, "--help").stdout
    assert all(flag in out for flag in flags)


def test_gta_to_cityscapes_end_to_end(fake_data, tmp_path):
    """A few iterations of DACS + MFM on official-layout trees, then eval.py with official predictions."""
    run = tmp_path / "run"
    cli("train.py", "--source", "gta", "--target", "cityscapes", "--data-root", fake_data, "--out", run,
        "--iters", 4, "--eval-every", 4, "--vis-every", 2, "--log-every", 1, *TINY)
    config = json.loads((run / "config.json").read_text())
    assert config["config"]["mode"] == "dacs+mfm" and config["config"]["lambda_mfm"] == 1.0
    records = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss_mfm" in r]
    assert [r["step"] for r in steps] == [1, 2, 3, 4]
    assert all(np.isfinite([r["loss_src"], r["loss_mix"], r["loss_mfm"]]).all() for r in steps)
    assert [r["step"] for r in records if "eval" in r] == [4]
    assert sorted(p.name for p in (run / "vis").iterdir()) == ["step_000002.png", "step_000004.png"]
    picture = np.asarray(Image.open(run / "vis/step_000004.png"))  # header row of panel names, 2 rows x 7 panels
    assert picture.shape == (14 + 2 * 128, 7 * 128, 3) and (picture[:14] < 128).any()

    exported = torch.load(run / "model.pt", weights_only=True)
    assert set(exported) == {"model", "model_config", "config", "step"}
    assert not any("rebuild" in k or "embed" in k for k in exported["model"])
    ckpt = torch.load(run / "ckpt.pt", weights_only=True)
    assert ckpt["rebuilder"] is not None and ckpt["teacher"] is not None and ckpt["step"] == 4

    preds = tmp_path / "preds"
    out = cli("eval.py", "--ckpt", run / "model.pt", "--target", "cityscapes", "--data-root", fake_data,
              "--save-pred", preds, "--workers", 0).stdout
    assert "mIoU" in out and "road" in out
    metrics = json.loads((run / "metrics.json").read_text())
    assert 0 <= metrics["mIoU"] <= 100 and len(metrics["iou"]) == 19 and metrics["images"] == 2
    gt = sorted((fake_data / "cityscapes/gtFine/val").rglob("*_labelIds.png"))
    written = sorted(p for p in preds.rglob("*_labelIds.png"))
    assert [p.relative_to(preds) for p in written] == [p.relative_to(fake_data / "cityscapes/gtFine/val") for p in gt]
    pred = np.asarray(Image.open(written[0]))
    assert pred.shape == np.asarray(Image.open(gt[0])).shape  # full label resolution
    assert set(np.unique(pred)) <= set(data.TRAINID_TO_LABELID.values())
    colour = sorted(p.relative_to(preds) for p in preds.rglob("*_color.png"))
    assert colour == [p.relative_to(preds).with_name(p.stem + "_color.png") for p in written]


def test_eval_checkpoint_accepts_ckpt_and_scores_like_a_brute_force(fake_data, tmp_path):
    run = tmp_path / "run"
    cli("train.py", "--source", "gta", "--target", "cityscapes", "--data-root", fake_data, "--out", run,
        "--iters", 1, "--source-only", *TINY)
    cli("eval.py", "--ckpt", run / "ckpt.pt", "--target", "cityscapes", "--data-root", fake_data, "--out", tmp_path,
        "--workers", 0)
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    model, _ = evaluation.model_from_checkpoint(run / "ckpt.pt")
    val = data.build_dataset("cityscapes", fake_data, "val", train=False)
    conf = np.zeros((19, 19), np.int64)
    with torch.no_grad():
        for image, label, _ in val:
            pred = models.upsample(model(image[None]), label.shape)[0].argmax(0).numpy()
            for t, p in zip(label.numpy().ravel(), pred.ravel()):
                if t != 255:
                    conf[t, p] += 1
    iou = [conf[c, c] / (conf[c].sum() + conf[:, c].sum() - conf[c, c]) for c in range(19)
           if conf[c].sum() + conf[:, c].sum() > 0]
    assert metrics["mIoU"] == pytest.approx(100 * np.mean(iou), abs=0.01)


def toy(out, *extra):
    return cli("train.py", "--source", "toy-day", "--target", "toy-night", "--out", out, "--deterministic",
               "--mfm-dim", 64, "--mfm-heads", 4, "--eval-every", 0, "--vis-every", 0, *extra)


def log_steps(run, key="loss_src"):
    return [r["step"] for r in map(json.loads, (run / "log.jsonl").read_text().splitlines()) if key in r]


def test_resume_continues_bit_identically_from_the_checkpoints_step(tmp_path):
    """Run 4 iterations straight; run 2, stop, resume to 4: the same weights, to the bit, and the resumed run
    starts at step 3 (its log and its progress bar start there; a restart from 0 would log steps 1-2 again)."""
    toy(tmp_path / "a", "--iters", 4, "--log-every", 1)
    toy(tmp_path / "b", "--iters", 4, "--stop-at", 2, "--log-every", 1)
    assert torch.load(tmp_path / "b/ckpt.pt", weights_only=True)["step"] == 2
    resumed = toy(tmp_path / "b", "--iters", 4, "--resume", "--log-every", 1)
    assert log_steps(tmp_path / "b") == [1, 2, 3, 4]
    assert "2/4" in resumed.stderr and "0/4" not in resumed.stderr and "1/4" not in resumed.stderr
    a, b = (torch.load(tmp_path / f"{r}/ckpt.pt", weights_only=True) for r in "ab")
    for part in ("model", "teacher", "rebuilder"):
        assert a[part].keys() == b[part].keys()
        assert all(torch.equal(a[part][k], b[part][k]) for k in a[part]), part
    assert len(json.loads((tmp_path / "b/config.json").read_text())["argv"]) == 2


def test_resume_uses_the_checkpoints_weights(tmp_path):
    """A checkpoint whose weights were perturbed ends elsewhere than the uninterrupted run; a restart from step 0
    with the same seed would end exactly at the uninterrupted run's weights."""
    toy(tmp_path / "a", "--iters", 3, "--no-mfm")
    toy(tmp_path / "b", "--iters", 3, "--stop-at", 1, "--no-mfm")
    ckpt = torch.load(tmp_path / "b/ckpt.pt", weights_only=True)
    for part in ("model", "teacher"):
        ckpt[part] = {k: v + 0.01 if v.is_floating_point() else v for k, v in ckpt[part].items()}
    torch.save(ckpt, tmp_path / "b/ckpt.pt")
    toy(tmp_path / "b", "--iters", 3, "--resume", "--no-mfm")
    a, b = (torch.load(tmp_path / f"{r}/model.pt", weights_only=True)["model"] for r in "ab")
    weights = [k for k in a if a[k].is_floating_point()]
    assert not any(torch.equal(a[k], b[k]) for k in weights)


def test_refuses_to_overwrite_a_run_and_names_changed_flags(tmp_path):
    toy(tmp_path / "a", "--iters", 1, "--source-only")
    again = cli("train.py", "--source", "toy-day", "--target", "toy-night", "--out", tmp_path / "a", "--iters", 1,
                "--source-only", check=False)
    assert again.returncode != 0 and "--resume" in again.stderr and "Traceback" not in again.stderr
    other = cli("train.py", "--source", "toy-day", "--target", "toy-night", "--out", tmp_path / "a", "--iters", 1,
                "--source-only", "--resume", "--lr", "0.5", check=False)
    assert other.returncode != 0 and "--lr" in other.stderr and "Traceback" not in other.stderr


# ----------------------------------------------------------------------------- the pieces
def test_ema_alpha_zero_copies_the_student_then_averages():
    torch.manual_seed(0)
    student, teacher = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    train.ema_update(teacher, student, step=0, alpha=0.99)
    assert all(torch.equal(t, s) for t, s in zip(teacher.parameters(), student.parameters()))
    before = teacher.weight.clone()
    with torch.no_grad():
        student.weight.add_(1.0)
    train.ema_update(teacher, student, step=1000, alpha=0.99)
    assert torch.allclose(teacher.weight, 0.99 * before + 0.01 * student.weight)


def test_lr_schedule_warmup_then_linear_decay():
    args = train.parse_args(["--source", "gta", "--target", "cityscapes", "--device", "cpu"])
    assert train.lr_factor(0, args) == pytest.approx(1e-6 * 1.0)
    assert train.lr_factor(750, args) == pytest.approx(0.5 * (1 - 750 / 40000), rel=1e-4)
    assert train.lr_factor(1500, args) == pytest.approx(1 - 1500 / 40000)
    assert train.lr_factor(40000, args) == 0


def test_pseudo_label_confidence_is_fraction_above_threshold():
    class Fixed(torch.nn.Module):
        def forward(self, x):
            logits = torch.zeros(1, 2, 2, 2)
            logits[0, 0, 0, 0] = 10.0  # one confident pixel of four
            return logits
    label, q = train.pseudo_label(Fixed(), torch.zeros(1, 3, 2, 2), 0.968)
    assert q.item() == pytest.approx(0.25)
    assert label[0, 0, 0] == 0


@pytest.mark.parametrize("argv, flag", [(["--iters", "0"], "--iters"), (["--batch-size", "0"], "--batch-size"),
                                        (["--mask-ratio", "1.5"], "--mask-ratio"), (["--target", "toy-night"], "pair"),
                                        (["--sync-bn", None], "--sync-bn")])
def test_flags_out_of_range(argv, flag):
    base = {"--source": "gta", "--target": "cityscapes"}
    extra = dict(zip(argv[::2], argv[1::2]))
    base.update(extra)
    with pytest.raises(train.ConfigError, match=flag):
        train.parse_args([x for kv in base.items() for x in kv if x is not None] + ["--device", "cpu"])


AUX_FLAGS = [["--aux", "mic"], ["--aux", "cmim"], ["--aux", "mfm,mic"], ["--recipe", "daformer"]]


@pytest.mark.parametrize("flags", AUX_FLAGS + [["--backbone", "mit_b0", *f] for f in AUX_FLAGS + [["--aux", "mfm"]]])
def test_auxiliaries_and_daformer_extras_run_through_the_cli(tmp_path, flags):
    """Two iterations of each comparison auxiliary (baselines.py), with DeepLabV2 and with MiT-B0 + DAFormer head,
    through train.main: finite losses, logged; training-only modules never in model.pt."""
    out = tmp_path / "run"
    train.main(["--source", "toy-day", "--target", "toy-night", "--out", str(out), "--iters", "2", "--log-every", "1",
                "--eval-every", "0", "--vis-every", "0", "--mfm-dim", "64", "--mfm-heads", "4", *flags])
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    names = {"mic": ["loss_mic"], "cmim": ["loss_cmim"], "mfm,mic": ["loss_mfm", "loss_mic"], "mfm": ["loss_mfm"],
             "daformer": ["loss_fd", "loss_mfm"]}[flags[-1]]
    assert all(np.isfinite(r[name]) for r in records for name in names + ["loss_src", "loss_mix"])
    ckpt = torch.load(out / "ckpt.pt", weights_only=True)
    assert ("cmim_head" in ckpt) == (flags[-1] == "cmim")
    assert ckpt["model_config"]["backbone"] == ("mit_b0" if "mit_b0" in flags else "resnet18")
    exported = torch.load(out / "model.pt", weights_only=True)["model"]
    assert not any(k.startswith(("rebuilder", "cmim")) for k in exported)


def test_unknown_aux_is_named():
    with pytest.raises(train.ConfigError, match="mae"):
        train.parse_args(["--source", "toy-day", "--target", "toy-night", "--aux", "mfm,mae"])


# ----------------------------------------------------------------------------- what a new user hits (#12)
def strict_json_lines(path):
    def refuse(token):
        raise ValueError(f"non-standard JSON token {token}")
    return [json.loads(line, parse_constant=refuse) for line in Path(path).read_text().splitlines()]


def test_log_is_strict_json_holds_the_last_iteration_and_the_final_model_is_the_result(tmp_path, capsys):
    """3 iterations with --log-every 10: the last iteration's losses are still logged; an evaluation with absent
    classes (NaN IoU) is written as null; the last line reports the final model, with no best-on-val pick."""
    out = tmp_path / "run"
    train.main(["--source", "toy-day", "--target", "toy-night", "--out", str(out), "--iters", "3", "--log-every", "10",
                "--eval-every", "3", "--vis-every", "0", "--no-mfm"])
    records = strict_json_lines(out / "log.jsonl")
    assert [r["step"] for r in records if "loss_mix" in r] == [3]
    ious = [r for r in records if "eval" in r][0]["eval"]["iou"]
    assert None in ious  # the toy has no wall, truck, ... : null, not NaN
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert "final model" in last and "best" not in last
    assert not (out / "model_best.pt").exists()


def test_source_only_reads_no_target_training_images(tmp_path, monkeypatch):
    loaded = []
    real = data.SegDataset.load

    def spy(self, i):
        loaded.append((self.name, self.split, self.train))
        return real(self, i)
    monkeypatch.setattr(data.SegDataset, "load", spy)
    train.main(["--source", "toy-day", "--target", "toy-night", "--out", str(tmp_path / "run"), "--iters", "2",
                "--eval-every", "0", "--vis-every", "0", "--source-only"])
    assert ("toy-night", "train", True) not in loaded and ("toy-day", "train", True) in loaded


def test_synthia_benchmark_runs_from_official_layout_to_its_first_step(fake_data, tmp_path):
    """The paper's second experiment with the default network (ResNetV1c-101 DeepLabV2): SYNTHIA's 16-bit labels
    are read with the packages of requirements.txt; one step, then the result over 16 and 13 classes."""
    pytest.importorskip("cv2")
    from conftest import write_png16, write_rgb
    rng, root = np.random.default_rng(0), tmp_path / "data"
    for i in range(2):
        write_rgb(root / f"synthia/RGB/{i:07d}.png", rng, 96, 48)
        ids = np.zeros((48, 96, 3), np.uint16)
        ids[..., 0] = rng.choice([1, 2, 3, 8, 10, 21, 99], (48, 96))  # 99: outside the table -> ignored
        write_png16(root / f"synthia/GT/LABELS/{i:07d}.png", ids)
    (root / "cityscapes").symlink_to(fake_data / "cityscapes")
    out = cli("train.py", "--source", "synthia", "--target", "cityscapes", "--data-root", root,
              "--out", tmp_path / "run", "--pretrained", "none", "--crop-size", 32, "--iters", 1, "--eval-every", 1,
              "--mfm-dim", 64, "--mfm-heads", 4).stdout
    assert "mIoU16" in out and "mIoU13" in out
    config = json.loads((tmp_path / "run/config.json").read_text())["config"]
    assert config["backbone"] == "resnet101-v1c"


@pytest.mark.parametrize("flags", [["--crop-size", "32"], ["--recipe", "hrda", "--crop-size", "64"]])
def test_compile_smoke(tmp_path, flags, monkeypatch):
    """--compile runs the student's encode/decode through torch.compile (the light 'eager' backend here: the
    inductor backend's C++ build does not fit the CPU test budget); the checkpoint keeps plain weight names.
    Under HRDA the network inside is compiled: its input sizes stay fixed while the detail box moves."""
    compiled, compile_ = [], torch.compile
    monkeypatch.setattr(torch, "compile", lambda f, **k: compiled.append(type(f.__self__).__name__) or compile_(f, **k))
    out = tmp_path / "run"
    train.main(["--source", "toy-day", "--target", "toy-night", "--out", str(out), "--iters", "1", *flags,
                "--eval-every", "0", "--vis-every", "0", "--mfm-dim", "64", "--mfm-heads", "4", "--compile", "eager"])
    ckpt = torch.load(out / "ckpt.pt", weights_only=True)
    assert ckpt["step"] == 1 and not any("_orig_mod" in k for k in ckpt["model"])
    assert compiled == ["DeepLabV2", "DeepLabV2"]
