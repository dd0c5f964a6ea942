"""Evaluate a segmentation checkpoint: per-class IoU and mIoU on a target split, as the paper reports them (ACDC:
each condition's too). Also the pictures people look at: colourised predictions, train.py's vis/ grids, and
overlays of the model's prediction on your own pictures.

METHOD.md §4 (evaluation): every val image resized to the training resolution (Cityscapes 1024x512), one
forward pass (no sliding window, no flip), logits upsampled bilinearly to the full-resolution label, argmax,
one confusion matrix over the whole split; IoU_c = TP / (TP + FP + FN); mIoU = mean over the classes that
occur (in the labels or the predictions). SYNTHIA-trained models are also scored on the 16 and 13 class sets.
PASCAL VOC as UniMatch's "original" mode for it (supervised.py:33-84, unimatch.py:200-204): each of the 1,449 val
images whole at its native size, one forward pass, 21 classes, one confusion matrix (UniMatch sums intersections
and unions per class over the split: the same numbers; it upsamples with align_corners=True, we with False).

    python eval.py --ckpt runs/demo/model.pt --target toy-night
    python eval.py --ckpt runs/gta/model.pt --target cityscapes --data-root data --save-pred preds/
    python eval.py --ckpt runs/cs-acdc/model.pt --target acdc --split test --save-pred test_preds/  # for the server
    python eval.py --ckpt runs/demo/model.pt --images frame.jpg photos/ "clips/*.png" --out overlays/

`evaluate()` is the function train.py runs for its periodic evaluation; `model_from_checkpoint` rebuilds the network
a train.py checkpoint describes (either family, HRDA too), for this file, bench.py and your own code. It also reads
the released checkpoints of DAFormer, HRDA and MIC (README "Released checkpoints"): python eval.py --ckpt latest.pth
"""
import argparse
import contextlib
import glob
import json
import math
import sys
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageOps
from tqdm import tqdm

import data
import hrda
import models


DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}  # --dtype -> autocast dtype
LABEL_IDS = np.zeros(256, np.uint8)  # trainId -> official Cityscapes label id (255 -> 0, "unlabeled")
LABEL_IDS[list(data.TRAINID_TO_LABELID)] = list(data.TRAINID_TO_LABELID.values())
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")  # --images: what a folder or a pattern contributes


def autocast(device, dtype):
    """Mixed precision as --dtype asks ('bf16', 'fp16' or 'fp32' = none) on `device`."""
    device = torch.device(device)
    return contextlib.nullcontext() if DTYPES[dtype] is None else torch.autocast(device.type, DTYPES[dtype])


def json_safe(value):
    """Nested dicts/lists with NaN/inf as None, for strict JSON (jq and JavaScript reject NaN)."""
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return None if isinstance(value, float) and not math.isfinite(value) else value


def read_checkpoint(path, part=None):
    """model.pt / ckpt.pt of train.py: a dict with 'model' (state dict), 'model_config', ... With `part` ('student'
    or 'teacher'), also a released DAFormer/HRDA/MIC checkpoint, in that form (released_checkpoint)."""
    ckpt = models.read_weights(path)
    if part is not None and models.mmseg_checkpoint(ckpt):
        return released_checkpoint(ckpt, path, part)
    if not isinstance(ckpt, dict) or "model" not in ckpt or "model_config" not in ckpt:
        raise models.WeightsError(f"{path} is not a checkpoint written by train.py (expected the keys 'model' and "
                                  "'model_config'; a bare ResNet/MiT state dict or a released DAFormer/HRDA/MIC "
                                  "checkpoint belongs in --pretrained).")
    return ckpt


def released_checkpoint(ckpt, path, part="student"):
    """A released DAFormer/HRDA/MIC checkpoint (torch.load'ed) -> our checkpoint's form: 'model' (its `part` under our
    names), 'model_config' (the network read from its keys and shapes, models.mmseg_config), 'config' (the test
    resolution of the anchors: DAFormer's whole image at 1x, HRDA's sliding windows over the 2x image, HRDA.md §2;
    the source, for mIoU16/13, from the training config saved in meta, DAFormer@438603d1:tools/train.py:154-161),
    'released' (what was read, in words)."""
    state = models.released_state(ckpt, path, part)
    config = models.mmseg_config(state, path)
    with torch.device("meta"):  # names and shapes only
        skeleton = hrda.build_model(**config)
    hr, synthia = "hrda" in config, "SynthiaDataset" in str(ckpt.get("meta", {}).get("config", ""))
    test = ("HRDA's sliding windows (1024, stride 512) over the image at 2x" if hr else "whole image at 1x") + \
        " the DAFormer size" + ", trained on SYNTHIA (meta)" * synthia
    return dict(model=models.from_mmseg(skeleton, state, str(path)), model_config=config,
                config=dict(resize_scale=2.0 if hr else 1.0, source="synthia" if synthia else None),
                released=f"the {part} ({models.UDA_PARTS[part]}*) of a released checkpoint, {models.describe(config)}; "
                         f"scored as the anchors test: {test}")


