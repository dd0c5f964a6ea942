"""The semi-supervised setting (S4MIM's): --labeled N|FILE through train.main on an official-layout Cityscapes tree
and on the toy; the split file round-trips; every mistake is a one-line error naming the flag or file."""
import json

import pytest
import torch

import data
import train
from conftest import train_error

TINY = ["--backbone", "resnet18", "--pretrained", "none", "--crop-size", "32", "--mfm-dim", "64", "--mfm-heads", "4",
        "--eval-every", "0", "--vis-every", "0", "--log-every", "1"]


def semi(fake_data, out, labeled, *extra):
    return train.main(["--source", "cityscapes", "--target", "cityscapes", "--data-root", str(fake_data),
                       "--labeled", str(labeled), "--out", str(out), "--iters", "2", *TINY, *extra])


@pytest.mark.parametrize("mode", [[], ["--source-only"], ["--no-mfm"], ["--aux", "cmim"]])
def test_labeled_count_trains_every_mode_and_writes_a_split_that_round_trips(fake_data, tmp_path, mode):
    out = tmp_path / "run"
    semi(fake_data, out, 1, *mode)
    split = (out / "labeled.txt").read_text().split()
    assert len(split) == 2 and split[0].startswith("leftImg8bit/train/") and split[1].endswith("_labelTrainIds.png")
    keys = data.labeled_split("cityscapes", fake_data, out / "labeled.txt", seed=5)
    assert keys == data.labeled_split("cityscapes", fake_data, 1, seed=0)  # the seeded draw, read back
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2] and ("loss_mix" in records[0]) == (mode != ["--source-only"])
    config = json.loads((out / "config.json").read_text())["config"]
    assert config["labeled"] == "1" and config["source"] == config["target"] == "cityscapes"


def test_labeled_split_file_is_the_labelled_set(fake_data, tmp_path, monkeypatch):
    """--labeled FILE: exactly the images the file names are the labelled source; every train image is a target."""
    split = tmp_path / "split.txt"
    data.write_split(split, "cityscapes", data.labeled_split("cityscapes", fake_data, 1, seed=3))
    built, real = [], data.build_dataset

    def spy(name, root, split, **kwargs):
        built.append((split, kwargs.get("keys") is not None, real(name, root, split, **kwargs)))
        return built[-1][2]
    monkeypatch.setattr(data, "build_dataset", spy)
    semi(fake_data, tmp_path / "run", split)
    (labelled,) = [ds for _, keyed, ds in built if keyed]
    (target,) = [ds for split_name, keyed, ds in built if split_name == "train" and not keyed]
    assert [s[2] for s in labelled.samples] == data.labeled_split("cityscapes", fake_data, split, seed=0)
    assert len(labelled) == 1 and len(target) == 2  # the labelled images are unlabelled targets too
    assert (tmp_path / "run/labeled.txt").read_text().split() == split.read_text().split()


def test_toy_semi_supervised_runs(tmp_path):
    out = tmp_path / "run"
    train.main(["--source", "toy-night", "--target", "toy-night", "--labeled", "20", "--out", str(out), "--iters", "2",
                "--mfm-dim", "64", "--mfm-heads", "4", "--eval-every", "2", "--vis-every", "0"])
    assert len((out / "labeled.txt").read_text().split()) == 20
    assert torch.load(out / "ckpt.pt", weights_only=True)["step"] == 2


def test_semi_supervised_errors_name_the_flag_or_file(fake_data, tmp_path):
    base = ["--source", "cityscapes", "--target", "cityscapes", "--data-root", str(fake_data), *TINY]
    assert "--labeled" in train_error([*base, "--labeled", "3", "--out", str(tmp_path / "a")])  # 2 train images
    missing = tmp_path / "missing.txt"
    missing.write_text("leftImg8bit/train/aachen/aachen_999999_000019_leftImg8bit.png")
    assert "aachen_999999_000019" in train_error([*base, "--labeled", str(missing), "--out", str(tmp_path / "b")])
    garbage = tmp_path / "garbage.txt"
    garbage.write_text("this is not a split file\n")
    assert "garbage.txt" in train_error([*base, "--labeled", str(garbage), "--out", str(tmp_path / "c")])
    assert "--labeled" in train_error(["--source", "gta", "--target", "cityscapes", "--labeled", "10", "--device", "cpu"])
    assert "--labeled" in train_error(["--source", "cityscapes", "--target", "cityscapes", "--device", "cpu"])
