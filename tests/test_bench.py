"""bench.py end to end in-process at the tiniest settings: the JSON holds every mode and the exported models match.
Wall-clock numbers are only checked for being positive, never compared."""
import json

import bench


def test_bench_tiny(tmp_path, capsys):
    out = tmp_path / "bench.json"
    bench.main(["--device", "cpu", "--backbone", "resnet18", "--crop-size", "32", "--batch-size", "1", "--reps", "1",
                "--warmup", "0", "--no-loader", "--json", str(out)])
    report = json.loads(out.read_text())
    assert set(report["modes"]) == {"source-only", "dacs", "dacs+mfm"}
    for mode in report["modes"].values():
        assert mode["median_s"] > 0 and mode["min_s"] > 0 and mode["flops"] > 0 and mode["state_bytes"] > 0
        assert mode["peak_bytes"] is None  # no CPU allocator peak: reported as n/a, not invented
    modes = report["modes"]
    assert modes["dacs+mfm"]["flops"] > modes["dacs"]["flops"] > modes["source-only"]["flops"]
    assert modes["dacs+mfm"]["state_bytes"] > modes["dacs"]["state_bytes"]  # the Rebuilder and its AdamW state
    dacs, mfm = report["inference"]["trained with DACS"], report["inference"]["trained with DACS + MFM"]
    assert dacs["params"] == mfm["params"] > 0 and report["checks"]["same_architecture"]
    assert dacs["median_s"] > 0 and mfm["median_s"] > 0
    assert "| dacs+mfm |" in capsys.readouterr().out and "| dacs+mfm |" in report["table"]
