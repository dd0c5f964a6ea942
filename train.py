"""DACS self-training with Masked Feature Modeling (arXiv 2509.13801) for domain-adaptive segmentation.

One iteration (METHOD.md §3-4), each arrow a function below:
    source CE -> teacher pseudo-labels + confidence q -> ClassMix + strong augmentation -> mixed CE
    -> MFM: CE(D(R(E(x_t))), pseudo-labels) * q on the plain target crop -> AdamW step -> EMA teacher
Each loss is backpropagated on its own, so peak memory is that of one branch, not of all three.

    python train.py --source toy-day --target toy-night            # CPU demo, a few minutes
    python train.py --source gta --target cityscapes                 # the paper's DACS + MFM, DeepLabV2
    python train.py --source gta --target cityscapes --no-mfm        # the DACS baseline
    python train.py --source gta --target cityscapes --backbone mit_b5 --pretrained mit_b5.pth --recipe daformer
    python train.py --source cityscapes --target cityscapes --labeled 372   # semi-supervised (S4MIM's setting)
    python train.py --source voc --target voc --labeled 1464   # PASCAL VOC on DeepLabV3+ (UniMatch's benchmark)
    python train.py --source cityscapes --target acdc --backbone mit_b5 --pretrained mit_b5.pth --recipe hrda
    torchrun --nproc_per_node 4 train.py --source gta --target cityscapes   # several GPUs, --batch-size per GPU

The output folder gets config.json, log.jsonl, ckpt.pt (resume with --resume), model.pt (the final weights for
inference: no teacher, no Rebuilder; the result is this final model, as in the papers), and vis/step_*.png
pictures of what the method sees.
"""
import argparse
import contextlib
import copy
import math
import random
import signal
import sys
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.distributed as dist
from torch import nn
from tqdm import tqdm

import baselines
import data
import eval as evaluation
import hrda
import models
import runtime
from mfm import Rebuilder, mfm_loss
from runtime import ConfigError, NonFiniteLoss

# Defaults that depend on the domain pair: the paper's recipe for the real datasets, a CPU-sized one for the toy.
# resnet101-v1c: the DeepLabV2 backbone of the DAFormer/MIC code bases the paper's 55.9 comes from (METHOD.md §2).
PAPER = dict(backbone="resnet101-v1c", pretrained="imagenet", crop_size=512, iters=40_000, warmup=1500, lr=6e-5,
             lr_rebuilder=2e-4, mfm_grid=16, eval_every=4000, ckpt_every=1000, vis_every=1000, log_every=50,
             pseudo_threshold=0.968)  # DACS's confidence threshold
TOY = dict(backbone="resnet18", pretrained="none", crop_size=64, iters=300, warmup=30, lr=1e-3,
           lr_rebuilder=1e-3, mfm_grid=4, eval_every=100, ckpt_every=100, vis_every=100, log_every=10,
           pseudo_threshold=0.968)
# UniMatch's VOC values (configs/pascal.yaml:4,16,19-22: crop 321, threshold 0.95, DeepLabV3+ R101) in our loop: AdamW
# and 40k iterations of 2 + 2 as PAPER (theirs: SGD 1e-3, ~91k of 8 + 8); MFM grid 10 = 32-px cells, as g = 16 at 512.
VOC = dict(PAPER, backbone="deeplabv3plus-resnet101", crop_size=321, pseudo_threshold=0.95, mfm_grid=10)
ADVERSE = dict(PAPER, mic_mode="separate")  # CS -> ACDC / Dark Zurich: MIC's mask mode there (ADVERSE.md §0)
SETTINGS = {  # (--source, --target) -> its defaults; source = target: semi-supervised (--labeled N|FILE)
    ("gta", "cityscapes"): PAPER, ("synthia", "cityscapes"): PAPER, ("toy-day", "toy-night"): TOY,
    ("cityscapes", "cityscapes"): PAPER, ("toy-night", "toy-night"): TOY, ("voc", "voc"): VOC,
    ("cityscapes", "acdc"): ADVERSE, ("cityscapes", "dark_zurich"): ADVERSE}
DAFORMER = dict(rcs=True, fd=True, pl_crop=True, ema=0.999)  # --recipe daformer (METHOD.md §4), and hrda
STOCHASTIC = (nn.Dropout, nn.Dropout2d, models.DropPath)  # off in the teacher (DAFormer); its BatchNorm trains


# ----------------------------------------------------------------------------- the algorithm, step by step
def source_loss(student, x_src, y_src):
    """CE of the student on labelled source crops (HRDA: 0.9 fused + 0.1 detail, its seg_loss).
    x (B, 3, H, W), y (B, H, W) -> (scalar, features f_src)."""
    feats = student.encode(x_src)
    return student.seg_loss(student.decode(feats), y_src), feats


