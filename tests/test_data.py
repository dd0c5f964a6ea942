"""Tests for data.py: label tables against the official Cityscapes and SYNTHIA class lists, loaders on tiny fake
trees written with the official names and encodings, ids outside the table, RCS re-crops, semi-supervised split
files, ClassMix semantics, the kornia 0.5.8 colour jitter against hand-derived pixels, toy determinism, bad input.

    python -m pytest tests/test_data.py -q
"""
import math
import re
import sys

import numpy as np
import pytest
import torch
from conftest import label_ids, make_gta_cityscapes, write_ids, write_png16, write_rgb
from PIL import Image

import data
from data import DatasetError, build_dataset

# cityscapesscripts.helpers.labels: (name, id, trainId); trainId 255 and -1 mean "ignored in evaluation"
OFFICIAL_LABELS = [
    ("unlabeled", 0, 255), ("ego vehicle", 1, 255), ("rectification border", 2, 255), ("out of roi", 3, 255),
    ("static", 4, 255), ("dynamic", 5, 255), ("ground", 6, 255), ("road", 7, 0), ("sidewalk", 8, 1),
    ("parking", 9, 255), ("rail track", 10, 255), ("building", 11, 2), ("wall", 12, 3), ("fence", 13, 4),
    ("guard rail", 14, 255), ("bridge", 15, 255), ("tunnel", 16, 255), ("pole", 17, 5), ("polegroup", 18, 255),
    ("traffic light", 19, 6), ("traffic sign", 20, 7), ("vegetation", 21, 8), ("terrain", 22, 9), ("sky", 23, 10),
    ("person", 24, 11), ("rider", 25, 12), ("car", 26, 13), ("truck", 27, 14), ("bus", 28, 15),
    ("caravan", 29, 255), ("trailer", 30, 255), ("train", 31, 16), ("motorcycle", 32, 17), ("bicycle", 33, 18),
    ("license plate", -1, -1),
]
# SYNTHIA-RAND-CITYSCAPES README: the class of each label id
SYNTHIA_README = ("void", "sky", "building", "road", "sidewalk", "fence", "vegetation", "pole", "car", "traffic sign",
                  "pedestrian", "bicycle", "motorcycle", "parking-slot", "road-work", "traffic light", "terrain",
                  "rider", "truck", "bus", "train", "wall", "lanemarking")


@pytest.fixture
def gta_root(tmp_path):
    rng = np.random.default_rng(0)
    for i in (1, 2, 3):
        write_rgb(tmp_path / f"gta/images/{i:05d}.png", rng, 96, 48)
        write_ids(tmp_path / f"gta/labels/{i:05d}.png", label_ids(rng, 96, 48), palette=True)
    write_rgb(tmp_path / "gta/images/00004.png", rng, 96, 48)  # image without label
    write_ids(tmp_path / "gta/labels/00005.png", label_ids(rng, 96, 48), palette=True)  # label without image
    return tmp_path


@pytest.fixture
def cityscapes_root(tmp_path):
    rng = np.random.default_rng(1)
    for split, city, n in (("train", "aachen", 2), ("val", "lindau", 2)):
        for f in range(n):
            stem = f"{city}/{city}_000000_{f:06d}"
            write_rgb(tmp_path / f"cityscapes/leftImg8bit/{split}/{stem}_leftImg8bit.png", rng, 128, 64)
            write_ids(tmp_path / f"cityscapes/gtFine/{split}/{stem}_gtFine_labelIds.png", label_ids(rng, 128, 64),
                      palette=False)
    return tmp_path


# ----------------------------------------------------------------------------- label tables
def test_cityscapes_table_matches_official_labels():
    assert len(OFFICIAL_LABELS) == 35
    for name, label_id, train_id in OFFICIAL_LABELS:
        expected = train_id if 0 <= train_id < 19 else data.IGNORE_INDEX
        assert data.CITYSCAPES_ID_TO_TRAINID.get(label_id, data.IGNORE_INDEX) == expected, name
        if label_id >= 0:
            assert data.CITYSCAPES_LUT[label_id] == expected, name
        if expected != data.IGNORE_INDEX:
            assert data.CLASS_NAMES[expected] == name
            assert data.TRAINID_TO_LABELID[expected] == label_id
    assert (data.CITYSCAPES_LUT[34:] == data.IGNORE_INDEX).all()
    assert len(data.CLASS_NAMES) == len(data.PALETTE) == 19 and sorted(data.TRAINID_TO_LABELID) == list(range(19))


