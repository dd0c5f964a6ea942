"""Shared test helpers: writers of tiny datasets in the official file layouts and encodings (independent of
data.py's readers), and the fake GTA + Cityscapes tree the end-to-end tests train on."""
import struct
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the project's flat modules, however pytest is run
import bench  # noqa: E402
import data  # noqa: E402
import models  # noqa: E402
import train  # noqa: E402
from mfm import weighted_cross_entropy  # noqa: E402

GTA_PALETTE = np.array(data.PALETTE * 14, np.uint8)[:256].ravel().tolist()


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: needs a CUDA GPU; skipped without one (tools/gpu_check.py runs them)")


def pytest_collection_modifyitems(config, items):
    if not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="needs a CUDA GPU (tools/gpu_check.py runs the cuda-marked tests)")
        for item in items:
            if "cuda" in item.keywords:
                item.add_marker(skip)


# ----------------------------------------------------------------------------- host syncs, counted on the meta device
class HostSyncCounter(bench.MetaReads):
    """Counts the ops of a step that make the host wait for the GPU: reading values (item, tolist, bool), copies
    between host and device (torch.tensor(..., device=cuda) included), and data-dependent shapes (nonzero,
    unique, boolean masks: raised, as they cannot run without data). Meant for a step on the meta device, where
    tensors have shapes but no data, so a CPU-only machine sees what CUDA would wait for: a host-device copy is
    a cpu<->meta copy. counts: {what: how many}."""
    DATA_DEPENDENT = {"nonzero", "_unique2", "unique_dim", "unique_consecutive", "masked_select", "argwhere"}

    def __init__(self):
        super().__init__()
        self.counts = {}

    def event(self, what):
        self.counts[what] = self.counts.get(what, 0) + 1

    def __enter__(self):  # torch.tensor/as_tensor of host data to a device copies before any op is dispatched
        self.factories = torch.tensor, torch.as_tensor
        for name, factory in zip(("tensor", "as_tensor"), self.factories):
            setattr(torch, name, self.counted_factory(factory))
        return super().__enter__()

    def __exit__(self, *exc):
        torch.tensor, torch.as_tensor = self.factories
        return super().__exit__(*exc)

    def counted_factory(self, factory):
        def make(data, *args, device=None, **kwargs):
            on_device = torch.is_tensor(data) and data.device == torch.device(device or data.device)
            if device is not None and torch.device(device).type != "cpu" and not on_device:
                self.event(f"torch.{factory.__name__} to {torch.device(device).type}")
            return factory(data, *args, device=device, **kwargs)
        return make

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        devices = [a.device.type for a in args if torch.is_tensor(a)]
        if name in self.DATA_DEPENDENT or (name == "index" and any(
                torch.is_tensor(i) and i.dtype == torch.bool for i in args[1] if i is not None)):
            if devices and devices[0] != "cpu":
                raise RuntimeError(f"aten.{name} on a {devices[0]} tensor: its output shape depends on the data, "
                                   "a host sync on CUDA")
        return super().__torch_dispatch__(func, types, args, kwargs)


def meta_step_syncs(train_argv, steps=2):
    """Host syncs per training step of `train.py train_argv`, counted on the meta device (no data, no GPU):
    {what: count per step}. The data arrive as the loop's pinned, non-blocking copies do (not counted)."""
    _, step, _ = bench.meta_step(train.parse_args([*train_argv, "--device", "cpu"]))
    with HostSyncCounter() as counter:
        for _ in range(steps):
            step()
    return {k: v / steps for k, v in counter.counts.items()}


class Recorder(torch.nn.Module):
    """A one-conv network with the face the auxiliaries use, recording what they feed it: `seen` gets each encode
    input, then each seg_loss label and weight. decode keeps every stride-th logit (a network's output stride)."""

    def __init__(self, stride=1):
        super().__init__()
        self.conv, self.stride, self.seen = torch.nn.Conv2d(3, 19, 1), stride, []

    def encode(self, images):
        self.seen.append(images)
        return self.conv(images)

    def decode(self, feats):
        return feats[..., ::self.stride, ::self.stride]

    def seg_loss(self, out, label, weight):
        self.seen.extend([label, weight])
        return weighted_cross_entropy(models.upsample(out, label.shape[-2:]), label, weight)


def train_error(argv):
    """train.main's one-line error message for `argv` (it must exit with one)."""
    with pytest.raises(SystemExit) as stop:
        train.main(argv)
    message = str(stop.value)
    assert message.startswith("error: ") and "\n" not in message.strip(), message
    return message


# ----------------------------------------------------------------------------- writers (independent of data.py)
def write_png16(path, arr):
    """Minimal PNG encoder: 16-bit, 1/3/4 channels, filter type 0 for every row."""
    h, w, c = arr.shape
    raw = b"".join(b"\x00" + arr[y].astype(">u2").tobytes() for y in range(h))

    def chunk(tag, payload):
        return struct.pack(">I", len(payload)) + tag + payload + struct.pack(">I", zlib.crc32(tag + payload))

    header = struct.pack(">IIBBBBB", w, h, 16, {1: 0, 3: 2, 4: 6}[c], 0, 0, 0)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw))
                           + chunk(b"IEND", b""))