def model_from_checkpoint(path, device="cpu", part="student"):
    """The network a train.py checkpoint or a released DAFormer/HRDA/MIC checkpoint (its student, or with part=
    'teacher' its EMA teacher) describes (either family, HRDA or not), its weights loaded -> (model in eval mode,
    checkpoint)."""
    ckpt = read_checkpoint(path, part)
    model = hrda.build_model(**ckpt["model_config"])
    models.load_strict(model, ckpt["model"], "model described by its own model_config", str(path))
    return model.to(device).eval(), ckpt


def confusion_matrix(label, pred, num_classes):
    """label, pred (N,) int64 on one device -> (K, K) int64 counts, rows = ground truth, ignored pixels dropped."""
    valid = label != data.IGNORE_INDEX
    index = label[valid] * num_classes + pred[valid]
    return torch.bincount(index, minlength=num_classes ** 2).reshape(num_classes, num_classes)


def scores(confusion, subsets=None):
    """(K, K) confusion -> {'iou': per-class list (nan = class absent everywhere), 'mIoU': %, 'mIoU16': ...}."""
    conf = confusion.double()
    tp = conf.diag()
    union = conf.sum(0) + conf.sum(1) - tp
    iou = torch.where(union > 0, tp / union.clamp(min=1), torch.full_like(tp, float("nan")))
    result = {"iou": [round(100 * v, 2) for v in iou.tolist()], "mIoU": round(100 * iou.nanmean().item(), 2)}
    for name, classes in (subsets or {}).items():
        result[name] = round(100 * iou[list(classes)].nanmean().item(), 2)
    result["pixel_acc"] = round(100 * (tp.sum() / conf.sum().clamp(min=1)).item(), 2)
    return result


def save_prediction(pred, name, out_dir, dataset="cityscapes"):
    """Write a trainId prediction (H, W) as the official Cityscapes label-id PNG under the ground truth's
    relative path and name, plus a colourised copy next to it (suffix _color.png). A dataset with its own classes
    (data.CLASSES: VOC) gets its class indices as they are (VOC: <id>.png, as SegmentationClassAug) and its palette."""
    path = Path(out_dir) / name
    path.parent.mkdir(parents=True, exist_ok=True)
    pred = pred.cpu().numpy().astype(np.uint8)
    Image.fromarray(pred if dataset in data.CLASSES else LABEL_IDS[pred]).save(path)
    Image.fromarray(data.colorize(pred, data.label_set(dataset)[1])).save(path.with_name(path.stem + "_color.png"))


def save_trainids(pred, path, palette=data.PALETTE):
    """Write a trainId prediction (H, W) as a 'P'-mode PNG with the palette (Cityscapes'): the files the anchors
    submit to the ACDC / Dark Zurich servers (mmseg results2img with to_label_id=False, ADVERSE.md §1)."""
    image = Image.fromarray(np.asarray(pred.cpu() if torch.is_tensor(pred) else pred, np.uint8))
    image.putpalette(np.array(palette, np.uint8).ravel().tolist())  # 'L' -> 'P', the values kept
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    image.save(path)


