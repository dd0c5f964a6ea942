"""What MFM costs: training step time, memory and FLOPs of source-only, DACS and DACS + MFM, the exported model's
size and inference time with and without MFM training, and data-loader throughput, measured in one process.

Each mode's settings come from train.py's own command line (train_argv -> train.parse_args: presets, crop, mask
grid, HRDA sizes), and the mode is built with train.build_run and timed through train.train_step on random tensors
of the training shapes, so this times the step train.py runs with the same flags (data loading excluded;
bench_loader measures it apart). The paper's claims to check (METHOD.md §3): the Rebuilder exists only during
training, so the exported network has the same parameters and inference time; our goals for the training
overhead: DACS + MFM step <= 1.5x DACS and peak memory <= 1.15x DACS.

    python bench.py                              # CPU: the toy's step (resnet18, 64 px, grid 4), fp32; about a minute
    python bench.py --preset paper --backbone resnet101 --reps 2 --warmup 1 --no-loader  # paper shapes, CPU: ~10 min
    python bench.py --preset paper --backbone mit_b5 --reps 1 --warmup 1 --no-loader     # DAFormer MiT-B5, CPU
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
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode, conv_flop_count
from tqdm import tqdm

import data
import eval as evaluation
import models
import runtime
import train

GOALS = {"step_s": 1.5, "peak_bytes": 1.15}  # DACS + MFM / DACS, the targets
PAIRS = {"toy": ["--source", "toy-day", "--target", "toy-night"],
         "paper": ["--source", "gta", "--target", "cityscapes"]}
CUDA_DEFAULTS = dict(preset="paper", reps=20, warmup=5, loader_n=32, loader_workers=4)
CPU_DEFAULTS = dict(preset="toy", reps=20, warmup=5, loader_n=8, loader_workers=0)


def train_argv(preset, *extra, **flags):
    """A train.py command line: the preset's pair ("toy": toy-day -> toy-night, "paper": gta -> cityscapes; their
    defaults are train.TOY and train.PAPER), from-scratch weights, `flags` as --name value (None: left to train.py),
    then `extra` as given."""
    argv = [*PAIRS[preset], "--pretrained", "none"]
    for key, value in flags.items():
        argv += [f"--{key.replace('_', '-')}", str(value)] if value is not None else []
    return argv + list(extra)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)

    def default(key):
        return f"(default: {CUDA_DEFAULTS[key]} on CUDA, {CPU_DEFAULTS[key]} on CPU)"
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="cuda or cpu (default: cuda when PyTorch sees a GPU)")
    p.add_argument("--preset", choices=PAIRS, help="whose train.py defaults (backbone, crop, mask grid) the step "
                   f"takes: the toy pair's or the paper's (gta -> cityscapes) {default('preset')}")
    p.add_argument("--backbone", choices=models.BACKBONES, help="ResNet (DeepLabV2) or MiT (DAFormer head) "
                   "(default: the preset's)")
    p.add_argument("--crop-size", type=int, help="square training crop (default: the preset's, as train.py: 2x with "
                   "--hrda); inference runs on crop x 2*crop, the Cityscapes aspect (512 -> 512x1024)")
    p.add_argument("--batch-size", type=int, default=2, help="source images and target images per step (default: 2)")
    p.add_argument("--dtype", choices=evaluation.DTYPES, help="autocast dtype (default: train.py's, bf16 on CUDA, "
                   "fp32 on CPU)")
    p.add_argument("--reps", type=int, help=f"timed repetitions per mode; median and min reported {default('reps')}")
    p.add_argument("--warmup", type=int, help=f"untimed iterations before timing {default('warmup')}")
    p.add_argument("--mfm-grid", type=int, help="Rebuilder grid g (default: train.py's for these flags)")
    p.add_argument("--aux", nargs="+", default=[], choices=["mic", "cmim", "mfm,mic"],
                   help="also time DACS + each auxiliary (train.py --aux NAME), e.g. --aux mic cmim")
    p.add_argument("--also-fp32", action="store_true", help="also time DACS + MFM without autocast (fp32, TF32)")
    p.add_argument("--hrda", action="store_true", help="every mode under train.py --recipe hrda (HRDA, DAFormer's "
                   "extras); crops 2x the default (1024 on CUDA); inference slides over crop x 2*crop (2048x1024)")
    p.add_argument("--peak-tflops", type=float, help="device rate for MFU = FLOPs/step / step time / rate "
                   "(default on CUDA: a measured 8192^2 matmul in the step's precision; none on CPU)")
    p.add_argument("--no-loader", action="store_true", help="skip the data-loader benchmark")
    p.add_argument("--flops-only", action="store_true", help="only FLOPs per step and per inference, counted on "
                   "the meta device in seconds (no timing, no memory)")
    p.add_argument("--loader-n", type=int, help=f"GTA-sized PNG pairs the loader reads {default('loader_n')}")
    p.add_argument("--loader-workers", type=int, help=f"DataLoader workers compared with 0 {default('loader_workers')}")
    p.add_argument("--json", default="bench.json", help="where to write the results (default: bench.json)")
    args = p.parse_args(argv)
    for key, value in (CUDA_DEFAULTS if args.device.startswith("cuda") else CPU_DEFAULTS).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.reps < 1 or args.warmup < 0:
        p.error("--reps must be >= 1 and --warmup >= 0")
    args.argv = sys.argv[1:] if argv is None else list(argv)
    resolved = mode_args(args, [])  # the settings train.py resolves for these flags, shown in the table
    for key in ("backbone", "crop_size", "mfm_grid", "dtype"):
        setattr(args, key, getattr(resolved, key))
    return args


def mode_args(args, extra):
    """train.py's resolved settings for one mode (`extra`: its flags, e.g. --no-mfm) of this benchmark."""
    return train.parse_args(train_argv(args.preset, *["--recipe", "hrda"] * args.hrda, *extra, backbone=args.backbone,
                                       crop_size=args.crop_size, batch_size=args.batch_size, mfm_grid=args.mfm_grid,
                                       device=args.device, dtype=args.dtype))


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