@torch.no_grad()
def pseudo_label(teacher, x_tgt, threshold):
    """Teacher argmax on the target crop and one confidence weight q for the batch (DAFormer).
    The teacher runs in train mode, so BatchNorm uses batch statistics, as in DACS/DAFormer.
    x (B, 3, H, W) -> labels (B, H, W) int64, q scalar tensor (fraction of pixels with max prob >= threshold)."""
    prob = torch.softmax(models.upsample(teacher(x_tgt).float(), x_tgt.shape[-2:]), dim=1)
    confidence, label = prob.max(dim=1)
    return label, (confidence >= threshold).float().mean()


def mix(x_src, y_src, x_tgt, label_tgt, q):
    """ClassMix the source crops onto the target crops, then the strong augmentation of the mixed image.
    -> x_mix (B, 3, H, W), y_mix (B, H, W), w_mix (B, H, W): 1 on pasted pixels, q elsewhere."""
    x_mix, y_mix, w_mix = data.class_mix(x_src, y_src, x_tgt, label_tgt, q)
    return data.strong_augment(x_mix), y_mix, w_mix


def mix_loss(student, x_mix, y_mix, w_mix):
    """Confidence-weighted CE of the student on the mixed image -> scalar."""
    return student.seg_loss(student.decode(student.encode(x_mix)), y_mix, w_mix)


# The auxiliary tasks, on the plain target crop (no mixing, no strong augmentation). A branch takes the trained modules
# m (m.student, m.heads), x_tgt (B, 3, H, W), pseudo-labels (B, H, W), their weight, args and the source batch
# (x_src, y_src), and returns (unweighted loss, maps for the pictures).
def mfm_branch(m, x_tgt, pl, weight, args, src):
    """L_mfm = CE(D(R(E(x_t))), pseudo-labels) * q (mfm.py); the network applies the Rebuilder (HRDA: per view)."""
    rebuild = partial(m.student.rebuild, m.heads["rebuilder"])
    loss, mask = mfm_loss(m.student.decode, rebuild, m.student.encode(x_tgt), pl, weight, return_mask=True,
                          loss_fn=m.student.seg_loss)
    return loss, dict(mfm_mask=mask)


@dataclass(frozen=True)
class Auxiliary:
    """One auxiliary task. head: its trained module's name, if any (in ckpt.pt, not model.pt; its optimizer group at
    --lr-rebuilder), made by build(student, args); whole_student: its loss reaches every student parameter (DDP)."""
    loss: Callable
    what: str
    head: Optional[str] = None
    build: Optional[Callable] = None
    whole_student: bool = True
    lambda_default: float = 1.0  # the paper's λ for MFM and MIC's; ours for CMIM (choice)


AUXILIARIES = {  # --aux NAME; adding one is an entry here plus its loss function
    "mfm": Auxiliary(mfm_branch, "masked feature modeling", head="rebuilder", build=lambda student, args: Rebuilder(
        student.feat_channels, args.mfm_dim, args.mfm_grid, args.mfm_depth, args.mfm_heads,
        mask_ratio=args.mask_ratio)),
    "mic": Auxiliary(lambda m, x_tgt, pl, weight, args, src: (baselines.mic_loss(
        m.student, x_tgt, pl, weight, args.mic_block, args.mic_ratio,
        src=src if args.mic_mode == "separate" else None), {}), "MIC (masked image consistency)"),
    "cmim": Auxiliary(lambda m, x_tgt, pl, weight, args, src: (baselines.cmim_loss(
        m.student, m.heads["cmim_head"], x_tgt, pl, weight), {}), "class-wise masked image modeling",
        head="cmim_head", build=lambda student, args: baselines.ClassWiseReconstructor(
        student.feat_channels, student.feat_stride), whole_student=False),  # choice: trained like the Rebuilder
}


def auxiliaries(args):
    """The auxiliary tasks of this run, in the order their losses run."""
    return [] if args.mode == "source-only" else [a for a in args.aux.split(",") if a != "none"]


@torch.no_grad()
def ema_update(teacher, student, step, alpha):
    """teacher = a * teacher + (1 - a) * student over parameters (not BN buffers), a = min(1 - 1/(step+1), alpha):
    at step 0 the teacher becomes a copy of the student."""
    a = min(1 - 1 / (step + 1), alpha)
    torch._foreach_lerp_(list(teacher.parameters()), list(student.parameters()), 1 - a)


def lr_factor(step, args):
    """mmcv's linear warm-up (from 1e-6 of the LR) times polynomial decay (power 1) to 0 at args.iters."""
    poly = (1 - step / args.iters) ** 1.0
    if step < args.warmup:
        return poly * (1 - (1 - step / args.warmup) * (1 - 1e-6))
    return poly


