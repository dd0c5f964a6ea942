"""toy_table.py: skips finished runs, resumes unfinished ones, and aggregates the final evaluations correctly.
train.py itself is replaced by a stand-in that writes what a finished run writes (training is tested elsewhere)."""
import json
import math

import pytest

import toy_table

NAN = float("nan")


def write_run(run_dir, step, iters, iou):
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.json").write_text(json.dumps({"config": {"iters": iters}}))
    miou = sum(v for v in iou if not math.isnan(v)) / sum(not math.isnan(v) for v in iou)
    with open(run_dir / "log.jsonl", "a") as f:
        f.write(json.dumps({"step": step, "loss_src": 1.0}) + "\n")
        record = {"step": step, "eval": {"iou": [None if math.isnan(v) else v for v in iou], "mIoU": miou}}
        f.write(json.dumps(record, allow_nan=False) + "\n")  # as train.py writes it: strict JSON, null for NaN


def iou(road, building):
    return [road, NAN, building] + [NAN] * 16  # 19 classes; only road and building occur


def test_table_skips_finished_runs_resumes_unfinished_and_aggregates(tmp_path, monkeypatch, capsys):
    write_run(tmp_path / "source-only-s0", 300, 300, iou(10.0, NAN))
    write_run(tmp_path / "source-only-s1", 300, 300, iou(20.0, NAN))
    write_run(tmp_path / "dacs-s0", 300, 300, iou(30.0, 50.0))
    write_run(tmp_path / "dacs-s1", 100, 300, iou(0.0, 0.0))  # interrupted at step 100 of 300
    (tmp_path / "dacs-s1" / "ckpt.pt").write_bytes(b"")
    calls = []

    def fake_train(cmd, check, cwd):
        calls.append(cmd)
        write_run(tmp_path / "dacs-s1", 300, 300, iou(40.0, 70.0))
    monkeypatch.setattr(toy_table.subprocess, "run", fake_train)
    toy_table.main(["--methods", "source-only", "dacs", "--seeds", "0", "1", "--out", str(tmp_path)])

    assert len(calls) == 1  # only the unfinished run trains, and it continues from its checkpoint
    assert "--no-mfm" in calls[0] and "--resume" in calls[0] and calls[0][calls[0].index("--seed") + 1] == "1"
    out = capsys.readouterr().out
    assert "| method | mIoU | road | building |" in out  # classes that occur in no run are left out
    assert "| source-only | 15.0 ± 7.1 | 15.0 | n/a |" in out  # sample std of (10, 20)
    assert "| dacs | 47.5 ± 10.6 | 35.0 | 60.0 |" in out  # means (40, 55) of the runs' mIoUs


def test_a_failed_run_is_a_clear_error(tmp_path, monkeypatch):
    def failing(cmd, check, cwd):
        raise toy_table.subprocess.CalledProcessError(1, cmd)
    monkeypatch.setattr(toy_table.subprocess, "run", failing)
    with pytest.raises(SystemExit, match="dacs seed 0 stopped .exit code 1.*the same command continues"):
        toy_table.main(["--methods", "dacs", "--seeds", "0", "--out", str(tmp_path)])


def test_semi_supervised_table_runs_the_semi_pair_and_names_its_rows(tmp_path, monkeypatch, capsys):
    calls = []

    def fake_train(cmd, check, cwd):
        calls.append(cmd)
        write_run(tmp_path / cmd[cmd.index("--out") + 1].split("/")[-1], 300, 300, iou(10.0 * len(calls), NAN))
    monkeypatch.setattr(toy_table.subprocess, "run", fake_train)
    toy_table.main(["--labeled", "20", "--seeds", "0", "--out", str(tmp_path)])
    assert len(calls) == 4  # supervised-only, self-training, + MFM, + CMIM
    for cmd in calls:
        assert cmd[cmd.index("--source") + 1] == cmd[cmd.index("--target") + 1] == "toy-night"
        assert cmd[cmd.index("--labeled") + 1] == "20"
    assert ["--source-only" in c for c in calls] == [True, False, False, False]
    assert ["--aux" in c and "cmim" in c for c in calls] == [False, False, False, True]
    out = capsys.readouterr().out
    assert "| supervised-only | 10.0 ± 0.0 |" in out and "| self-training | 20.0 ± 0.0 |" in out
    assert "| self-training + mfm | 30.0 ± 0.0 |" in out and "| self-training + cmim | 40.0 ± 0.0 |" in out
