"""The toy tables: toy-night val mIoU of the final model per method, mean ± std over seeds, per class.

Runs train.py once per (method, seed) with the toy defaults (CPU), skipping runs that already finished (so an
interrupted table continues where it stopped), then prints a markdown table from each run's final evaluation.
Adaptation: toy-day (labelled) -> toy-night. Semi-supervised (--labeled N): N labelled toy-night train images,
all of them unlabelled; there "source-only" is the supervised-only baseline and "dacs" plain self-training.

    python toy_table.py                                   # source-only, DACS, DACS + MFM; seeds 0 1 2
    python toy_table.py --methods source-only dacs dacs+mfm dacs+mic dacs+cmim dacs+mfm+mic  # and the comparisons
    python toy_table.py --labeled 20                      # semi-supervised: supervised-only, self-training, +MFM, +CMIM
    python toy_table.py --out runs/toy-table-mit --train-args "--backbone mit_b0"   # MiT-B0 + DAFormer head
"""
import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np

import data

METHODS = {"source-only": ["--source-only"], "dacs": ["--no-mfm"], "dacs+mfm": [], "dacs+mic": ["--aux", "mic"],
           "dacs+cmim": ["--aux", "cmim"], "dacs+mfm+mic": ["--aux", "mfm,mic"]}
DEFAULT_METHODS = ["source-only", "dacs", "dacs+mfm"]
SEMI_METHODS = ["source-only", "dacs", "dacs+mfm", "dacs+cmim"]
SEMI_NAMES = {"source-only": "supervised-only", "dacs": "self-training"}  # what the rows mean with --labeled
SEMI_NAMES.update({m: m.replace("dacs+", "self-training + ") for m in METHODS if m.startswith("dacs+")})


def final_eval(run_dir):
    """The last evaluation record of a finished run, or None."""
    log = Path(run_dir) / "log.jsonl"
    if not log.exists():
        return None
    evals = [r for r in map(json.loads, log.read_text().splitlines()) if "eval" in r]
    config = json.loads((Path(run_dir) / "config.json").read_text())["config"]
    if not evals or evals[-1]["step"] != config["iters"]:
        return None
    result = evals[-1]["eval"]  # the log is strict JSON: the IoU of a class absent everywhere is null
    return dict(result, iou=[float("nan") if v is None else v for v in result["iou"]])


def table(results, methods, seeds, names=None):
    """Markdown: one row per method, mIoU mean ± sample std over seeds, then the per-class IoU averaged over
    the seeds in which the class occurs (n/a: in none of them)."""
    present = [c for c in range(len(data.CLASS_NAMES))
               if any(not np.isnan(r["iou"][c]) for runs in results.values() for r in runs)]
    head = "| method | mIoU | " + " | ".join(data.CLASS_NAMES[c] for c in present) + " |"
    lines = [head, "|" + "---|" * (2 + len(present))]
    for method in methods:
        miou = np.array([r["mIoU"] for r in results[method]])
        ious = np.array([r["iou"] for r in results[method]], float)[:, present]
        cells = [f"{np.nanmean(col):.1f}" if not np.isnan(col).all() else "n/a" for col in ious.T]
        std = miou.std(ddof=1) if len(miou) > 1 else 0.0
        name = (names or {}).get(method, method)
        lines.append(f"| {name} | {miou.mean():.1f} ± {std:.1f} | " + " | ".join(cells) + " |")
    lines.append(f"\ntoy-night val mIoU (%), {len(seeds)} seeds ({', '.join(map(str, seeds))}): mean ± sample std; "
                 "per-class IoU averaged over the seeds.")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", nargs="+", choices=list(METHODS),
                   help=f"methods to run (default: {' '.join(DEFAULT_METHODS)}; with --labeled: "
                   f"{' '.join(SEMI_METHODS)})")
    p.add_argument("--labeled", type=int, help="semi-supervised: N labelled toy-night images (default: adaptation)")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="seeds (default: 0 1 2)")
    p.add_argument("--out", help="parent folder of the runs (default: runs/toy-table, runs/toy-table-semi)")
    p.add_argument("--train-args", default="", help="extra train.py flags for every run, one string")
    args = p.parse_args(argv)
    args.methods = args.methods or (SEMI_METHODS if args.labeled else DEFAULT_METHODS)
    args.out = args.out or ("runs/toy-table-semi" if args.labeled else "runs/toy-table")
    pair = ["--source", "toy-day", "--target", "toy-night"]
    if args.labeled:
        pair = ["--source", "toy-night", "--target", "toy-night", "--labeled", str(args.labeled)]
    results = {m: [] for m in args.methods}
    for method in args.methods:
        for seed in args.seeds:
            run_dir = Path(args.out).resolve() / f"{method.replace('+', '-')}-s{seed}"  # train.py runs elsewhere
            if final_eval(run_dir) is None:
                resume = ["--resume"] if (run_dir / "ckpt.pt").exists() else []
                cmd = [sys.executable, "train.py", *pair, "--seed", str(seed), "--out", str(run_dir), *METHODS[method],
                       *args.train_args.split(), *resume]
                print("$", " ".join(cmd[1:]), flush=True)
                try:
                    subprocess.run(cmd, check=True, cwd=Path(__file__).parent)
                except (subprocess.CalledProcessError, KeyboardInterrupt) as err:
                    why = f"exit code {err.returncode}" if isinstance(err, subprocess.CalledProcessError) else "Ctrl-C"
                    sys.exit(f"error: {method} seed {seed} stopped ({why}; train.py's message is above). Finished "
                             f"runs are kept in {args.out}: the same command continues the table.")
            results[method].append(final_eval(run_dir))
    print(table(results, args.methods, args.seeds, SEMI_NAMES if args.labeled else None))


if __name__ == "__main__":
    main()