class MetaReads(TorchDispatchMode):
    """Lets a training step run on the meta device (tensors with shapes, no data: FLOPs of MiT-B5 HRDA in seconds,
    no memory): a read of a meta value (item, tolist) or a copy of one to the host is answered with zeros.
    event(what) hears each such read and each host<->device copy (the tests count host syncs with it)."""

    def event(self, what):
        pass

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs, name = kwargs or {}, func.overloadpacket.__name__
        if name == "_local_scalar_dense" and args[0].device.type != "cpu":
            self.event("read a value (item/float/bool)")
            return 0
        if name in ("_to_copy", "copy_"):
            src, dst = (args[1].device, args[0].device) if name == "copy_" else (
                args[0].device, torch.device(kwargs.get("device") or args[0].device))
            if src.type != dst.type:
                self.event(f"copy {src.type}->{dst.type}")
                if dst.type == "cpu":  # the host reads the result: zeros stand in for the data
                    return torch.zeros(args[0].shape, dtype=kwargs.get("dtype") or args[0].dtype)
        return func(*args, **kwargs)


def prepared_step(targs):
    """train.build_run for parsed train.py flags, random tensors of the training shapes (in train.py's memory
    layout) -> (run, step, counter): step() runs the next train.train_step, counter counts them."""
    device, b, c, k = torch.device(targs.device), targs.batch_size, targs.crop_size, data.SegDataset.num_classes
    runtime.set_seed(0)
    run = train.build_run(targs, k)
    layout = models.memory_format(device)
    x_src, x_tgt = (torch.rand(b, 3, c, c, device=device).contiguous(memory_format=layout) for _ in range(2))
    y_src, steps = torch.randint(0, k, (b, c, c), device=device), itertools.count()

    def step():
        train.train_step(run, x_src, y_src, x_tgt, next(steps), targs)
    return run, step, steps