def train_step(run, x_src, y_src, x_tgt, step, args, frame=None):
    """One iteration. Returns the losses (the mean over GPUs) as a dict of floats and the maps for pictures.
    Each loss term is one forward + backward through run.trainable; with several GPUs all but the last backward
    skip DistributedDataParallel's gradient all-reduce (no_sync), so there is one all-reduce per step.
    frame (B, 3): where each target crop lies in its image (data.build_dataset(frame=True)), for HRDA's margins."""
    # Autocast keeps LayerNorm, softmax and resizes in float32 (numerics), so the MiT stages and the Rebuilder's
    # output are float32 maps; the head's first Linear/conv casts them and keeps only its bf16 copy for backward.
    autocast = evaluation.autocast(x_src.device, args.dtype)
    for group in run.optimizer.param_groups:
        group["lr"] = group["base_lr"] * lr_factor(step, args)
    run.optimizer.zero_grad(set_to_none=True)
    losses, seen = {}, {}

    def backward(branch, last):
        """branch(m) -> loss, run as trainable(branch): m holds the student and the heads (DDP-wrapped)."""
        with contextlib.nullcontext() if last else getattr(run.trainable, "no_sync", contextlib.nullcontext)():
            with autocast:
                loss = run.trainable(branch)
            run.scaler.scale(loss).backward()

    def source(m):
        losses["loss_src"], feats = source_loss(m.student, x_src, y_src)
        if run.imagenet is None:
            return losses["loss_src"]
        with torch.no_grad():  # DAFormer: stay close to ImageNet features on thing classes (MiT: the last stage)
            feats_imagenet = run.imagenet.encode(x_src)  # (HRDA: its unused detail view costs ~2% of a step)
        f_student, f_imagenet = m.student.deepest(feats), m.student.deepest(feats_imagenet)
        losses["loss_fd"] = baselines.feature_distance_loss(f_student, f_imagenet, y_src)
        return losses["loss_src"] + args.lambda_fd * losses["loss_fd"]
    backward(source, last=run.teacher is None)
    if run.teacher is None:
        return finish_step(run, losses, seen, step, args)
    with autocast:  # the teacher's forward in the student's precision; pseudo_label's softmax is float32
        seen["pseudo_label"], q = pseudo_label(run.teacher, x_tgt, args.pseudo_threshold)
    side = baselines.CROP_SIDE if args.recipe == "hrda" else 0
    weight = baselines.pseudo_label_crop(q, seen["pseudo_label"], side=side, frame=frame) if args.pl_crop else q
    seen["x_mix"], seen["y_mix"], w_mix = mix(x_src, y_src, x_tgt, seen["pseudo_label"], weight)
    losses["confidence"] = q

    def mixed(m):
        losses["loss_mix"] = mix_loss(m.student, seen["x_mix"], seen["y_mix"], w_mix)
        return losses["loss_mix"]

    def auxiliary(name, m):
        losses[f"loss_{name}"], maps = AUXILIARIES[name].loss(m, x_tgt, seen["pseudo_label"], weight, args,
                                                              (x_src, y_src))
        seen.update(maps)
        return getattr(args, f"lambda_{name}") * losses[f"loss_{name}"]
    aux = auxiliaries(args)
    backward(mixed, last=not aux)
    for i, name in enumerate(aux):
        backward(partial(auxiliary, name), last=i == len(aux) - 1)
    return finish_step(run, losses, seen, step, args)


def finish_step(run, losses, seen, step, args):
    """One host sync for all losses and the gradient norm (averaged over GPUs, together with the stop-signal
    flag); stop on a non-finite one *before* the optimizer step, so that no NaN reaches the weights, the AdamW
    moments or the teacher; optimizer step; EMA teacher."""
    grads = [p.grad for group in run.optimizer.param_groups for p in group["params"] if p.grad is not None]
    values = [v.detach().float() for v in losses.values()]
    grad_norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads))) if grads else values[0] * 0
    values = torch.stack(values + [grad_norm.float()])
    names = [*losses, "grad_norm"]
    if run.world > 1:  # every rank sees the same values, so all stop or skip together
        values = torch.cat([values, torch.ones(1, device=values.device) * bool(run.stop_signal)])
        dist.all_reduce(values)
        values, names = values / run.world, names + ["stop"]  # stop > 0: a signal reached some rank
    values = dict(zip(names, values.tolist()))
    if values.pop("stop", 0) and not run.stop_signal:
        run.stop_signal.append("SIGTERM")
    bad = [k for k, v in values.items() if not math.isfinite(v)]
    if bad:
        run.optimizer.zero_grad(set_to_none=True)
        raise NonFiniteLoss(nonfinite_message(values, bad, step, args))
    run.scaler.step(run.optimizer)
    run.scaler.update()
    if run.teacher is not None:
        ema_update(run.teacher, run.student, step, args.ema)
    return values, seen


