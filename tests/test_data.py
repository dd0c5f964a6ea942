"""Tests for data.py: label tables against the official Cityscapes list, loaders on tiny fake trees written with
the official names and encodings, ClassMix semantics, augmentation invariants, toy determinism, bad input.

    python -m pytest tests/test_data.py -q
"""
import math
import sys

import numpy as np
import pytest
import torch
from conftest import label_ids, write_ids, write_png16, write_rgb
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


def test_synthia_table_matches_method_md():
    table = {3: 0, 4: 1, 2: 2, 21: 3, 5: 4, 7: 5, 15: 6, 9: 7, 6: 8, 1: 10, 10: 11, 17: 12, 8: 13, 19: 15, 12: 17,
             11: 18}
    for label_id in range(65536):
        assert data.SYNTHIA_LUT[label_id] == table.get(label_id, 255)
    assert data.SYNTHIA_ID_TO_TRAINID == table
    assert set(data.SYNTHIA_16) == set(range(19)) - {9, 14, 16}
    assert set(data.SYNTHIA_13) == set(data.SYNTHIA_16) - {3, 4, 5} and len(data.SYNTHIA_13) == 13


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
    assert torch.allclose(data.color_jitter(img, p=0.0), img, atol=1e-6)  # p = 0 changes nothing
    assert torch.equal(data.gaussian_blur(img, p=0.0), img)
    flat = torch.full((2, 3, 16, 16), 0.4)
    assert torch.allclose(data.gaussian_blur(flat, p=1.0), flat)  # normalised kernel


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
