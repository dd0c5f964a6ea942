"""What a training run needs around the algorithm (train.py): seeds, torchrun (one DDP container for the trained
modules), signals, the JSON log, the run folder, our checkpoints (written and resumed; eval.py reads them back)."""
import contextlib
import datetime
import json
import os
import random
import signal
import sys
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

import eval as evaluation
import models

RESUMABLE = {"resume", "stop_at", "skip_nonfinite", "eval_every", "ckpt_every", "vis_every", "log_every",
             "workers", "data_root", "device", "out", "compile"}  # may differ between a run and its --resume


class ConfigError(Exception):
    """A flag combination or output folder that cannot work; the message says which and why."""


class NonFiniteLoss(Exception):
    """A loss, the gradient or the weights became NaN or inf (checked before the optimizer step)."""


def set_seed(seed, deterministic=False):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    # warn_only: CUDA has no deterministic backward of bilinear upsampling, which every network and the Rebuilder
    # use; bit-identical resumes are guaranteed (and tested) on CPU
    torch.use_deterministic_algorithms(deterministic, warn_only=True)
    torch.backends.cudnn.benchmark = not deterministic
    # TF32 for what autocast leaves in float32 (the fp32 mode, the losses' softmax); off for --deterministic
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = not deterministic


def setup_distributed(args):
    """Under torchrun (WORLD_SIZE > 1): join the process group (NCCL on CUDA, gloo on CPU), one GPU per local
    rank. Returns (rank, world size); (0, 1) for a plain `python train.py`."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    if world == 1:
        return 0, 1
    if args.device.startswith("cuda"):  # modulo: launchers that show each process only its own GPU
        args.device = f"cuda:{int(os.environ['LOCAL_RANK']) % torch.cuda.device_count()}"
        torch.cuda.set_device(args.device)
    dist.init_process_group("nccl" if args.device.startswith("cuda") else "gloo",
                            timeout=datetime.timedelta(hours=1))  # rank 0 evaluates while the others wait
    return dist.get_rank(), world


class Trainable(nn.Module):
    """The trained modules in one container, so that one DistributedDataParallel covers them all:
    trainable(branch) runs branch(container) -> one loss term of the step."""

    def __init__(self, student, heads):
        super().__init__()
        self.student, self.heads = student, nn.ModuleDict(heads)

    def forward(self, branch):
        return branch(self)


def trainable(student, heads, device, world, find_unused=False):
    """Trainable(student, heads), wrapped in DDP under torchrun (it copies rank 0's weights to every rank; buffers,
    i.e. BatchNorm statistics, stay per GPU). find_unused: a step leaves trained parameters without gradient."""
    module = Trainable(student, heads)
    if world == 1:
        return module
    return nn.parallel.DistributedDataParallel(module, device_ids=[device.index] if device.type == "cuda" else None,
                                               broadcast_buffers=False, find_unused_parameters=find_unused)


@contextlib.contextmanager
def signals_to_flag():
    """While inside, SIGINT/SIGTERM append their name to the yielded list instead of killing the process: the
    loop finishes its step, writes a checkpoint and exits. The previous handlers come back afterwards."""
    flag = []
    previous = {sig: signal.signal(sig, lambda signum, frame: flag.append(signal.Signals(signum).name))
                for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield flag
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def log(out, record):  # one line of strict JSON in log.jsonl
    with open(Path(out) / "log.jsonl", "a") as f:
        f.write(json.dumps(evaluation.json_safe(record), allow_nan=False) + "\n")


def open_run_folder(out, args, world, start):
    """Rank 0, before the first step: --out, with config.json (the resolved config, every command line run in it).
    A run that died before its first checkpoint (start 0 and a config.json) starts again."""
    if start == 0 and (out / "config.json").exists():
        print(f"note: the run in {out} stopped before its first checkpoint; starting it again", file=sys.stderr)
        (out / "log.jsonl").unlink(missing_ok=True)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ConfigError(f"cannot create the output folder --out {out}: {err}") from err
    path = out / "config.json"
    history = json.loads(path.read_text())["argv"] if path.exists() else []
    path.write_text(json.dumps(dict(config=vars(args), argv=history + [sys.argv], world_size=world), indent=2))


def export(run, args, done):
    """model.pt: the student's weights and how to build it (no teacher, no training-only head)."""
    return dict(model=run.student.state_dict(), model_config=run.student.config, config=vars(args), step=done)


