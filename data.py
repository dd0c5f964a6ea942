"""Datasets, label tables, ClassMix and strong augmentation for MFM (METHOD.md §4-5).

GTA5, SYNTHIA-RAND-CITYSCAPES, Cityscapes, ACDC and Dark Zurich are read from their official download trees (no
conversion step); label ids become Cityscapes trainIds through lookup tables on the fly (ACDC and Dark Zurich ship
trainIds). PASCAL VOC 2012 ("voc", semi-supervised only) keeps its own 21 classes (CLASSES: names and palette per
dataset), its native image sizes and UniMatch's random rescaling before the crop. Images alone
(build_dataset(labels=False): a training target, a test split) get labels that are IGNORE_INDEX everywhere.
"toy-day" -> "toy-night" is a procedural street-scene domain shift, generated in memory, for the CPU demo and the
tests. class_mix and strong_augment are steps 3-4 of the DACS baseline (METHOD.md §4), in plain torch, batched, on
any device.
Training datasets are "infinite": ds[k] for the global sample counter k returns (image float32 (3, c, c) in
[0, 1], label int64 (c, c), 255 = ignore) and depends only on (seed, k): resuming at step s = starting at
k = s * batch_size, with any number of DataLoader workers. Evaluation (train=False) returns the image resized
to ds.eval_size, the label at full native resolution and the ground-truth file's name inside the split (the
sample's key). labeled_split/write_split read and write the semi-supervised split files (METHOD.md §8).

    python data.py --show toy                   # writes toy_grid.png: toy-day / toy-night with labels
"""
import argparse
import json
import itertools
import math
import re
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

IGNORE_INDEX = 255
CLASS_NAMES = ("road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign",
               "vegetation", "terrain", "sky", "person", "rider", "car", "truck", "bus", "train", "motorcycle",
               "bicycle")
PALETTE = ((128, 64, 128), (244, 35, 232), (70, 70, 70), (102, 102, 156), (190, 153, 153), (153, 153, 153),
           (250, 170, 30), (220, 220, 0), (107, 142, 35), (152, 251, 152), (70, 130, 180), (220, 20, 60),
           (255, 0, 0), (0, 0, 142), (0, 0, 70), (0, 60, 100), (0, 80, 100), (0, 0, 230), (119, 11, 32))
# METHOD.md §5 (cityscapesscripts.helpers.labels); GTA labels use the same ids. Every other id is ignored.
CITYSCAPES_ID_TO_TRAINID = {7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10, 24: 11,
                            25: 12, 26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18}
TRAINID_TO_LABELID = {t: i for i, t in CITYSCAPES_ID_TO_TRAINID.items()}
SYNTHIA_ID_TO_TRAINID = {3: 0, 4: 1, 2: 2, 21: 3, 5: 4, 7: 5, 15: 6, 9: 7, 6: 8, 1: 10, 10: 11, 17: 12, 8: 13,
                         19: 15, 12: 17, 11: 18}
SYNTHIA_16 = tuple(sorted(SYNTHIA_ID_TO_TRAINID.values()))  # all but terrain 9, truck 14, train 16
SYNTHIA_13 = tuple(t for t in SYNTHIA_16 if t not in (3, 4, 5))  # minus wall, fence, pole
CITYSCAPES_LUT = np.full(256, IGNORE_INDEX, np.uint8)  # label id -> trainId, uint8 lookup table
CITYSCAPES_LUT[list(CITYSCAPES_ID_TO_TRAINID)] = list(CITYSCAPES_ID_TO_TRAINID.values())
SYNTHIA_LUT = np.full(65536, IGNORE_INDEX, np.uint8)  # SYNTHIA ids are 16-bit
SYNTHIA_LUT[list(SYNTHIA_ID_TO_TRAINID)] = list(SYNTHIA_ID_TO_TRAINID.values())
# PASCAL VOC 2012: 21 classes (UniMatch util/classes.py:1-3) and the devkit's colour map (VOCdevkit VOCcode/
# VOClabelcolormap.m, UniMatch util/utils.py:11-27: index bits 0, 1, 2 give the top bits of R, G, B, and so on)
VOC_CLASS_NAMES = ("background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
                   "dining table", "dog", "horse", "motorbike", "person", "potted plant", "sheep", "sofa", "train",
                   "tv/monitor")
VOC_PALETTE = ((0, 0, 0), (128, 0, 0), (0, 128, 0), (128, 128, 0), (0, 0, 128), (128, 0, 128), (0, 128, 128),
               (128, 128, 128), (64, 0, 0), (192, 0, 0), (64, 128, 0), (192, 128, 0), (64, 0, 128), (192, 0, 128),
               (64, 128, 128), (192, 128, 128), (0, 64, 0), (128, 64, 0), (0, 192, 0), (128, 192, 0), (0, 64, 128))
VOC_DIR = "voc/VOCdevkit/VOC2012"  # under the data root, as the devkit tar unpacks
# UniMatch's random rescale (dataset/semi.py:42, transform.py:44-57): long side x U(0.5, 2.0), then the crop, padded
# with image 0 / label 255 where the image is smaller (transform.py:10-15)
VOC_SCALE = (0.5, 2.0)
CLASSES = {"voc": (VOC_CLASS_NAMES, VOC_PALETTE)}  # datasets with their own classes; the others: Cityscapes' 19
_LABEL_SUFFIX = "_gtFine_labelIds.png"  # Cityscapes labels we read (split files may name labelTrainIds)
MAX_LABEL_ID = 33  # the largest id of the official Cityscapes table (bicycle); GTA uses the same ids
NOT_IDS_FRACTION = 0.5  # *choice*: a label with more of its pixels outside 0-33 is no label-id map: rejected
DATASETS = ("gta", "synthia", "cityscapes", "acdc", "dark_zurich", "toy-day", "toy-night", "voc")
SOURCE_DATASETS = ("gta", "synthia", "toy-day")  # labelled source domains: crops retried (cat_max_ratio)
# (W, H) before cropping, METHOD.md §4. GTA: 1280x720 as in DACS (DAFormer keeps the aspect: 1280x704). HRDA
# (train.py --recipe hrda) doubles them: GTA 2560x1440 (HRDA keeps the aspect, 2560x1407: our choice follows the
# DACS size, as here), SYNTHIA 2560x1520 and Cityscapes 2048x1024 exactly as HRDA (HRDA.md §1.1).
# ACDC and Dark Zurich: 960x540, half their native 1920x1080, as DAFormer; HRDA/MIC 1920x1080 (ADVERSE.md §1).
RESIZE = {"gta": (1280, 720), "synthia": (1280, 760), "cityscapes": (1024, 512), "acdc": (960, 540),
          "dark_zurich": (960, 540), "toy-day": (128, 64), "toy-night": (128, 64),
          "voc": None}  # None: native sizes (VOC: up to 500x500), rescaled at random for training (VOC_SCALE)
