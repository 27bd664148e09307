"""Distributed training on torch.distributed: process groups, DDP / FSDP2 wrapping, full-state checkpoints.

Owns everything that differs between one process and `torchrun` ranks: who I am (rank, world size,
device), the process group (gloo on CPU, NCCL on CUDA), wrapping the model, the collectives the loop
needs, gathering a full (unsharded) model and optimizer state for rank 0 to save, and relaunching
`llmos train --nproc N` under torchrun (relaying a rank's user error to the launcher as one line). Never
decides what to train on and never writes files other than that relay's.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict, set_optimizer_state_dict)

import llmos.errors
from llmos.errors import InvalidRequestError, LlmosError

RANK_ERRORS = "LLMOS_RANK_ERRORS"  # env: the launcher's folder where ranks leave their user error (rank-N.json)


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    initialized_here: bool = False  # we created the process group, so we destroy it

    @property
    def is_main(self) -> bool:
        """Rank 0: the only rank that writes checkpoints, logs and progress."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def under_torchrun() -> bool:
    """True when this process is a torchrun worker (torchrun sets RANK, WORLD_SIZE and LOCAL_RANK)."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def pick_device(name: str, local_rank: int = 0) -> torch.device:
    """`device` setting -> torch.device: "auto" is CUDA (this rank's GPU) when available, else CPU.
    Raises `InvalidRequestError` for "cuda" on a machine without one."""
    if name == "cuda" or (name == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise InvalidRequestError("--device cuda was asked for but torch sees no CUDA GPU; use --device cpu.")
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    return torch.device("cpu")


def init(device: str = "auto") -> DistInfo:
    """Who this process is. Under torchrun, joins the process group (NCCL on CUDA, gloo on CPU), once."""
    if not under_torchrun() or int(os.environ["WORLD_SIZE"]) == 1:
        return DistInfo(device=pick_device(device))
    _die_with_parent()
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    dev = pick_device(device, local_rank)
    here = False
    if not dist.is_initialized():
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo", device_id=dev if dev.type == "cuda" else None)
        here = True
    return DistInfo(rank, world, local_rank, dev, here)


def _die_with_parent() -> None:
    """Linux: SIGKILL this rank when torchrun dies. torchrun starts its workers in their own sessions, so a
    SIGKILL to the launcher's process group (how the daemon kills a job) would otherwise leave them training."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    parent = os.getppid()
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, 9, 0, 0, 0)  # PR_SET_PDEATHSIG, SIGKILL
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:  # the launcher died before the call
        os._exit(1)


def shutdown(info: DistInfo) -> None:
    if info.initialized_here and dist.is_initialized():
        dist.destroy_process_group()


def wrap(model: torch.nn.Module, info: DistInfo, kind: str) -> torch.nn.Module:
    """The model the loop runs: itself on one process, DistributedDataParallel, or FSDP2 (`fully_shard`
    on every decoder layer, then the root; Zhao et al. 2023, PyTorch FSDP) with `kind == "fsdp"`."""
    if not info.distributed:
        return model
    if kind == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for block in _blocks(model):
            fully_shard(block)
        fully_shard(model)
        return model
    ids = [info.device.index] if info.device.type == "cuda" else None
    return torch.nn.parallel.DistributedDataParallel(model, device_ids=ids)


def _blocks(model: torch.nn.Module) -> list[torch.nn.Module]:
    for path in ("model.layers", "transformer.h"):
        obj = model
        for part in path.split("."):
            obj = getattr(obj, part, None)
        if isinstance(obj, torch.nn.ModuleList):
            return list(obj)
    return []


def is_fsdp(model: torch.nn.Module) -> bool:
    return type(model).__name__.startswith("FSDP")


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The plain module under DDP (FSDP2 wraps in place, so it is the module itself)."""
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


def all_reduce_sum(values: list[float], info: DistInfo) -> list[float]:
    """Sum float64 scalars over ranks (identity on one process)."""
    if not info.distributed:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=info.device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.tolist()


def barrier(info: DistInfo) -> None:
    if info.distributed:
        dist.barrier()


def broadcast_object(obj, info: DistInfo):
    """Rank 0's `obj` on every rank (pickled by torch.distributed over the process group, never from disk)."""
    if not info.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)


