"""PASCAL VOC 2012 semi-supervised on DeepLabV3+ (issue 27): the devkit tree read as downloaded (a tiny one written
by conftest.make_voc: JPEGs, palette labels with 255 borders, ImageSets, SegmentationClassAug), UniMatch's split
files and random rescale, DeepLabV3+'s shapes and parameter counts, and the run through train.main / eval.main."""
import json

import numpy as np
import pytest
import torch
import torchvision
from conftest import make_voc, train_error, voc_colour_map
from PIL import Image

import data
import eval as evaluation
import models
import train
from data import DatasetError, build_dataset
from mfm import Rebuilder

TRAIN = ["2007_000032.png", "2007_000039.png", "2008_000002.png", "2009_000012.png"]  # make_voc's train.txt
AUG = ["2008_000008.png", "2011_000003.png"]  # labelled only in SegmentationClassAug
TINY = ["--backbone", "deeplabv3plus-resnet18", "--pretrained", "none", "--crop-size", "32", "--mfm-dim", "64",
        "--mfm-heads", "4", "--mfm-grid", "2", "--vis-every", "0", "--log-every", "1"]


# ----------------------------------------------------------------------------- classes and the tree
def test_voc_classes_and_palette_are_the_devkits():
    assert len(data.VOC_CLASS_NAMES) == 21 and data.VOC_CLASS_NAMES[0] == "background"
    assert data.VOC_CLASS_NAMES[15] == "person" and data.VOC_CLASS_NAMES[20] == "tv/monitor"
    devkit = np.array(voc_colour_map()).reshape(256, 3)
    assert [tuple(c) for c in devkit[:21]] == list(data.VOC_PALETTE)
    assert data.label_set("voc") == (data.VOC_CLASS_NAMES, data.VOC_PALETTE)
    assert data.label_set("cityscapes") == data.label_set("toy-night") == (data.CLASS_NAMES, data.PALETTE)
    rgb = data.colorize(torch.tensor([[15, 255]]), data.VOC_PALETTE)
    assert tuple(rgb[0, 0]) == (192, 128, 128) and tuple(rgb[0, 1]) == (0, 0, 0)


def test_voc_reads_the_devkit_tree_as_downloaded(voc_data):
    base = voc_data / data.VOC_DIR
    val = build_dataset("voc", voc_data, "val", train=False)
    assert [s[2] for s in val.samples] == ["2007_000033.png", "2010_000004.png"] and val.num_classes == 21
    img, lbl, name = val[1]  # native size (portrait 60x80), no resize; palette indices and 255 borders kept
    ids = np.asarray(Image.open(base / "SegmentationClass/2010_000004.png"))
    assert name == "2010_000004.png" and img.shape == (3, 80, 60)
    assert torch.equal(lbl, torch.from_numpy(ids.copy()).long())
    assert 255 in lbl and (lbl[lbl != 255] <= 20).all()
    jpeg = np.asarray(Image.open(base / "JPEGImages/2010_000004.jpg").convert("RGB"))
    assert torch.allclose(img, torch.from_numpy(jpeg.copy()).permute(2, 0, 1).float() / 255)
    train_set = build_dataset("voc", voc_data, "train", train=False)  # train.txt + Aug - val
    labels = {s[2]: s[1] for s in train_set.samples}
    assert sorted(labels) == sorted(TRAIN + AUG)
    assert labels["2007_000032.png"].parent.name == "SegmentationClass"  # the finer label, though Aug has one
    assert labels[AUG[0]].parent.name == "SegmentationClassAug"
    aug_ids = np.asarray(Image.open(base / "SegmentationClassAug" / AUG[0]))
    assert torch.equal(train_set[sorted(labels).index(AUG[0])][1], torch.from_numpy(aug_ids.copy()).long())


def test_voc_labels_keep_all_21_classes_and_ignore_the_rest(tmp_path):
    """Class indices 0-20 pass as they are (tv/monitor is 20), 255 stays ignored, and a stray value is ignored and
    counted, with one warning, as for the other datasets."""
    base = make_voc(tmp_path)
    ids = np.full((60, 80), 255, np.uint8)
    ids[:21] = np.arange(21).reshape(21, 1)
    ids[30, :3] = 77  # a value no VOC class has
    Image.fromarray(ids, "L").save(base / "SegmentationClass/2007_000033.png")
    val = build_dataset("voc", tmp_path, "val", train=False)
    with pytest.warns(UserWarning, match="3 pixels of id 77 .*VOC class indices 0-20 and 255"):
        lbl = val[0][1]
    expected = ids.astype(np.int64)
    expected[30, :3] = 255
    assert torch.equal(lbl, torch.from_numpy(expected)) and val.outside_pixels == 3