# The adverse-condition targets (ADVERSE.md §1-2): labels *_gt_labelTrainIds.png are trainIds already; images
# *_rgb_anon.png, the label under the same relative path (mmseg custom.py:152-155, no split files).
TRAINID_DATASETS = ("acdc", "dark_zurich")
# Label files that hold class indices already (ACDC, Dark Zurich: trainIds; VOC: 0-20, 255 on object borders):
# name -> (lookup table keeping 0..K-1, every other value ignored; what they hold; the file the download has)
INDEX_LABELS = {name: (np.array([*range(k), *[IGNORE_INDEX] * (256 - k)], np.uint8), known, expected)
                for names, k, known, expected in (
                    (TRAINID_DATASETS, len(CLASS_NAMES), "the trainIds 0-18 and 255", "*_gt_labelTrainIds.png"),
                    (("voc",), len(VOC_CLASS_NAMES), "the VOC class indices 0-20 and 255",
                     "SegmentationClass (palette) or SegmentationClassAug PNG"))
                for name in names}
CONDITIONS = {"acdc": ("fog", "night", "rain", "snow")}  # the top folders of ACDC's zips; scored one by one
UNLABELLED = {("acdc", "test"), ("dark_zurich", "train"), ("dark_zurich", "test")}  # no ground truth downloaded
NO_RECTIFICATION = ("acdc", "dark_zurich")  # HRDA/MIC drop the pseudo-label margins there: "no rectification
# artifacts" (H:experiments.py:544-546; M:seg/experiments.py:409-411); DAFormer kept them (D:experiments.py:394)
EXPECTED_TREE = {
    "gta": "<root>/gta/images/00001.png ...\n<root>/gta/labels/00001.png ...   (8-bit palette PNGs, label ids)",
    "synthia": "<root>/synthia/RGB/0000000.png ...\n<root>/synthia/GT/LABELS/0000000.png ...   (16-bit PNGs)",
    "cityscapes": "<root>/cityscapes/leftImg8bit/<split>/<city>/<city>_<seq>_<frame>_leftImg8bit.png\n"
                  "<root>/cityscapes/gtFine/<split>/<city>/<city>_<seq>_<frame>_gtFine_labelIds.png",
    "voc": f"<root>/{VOC_DIR}/JPEGImages/<id>.jpg\n<root>/{VOC_DIR}/SegmentationClass/<id>.png   (palette PNGs)\n"
           f"<root>/{VOC_DIR}/ImageSets/Segmentation/train.txt and val.txt   (image ids)\n"
           f"<root>/{VOC_DIR}/SegmentationClassAug/<id>.png   (optional: SBD's labels of the 10,582 augmented set)",
    "acdc": "<root>/acdc/rgb_anon/<condition>/<split>/<sequence>/<name>_rgb_anon.png   (as the zips unpack; "
            "condition fog, night, rain or snow)\n<root>/acdc/gt/<condition>/<split>/<sequence>/<name>_gt_"
            "labelTrainIds.png   (train and val)\nor flattened by rsync as in the DAFormer/HRDA/MIC READMEs: "
            "<root>/acdc/rgb_anon/<split>/*_rgb_anon.png, <root>/acdc/gt/<split>/*_gt_labelTrainIds.png",
    "dark_zurich": "<root>/dark_zurich/rgb_anon/train/night/<sequence>/<name>_rgb_anon.png   (training target)\n"
                   "<root>/dark_zurich/rgb_anon/<split>/night/<sequence>/<name>_rgb_anon.png   (val, test)\n"
                   "<root>/dark_zurich/gt/val/night/<sequence>/<name>_gt_labelTrainIds.png"}
CAT_MAX_RATIO, CROP_TRIES = 0.75, 10  # source crops: retry while one class fills > 75% (mmseg RandomCrop)
RCS_ROUNDS = 10  # DAFormer RCS: whole crops (each with its CROP_TRIES) until the rare class is in it
MAX_BAD_FILES = 10  # training skips up to this many unreadable files in a row, then raises
RCS_TEMPERATURE = 0.01  # DAFormer rare class sampling
# DAFormer's thresholds: > 3000 px of the class in the (full-resolution) image, > 1500 px in a 512 crop. Our
# choice: scale them down with the area for smaller images/crops (toy, tests); paper settings stay exact. The crop
# threshold also scales up with the crop: HRDA's 6000 px at 1024 (HRDA.md §1.1).
RCS_MIN_PIXELS, RCS_REF_AREA, RCS_MIN_CROP_PIXELS = 3000, 1280 * 720, 1500
TOY_LEN = {"train": 2000, "val": 100}
TOY_VAL_OFFSET = 1_000_000  # val scene i uses scene seed offset + i: disjoint from train


class DatasetError(Exception):
    """A dataset that is missing, empty or unreadable, or a bad dataset option."""


def label_set(name):
    """(class names, palette) of dataset `name`: its own (CLASSES) or Cityscapes' 19 trainIds."""
    return CLASSES.get(name, (CLASS_NAMES, PALETTE))


def colorize(label, palette=PALETTE):
    """Label (H, W) class indices (numpy or tensor) -> uint8 RGB (H, W, 3) with `palette` (default: Cityscapes'
    trainIds; label_set(name)[1] for others); 255 and unknown -> black."""
    label = label.detach().cpu().numpy() if torch.is_tensor(label) else np.asarray(label)
    lut = np.zeros((256, 3), np.uint8)
    lut[:len(palette)] = palette
    return lut[np.clip(label, 0, 255).astype(np.uint8)]


# ----------------------------------------------------------------------------- files
def _read_png(path, what, mode=None):
    """(file's mode, array converted to `mode`), or a DatasetError naming the file."""
    try:
        with Image.open(path) as im:
            return im.mode, np.asarray(im.convert(mode) if mode else im)
    except (OSError, ValueError) as err:
        raise DatasetError(f"cannot read {what} {path}: {err}. Re-download or remove the file.") from err