def nonfinite_message(values, bad, step, args):
    """What was NaN/inf at `step` (a loss, or only the gradient) and the advice that fits this run: a wider precision
    only where it is not in use, the λ of the auxiliary that broke, the LR where the step itself did."""
    term, gradient = [k[5:] for k in bad if k[5:] in AUXILIARIES or k == "loss_fd"], bad == ["grad_norm"]  # mfm, fd
    advice = [f"--dtype fp32 (this run: {args.dtype})"] * (args.dtype != "fp32") + [
        f"a smaller --lambda-{t} (now {getattr(args, 'lambda_' + t):g})" for t in term]
    advice += [f"a lower --lr (now {args.lr:g})"] * (gradient or len(term) < len(set(bad) - {"grad_norm"}))
    return (f"non-finite {'gradient' if gradient else 'loss'}: {', '.join(f'{k} = {values[k]}' for k in bad)} at step "
            f"{step}{' (every loss finite)' * gradient}, in {args.dtype}. Stopped before the optimizer step; the last "
            "good checkpoint is untouched. Try " + ", or ".join(advice + ["--skip-nonfinite to skip such steps"]) + ".")


# ----------------------------------------------------------------------------- the run
@dataclass
class Run:
    """What a step touches. teacher: the EMA copy (no heads; None: --source-only); imagenet: the frozen copy of the
    feature distance (--fd); heads: the auxiliaries' modules by name; trainable: student + heads (DDP: torchrun)."""
    student: nn.Module
    teacher: Optional[nn.Module]
    imagenet: Optional[nn.Module]
    heads: dict
    trainable: nn.Module
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    world: int = 1
    stop_signal: list = field(default_factory=list)  # finish_step shares it between ranks


def leaves_parameters_unused(args):
    """Whether the step's last backward (DDP all-reduces in it) leaves a trained parameter without gradient: an earlier
    auxiliary's head, or a last auxiliary that skips part of the student. Only then does DDP walk the graph."""
    *earlier, last = auxiliaries(args) or [None]
    return any(AUXILIARIES[a].head for a in earlier) or (last is not None and not AUXILIARIES[last].whole_student)


def build_run(args, num_classes):
    """Student, heads, teacher (EMA copy, no heads), optimizer with its LR groups, grad scaler; under torchrun the
    trained modules are wrapped in DDP (which copies rank 0's initial weights to every rank)."""
    device = torch.device(args.device)
    world = dist.get_world_size() if dist.is_initialized() else 1
    student = hrda.build_model(num_classes, args.backbone, args.pretrained, hrda=dict(crop_size=args.crop_size)
                               if args.recipe == "hrda" else None).to(device)
    if args.sync_bn and world > 1:
        student = nn.SyncBatchNorm.convert_sync_batchnorm(student)
    student = student.to(memory_format=models.memory_format(device))
    aux = auxiliaries(args)
    heads = {a.head: a.build(student, args).to(device) for name, a in AUXILIARIES.items() if name in aux and a.head}
    trainable = runtime.trainable(student, heads, device, world, leaves_parameters_unused(args))
    imagenet = models.imagenet_copy(student, args.pretrained) if args.fd else None  # before any training
    teacher = None
    if args.mode != "source-only":
        teacher = copy.deepcopy(student).requires_grad_(False)
        for module in teacher.modules():
            if isinstance(module, STOCHASTIC):
                module.eval()
    groups = student.param_groups(args.lr) + [dict(params=list(head.parameters()), lr=args.lr_rebuilder, name=name)
                                              for name, head in heads.items()]
    for group in groups:
        group["base_lr"] = group["lr"]
    optimizer = torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.999), weight_decay=args.weight_decay)
    scaler = torch.amp.GradScaler(device.type, enabled=args.dtype == "fp16")
    if args.compile:  # after the copies: the teacher and the ImageNet copy stay plain modules
        student.compile_encode_decode(args.compile)
    return Run(student, teacher, imagenet, heads, trainable, optimizer, scaler, world)


