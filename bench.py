"""What MFM costs: training step time, memory and FLOPs of source-only, DACS and DACS + MFM, the exported model's
size and inference time with and without MFM training, and data-loader throughput, measured in one process.

Each mode is built with train.parse_args + train.build_run and timed through train.train_step on random tensors
of the training shapes, so this times the code train.py runs (data loading excluded; bench_loader measures it
apart). The paper's claims to check (METHOD.md §3): the Rebuilder exists only during
training, so the exported network has the same parameters and inference time; our goals for the training
overhead: DACS + MFM step <= 1.5x DACS and peak memory <= 1.15x DACS.

    python bench.py                              # CPU: resnet18, 64 px crops, batch 2 + 2, fp32; about a minute
    python bench.py --backbone resnet101 --crop-size 512 --reps 2 --warmup 1 --no-loader  # paper shapes, CPU: ~10 min
    python bench.py --backbone mit_b5 --crop-size 512 --reps 1 --warmup 1 --no-loader     # DAFormer MiT-B5, CPU
    python bench.py --device cuda                # GPU: the paper's ResNetV1c-101, 512 crops, batch 2 + 2, bf16
    python bench.py --device cuda --backbone mit_b5   # GPU: MiT-B5 + DAFormer head (the paper's main table)
    python bench.py --device cuda --peak-tflops 756 --json h100pcie.json   # MFU against your GPU's peak

It prints a markdown table (ready for the README) and writes the numbers to --json (default bench.json).
"""
import argparse
import contextlib
import gc
import itertools
import json
import platform
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.flop_counter import FlopCounterMode, conv_flop_count
from tqdm import tqdm

import data
import eval as evaluation
import models
import train

# Dense bf16 tensor-core peak (TFLOP/s, vendor datasheets), matched as a substring of the device name, first hit.
PEAK_BF16_TFLOPS = (("H100 PCIe", 756), ("H100", 989), ("H200", 989), ("A100", 312), ("L40S", 362), ("L4", 121))
GOALS = {"step_s": 1.5, "peak_bytes": 1.15}  # DACS + MFM / DACS, the targets
CUDA_DEFAULTS = dict(backbone="resnet101-v1c", crop_size=512, dtype="bf16", reps=20, warmup=5, loader_n=32,
                     loader_workers=4)