def test_synthia_table_matches_synthia_class_list():
    # matched by name; the 16-class protocol drops terrain, truck and train; the 13 also wall, fence and pole
    dropped16, dropped13 = {"terrain", "truck", "train"}, {"wall", "fence", "pole"}
    names = [{"pedestrian": "person"}.get(n, n) for n in SYNTHIA_README]
    table = {i: data.CLASS_NAMES.index(n) for i, n in enumerate(names) if n in data.CLASS_NAMES and n not in dropped16}
    assert len(table) == 16 and data.SYNTHIA_ID_TO_TRAINID == table
    expected_lut = np.full(65536, 255)
    expected_lut[list(table)] = list(table.values())
    assert (data.SYNTHIA_LUT == expected_lut).all()
    in16 = [i for i, n in enumerate(data.CLASS_NAMES) if n not in dropped16]
    assert list(data.SYNTHIA_16) == in16
    assert list(data.SYNTHIA_13) == [i for i in in16 if data.CLASS_NAMES[i] not in dropped13]


def test_colorize():
    label = torch.tensor([[0, 13], [255, 18]])
    rgb = data.colorize(label)
    assert rgb.dtype == np.uint8 and rgb.shape == (2, 2, 3)
    assert tuple(rgb[0, 0]) == data.PALETTE[0] and tuple(rgb[0, 1]) == data.PALETTE[13]
    assert tuple(rgb[1, 0]) == (0, 0, 0) and tuple(rgb[1, 1]) == data.PALETTE[18]


# ----------------------------------------------------------------------------- real-dataset loaders
def test_gta_skips_unpaired_files_with_one_warning(gta_root):
    with pytest.warns(UserWarning, match="skipping 2 unpaired") as record:
        ds = build_dataset("gta", root=gta_root, crop_size=64)
    assert len([w for w in record if "unpaired" in str(w.message)]) == 1
    assert len(ds) == 3 and ds.num_classes == 19 and ds.eval_size == (1280, 720)
    img, lbl = ds[5]
    assert img.shape == (3, 64, 64) and img.dtype == torch.float32 and 0 <= img.min() and img.max() <= 1
    assert lbl.shape == (64, 64) and lbl.dtype == torch.int64
    assert set(lbl.unique().tolist()) <= {0, 1, 2, 8, 10, 11, 13, 18, 255}


def test_gta_eval_maps_palette_indices(gta_root):
    with pytest.warns(UserWarning):
        ds = build_dataset("gta", root=gta_root, train=False)
    img, lbl, name = ds[0]
    ids = np.asarray(Image.open(gta_root / "gta/labels/00001.png"))
    assert name == "00001.png" and img.shape == (3, 720, 1280) and lbl.shape == (48, 96)
    assert torch.equal(lbl, torch.from_numpy(data.CITYSCAPES_LUT[ids].astype(np.int64)))
    assert (lbl[12:, 72:] == 255).all() and (lbl[12:, :24] == 0).all()  # id 0 ignored, id 7 road


def test_cityscapes_eval_full_resolution_label_and_name(cityscapes_root):
    ds = build_dataset("cityscapes", root=cityscapes_root, split="val", train=False)
    img, lbl, name = ds[1]
    assert img.shape == (3, 512, 1024) and lbl.shape == (64, 128) and len(ds) == 2
    assert name == "lindau/lindau_000000_000001_gtFine_labelIds.png"
    ids = np.asarray(Image.open(cityscapes_root / "cityscapes/gtFine/val" / name))
    assert torch.equal(lbl, torch.from_numpy(data.CITYSCAPES_LUT[ids].astype(np.int64)))
    with pytest.raises(IndexError):
        ds[2]


def test_synthia_reads_first_channel_of_16bit_png(tmp_path):
    pytest.importorskip("cv2", reason="SYNTHIA needs the optional opencv-python-headless")
    rng = np.random.default_rng(2)
    ids = np.zeros((40, 80, 3), np.uint16)
    ids[..., 0] = rng.choice([1, 2, 3, 8, 10, 21, 13, 0, 300], (40, 80))  # 13 and 300 are not in the table
    ids[..., 1] = rng.integers(0, 65536, (40, 80))  # instance ids: must not leak into the class
    write_png16(tmp_path / "synthia/GT/LABELS/0000000.png", ids)
    write_rgb(tmp_path / "synthia/RGB/0000000.png", rng, 80, 40)
    ds = build_dataset("synthia", root=tmp_path, train=False)
    img, lbl, name = ds[0]
    assert name == "0000000.png" and img.shape == (3, 760, 1280) and lbl.shape == (40, 80)
    expected = np.vectorize(lambda i: data.SYNTHIA_ID_TO_TRAINID.get(int(i), 255))(ids[..., 0])
    assert torch.equal(lbl, torch.from_numpy(expected.astype(np.int64)))
    img, lbl = build_dataset("synthia", root=tmp_path, crop_size=32, resize=(80, 40))[0]
    assert img.shape == (3, 32, 32) and set(lbl.unique().tolist()) <= set(expected.ravel().tolist())


