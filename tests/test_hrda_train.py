"""HRDA through train.py and eval.py (hrda.py's pieces are pinned in test_hrda.py): every HRDA recipe runs from
an official-layout tree, the exported model.pt is an HRDA network without Rebuilder that eval.py rebuilds, the
target crop's place in its image reaches HRDA's side margins, and the flags that cannot work are named."""
import json

import pytest
import torch

import baselines
import bench
import data
import eval as evaluation
import hrda
import runtime
import train
from conftest import meta_step_syncs

SMALL = ["--source", "gta", "--target", "cityscapes", "--recipe", "hrda", "--resize-scale", "0.125", "--crop-size",
         "64", "--pretrained", "none", "--mfm-dim", "64", "--mfm-heads", "4", "--iters", "2", "--eval-every", "2",
         "--vis-every", "2", "--log-every", "1"]  # GTA 160x90, Cityscapes 128x64: 64-px crops, 32-px detail views


@pytest.mark.parametrize("flags", [["--backbone", "mit_b0"], ["--backbone", "mit_b0", "--aux", "mfm,mic"],
                                   ["--backbone", "resnet18", "--no-mfm"], ["--backbone", "resnet18", "--aux", "mic"]],
                         ids=lambda f: " ".join(f))
def test_every_hrda_recipe_trains_exports_and_evaluates(fake_data, tmp_path, flags, capsys):
    out = tmp_path / "run"
    result = train.main([*SMALL, *flags, "--data-root", str(fake_data), "--out", str(out)])
    assert 0 <= result["mIoU"] <= 100 and (out / "vis/step_000002.png").exists()
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    losses = {k for r in log for k in r if k.startswith("loss_")}
    assert {"loss_src", "loss_fd", "loss_mix"} <= losses  # the DAFormer extras come with the recipe
    assert ("loss_mfm" in losses) == ("--no-mfm" not in flags and flags[-1] != "mic")
    exported = torch.load(out / "model.pt", weights_only=True)
    assert exported["model_config"]["hrda"]["crop_size"] == 64
    assert any(k.startswith("attention.") for k in exported["model"])
    assert not any(k.startswith(("rebuilder", "teacher")) for k in exported["model"])
    model, _ = evaluation.model_from_checkpoint(out / "model.pt")
    assert isinstance(model, hrda.HRDA)
    evaluation.main(["--ckpt", str(out / "model.pt"), "--target", "cityscapes", "--data-root", str(fake_data),
                     "--workers", "0", "--device", "cpu"])  # at the training resolution (--resize-scale)
    again = json.loads((out / "metrics.json").read_text())
    assert again["mIoU"] == pytest.approx(result["mIoU"], abs=0.01)  # eval.py's model is the trained one
    with pytest.raises(SystemExit, match="--recipe"):  # a checkpoint of another recipe is refused
        train.main([*SMALL, *flags, "--data-root", str(fake_data), "--out", str(out), "--resume", "--recipe",
                    "daformer", "--crop-size", "32"])


def test_hrda_defaults_and_the_default_out_name():
    args = train.parse_args(["--source", "gta", "--target", "cityscapes", "--recipe", "hrda", "--backbone", "mit_b5",
                             "--aux", "mfm,mic", "--device", "cpu"])
    assert (args.crop_size, args.resize_scale, args.mfm_grid, args.mic_block) == (1024, 2.0, 16, 64)  # HRDA.md §4
    assert (args.rcs, args.fd, args.pl_crop, args.ema) == (True, True, True, 0.999)
    assert args.out == "runs/gta-cityscapes-mit_b5-hrda-dacs-mfm-mic-s0"
    toy = train.parse_args(["--source", "toy-day", "--target", "toy-night", "--recipe", "hrda"])
    assert (toy.crop_size, toy.resize_scale, toy.out) == (128, 2.0, "runs/toy-day-toy-night-hrda-dacs-mfm-s0")
    plain = train.parse_args(["--source", "toy-day", "--target", "toy-night"])
    assert plain.out == "runs/toy-day-toy-night-dacs-mfm-s0" and plain.resize_scale == 1.0  # the demo's folder
    named = [train.parse_args(["--source", "gta", "--target", "cityscapes", "--device", "cpu", *f]).out
             for f in ([], ["--backbone", "mit_b5", "--recipe", "daformer"], ["--recipe", "hrda"])]
    assert len(set(named)) == 3  # the README's paper commands, one after another, each get their own folder


@pytest.mark.parametrize("flags, needle", [(["--crop-size", "100"], "--crop-size 100 with --recipe hrda"),
                                           (["--aux", "cmim"], "--aux cmim"),
                                           (["--source", "toy-night", "--labeled", "5"], "--labeled")])
def test_hrda_combinations_that_cannot_work_are_named(flags, needle):
    argv = ["--source", "toy-day", "--target", "toy-night", "--recipe", "hrda", *flags]
    with pytest.raises(SystemExit, match=needle):
        train.main(argv)


