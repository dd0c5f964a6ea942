"""bench.py end to end in-process at the tiniest settings: the JSON holds every mode and the exported models match.
Wall-clock numbers are only checked for being positive, never compared."""
import json

import pytest
import torch

import bench
import train


def test_cpu_peak_bytes_is_what_the_function_holds_at_once():
    older = [torch.ones(2_000_000)]  # 8 MB allocated before fn: neither it nor its release is fn's

    def fn():
        older.pop()
        a = torch.ones(1_000_000)  # 4 MB
        b = torch.ones(500_000)  # + 2 MB while a is alive
        del a, b
        return torch.ones(250_000)  # 1 MB, after both were freed
    assert bench.cpu_peak_bytes(fn) == 6_000_000
    kept = []  # what an earlier measured call still holds does not count in the next one (gpu_check measures many)
    bench.cpu_peak_bytes(lambda: kept.append(torch.ones(25_000_000)))
    older.append(torch.ones(2_000_000))
    assert bench.cpu_peak_bytes(fn) == 6_000_000


@pytest.mark.parametrize("backbone", ["resnet18", "mit_b0"])
def test_bench_tiny(tmp_path, capsys, backbone):
    out = tmp_path / "bench.json"
    bench.main(["--device", "cpu", "--backbone", backbone, "--crop-size", "32", "--batch-size", "1", "--reps", "1",
                "--warmup", "0", "--no-loader", "--json", str(out)])
    report = json.loads(out.read_text())
    assert set(report["modes"]) == {"source-only", "dacs", "dacs+mfm"}
    for mode in report["modes"].values():
        assert mode["median_s"] > 0 and mode["min_s"] > 0 and mode["flops"] > 0 and mode["state_bytes"] > 0
        assert mode["peak_bytes"] >= mode["state_bytes"]  # the step re-creates every gradient on top of the state
    modes = report["modes"]
    assert modes["dacs+mfm"]["flops"] > modes["dacs"]["flops"] > modes["source-only"]["flops"]
    assert modes["dacs+mfm"]["state_bytes"] > modes["dacs"]["state_bytes"]  # the Rebuilder and its AdamW state
    dacs, mfm = report["inference"]["trained with DACS"], report["inference"]["trained with DACS + MFM"]
    assert dacs["params"] == mfm["params"] > 0 and report["checks"]["same_architecture"]
    assert dacs["median_s"] > 0 and mfm["median_s"] > 0
    assert "| dacs+mfm |" in capsys.readouterr().out and "| dacs+mfm |" in report["table"]


@pytest.mark.parametrize("groups", [1, 8])
def test_conv_backward_flops_count_groups(groups):
    """A conv's backward = grad input + grad weight, each as many multiply-adds as the forward: 2 x forward."""
    conv = torch.nn.Conv2d(8, 16, 3, padding=1, groups=groups)
    x = torch.rand(2, 8, 10, 10, requires_grad=True)
    forward = 2 * (2 * 16 * 10 * 10) * (8 // groups) * 9  # 2 FLOPs per multiply-add
    with bench.count_flops() as counter:
        conv(x).sum().backward()
    assert counter.get_total_flops() == 3 * forward


@pytest.mark.parametrize("bench_flags, train_flags, grid, crop", [
    ([], ["--source", "toy-day", "--target", "toy-night"], 4, 64),  # the toy's step (bench timed grid 2 once)
    (["--preset", "paper"], ["--source", "gta", "--target", "cityscapes"], 16, 512),  # DeepLabV2 ResNetV1c-101
    (["--preset", "paper", "--backbone", "mit_b5"], ["--source", "gta", "--target", "cityscapes", "--backbone",
                                                     "mit_b5"], 16, 512),
    (["--preset", "paper", "--backbone", "mit_b5", "--hrda"], ["--source", "gta", "--target", "cityscapes",
                                                              "--backbone", "mit_b5", "--recipe", "hrda"], 16, 1024)])
def test_bench_times_the_step_train_py_runs_with_the_same_flags(bench_flags, train_flags, grid, crop):
    """bench.py's DACS + MFM step and train.py's, both built on the meta device: the same crop and mask grid."""
    timed = bench.mode_args(bench.parse_args(["--device", "cpu", *bench_flags]), [])
    trained = train.parse_args([*train_flags, "--pretrained", "none", "--device", "cpu"])
    for targs in (timed, trained):
        run, _, _ = bench.meta_step(targs)
        assert (run.heads["rebuilder"].grid, targs.crop_size, targs.backbone) == (grid, crop, trained.backbone)