def meta_step(targs):
    """prepared_step of parsed train.py flags on the meta device, fp32: shapes, no data, no GPU (run it under
    MetaReads)."""
    targs = argparse.Namespace(**dict(vars(targs), device="meta", dtype="fp32"))
    return prepared_step(targs)


def flops_only(args, modes):
    """--flops-only: FLOPs of one training step per mode and of one inference (1 x 3 x crop x 2 crop), counted on
    the meta device: no data, no timing, seconds even for MiT-B5 HRDA at 1024. Returns a markdown table."""
    rows, student = {}, None
    for name, extra in modes:
        run, step, _ = meta_step(mode_args(args, extra))
        with MetaReads(), count_flops() as counter:
            step()
        rows[name], student = counter.get_total_flops(), run.student
    with count_flops() as counter, torch.no_grad():
        student.eval()(torch.zeros(1, 3, args.crop_size, 2 * args.crop_size, device="meta"))
    command = shlex.join(["python", "bench.py", *args.argv])
    lines = [f"{args.backbone}{' HRDA' if args.hrda else ''}, {args.crop_size} px crops, batch {args.batch_size} + "
             f"{args.batch_size}: FLOPs counted on the meta device (`{command}`)",
             "", "| mode | GFLOP/step | vs DACS |", "|---|---|---|"]
    lines += [f"| {name} | {f / 1e9:,.1f} | {f / rows['dacs']:.3f}x |" for name, f in rows.items()]
    lines += ["", f"inference, 1x3x{args.crop_size}x{2 * args.crop_size}: {counter.get_total_flops() / 1e9:,.1f} GFLOP"]
    return "\n".join(lines)


def cuda_step_syncs(step):
    """Host syncs of one call of step() on CUDA, as torch.cuda.set_sync_debug_mode reports them."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            step()
        finally:
            torch.cuda.set_sync_debug_mode(0)
    return sum("synchroniz" in str(w.message) for w in caught)


def state_bytes(run, grads=True):
    """Bytes of the persistent training state: weights, buffers, AdamW moments and (with grads) gradients of
    student, teacher and the training-only heads (exact on any device; activations are not included)."""
    modules = [m for m in (run.student, run.teacher, *run.heads.values()) if m is not None]
    tensors = [t for m in modules for t in itertools.chain(m.parameters(), m.buffers())]
    tensors += [p.grad for m in modules for p in m.parameters() if grads and p.grad is not None]
    tensors += [v for s in run.optimizer.state.values() for v in s.values() if torch.is_tensor(v)]
    return sum({t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}.values())


def cpu_peak_bytes(fn):
    """Run fn() and return the most CPU memory it held at once, counting only what it allocated itself.
    PyTorch keeps no CPU allocator peak; the profiler records each allocation and free (pointer, size), and the
    running sum over fn's own allocations (frees of anything older left out) is what fn held."""
    from torch._C._profiler import _EventType  # the records behind torch.profiler's memory timeline
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    records, nodes = [], list(prof.profiler.kineto_results.experimental_event_tree())
    while nodes:
        node = nodes.pop()
        nodes += node.children
        if node.tag == _EventType.Allocation and node.extra_fields.device.type == "cpu":
            records.append((node.start_time_ns, node.extra_fields.ptr, node.extra_fields.alloc_size))
    held, peak, own = 0, 0, set()
    for _, ptr, size in sorted(records):
        if size > 0:
            own.add(ptr)
        elif ptr not in own:  # freed, but allocated before fn
            continue
        else:
            own.discard(ptr)
        held += size
        peak = max(peak, held)
    return peak