def save_training_picture(path, student, x_src, y_src, x_tgt, seen, palette=data.PALETTE):
    """train.py's vis/ pictures: one PNG, a header naming the panels, one row per image (at most 2): source |
    source label | target | pseudo-label | mixed image | MFM mask over the target (masked cells darkened) |
    student prediction, labels in `palette` (data.label_set(name)[1]). The student predicts in eval mode (a picture
    must not move BatchNorm statistics) and is left in train mode."""
    with torch.no_grad():
        pred = models.upsample(student.eval()(x_tgt), x_tgt.shape[-2:]).argmax(1)
    student.train()

    def rgb(x):
        return (x.detach().float().clamp(0, 1) * 255).byte().permute(1, 2, 0).cpu().numpy()
    names = ["source", "source label", "target"] + ["pseudo-label", "mixed"] * ("pseudo_label" in seen)
    names += ["MFM mask"] * ("mfm_mask" in seen) + ["prediction"]
    rows = []
    for i in range(min(2, len(x_src))):
        panels = [rgb(x_src[i]), data.colorize(y_src[i].cpu(), palette), rgb(x_tgt[i])]
        if "pseudo_label" in seen:
            panels += [data.colorize(seen["pseudo_label"][i].cpu(), palette), rgb(seen["x_mix"][i])]
        if "mfm_mask" in seen:  # grid cells: nearest, so that a masked cell stays a sharp square
            mask = torch.nn.functional.interpolate(seen["mfm_mask"][i:i + 1].float(), x_tgt.shape[-2:])[0]
            panels.append(rgb(x_tgt[i] * (1 - 0.7 * mask)))
        panels.append(data.colorize(pred[i].cpu(), palette))
        rows.append(np.concatenate(panels, axis=1))
    picture = Image.fromarray(np.concatenate(rows, axis=0))
    scale = max(1, 256 // picture.height)  # toy crops are tiny: enlarge so that people can see them
    picture = picture.resize((picture.width * scale, picture.height * scale), Image.NEAREST)
    canvas = Image.new("RGB", (picture.width, picture.height + 14), "white")
    canvas.paste(picture, (0, 14))
    draw, width = ImageDraw.Draw(canvas), picture.width // len(names)
    for k, name in enumerate(names):
        draw.text((k * width + 3, 1), name, fill="black")
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)


@torch.no_grad()
def evaluate(model, dataset, device="cpu", dtype=None, source=None, save_pred=None, num_workers=0, progress=True):
    """Whole-image inference over `dataset` (train=False items: image, full-res label, name) -> scores dict;
    with 'conditions' {condition: scores and images} where every sample has one (ACDC's zips' tree; *choice*: each
    condition's own confusion matrix, its mIoU over the classes present in it, as the pooled one's).
    dtype: autocast dtype (None: fp32); source: the training source ('synthia' adds mIoU16 and mIoU13).
    save_pred: Cityscapes-style label-id files (save_prediction), or for the trainId datasets (ACDC, Dark
    Zurich) the servers' files, DIR/<image stem>.png (save_trainids)."""
    was_training = model.training
    model.eval()
    num_classes = model.config["num_classes"]
    loader = torch.utils.data.DataLoader(dataset, batch_size=1, num_workers=num_workers,
                                         pin_memory=str(device).startswith("cuda"))
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=device)
    per_condition, stems = {}, {key: Path(img).stem for img, _, key in dataset.samples if img}
    for image, label, name in tqdm(loader, desc=f"eval {dataset.name} {dataset.split}", disable=not progress,
                                   leave=False):
        image, label = image.to(device, non_blocking=True), label.to(device, non_blocking=True)
        image = image.contiguous(memory_format=models.memory_format(device))  # as the model (main)
        with torch.autocast(torch.device(device).type, dtype=dtype, enabled=dtype is not None):
            logits = model(image)
        pred = models.upsample(logits.float(), label.shape[-2:]).argmax(1)
        counts = confusion_matrix(label.flatten(), pred.flatten(), num_classes)
        confusion += counts
        tally = per_condition.setdefault(data.condition(dataset.name, name[0]), [0, 0])  # [confusion, images]
        tally[0], tally[1] = tally[0] + counts, tally[1] + 1
        if save_pred and dataset.name in data.TRAINID_DATASETS:
            save_trainids(pred[0], Path(save_pred) / f"{stems[name[0]]}.png")
        elif save_pred:
            save_prediction(pred[0], name[0], save_pred, dataset.name)
    model.train(was_training)
    subsets = {"mIoU16": data.SYNTHIA_16, "mIoU13": data.SYNTHIA_13} if source == "synthia" else None
    result = scores(confusion, subsets)
    result.update(dataset=dataset.name, split=dataset.split, images=len(dataset))
    if per_condition and None not in per_condition:
        result["conditions"] = {c: dict(images=n, **scores(conf)) for c, (conf, n) in sorted(per_condition.items())}
    return result


def format_table(result):
    """Per-class IoU table (and a column per condition) and the summary lines, as printed by eval.py and train.py."""
    conditions = result.get("conditions", {})

    def cell(iou):
        return '   n/a' if iou != iou else f'{iou:6.2f}'
    lines = [f"{'class':15s} {'IoU':>6s}" + "".join(f" {c:>6s}" for c in conditions)]
    for k, (name, iou) in enumerate(zip(data.label_set(result["dataset"])[0], result["iou"])):
        lines.append(f"{name:15s} {cell(iou)}" + "".join(f" {cell(c['iou'][k])}" for c in conditions.values()))
    summary = [f"{key} {result[key]:.2f}" for key in ("mIoU", "mIoU16", "mIoU13") if key in result]
    summary += [f"{c} {v['mIoU']:.2f} ({v['images']} images)" for c, v in conditions.items()]
    lines.append(f"{result['dataset']} {result['split']} ({result['images']} images): " + ", ".join(summary))
    if result["dataset"] in data.CONDITIONS and not conditions:
        lines.append(f"(no mIoU per condition: this {result['dataset']} tree does not keep the condition folders)")
    return "\n".join(lines)


