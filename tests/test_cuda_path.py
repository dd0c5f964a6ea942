"""The CUDA path, tested on CPU where it can be: the step's host syncs (counted on the meta device), bf16
autocast through every network and auxiliary with the teacher inside it, the gradient guard, a restart after a
run died before its first checkpoint, DDP's unused-parameter search only where a branch leaves parameters out,
and the out-of-memory message. Tests marked `cuda` run only where PyTorch sees a GPU (tools/gpu_check.py runs them)."""
import json

import pytest
import torch

import bench
import data
import runtime
import train
from conftest import HostSyncCounter, meta_step_syncs

TINY = ["--pretrained", "none", "--crop-size", "32", "--mfm-dim", "64", "--mfm-heads", "4", "--mfm-grid", "2"]
CONFIGS = [["--backbone", "resnet18"], ["--backbone", "resnet18", "--source-only"],
           ["--backbone", "resnet18", "--recipe", "daformer"], ["--backbone", "mit_b0", "--aux", "mfm,mic"],
           ["--backbone", "mit_b0", "--aux", "cmim"], ["--backbone", "deeplabv3plus-resnet18"]]
cuda = pytest.mark.cuda  # skipped without a GPU (conftest.py)


def toy_args(*flags, device="cpu"):
    return train.parse_args(["--source", "toy-day", "--target", "toy-night", *TINY, "--device", device, *flags])