def test_synthia_without_opencv_names_the_package(tmp_path, monkeypatch):
    write_png16(tmp_path / "synthia/GT/LABELS/0000000.png", np.ones((8, 16, 3), np.uint16))
    write_rgb(tmp_path / "synthia/RGB/0000000.png", np.random.default_rng(0), 16, 8)
    monkeypatch.setitem(sys.modules, "cv2", None)  # makes `import cv2` raise ImportError
    with pytest.raises(DatasetError, match="pip install opencv-python-headless"):
        build_dataset("synthia", root=tmp_path, train=False)[0]


def test_ids_outside_the_table_are_ignored_counted_and_warned_once(cityscapes_root):
    gt = cityscapes_root / "cityscapes/gtFine/val/lindau"
    for f, stray in ((0, (34, 200)), (1, (250,))):  # GTA-like stray ids in 2 images: kept, not dropped
        ids = np.full((64, 128), 7, np.uint8)
        ids[0, :len(stray)] = stray
        write_ids(gt / f"lindau_000000_{f:06d}_gtFine_labelIds.png", ids, palette=False)
    ds = build_dataset("cityscapes", root=cityscapes_root, split="val", train=False)
    with pytest.warns(UserWarning, match=r"lindau_000000_000000_gtFine_labelIds.png holds 2 pixels of id 200") as rec:
        labels = [ds[i][1] for i in (0, 1, 0)]
    assert len([w for w in rec if "outside" in str(w.message)]) == 1  # once per dataset, not per image
    assert ds.outside_pixels == 5  # pixels read: 2 + 1 + 2
    for lbl, n in zip(labels, (2, 1, 2)):
        assert (lbl[0, :n] == 255).all() and (lbl[0, n:] == 0).all() and (lbl[1:] == 0).all()


def test_files_that_are_no_label_id_maps_are_rejected(tmp_path):
    rng = np.random.default_rng(0)
    write_rgb(tmp_path / "gta/images/00001.png", rng, 64, 32)
    lbl = tmp_path / "gta/labels/00001.png"
    train_ids = np.full((32, 64), 255)
    train_ids[20:] = 0  # a trainIds file of a mostly ignored image: 62% of the pixels are 255
    write_ids(lbl, train_ids, palette=True)
    with pytest.raises(DatasetError, match=r"00001.png holds ids outside .* in 62% .*id 255.*not trainIds"):
        build_dataset("gta", tmp_path, train=False)[0]
    write_rgb(lbl, rng, 64, 32)  # a colour-coded label
    with pytest.raises(DatasetError, match="00001.png has mode RGB"):
        build_dataset("gta", tmp_path, train=False)[0]
    Image.fromarray(np.zeros((32, 64, 4), np.uint8)).save(lbl)
    with pytest.raises(DatasetError, match="mode RGBA"):
        build_dataset("gta", tmp_path, train=False)[0]
    write_png16(lbl, np.full((32, 64, 1), 26001, np.uint16))  # a Cityscapes instanceIds file: 16-bit grey
    with pytest.raises(DatasetError, match="00001.png has mode I"):
        build_dataset("gta", tmp_path, train=False)[0]


# ----------------------------------------------------------------------------- determinism, crops, RCS
def test_train_item_depends_only_on_seed_and_k(cityscapes_root):
    ds = build_dataset("cityscapes", root=cityscapes_root, crop_size=32, seed=3)
    again = build_dataset("cityscapes", root=cityscapes_root, crop_size=32, seed=3)
    for k in (0, 1, 7, 1000):
        a, b = ds[k], again[k]
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    other = build_dataset("cityscapes", root=cityscapes_root, crop_size=32, seed=4)
    assert any(not torch.equal(ds[k][0], other[k][0]) for k in range(4))
    loader = torch.utils.data.DataLoader(ds, batch_size=2, sampler=range(10, 16), num_workers=2)
    batches = [img for img, _ in loader]
    assert all(torch.equal(batches[j][i], ds[10 + 2 * j + i][0]) for j in range(3) for i in range(2))


def test_epoch_is_a_permutation(cityscapes_root):
    ds = build_dataset("cityscapes", root=cityscapes_root, split="val", crop_size=32, resize=(64, 32))
    ref = build_dataset("cityscapes", root=cityscapes_root, split="val", train=False, resize=(64, 32))
    crops = [[f[:, :, x:x + 32] for f in (ref[i][0], ref[i][0].flip(-1)) for x in range(33)] for i in range(2)]
    for epoch in range(4):  # each image exactly once per epoch
        seen = [next(i for i in range(2) if any(torch.equal(ds[epoch * 2 + j][0], c) for c in crops[i]))
                for j in range(2)]
        assert sorted(seen) == [0, 1]