def test_voc_without_aug_is_train_txt(tmp_path):
    base = make_voc(tmp_path)
    for f in (base / "SegmentationClassAug").iterdir():
        f.unlink()
    (base / "SegmentationClassAug").rmdir()
    assert [s[2] for s in build_dataset("voc", tmp_path, train=False).samples] == TRAIN


def test_voc_rescale_and_pad_is_unimatchs():
    img, lbl = np.full((60, 80, 3), 200, np.uint8), np.full((60, 80), 7, np.uint8)
    for seed in range(20):
        out_img, out_lbl = data._rescale_and_pad(img, lbl, 100, np.random.default_rng(seed))
        side = int(np.random.default_rng(seed).integers(40, 161))  # [int(0.5 * 80), int(2 * 80)], inclusive
        w, h = side, int(60 * side / 80 + 0.5)  # landscape: the width is the long side
        assert out_lbl.shape == (max(h, 100), max(w, 100)) and out_img.shape == (*out_lbl.shape, 3)
        assert (out_lbl[:h, :w] == 7).all() and (out_lbl[h:] == 255).all() and (out_lbl[:, w:] == 255).all()
        assert (out_img[h:] == 0).all() and (out_img[:, w:] == 0).all() and (out_img[:h, :w] == 200).all()


def test_voc_training_crops(voc_data):
    ds = build_dataset("voc", voc_data, crop_size=96, seed=3)  # larger than every rescaled 80x60: always padded
    sizes = set()
    for k in range(12):
        img, lbl = ds[k]
        assert img.shape == (3, 96, 96) and lbl.shape == (96, 96)
        assert set(lbl.unique().tolist()) <= set(range(21)) | {255}
        sizes.add(int((lbl != 255).sum()))
        assert torch.equal(img, ds[k][0])  # a function of (seed, k)
    assert len(sizes) > 6  # the random rescale changes the image area from crop to crop


def test_voc_missing_folder_and_bad_labels_say_what_was_expected(tmp_path):
    base = make_voc(tmp_path)
    with pytest.raises(DatasetError, match="(?s)nowhere not found.*ImageSets/Segmentation/train.txt"):
        build_dataset("voc", tmp_path / "nowhere")
    (base / "JPEGImages").rename(base / "images")
    with pytest.raises(DatasetError, match="(?s)voc: directory .*JPEGImages not found.*<id>.jpg"):
        build_dataset("voc", tmp_path, "val", train=False)
    (base / "images").rename(base / "JPEGImages")
    (base / "ImageSets/Segmentation/val.txt").rename(tmp_path / "val.txt")
    with pytest.raises(DatasetError, match="cannot read .*val.txt"):
        build_dataset("voc", tmp_path, "val", train=False)
    (tmp_path / "val.txt").rename(base / "ImageSets/Segmentation/val.txt")
    path = base / "SegmentationClass/2007_000032.png"
    Image.open(path).convert("RGB").save(path)  # a colour label: no class indices
    with pytest.raises(DatasetError, match="mode RGB"):
        build_dataset("voc", tmp_path, train=False)[0]
    Image.fromarray(np.full((60, 80), 100, np.uint8), "L").save(path)
    with pytest.raises(DatasetError, match="VOC class indices 0-20 and 255"):
        build_dataset("voc", tmp_path, train=False)[0]


# ----------------------------------------------------------------------------- split files
def test_voc_labeled_count_draws_from_train_txt(voc_data):
    assert data.labeled_split("voc", voc_data, 4, seed=0) == TRAIN  # 1464 on the real tree: UniMatch's whole set
    two = data.labeled_split("voc", voc_data, 2, seed=0)
    assert len(two) == 2 and set(two) < set(TRAIN) and set(two) <= set(data.labeled_split("voc", voc_data, 3, 0))
    with pytest.raises(DatasetError, match="choose from 1 to 4, .* in ImageSets/Segmentation/train.txt"):
        data.labeled_split("voc", voc_data, 5, seed=0)


def test_voc_split_files_round_trip_and_wrong_ids_are_named(voc_data, tmp_path):
    unimatch = tmp_path / "labeled.txt"  # splits/pascal/*/labeled.txt: no trailing newline; Aug images allowed
    unimatch.write_text("JPEGImages/2009_000012.jpg SegmentationClass/2009_000012.png\n"
                        "JPEGImages/2008_000008.jpg SegmentationClass/2008_000008.png\n2007_000039")
    keys = data.labeled_split("voc", voc_data, unimatch, seed=0)
    assert keys == ["2009_000012.png", "2008_000008.png", "2007_000039.png"]
    data.write_split(tmp_path / "out/labeled.txt", "voc", keys)
    assert (tmp_path / "out/labeled.txt").read_text().splitlines()[1] == (
        "JPEGImages/2008_000008.jpg SegmentationClass/2008_000008.png")
    assert data.labeled_split("voc", voc_data, tmp_path / "out/labeled.txt", seed=5) == keys
    for line, problem in (("JPEGImages/2007_999999.jpg SegmentationClass/2007_999999.png", "names no voc train image"),
                          ("2007_000033", "names no voc train image"),  # a val image
                          ("leftImg8bit/train/a/a_0_0_leftImg8bit.png", "neither a UniMatch line")):
        bad = tmp_path / "bad.txt"
        bad.write_text(f"2007_000032\n{line}\n")
        with pytest.raises(DatasetError, match=f"bad.txt line 2: .*{problem}"):
            data.labeled_split("voc", voc_data, bad, seed=0)


