"""tools/gpu_check.py, the one command a lent GPU runs, proven on CPU at tiny sizes: every part runs and lands in the
report (markdown + JSON) with the device named. Figures are only checked for being there, never compared."""
import json
import sys
from pathlib import Path

import train

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
import gpu_check  # noqa: E402


def test_gpu_check_runs_every_part_at_tiny_size_on_cpu(tmp_path, capsys):
    report = gpu_check.main(["--tiny", "--out", str(tmp_path)])
    parts = report["parts"]
    assert set(parts) == {"tests", "bench", "train", "compile"}
    assert not [name for name, part in parts.items() if "error" in part], parts
    assert parts["tests"]["returncode"] == 0 and "skipped" in parts["tests"]["summary"]  # no GPU here
    assert set(parts["bench"]) == {"resnet18", "mit_b0", "mit_b0 HRDA"}
    for name, run in parts["bench"].items():
        hrda = name.endswith("HRDA")
        assert set(run["modes"]) == {"source-only", "dacs", "dacs+mfm", *(["dacs+mic", "dacs+mfm,mic"] if hrda else
                                                                         ["dacs+mfm fp32"])}
        assert all(mode["host_syncs"] is None for mode in run["modes"].values())  # CUDA only (test_cuda_path)
    assert parts["train"]["returncode"] == 0 and parts["train"]["step_s"] > 0
    assert parts["train"]["eval_mIoU"] is not None and parts["train"]["loader_images_per_s"]
    assert set(parts["compile"]) == {"eager", "compile (eager)"}
    assert all(mode["step_ms"] > 0 for mode in parts["compile"].values())
    saved = json.loads((tmp_path / "gpu_check.json").read_text())
    assert saved["device"] == report["device"] and "(--tiny)" in saved["device"]
    md = (tmp_path / "gpu_check.md").read_text()
    for heading in ("# GPU check", "## CUDA tests", "## bench.py, resnet18", "## bench.py, mit_b0 HRDA",
                    "## train.py on official-layout data", "## --compile against eager"):
        assert heading in md, heading


def test_the_second_run_asks_toy_table_for_flags_train_py_accepts(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(gpu_check.subprocess, "run", lambda argv, cwd: calls.append(argv) or
                        gpu_check.subprocess.CompletedProcess(argv, 0))
    assert gpu_check.main(["--toy-effect", "--out", str(tmp_path)]) == 0
    argv = calls[0]
    assert argv[1].endswith("toy_table.py") and argv[argv.index("--methods") + 1:][:2] == ["dacs", "dacs+mfm"]
    flags = argv[argv.index("--train-args") + 1].split()
    args = train.parse_args(["--source", "toy-day", "--target", "toy-night", *flags[:-2], "--device", "cpu"])
    assert (args.backbone, args.crop_size, args.resize_scale, args.iters) == ("mit_b0", 256, 4.0, 2000)
    assert flags[-2:] == ["--device", "cuda"]