def _read_label_ids(path, name):
    if name == "synthia":
        # Pillow opens 16-bit RGB PNGs as 8-bit RGB keeping only the high byte, so every id < 256 reads as 0.
        try:
            import cv2
        except ImportError as err:
            raise DatasetError("SYNTHIA labels are 16-bit multi-channel PNGs that Pillow cannot read; install "
                               "OpenCV for them: pip install opencv-python-headless") from err
        ids = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
        if ids is None:
            raise DatasetError(f"cannot read SYNTHIA label {path}. Re-download or remove the file.")
        if ids.dtype != np.uint16:
            raise DatasetError(f"SYNTHIA label {path} is {ids.dtype.itemsize * 8}-bit; expected the 16-bit "
                               "multi-channel PNG of the SYNTHIA-RAND-CITYSCAPES download (GT/LABELS).")
        return ids[..., 2] if ids.ndim == 3 else ids  # OpenCV gives BGR(A): 2 = the PNG's first channel
    mode, ids = _read_png(path, "label")
    if mode not in ("P", "L"):  # an RGB colour-coded label would silently give garbage ids
        raise DatasetError(f"label {path} has mode {mode}; expected label ids as a palette (P) or grayscale (L) "
                           f"PNG, as in the official {name} download.")
    outside, known = _outside(ids, name)  # 16-bit instanceIds files already fail the mode check (I;16)
    if outside.size > NOT_IDS_FRACTION * ids.size:
        expected = INDEX_LABELS[name][2] if name in INDEX_LABELS else \
            "label-id PNG (not trainIds, colours or instance ids)"
        raise DatasetError(f"label {path} holds ids outside {known} in {outside.size / ids.size:.0%} of its pixels "
                           f"(e.g. id {np.bincount(outside).argmax()}); expected the official {name} {expected}.")
    return ids


def _voc_ids(base, split):
    """Image ids of VOC's ImageSets/Segmentation/<split>.txt (train: 1,464; val: 1,449)."""
    path = base / "ImageSets/Segmentation" / f"{split}.txt"
    try:
        return path.read_text().split()
    except OSError as err:
        raise DatasetError(f"voc: cannot read {path} ({err}). Expected the VOC 2012 tree:\n"
                           f"{EXPECTED_TREE['voc']}") from err


def _list_voc(root, split):
    """VOC 2012 samples [(JPEGImages/<id>.jpg, label, "<id>.png")]: val = val.txt with SegmentationClass labels;
    train = train.txt, plus, when SegmentationClassAug is there, every image it labels that is not in val (the
    10,582 augmented set UniMatch's blended splits and unlabelled lists draw from: splits/pascal/*/unlabeled.txt).
    A train image's label: SegmentationClass (the finer annotation, 255 on borders) if it has one, else the Aug
    one (*choice*; UniMatch ships one preprocessed SegmentationClass folder for all)."""
    if split not in ("train", "val"):
        raise DatasetError(f"voc has the splits train and val, got split={split!r}.")
    base = root / VOC_DIR
    for d in (root, base / "JPEGImages", base / "SegmentationClass"):
        if not d.is_dir():
            raise DatasetError(f"voc: directory {d} not found. Expected the VOC 2012 tree under the data root "
                               f"{root}:\n{EXPECTED_TREE['voc']}")
    ids, aug = _voc_ids(base, split), base / "SegmentationClassAug"
    if split == "train" and aug.is_dir():
        ids = set(ids) | ({p.stem for p in aug.glob("*.png")} - set(_voc_ids(base, "val")))
    samples, missing = [], []
    for i in sorted(ids):
        image, label = base / "JPEGImages" / f"{i}.jpg", base / "SegmentationClass" / f"{i}.png"
        label = label if label.is_file() or split == "val" else aug / f"{i}.png"
        (samples if image.is_file() and label.is_file() else missing).append((image, label, f"{i}.png"))
    if missing:
        warnings.warn(f"voc {split}: skipping {len(missing)} listed images without their JPEG or label "
                      f"(e.g. {missing[0][0]}, {missing[0][1]})")
    if not samples:
        raise DatasetError(f"voc {split}: none of the listed images has its JPEG and label. Expected:\n"
                           f"{EXPECTED_TREE['voc']}")
    return samples


def _outside(ids, name):
    """(values of the label map `ids` that its dataset's encoding does not know, what it knows in words)."""
    if name in INDEX_LABELS:
        lut, known, _ = INDEX_LABELS[name]
        return ids[(lut[ids] == IGNORE_INDEX) & (ids != IGNORE_INDEX)], known
    return ids[ids > MAX_LABEL_ID], f"the label ids 0-{MAX_LABEL_ID}"


def _list_files(name, root, split, labels=True):
    """[(image path, label path, label name inside the split)] of the pairs in the official tree; labels=False:
    [(image path, None, image name inside the split)] of every image."""
    if name == "voc":  # labels or not: its lists pair each image with one
        return _list_voc(root, split)
    if name in ("gta", "synthia") and split != "train":
        raise DatasetError(f"{name} has only the split 'train' (all images), got split={split!r}.")
    night = "/night" * (name == "dark_zurich" and split == "train")  # DZ's target: night only (ADVERSE.md §2)
    img_dir, lbl_dir, pattern, img_suffix, lbl_suffix = {
        "gta": ("gta/images", "gta/labels", "*", ".png", ".png"),
        "synthia": ("synthia/RGB", "synthia/GT/LABELS", "*", ".png", ".png"),
        "cityscapes": (f"cityscapes/leftImg8bit/{split}", f"cityscapes/gtFine/{split}", "*/*", "_leftImg8bit.png",
                       _LABEL_SUFFIX),
        "dark_zurich": (f"dark_zurich/rgb_anon/{split}{night}", f"dark_zurich/gt/{split}{night}", "**/*",
                        "_rgb_anon.png", "_gt_labelTrainIds.png"),
        # ACDC as its zips unpack (keys <condition>/<split>/...), else as the anchors' rsync flattens it; both
        # present (rsync copies): the zips' tree, which keeps each image's condition
        "acdc": ("acdc/rgb_anon", "acdc/gt", f"*/{split}/**/*", "_rgb_anon.png", "_gt_labelTrainIds.png")
        if any((root / "acdc/rgb_anon" / c / split).is_dir() for c in CONDITIONS["acdc"]) else
        (f"acdc/rgb_anon/{split}", f"acdc/gt/{split}", "**/*", "_rgb_anon.png", "_gt_labelTrainIds.png")}[name]
    img_dir, lbl_dir = root / img_dir, root / lbl_dir
    for d in (root, img_dir, lbl_dir)[:3 if labels else 2]:
        if not d.is_dir():
            raise DatasetError(f"{name}: directory {d} not found. Expected the official tree under the data "
                               f"root {root}:\n{EXPECTED_TREE[name]}")
    images = {p.relative_to(img_dir).as_posix()[:-len(img_suffix)]: p for p in img_dir.glob(pattern + img_suffix)}
    if not labels:
        keys = sorted(images)
        if not keys:
            raise DatasetError(f"{name}: no images {pattern}{img_suffix} found in {img_dir}. Expected:\n"
                               f"{EXPECTED_TREE[name]}")
        return [(images[k], None, k + img_suffix) for k in keys]
    labels = {p.relative_to(lbl_dir).as_posix()[:-len(lbl_suffix)]: p for p in lbl_dir.glob(pattern + lbl_suffix)}
    unpaired = sorted(images.keys() ^ labels.keys())
    if unpaired:  # some GTA downloads lack ~25 pairs (METHOD.md §5)
        warnings.warn(f"{name}: skipping {len(unpaired)} unpaired image/label files (e.g. {unpaired[0]}) "
                      f"in {img_dir} and {lbl_dir}")
    keys = sorted(images.keys() & labels.keys())
    if not keys:
        raise DatasetError(f"{name}: no images {pattern}{img_suffix} with labels found in {img_dir} and {lbl_dir}. "
                           f"Expected:\n{EXPECTED_TREE[name]}")
    return [(images[k], labels[k], k + lbl_suffix) for k in keys]