def save_checkpoint(run, args, done):
    """ckpt.pt (everything to resume, each rank's RNG state) and model.pt; rank 0 writes. Every rank must call it:
    it gathers the RNG states and checks that the teacher is the same on every rank."""
    device = torch.device(args.device)  # this rank's GPU only: a resume may see fewer GPUs
    rng = dict(torch=torch.get_rng_state(), python=random.getstate(),
               cuda=torch.cuda.get_rng_state(device) if device.type == "cuda" else None)
    checksum = float(sum(p.detach().double().sum() for p in (run.teacher or run.student).parameters()))
    ranks = [(rng, checksum)]
    if run.world > 1:
        ranks = [None] * run.world
        dist.all_gather_object(ranks, (rng, checksum))
        if len({c for _, c in ranks}) > 1:
            raise RuntimeError(f"the teacher differs between GPUs after {done} iterations (checksums "
                               f"{[c for _, c in ranks]}); not saving")
    if dist.is_initialized() and dist.get_rank() > 0:
        return
    modules = dict(student=run.student, teacher=run.teacher, **run.heads)
    for name, module in modules.items():  # never write a NaN model over a good one
        if module is not None and not torch.stack([p.isfinite().all() for p in module.parameters()]).all():
            raise NonFiniteLoss(f"the {name} weights hold NaN/inf after {done} iterations; not saving them (the "
                                "last good checkpoint is untouched). Try --dtype fp32 or a lower --lr.")
    weights = export(run, args, done)
    state = dict(weights, **{name: m.state_dict() if m is not None else None for name, m in modules.items()
                             if name != "student"})
    state.update(optimizer=run.optimizer.state_dict(), scaler=run.scaler.state_dict(), rng=[r for r, _ in ranks])
    models.atomic_save(state, Path(args.out) / "ckpt.pt", keep_previous=True)
    models.atomic_save(weights, Path(args.out) / "model.pt")


def restore_run(run, args, rank=0):
    """Put a --resume checkpoint back into `run` (all weights, optimizer, scaler, RNG) -> the iterations done.
    Refuses a checkpoint of another config."""
    path = Path(args.out) / "ckpt.pt" if args.resume == "auto" else Path(args.resume)
    try:
        ckpt = evaluation.read_checkpoint(path)
    except models.WeightsError as err:
        prev = path.with_name(path.stem + ".prev.pt")
        hint = f" The checkpoint before it is {prev}: --resume {prev}" if prev.exists() else ""
        raise ConfigError(f"cannot resume: {err}{hint}") from err
    saved, now = ckpt["config"], vars(args)
    differ = [f"--{k.replace('_', '-')}: checkpoint {saved.get(k)!r}, now {now[k]!r}"
              for k in now if k not in RESUMABLE and saved.get(k) != now[k]]
    if differ:
        raise ConfigError(f"{path} was written by a run with other settings; resume with the same flags or "
                          "start a new --out. Differences:\n  " + "\n  ".join(differ))
    run.student.load_state_dict(ckpt["model"])
    for name, part in dict(teacher=run.teacher, **run.heads, optimizer=run.optimizer, scaler=run.scaler).items():
        if part is not None:
            part.load_state_dict(ckpt[name])
    rng = ckpt["rng"][rank % len(ckpt["rng"])]  # exact when resumed with as many processes as it was run with
    torch.set_rng_state(rng["torch"])
    random.setstate(rng["python"])
    device, state = torch.device(args.device), rng["cuda"]
    if device.type == "cuda" and state is not None:  # older checkpoints hold a list: every GPU's state
        state = state[(device.index or 0) % len(state)] if isinstance(state, list) else state
        torch.cuda.set_rng_state(state, device)
    return ckpt["step"]
