"""Everything only a GPU can show, in one command: the prepared check for a lent CUDA machine (one H200: about
6-8 minutes), and at tiny sizes on CPU (--tiny, about a minute) so that CI proves the script works first.

    python tools/gpu_check.py                # on the GPU: writes gpu_check/gpu_check.md and .json (device named)
    python tools/gpu_check.py --tiny         # CPU, tiny sizes: the same parts, the same report
    python tools/gpu_check.py --toy-effect   # the second run for what is left of a lease: DACS vs DACS + MFM on the
                                         # toy at 256 px crops (MiT-B0, 2 seeds), reported as it comes out

Parts (each recorded even if another one fails):
1. tests: the suite's CUDA-marked tests (`pytest -m cuda`; skipped on CPU);
2. bench: bench.py on DeepLabV2-ResNetV1c-101 and MiT-B5 at 512 crops (source-only, DACS, DACS + MFM in bf16 and
   fp32): step ms, images/s, peak memory after warm-up, MFU against the measured matmul rate, host syncs per step,
   projected 40k-iteration time; HRDA at 1024 crops on MiT-B5 (with and without MFM);
3. train: train.py for 200 iterations (default workers) on GTA/Cityscapes trees of the real image sizes written
   on the spot, one evaluation; the loader's images/s against what the step consumes;
4. compile: `--compile` (inductor) against eager on DeepLabV2 DACS + MFM: compile time and step ms.
"""
import argparse
import json
import shlex
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]  # the project's flat modules
sys.path.insert(0, str(ROOT))
import bench  # noqa: E402
import train  # noqa: E402

FULL = dict(crop=512, hrda_crop=1024, bench_backbones=("resnet101-v1c", "mit_b5"), reps=6, warmup=3, iters=200,
            gta=(1914, 1052), cityscapes=(2048, 1024), images=32, compile_backbone="resnet101-v1c",
            compile_backend="inductor", device="cuda", dtype="bf16")
TINY = dict(crop=32, hrda_crop=64, bench_backbones=("resnet18", "mit_b0"), reps=1, warmup=0, iters=4,
            gta=(96, 54), cityscapes=(128, 64), images=4, compile_backbone="resnet18",
            compile_backend="eager", device="cpu", dtype="fp32")  # inductor's C++ build is too slow for CI's CPU


TOY_EFFECT = ("--backbone mit_b0 --crop-size 256 --resize-scale 4 --iters 2000 --warmup 100 --eval-every 2000 "
              "--ckpt-every 500 --vis-every 0 --log-every 100 --device cuda")


def write_tree(root, s):
    """GTA and Cityscapes (train/val, two cities) in their official layouts, at the real sizes (or --tiny ones)."""
    rng = np.random.default_rng(0)
    for i in range(1, s["images"] + 1):
        bench.write_pair(root / f"gta/images/{i:05d}.png", root / f"gta/labels/{i:05d}.png", s["gta"], rng)
    for split, n in (("train", s["images"]), ("val", 2)):
        for i in range(n):
            city = ("aachen", "bonn")[i % 2]
            stem = f"{city}/{city}_{i:06d}_000019"
            bench.write_pair(root / f"cityscapes/leftImg8bit/{split}/{stem}_leftImg8bit.png",
                             root / f"cityscapes/gtFine/{split}/{stem}_gtFine_labelIds.png", s["cityscapes"], rng,
                             palette=False)


def part_tests(s, out):
    res = subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "cuda", "tests"], cwd=ROOT, text=True,
                         capture_output=True, timeout=600)
    summary = (res.stdout.strip().splitlines() or ["(no output)"])[-1]
    return dict(returncode=res.returncode, summary=summary, tail=res.stdout[-3000:] + res.stderr[-2000:])


def part_bench(s, out):
    runs = {}
    common = ["--device", s["device"], "--dtype", s["dtype"], "--reps", str(s["reps"]), "--warmup", str(s["warmup"]),
              "--no-loader"]
    for backbone in s["bench_backbones"]:
        path = out / f"bench_{backbone}.json"
        bench.main([*common, "--backbone", backbone, "--crop-size", str(s["crop"]), "--also-fp32", "--json", str(path)])
        runs[backbone] = json.loads(path.read_text())
    backbone = s["bench_backbones"][-1]  # HRDA, MIC(HRDA), each + MFM, at HRDA's crop; inference on 2048x1024
    path = out / f"bench_{backbone}_hrda.json"
    bench.main([*common, "--backbone", backbone, "--hrda", "--crop-size", str(s["hrda_crop"]), "--aux", "mic",
                "mfm,mic", "--json", str(path)])
    runs[f"{backbone} HRDA"] = json.loads(path.read_text())
    return runs