# ----------------------------------------------------------------------------- main loop
def train(args):
    out = Path(args.out)
    rank, world = runtime.setup_distributed(args)
    has_ckpt = (out / "ckpt.pt").exists()
    if rank == 0 and not args.resume and has_ckpt:
        raise ConfigError(f"--out {out} already holds a run (ckpt.pt). Continue it with --resume, or choose "
                          "another --out; nothing was overwritten.")
    runtime.set_seed(args.seed, args.deterministic)
    keys = None
    if args.labeled is not None:  # the draw depends on the seed only: every rank gets the same split
        keys = data.labeled_split(args.target, args.data_root, args.labeled, args.seed)  # N or a split file
    if rank > 0:  # rank 0 first: it writes the RCS statistics cache that the others then read
        dist.barrier()
    size = {name: s and tuple(round(v * args.resize_scale) for v in s) for name, s in data.RESIZE.items()}
    src = data.build_dataset(args.source, args.data_root, "train", crop_size=args.crop_size, seed=args.seed,
                             rcs=args.rcs, rcs_cache=out / "rcs_stats.json", keys=keys, source=True,
                             resize=size[args.source])
    if rank == 0 and world > 1:
        dist.barrier()
    tgt = data.build_dataset(args.target, args.data_root, "train", crop_size=args.crop_size, seed=args.seed + 1,
                             resize=size[args.target], frame=True, labels=False)  # its labels are never used
    val = data.build_dataset(args.target, args.data_root, "val", train=False, resize=size[args.target])
    run = build_run(args, src.num_classes)
    if world > 1:  # augmentation, ClassMix and masks differ per rank; the weights were made (and broadcast) above
        torch.manual_seed(args.seed + rank)
        random.seed(args.seed + rank)
    start = runtime.restore_run(run, args, rank) if args.resume and (has_ckpt or args.resume != "auto") else 0
    if rank == 0:
        runtime.open_run_folder(out, args, world, start)
        if keys is not None:
            data.write_split(out / "labeled.txt", args.target, keys)

    device = torch.device(args.device)
    layout = models.memory_format(device)
    src_iter, tgt_iter = (data.train_loader(ds, args.batch_size, start, args.workers, args.seed,
                                            device.type == "cuda", rank, world) for ds in (src, tgt))
    stop = min(args.iters, args.stop_at or args.iters)
    bar = tqdm(range(start, stop), initial=start, total=stop, desc=f"{args.source}->{args.target} {args.mode}",
               disable=rank > 0)
    tick, result, step, logged = time.time(), None, start - 1, start
    with runtime.signals_to_flag() as stop_signal:
        run.stop_signal = stop_signal  # finish_step shares it between ranks: all stop after the same step
        for step in bar:
            done = step + 1
            picture = rank == 0 and args.vis_every and done % args.vis_every == 0
            x_src, y_src = (t.to(device, non_blocking=True) for t in next(src_iter))
            x_tgt = frame = None  # target labels are never used for training; source-only pictures need crops
            if run.teacher is not None or picture:
                x_tgt, _, frame = (t.to(device, non_blocking=True) for t in next(tgt_iter))
                x_tgt = x_tgt.contiguous(memory_format=layout)
            x_src = x_src.contiguous(memory_format=layout)
            try:
                values, seen = train_step(run, x_src, y_src, x_tgt, step, args, frame)
                bar.set_postfix({k.replace("loss_", ""): f"{v:.3f}" for k, v in values.items()})
            except NonFiniteLoss as err:
                if not args.skip_nonfinite:
                    raise
                if rank == 0:
                    runtime.log(out, dict(step=done, skipped=str(err)))
                values = None
            if rank == 0 and values and args.log_every and (done % args.log_every == 0 or done == stop):
                runtime.log(out, dict(step=done, lr=run.optimizer.param_groups[0]["lr"],
                                      sec_per_iter=(time.time() - tick) / (done - logged), **values))
                tick, logged = time.time(), done
            if values and picture:
                evaluation.save_training_picture(out / "vis" / f"step_{done:06d}.png", run.student, x_src, y_src,
                                                 x_tgt, seen, data.label_set(args.target)[1])
            if rank == 0 and args.eval_every and (done % args.eval_every == 0 or done == args.iters):
                result = evaluation.evaluate(run.student, val, args.device, evaluation.DTYPES[args.dtype],
                                             args.source, num_workers=args.workers)
                runtime.log(out, dict(step=done, eval=result))
                bar.write(f"step {done}: {val.name} {val.split} mIoU {result['mIoU']:.2f}")
            if (args.ckpt_every and done % args.ckpt_every == 0) or done == stop or stop_signal:
                runtime.save_checkpoint(run, args, done)
            if stop_signal:
                bar.close()
                resume = " ".join(a for a in sys.argv if a != "--resume")
                if rank == 0:
                    print(f"\n{stop_signal[0]} received: stopped after step {done}, checkpoint {out / 'ckpt.pt'}.\n"
                          f"Continue with: python {resume} --resume", file=sys.stderr)
                sys.exit(128 + getattr(signal, stop_signal[0]))
    bar.close()
    if step + 1 < args.iters:
        if rank == 0:
            print(f"stopped at step {step + 1} of {args.iters} (--stop-at); continue with --resume.")
    elif result is not None:
        print(evaluation.format_table(result))
        print(f"done: {args.mode} {args.source}->{args.target}, {args.iters} iterations; final model: {val.name} "
              f"{val.split} mIoU {result['mIoU']:.2f}. Weights for inference: {out / 'model.pt'}")
    return result