def bench_training(name, extra, args, device, export_dir):
    """Time train.train_step for one mode; export the student as train.py does -> (result dict, model.pt path)."""
    targs = mode_args(args, extra)
    fresh_memory(device)
    run, step, steps = prepared_step(targs)
    result = repeat(step, device, args.warmup, args.reps)
    result["state_bytes"] = state_bytes(run)
    result["host_syncs"] = cuda_step_syncs(step) if device.type == "cuda" else None  # CPU: tests/test_cuda_path.py
    with count_flops() as counter:  # one more step, after timing: the counters slow it down
        if device.type == "cuda":  # reset after warm-up: cuDNN's autotuning workspaces are not the step's
            torch.cuda.reset_peak_memory_stats(device)
            step()
            result["peak_bytes"] = torch.cuda.max_memory_allocated(device)
        else:  # what the step keeps from before it (zero_grad drops the gradients first) + what it allocates
            result["peak_bytes"] = state_bytes(run, grads=False) + cpu_peak_bytes(step)
    result["flops"] = counter.get_total_flops()
    result["images_per_s"] = 2 * args.batch_size / result["median_s"]  # source + target images
    result["hours_40k"] = 40_000 * result["median_s"] / 3600  # the paper's schedule
    path = Path(export_dir) / f"{name.replace('+', '-')}.pt"
    models.atomic_save(runtime.export(run, targs, next(steps)), path)
    return result, path


@torch.no_grad()
def bench_inference(paths, args, device):
    """Load each exported model.pt as eval.py's users do; time one forward of a (1, 3, crop, 2*crop) image,
    the models taking turns so that a change in machine load hits them alike. paths: {label: path}."""
    layout = models.memory_format(device)  # as eval.py
    loaded = {label: evaluation.model_from_checkpoint(path, device)[0].to(memory_format=layout)
              for label, path in paths.items()}
    x = torch.rand(1, 3, args.crop_size, 2 * args.crop_size, device=device).contiguous(memory_format=layout)
    autocast = evaluation.autocast(device, args.dtype)

    def forward(model):
        with autocast:
            model(x)
    for model in itertools.chain.from_iterable(itertools.repeat(list(loaded.values()), args.warmup)):
        forward(model)
    times = {label: [] for label in loaded}
    for _ in range(args.reps):
        for label, model in loaded.items():
            times[label].append(timed(lambda model=model: forward(model), device))
    return {label: dict(median_s=statistics.median(t), min_s=min(t), times_s=t,
                        params=models.count_parameters(loaded[label]),
                        shapes={k: list(v.shape) for k, v in loaded[label].state_dict().items()})
            for label, t in times.items()}


def write_pair(image_path, label_path, size, rng, palette=True):
    """An image and its label-id PNG of `size` (W, H) as the downloads encode them (GTA's labels: palette PNGs):
    smooth noise, which compresses and decodes like a photograph, and blocky ids from the Cityscapes table."""
    ids = np.array(list(data.CITYSCAPES_ID_TO_TRAINID), np.uint8)
    for path in (image_path, label_path):
        path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 256, (66, 120, 3), np.uint8)).resize(size, Image.BILINEAR).save(image_path)
    label = Image.fromarray(rng.choice(ids, (17, 30))).resize(size, Image.NEAREST)
    if palette:  # 'L' -> 'P', as the GTA download
        label.putpalette(np.array(data.PALETTE, np.uint8).ravel().tolist())
    label.save(label_path)


def bench_loader(workers, n, batch_size=2, root=None, crop_size=512):
    """Images/s of the training pipeline on n GTA-sized PNG pairs written here (or the first n of the GTA tree
    under `root`), for 0 and `workers` DataLoader processes; prints a table and returns {workers: images/s}."""
    result = {}
    with tempfile.TemporaryDirectory() as tmp:
        if root is None:
            root, rng = Path(tmp), np.random.default_rng(0)
            for i in tqdm(range(n), desc="writing GTA-sized PNG pairs"):
                write_pair(root / f"gta/images/{i + 1:05d}.png", root / f"gta/labels/{i + 1:05d}.png", (1914, 1052),
                           rng)
        ds = data.build_dataset("gta", root=root, crop_size=crop_size)
        print(f"training pipeline: GTA PNG -> {ds.eval_size[0]}x{ds.eval_size[1]} -> {crop_size} crop, batch "
              f"{batch_size}, {n} images (first batch untimed)\nworkers  images/s")
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