def write_rgb(path, rng, w, h):
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 256, (h, w, 3), np.uint8)).save(path)


def write_ids(path, ids, palette):
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    im = Image.fromarray(ids.astype(np.uint8))
    if palette:
        im.putpalette(GTA_PALETTE)  # 'L' -> 'P' as in the GTA download
    im.save(path)


def label_ids(rng, w, h):
    """Blocky label ids: four vertical stripes of road, car, sky, an ignored id, plus random ids."""
    ids = np.repeat(np.array([7, 26, 23, 0], np.uint8), w // 4)[None].repeat(h, 0)
    ids[: h // 4] = rng.choice([7, 8, 11, 21, 24, 26, 33, 3], (h // 4, w))
    return ids



def make_gta_cityscapes(root, n_gta=3, n_train=2, n_val=2, size=(96, 48)):
    """data/gta (n_gta pairs) and data/cityscapes train/val (two cities) at `size` (W, H) under root."""
    rng = np.random.default_rng(0)
    w, h = size
    for i in range(1, n_gta + 1):
        write_rgb(root / f"gta/images/{i:05d}.png", rng, w, h)
        write_ids(root / f"gta/labels/{i:05d}.png", label_ids(rng, w, h), palette=True)
    for split, n in (("train", n_train), ("val", n_val)):
        for i in range(n):
            city = ("aachen", "bonn")[i % 2]
            stem = f"{city}/{city}_{i:06d}_000019"
            write_rgb(root / f"cityscapes/leftImg8bit/{split}/{stem}_leftImg8bit.png", rng, w, h)
            write_ids(root / f"cityscapes/gtFine/{split}/{stem}_gtFine_labelIds.png", label_ids(rng, w, h), False)
    return root


@pytest.fixture(scope="session")
def fake_data(tmp_path_factory):
    return make_gta_cityscapes(tmp_path_factory.mktemp("data"))


def voc_colour_map():
    """The VOC devkit's colour map (VOCcode/VOClabelcolormap.m), 256 x RGB flattened for Image.putpalette: bits 0, 1,
    2 of the index go to the top bit of R, G, B, bits 3, 4, 5 to the next one, and so on."""
    colours = []
    for i in range(256):
        rgb, c = [0, 0, 0], i
        for j in range(8):
            for k in range(3):
                rgb[k] |= ((c >> k) & 1) << (7 - j)
            c >>= 3
        colours += rgb
    return colours


def voc_label(rng, w, h):
    """Class indices as VOC draws them: background, two random-class boxes, 255 on a 2-px ring around each."""
    ids = np.zeros((h, w), np.uint8)
    for _ in range(2):
        y0, x0 = int(rng.integers(0, h // 2)), int(rng.integers(0, w // 2))
        y1, x1 = y0 + int(rng.integers(h // 4, h // 2)), x0 + int(rng.integers(w // 4, w // 2))
        ids[max(y0 - 2, 0):y1 + 2, max(x0 - 2, 0):x1 + 2] = 255
        ids[y0:y1, x0:x1] = int(rng.integers(1, 21))
    return ids


def make_voc(root, train=("2007_000032", "2007_000039", "2008_000002", "2009_000012"),
             val=("2007_000033", "2010_000004"), aug=("2008_000008", "2011_000003"), size=(80, 60)):
    """root/voc/VOCdevkit/VOC2012 as the devkit tar unpacks (JPEG images, palette labels with 255 borders,
    ImageSets/Segmentation/{train,val}.txt) plus SegmentationClassAug (plain class indices) for the `aug` ids, the
    first train id and the first val id (the reader must prefer SegmentationClass, and keep val out of train).
    Every second image is portrait (size swapped). Returns the VOC2012 folder."""
    rng, base = np.random.default_rng(7), Path(root) / "voc/VOCdevkit/VOC2012"
    for k, i in enumerate((*train, *val, *aug)):
        w, h = size if k % 2 == 0 else size[::-1]
        (base / "JPEGImages").mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (h, w, 3), np.uint8)).save(base / f"JPEGImages/{i}.jpg", quality=90)
        if i not in aug:
            label = Image.fromarray(voc_label(rng, w, h), "P")
            label.putpalette(voc_colour_map())
            (base / "SegmentationClass").mkdir(exist_ok=True)
            label.save(base / f"SegmentationClass/{i}.png")
        if i in (*aug, train[0], val[0]):
            (base / "SegmentationClassAug").mkdir(exist_ok=True)
            Image.fromarray(voc_label(rng, w, h), "L").save(base / f"SegmentationClassAug/{i}.png")
    (base / "ImageSets/Segmentation").mkdir(parents=True, exist_ok=True)
    for split, ids in (("train", train), ("val", val)):
        (base / f"ImageSets/Segmentation/{split}.txt").write_text("".join(f"{i}\n" for i in ids))
    return base


@pytest.fixture(scope="session")
def voc_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("voc")
    make_voc(root)
    return root