def test_source_crop_retries_single_class_crops(tmp_path):
    rng = np.random.default_rng(3)
    ids = np.full((64, 128), 7, np.uint8)  # road, and car in the right quarter
    ids[:, 96:] = 26
    write_rgb(tmp_path / "gta/images/00001.png", rng, 128, 64)
    write_ids(tmp_path / "gta/labels/00001.png", ids, palette=True)
    ds = build_dataset("gta", root=tmp_path, crop_size=32, resize=(128, 64))
    balanced = sum((ds[k][1] == 13).float().mean().item() < 0.75 and (ds[k][1] == 0).float().mean().item() < 0.75
                   for k in range(40))
    assert balanced >= 24  # 10 tries: ~81% of the crops; one uniform crop is balanced only 15% of the time


def test_rcs_recrops_whole_rounds_until_the_rare_class_is_in_the_crop(tmp_path):
    ids = np.full((64, 128), 7, np.uint8)  # road, and bicycle (the rare class) in the top-left 16x16 corner
    ids[:16, :16] = 33
    write_rgb(tmp_path / "gta/images/00001.png", np.random.default_rng(0), 128, 64)
    write_ids(tmp_path / "gta/labels/00001.png", ids, palette=True)
    ds = build_dataset("gta", root=tmp_path, crop_size=32, rcs=True, resize=(128, 64))
    assert ds.rcs_prob[18] > 0.99 and ds.rcs_min_crop == 1500 * 32 ** 2 / 512 ** 2
    hit = [(ds[k][1] == 18).sum().item() > ds.rcs_min_crop for k in range(200)]
    # No 32-crop is balanced (bicycle <= 25%), so each round's RandomCrop keeps its 11th, uniform, draw; a uniform
    # crop (33 x 97 corners) holds > 5.9 bicycle pixels for 246 corners: p = 0.0769. Rounds: 1 - (1 - p)^11 = 0.585.
    # One round (or tries that require the rare class and a balanced crop at once): 0.077.
    assert 0.45 < np.mean(hit) < 0.72
    again = build_dataset("gta", root=tmp_path, crop_size=32, rcs=True, resize=(128, 64))
    assert all(torch.equal(ds[k][1], again[k][1]) for k in range(5))  # a function of (seed, k)


def test_rcs_cache_and_determinism(gta_root, tmp_path, monkeypatch):
    cache = tmp_path / "stats/gta_rcs.json"
    with pytest.warns(UserWarning):
        ds = build_dataset("gta", root=gta_root, crop_size=32, rcs=True, rcs_cache=cache, resize=(96, 48))
    assert cache.is_file()
    assert abs(ds.rcs_prob.sum() - 1) < 1e-9 and ds.rcs_prob[0] < ds.rcs_prob[18]  # road common, bicycle rare
    monkeypatch.setattr(data, "_read_label_ids", lambda *a: pytest.fail("statistics recomputed"))
    with pytest.warns(UserWarning):
        again = build_dataset("gta", root=gta_root, crop_size=32, rcs=True, rcs_cache=cache, resize=(96, 48))
    assert np.allclose(again.rcs_prob, ds.rcs_prob)
    monkeypatch.undo()
    assert all(torch.equal(ds[k][1], again[k][1]) for k in range(5))


# ----------------------------------------------------------------------------- toy domain shift
def test_toy_deterministic_and_shifted():
    day = build_dataset("toy-day", split="val", train=False)
    night = build_dataset("toy-night", split="val", train=False)
    assert len(day) == len(night) == 100 and len(build_dataset("toy-day", crop_size=64)) == 2000
    img, lbl, name = day[7]
    assert img.shape == (3, 64, 128) and lbl.shape == (64, 128) and name == "00007.png"
    assert torch.equal(img, day[7][0]) and torch.equal(lbl, day[7][1])
    assert not torch.equal(lbl, build_dataset("toy-day", train=False)[7][1])  # val != train
    hist = {}
    for name, ds in (("day", day), ("night", night)):
        items = [ds[i] for i in range(100)]
        hist[name] = np.bincount(torch.cat([lbl.flatten() for _, lbl, _ in items]).numpy(), minlength=256)[:19]
        hist[name] = hist[name] / hist[name].sum()
        hist[name + "_mean"] = torch.stack([img.mean((1, 2)) for img, _, _ in items]).mean(0)
    assert (hist["day"] > 0.002).sum() >= 10  # enough classes for a meaningful mIoU
    assert np.abs(hist["day"] - hist["night"]).sum() < 0.1  # same geometry distribution (L1 ~0.04 here)
    assert hist["night_mean"].mean() < 0.6 * hist["day_mean"].mean()  # night is darker
    assert hist["night_mean"][2] > hist["night_mean"][0]  # blue cast


def test_toy_train_item():
    ds = build_dataset("toy-night", crop_size=64, seed=1)
    img, lbl = ds[12345]
    assert img.shape == (3, 64, 64) and lbl.shape == (64, 64) and torch.equal(img, ds[12345][0])


# ----------------------------------------------------------------------------- semi-supervised splits
@pytest.fixture
def semi_root(tmp_path):
    return make_gta_cityscapes(tmp_path, n_gta=1, n_train=5, n_val=1, size=(32, 16))