# ----------------------------------------------------------------------------- DeepLabV3+
def test_deeplabv3plus_parameter_counts():
    with torch.device("meta"):
        model = models.build_model(21, "deeplabv3plus-resnet101")
        resnet = torchvision.models.resnet101()
    backbone = models.count_parameters(resnet) - models.count_parameters(resnet.fc)
    aspp = 2 * (2048 * 256 + 512) + 3 * (2048 * 256 * 9 + 512) + 5 * 256 * 256 + 512  # 1x1, 3 dilated, pool, project
    decoder = 256 * 48 + 96 + (304 * 256 * 9 + 512) + (256 * 256 * 9 + 512) + 256 * 21 + 21  # reduce, fuse, classify
    assert models.count_parameters(model.backbone) == backbone == 42_500_160
    assert models.count_parameters(model.head) == aspp + decoder == 16_844_149
    assert models.count_parameters(model) == 59_344_309  # UniMatch's deep-stem variant: 59.5M (its training logs)


@pytest.mark.parametrize("backbone, low, high", [("deeplabv3plus-resnet18", 64, 512),
                                                 ("deeplabv3plus-resnet50", 256, 2048)])
def test_deeplabv3plus_levels_strides_and_face(backbone, low, high):
    with torch.device("meta"):
        model = models.build_model(5, backbone)
        feats = model.encode(torch.zeros(2, 3, 65, 96))
        assert set(feats) == {"low", "high"} and model.feat_channels == [low, high] and model.feat_stride == 16
        assert feats["low"].shape == (2, low, 17, 24) and feats["high"].shape == (2, high, 5, 6)
        assert model.decode(feats).shape == (2, 5, 17, 24) and model.deepest(feats) is feats["high"]
    dilations = [m.dilation for m in model.backbone.layer4.modules() if isinstance(m, torch.nn.Conv2d)]
    assert (2, 2) in dilations and (4, 4) not in dilations  # layer4 dilated once: output stride 16
    assert [b[0].dilation for b in model.head.aspp.branches] == [(1, 1), (6, 6), (12, 12), (18, 18)]
    groups = model.param_groups(1e-3)
    assert [g["lr"] for g in groups] == [1e-3, 1e-2]
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))
    assert models.build_model(**model.config).config == model.config


def test_deeplabv3plus_head_reads_both_levels_and_mfm_rebuilds_them():
    torch.manual_seed(0)
    model = models.build_model(4, "deeplabv3plus-resnet18").eval()
    feats = model.encode(torch.rand(2, 3, 64, 64))
    out = model.decode(feats)
    for level in ("low", "high"):  # each level changes the logits
        other = dict(feats, **{level: feats[level] + 1})
        assert not torch.allclose(model.decode(other), out)
    rebuilder = Rebuilder(model.feat_channels, embed_dim=32, grid=2, depth=1, num_heads=4)
    rebuilt, mask = model.rebuild(rebuilder, feats)
    assert set(rebuilt) == {"low", "high"} and mask.shape == (2, 1, 4, 4)
    assert all(rebuilt[k].shape == feats[k].shape for k in feats) and model.decode(rebuilt).shape == out.shape


def test_deeplabv3plus_loads_torchvision_weights(tmp_path):
    state = torchvision.models.resnet18().state_dict()
    torch.save(state, tmp_path / "resnet18.pth")
    model = models.build_model(21, "deeplabv3plus-resnet18", pretrained=str(tmp_path / "resnet18.pth"))
    assert torch.equal(model.backbone.conv1.weight, state["conv1.weight"])
    assert torch.equal(model.backbone.layer4[1].bn2.running_var, state["layer4.1.bn2.running_var"])
    del state["layer2.0.conv1.weight"]
    torch.save(state, tmp_path / "resnet18.pth")
    with pytest.raises(models.WeightsError, match=r"missing \(1\): layer2.0.conv1.weight"):
        models.build_model(21, "deeplabv3plus-resnet18", pretrained=str(tmp_path / "resnet18.pth"))