# ----------------------------------------------------------------------------- command line
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)

    def preset(key):
        return f"(default: {PAPER[key]}; toy pair: {TOY[key]}; voc: {VOC[key]})"
    g = p.add_argument_group("data")
    g.add_argument("--source", required=True, choices=sorted({s for s, _ in SETTINGS}),
                   help="labelled source domain; = --target with --labeled: semi-supervised")
    g.add_argument("--target", required=True, choices=sorted({t for _, t in SETTINGS}), help="unlabelled target domain")
    g.add_argument("--labeled", metavar="N|FILE", help="semi-supervised (--source = --target): N labelled train "
                   "images (a seeded draw, saved as OUT/labeled.txt) or a split file (UniMatch or U2PL format); "
                   "every train image is also an unlabelled target, as in ClassMix")
    g.add_argument("--data-root", default="data", help="folder of gta/, cityscapes/, acdc/, voc/, ... (default: data)")
    g.add_argument("--crop-size", type=int, help=f"square random crop after the recipe's resize {preset('crop_size')}")
    g.add_argument("--batch-size", type=int, default=2, help="source and target images per step and GPU (default: 2)")
    g.add_argument("--workers", type=int, default=None, help="DataLoader processes (default: 4 on CUDA, 0 on CPU)")
    g.add_argument("--rcs", action="store_true", help="rare class sampling of source images (DAFormer, T=0.01)")
    g = p.add_argument_group("model and optimisation")
    g.add_argument("--backbone", choices=models.BACKBONES, help="dilated ResNet (DeepLabV2 head), MiT (DAFormer "
                   f"head) or deeplabv3plus-RESNET (DeepLabV3+, output stride 16) {preset('backbone')}")
    g.add_argument("--pretrained", help="imagenet | none | PATH (ImageNet weights as downloaded: torchvision, "
                   "open-mmlab resnet101_v1c, SegFormer mit_bX.pth; or a whole network: one of our checkpoints, or the "
                   f"student of a released DAFormer/HRDA/MIC latest.pth) {preset('pretrained')}")
    g.add_argument("--iters", type=int, help=f"training iterations; the LR reaches 0 here {preset('iters')}")
    g.add_argument("--lr", type=float, help=f"AdamW LR of the encoder; the head gets 10x {preset('lr')}")
    g.add_argument("--warmup", type=int, help=f"linear warm-up iterations, then lr*(1-t/iters) {preset('warmup')}")
    g.add_argument("--weight-decay", type=float, default=0.01, help="AdamW weight decay (default: 0.01)")
    g.add_argument("--ema", type=float, default=0.99, help="teacher EMA: alpha_t = min(1 - 1/(t+1), EMA) (0.99)")
    g.add_argument("--pseudo-threshold", type=float, help="q = fraction of target pixels whose max teacher "
                   f"probability >= this (DACS's; voc: UniMatch's conf_thresh) {preset('pseudo_threshold')}")
    g = p.add_argument_group("auxiliary tasks (L = L_src + L_mix + sum of lambda_a * L_a; MFM is the paper's, §3)")
    mode = g.add_mutually_exclusive_group()
    mode.add_argument("--aux", default="mfm", help="target auxiliary tasks, comma-separated from "
                      f"{', '.join(AUXILIARIES)}, or none (default: mfm). E.g. --aux mfm,mic")
    mode.add_argument("--no-mfm", action="store_true", help="DACS baseline: no auxiliary task (= --aux none)")
    mode.add_argument("--source-only", action="store_true", help="no adaptation: source loss only")
    for name, aux in AUXILIARIES.items():
        g.add_argument(f"--lambda-{name}", type=float, default=aux.lambda_default,
                       help=f"lambda_{name}, weight of the {aux.what} loss (default: {aux.lambda_default})")
    g = p.add_argument_group("MFM's Rebuilder (mfm.py)")
    g.add_argument("--mask-ratio", type=float, default=0.4, help="P(grid cell masked), in (0, 1) (default: 0.4)")
    g.add_argument("--mfm-grid", type=int, help=f"mask grid g: g x g cells {preset('mfm_grid')}; MiT: crop/32")
    g.add_argument("--mfm-dim", type=int, default=512, help="Rebuilder width C' (default: 512)")
    g.add_argument("--mfm-depth", type=int, default=2, help="Rebuilder transformer blocks (default: 2)")
    g.add_argument("--mfm-heads", type=int, default=16, help="Rebuilder attention heads (default: 16)")
    g.add_argument("--lr-rebuilder", type=float, help=f"Rebuilder AdamW LR, same schedule {preset('lr_rebuilder')}")
    g = p.add_argument_group("comparisons: MIC, class-wise MIM (baselines.py) and the DAFormer extras")
    g.add_argument("--mic-block", type=int, help="MIC mask block in pixels (default: crop/16, 32 at 512)")
    g.add_argument("--mic-ratio", type=float, default=0.7, help="MIC fraction of masked blocks (default: 0.7)")
    g.add_argument("--mic-mode", choices=["separatetrgaug", "separate"], help="MIC's masked batch: the target crops, "
                   "augmented; or 1 source + 1 target per 2, plain (default: as MIC, separate to acdc/dark_zurich)")
    g.add_argument("--fd", action="store_true", help="ImageNet feature distance on thing classes (DAFormer)")
    g.add_argument("--lambda-fd", type=float, default=baselines.LAMBDA_FD, help="its weight (default: 0.005)")
    g.add_argument("--pl-crop", action="store_true", help="weight 0 on the top 15 / bottom 120 rows of target "
                   "pseudo-labels, scaled to the crop (DAFormer; --recipe hrda: off on acdc, dark_zurich, as HRDA)")
    g.add_argument("--recipe", choices=["dacs", "daformer", "hrda"], default="dacs",
                   help="daformer = --rcs --fd --pl-crop --ema 0.999; hrda = daformer + HRDA's multi-resolution "
                   "training (hrda.py): --resize-scale 2, crops 2x the pair's (1024), pseudo-label crop of the image's "
                   "30 side columns too (default: dacs)")
    g.add_argument("--resize-scale", type=float, help="images resized to this times the recipe's size before "
                   "cropping (GTA 1280x720, Cityscapes 1024x512; toy 128x64) (default: 1; hrda: 2)")
    g = p.add_argument_group("run")
    g.add_argument("--out", help="output folder (default: runs/SOURCE-TARGET[-BACKBONE][-RECIPE]-MODE-sSEED, "
                   "backbone and recipe named where they are not the pair's defaults)")
    g.add_argument("--seed", type=int, default=0, help="seed of weights, data order, augmentation, masks")
    g.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cuda or cpu")
    g.add_argument("--dtype", choices=evaluation.DTYPES, help="autocast dtype (default: bf16 on CUDA, fp32 on CPU)")
    g.add_argument("--compile", nargs="?", const="inductor", metavar="BACKEND",
                   help="torch.compile the student's encode/decode (default backend: inductor)")
    g.add_argument("--sync-bn", action="store_true", help="with torchrun: BatchNorm statistics over all GPUs "
                   "(default: per GPU, as the one-GPU recipe)")
    g.add_argument("--deterministic", action="store_true", help="deterministic kernels (bit-identical resume)")
    g.add_argument("--resume", nargs="?", const="auto", metavar="CKPT",
                   help="continue the run in --out from its ckpt.pt (or from CKPT)")
    g.add_argument("--stop-at", type=int, help="stop (with a checkpoint) after this iteration; --resume later")
    g.add_argument("--skip-nonfinite", action="store_true", help="skip a step whose loss is NaN/inf, do not stop")
    for key, what in (("eval_every", "evaluate on the target val split"), ("ckpt_every", "write ckpt.pt"),
                      ("vis_every", "save a picture to vis/"), ("log_every", "append to log.jsonl")):
        g.add_argument("--" + key.replace("_", "-"), type=int, help=f"{what} every N iterations, 0 = never "
                       f"{preset(key)}")
    return resolve(p.parse_args(argv))