def batch(device="cpu", size=32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x_src, x_tgt = torch.rand(2, 3, size, size, generator=gen), torch.rand(2, 3, size, size, generator=gen)
    y_src = torch.randint(0, 19, (2, size, size), generator=gen)
    y_src[:, :4] = data.IGNORE_INDEX
    return x_src.to(device), y_src.to(device), x_tgt.to(device)


@pytest.mark.parametrize("flags", CONFIGS, ids=lambda f: " ".join(f[1:]))
def test_a_training_step_waits_for_the_gpu_once(flags):
    """One host sync per step: the losses and the gradient norm read together. Random draws (ClassMix, jitter,
    blur, masks) are made on the device and no per-image torch.unique remains."""
    counts = meta_step_syncs(["--source", "gta", "--target", "cityscapes", *TINY, *flags])
    assert counts == {"copy meta->cpu": 1.0}


def test_the_sync_counter_sees_host_draws_copies_and_data_dependent_shapes():
    x = torch.rand(2, 3, device="meta")
    with HostSyncCounter() as counter:
        torch.rand(2).to("meta")  # a CPU draw moved to the device
        torch.tensor([1.0, 2.0], device="meta")
        x.sum().item()
        x.tolist()
        with pytest.raises(RuntimeError, match="nonzero"):
            x.nonzero()
        with pytest.raises(RuntimeError, match="index"):
            x[x > 0]
    assert counter.counts == {"copy cpu->meta": 1, "torch.tensor to meta": 1, "read a value (item/float/bool)": 1,
                              "copy meta->cpu": 1}


@pytest.mark.parametrize("flags", CONFIGS[:1] + CONFIGS[2:], ids=lambda f: " ".join(f[1:]))
def test_bf16_autocast_runs_every_network_and_auxiliary_with_the_teacher_inside_it(flags):
    args = toy_args(*flags, "--dtype", "bf16")
    runtime.set_seed(0)
    run = train.build_run(args, 19)
    seen = []
    if run.teacher is not None:
        forward = run.teacher.forward
        run.teacher.forward = lambda x: seen.append(torch.is_autocast_enabled("cpu")) or forward(x)
    for step in range(2):
        values, _ = train.train_step(run, *batch(), step, args)
        assert all(torch.isfinite(torch.tensor(v)) for v in values.values()), values
    assert seen == [True, True]


def state(run):  # the weights (BatchNorm statistics move in any forward pass)
    parts = dict(student=run.student, teacher=run.teacher, rebuilder=run.heads["rebuilder"])
    return {name: [p.detach().clone() for p in part.parameters()] for name, part in parts.items()}


def test_a_nan_gradient_reaches_no_weight_no_optimizer_moment_and_not_the_teacher():
    args = toy_args("--backbone", "resnet18")
    runtime.set_seed(0)
    run = train.build_run(args, 19)
    train.train_step(run, *batch(), 0, args)  # AdamW moments exist from here on
    before, moments = state(run), [t.clone() for s in run.optimizer.state.values() for t in s.values()]
    param = next(run.heads["rebuilder"].parameters())  # finite losses, a NaN in one gradient (the MFM branch's)
    param.register_hook(lambda grad: grad * float("nan"))
    with pytest.raises(train.NonFiniteLoss, match="non-finite gradient: grad_norm = nan at step 1") as stop:
        train.train_step(run, *batch(seed=1), 1, args)
    advice = str(stop.value).split("Try ")[1]  # only the gradient: the LR, not a λ; fp32 already
    assert "every loss finite" in str(stop.value) and "--lr" in advice and "--lambda" not in advice
    assert "--dtype" not in advice
    after = state(run)
    assert all(torch.equal(a, b) for name in before for a, b in zip(before[name], after[name]))
    assert all(torch.equal(a, b) for a, b in zip(moments, [t for s in run.optimizer.state.values()
                                                          for t in s.values()]))
    assert all(p.grad is None for p in run.student.parameters())


def test_a_run_that_died_before_its_first_checkpoint_restarts_with_the_same_command(tmp_path, monkeypatch):
    argv = ["--source", "toy-day", "--target", "toy-night", *TINY, "--backbone", "resnet18", "--iters", "2",
            "--out", str(tmp_path / "run"), "--eval-every", "2", "--vis-every", "0", "--log-every", "1"]
    step = train.train_step

    def dies_at_step_2(run, x_src, y_src, x_tgt, i, args, frame=None):
        if i == 1:
            raise MemoryError("killed")
        return step(run, x_src, y_src, x_tgt, i, args, frame)
    monkeypatch.setattr(train, "train_step", dies_at_step_2)
    with pytest.raises(MemoryError):
        train.main(argv)
    assert (tmp_path / "run/config.json").exists() and not (tmp_path / "run/ckpt.pt").exists()
    monkeypatch.setattr(train, "train_step", step)
    workers = []
    evaluate = train.evaluation.evaluate
    monkeypatch.setattr(train.evaluation, "evaluate", lambda *a, **k: workers.append(k["num_workers"]) or
                        evaluate(*a, **k))
    assert train.main(argv) is not None  # the same command: no "already holds a run"
    steps = [json.loads(line).get("step") for line in (tmp_path / "run/log.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 2]  # the dead run's step-1 line is gone: steps 1, 2 and the evaluation
    assert workers == [0]  # periodic evaluation decodes with --workers (0 on CPU)
    with pytest.raises(SystemExit, match="already holds a run"):  # a run with a checkpoint is never overwritten
        train.main(argv)
    assert train.main(argv + ["--resume"]) is None  # nothing left to do


@pytest.mark.parametrize("flags, unused", [([], False), (["--no-mfm"], False), (["--source-only"], False),
                                           (["--aux", "mic"], False), (["--aux", "mic,mfm"], False),
                                           (["--aux", "mfm,mic"], True), (["--aux", "cmim"], True),
                                           (["--aux", "cmim,mfm"], True)])
def test_ddp_searches_for_unused_parameters_only_when_the_last_branch_leaves_some_out(flags, unused):
    assert train.leaves_parameters_unused(toy_args(*flags)) == unused


def test_deterministic_mode_warns_instead_of_crashing_on_kernels_cuda_lacks():
    runtime.set_seed(0, deterministic=True)
    try:
        assert torch.are_deterministic_algorithms_enabled()
        assert torch.is_deterministic_algorithms_warn_only_enabled()
        assert not torch.backends.cuda.matmul.allow_tf32
    finally:
        runtime.set_seed(0)
    assert not torch.are_deterministic_algorithms_enabled() and torch.backends.cuda.matmul.allow_tf32


@pytest.mark.parametrize("message, hint", [("CUDA out of memory. Tried to allocate 2.00 GiB", True),
                                           ("cuDNN error: CUDNN_STATUS_ALLOC_FAILED", True),
                                           ("CUBLAS_STATUS_ALLOC_FAILED when calling cublasCreate", True),
                                           ("some other failure", False)])
def test_running_out_of_gpu_memory_is_one_clear_message(monkeypatch, message, hint):
    error = torch.cuda.OutOfMemoryError if message.startswith("CUDA") else RuntimeError
    monkeypatch.setattr(train, "train", lambda args: (_ for _ in ()).throw(error(message)))
    argv = ["--source", "toy-day", "--target", "toy-night", "--device", "cpu"]
    if not hint:
        with pytest.raises(RuntimeError, match=message):
            train.main(argv)
        return
    with pytest.raises(SystemExit) as exit_:
        train.main(argv + ["--dtype", "bf16"])
    text = str(exit_.value)
    assert "out of memory" in text and "--crop-size" in text and "bf16" not in text.split("Try")[1]
    with pytest.raises(SystemExit, match="--dtype bf16"):  # suggested only where it is not in use
        train.main(argv + ["--dtype", "fp32"])


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_a_non_finite_auxiliary_loss_stops_with_advice_that_fits_the_run(tmp_path, monkeypatch, dtype):
    """The message names the term and the precision; it offers --dtype fp32 only where that is not in use, and the
    broken auxiliary's λ rather than the LR (the NaN gradient follows from the loss)."""
    monkeypatch.setattr(train.baselines, "mic_loss", lambda student, x, *a, **k:
                        student.decode(student.encode(x)).mean() * float("nan"))
    with pytest.raises(SystemExit) as stop:
        train.main(["--source", "toy-day", "--target", "toy-night", *TINY, "--aux", "mic", "--iters", "1",
                    "--dtype", dtype, "--eval-every", "0", "--vis-every", "0", "--out", str(tmp_path / "run")])
    text = str(stop.value)
    assert "non-finite loss: " in text and "loss_mic = nan" in text and f"at step 0, in {dtype}" in text
    advice = text.split("Try ")[1]
    assert "--lambda-mic (now 1)" in advice and "--skip-nonfinite" in advice and "--lr" not in advice
    assert ("--dtype fp32" in advice) == (dtype == "bf16") == ("(this run: bf16)" in advice)


def test_running_out_of_memory_before_the_flags_are_read_is_the_same_message(monkeypatch):
    """main's handler must not read flags it never got (it read an unbound `args` once)."""
    def oom(argv):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    monkeypatch.setattr(train, "parse_args", oom)
    with pytest.raises(SystemExit, match="ran out of memory .* --batch-size, or --dtype bf16"):
        train.main([])


# ----------------------------------------------------------------------------- on a GPU only
@cuda
@pytest.mark.parametrize("backbone", ["resnet18", "mit_b0", "deeplabv3plus-resnet18"])
def test_cuda_step_is_finite_and_syncs_at_most_twice(backbone):
    args = toy_args("--backbone", backbone, "--aux", "mfm,mic", device="cuda")
    runtime.set_seed(0)
    run = train.build_run(args, 19)
    x_src, y_src, x_tgt = (t.to("cuda") for t in batch())
    train.train_step(run, x_src, y_src, x_tgt, 0, args)
    syncs = bench.cuda_step_syncs(lambda: train.train_step(run, x_src, y_src, x_tgt, 1, args))
    assert syncs <= 2


@cuda
def test_cuda_deterministic_step_runs():
    args = toy_args("--backbone", "resnet18", "--deterministic", device="cuda")
    runtime.set_seed(0, deterministic=True)
    try:
        run = train.build_run(args, 19)
        values, _ = train.train_step(run, *(t.to("cuda") for t in batch()), 0, args)
        assert all(torch.isfinite(torch.tensor(v)) for v in values.values())
    finally:
        runtime.set_seed(0)


@cuda
def test_cuda_and_cpu_compute_the_same_augmentation_and_mix_semantics():
    x_src, y_src, x_tgt = (t.to("cuda") for t in batch())
    q = torch.tensor(0.5, device="cuda")
    x_mix, y_mix, w_mix = data.class_mix(x_src, y_src, x_tgt, y_src.flip(0), q)
    pasted = (x_mix == x_src).all(1)
    assert torch.equal(w_mix, torch.where(pasted, 1.0, 0.5)) and torch.equal(y_mix[pasted], y_src[pasted])
    out = data.strong_augment(x_mix)
    assert out.shape == x_mix.shape and out.device.type == "cuda" and 0 <= out.min() and out.max() <= 1


def test_each_rank_takes_its_gpu_also_where_the_launcher_shows_it_only_one(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: None)
    monkeypatch.setattr(runtime.dist, "init_process_group", lambda *a, **k: None)
    monkeypatch.setattr(runtime.dist, "get_rank", lambda: 3)
    for visible, expected in ((4, "cuda:3"), (1, "cuda:0")):  # a node's 4 GPUs; one GPU per process (e.g. SLURM)
        monkeypatch.setenv("LOCAL_RANK", "3")
        monkeypatch.setattr(torch.cuda, "device_count", lambda: visible)
        args = toy_args()
        args.device = "cuda"
        assert runtime.setup_distributed(args) == (3, 4) and args.device == expected
