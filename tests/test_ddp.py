"""Several processes through torchrun (gloo on CPU, 2 ranks): the run trains, every rank ends with the same
weights although each saw other data, a 2-process run resumes to the weights of an uninterrupted one, and
SIGTERM stops both ranks after the same step with a checkpoint."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

ROOT = Path(__file__).resolve().parents[1]
FLAGS = ["--source", "toy-day", "--target", "toy-night", "--device", "cpu", "--deterministic", "--mfm-dim", "64",
         "--mfm-heads", "4", "--crop-size", "32", "--eval-every", "0", "--vis-every", "0", "--log-every", "1"]
# Runs train.main in each rank, then saves what that rank holds in memory (not what rank 0 wrote).
WRAPPER = """
import os, sys, torch
sys.path.insert(0, {root!r})
import train
held = {{}}
build_run = train.build_run
train.build_run = lambda *a: held.setdefault("run", build_run(*a))
try:
    train.main(sys.argv[1:])
finally:
    run = held["run"]
    parts = dict(student=run.student, teacher=run.teacher, rebuilder=run.heads["rebuilder"])
    torch.save({{name: part.state_dict() for name, part in parts.items()}},
               os.path.join(os.environ["RANK_OUT"], "rank" + os.environ["RANK"] + ".pt"))
"""

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs gloo")


def torchrun(tmp_path, out, *flags):
    script = tmp_path / "rank_wrapper.py"
    script.write_text(WRAPPER.format(root=str(ROOT)))
    env = dict(os.environ, OMP_NUM_THREADS="1", RANK_OUT=str(tmp_path))
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          str(script), *FLAGS, "--out", str(out), *map(str, flags)],
                         capture_output=True, text=True, timeout=600, cwd=ROOT, env=env)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-4000:]
    return [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]


def test_two_ranks_hold_identical_weights_after_different_data(tmp_path):
    """--aux mfm,mic: the Rebuilder learns only in the MFM branch, whose backward skips the all-reduce
    (no_sync); its gradient must still be averaged by the step's one all-reduce in the MIC branch."""
    rank0, rank1 = torchrun(tmp_path, tmp_path / "run", "--iters", 3, "--aux", "mfm,mic")
    for part in ("student", "teacher", "rebuilder"):
        params = [k for k in rank0[part] if "running" not in k and "num_batches" not in k]
        assert all(torch.equal(rank0[part][k], rank1[part][k]) for k in params), part
    # BatchNorm statistics stay per GPU (broadcast_buffers=False): they differ because the ranks saw other crops
    stats = [k for k in rank0["student"] if k.endswith("running_mean")]
    assert not all(torch.equal(rank0["student"][k], rank1["student"][k]) for k in stats)
    ckpt = torch.load(tmp_path / "run/ckpt.pt", weights_only=True)
    assert ckpt["step"] == 3 and len(ckpt["rng"]) == 2  # one RNG state per rank
    assert all(torch.equal(ckpt["model"][k], rank0["student"][k]) for k in ckpt["model"])


def test_hrda_trains_on_two_ranks_with_identical_weights(tmp_path):
    """--recipe hrda under torchrun (HRDA's own code runs on one GPU only): MFM on both views, the attention head,
    and DDP without the unused-parameter search (every trained parameter takes part in the MFM branch)."""
    rank0, rank1 = torchrun(tmp_path, tmp_path / "run", "--iters", 2, "--recipe", "hrda", "--crop-size", 64)
    for part in ("student", "teacher", "rebuilder"):
        params = [k for k in rank0[part] if "running" not in k and "num_batches" not in k]
        assert all(torch.equal(rank0[part][k], rank1[part][k]) for k in params), part
    assert any(k.startswith("attention.") for k in rank0["student"])


def test_two_rank_run_resumes_to_the_uninterrupted_weights(tmp_path):
    straight = torchrun(tmp_path, tmp_path / "a", "--iters", 4)[0]
    torchrun(tmp_path, tmp_path / "b", "--iters", 4, "--stop-at", 2)
    resumed = torchrun(tmp_path, tmp_path / "b", "--iters", 4, "--resume")[0]
    steps = [json.loads(line)["step"] for line in (tmp_path / "b/log.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]  # rank 0 alone writes, and the resumed run starts at the checkpoint's step
    for part in ("student", "teacher", "rebuilder"):
        assert all(torch.equal(straight[part][k], resumed[part][k]) for k in straight[part]), part


def test_sigterm_stops_every_rank_after_the_same_step_with_a_checkpoint(tmp_path):
    """torchrun passes SIGTERM to both ranks, which may see it at different steps: they agree on one step, rank 0
    writes the checkpoint, and the run exits with 128 + SIGTERM instead of hanging in a collective."""
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                             str(ROOT / "train.py"), *FLAGS, "--out", str(out), "--iters", "1000", "--ckpt-every", "0"],
                            cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1"), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while not ((out / "log.jsonl").exists() and (out / "log.jsonl").read_text().count("\n") >= 2):
        assert proc.poll() is None and time.time() < deadline, proc.communicate()
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=300)
    assert "--resume" in stderr, stderr[-3000:]
    ckpt = torch.load(out / "ckpt.pt", weights_only=True)
    steps = [json.loads(line)["step"] for line in (out / "log.jsonl").read_text().splitlines()]
    assert 2 <= ckpt["step"] < 1000 and steps[-1] == ckpt["step"]  # stopped after the step it logged last