CPU_DEFAULTS = dict(backbone="resnet18", crop_size=64, dtype="fp32", reps=20, warmup=5, loader_n=8, loader_workers=0)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)

    def default(key):
        return f"(default: {CUDA_DEFAULTS[key]} on CUDA, {CPU_DEFAULTS[key]} on CPU)"
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="cuda or cpu (default: cuda when PyTorch sees a GPU)")
    p.add_argument("--backbone", choices=models.BACKBONES, help=f"ResNet (DeepLabV2) or MiT (DAFormer head) "
                   f"{default('backbone')}")
    p.add_argument("--crop-size", type=int, help=f"square training crop; inference runs on crop x 2*crop, the "
                   f"Cityscapes aspect (512 -> 512x1024, the paper's eval size) {default('crop_size')}")
    p.add_argument("--batch-size", type=int, default=2, help="source images and target images per step (default: 2)")
    p.add_argument("--dtype", choices=evaluation.DTYPES, help=f"autocast dtype {default('dtype')}")
    p.add_argument("--reps", type=int, help=f"timed repetitions per mode; median and min reported {default('reps')}")
    p.add_argument("--warmup", type=int, help=f"untimed iterations before timing {default('warmup')}")
    p.add_argument("--mfm-grid", type=int, help="Rebuilder grid g (default: crop/32: the paper's g=16 at 512; 4g = "
                   "the DeepLabV2 feature size, g = MiT's last stage)")
    p.add_argument("--aux", nargs="+", default=[], choices=["mic", "cmim", "mfm,mic"],
                   help="also time DACS + each auxiliary (train.py --aux NAME), e.g. --aux mic cmim")
    p.add_argument("--peak-tflops", type=float, help="device peak for MFU = FLOPs/step / step time / peak "
                   "(default: dense bf16 peak from a table keyed by CUDA device name; none on CPU)")
    p.add_argument("--no-loader", action="store_true", help="skip the data-loader benchmark")
    p.add_argument("--loader-n", type=int, help=f"GTA-sized PNG pairs the loader reads {default('loader_n')}")
    p.add_argument("--loader-workers", type=int, help=f"DataLoader workers compared with 0 {default('loader_workers')}")
    p.add_argument("--json", default="bench.json", help="where to write the results (default: bench.json)")
    args = p.parse_args(argv)
    for key, value in (CUDA_DEFAULTS if args.device.startswith("cuda") else CPU_DEFAULTS).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.mfm_grid = args.mfm_grid or max(1, args.crop_size // 32)
    if args.reps < 1 or args.warmup < 0:
        p.error("--reps must be >= 1 and --warmup >= 0")
    return args


def timed(fn, device):
    """Seconds one call of fn takes: CUDA events around it on GPU, perf_counter on CPU."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize(device)
        return start.elapsed_time(end) / 1000
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def repeat(fn, device, warmup, reps):
    for _ in range(warmup):
        fn()
    times = [timed(fn, device) for _ in range(reps)]
    return dict(median_s=statistics.median(times), min_s=min(times), times_s=times)


def conv_backward_flops(grad_out_shape, x_shape, w_shape, _bias, _stride, _padding, _dilation, transposed,
                        _output_padding, _groups, output_mask, out_shape, **kwargs):
    """FLOPs of a convolution's backward. torch's own formula counts the weight gradient of a grouped conv as if
    it were dense (`groups` times too much: 1024x for the DAFormer head's depthwise convs, which made a MiT-B5
    DACS step count 13 TFLOP instead of 3.5); both gradients cost what the forward costs."""
    flops = conv_flop_count(grad_out_shape, w_shape, out_shape[0], not transposed) if output_mask[0] else 0
    return flops + (conv_flop_count(x_shape, w_shape, grad_out_shape, transposed) if output_mask[1] else 0)


def count_flops():
    return FlopCounterMode(display=False, custom_mapping={torch.ops.aten.convolution_backward: conv_backward_flops})


def fresh_memory(device):
    """Free what the previous mode left so that each mode's CUDA peak is its own."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def state_bytes(run, grads=True):
    """Bytes of the persistent training state: weights, buffers, AdamW moments and (with grads) gradients of
    student, teacher and the training-only heads (exact on any device; activations are not included)."""
    modules = [run[k] for k in ("student", "teacher", *train.TRAINED_AUX_MODULES) if run[k] is not None]
    tensors = [t for m in modules for t in itertools.chain(m.parameters(), m.buffers())]
    tensors += [p.grad for m in modules for p in m.parameters() if grads and p.grad is not None]
    tensors += [v for s in run["optimizer"].state.values() for v in s.values() if torch.is_tensor(v)]
    return sum({t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}.values())


def cpu_peak_bytes(fn):
    """Run fn() and return the most CPU memory it held at once, counting only what it allocated itself.
    PyTorch keeps no CPU allocator peak; the profiler's allocation records carry a running total of the bytes
    allocated while profiling that are still alive (frees of older tensors are not in it)."""
    from torch._C._profiler import _EventType  # the records behind torch.profiler's memory timeline
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    totals, nodes = [0], list(prof.profiler.kineto_results.experimental_event_tree())
    while nodes:
        node = nodes.pop()
        nodes += node.children
        if node.tag == _EventType.Allocation and node.extra_fields.device.type == "cpu":
            totals.append(node.extra_fields.total_allocated)
    return max(totals)


def bench_training(name, extra, args, device, export_dir):
    """Time train.train_step for one mode; export the student as train.py does -> (result dict, model.pt path)."""
    targs = train.parse_args(["--source", "gta", "--target", "cityscapes", "--pretrained", "none",
                              "--backbone", args.backbone, "--crop-size", str(args.crop_size),
                              "--batch-size", str(args.batch_size), "--device", args.device, "--dtype", args.dtype,
                              "--mfm-grid", str(args.mfm_grid), *extra])
    fresh_memory(device)
    train.set_seed(0)
    run = train.build_run(targs, data.SegDataset.num_classes)
    b, c = args.batch_size, args.crop_size
    layout = torch.channels_last if device.type == "cuda" else torch.contiguous_format  # as train.py's loop
    x_src = torch.rand(b, 3, c, c, device=device).contiguous(memory_format=layout)
    y_src = torch.randint(0, data.SegDataset.num_classes, (b, c, c), device=device)
    x_tgt = torch.rand(b, 3, c, c, device=device).contiguous(memory_format=layout)
    steps = itertools.count()

    def step():
        train.train_step(run, x_src, y_src, x_tgt, next(steps), targs)
    result = repeat(step, device, args.warmup, args.reps)
    result["state_bytes"] = state_bytes(run)
    with count_flops() as counter:  # one more step, after timing: the counters slow it down
        if device.type == "cuda":
            step()
            result["peak_bytes"] = torch.cuda.max_memory_allocated(device)
        else:  # what the step keeps from before it (zero_grad drops the gradients first) + what it allocates
            result["peak_bytes"] = state_bytes(run, grads=False) + cpu_peak_bytes(step)
    result["flops"] = counter.get_total_flops()
    result["images_per_s"] = 2 * b / result["median_s"]  # source + target images
    result["hours_40k"] = 40_000 * result["median_s"] / 3600  # the paper's schedule
    path = Path(export_dir) / f"{name.replace('+', '-')}.pt"
    models.atomic_save(train.export(run, targs, next(steps)), path)
    return result, path


@torch.no_grad()
def bench_inference(paths, args, device):
    """Load each exported model.pt as eval.py's users do; time one forward of a (1, 3, crop, 2*crop) image,
    the models taking turns so that a change in machine load hits them alike. paths: {label: path}."""
    nets = {label: models.model_from_checkpoint(path, device)[0] for label, path in paths.items()}
    x = torch.rand(1, 3, args.crop_size, 2 * args.crop_size, device=device)
    autocast = torch.autocast(device.type, dtype=evaluation.DTYPES[args.dtype], enabled=args.dtype != "fp32")

    def forward(net):
        with autocast:
            net(x)
    for net in itertools.chain.from_iterable(itertools.repeat(list(nets.values()), args.warmup)):
        forward(net)
    times = {label: [] for label in nets}
    for _ in range(args.reps):
        for label, net in nets.items():
            times[label].append(timed(lambda net=net: forward(net), device))
    return {label: dict(median_s=statistics.median(t), min_s=min(t), times_s=t,
                        params=models.count_parameters(nets[label]),
                        shapes={k: list(v.shape) for k, v in nets[label].state_dict().items()})
            for label, t in times.items()}


def bench_loader(workers, n, batch_size=2):
    """Images/s of the training pipeline on n GTA-sized PNG pairs, for 0 and `workers` DataLoader processes;
    prints a table and returns {workers: images/s}."""
    result = {}
    with tempfile.TemporaryDirectory() as tmp:
        root, rng, ids = Path(tmp), np.random.default_rng(0), np.array(list(data.CITYSCAPES_ID_TO_TRAINID), np.uint8)
        for sub in ("images", "labels"):
            (root / "gta" / sub).mkdir(parents=True)
        for i in tqdm(range(n), desc="writing GTA-sized PNG pairs"):  # smooth noise: compresses like a photo
            img = Image.fromarray(rng.integers(0, 256, (66, 120, 3), np.uint8)).resize((1914, 1052), Image.BILINEAR)
            img.save(root / f"gta/images/{i + 1:05d}.png")
            lbl = Image.fromarray(rng.choice(ids, (17, 30))).resize((1914, 1052), Image.NEAREST)
            lbl.putpalette(np.array(data.PALETTE, np.uint8).ravel().tolist())  # 'L' -> 'P', as the GTA download
            lbl.save(root / f"gta/labels/{i + 1:05d}.png")
        ds = data.build_dataset("gta", root=root, crop_size=512)
        print(f"training pipeline: GTA 1914x1052 PNG -> 1280x720 -> 512 crop, batch {batch_size}, {n} images "
              "(first batch untimed)\nworkers  images/s")
        for w in sorted({0, workers}):
            loader = torch.utils.data.DataLoader(ds, batch_size=batch_size, sampler=range(n), num_workers=w)
            batches = iter(loader)
            next(batches)  # not timed: worker start-up
            start = time.perf_counter()
            count = sum(img.shape[0] for img, _ in batches)
            result[w] = count / (time.perf_counter() - start)
            print(f"{w:>7}  {result[w]:8.1f}")
    return result


def cpu_name():
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def peak_flops(args, device):
    if args.peak_tflops:
        return args.peak_tflops * 1e12
    if device.type != "cuda" or args.dtype == "fp32":
        return None
    name = torch.cuda.get_device_name(device)
    return next((tflops * 1e12 for key, tflops in PEAK_BF16_TFLOPS if key in name), None)


def markdown(report):
    s, modes, inf = report["settings"], report["modes"], report["inference"]
    dacs = modes["dacs"]

    def ratio(row, key):
        return f"{row[key] / dacs[key]:.2f}x" if row[key] and dacs[key] else "n/a"

    def mib(value):
        return f"{value / 2**20:,.0f}" if value else "n/a"
    setup = (f"{s['backbone']}, {s['crop_size']} px crops, batch {s['batch_size']} source + {s['batch_size']} "
             f"target, {s['dtype']}, MFM grid {s['mfm_grid']}; median (min) of {s['reps']} steps after "
             f"{s['warmup']} warm-up, random tensors (no data loading).")
    lines = [f"**{report['device']}**, torch {report['torch']}: `{report['command']}`", "", setup, "",
             "| mode | step ms | vs DACS | images/s | GFLOP/step | MFU | peak MiB | vs DACS | state MiB | 40k iters |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in modes.items():
        mfu = f"{100 * r['mfu']:.1f}%" if r.get("mfu") else "n/a"
        lines.append(f"| {name} | {1000 * r['median_s']:.1f} ({1000 * r['min_s']:.1f}) | {ratio(r, 'median_s')} | "
                     f"{r['images_per_s']:.1f} | {r['flops'] / 1e9:,.1f} | {mfu} | {mib(r['peak_bytes'])} | "
                     f"{ratio(r, 'peak_bytes')} | {mib(r['state_bytes'])} | {r['hours_40k']:.1f} h |")
    legend = ("peak MiB: the most memory a training step holds (CUDA: torch.cuda.max_memory_allocated; CPU: the "
              "state it keeps plus the profiler's running total of what it allocates); state MiB: weights, buffers, "
              "gradients and AdamW moments of student, teacher and training-only heads; images/s counts source + "
              "target images.")
    lines += ["", legend, "",
              f"| exported model (inference, 1x3x{s['crop_size']}x{2 * s['crop_size']}) | parameters | forward ms |",
              "|---|---|---|"]
    for name, r in inf.items():
        lines.append(f"| {name} | {r['params']:,d} | {1000 * r['median_s']:.1f} ({1000 * r['min_s']:.1f}) |")
    a, b = inf["trained with DACS"], inf["trained with DACS + MFM"]
    lines.append(f"| ratio | {b['params'] / a['params']:.3f} | {b['median_s'] / a['median_s']:.2f} |")
    checks = report["checks"]
    lines += ["", f"DACS + MFM vs DACS: step {checks['step_ratio']:.2f}x (goal <= {GOALS['step_s']}x), peak memory "
              + (f"{checks['memory_ratio']:.2f}x" if checks["memory_ratio"] else "n/a")
              + f" (goal <= {GOALS['peak_bytes']}x); exported models identical: {checks['same_architecture']}."]
    if report.get("loader"):
        rates = ", ".join(f"{w} workers {v:.1f} images/s" for w, v in report["loader"].items())
        lines.append(f"Data loader (GTA 1914x1052 PNG -> 1280x720 -> 512 crop): {rates}.")
    return "\n".join(lines)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    device = torch.device(args.device)
    modes = [("source-only", ["--source-only"]), ("dacs", ["--no-mfm"]), ("dacs+mfm", [])]
    modes += [(f"dacs+{aux}", ["--aux", aux]) for aux in args.aux if aux != "mfm"]
    report = dict(device=torch.cuda.get_device_name(device) if device.type == "cuda"
                  else f"{cpu_name()} ({torch.get_num_threads()} threads)",
                  torch=torch.__version__, command=shlex.join(["python", "bench.py", *argv]), settings=vars(args),
                  modes={}, inference={})
    peak = peak_flops(args, device)
    with tempfile.TemporaryDirectory() as export_dir:
        exported = {}
        for name, extra in modes:
            print(f"timing {name} ...", file=sys.stderr)
            result, exported[name] = bench_training(name, extra, args, device, export_dir)
            result["mfu"] = result["flops"] / result["median_s"] / peak if peak else None
            report["modes"][name] = result
        print("timing inference ...", file=sys.stderr)
        report["inference"] = bench_inference({"trained with DACS": exported["dacs"],
                                               "trained with DACS + MFM": exported["dacs+mfm"]}, args, device)
    dacs, mfm = report["modes"]["dacs"], report["modes"]["dacs+mfm"]
    a, b = report["inference"].values()
    report["checks"] = dict(step_ratio=mfm["median_s"] / dacs["median_s"],
                            memory_ratio=mfm["peak_bytes"] / dacs["peak_bytes"] if dacs["peak_bytes"] else None,
                            same_architecture=a["params"] == b["params"] and a.pop("shapes") == b.pop("shapes"))
    if not args.no_loader:
        report["loader"] = bench_loader(args.loader_workers, args.loader_n)
    table = markdown(report)
    print(table)
    Path(args.json).write_text(json.dumps(dict(report, table=table), indent=2))
    print(f"wrote {args.json}", file=sys.stderr)
    return report


if __name__ == "__main__":
    main()