def test_a_crop_larger_than_the_resized_image_is_named(fake_data, tmp_path):
    with pytest.raises(SystemExit, match="crop_size 128 is larger than the resized gta image 160x90"):
        train.main([*SMALL, "--crop-size", "128", "--data-root", str(fake_data), "--out", str(tmp_path / "r")])


def test_target_crops_know_where_they_lie_in_their_image():
    ds = data.build_dataset("toy-night", crop_size=64, resize=(256, 128), frame=True)
    for k in range(6):
        img, _, (x0, flipped, width) = ds[k]
        full, _ = ds.load(ds_index(ds, k))
        full = data._to_tensor(data._resize(full, (256, 128), data.Image.BILINEAR))
        y = next(y for y in range(65) if torch.equal(crop(full, y, x0, flipped), img))  # the crop is found there
        assert width == 256 and 0 <= y <= 64


def ds_index(ds, k):  # the image index the dataset draws for counter k (no RCS): its epoch's permutation
    n = len(ds)
    return int(data.np.random.default_rng((ds.seed, k // n, 1)).permutation(n)[k % n])


def crop(full, y, x0, flipped):
    c = full[:, y:y + 64, x0:x0 + 64]
    return c.flip(-1) if flipped else c


def test_hrda_side_margins_follow_the_crop_into_its_image():
    pl = torch.zeros(3, 64, 64, dtype=torch.long)
    frame = torch.tensor([[0, 0, 256], [192, 0, 256], [192, 1, 256]])  # left edge; right edge; right edge flipped
    w = baselines.pseudo_label_crop(0.5, pl, side=baselines.CROP_SIDE, frame=frame)
    margin, top, bottom = round(15 * 64 / 512), round(15 * 64 / 512), round(120 * 64 / 512)  # 2, 2, 15 rows/cols
    rows = slice(top, 64 - bottom)
    assert (w[0, rows, :margin] == 0).all() and (w[0, rows, margin:] == 0.5).all()
    assert (w[1, rows, 64 - margin:] == 0).all() and (w[1, rows, :64 - margin] == 0.5).all()
    assert (w[2, rows, :margin] == 0).all() and (w[2, rows, margin:] == 0.5).all()  # mirrored: the left columns
    assert torch.equal(baselines.pseudo_label_crop(0.5, pl, side=baselines.CROP_SIDE), baselines.pseudo_label_crop(
        0.5, pl))  # without a frame: DAFormer's rows only
    at_1024 = baselines.pseudo_label_crop(1.0, torch.zeros(1, 1024, 1024, dtype=torch.long), side=baselines.CROP_SIDE,
                                          frame=torch.tensor([[0, 0, 2048]]))
    assert at_1024[0, 500].eq(0).sum() == 30 and at_1024[0, :, 500].eq(0).sum() == 30 + 240  # HRDA's margins


def test_hrda_step_waits_for_the_gpu_once():
    counts = meta_step_syncs(["--source", "gta", "--target", "cityscapes", "--recipe", "hrda", "--backbone",
                                    "mit_b0", "--crop-size", "64", "--pretrained", "none", "--aux", "mfm,mic"])
    assert counts == {"copy meta->cpu": 1.0}


def test_flops_only_counts_every_hrda_mode_on_the_meta_device(capsys):
    """bench.py --flops-only (the README's HRDA cost table at MiT-B5 1024 comes from it): every mode is counted
    and MFM adds the Rebuilder's work on both views to an HRDA step, the test image slides over 3 windows."""
    table = bench.main(["--flops-only", "--device", "cpu", "--hrda", "--backbone", "mit_b0", "--crop-size", "64",
                        "--aux", "mic", "mfm,mic", "--batch-size", "1"])
    rows = {line.split("|")[1].strip(): float(line.split("|")[2].replace(",", "")) for line in table.splitlines()
            if line.startswith(("| dacs", "| source"))}
    assert set(rows) == {"source-only", "dacs", "dacs+mfm", "dacs+mic", "dacs+mfm,mic"}
    assert rows["source-only"] < rows["dacs"] < rows["dacs+mfm"] < rows["dacs+mfm,mic"]
    assert rows["dacs"] < rows["dacs+mic"] < rows["dacs+mfm,mic"]
    assert "inference, 1x3x64x128:" in table and table == capsys.readouterr().out.strip()


def test_the_step_gives_hrda_margins_the_target_crops_frame(monkeypatch):
    args = train.parse_args(["--source", "toy-day", "--target", "toy-night", "--recipe", "hrda", "--crop-size", "64",
                             "--mfm-dim", "64", "--mfm-heads", "4", "--no-mfm", "--device", "cpu"])
    runtime.set_seed(0)
    run = train.build_run(args, 19)
    seen, crop = [], baselines.pseudo_label_crop
    monkeypatch.setattr(baselines, "pseudo_label_crop", lambda *a, **k: seen.append(k) or crop(*a, **k))
    frame = torch.tensor([[0, 0, 256], [192, 1, 256]])
    x = torch.rand(2, 3, 64, 64)
    train.train_step(run, x, torch.randint(0, 19, (2, 64, 64)), x, 0, args, frame)
    assert seen[0]["side"] == baselines.CROP_SIDE and seen[0]["frame"] is frame