def test_deeplabv3plus_imagenet_is_torchvisions(monkeypatch):
    urls = []

    def download(self, *args, **kwargs):  # stands in for torchvision's download of the weights behind self.url
        urls.append(self.url)
        return state
    state = torchvision.models.resnet18().state_dict()
    monkeypatch.setattr(torchvision.models.WeightsEnum, "get_state_dict", download)
    model = models.build_model(21, "deeplabv3plus-resnet18", pretrained="imagenet")
    assert urls == [torchvision.models.ResNet18_Weights.IMAGENET1K_V1.url]
    assert torch.equal(model.backbone.layer1[0].conv1.weight, state["layer1.0.conv1.weight"])


# ----------------------------------------------------------------------------- the run
def test_voc_preset_is_unimatchs_values_in_our_loop():
    args = train.parse_args(["--source", "voc", "--target", "voc", "--labeled", "1464", "--device", "cpu"])
    assert (args.backbone, args.crop_size, args.pseudo_threshold) == ("deeplabv3plus-resnet101", 321, 0.95)
    assert (args.lr, args.iters, args.batch_size, args.mfm_grid, args.aux) == (6e-5, 40_000, 2, 10, "mfm")
    assert train.parse_args(["--source", "gta", "--target", "cityscapes", "--device", "cpu"]).pseudo_threshold == 0.968
    assert train.parse_args(["--source", "voc", "--target", "voc", "--labeled", "9", "--crop-size", "513",
                             "--device", "cpu"]).crop_size == 513


def test_voc_mfm_trains_evaluates_and_writes_its_split(voc_data, tmp_path, capsys):
    out = tmp_path / "run"
    train.main(["--source", "voc", "--target", "voc", "--labeled", "2", "--data-root", str(voc_data), "--out",
                str(out), "--iters", "2", "--eval-every", "2", "--pseudo-threshold", "0", *TINY])
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert records[0]["loss_mfm"] > 0 and records[0]["confidence"] == 1.0  # threshold 0: every pixel counts
    result = records[-1]["eval"]
    assert (result["dataset"], result["split"], result["images"], len(result["iou"])) == ("voc", "val", 2, 21)
    assert "tv/monitor" in capsys.readouterr().out  # the VOC class table
    split = (out / "labeled.txt").read_text().splitlines()
    assert len(split) == 2 and all(line.startswith("JPEGImages/") for line in split)
    assert data.labeled_split("voc", voc_data, out / "labeled.txt", seed=9) == data.labeled_split("voc", voc_data,
                                                                                                   2, seed=0)
    model, _ = evaluation.model_from_checkpoint(out / "model.pt")
    assert isinstance(model, models.DeepLabV3Plus) and model.config["num_classes"] == 21
    evaluation.main(["--ckpt", str(out / "model.pt"), "--target", "voc", "--data-root", str(voc_data),
                     "--device", "cpu", "--workers", "0", "--save-pred", str(tmp_path / "pred")])
    assert json.loads((out / "metrics.json").read_text())["mIoU"] == result["mIoU"]  # the same whole-image eval
    pred = Image.open(tmp_path / "pred/2010_000004.png")
    assert pred.size == (60, 80) and np.asarray(pred).max() <= 20  # class indices at the label's size


@pytest.mark.parametrize("aux", ["cmim", "mic"])
def test_voc_runs_the_other_auxiliaries(voc_data, tmp_path, aux):
    out = tmp_path / "run"
    train.main(["--source", "voc", "--target", "voc", "--labeled", "2", "--data-root", str(voc_data), "--out",
                str(out), "--iters", "1", "--eval-every", "0", "--aux", aux, "--pseudo-threshold", "0", *TINY])
    loss = json.loads((out / "log.jsonl").read_text().splitlines()[0])[f"loss_{aux}"]
    # CMIM at a 32 px crop of 16 px blocks: an untrained teacher's small classes lie in one block, visible (nothing
    # to rebuild) or masked (nothing to rebuild from): its loss may be 0 there, never NaN
    assert loss > 0 if aux == "mic" else 0 <= loss < float("inf")


def test_voc_and_deeplabv3plus_mistakes_are_named(voc_data, tmp_path):
    base = ["--source", "voc", "--target", "voc", "--data-root", str(voc_data), "--device", "cpu", *TINY]
    assert "--batch-size 1" in train_error([*base, "--labeled", "2", "--batch-size", "1", "--out", str(tmp_path / "a")])
    assert "--labeled" in train_error([*base, "--labeled", "5", "--out", str(tmp_path / "b")])
    assert "--labeled" in train_error([*base, "--out", str(tmp_path / "c")])
    assert "--recipe hrda" in train_error(["--source", "toy-day", "--target", "toy-night", "--recipe", "hrda", "--out",
                                     str(tmp_path / "d"), "--device", "cpu", *TINY])