def resolve(args):
    """Fill the domain-dependent defaults and check ranges; raises ConfigError naming the flag."""
    grid_given, crop_given, hr = args.mfm_grid is not None, args.crop_size is not None, args.recipe == "hrda"
    defaults = SETTINGS.get((args.source, args.target))
    if defaults is None:
        raise ConfigError(f"--source {args.source} --target {args.target} is not a pair this code trains; choose "
                          + ", ".join(f"{s} -> {t}" for s, t in SETTINGS) + " (source = target: semi-supervised).")
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.crop_size = args.crop_size * (1 + (hr and not crop_given))  # HRDA: 1024 crops of 2x images
    args.resize_scale = args.resize_scale or (2.0 if hr else 1.0)
    if args.backbone in models.MITS and not grid_given:  # the last MiT stage of a 512 crop (HRDA: of a 512 view)
        args.mfm_grid = max(1, args.crop_size // (64 if hr else 32))  # is 16 x 16: the release's g
    if (args.labeled is not None) != (args.source == args.target):
        raise ConfigError(f"--labeled is the semi-supervised setting: it needs --source = --target (cityscapes, voc "
                          f"or toy-night), got --source {args.source} --target {args.target}"
                          + ("" if args.labeled is not None else " without --labeled N|FILE") + ".")
    if args.recipe != "dacs":  # HRDA/MIC: no pseudo-label margins on targets without rectification artefacts
        vars(args).update(DAFORMER, pl_crop=args.pl_crop or not (hr and args.target in data.NO_RECTIFICATION))
    if hr and (args.crop_size // 2) % 8:
        raise ConfigError(f"--crop-size {args.crop_size} with --recipe hrda: the detail crop (half of it, "
                          f"{args.crop_size // 2}) must be divisible by 8.")
    args.mic_block, args.mic_mode = args.mic_block or max(1, args.crop_size // 16), args.mic_mode or "separatetrgaug"
    aux = [] if args.no_mfm or args.source_only else [a for a in args.aux.split(",") if a not in ("", "none")]
    unknown = [a for a in aux if a not in AUXILIARIES]
    if unknown:
        raise ConfigError(f"--aux {args.aux}: unknown {', '.join(unknown)}; choose from {', '.join(AUXILIARIES)}, "
                          "or none.")
    if hr and (args.labeled is not None or "cmim" in aux):
        raise ConfigError("--recipe hrda does not support " + ("--labeled (HRDA is a UDA recipe)"
                          if args.labeled is not None else "--aux cmim (its class images have no HRDA views)") + ".")
    args.aux = ",".join(aux) or "none"
    args.mode = "source-only" if args.source_only else "+".join(["dacs", *aux])
    args.dtype = args.dtype or ("bf16" if args.device.startswith("cuda") else "fp32")
    args.workers = (4 if args.device.startswith("cuda") else 0) if args.workers is None else args.workers
    pair = f"{args.target}-{Path(args.labeled).stem}" if args.labeled else f"{args.source}-{args.target}"
    what = [args.backbone] * (args.backbone != defaults["backbone"]) + [args.recipe] * (args.recipe != "dacs")
    args.out = args.out or f"runs/{'-'.join([pair, *what, args.mode.replace('+', '-')])}-s{args.seed}"
    checks = [("--iters", args.iters > 0, "> 0"), ("--batch-size", args.batch_size > 0, "> 0"),
              ("--batch-size", args.batch_size > 1 or args.backbone not in models.DLV3P, "> 1 with DeepLabV3+ "
               "(BatchNorm after its image pooling)"),
              ("--crop-size", args.crop_size >= 8, ">= 8"), ("--mask-ratio", 0 < args.mask_ratio < 1, "in (0, 1)"),
              ("--lr", args.lr > 0, "> 0"), ("--warmup", args.warmup >= 0, ">= 0"),
              ("--ema", 0 <= args.ema < 1, "in [0, 1)"), ("--workers", args.workers >= 0, ">= 0"),
              ("--resize-scale", args.resize_scale > 0, "> 0"),
              ("--lambda-mfm", args.lambda_mfm >= 0, ">= 0"), ("--mfm-grid", args.mfm_grid > 0, "> 0"),
              ("--stop-at", args.stop_at is None or args.stop_at > 0, "> 0")]
    for flag, ok, expected in checks:
        if not ok:
            value = getattr(args, flag[2:].replace("-", "_"))
            raise ConfigError(f"{flag} {value} is out of range: expected {expected}.")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError("--device cuda was asked for, but PyTorch sees no CUDA GPU; use --device cpu.")
    if args.sync_bn and not args.device.startswith("cuda"):
        raise ConfigError("--sync-bn needs --device cuda (PyTorch's SyncBatchNorm runs on GPUs only).")
    return args


def main(argv=None):
    args = None  # an error inside parse_args leaves no args to read below
    try:
        args = parse_args(argv)
        return train(args)
    except (ConfigError, NonFiniteLoss, data.DatasetError, models.WeightsError) as err:
        sys.exit(f"error: {err}")
    except RuntimeError as err:  # cuDNN/cuBLAS report a failed allocation as a plain RuntimeError
        if not isinstance(err, torch.cuda.OutOfMemoryError) and "ALLOC_FAILED" not in str(err):
            raise
        bf16 = ", or --dtype bf16" * (args is None or args.dtype == "fp32")
        sys.exit(f"error: the GPU ran out of memory ({str(err).splitlines()[0]}). Try a smaller --crop-size or "
                 f"--batch-size{bf16}; the same command then starts again (or continues from the last checkpoint "
                 "with --resume).")
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