def full_model_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The unsharded model state (CPU tensors, names of the plain module) on rank 0. A collective under FSDP:
    every rank must call it. Other ranks get an empty or partial dict."""
    return get_model_state_dict(unwrap(model) if not is_fsdp(model) else model, options=FULL)


def full_optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """The optimizer state keyed by parameter name (not by index), unsharded, so it loads on any number
    of ranks: {"state": {name: {key: tensor}}, "param_groups": [{..., "params": [names]}]}. A collective."""
    return get_optimizer_state_dict(unwrap(model) if not is_fsdp(model) else model, optimizer, options=FULL)


def load_optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
    """Load a full, name-keyed optimizer state (from `full_optimizer_state`) on every rank; each rank keeps
    its shard under FSDP."""
    set_optimizer_state_dict(unwrap(model) if not is_fsdp(model) else model, optimizer, optim_state_dict=state,
                             options=StateDictOptions(full_state_dict=True))


def launch(nproc: int, args: list[str], progress_file: str | os.PathLike | None = None) -> int:
    """Run `torchrun --nproc-per-node N --standalone -m llmos.cli.train_cmd ARGS` (through `_torchrun`, which
    keeps torchrun's own tracebacks and warnings off the terminal) and wait for it; returns its exit status
    (0 when a stop signal suspended the run). The multi-node form is in docs/train/trainer.md.

    A user error inside the ranks (an `LlmosError`, e.g. too little text for a window) is raised here again,
    once, with the message of the lowest rank that reported it: ranks under this launcher write it to
    $LLMOS_RANK_ERRORS/rank-N.json (`report_rank_error`) instead of printing it. Programming errors keep their
    rank's traceback, and the status is torchrun's.

    Signals: torchrun runs in its own session, so a signal to this process's group (Ctrl-C in a terminal,
    the daemon's suspend) reaches only this launcher, which turns SIGUSR1/SIGTERM/SIGINT into one SIGTERM
    for torchrun; torchrun passes it to the ranks, which checkpoint and stop (TORCH_ELASTIC_SHUTDOWN_TIMEOUT,
    default here 600 s, bounds the wait). On Linux torchrun dies with this launcher and the ranks with
    torchrun, so a SIGKILL to the group ends them all.
    """
    import signal
    import tempfile

    errors = tempfile.mkdtemp(prefix="llmos-rank-errors-")
    command = [sys.executable, "-c", "import sys; from llmos.train.distributed import _torchrun; sys.exit(_torchrun())",
               "--nproc-per-node", str(nproc), "--standalone", "-m", "llmos.cli.train_cmd", *args]
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")
    env.setdefault("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", "600")
    env[RANK_ERRORS] = errors
    started = time.time()
    proc = subprocess.Popen(command, env=env, start_new_session=True,
                            preexec_fn=_pdeathsig_kill if sys.platform.startswith("linux") else None)
    stopped: list[int] = []

    def forward(signum, frame) -> None:
        if not stopped:
            proc.send_signal(signal.SIGTERM)
        stopped.append(signum)

    signals = [s for s in (getattr(signal, "SIGUSR1", None), signal.SIGTERM, signal.SIGINT) if s is not None]
    previous = {s: signal.signal(s, forward) for s in signals}
    try:
        status = proc.wait()
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        error = _first_rank_error(errors)
        import shutil

        shutil.rmtree(errors, ignore_errors=True)
    if stopped and progress_file is not None:
        found = run_progress(progress_file, since=started)
        if found is not None and found.get("state") == "suspended":
            return 0
    if status and error is not None:
        raise error
    return status


def run_progress(progress_file: str | os.PathLike, since: float = 0.0) -> dict | None:
    """The progress.json this run wrote: `progress_file` (`<out>/progress.json`) or, for a new run into a
    finished --out, the one in its work directory `.<name>.run-<pid of rank 0>` beside it
    (`checkpoint.work_dir`); the newest written at or after `since` (a time.time()), None if none is."""
    import json

    progress_file = Path(progress_file)
    out = progress_file.parent
    candidates = [progress_file, *out.parent.glob(f".{out.name}.run-*/{progress_file.name}")]
    dated = []
    for p in candidates:
        try:
            mtime = p.stat().st_mtime
        except OSError:
            continue
        if mtime >= since - 1:
            dated.append((mtime, p))
    for _, p in sorted(dated, key=lambda t: t[0], reverse=True):
        try:
            d = json.loads(p.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(d, dict):
            return d
    return None


def report_rank_error(error: LlmosError) -> bool:
    """In a rank started by `launch`: leave `error` for the launcher to print once; returns False (print it
    yourself) anywhere else."""
    folder = os.environ.get(RANK_ERRORS)
    if not folder or not under_torchrun() or not os.path.isdir(folder):
        return False
    import json

    path = os.path.join(folder, f"rank-{int(os.environ['RANK'])}.json")
    try:
        with open(path + ".tmp", "w", encoding="utf-8") as f:
            json.dump({"type": type(error).__name__, "message": str(error)}, f)
        os.replace(path + ".tmp", path)
    except OSError:
        return False
    return True


def _first_rank_error(folder: str) -> LlmosError | None:
    """The lowest rank's reported error, as its own `LlmosError` class (LlmosError if unknown)."""
    import json

    reports = []
    for name in os.listdir(folder) if os.path.isdir(folder) else []:
        if name.startswith("rank-") and name.endswith(".json"):
            try:
                with open(os.path.join(folder, name), encoding="utf-8") as f:
                    reports.append((int(name[5:-5]), json.load(f)))
            except (OSError, ValueError):
                continue
    if not reports:
        return None
    report = min(reports, key=lambda r: r[0])[1]
    cls = getattr(llmos.errors, str(report.get("type")), None)
    if not (isinstance(cls, type) and issubclass(cls, LlmosError)):
        cls = LlmosError
    return cls(str(report.get("message", "a training process failed")))


def _torchrun() -> int:
    """torchrun (`torch.distributed.run`) with sys.argv[1:], minus its noise: no ChildFailedError or
    SignalException traceback and no elastic-agent warnings ("Received 15 death signal ..."); the ranks print
    their own errors (or relay them, see `report_rank_error`). Returns 0, 1 (a rank failed) or 128 + signal."""
    os.environ.setdefault("LOGLEVEL", "CRITICAL")  # torch.distributed.elastic's loggers read it when created
    import logging

    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    for name in list(logging.Logger.manager.loggerDict):
        if name.startswith("torch.distributed"):
            logging.getLogger(name).setLevel(logging.CRITICAL)
    try:
        run(parse_args(sys.argv[1:]))
    except ChildFailedError:
        return 1
    except SignalException as e:
        return 128 + int(e.sigval)
    return 0


def _pdeathsig_kill() -> None:  # in the child, before exec: SIGKILL it when the launcher dies
    import ctypes

    ctypes.CDLL(None).prctl(1, 9, 0, 0, 0)  # PR_SET_PDEATHSIG, SIGKILL