TRAIN_KEYS = ["aachen/aachen_000000_000019_gtFine_labelIds.png", "aachen/aachen_000002_000019_gtFine_labelIds.png",
              "aachen/aachen_000004_000019_gtFine_labelIds.png", "bonn/bonn_000001_000019_gtFine_labelIds.png",
              "bonn/bonn_000003_000019_gtFine_labelIds.png"]  # the 5 train images make_gta_cityscapes writes


def test_build_dataset_keys_and_source(semi_root):
    keys = [TRAIN_KEYS[3], TRAIN_KEYS[0]]
    ds = build_dataset("cityscapes", semi_root, train=False, keys=keys)
    assert [s[2] for s in ds.samples] == keys and ds[0][2] == keys[0] and not ds.source  # in the given order
    full = build_dataset("cityscapes", semi_root, train=False)
    assert torch.equal(ds[1][0], full[0][0]) and torch.equal(ds[0][1], full[3][1])
    assert build_dataset("cityscapes", semi_root, resize=(32, 16), crop_size=16, keys=keys, source=True).source
    with pytest.raises(DatasetError, match="1 of the 2 samples .* e.g. aachen/nowhere.png"):
        build_dataset("cityscapes", semi_root, keys=[TRAIN_KEYS[0], "aachen/nowhere.png"])
    toy = build_dataset("toy-night", train=False, keys=["00017.png"])
    assert len(toy) == 1 and torch.equal(toy[0][1], build_dataset("toy-night", train=False)[17][1])
    assert build_dataset("toy-night", crop_size=64, keys=["00017.png"], source=True).source


def test_labelled_cityscapes_crops_like_a_source_when_asked(tmp_path):
    ids = np.full((64, 128), 7, np.uint8)  # road, and car in the right quarter (as the GTA crop test)
    ids[:, 96:] = 26
    write_rgb(tmp_path / "cityscapes/leftImg8bit/train/a/a_0_0_leftImg8bit.png", np.random.default_rng(0), 128, 64)
    write_ids(tmp_path / "cityscapes/gtFine/train/a/a_0_0_gtFine_labelIds.png", ids, palette=False)

    def balanced(ds):
        return sum(max((ds[k][1] == c).float().mean().item() for c in (0, 13)) < 0.75 for k in range(40))
    kw = dict(root=tmp_path, crop_size=32, resize=(128, 64))
    assert balanced(build_dataset("cityscapes", source=True, **kw)) >= 24 > 12 >= balanced(build_dataset(
        "cityscapes", **kw))  # ~81% of the crops with retries, ~15% without


def test_labeled_split_by_count(semi_root):
    two = data.labeled_split("cityscapes", semi_root, 2, seed=0)
    assert len(two) == 2 and two == sorted(two) and set(two) <= set(TRAIN_KEYS)
    assert data.labeled_split("cityscapes", semi_root, "2", seed=0) == two  # as --labeled 2 gives it
    assert set(two) <= set(data.labeled_split("cityscapes", semi_root, 3, seed=0))  # nested draws
    assert data.labeled_split("cityscapes", semi_root, 5, seed=0) == TRAIN_KEYS
    assert len({tuple(data.labeled_split("cityscapes", semi_root, 2, seed)) for seed in range(6)}) > 1
    for bad in (6, 0, -1):
        with pytest.raises(DatasetError, match=f"--labeled {bad}: choose from 1 to 5"):
            data.labeled_split("cityscapes", semi_root, bad, seed=0)
    toy = data.labeled_split("toy-night", None, 10, seed=1)
    assert len(toy) == 10 and all(k.endswith(".png") and int(k[:5]) < 2000 for k in toy)
    with pytest.raises(DatasetError, match="--labeled.*cityscapes, voc or toy-night, not 'gta'"):
        data.labeled_split("gta", semi_root, 2, seed=0)


