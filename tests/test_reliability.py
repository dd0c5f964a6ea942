"""Faults and bad input: an interrupted run loses at most the steps since its last checkpoint, and every mistake
a user can make ends in a one-paragraph message naming the thing and what was expected (exit code != 0)."""
import errno
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import data
import models
import train
from conftest import write_ids, write_png16, write_rgb

ROOT = Path(__file__).resolve().parents[1]
FAST = ["--source", "toy-day", "--target", "toy-night", "--deterministic", "--mfm-dim", "64", "--mfm-heads", "4",
        "--eval-every", "0", "--vis-every", "0"]


def run_cli(script, *args):
    return subprocess.run([sys.executable, str(ROOT / script), *map(str, args)], capture_output=True, text=True,
                          timeout=600, cwd=ROOT)


def spawn(*args):
    return subprocess.Popen([sys.executable, str(ROOT / "train.py"), *map(str, args)], cwd=ROOT, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def wait_for(condition, proc, timeout=300):
    start = time.time()
    while not condition():
        assert proc.poll() is None, proc.communicate()
        assert time.time() - start < timeout
        time.sleep(0.2)


def weights(path):
    ckpt = torch.load(path, weights_only=True)
    return {f"{part}.{k}": v for part in ("model", "teacher", "rebuilder") for k, v in (ckpt.get(part) or {}).items()}


def main_error(capsys, *argv):
    """train.main in this process (no interpreter start-up): the SystemExit message plus what argparse printed."""
    with pytest.raises(SystemExit) as stop:
        train.main([str(a) for a in argv])
    return subprocess.CompletedProcess(argv, stop.value.code or 0, "", str(stop.value.code) + capsys.readouterr().err)


def assert_clean_error(out, *needles):
    assert out.returncode != 0
    assert "Traceback" not in out.stderr, out.stderr
    for needle in needles:
        assert str(needle) in out.stderr, (needle, out.stderr)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted 20-iteration run (source-only and 32-px crops keep it fast; test_train resumes the method)."""
    out = tmp_path_factory.mktemp("ref") / "run"
    assert run_cli("train.py", *FAST, "--iters", 20, "--crop-size", 32, "--source-only", "--out", out).returncode == 0
    return weights(out / "ckpt.pt")


def test_kill_9_then_resume_gives_the_uninterrupted_weights(tmp_path, reference):
    out = tmp_path / "run"
    flags = [*FAST, "--iters", 20, "--crop-size", 32, "--ckpt-every", 2, "--log-every", 1, "--source-only",
             "--out", out]
    proc = spawn(*flags)
    wait_for(lambda: (out / "ckpt.pt").exists(), proc)
    proc.kill()  # SIGKILL: no handler runs
    proc.wait()
    done = torch.load(out / "ckpt.pt", weights_only=True)["step"]
    assert done in range(2, 20, 2)  # killed before the end, so the resume has work to do
    logged = len((out / "log.jsonl").read_text().splitlines())
    assert run_cli("train.py", *flags, "--resume").returncode == 0
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()[logged:]]
    assert [r["step"] for r in records] == list(range(done + 1, 21))  # it went on from the checkpoint's step
    resumed = weights(out / "ckpt.pt")
    assert all(torch.equal(resumed[k], reference[k]) for k in reference)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_signal_writes_a_checkpoint_and_says_how_to_resume(tmp_path, sig):
    out = tmp_path / "run"
    proc = spawn(*FAST, "--iters", 1000, "--ckpt-every", 0, "--log-every", 1, "--source-only", "--out", out)
    wait_for(lambda: (out / "log.jsonl").exists(), proc)
    proc.send_signal(sig)
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 128 + sig
    assert "--resume" in stderr and "Traceback" not in stderr
    ckpt = torch.load(out / "ckpt.pt", weights_only=True)
    assert 1 <= ckpt["step"] < 1000


def test_corrupt_checkpoint_is_named_and_the_previous_one_survives(tmp_path):
    out = tmp_path / "run"
    first = run_cli("train.py", *FAST, "--iters", 4, "--stop-at", 2, "--ckpt-every", 1, "--source-only", "--out", out)
    assert first.returncode == 0
    good = out / "ckpt.prev.pt"
    assert torch.load(good, weights_only=True)["step"] == 1
    (out / "ckpt.pt").write_bytes((out / "ckpt.pt").read_bytes()[:5000])  # killed while writing
    res = run_cli("train.py", *FAST, "--iters", 4, "--source-only", "--out", out, "--resume")
    assert_clean_error(res, out / "ckpt.pt", good)
    res = run_cli("train.py", *FAST, "--iters", 4, "--source-only", "--out", out, "--resume", good)
    assert res.returncode == 0, res.stderr[-2000:]
    assert torch.load(out / "ckpt.pt", weights_only=True)["step"] == 4


def test_full_disk_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "ckpt.pt"
    models.atomic_save({"step": 1}, path)

    def full(obj, f):
        Path(f).write_bytes(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(torch, "save", full)
    with pytest.raises(models.WeightsError, match="No space left"):
        models.atomic_save({"step": 2}, path)
    monkeypatch.undo()
    assert torch.load(path, weights_only=True) == {"step": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.pt"]  # no temp file left behind


def test_unwritable_out_is_a_clean_error(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    assert_clean_error(main_error(capsys, *FAST, "--iters", 1, "--out", blocker / "run"), blocker)


def nan_after(monkeypatch, calls):
    """Make the source loss NaN from its `calls`-th call on."""
    real, count = train.source_loss, [0]

    def flaky(*args):
        count[0] += 1
        loss, feats = real(*args)
        return (loss * float("nan") if count[0] >= calls else loss), feats
    monkeypatch.setattr(train, "source_loss", flaky)


def test_nan_loss_stops_naming_the_step_and_term(tmp_path, monkeypatch):
    out = tmp_path / "run"
    nan_after(monkeypatch, 3)
    with pytest.raises(SystemExit) as stop:
        train.main([*FAST, "--iters", "5", "--ckpt-every", "1", "--source-only", "--out", str(out)])
    assert "loss_src" in str(stop.value) and "step 2" in str(stop.value)
    ckpt = torch.load(out / "ckpt.pt", weights_only=True)
    assert ckpt["step"] == 2 and all(torch.isfinite(v).all() for v in ckpt["model"].values())


def test_skip_nonfinite_goes_on(tmp_path, monkeypatch):
    out = tmp_path / "run"
    nan_after(monkeypatch, 2)
    train.main([*FAST, "--iters", "3", "--source-only", "--skip-nonfinite", "--out", str(out)])
    skipped = [r for r in map(json.loads, (out / "log.jsonl").read_text().splitlines()) if "skipped" in r]
    assert [r["step"] for r in skipped] == [2, 3]
    ckpt = torch.load(out / "ckpt.pt", weights_only=True)
    assert ckpt["step"] == 3 and all(torch.isfinite(v).all() for v in ckpt["model"].values())


# ----------------------------------------------------------------------------- bad input through the CLIs
def test_missing_data_root_and_wrong_layout(tmp_path, capsys):
    res = main_error(capsys, "--source", "gta", "--target", "cityscapes", "--data-root", tmp_path / "nowhere",
                     "--pretrained", "none", "--device", "cpu", "--out", tmp_path / "a")
    assert_clean_error(res, tmp_path / "nowhere", "images")
    (tmp_path / "flat/gta").mkdir(parents=True)
    write_rgb(tmp_path / "flat/gta/00001.png", np.random.default_rng(0), 32, 16)  # images not in images/
    res = main_error(capsys, "--source", "gta", "--target", "cityscapes", "--data-root", tmp_path / "flat",
                     "--pretrained", "none", "--device", "cpu", "--out", tmp_path / "b")
    assert_clean_error(res, "gta/images")


@pytest.mark.parametrize("flags, needle", [
    (["--mask-ratio", "0"], "--mask-ratio"), (["--mask-ratio", "1"], "--mask-ratio"), (["--iters", "0"], "--iters"),
    (["--batch-size", "-1"], "--batch-size"), (["--crop-size", "100"], "crop_size 100"),
    (["--source", "gta5"], "invalid choice")])
def test_flags_out_of_range_are_named(tmp_path, capsys, flags, needle):
    # argparse keeps the last occurrence of a flag, so `flags` override FAST
    assert_clean_error(main_error(capsys, *FAST, *flags, "--out", tmp_path / "run"), needle)


def test_resume_with_another_config_lists_the_fields(tmp_path):
    out = tmp_path / "run"
    assert run_cli("train.py", *FAST, "--iters", 1, "--source-only", "--out", out).returncode == 0
    res = run_cli("train.py", *FAST, "--iters", 1, "--out", out, "--resume", "--seed", 3, "--mask-ratio", 0.5)
    assert_clean_error(res, "--seed", "--mask-ratio", "--source-only")


def test_eval_on_a_checkpoint_with_another_number_of_classes(tmp_path):
    model = models.DeepLabV2(num_classes=7, backbone="resnet18")
    torch.save({"model": model.state_dict(), "model_config": model.config}, tmp_path / "model.pt")
    res = run_cli("eval.py", "--ckpt", tmp_path / "model.pt", "--target", "toy-night", "--workers", 0)
    assert_clean_error(res, "7 classes", "19")
    (tmp_path / "broken.pt").write_bytes(b"\x00" * 100)
    assert_clean_error(run_cli("eval.py", "--ckpt", tmp_path / "broken.pt", "--target", "toy-night"), "broken.pt")


def test_label_problems_are_named(tmp_path):
    rng = np.random.default_rng(0)
    root = tmp_path / "data"
    write_rgb(root / "gta/images/00001.png", rng, 64, 32)
    write_ids(root / "gta/labels/00001.png", np.full((32, 64), 200), palette=True)  # ids outside the table
    with pytest.raises(data.DatasetError, match="id 200"):
        data.build_dataset("gta", root, train=False)[0]
    write_ids(root / "gta/labels/00001.png", np.full((16, 64), 7), palette=True)  # wrong size
    with pytest.raises(data.DatasetError, match="00001.png"):
        data.build_dataset("gta", root, train=False)[0]
    pytest.importorskip("cv2")
    write_rgb(root / "synthia/RGB/0000000.png", rng, 64, 32)
    write_ids(root / "synthia/GT/LABELS/0000000.png", np.full((32, 64), 3), palette=False)  # 8-bit, not 16
    with pytest.raises(data.DatasetError, match="8-bit"):
        data.build_dataset("synthia", root, train=False)[0]
    write_png16(root / "synthia/GT/LABELS/0000000.png", np.full((32, 64, 3), 3, np.uint16))
    assert data.build_dataset("synthia", root, train=False)[0][1].unique().tolist() == [0]  # id 3 -> road