# ----------------------------------------------------------------------------- toy domain shift
# Per trainId: day colour, texture, amplitude, then the same at night. Textures: 0 flat, 1 noise, 2 window grid,
# 3 bars, 4 paving joints, 5 vertical gradient, 6 horizontal streaks, 7 dots. Night changes some looks on purpose
# (lit windows, stars, wet road, red cars, a sidewalk like the day road): source-only models fail on those.
_TOY_LOOK = {0: ((95, 95, 100), 1, .15, (70, 60, 85), 6, .8), 1: ((175, 165, 150), 4, -.3, (95, 95, 100), 1, .15),
             2: ((160, 120, 95), 2, -.35, (55, 50, 65), 2, 2.5), 4: ((130, 105, 75), 3, .5, (90, 80, 60), 3, .5),
             5: ((90, 90, 95), 0, 0, (120, 120, 110), 0, 0), 6: ((40, 40, 40), 7, 2., (40, 170, 70), 0, 0),
             7: ((225, 200, 40), 0, 0, (250, 250, 210), 0, 0), 8: ((65, 135, 55), 1, .3, (30, 55, 45), 1, .3),
             9: ((150, 160, 85), 1, .3, (80, 65, 50), 1, .3), 10: ((135, 185, 235), 5, -.4, (20, 25, 60), 7, 4.),
             11: ((200, 70, 70), 1, .1, (120, 130, 165), 1, .1), 13: ((45, 75, 200), 1, .1, (170, 40, 45), 6, .5)}
_TOY_COLOUR, _TOY_TEX, _TOY_AMP = np.zeros((2, 256, 3)), np.zeros((2, 256), np.int64), np.zeros((2, 256))
for _c, _look in _TOY_LOOK.items():  # (domain, trainId) tables: 0 = day, 1 = night
    _TOY_COLOUR[:, _c], _TOY_TEX[:, _c], _TOY_AMP[:, _c] = _look[::3], _look[1::3], _look[2::3]


def _fill(lbl, y0, y1, x0, x1, cls):  # a box, clipped at the border (negative starts would wrap around)
    lbl[max(int(y0), 0):max(int(y1), 0), max(int(x0), 0):max(int(x1), 0)] = cls


def toy_scene(index, night=False, split="train"):
    """Procedural street scene -> (image uint8 (64, 128, 3), label uint8 (64, 128) trainIds), deterministic in
    (domain, split, index). Both domains draw geometry from the same distribution; only appearance differs."""
    w_img, h_img = RESIZE["toy-day"]
    rng = np.random.default_rng((int(night), index + (TOY_VAL_OFFSET if split == "val" else 0)))
    yy, xx = np.mgrid[0:h_img, 0:w_img]
    lbl = np.full((h_img, w_img), 10, np.uint8)  # sky
    hor = int(h_img * rng.uniform(0.38, 0.52))  # horizon row
    x = int(rng.integers(-10, 0))
    while x < w_img:  # skyline: buildings of varying heights, some trees in between
        width, top = int(rng.integers(10, 30)), hor - h_img * rng.uniform(0.1, 0.35)
        if rng.random() < 0.75:
            _fill(lbl, top, hor, x, x + width, 2)
        else:
            lbl[((xx - x - width / 2) / (width / 2)) ** 2 + ((yy - top - 6) / (hor - top)) ** 2 < 1] = 8
        x += width
    if rng.random() < 0.6:  # a fence along the far edge of the street
        x0 = rng.uniform(0, w_img / 2)
        _fill(lbl, hor - h_img * 0.08, hor, x0, x0 + rng.uniform(20, 60), 4)
    cx = w_img * rng.uniform(0.35, 0.65)  # vanishing point: road and sidewalks widen towards the bottom
    road_k, walk_k = rng.uniform(0.35, 0.55) * w_img, rng.uniform(0.12, 0.25) * w_img
    depth, ground = np.clip((yy - hor) / (h_img - hor), 0, 1), yy >= hor
    lbl[ground] = 9 if rng.random() < 0.6 else 8  # terrain or hedges beyond the sidewalks
    lbl[ground & (np.abs(xx - cx) < 4 + depth * (road_k + walk_k))] = 1
    lbl[ground & (np.abs(xx - cx) < 2 + depth * road_k)] = 0
    things = [(int(rng.integers(hor + 2, h_img + 1)), kind) for kind in rng.choice(3, rng.integers(3, 9))]
    for base, kind in sorted(things):  # far to near, so nearer objects occlude farther ones
        d = (base - hor) / (h_img - hor)
        road_w, walk_w, side = 2 + d * road_k, 4 + d * (road_k + walk_k), rng.choice((-1, 1))
        if kind == 0:  # car on the road: body plus a narrower cabin
            wc, xc = 6 + 0.25 * w_img * d, cx + rng.uniform(-0.7, 0.7) * road_w
            _fill(lbl, base - 0.35 * wc, base, xc - wc / 2, xc + wc / 2, 13)
            _fill(lbl, base - 0.6 * wc, base - 0.3 * wc, xc - wc / 4, xc + wc / 4, 13)
        elif kind == 1:  # person on a sidewalk: body ellipse and head
            hp, xp = 4 + 0.3 * h_img * d, cx + side * (road_w + rng.uniform(0.2, 0.8) * (walk_w - road_w))
            lbl[((xx - xp) / max(hp / 6, 1)) ** 2 + ((yy - base + hp * 0.4) / (hp * 0.4)) ** 2 < 1] = 11
            lbl[((xx - xp) ** 2 + (yy - base + hp * 0.9) ** 2) < max(hp / 8, 0.8) ** 2] = 11
        else:  # pole at the kerb with a traffic sign or a traffic light on top
            hp, wp, s, xp = 8 + 0.6 * h_img * d, 1 + 2 * d, 2 + 3 * d, cx + side * (road_w + 1)
            _fill(lbl, base - hp, base, xp, xp + wp, 5)
            tall = 2 if rng.random() < 0.5 else 1  # traffic lights are tall, traffic signs wide
            _fill(lbl, base - hp - tall * s, base - hp + s, xp - s / tall, xp + wp + s / tall, 6 if tall == 2 else 7)
    textures = np.stack([np.zeros((h_img, w_img)), rng.standard_normal((h_img, w_img)),
                         ((xx % 6 < 3) & (yy % 5 < 2)).astype(float), (xx % 3 == 0).astype(float),
                         ((xx % 8 == 0) | (yy % 4 == 0)).astype(float), yy / h_img - 0.5,
                         (yy % 3 == 0) * rng.random((1, w_img)), (rng.random((h_img, w_img)) > 0.97).astype(float)])
    colour = _TOY_COLOUR[int(night)] + rng.uniform(-15, 15, (256, 3))  # per-scene colour variation
    shade = 1 + _TOY_AMP[int(night)][lbl] * textures[_TOY_TEX[int(night)][lbl], yy, xx]
    img = colour[lbl] * shade[..., None] * rng.uniform(0.85, 1.15)
    if night:  # global shift: darker, blue cast, 3x3 blur, and (below) stronger sensor noise
        pad = np.pad(img * 0.7 * np.array([0.8, 0.9, 1.25]), ((1, 1), (1, 1), (0, 0)), mode="edge")
        img = sum(pad[dy:dy + h_img, dx:dx + w_img] for dy in range(3) for dx in range(3)) / 9
    img = img + rng.normal(0, 10 if night else 3, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8), lbl