def test_labeled_split_reads_unimatch_and_u2pl_files(semi_root, tmp_path):
    unimatch = tmp_path / "1_2" / "labeled.txt"
    unimatch.parent.mkdir()
    unimatch.write_text("leftImg8bit/train/bonn/bonn_000001_000019_leftImg8bit.png "
                        "gtFine/train/bonn/bonn_000001_000019_gtFine_labelTrainIds.png\n"
                        "leftImg8bit/train/aachen/aachen_000000_000019_leftImg8bit.png "
                        "gtFine/train/aachen/aachen_000000_000019_gtFine_labelTrainIds.png")  # no trailing newline
    assert data.labeled_split("cityscapes", semi_root, unimatch, seed=0) == [TRAIN_KEYS[3], TRAIN_KEYS[0]]
    u2pl = tmp_path / "u2pl.txt"
    u2pl.write_text("cityscapes/leftImg8bit/train/aachen/aachen_000004_000019_leftImg8bit.png\n\n"
                    "leftImg8bit/train/bonn/bonn_000003_000019_leftImg8bit.png\n")
    assert data.labeled_split("cityscapes", semi_root, str(u2pl), seed=0) == [TRAIN_KEYS[2], TRAIN_KEYS[4]]
    for text, match in (("leftImg8bit/train/aachen/aachen_000009_000019_leftImg8bit.png", "line 1: .*names no"),
                        ("\nleftImg8bit/val/aachen/aachen_000000_000019_leftImg8bit.png", "line 2: .*neither"),
                        ("aachen_000000_000019_leftImg8bit.png", "line 1: .*neither a UniMatch"),
                        ("leftImg8bit/train/aachen/aachen_000000_000019_leftImg8bit.png gtFine/train/aachen/"
                         "aachen_000002_000019_gtFine_labelTrainIds.png", "line 1: .*neither"),  # label of another
                        (u2pl.read_text() + "leftImg8bit/train/bonn/bonn_000003_000019_leftImg8bit.png",
                         "line 4: .*repeats line 3"), ("\n\n", "lists no images")):
        u2pl.write_text(text)
        with pytest.raises(DatasetError, match=re.escape(str(u2pl)) + ".* " + match):
            data.labeled_split("cityscapes", semi_root, u2pl, seed=0)
    with pytest.raises(DatasetError, match="--labeled .*missing.txt: cannot read"):
        data.labeled_split("cityscapes", semi_root, tmp_path / "missing.txt", seed=0)


def test_write_split_round_trip(semi_root, tmp_path):
    keys = [TRAIN_KEYS[4], TRAIN_KEYS[1]]
    data.write_split(tmp_path / "splits/labeled.txt", "cityscapes", keys)
    lines = (tmp_path / "splits/labeled.txt").read_text().splitlines()
    assert lines[0] == ("leftImg8bit/train/bonn/bonn_000003_000019_leftImg8bit.png "
                        "gtFine/train/bonn/bonn_000003_000019_gtFine_labelTrainIds.png") and len(lines) == 2
    assert data.labeled_split("cityscapes", semi_root, tmp_path / "splits/labeled.txt", seed=0) == keys
    toy = data.labeled_split("toy-night", None, 7, seed=3)
    data.write_split(tmp_path / "toy.txt", "toy-night", toy)
    assert (tmp_path / "toy.txt").read_text().split() == toy
    assert data.labeled_split("toy-night", None, tmp_path / "toy.txt", seed=0) == toy
    (tmp_path / "toy.txt").write_text("00017.png\n02000.png\n")
    with pytest.raises(DatasetError, match="toy.txt line 2: '02000.png' names no toy-night train image"):
        data.labeled_split("toy-night", None, tmp_path / "toy.txt", seed=0)


# ----------------------------------------------------------------------------- ClassMix and augmentation
def test_class_mix_semantics():
    gen = torch.Generator().manual_seed(0)
    b, h, w = 4, 16, 16
    lbl_src = torch.randint(0, 7, (b, h, w), generator=gen)
    lbl_src[0, :4] = 255
    lbl_src[1] = 3  # a single class: it is pasted
    img_src, img_tgt = torch.rand(b, 3, h, w, generator=gen), torch.rand(b, 3, h, w, generator=gen) + 2
    pseudo = torch.randint(0, 19, (b, h, w), generator=gen)
    for q in (torch.tensor(0.3), torch.full((b, h, w), 0.3)):
        img_mix, lbl_mix, weight = data.class_mix(img_src, lbl_src, img_tgt, pseudo, q, generator=gen)
        assert lbl_mix.dtype == torch.int64 and weight.shape == (b, h, w) and weight.is_floating_point()
        pasted = (img_mix < 2).all(1)  # target pixels are >= 2
        for i in range(b):
            classes = set(lbl_src[i].unique().tolist()) - {255}
            chosen = set(lbl_src[i][pasted[i]].unique().tolist())
            assert 255 not in chosen and chosen <= classes and len(chosen) == math.ceil(len(classes) / 2)
            assert torch.equal(pasted[i], torch.isin(lbl_src[i], torch.tensor(sorted(chosen))))
        assert torch.equal(img_mix, torch.where(pasted[:, None], img_src, img_tgt))
        assert torch.equal(lbl_mix, torch.where(pasted, lbl_src, pseudo))
        assert torch.allclose(weight, torch.where(pasted, 1.0, 0.3))


def test_strong_augment_keeps_shape_dtype_range():
    gen = torch.Generator().manual_seed(0)
    img = torch.rand(6, 3, 32, 32, generator=gen)
    img[0], img[1] = 0, 1
    out = data.strong_augment(img, generator=gen)
    assert out.shape == img.shape and out.dtype == img.dtype and 0 <= out.min() and out.max() <= 1
    assert not torch.equal(out, img)
    a = data.strong_augment(img, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a, data.strong_augment(img, generator=torch.Generator().manual_seed(5)))
    assert torch.equal(data.color_jitter(img, p=0.0), img)  # p = 0 changes nothing
    assert torch.equal(data.gaussian_blur(img, p=0.0), img)
    flat = torch.full((2, 3, 16, 16), 0.4)
    assert torch.allclose(data.gaussian_blur(flat, p=1.0), flat)  # normalised kernel