def part_train(s, out):
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        write_tree(root / "data", s)
        argv = bench.train_argv("paper", data_root=root / "data", crop_size=s["crop"], iters=s["iters"],
                                eval_every=s["iters"], ckpt_every=s["iters"], vis_every=0,
                                log_every=max(1, s["iters"] // 4), device=s["device"], out=root / "run",
                                backbone=s["compile_backbone"] if s["device"] == "cpu" else None)
        start = time.perf_counter()
        res = subprocess.run([sys.executable, str(ROOT / "train.py"), *argv], cwd=ROOT, text=True, capture_output=True,
                             timeout=900)
        wall = time.perf_counter() - start
        log = [json.loads(line) for line in (root / "run/log.jsonl").read_text().splitlines()] \
            if (root / "run/log.jsonl").exists() else []
        steps = [r for r in log if "sec_per_iter" in r]
        step_s = steps[-1]["sec_per_iter"] if steps else None
        loader = bench.bench_loader(4 if s["device"] == "cuda" else 0, s["images"], root=root / "data",
                                    crop_size=s["crop"])
    evaluation = next((r["eval"] for r in log if "eval" in r), None)
    return dict(returncode=res.returncode, command="python train.py " + shlex.join(argv), wall_s=wall,
                step_s=step_s, step_appetite_images_per_s=4 / step_s if step_s else None,
                loader_images_per_s=loader, eval_mIoU=evaluation["mIoU"] if evaluation else None,
                tail=(res.stdout + res.stderr)[-3000:])


def part_compile(s, out):
    result = {}
    for backend in (None, s["compile_backend"]):
        args = train.parse_args(bench.train_argv("paper", backbone=s["compile_backbone"], crop_size=s["crop"],
                                                 device=s["device"], dtype=s["dtype"], compile=backend))
        device, (_, step, _) = torch.device(args.device), bench.prepared_step(args)
        first = bench.timed(step, device)  # eager: cuDNN autotuning; compiled: tracing + code generation
        timing = bench.repeat(step, device, s["warmup"], s["reps"])
        result[f"compile ({backend})" if backend else "eager"] = dict(first_step_s=first,
                                                                        step_ms=1000 * timing["median_s"])
    return result


def markdown(report):
    lines = [f"# GPU check: {report['device']}", "", f"torch {report['torch']}, `{report['command']}`, "
             f"{report['wall_s']:.0f} s in all.", ""]
    parts = report["parts"]
    if "tests" in parts and "error" not in parts["tests"]:
        lines += ["## CUDA tests", "", f"`pytest -m cuda`: {parts['tests']['summary']}", ""]
    for backbone, run in {} if "error" in parts.get("bench", {}) else parts.get("bench", {}).items():
        lines += [f"## bench.py, {backbone}", "", run["table"], ""]
    if "train" in parts and "error" not in parts["train"]:
        t = parts["train"]
        rates = ", ".join(f"{w} workers {v:.1f}" for w, v in t["loader_images_per_s"].items())
        lines += ["## train.py on official-layout data of the real sizes", "", f"`{t['command']}`", "",
                  f"exit {t['returncode']}, {t['wall_s']:.0f} s; step {t['step_s']} s "
                  f"(consumes {t['step_appetite_images_per_s'] or 0:.1f} images/s); loader (GTA-sized PNGs): "
                  f"{rates} images/s; evaluation mIoU {t['eval_mIoU']} (random data, from scratch: a smoke test)", ""]
    if "compile" in parts and "error" not in parts["compile"]:
        lines += ["## --compile against eager (DeepLabV2 DACS + MFM)", "", "| mode | first step s | step ms |",
                  "|---|---|---|"]
        lines += [f"| {k} | {v['first_step_s']:.1f} | {v['step_ms']:.1f} |" for k, v in parts["compile"].items()]
        lines.append("")
    for name, part in parts.items():
        if "error" in part:
            lines += [f"## {name}: failed", "", "```", part["error"][-2000:], "```", ""]
    return "\n".join(lines)


def toy_effect(out):
    """DACS vs DACS + MFM on the toy scaled up: MiT-B0, 256 px crops (toy scenes drawn at 128x64, resized 4x),
    2000 iterations, seeds 0 and 1, through toy_table.py, which prints the table (about 5 minutes on an H200)."""
    argv = [sys.executable, str(ROOT / "toy_table.py"), "--out", str(out / "toy-effect"), "--seeds", "0", "1",
            "--methods", "dacs", "dacs+mfm", "--train-args", TOY_EFFECT]
    return subprocess.run(argv, cwd=ROOT).returncode


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="CPU at tiny sizes: proves the script before a GPU run")
    p.add_argument("--toy-effect", action="store_true", help="the second run: MFM's effect on the scaled toy")
    p.add_argument("--parts", nargs="+", default=["tests", "bench", "train", "compile"],
                   choices=["tests", "bench", "train", "compile"], help="which parts (default: all)")
    p.add_argument("--out", default="gpu_check", help="folder for gpu_check.md / .json (default: gpu_check)")
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.toy_effect:
        return toy_effect(out)
    s = TINY if args.tiny else FULL
    if s["device"] == "cuda" and not torch.cuda.is_available():
        sys.exit("error: no CUDA GPU here; run with --tiny on CPU.")
    device = torch.cuda.get_device_name() if s["device"] == "cuda" else f"{bench.cpu_name()} (--tiny)"
    report = dict(device=device, torch=torch.__version__, settings=s, parts={},
                  command=shlex.join(["python", "tools/gpu_check.py", *(argv if argv is not None else sys.argv[1:])]))
    start = time.perf_counter()
    for name in args.parts:
        print(f"gpu_check: {name} ...", file=sys.stderr, flush=True)
        try:
            report["parts"][name] = globals()[f"part_{name}"](s, out)
        except Exception:  # one broken part must not cost the others (the lease is short)
            report["parts"][name] = dict(error=traceback.format_exc())
        report["wall_s"] = time.perf_counter() - start
        (out / "gpu_check.json").write_text(json.dumps(report, indent=2, default=str))
        (out / "gpu_check.md").write_text(markdown(report))
    print(markdown(report))
    print(f"wrote {out / 'gpu_check.md'} and {out / 'gpu_check.json'}", file=sys.stderr)
    return report


if __name__ == "__main__":
    main()