def matmul_flops_per_s(args, device):
    """The MFU denominator: --peak-tflops, or on CUDA the measured rate of an 8192^2 matmul in the step's
    precision (bf16/fp16, or fp32 with TF32 as train.set_seed enables it); None on CPU."""
    if args.peak_tflops:
        return args.peak_tflops * 1e12
    if device.type != "cuda":
        return None
    runtime.set_seed(0)
    a, b = (torch.randn(8192, 8192, device=device, dtype=evaluation.DTYPES[args.dtype] or torch.float32)
            for _ in range(2))
    return 2 * 8192 ** 3 / repeat(lambda: a @ b, device, 3, 10)["median_s"]


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
             "| mode | step ms | vs DACS | images/s | GFLOP/step | MFU | peak MiB | vs DACS | state MiB | host syncs "
             "| 40k iters |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in modes.items():
        syncs = r["host_syncs"] if r["host_syncs"] is not None else "n/a"
        mfu = f"{100 * r['mfu']:.1f}%" if r.get("mfu") else "n/a"
        lines.append(f"| {name} | {1000 * r['median_s']:.1f} ({1000 * r['min_s']:.1f}) | {ratio(r, 'median_s')} | "
                     f"{r['images_per_s']:.1f} | {r['flops'] / 1e9:,.1f} | {mfu} | {mib(r['peak_bytes'])} | "
                     f"{ratio(r, 'peak_bytes')} | {mib(r['state_bytes'])} | {syncs} | "
                     f"{r['hours_40k']:.1f} h |")
    legend = ("peak MiB: the most memory a training step holds (CUDA: torch.cuda.max_memory_allocated; CPU: the "
              "state it keeps plus the most its own allocations hold at once, from the profiler's records); state "
              "MiB: weights, buffers, gradients and AdamW moments of student, teacher and training-only heads; "
              "images/s counts source + target images; host syncs: per step (CUDA: torch.cuda.set_sync_debug_mode; "
              "CPU: n/a here, counted by tests/test_cuda_path.py on the meta device); MFU: "
              + (f"against a measured matmul rate of {report['matmul_tflops']:.0f} TFLOP/s"
                 if report.get("matmul_tflops") else "n/a on CPU") + ".")
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
    args = parse_args(argv)
    device = torch.device(args.device)
    modes = [("source-only", ["--source-only"]), ("dacs", ["--no-mfm"]), ("dacs+mfm", [])]
    modes += [("dacs+mfm fp32", ["--dtype", "fp32"])] * args.also_fp32
    modes += [(f"dacs+{aux}", ["--aux", aux]) for aux in args.aux if aux != "mfm"]
    if args.flops_only:
        table = flops_only(args, modes)
        print(table)
        return table
    report = dict(device=torch.cuda.get_device_name(device) if device.type == "cuda"
                  else f"{cpu_name()} ({torch.get_num_threads()} threads)",
                  torch=torch.__version__, command=shlex.join(["python", "bench.py", *args.argv]), settings=vars(args),
                  modes={}, inference={})
    peak = matmul_flops_per_s(args, device)
    report["matmul_tflops"] = peak / 1e12 if peak else None
    with tempfile.TemporaryDirectory() as export_dir:
        exported = {}
        for name, extra in modes:
            print(f"timing {name} ...", file=sys.stderr)
            result, exported[name] = bench_training(name, extra, args, device, export_dir)
            result["mfu"] = result["flops"] / result["median_s"] / peak if peak and "fp32" not in name else None
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
