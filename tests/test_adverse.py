"""Cityscapes -> ACDC and Cityscapes -> Dark Zurich (../shared/docs/ADVERSE.md), and segmenting your own pictures.
Tiny trees in the official layouts are written here (ACDC as its zips unpack and as the anchors' rsync flattens it,
Dark Zurich as its zips unpack); their readers; the mIoU per ACDC condition against a case worked out by hand;
a few training iterations of each pair (DAFormer recipe with MiT-B0, HRDA) evaluated by eval.py; the server files
of an unlabelled test split; eval.py --images on a JPEG and a PNG of odd sizes.

    python -m pytest tests/test_adverse.py -q
"""
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import Recorder, make_gta_cityscapes, meta_step_syncs, write_rgb
from PIL import Image

import baselines
import data
import eval as evaluation
import models
import train
from data import DatasetError, build_dataset

CONDITIONS = ("fog", "night", "rain", "snow")
SMALL = ["--resize-scale", "0.125", "--crop-size", "64", "--pretrained", "none", "--backbone", "mit_b0",
         "--mfm-dim", "64", "--mfm-heads", "4", "--iters", "2", "--eval-every", "2", "--vis-every", "0",
         "--log-every", "1"]  # Cityscapes 128x64, ACDC / Dark Zurich 120x68: 64-px crops


# ----------------------------------------------------------------------------- writers of the official trees
def write_trainids(path, ids):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.asarray(ids, np.uint8)).save(path)  # 8-bit grey, as the downloads' *_labelTrainIds.png