# ----------------------------------------------------------------------------- dataset
class SegDataset(torch.utils.data.Dataset):
    """One segmentation dataset; see the module docstring for the train/eval item contract."""

    num_classes = len(CLASS_NAMES)

    def __init__(self, name, samples, split, train, crop_size, seed, eval_size, rcs, rcs_cache, source,
                 frame=False, labels=True):
        self.name, self.samples, self.split, self.train, self.frame = name, samples, split, train, frame
        self.labels = labels  # False: labels are IGNORE_INDEX everywhere, no label file is read
        self.crop_size, self.seed, self.eval_size = crop_size, seed, eval_size
        self.source, self.rcs = source, rcs
        self.num_classes = len(label_set(name)[0])
        self.outside_pixels = 0  # pixels read so far with ids outside the table (per process: per worker)
        if train and eval_size is not None and crop_size > min(eval_size):
            raise DatasetError(f"crop_size {crop_size} is larger than the resized {name} image "
                               f"{eval_size[0]}x{eval_size[1]} (WxH); use a crop_size <= {min(eval_size)}.")
        if rcs:
            self._init_rcs(rcs_cache)

    def __len__(self):
        return len(self.samples)

    def load(self, i):
        """Native-resolution (image uint8 (H, W, 3), label uint8 (H, W) trainIds) of sample i."""
        if self.name.startswith("toy"):  # the key "00017.png" names scene 17
            img, lbl = toy_scene(int(self.samples[i][2][:-4]), self.name == "toy-night", self.split)
            return img, lbl if self.labels else np.full_like(lbl, IGNORE_INDEX)
        img_path, lbl_path, _ = self.samples[i]
        img = _read_png(img_path, "image", "RGB")[1]
        if not self.labels:
            return img, np.full(img.shape[:2], IGNORE_INDEX, np.uint8)
        lbl = self._label(i)
        if img.shape[:2] != lbl.shape:
            raise DatasetError(f"image {img_path} is {img.shape[1]}x{img.shape[0]} but its label {lbl_path} is "
                               f"{lbl.shape[1]}x{lbl.shape[0]}; they must have the same size.")
        return img, lbl

    def _label(self, i):
        if self.name.startswith("toy"):
            return self.load(i)[1]
        path = self.samples[i][1]
        ids = _read_label_ids(path, self.name)
        if self.name == "synthia":
            return SYNTHIA_LUT[ids]
        outside, known = _outside(ids, self.name)  # DAFormer ignores ids outside the table: so do we, counting them
        if outside.size and not self.outside_pixels:  # warn once per dataset (and DataLoader worker)
            warnings.warn(f"{self.name}: label {path} holds {outside.size} pixels of id {outside.max()} (or others) "
                          f"outside {known}; ignored, as in DAFormer. Later ones are counted "
                          "silently (dataset.outside_pixels).")
        self.outside_pixels += outside.size
        return INDEX_LABELS[self.name][0][ids] if self.name in INDEX_LABELS else CITYSCAPES_LUT[ids]

    def __getitem__(self, k):
        if not self.train:
            if not 0 <= k < len(self):
                raise IndexError(k)
            img, lbl = self.load(k)
            img = _resize(img, self.eval_size, Image.BILINEAR)
            return _to_tensor(img), torch.from_numpy(lbl.astype(np.int64)), self.samples[k][2]
        rng, n, rare = np.random.default_rng((self.seed, k)), len(self), None
        if self.rcs:  # DAFormer RCS: rare class c first, then an image that contains enough of it
            rare = int(rng.choice(self.num_classes, p=self.rcs_prob))
            i = int(rng.choice(self.rcs_images[rare]))
        else:  # image index from the permutation of epoch k // n
            i = int(np.random.default_rng((self.seed, k // n, 1)).permutation(n)[k % n])
        for attempt in range(MAX_BAD_FILES + 1):  # an unreadable training file: warn, take the next file
            try:
                img, lbl = self.load((i + attempt) % n)
                break
            except DatasetError as err:
                if attempt == MAX_BAD_FILES:
                    raise
                warnings.warn(f"{err} Using the next file of the list instead.")
        if self.eval_size is None:  # native sizes (VOC): UniMatch's random rescale, padded to the crop
            img, lbl = _rescale_and_pad(img, lbl, self.crop_size, rng)
        img, lbl = _resize(img, self.eval_size, Image.BILINEAR), _resize(lbl, self.eval_size, Image.NEAREST)
        y, x = self._choose_crop(lbl, rng, rare)
        c, width = self.crop_size, lbl.shape[1]
        img, lbl = img[y:y + c, x:x + c], lbl[y:y + c, x:x + c]
        flip = rng.random() < 0.5
        if flip:
            img, lbl = img[:, ::-1], lbl[:, ::-1]
        item = _to_tensor(img), torch.from_numpy(lbl.astype(np.int64))
        return (*item, torch.tensor([x, int(flip), width])) if self.frame else item

    def _choose_crop(self, lbl, rng, rare):
        """Top-left corner of the crop, as mmseg/DAFormer draw it. Source: mmseg's RandomCrop, up to CROP_TRIES
        checks, redrawn while one class fills >= 75% of the valid pixels (else the next draw is kept). RCS: that
        whole crop (a round) redone while the rare class has too few pixels in it, up to RCS_ROUNDS checks."""
        (h, w), c = lbl.shape, self.crop_size
        for _ in range(RCS_ROUNDS + 1 if rare is not None else 1):
            for _ in range(CROP_TRIES + 1 if self.source else 1):
                y, x = int(rng.integers(0, h - c + 1)), int(rng.integers(0, w - c + 1))
                n = np.bincount(lbl[y:y + c, x:x + c].ravel(), minlength=256)[:self.num_classes]
                if np.count_nonzero(n) > 1 and n.max() < CAT_MAX_RATIO * n.sum():
                    break
            if rare is None or n[rare] > self.rcs_min_crop:
                break
        return y, x

    def _init_rcs(self, cache):
        """Class pixel counts per image (computed once, cached as JSON), then P(c) ∝ exp((1 - f_c) / T)."""
        names = [str(s[2]) for s in self.samples]
        stats = json.loads(Path(cache).read_text()) if cache and Path(cache).is_file() else None
        if stats is None or stats.get("names") != names:
            counts = [np.bincount(self._label(i).ravel(), minlength=256)[:self.num_classes].tolist()
                      for i in tqdm(range(len(self)), desc=f"{self.name} class statistics for RCS")]
            stats = {"dataset": self.name, "names": names, "counts": counts, "area": self._label(0).size}
            if cache:
                Path(cache).parent.mkdir(parents=True, exist_ok=True)
                Path(cache).write_text(json.dumps(stats))
        counts = np.array(stats["counts"], np.int64)  # (N, 19)
        scale = min(1.0, stats["area"] / RCS_REF_AREA)
        self.rcs_min_crop = RCS_MIN_CROP_PIXELS * self.crop_size ** 2 / 512 ** 2  # 6000 at 1024 crops, as HRDA
        self.rcs_images = [np.flatnonzero(counts[:, c] > RCS_MIN_PIXELS * scale) for c in range(self.num_classes)]
        freq = counts.sum(0) / max(counts.sum(), 1)
        logits = np.where([len(imgs) > 0 for imgs in self.rcs_images], (1 - freq) / RCS_TEMPERATURE, -np.inf)
        if np.isinf(logits).all():
            raise DatasetError(f"rcs=True: no {self.name} image has more than {RCS_MIN_PIXELS * scale:.0f} pixels "
                               "of any class; rare class sampling needs labelled source images.")
        self.rcs_prob = torch.softmax(torch.from_numpy(logits), 0).numpy()  # float64


def _resize(arr, size, resample):  # (H, W[, 3]) uint8 -> size (W, H); None: unchanged
    return arr if size is None or arr.shape[1::-1] == tuple(size) else np.asarray(
        Image.fromarray(arr).resize(size, resample))


def _rescale_and_pad(img, lbl, crop, rng):
    """UniMatch's VOC augmentation before the crop (transform.py:10-15, 44-57): the long side L becomes an integer
    drawn uniformly from [int(0.5 L), int(2 L)] (aspect kept; image bilinear, label nearest), then the bottom and
    right are padded up to crop x crop, image with 0, label with IGNORE_INDEX. Unlabelled (target) crops are padded
    alike and their pseudo-labels cover the padding (*choice*; UniMatch ignores those pixels: semi.py:43-44, 70).
    (H, W, 3), (H, W) uint8 -> the same, at least crop x crop."""
    (h, w), long = lbl.shape, max(lbl.shape)
    side = int(rng.integers(int(long * VOC_SCALE[0]), int(long * VOC_SCALE[1]) + 1))
    size = (side, int(h * side / w + 0.5)) if w >= h else (int(w * side / h + 0.5), side)  # (W, H)
    img, lbl = _resize(img, size, Image.BILINEAR), _resize(lbl, size, Image.NEAREST)
    pad_h, pad_w = max(crop - size[1], 0), max(crop - size[0], 0)
    return (np.pad(img, ((0, pad_h), (0, pad_w), (0, 0))),
            np.pad(lbl, ((0, pad_h), (0, pad_w)), constant_values=IGNORE_INDEX))


def _to_tensor(img):
    return torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1))).float().div_(255)