# kornia 0.5.8 ColorJitter, one pixel at a time in plain python (METHOD.md §4.4), to check the hand-derived values
def ref_rgb_to_hsv(r, g, b):
    v, delta = max(r, g, b), max(r, g, b) - min(r, g, b)
    sector = 0 if delta == 0 else (g - b) / delta if r == v else 2 + (b - r) / delta if g == v else 4 + (r - g) / delta
    return 2 * math.pi * ((sector / 6) % 1), delta / (v + 1e-6), v


def ref_hsv_to_rgb(h, s, v):
    x = h / (2 * math.pi) * 6
    i = math.floor(x) % 6
    f = x % 6 - i
    p, q, t = v * (1 - s), v * (1 - f * s), v * (1 - (1 - f) * s)
    return ((v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q))[i]


def ref_jitter(rgb, factors, order):
    for op in order:
        if op < 2:
            rgb = [min(max(x + factors[0] - 1 if op == 0 else x * factors[1], 0.0), 1.0) for x in rgb]
        else:
            h, s, v = ref_rgb_to_hsv(*rgb)
            s = min(max(s * factors[2], 0.0), 1.0) if op == 2 else s
            h = math.fmod(h + 2 * math.pi * factors[3], 2 * math.pi) if op == 3 else h
            rgb = ref_hsv_to_rgb(h, s, v)
    return list(rgb)


# pixel, (brightness b, contrast c, saturation t, hue h), op order (0 b, 1 c, 2 t, 3 h) -> result, derived by hand
JITTER_CASES = [
    # +0.1 -> (.9,.5,.3); x0.9 -> (.81,.45,.27); S 2/3 -> .8 at H 20 deg: (.81,.378,.162); H 56: G = .81(1-.0667*.8)
    ((0.8, 0.4, 0.2), (1.1, 0.9, 1.2, 0.1), (0, 1, 2, 3), (0.81, 0.7668, 0.162)),
    # the other order: H 20 -> 56 deg (.8,.76,.2); S .75 -> .9 (.8,.752,.08); x0.9; +0.1
    ((0.8, 0.4, 0.2), (1.1, 0.9, 1.2, 0.1), (3, 2, 1, 0), (0.82, 0.7768, 0.172)),
    # H 8.57 - 72 deg < 0: fmod keeps it negative, sector 4 (magenta): R = .9(1 - (1 - f) S), f = .9429, S = 7/9
    ((0.9, 0.3, 0.2), (1.0, 1.0, 1.0, -0.2), (3, 2, 1, 0), (0.86, 0.2, 0.9)),
    # blue max (sector 3.86) -> sector 2.66 (G max): B = .9(1 - (1 - f) S) with f = .657
    ((0.2, 0.3, 0.9), (1.0, 1.0, 1.0, -0.2), (0, 3, 1, 2), (0.2, 0.9, 0.66)),
    # clamps: +0.2 -> (1, .7, .3), x1.2 -> (1, .84, .36) ...
    ((0.9, 0.5, 0.1), (1.2, 1.2, 1.0, 0.0), (0, 1, 2, 3), (1.0, 0.84, 0.36)),
    # ... the other way round: x1.2 -> (1, .6, .12), +0.2 -> (1, .8, .32)
    ((0.9, 0.5, 0.1), (1.2, 1.2, 1.0, 0.0), (1, 0, 3, 2), (1.0, 0.8, 0.32)),
    # saturation (last: no clamp after it) clamps S = .889 * 1.2 to 1: min -> 0
    ((0.9, 0.1, 0.1), (1.0, 1.0, 1.2, 0.0), (0, 1, 3, 2), (0.9, 0.0, 0.0)),
    # grey: H = 0, S = 0, so saturation and hue keep it grey: +0.1, x0.9
    ((0.5, 0.5, 0.5), (1.1, 0.9, 1.2, 0.1), (2, 3, 0, 1), (0.54, 0.54, 0.54)),
]


def test_jitter_ops_match_hand_derived_pixels():
    for pixel, factors, order, expected in JITTER_CASES:
        assert ref_jitter(pixel, factors, order) == pytest.approx(expected, abs=1e-5), (pixel, order)
    pixels = torch.tensor([c[0] for c in JITTER_CASES] + [(0.3, 0.6, 0.9)]).view(-1, 3, 1, 1)
    factors = torch.tensor([c[1] for c in JITTER_CASES] + [(1.2, 1.2, 1.2, 0.2)], dtype=torch.float64)
    order = torch.tensor([c[2] for c in JITTER_CASES] + [(-1, -1, -1, -1)])  # all in one batch, each its own order
    out = data._jitter(pixels, factors, order)
    expected = torch.tensor([c[3] for c in JITTER_CASES] + [(0.3, 0.6, 0.9)]).view(-1, 3, 1, 1)
    assert torch.allclose(out, expected, atol=1e-5) and torch.equal(out[-1], pixels[-1])  # -1: untouched
    assert not torch.allclose(out[0], out[1], atol=1e-3)  # order matters