def keep_ratio_size(width, height, scale):
    """(W, H) of an image resized with its aspect kept to fit `scale` (W, H): the long side at most max(scale),
    the short side at most min(scale) (mmcv's rescale with keep_ratio, mmseg's test Resize, ADVERSE.md §1, §4)."""
    factor = min(max(scale) / max(width, height), min(scale) / min(width, height))
    return int(width * factor + 0.5), int(height * factor + 0.5)


def image_paths(specs):
    """--images PATH...: files, folders (their PNG and JPEG files) or glob patterns -> paths, in order, once each."""
    paths = []
    for spec in specs:
        path = Path(spec)
        if path.is_file():
            found = [path]
        else:
            found = path.iterdir() if path.is_dir() else map(Path, glob.glob(spec, recursive=True))
            found = sorted(p for p in found if p.suffix.lower() in IMAGE_SUFFIXES)
        if not found:
            raise data.DatasetError(f"--images {spec}: no such file, no PNG or JPEG in this folder, and no PNG or "
                                    "JPEG file matches it as a pattern.")
        paths += found
    return list(dict.fromkeys(paths))


@torch.no_grad()
def segment_images(model, paths, out, size, device="cpu", dtype=None, opacity=0.5, palette=data.PALETTE):
    """Your own pictures -> out/<stem>_overlay.png (image * (1 - opacity) + colour * opacity, Cityscapes palette,
    as DAFormer's demo/image_demo.py and mmseg's show_result, ADVERSE.md §4) and out/<stem>_trainIds.png
    (save_trainids), both at the picture's size. The model sees the picture resized with its aspect kept to fit
    `size` (W, H), its training target's test size (keep_ratio_size; None: as it is; an HRDA model slides its
    windows over it as at test time); its logits are resized back to the picture. `palette`: the classes' colours
    (Cityscapes'; VOC's for a VOC model). An unreadable file is named in a warning and
    skipped. -> the paths written."""
    outputs = {p: [Path(out) / f"{p.stem}_{kind}.png" for kind in ("overlay", "trainIds")] for p in paths}
    inputs, stems = {p.resolve() for p in paths}, [p.stem for p in paths]
    for path in paths:
        if {o.resolve() for o in outputs[path]} & inputs:
            raise data.DatasetError(f"--images: the outputs of {path} would overwrite an input picture in --out "
                                    f"{out}; choose another --out.")
        if stems.count(path.stem) > 1:
            raise data.DatasetError(f"--images: several pictures are named {path.stem}; their outputs in --out "
                                    f"{out} would overwrite each other. Rename them or segment them separately.")
    model.eval()
    written = []
    for path in tqdm(paths, desc="segment images", unit="image"):
        try:
            with Image.open(path) as im:
                rgb = np.asarray(ImageOps.exif_transpose(im).convert("RGB"))  # as a viewer shows a photo
        except (OSError, ValueError) as err:  # PIL's UnidentifiedImageError is an OSError
            warnings.warn(f"--images: skipping {path}: not a readable image ({err}).")
            continue
        h, w = rgb.shape[:2]
        x = rgb if size is None else np.asarray(Image.fromarray(rgb).resize(keep_ratio_size(w, h, size),
                                                                             Image.BILINEAR))
        x = torch.from_numpy(x.copy()).permute(2, 0, 1)[None].float().div_(255).to(device)
        with torch.autocast(torch.device(device).type, dtype=dtype, enabled=dtype is not None):
            logits = model(x.contiguous(memory_format=models.memory_format(device)))
        pred = models.upsample(logits.float(), (h, w)).argmax(1)[0].cpu().numpy().astype(np.uint8)
        overlay, ids = outputs[path]
        overlay.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray((rgb * (1 - opacity) + data.colorize(pred, palette) * opacity).astype(np.uint8)).save(overlay)
        save_trainids(pred, ids, palette)
        written += [overlay, ids]
    return written


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True, help="model.pt (weights for inference) or ckpt.pt written by train.py, "
                   "or a released DAFormer/HRDA/MIC checkpoint (latest.pth; the network is read from its keys)")
    p.add_argument("--uda-model", choices=["student", "teacher"], default="student", help="of a released "
                   "checkpoint: its student (model.*, what their tools/test.py evaluates; default) or EMA teacher")
    p.add_argument("--images", nargs="+", metavar="PATH", help="segment your own pictures instead (files, folders, "
                   "glob patterns; PNG, JPEG) at the checkpoint's test size: PICTURE_overlay.png and "
                   "PICTURE_trainIds.png into --out")
    p.add_argument("--opacity", type=float, default=0.5, help="--images: overlay = picture * (1 - a) + colour * a, "
                   "a in (0, 1] (default: 0.5, as DAFormer's demo)")
    p.add_argument("--target", default="cityscapes", help=f"dataset to score, one of {', '.join(data.DATASETS)}")
    p.add_argument("--split", default="val", help="split of --target (default: val)")
    p.add_argument("--data-root", default="data", help="folder holding gta/, cityscapes/, synthia/, acdc/, "
                   "dark_zurich/, voc/ (default: data)")
    p.add_argument("--out", default=None, help="where metrics.json goes (default: the checkpoint's folder; "
                   "--images: its images/ folder)")
    p.add_argument("--save-pred", default=None, metavar="DIR", help="write official *_labelIds.png predictions "
                   "(and *_color.png) under DIR; VOC: <id>.png class indices; ACDC, Dark Zurich: DIR/<image stem>.png, "
                   "trainIds with the palette, the benchmark servers' files (their test split has no labels: written, "
                   "not scored)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cuda or cpu")
    p.add_argument("--dtype", default=None, choices=["bf16", "fp16", "fp32"],
                   help="autocast dtype (default: bf16 on CUDA, fp32 on CPU)")
    p.add_argument("--workers", type=int, default=4, help="DataLoader worker processes (default: 4)")
    args = p.parse_args(argv)
    if not 0 < args.opacity <= 1:
        p.error(f"--opacity {args.opacity}: expected a value in (0, 1].")
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise data.DatasetError("--device cuda was asked for, but PyTorch sees no CUDA GPU; use --device cpu.")
    model, ckpt = model_from_checkpoint(args.ckpt, args.device, args.uda_model)
    if "released" in ckpt:
        print(f"{args.ckpt}: {ckpt['released']}")
    model = model.to(memory_format=models.memory_format(args.device))
    config = ckpt.get("config", {})
    scale = config.get("resize_scale", 1.0)  # the training resolution (HRDA: 2x, 2048x1024)
    dtype = DTYPES[args.dtype or ("bf16" if args.device.startswith("cuda") else "fp32")]
    if args.images:  # at the test size of the checkpoint's own target (*choice*: --target for a file without one)
        out = Path(args.out or Path(args.ckpt).parent / "images")
        target = config.get("target") or args.target
        size = data.RESIZE[target] and tuple(round(v * scale) for v in data.RESIZE[target])  # None: native (VOC)
        written = segment_images(model, image_paths(args.images), out, size, args.device, dtype, args.opacity,
                                 data.label_set(target)[1])
        print(f"wrote {len(written) // 2} overlays (*_overlay.png) and trainId maps (*_trainIds.png) under {out}")
        return
    labelled = data.has_labels(args.target, args.split)
    if not (labelled or args.save_pred):
        raise data.DatasetError(f"{args.target} {args.split} has no labels to score (the benchmark server keeps "
                                "them); pass --save-pred DIR to write the predictions the server takes.")
    size = data.RESIZE[args.target]  # None: native sizes (VOC)
    dataset = data.build_dataset(args.target, args.data_root, args.split, train=False, labels=labelled,
                                 resize=size and tuple(round(v * scale) for v in size))
    if model.config["num_classes"] != dataset.num_classes:
        raise models.WeightsError(f"{args.ckpt} predicts {model.config['num_classes']} classes but {args.target} "
                                  f"is labelled with {dataset.num_classes}; evaluate it on a dataset of its classes.")
    result = evaluate(model, dataset, args.device, dtype, config.get("source"), args.save_pred, args.workers)
    if not labelled:
        print(f"wrote {len(dataset)} predictions of {args.target} {args.split} under {args.save_pred}: <image "
              "stem>.png, trainIds in a 'P' PNG with the Cityscapes palette (the benchmark server's files)")
        return
    result["ckpt"] = str(args.ckpt)
    print(format_table(result))
    out = Path(args.out) if args.out else Path(args.ckpt).parent
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps(json_safe(result), indent=2, allow_nan=False))
    print(f"wrote {out / 'metrics.json'}" + (f" and predictions under {args.save_pred}" if args.save_pred else ""))


if __name__ == "__main__":
    try:
        main()
    except (data.DatasetError, models.WeightsError) as err:
        sys.exit(f"error: {err}")