def _samples(name, root, split, labels=True):  # [(image path, label path, key)] of the split
    if name not in DATASETS:
        raise DatasetError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}.")
    if not name.startswith("toy"):
        return _list_files(name, Path(root), split, labels)
    if split not in TOY_LEN:
        raise DatasetError(f"{name} has splits {', '.join(TOY_LEN)}, got split={split!r}.")
    return [(None, None, f"{i:05d}.png") for i in range(TOY_LEN[split])]


def build_dataset(name, root="data", split="train", train=True, crop_size=512, seed=0, rcs=False, rcs_cache=None,
                  resize=None, keys=None, source=None, frame=False, labels=True):
    """Dataset `name` (one of DATASETS) under `root`; see the module docstring for what items look like.
    resize: (W, H) replacing the recipe's size before cropping/evaluation (RESIZE), e.g. for half resolution.
    rcs_cache: JSON path for the RCS class statistics (None: computed and kept in memory only).
    keys: only these samples, in this order (their labels' names inside the split, e.g. from labeled_split).
    source: crop as a labelled source (cat_max_ratio retries); None: only the SOURCE_DATASETS do.
    frame: training items get a third entry, int64 (3,) = (crop's x offset, flipped 0/1, resized image width):
    where the crop lies in its image, for HRDA's pseudo-label margins at the image's left and right edges.
    labels=False: the images alone (a training target, an unlabelled split); keys are then the images' names."""
    samples = _samples(name, root, split, labels)
    if keys is not None:
        by_key = {s[2]: s for s in samples}
        missing = [k for k in keys if k not in by_key]
        if missing or not keys:
            raise DatasetError(f"{name} {split}: {len(missing)} of the {len(keys)} samples asked for are not under "
                               f"{root}{', e.g. ' + missing[0] if missing else ''}.")
        samples = [by_key[k] for k in keys]
    size = resize or RESIZE[name]
    return SegDataset(name, samples, split, train, crop_size, seed, size and tuple(size), rcs, rcs_cache,
                      name in SOURCE_DATASETS if source is None else bool(source), frame, labels)


def has_labels(name, split):
    """Whether the download holds this split's ground truth (not ACDC's or Dark Zurich's test, nor DZ's train)."""
    return (name, split) not in UNLABELLED


def condition(name, key):
    """The condition (ACDC: fog, night, rain, snow) of a sample from its key: the first folder of the zips' tree;
    None where the tree does not keep it (flattened) or the dataset has none."""
    first = key.split("/")[0]
    return first if first in CONDITIONS.get(name, ()) else None


# UniMatch line: image and trainIds label; U2PL line: the image alone; both maybe under a folder (cityscapes/)
_SPLIT_LINE = re.compile(r"(?:\S*/)?leftImg8bit/train/([^/\s]+/[^/\s]+)_leftImg8bit\.png"
                         r"(?:\s+(?:\S*/)?gtFine/train/\1_gtFine_label(?:Train)?Ids\.png)?")