def test_hsv_grey_and_ties():
    h, s, v = data._rgb_to_hsv(torch.tensor([[0.5, 0.5, 0.5], [0.0, 0.0, 0.0], [0.7, 0.7, 0.1]]).view(3, 3, 1, 1))
    assert h.flatten()[:2].tolist() == [0.0, 0.0] and s.flatten()[:2].tolist() == [0.0, 0.0]  # grey: H = 0
    assert h.flatten()[2].item() == pytest.approx(math.pi / 3)  # R and G tie at the max: yellow, 60 degrees
    rgb = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(data._hsv_to_rgb(*data._rgb_to_hsv(rgb)), rgb, atol=1e-5)


def test_color_jitter_draws(monkeypatch):
    seen = []
    monkeypatch.setattr(data, "_jitter", lambda img, factors, order: seen.append((factors, order)) or img)
    data.color_jitter(torch.rand(400, 3, 1, 1), generator=torch.Generator().manual_seed(0))
    factors, order = seen[0]
    on = order[:, 0] >= 0
    assert 0.74 < on.float().mean() < 0.86  # p = 0.8 per image
    assert (order[~on] == -1).all() and (order[on].sort(1).values == torch.arange(4)).all()
    assert len({tuple(o) for o in order[on].tolist()}) == 24  # a fresh permutation per image: all 24 occur
    assert factors[:, :3].min() >= 0.8 and factors[:, :3].max() <= 1.2 and factors[:, 3].abs().max() <= 0.2
    assert factors[:, 3].min() < -0.19 and factors[:, :3].max() > 1.19  # the whole ranges are used


def test_color_jitter_changes_street_images_by_about_a_tenth():
    img = torch.stack([data._to_tensor(data.toy_scene(i)[0]) for i in range(8)])
    gen = torch.Generator().manual_seed(0)
    change = (data.color_jitter(img, p=1.0, generator=gen) - img).abs().mean().item()
    assert 0.08 < change < 0.2  # METHOD.md: ~0.11 on street images (0.10 here; the torchvision-like one: 0.06-0.08)


# ----------------------------------------------------------------------------- bad input
def test_bad_inputs_raise_dataset_error(tmp_path, cityscapes_root):
    with pytest.raises(DatasetError, match="toy-day"):
        build_dataset("gta5")
    with pytest.raises(DatasetError, match=str(tmp_path / "nowhere")):
        build_dataset("gta", root=tmp_path / "nowhere")
    with pytest.raises(DatasetError, match="gtFine_labelIds"):  # the message shows the expected tree
        build_dataset("cityscapes", root=cityscapes_root, split="test")
    with pytest.raises(DatasetError, match="leftImg8bit/test"):
        build_dataset("cityscapes", root=cityscapes_root, split="test")
    (tmp_path / "empty/gta/images").mkdir(parents=True)
    (tmp_path / "empty/gta/labels").mkdir(parents=True)
    with pytest.raises(DatasetError, match="no images"):
        build_dataset("gta", root=tmp_path / "empty")
    with pytest.raises(DatasetError, match="crop_size 600.*1024x512"):
        build_dataset("cityscapes", root=cityscapes_root, crop_size=600)


def test_unreadable_and_mismatched_files(cityscapes_root):
    bad = cityscapes_root / "cityscapes/leftImg8bit/val/lindau/lindau_000000_000000_leftImg8bit.png"
    bad.write_bytes(b"not a png")
    ds = build_dataset("cityscapes", root=cityscapes_root, split="val", train=False)
    with pytest.raises(DatasetError, match=str(bad)):
        ds[0]
    train = build_dataset("cityscapes", root=cityscapes_root, split="val", crop_size=64)
    with pytest.warns(UserWarning, match=str(bad)):
        items = [train[k] for k in range(4)]  # each epoch meets the bad file once
    assert all(img.shape == (3, 64, 64) for img, _ in items)
    fresh = build_dataset("cityscapes", root=cityscapes_root, split="val", crop_size=64)
    assert torch.equal(train[0][0], fresh[0][0])
    other = cityscapes_root / "cityscapes/leftImg8bit/val/lindau/lindau_000000_000001_leftImg8bit.png"
    Image.open(other).resize((64, 32)).save(other)
    with pytest.raises(DatasetError, match="lindau_000000_000001_leftImg8bit.png"):
        ds[1]