def trainids(rng, w, h):
    """Blocky trainIds: stripes of road, car, sky and ignored (255) pixels; random classes in the top quarter."""
    ids = np.repeat(np.array([0, 13, 10, 255], np.uint8), -(-w // 4))[None, :w].repeat(h, 0)
    ids[: h // 4] = rng.choice([0, 1, 2, 8, 11, 13], (h // 4, w))
    return ids


def make_acdc(root, flattened=False, conditions=CONDITIONS, size=(96, 54)):
    """root/acdc as rgb_anon_trainvaltest.zip and gt_trainval.zip unpack: per condition one sequence with one image
    per split (train, val, test; ground truth for train and val), plus what a reader must pass over (the daytime
    reference images of <split>_ref, the labelIds ground truth). flattened: the tree the anchors' rsync commands
    make (rgb_anon/<split>/*, gt/<split>/*_labelTrainIds.png), without the condition folders."""
    rng, (w, h) = np.random.default_rng(0), size
    for i, cond in enumerate(conditions):
        seq = f"GOPR0{i}75"
        for split in ("train", "val", "test"):
            stem = f"{seq}_frame_{len(split):06d}"
            where = split if flattened else f"{cond}/{split}/{seq}"
            write_rgb(root / f"acdc/rgb_anon/{where}/{stem}_rgb_anon.png", rng, w, h)
            if split != "test":
                write_trainids(root / f"acdc/gt/{where}/{stem}_gt_labelTrainIds.png", trainids(rng, w, h))
            if not flattened:
                write_trainids(root / f"acdc/gt/{where}/{stem}_gt_labelIds.png", np.full((h, w), 7))
                write_rgb(root / f"acdc/rgb_anon/{cond}/{split}_ref/{seq}/{stem}_rgb_ref_anon.png", rng, w, h)
    return root


def make_dark_zurich(root, size=(96, 54)):
    """root/dark_zurich as Dark_Zurich_{train,val}_anon.zip and the test zip unpack: train day / night / twilight
    sequences (no ground truth), two val night images with theirs, two test night images."""
    rng, (w, h) = np.random.default_rng(1), size
    for part, n in (("day", 1), ("night", 2), ("twilight", 1)):
        for f in range(n):
            write_rgb(root / f"dark_zurich/rgb_anon/train/{part}/GOPR0{len(part)}48/GOPR0{len(part)}48_frame_"
                      f"{f:06d}_rgb_anon.png", rng, w, h)
    for split, seq in (("val", "GOPR0356"), ("test", "GOPR0364")):
        for f in range(2):
            write_rgb(root / f"dark_zurich/rgb_anon/{split}/night/{seq}/{seq}_frame_{f:06d}_rgb_anon.png", rng, w, h)
            if split == "val":
                gt = root / f"dark_zurich/gt/val/night/{seq}/{seq}_frame_{f:06d}"
                write_trainids(Path(f"{gt}_gt_labelTrainIds.png"), trainids(rng, w, h))
                write_trainids(Path(f"{gt}_gt_labelIds.png"), np.full((h, w), 7))
    return root


@pytest.fixture(scope="module")
def adverse_root(tmp_path_factory):
    """Cityscapes (the source), ACDC as its zips unpack, Dark Zurich, under one data root."""
    root = make_gta_cityscapes(tmp_path_factory.mktemp("adverse"), n_gta=0, size=(128, 64))
    return make_dark_zurich(make_acdc(root))


# ----------------------------------------------------------------------------- readers
def test_acdc_as_its_zips_unpack(tmp_path):
    make_acdc(tmp_path)
    val = build_dataset("acdc", tmp_path, "val", train=False)
    keys = [s[2] for s in val.samples]  # the label's path under acdc/gt, condition first
    assert [k.split("/")[:2] for k in keys] == [[c, "val"] for c in CONDITIONS]
    assert [data.condition("acdc", k) for k in keys] == list(CONDITIONS)
    img, lbl, key = val[1]
    written = np.asarray(Image.open(tmp_path / "acdc/gt" / key))
    assert key.endswith("_gt_labelTrainIds.png") and torch.equal(lbl, torch.from_numpy(written.astype(np.int64)))
    assert img.shape == (3, 540, 960)  # DAFormer's 960x540 (ADVERSE.md §1)
    assert len(build_dataset("acdc", tmp_path, "train", train=False)) == 4  # gt_trainval holds train labels too
    for path in (tmp_path / "acdc/gt").rglob("*"):  # the training target needs no ground truth at all
        if path.is_file():
            path.unlink()
    tgt = build_dataset("acdc", tmp_path, "train", crop_size=64, resize=(120, 68), frame=True, labels=False)
    assert len(tgt) == 4 and sorted(data.condition("acdc", s[2]) for s in tgt.samples) == list(CONDITIONS)
    x, y, frame = tgt[0]
    assert x.shape == (3, 64, 64) and (y == 255).all() and frame[2] == 120
    assert not data.has_labels("acdc", "test") and data.has_labels("acdc", "val")
    test = build_dataset("acdc", tmp_path, "test", train=False, labels=False)
    assert [s[2].split("/")[1] for s in test.samples] == ["test"] * 4 and (test[0][1] == 255).all()


def test_acdc_flattened_by_rsync_and_both_trees_at_once(tmp_path):
    make_acdc(tmp_path / "flat", flattened=True)
    flat = build_dataset("acdc", tmp_path / "flat", "val", train=False)
    assert len(flat) == 4 and all("/" not in s[2] and data.condition("acdc", s[2]) is None for s in flat.samples)
    assert len(build_dataset("acdc", tmp_path / "flat", "train", labels=False)) == 4
    make_acdc(tmp_path / "flat")  # rsync copies: the zips' tree is still there, and it is the one read
    both = build_dataset("acdc", tmp_path / "flat", "val", train=False)
    assert len(both) == 4 and [data.condition("acdc", s[2]) for s in both.samples] == list(CONDITIONS)


def test_dark_zurich_trains_on_night_and_scores_val(tmp_path):
    make_dark_zurich(tmp_path)
    tgt = build_dataset("dark_zurich", tmp_path, "train", crop_size=32, labels=False)
    assert [Path(s[0]).parts[-3] for s in tgt.samples] == ["night", "night"]  # day and twilight are not read
    assert not data.has_labels("dark_zurich", "train") and not data.has_labels("dark_zurich", "test")
    val = build_dataset("dark_zurich", tmp_path, "val", train=False)
    assert [s[2] for s in val.samples] == [f"night/GOPR0356/GOPR0356_frame_{f:06d}_gt_labelTrainIds.png"
                                           for f in range(2)]
    assert set(val[0][1].unique().tolist()) <= {0, 1, 2, 8, 10, 11, 13, 255}
    test = build_dataset("dark_zurich", tmp_path, "test", train=False, labels=False)
    assert len(test) == 2 and all(s[1] is None for s in test.samples)
    with pytest.raises(DatasetError, match="gt/test"):  # there is no test ground truth to read
        build_dataset("dark_zurich", tmp_path, "test", train=False)


def test_trainid_labels_keep_0_to_18_and_255_and_ignore_the_rest(tmp_path):
    make_dark_zurich(tmp_path)
    path = next((tmp_path / "dark_zurich/gt/val").rglob("*_frame_000000_gt_labelTrainIds.png"))
    ids = np.full((54, 96), 255, np.uint8)
    ids[10:, :] = np.arange(96) % 19  # trainIds 0-18 kept; 57% of the pixels 255 (a dark image): no error
    ids[10, :3] = (19, 40, 254)  # values no trainId file holds: ignored, counted, warned once
    write_trainids(path, ids)
    val = build_dataset("dark_zurich", tmp_path, "val", train=False)
    with pytest.warns(UserWarning, match=r"3 pixels of id 254 .*outside the trainIds 0-18 and 255"):
        lbl = val[0][1]
    expected = ids.astype(np.int64)
    expected[10, :3] = 255
    assert torch.equal(lbl, torch.from_numpy(expected)) and val.outside_pixels == 3
    write_trainids(path, np.full((54, 96), 26))  # a labelIds file under the trainIds name
    with pytest.raises(DatasetError, match=r"holds ids outside the trainIds 0-18 and 255 in 100% .*labelTrainIds"):
        val[0]


def test_missing_folders_and_unpaired_files_are_named(tmp_path):
    with pytest.raises(DatasetError, match=r"acdc/rgb_anon/val not found(.|\n)*<condition>/<split>/<sequence>"):
        build_dataset("acdc", tmp_path, "val", train=False)
    with pytest.raises(DatasetError, match=r"rgb_anon/train/night not found(.|\n)*gt/val/night"):
        build_dataset("dark_zurich", tmp_path, "train", labels=False)
    make_acdc(tmp_path, conditions=("fog", "night"))
    (tmp_path / "acdc/gt/night/val/GOPR0175/GOPR0175_frame_000003_gt_labelTrainIds.png").unlink()
    with pytest.warns(UserWarning, match=r"skipping 1 unpaired .*night/val/GOPR0175/GOPR0175_frame_000003"):
        assert len(build_dataset("acdc", tmp_path, "val", train=False)) == 1
    (tmp_path / "acdc/gt/fog/val/GOPR0075/GOPR0075_frame_000003_gt_labelTrainIds.png").unlink()
    with pytest.raises(DatasetError, match=r"no images \*/val/\*\*/\*_rgb_anon.png with labels"), pytest.warns(
            UserWarning):
        build_dataset("acdc", tmp_path, "val", train=False)


# ----------------------------------------------------------------------------- scores per condition, by hand
class RoadEverywhere(torch.nn.Module):
    """Predicts road (trainId 0) at every pixel."""
    config = {"num_classes": 19}

    def forward(self, x):
        logits = torch.zeros(x.shape[0], 19, *x.shape[-2:])
        logits[:, 0] = 1
        return logits


def test_the_miou_of_each_condition_checked_by_hand(tmp_path):
    make_acdc(tmp_path, conditions=("fog", "night"), size=(8, 4))
    gt = {c: next((tmp_path / f"acdc/gt/{c}/val").rglob("*_labelTrainIds.png")) for c in ("fog", "night")}
    write_trainids(gt["fog"], np.zeros((4, 8)))  # fog: all road
    write_trainids(gt["night"], np.repeat([[0] * 4 + [10] * 4], 4, 0))  # night: left half road, right half sky
    val = build_dataset("acdc", tmp_path, "val", train=False, resize=(16, 8))
    result = evaluation.evaluate(RoadEverywhere(), val, progress=False)
    # fog: road 32/32 -> mIoU 100. night: road TP 16 / (16 label + 32 predicted - 16) = 50, sky 0 / 16 = 0 -> 25.
    # all: road 48 / (48 + 64 - 48) = 75, sky 0 -> 37.5, not the mean of the conditions (62.5)
    assert (result["mIoU"], result["conditions"]["fog"]["mIoU"], result["conditions"]["night"]["mIoU"]) == (
        37.5, 100.0, 25.0)
    assert result["conditions"]["night"]["images"] == 1 and result["conditions"]["night"]["iou"][10] == 0.0
    table = evaluation.format_table(result)
    assert re.search(r"road +75\.00 +100\.00 +50\.00", table) and "fog 100.00 (1 images), night 25.00" in table
    make_acdc(tmp_path / "flat", flattened=True, conditions=("fog", "night"), size=(8, 4))
    flat = evaluation.evaluate(RoadEverywhere(), build_dataset("acdc", tmp_path / "flat", "val", train=False,
                                                               resize=(16, 8)), progress=False)
    assert "conditions" not in flat and "does not keep the condition folders" in evaluation.format_table(flat)


# ----------------------------------------------------------------------------- the pairs' settings
def test_the_pairs_take_the_anchors_settings():
    def resolved(target, *flags):
        return train.parse_args(["--source", "cityscapes", "--target", target, "--device", "cpu", *flags])
    for target in ("acdc", "dark_zurich"):
        daformer = resolved(target, "--recipe", "daformer", "--backbone", "mit_b5", "--aux", "mfm,mic")
        assert (daformer.crop_size, daformer.resize_scale, daformer.iters, daformer.lr) == (512, 1.0, 40_000, 6e-5)
        assert (daformer.rcs, daformer.fd, daformer.pl_crop, daformer.mic_mode) == (True, True, True, "separate")
        hrda = resolved(target, "--recipe", "hrda", "--backbone", "mit_b5", "--aux", "mic")
        assert (hrda.crop_size, hrda.resize_scale, hrda.mic_block, hrda.rcs) == (1024, 2.0, 64, True)
        assert not hrda.pl_crop and hrda.mic_mode == "separate"  # no rectification artefacts (ADVERSE.md §1)
        assert resolved(target, "--recipe", "hrda", "--pl-crop").pl_crop  # asked for: kept
        assert resolved(target, "--mic-mode", "separatetrgaug").mic_mode == "separatetrgaug"
    gta = train.parse_args(["--source", "gta", "--target", "cityscapes", "--recipe", "hrda", "--device", "cpu"])
    assert gta.pl_crop and gta.mic_mode == "separatetrgaug"
    assert data.RESIZE["acdc"] == data.RESIZE["dark_zurich"] == (960, 540) and data.RESIZE["cityscapes"] == (1024, 512)


def test_mic_separate_masks_one_source_and_one_target_crop_unaugmented():
    torch.manual_seed(0)
    x_src, x_tgt = torch.rand(2, 3, 16, 16), torch.rand(2, 3, 16, 16)
    y_src, pl = torch.randint(0, 19, (2, 16, 16)), torch.randint(0, 19, (2, 16, 16))
    weight = torch.rand(2, 16, 16)
    student = Recorder()
    loss, keep = baselines.mic_loss(student, x_tgt, pl, weight, block=4, ratio=0.5, return_mask=True,
                                    src=(x_src, y_src))
    seen = student.seen
    plain = torch.stack([x_src[0], x_tgt[0]])  # source 0, target 0, no colour augmentation (MIC's `separate`)
    fill = torch.tensor(models.IMAGENET_MEAN).view(1, 3, 1, 1).expand_as(plain)
    assert torch.equal(seen[0], torch.where(keep.bool(), plain, fill))
    assert torch.equal(seen[1], torch.stack([y_src[0], pl[0]]))
    assert torch.equal(seen[2], torch.stack([torch.ones(16, 16), weight[0]]))  # source pixels weigh 1
    assert torch.isfinite(loss)


@pytest.mark.parametrize("mode", ["separate", "separatetrgaug"])
def test_the_step_gives_mic_the_source_batch_in_separate_mode(mode, monkeypatch):
    args = train.parse_args(["--source", "toy-day", "--target", "toy-night", "--backbone", "mit_b0", "--pretrained",
                             "none", "--crop-size", "32", "--device", "cpu", "--aux", "mic", "--mic-mode", mode])
    calls, mic_loss = [], baselines.mic_loss

    def spy(*a, **kw):
        calls.append(kw["src"])
        return mic_loss(*a, **kw)
    monkeypatch.setattr(baselines, "mic_loss", spy)
    torch.manual_seed(0)
    x_src, y_src, x_tgt = torch.rand(2, 3, 32, 32), torch.randint(0, 19, (2, 32, 32)), torch.rand(2, 3, 32, 32)
    values, _ = train.train_step(train.build_run(args, 19), x_src, y_src, x_tgt, 0, args)
    assert np.isfinite(values["loss_mic"])
    assert calls[0] is None if mode == "separatetrgaug" else calls[0][0] is x_src and calls[0][1] is y_src


def test_mic_separate_waits_for_the_gpu_no_more_than_the_step():
    """Counted on the meta device (conftest.HostSyncCounter): one host sync per step, as for GTA -> Cityscapes."""
    counts = meta_step_syncs(["--source", "cityscapes", "--target", "acdc", "--recipe", "daformer", "--backbone",
                              "mit_b0", "--pretrained", "none", "--crop-size", "32", "--aux", "mic"])
    assert counts == {"copy meta->cpu": 1.0}


# ----------------------------------------------------------------------------- training, evaluation, server files
@pytest.fixture(scope="module")
def acdc_run(adverse_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "cs-acdc"
    result = train.main(["--source", "cityscapes", "--target", "acdc", "--recipe", "daformer", "--aux", "mfm,mic",
                         *SMALL, "--data-root", str(adverse_root), "--out", str(out)])
    return out, result


def test_cityscapes_to_acdc_trains_and_scores_each_condition(acdc_run, adverse_root, capsys):
    out, result = acdc_run
    assert 0 <= result["mIoU"] <= 100 and sorted(result["conditions"]) == list(CONDITIONS)
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert {"loss_src", "loss_fd", "loss_mix", "loss_mfm", "loss_mic"} <= {k for r in log for k in r}
    assert sorted(log[-1]["eval"]["conditions"]) == list(CONDITIONS)  # the periodic evaluation has them too
    assert json.loads((out / "config.json").read_text())["config"]["mic_mode"] == "separate"
    evaluation.main(["--ckpt", str(out / "model.pt"), "--target", "acdc", "--data-root", str(adverse_root),
                     "--workers", "0", "--device", "cpu", "--save-pred", str(out / "val_preds")])
    images = (adverse_root / "acdc/rgb_anon").glob("*/val/*/*_rgb_anon.png")  # named after the images, not labels
    assert sorted(p.name for p in (out / "val_preds").iterdir()) == sorted(p.name for p in images)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["mIoU"] == pytest.approx(result["mIoU"], abs=0.01) and metrics["images"] == 4
    assert metrics["conditions"]["fog"]["images"] == 1
    assert metrics["conditions"]["snow"]["mIoU"] == pytest.approx(result["conditions"]["snow"]["mIoU"], abs=0.01)
    assert re.search(r"class +IoU +fog +night +rain +snow", capsys.readouterr().out)


def test_an_unlabelled_test_split_gives_the_server_files(acdc_run, adverse_root, tmp_path):
    out, _ = acdc_run
    argv = ["--ckpt", str(out / "model.pt"), "--target", "acdc", "--split", "test", "--data-root", str(adverse_root),
            "--workers", "0", "--device", "cpu"]
    with pytest.raises(DatasetError, match="acdc test has no labels.*--save-pred"):
        evaluation.main(argv)
    evaluation.main([*argv, "--save-pred", str(tmp_path / "preds")])
    model, _ = evaluation.model_from_checkpoint(out / "model.pt")
    images = sorted((adverse_root / "acdc/rgb_anon").glob("*/test/*/*_rgb_anon.png"))
    assert sorted(p.name for p in (tmp_path / "preds").iterdir()) == sorted(p.name for p in images)  # the stems
    for path in images:
        written = Image.open(tmp_path / "preds" / path.name)
        assert written.mode == "P" and written.getpalette()[:57] == [v for rgb in data.PALETTE for v in rgb]
        rgb = Image.open(path).convert("RGB")
        x = torch.from_numpy(np.asarray(rgb.resize((120, 68), Image.BILINEAR)).copy()).permute(2, 0, 1)[None] / 255
        with torch.no_grad():
            pred = models.upsample(model(x), (rgb.height, rgb.width)).argmax(1)[0]
        assert np.array_equal(np.asarray(written), pred.numpy())  # trainIds at the image's size


def test_cityscapes_to_dark_zurich_trains_under_hrda_and_segments_pictures(adverse_root, tmp_path):
    out = tmp_path / "cs-dz"
    result = train.main(["--source", "cityscapes", "--target", "dark_zurich", "--recipe", "hrda", "--aux", "mfm,mic",
                         *SMALL, "--data-root", str(adverse_root), "--out", str(out)])
    assert 0 <= result["mIoU"] <= 100 and result["images"] == 2 and "conditions" not in result
    assert json.loads((out / "config.json").read_text())["config"]["pl_crop"] is False
    pictures = tmp_path / "pictures"
    write_rgb(pictures / "dashcam.jpg", np.random.default_rng(2), 301, 170)
    evaluation.main(["--ckpt", str(out / "model.pt"), "--images", str(pictures), "--out", str(tmp_path / "seen"),
                     "--device", "cpu"])  # HRDA: 301x170 -> 120x68, its sliding windows of 64 at stride 32
    assert Image.open(tmp_path / "seen/dashcam_trainIds.png").size == (301, 170)


@pytest.mark.parametrize("target, recipe", [("acdc", "hrda"), ("dark_zurich", "daformer")])
def test_each_pair_trains_under_the_other_recipe_too(adverse_root, tmp_path, target, recipe):
    out = tmp_path / "run"
    result = train.main(["--source", "cityscapes", "--target", target, "--recipe", recipe, *SMALL,
                         "--data-root", str(adverse_root), "--out", str(out)])
    assert ("conditions" in result) == (target == "acdc") and 0 <= result["mIoU"] <= 100
    config = json.loads((out / "config.json").read_text())["config"]
    assert config["pl_crop"] == (recipe == "daformer") and config["resize_scale"] == 0.125
    evaluation.main(["--ckpt", str(out / "model.pt"), "--target", target, "--data-root", str(adverse_root),
                     "--workers", "0", "--device", "cpu"])
    assert json.loads((out / "metrics.json").read_text())["mIoU"] == pytest.approx(result["mIoU"], abs=0.01)


# ----------------------------------------------------------------------------- your own pictures
def test_keep_ratio_size_as_mmcv():
    assert evaluation.keep_ratio_size(1920, 1080, (960, 540)) == (960, 540)
    assert evaluation.keep_ratio_size(1080, 1920, (960, 540)) == (540, 960)  # portrait: long side 960
    assert evaluation.keep_ratio_size(2048, 1024, (960, 540)) == (960, 480)  # long side limits
    assert evaluation.keep_ratio_size(640, 480, (960, 540)) == (720, 540)  # short side limits, upscaled
    assert evaluation.keep_ratio_size(37, 23, (128, 64)) == (103, 64)  # int(37 * 64 / 23 + 0.5)


def test_own_pictures_get_overlays_and_trainid_maps(acdc_run, tmp_path):
    out, _ = acdc_run
    rng = np.random.default_rng(3)
    pictures = tmp_path / "pictures"
    write_rgb(pictures / "frame.jpg", rng, 37, 23)
    write_rgb(pictures / "tall.png", rng, 50, 81)
    (pictures / "broken.png").write_bytes(b"no image")
    (pictures / "notes.txt").write_text("not a picture")
    argv = ["--ckpt", str(out / "model.pt"), "--out", str(tmp_path / "seen"), "--device", "cpu", "--opacity", "0.3"]
    with pytest.warns(UserWarning, match=r"skipping .*broken.png: not a readable image"):
        evaluation.main([*argv, "--images", str(pictures / "*.png"), str(pictures / "frame.jpg")])
    assert sorted(p.name for p in (tmp_path / "seen").iterdir()) == [
        "frame_overlay.png", "frame_trainIds.png", "tall_overlay.png", "tall_trainIds.png"]
    model, _ = evaluation.model_from_checkpoint(out / "model.pt")
    for name, (w, h) in (("frame.jpg", (37, 23)), ("tall.png", (50, 81))):
        rgb = np.asarray(Image.open(pictures / name).convert("RGB"))
        ids = np.asarray(Image.open(tmp_path / f"seen/{Path(name).stem}_trainIds.png"))
        overlay = np.asarray(Image.open(tmp_path / f"seen/{Path(name).stem}_overlay.png"))
        assert ids.shape == overlay.shape[:2] == (h, w)
        assert np.array_equal(overlay, (rgb * 0.7 + data.colorize(ids) * 0.3).astype(np.uint8))
        size = evaluation.keep_ratio_size(w, h, (120, 68))  # ACDC's test size at --resize-scale 0.125
        x = torch.from_numpy(np.asarray(Image.fromarray(rgb).resize(size, Image.BILINEAR)).copy()).permute(2, 0, 1)
        with torch.no_grad():
            pred = models.upsample(model(x[None] / 255), (h, w)).argmax(1)[0]
        assert np.array_equal(ids, pred.numpy())
    with pytest.warns(UserWarning) as caught:  # a folder gives its PNG and JPEG files, not notes.txt
        evaluation.main([*argv, "--images", str(pictures)])
    assert [str(w.message).split(":")[1] for w in caught] == [f" skipping {pictures / 'broken.png'}"]
    with pytest.raises(DatasetError, match="nowhere"):
        evaluation.main([*argv, "--images", str(tmp_path / "nowhere")])
    write_rgb(tmp_path / "clash/x.png", rng, 8, 8)
    write_rgb(tmp_path / "clash/x_overlay.png", rng, 8, 8)  # what x.png's overlay would be called
    with pytest.raises(DatasetError, match="outputs of .*x.png would overwrite an input"):
        evaluation.main([*argv, "--images", str(tmp_path / "clash"), "--out", str(tmp_path / "clash")])
    (tmp_path / "more").mkdir()
    (tmp_path / "more/tall.jpg").write_bytes((pictures / "frame.jpg").read_bytes())
    with pytest.raises(DatasetError, match="several pictures are named tall"):
        evaluation.main([*argv, "--images", str(pictures), str(tmp_path / "more")])
    with pytest.raises(SystemExit):
        evaluation.main([*argv, "--images", str(pictures), "--opacity", "0"])


def test_readme_legend_is_the_palette():
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    rows = re.findall(r"^\| (\d+) \| ([a-z ]+) \| \((\d+), (\d+), (\d+)\) \|", readme, re.M)
    assert [(int(t), name, tuple(map(int, rgb))) for t, name, *rgb in rows] == [
        (t, name, rgb) for t, (name, rgb) in enumerate(zip(data.CLASS_NAMES, data.PALETTE))]