# VOC: UniMatch's line (splits/pascal/*/labeled.txt: "JPEGImages/<id>.jpg SegmentationClass/<id>.png"), or the id alone
_VOC_SPLIT_LINE = re.compile(r"(?:\S*/)?JPEGImages/([^/\s]+)\.jpg(?:\s+(?:\S*/)?SegmentationClass(?:Aug)?/\1\.png)?"
                             r"|(\d{4}_\d{6})")
_SPLIT_FORMAT = {"cityscapes": "a UniMatch line ('leftImg8bit/train/<city>/<id>_leftImg8bit.png gtFine/train/<city>/"
                               "<id>_gtFine_labelTrainIds.png') nor a U2PL line (the image path alone)",
                 "voc": "a UniMatch line ('JPEGImages/<id>.jpg SegmentationClass/<id>.png') nor an image id"}


def labeled_split(name, root, spec, seed):
    """Keys (see build_dataset) of the labelled train images of the semi-supervised setting (METHOD.md §8).
    spec: a count (int or digits): the first `count` of a permutation of the train set drawn from `seed` alone
    (smaller draws are subsets of larger ones), sorted; VOC draws from its 1,464 finely labelled train.txt images
    (UniMatch's 92 ... 1464 splits do: its README), so 1464 is that whole set. Or a split file: UniMatch or U2PL
    lines for Cityscapes (we read the labelIds file of each listed image), UniMatch lines or image ids for VOC
    (any image of the train set: train.txt, or the augmented set with SegmentationClassAug), one key per line for
    the toy."""
    if name not in ("cityscapes", "toy-night", "voc"):
        raise DatasetError(f"--labeled: the semi-supervised setting uses cityscapes, voc or toy-night, not {name!r}.")
    train = [s[2] for s in _samples(name, root, "train")]
    if isinstance(spec, int) or (isinstance(spec, str) and spec.lstrip("-").isdigit()):
        fine = {f"{i}.png" for i in _voc_ids(Path(root) / VOC_DIR, "train")} if name == "voc" else None
        pool = train if fine is None else [k for k in train if k in fine]
        if not 1 <= int(spec) <= len(pool):
            raise DatasetError(f"--labeled {spec}: choose from 1 to {len(pool)}, the number of {name} train images"
                               + ("." if fine is None else " in ImageSets/Segmentation/train.txt."))
        return [pool[i] for i in sorted(np.random.default_rng(seed).permutation(len(pool))[:int(spec)])]
    try:
        lines = Path(spec).read_text().splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise DatasetError(f"--labeled {spec}: cannot read this split file ({err}).") from err
    known, keys = set(train), {}  # key -> its line number, in file order
    pattern, suffix = (_VOC_SPLIT_LINE, ".png") if name == "voc" else (_SPLIT_LINE, _LABEL_SUFFIX)
    for no, text in enumerate((line.strip() for line in lines), 1):
        match = pattern.fullmatch(text)
        key = text if name == "toy-night" else next(g for g in match.groups() if g) + suffix if match else None
        if text and (key is None or key not in known or key in keys):
            problem = (f"is neither {_SPLIT_FORMAT[name]}" if key is None
                       else f"repeats line {keys[key]}" if key in keys else
                       f"names no {name} train image (with its label) under {root}"
                       + (" (images outside train.txt need SegmentationClassAug)" if name == "voc" else ""))
            raise DatasetError(f"{spec} line {no}: {text[:100]!r} {problem}.")
        if text:
            keys[key] = no
    if not keys:
        raise DatasetError(f"--labeled {spec}: the split file lists no images.")
    return list(keys)


def write_split(path, name, keys):
    """Write `keys` as a split file that labeled_split reads back: UniMatch lines for Cityscapes (naming its
    labelTrainIds file) and VOC, one key per line for the toy."""
    if name == "voc":  # keys are "<id>.png"
        lines = [f"JPEGImages/{k[:-4]}.jpg SegmentationClass/{k}" for k in keys]
    else:
        lines = [k if name.startswith("toy") else "leftImg8bit/train/{0}_leftImg8bit.png gtFine/train/{0}_gtFine_"
                 "labelTrainIds.png".format(k[:-len(_LABEL_SUFFIX)]) for k in keys]
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text("\n".join(lines) + "\n")


class CounterSampler(torch.utils.data.Sampler):
    """Yields the global sample counters k that training datasets map to (image, crop, flip), from iteration
    `step` on. With several processes (torchrun) they share one stream: rank r of w takes the r-th batch of
    every w, so k = ((step * w + r) * batch_size + i); one process gets step * batch_size, +1, +2, ..."""

    def __init__(self, step, batch_size, rank=0, world=1):
        self.step, self.batch_size, self.rank, self.world = step, batch_size, rank, world

    def __iter__(self):
        for step in itertools.count(self.step):
            start = (step * self.world + self.rank) * self.batch_size
            yield from range(start, start + self.batch_size)


def train_loader(dataset, batch_size, step, workers, seed, pin_memory=False, rank=0, world=1):
    """Endless iterator of training batches starting at iteration `step`: the batches an uninterrupted run
    would have seen from there on (with any number of workers). Its own generator: creating it draws nothing
    from the global RNG, so --resume does not shift the random stream."""
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, sampler=CounterSampler(step, batch_size, rank, world), num_workers=workers,
        pin_memory=pin_memory, drop_last=True, persistent_workers=workers > 0,
        generator=torch.Generator().manual_seed(seed))
    return iter(loader)


# ----------------------------------------------------------------------------- DACS mixing and augmentation
def class_mix(img_src, lbl_src, img_tgt, pseudo_lbl, pseudo_weight, generator=None):
    """ClassMix (METHOD.md §4.3): per pair, paste the pixels of ceil(n/2) of the n classes in the source label
    onto the target image. The classes are the first ceil(n/2) of the present ones in a random order, drawn on
    the data's device (torch's RNG there, or `generator` of that device): no per-image torch.unique, so no wait
    for the GPU. (B,3,H,W), (B,H,W), (B,3,H,W), (B,H,W), q scalar or (B,H,W) -> img_mix (B,3,H,W), lbl_mix (B,H,W)
    int64, weight_mix (B,H,W) float: 1 on pasted pixels, q elsewhere."""
    b, device = lbl_src.shape[0], lbl_src.device
    ids = lbl_src.reshape(b, -1).long()
    present = torch.zeros(b, 256, device=device).scatter_(1, ids, 1.0) > 0  # (B, 256) classes in each label
    present[:, IGNORE_INDEX] = False
    keys = torch.rand(b, 256, generator=generator, device=device).masked_fill(~present, 2.0)  # absent ones last
    rank = keys.argsort(1).argsort(1)  # each class's place in this image's random order
    chosen = present & (rank < (present.sum(1, keepdim=True) + 1) // 2)
    mask = chosen.gather(1, ids).view_as(lbl_src)  # (B, H, W) True = pasted source pixel
    weight = torch.as_tensor(pseudo_weight, device=device).float().expand(mask.shape)
    return (torch.where(mask[:, None], img_src, img_tgt), torch.where(mask, lbl_src, pseudo_lbl).long(),
            torch.where(mask, torch.ones_like(weight), weight))


def _rgb_to_hsv(img):
    """(N,3,H,W) RGB -> H in radians [0, 2π), S, V, each (N,H,W), as kornia 0.5.8: V = max, S = (max - min) /
    (V + 1e-6), H from the first channel holding the max (grey: H = 0)."""
    r, g, b = img.unbind(1)
    v = img.amax(1)
    delta = v - img.amin(1)
    d = torch.where(delta > 0, delta, torch.ones_like(delta))
    h = torch.where(r == v, (g - b) / d, torch.where(g == v, 2 + (b - r) / d, 4 + (r - g) / d))
    return 2 * math.pi * ((h / 6) % 1), delta / (v + 1e-6), v


def _hsv_to_rgb(h, s, v):
    """(N,H,W) x 3 -> (N,3,H,W) by the six-sector table, no clamp; H may be negative (wrapped here)."""
    x = h * (3 / math.pi)  # position on the six sectors
    sector = x.floor() % 6
    f = x % 6 - sector
    p, q, t = v * (1 - s), v * (1 - f * s), v * (1 - (1 - f) * s)
    table = torch.stack([v, q, p, p, t, v, t, v, v, q, p, p, p, p, t, v, v, q], 1)  # R, G, B of sectors 0-5
    return table.gather(1, sector.long()[:, None] + torch.arange(0, 18, 6, device=h.device).view(1, 3, 1, 1))


def _jitter(img, factors, order):
    """kornia 0.5.8's ColorJitter ops with explicit factors (N, 4) = brightness b, contrast c, saturation t,
    hue h, applied to image i in the order order[i] (a permutation of 0-3, ops numbered as the factors; a row of
    -1 leaves the image unchanged). (N,3,H,W) in [0,1] -> same. At step k every op is computed for the whole
    batch and each image keeps its own op's result: a little more arithmetic instead of reading the order back
    from the GPU (a host sync) to index the images."""
    f = factors.to(img).unbind(1)  # 4 x (N,)
    for step in range(4):
        op = order[:, step].view(-1, 1, 1, 1)
        h, s, v = _rgb_to_hsv(img)
        ops = ((img + (f[0] - 1).view(-1, 1, 1, 1)).clamp(0, 1),  # brightness: additive
               (img * f[1].view(-1, 1, 1, 1)).clamp(0, 1),  # contrast: a plain multiply (no mean)
               _hsv_to_rgb(h, (s * f[2].view(-1, 1, 1)).clamp(0, 1), v),
               _hsv_to_rgb(torch.fmod(h + 2 * math.pi * f[3].view(-1, 1, 1), 2 * math.pi), s, v))
        img = torch.where(op == 0, ops[0], torch.where(op == 1, ops[1], torch.where(op == 2, ops[2], torch.where(
            op == 3, ops[3], img))))
    return img


def color_jitter(img, strength=0.2, p=0.8, generator=None):
    """The DACS colour jitter as DAFormer runs it: kornia 0.5.8 ColorJitter(s, s, s, s) (METHOD.md §4.4).
    Per image: b, c, t ~ U(1 - s, 1 + s), h ~ U(-s, s) and the four ops in a fresh random order (see _jitter);
    drawn on the image's device (torch's RNG there, or `generator` of that device). DAFormer decides "jitter or
    not" once per batch; our choice: with probability p per image (the same probability per image).
    (B,3,H,W) in [0,1] -> same."""
    b, device = img.shape[0], img.device
    on = torch.rand(b, generator=generator, device=device) < p
    factors = 1 - strength + 2 * strength * torch.rand(b, 4, generator=generator, device=device, dtype=torch.float64)
    factors[:, 3] -= 1  # hue: U(-s, s)
    order = torch.rand(b, 4, generator=generator, device=device).argsort(1).masked_fill(~on[:, None], -1)
    return _jitter(img, factors, order)


def gaussian_blur(img, p=0.5, sigma=(0.15, 1.15), generator=None):
    """Per sample with probability p: separable Gaussian blur, σ ~ U(sigma), kernel the odd size nearest
    0.1·min(H, W) (at least 3) as in DACS (51 at 512 crops, 103 at 1024). Draws on the image's device.
    (B,3,H,W) -> same."""
    b, c, h, w = img.shape
    k = max(3, (math.ceil(0.1 * min(h, w)) - 1) // 2 * 2 + 1)
    draws = torch.rand(b, 2, generator=generator, device=img.device, dtype=img.dtype)  # σ, blur or not
    sig = (sigma[0] + (sigma[1] - sigma[0]) * draws[:, :1])  # (B, 1)
    kernel = torch.exp(-(torch.arange(k, device=img.device, dtype=img.dtype) - k // 2) ** 2 / (2 * sig ** 2))
    kernel = (kernel / kernel.sum(1, keepdim=True)).repeat_interleave(c, 0)  # (B*3, k)
    out = F.pad(img.reshape(1, b * c, h, w), (k // 2, k // 2, 0, 0), mode="reflect")
    out = F.conv2d(out, kernel.view(b * c, 1, 1, k), groups=b * c)
    out = F.conv2d(F.pad(out, (0, 0, k // 2, k // 2), mode="reflect"), kernel.view(b * c, 1, k, 1), groups=b * c)
    return torch.where(draws[:, 1].view(b, 1, 1, 1) < p, out.view(b, c, h, w), img)


def strong_augment(img, generator=None):
    """DACS strong augmentation of the mixed image (METHOD.md §4.4): colour jitter (p 0.8, strength 0.2),
    then Gaussian blur (p 0.5). (B,3,H,W) in [0,1] -> (B,3,H,W) in [0,1]."""
    return gaussian_blur(color_jitter(img, generator=generator), generator=generator)


# ----------------------------------------------------------------------------- command line
def _show(out):
    rows = []
    for night in (False, True):
        scenes = [toy_scene(i, night) for i in range(4)]
        rows += [np.concatenate([s[0] for s in scenes], 1), np.concatenate([colorize(s[1]) for s in scenes], 1)]
    Image.fromarray(np.concatenate(rows, 0).repeat(2, 0).repeat(2, 1)).save(out)
    print(f"wrote {out}: rows toy-day images, labels, toy-night images, labels")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--show", choices=["toy"], help="save toy_grid.png: toy-day/toy-night images and labels")
    args = parser.parse_args()
    if args.show:
        _show("toy_grid.png")
    else:
        parser.print_help()
