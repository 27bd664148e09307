"""Checkpoints and the run directory: atomic Hugging Face checkpoints with the resumable trainer state,
reading that state back, the checks that keep a run from overwriting what it must not, the run lock
(one writer per --out), the cleanup of what dead runs left, and the final swap.

Owns the on-disk format of `checkpoints/last` (trainer_state.json + trainer_state.safetensors) and the
rule that every write is a temporary directory renamed into place, and that a failed write is one
`CheckpointWriteError` (never a bare OSError or SafetensorError). Never trains and never unpickles:
tensors go to safetensors, everything else to JSON.

trainer_state.safetensors: `optimizer/<parameter name>/<key>` (AdamW's step, exp_avg, exp_avg_sq; names,
not indices, so any number of ranks reads them), `rng/torch`, `rng/numpy` (MT19937 keys), `rng/cuda/<i>`,
and with LoRA `model/<parameter name>` for the trained adapters. trainer_state.json: `format`, `step`
(completed optimizer steps), `tokens`, `best_val_loss`, `elapsed_s`, `world_size`, the optimizer's
`optimizer_param_groups`, the Python/numpy RNG scalars under `rng`, and the run's `config`.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import random
import shutil
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from llmos.errors import InvalidRequestError, LlmosError
from llmos.model.config import ModelConfig
from llmos.model.loader import check_checkpoint_target, save_model
from llmos.train.config import TrainConfig

RUN_FILES = ("config.yaml", "metrics.jsonl", "progress.json", "loss.png", "summary.json", "data", "data.json",
             "checkpoints", "adapter")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")
STATE_FORMAT = "llmos-trainer-state/1"
# Settings a resumed run may change: they do not touch the weights, the batches or the schedule.
RESUME_FREE = {"data", "out_dir", "resume", "progress", "num_threads", "compile", "nproc", "dist", "device",
               "eval_interval", "log_interval", "save_interval", "tokenizer"}


# What a failed write raises: the OS's errors and safetensors' own (its Rust writer wraps ENOSPC in it).
WRITE_ERRORS = (OSError, SafetensorError)


class CheckpointWriteError(LlmosError):
    """A checkpoint could not be written (full disk, permissions); the previous one is intact."""


def write_error(what: Path | str, e: BaseException, out: Path | None = None) -> CheckpointWriteError:
    """The one-line user error for a failed write of `what` (an OSError or a SafetensorError) in the run `out`."""
    reason = (e.strerror if isinstance(e, OSError) and e.strerror else str(e)) or type(e).__name__
    where = getattr(e, "filename", None) or what
    hint = (f" and continue with `llmos train --out {out} --resume` (or start again if it saved no checkpoint)"
            if out is not None else "")
    return CheckpointWriteError(f"could not write {where}: {reason}. The previous checkpoint there is intact (if there was one); "
                                f"free disk space (or fix the permissions){hint}.")


class _DirExtras:
    """What `save_model` writes beside the weights, before its atomic rename: tokenizer files and `extra(dir)`."""

    def __init__(self, tokenizer_dir: Path, extra: Callable[[Path], None] | None = None) -> None:
        self.tokenizer_dir, self.extra = tokenizer_dir, extra

    def save(self, path: Path) -> None:
        for name in TOKENIZER_FILES:
            if (self.tokenizer_dir / name).is_file():
                shutil.copy2(self.tokenizer_dir / name, Path(path) / name)
        if self.extra is not None:
            self.extra(Path(path))


def write_checkpoint(path: Path, model: torch.nn.Module, mconfig: ModelConfig, dtype: torch.dtype,
                     tokenizer_dir: Path, generation: dict, extra: Callable[[Path], None] | None = None) -> None:
    """Write a Hugging Face checkpoint (+ `extra` files) to `path` atomically: a temporary directory beside it
    is renamed into place, so a failure leaves the previous checkpoint whole. Raises `CheckpointWriteError`."""
    try:
        save_model(model, mconfig, path, dtype=dtype, tokenizer=_DirExtras(tokenizer_dir, extra),
                   generation_config=generation)
    except WRITE_ERRORS as e:
        raise write_error(f"the checkpoint {path}", e, path.parent.parent) from None


def rng_state() -> tuple[dict, dict[str, torch.Tensor]]:
    """This process's torch, CUDA, numpy and Python RNG states as (JSON scalars, tensors)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    py = random.getstate()
    tensors = {"rng/torch": torch.get_rng_state(), "rng/numpy": torch.from_numpy(keys.astype(np.int64))}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng/cuda/{i}"] = s
    meta = {"numpy": {"kind": kind, "pos": pos, "has_gauss": has_gauss, "gauss": gauss},
            "python": [py[0], list(py[1]), py[2]]}
    return meta, tensors


def set_rng_state(meta: dict, tensors: dict[str, torch.Tensor]) -> None:
    """Restore what `rng_state` saved (CUDA only on a machine with as many GPUs)."""
    torch.set_rng_state(tensors["rng/torch"])
    n = meta["numpy"]
    np.random.set_state((n["kind"], tensors["rng/numpy"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["gauss"]))
    py = meta["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    cuda = [tensors[k] for k in sorted(k for k in tensors if k.startswith("rng/cuda/"))]
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)


def trainer_state(optimizer_state: dict, trainable: dict[str, torch.Tensor] | None, scalars: dict
                  ) -> tuple[dict, dict[str, torch.Tensor]]:
    """(trainer_state.json, trainer_state.safetensors) of a resumable checkpoint. Optimizer tensors are
    keyed `optimizer/<param name>/<key>` (names, not indices: any number of ranks reads them back)."""
    tensors: dict[str, torch.Tensor] = {}
    for name, st in optimizer_state["state"].items():
        for key, value in st.items():
            tensors[f"optimizer/{name}/{key}"] = value.detach().cpu().contiguous()
    groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()}
              for g in optimizer_state["param_groups"]]
    for name, value in (trainable or {}).items():
        tensors[f"model/{name}"] = value.detach().cpu().contiguous()
    rng_meta, rng_tensors = rng_state()
    tensors.update(rng_tensors)
    meta = {"format": STATE_FORMAT, **scalars, "optimizer_param_groups": groups, "rng": rng_meta}
    return meta, tensors


def read_trainer_state(path: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """The JSON scalars and the tensors of `path/trainer_state.*`. Raises `InvalidRequestError` if unreadable."""
    try:
        meta = json.loads((path / "trainer_state.json").read_text())
        tensors = load_file(str(path / "trainer_state.safetensors"))
    except (OSError, ValueError) as e:
        raise InvalidRequestError(f"{path} is not a resumable checkpoint ({e}); start a new run without "
                                  "--resume.") from None
    if meta.get("format") != STATE_FORMAT:
        raise InvalidRequestError(f"{path}/trainer_state.json has format {meta.get('format')!r}, not {STATE_FORMAT}.")
    return meta, tensors


def optimizer_state_from(meta: dict, tensors: dict[str, torch.Tensor]) -> dict:
    """The name-keyed optimizer state dict (`distributed.load_optimizer_state`) saved by `trainer_state`."""
    state: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        if key.startswith("optimizer/"):
            name, _, k = key[len("optimizer/"):].rpartition("/")
            state.setdefault(name, {})[k] = value
    groups = [{k: (tuple(v) if k == "betas" else v) for k, v in g.items()} for g in meta["optimizer_param_groups"]]
    return {"state": state, "param_groups": groups}


# ---- the run directory ----------------------------------------------------------------------------------


def atomic_write(path: Path, text: str) -> None:
    """Replace `path` with `text` through a temporary file and a rename: readers see the old or the new file.
    Raises `CheckpointWriteError` (full disk, read-only directory); `path` is then unchanged."""
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException as e:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        if isinstance(e, OSError):
            raise write_error(path, e, path.parent) from None
        raise


# ---- the run lock and what dead runs leave behind ------------------------------------------------------


def lock_run(out: Path) -> "RunLock":
    """Take the exclusive lock `<parent>/.<name>.lock` of the run directory `out` (fcntl.flock, so the OS drops
    it when the process dies) with our pid in it; `RunLock.release` deletes the file and frees the lock.
    Raises `InvalidRequestError` if another process holds it, `CheckpointWriteError` if the parent directory
    cannot be written."""
    lock_path = out.parent / f".{out.name}.lock"
    while True:
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
            f = open(lock_path, "a+")
        except OSError as e:
            raise write_error(lock_path, e) from None
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            f.seek(0)
            pid = f.read().strip() or "?"
            f.close()
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise write_error(lock_path, e) from None
            raise InvalidRequestError(f"{out} is being written by another llmos train (pid {pid}); wait for it "
                                      "or choose another --out.") from None
        try:  # the holder we waited on may have deleted the file: lock the one at the path, not a stale inode
            same = os.stat(lock_path).st_ino == os.fstat(f.fileno()).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        f.close()
    f.seek(0)
    f.truncate()
    f.write(f"{os.getpid()}\n")
    f.flush()
    return RunLock(lock_path, f)


class RunLock:
    """A held `lock_run` lock: `release()` deletes the lock file, then closes it (which frees the lock)."""

    def __init__(self, path: Path, file) -> None:
        self.path, self.file = path, file

    def release(self) -> None:
        if not self.file.closed:
            self.path.unlink(missing_ok=True)
            self.file.close()


def _complete_state(d: Path) -> bool:
    """`d` holds a whole resumable checkpoint: trainer_state.json (written last) parses."""
    try:
        return isinstance(json.loads((d / "trainer_state.json").read_text()), dict)
    except (OSError, ValueError):
        return False


def _recoverable(checkpoints: Path, name: str) -> Path | None:
    """What replaces a missing `checkpoints/<name>` that a save killed between its two renames (`last` ->
    `.last.old-PID`, `.last.tmp-*` -> `last`) left behind: the newest whole `.<name>.tmp-*` (one with a
    complete trainer_state.json, which is written last), else the newest `.<name>.old-*`; None if neither."""
    if (checkpoints / name).exists() or not checkpoints.is_dir():
        return None
    def newest(paths: list[Path]) -> Path | None:
        return max(paths, key=lambda p: p.stat().st_mtime, default=None)
    tmp = newest([p for p in checkpoints.glob(f".{name}.tmp-*") if p.is_dir() and _complete_state(p)])
    return tmp or newest([p for p in checkpoints.glob(f".{name}.old-*") if p.is_dir()])


def _last_state(run: Path) -> Path | None:
    """The trainer_state.json of `run`'s last checkpoint, or of the one `clean_stale` will put back there."""
    last = run / "checkpoints" / "last"
    if (last / "trainer_state.json").is_file():
        return last / "trainer_state.json"
    found = _recoverable(run / "checkpoints", "last")
    return found / "trainer_state.json" if found is not None and (found / "trainer_state.json").is_file() else None


def recover_checkpoints(run: Path) -> None:
    """Put back `checkpoints/last` and `best` where a killed save left them renamed aside (`_recoverable`);
    call it holding `lock_run`, as `clean_stale` does."""
    for name in ("last", "best"):
        found = _recoverable(run / "checkpoints", name)
        if found is not None:
            try:
                os.replace(found, run / "checkpoints" / name)
            except OSError as e:
                raise write_error(run / "checkpoints" / name, e, run) from None


def _resumable(run: Path) -> bool:
    return _last_state(run) is not None


def clean_stale(out: Path) -> None:
    """Delete what killed runs into `out` left behind; call it holding `lock_run(out)`, so every writer of
    these is dead. First `recover_checkpoints` puts back a `last`/`best` that a save killed mid-swap left
    renamed aside; then it deletes temporary checkpoints (`checkpoints/.last.tmp-*`, `.best.tmp-*`,
    `.tokenizer-*`, and `.last.old-*`, `.best.old-*` beside an existing `last`/`best`), and beside
    `out` its `.final-*` (kept if it holds a finished model: config.json and summary.json), `.prepare-*`,
    `.old-*` (only while `out` itself exists) and `.run-*` directories (a work directory of a new run, kept if
    it holds a resumable checkpoint). Visible `<name>.finished-*` folders (`finish_run`) are never touched."""
    recover_checkpoints(out)
    for p in (out / "checkpoints").glob(".*") if (out / "checkpoints").is_dir() else ():
        if (".tmp-" in p.name or p.name.startswith(".tokenizer-")
                or (".old-" in p.name and (out / "checkpoints" / p.name[1:].split(".old-")[0]).exists())):
            shutil.rmtree(p, ignore_errors=True)
    if not out.parent.is_dir():
        return
    for p in out.parent.glob(f".{out.name}.*-*"):
        kind = p.name[len(out.name) + 2:].split("-", 1)[0]
        if kind == "final" and (p / "config.json").is_file() and (p / "summary.json").is_file():
            continue  # a finished model whose swap into `out` was cut short: never deleted
        if (kind in ("final", "prepare") or (kind == "old" and out.is_dir())
                or (kind == "run" and not _resumable(p))):
            shutil.rmtree(p, ignore_errors=True)


def check_out_dir(c: TrainConfig) -> Path:
    """Where this run may live, as an absolute path; raises before any work is done.

    Resume: `out/checkpoints/last` must be resumable. A new run: a new path, an empty directory, a finished
    checkpoint (replaced whole at the end), or the leftovers of a run that never checkpointed; an unfinished
    run is never overwritten (resume it, or choose another --out). Other directories are refused
    (`check_checkpoint_target`)."""
    out = Path(c.out_dir).expanduser().absolute()
    last = out / "checkpoints" / "last"
    if c.resume:
        if _last_state(out) is None:
            raise InvalidRequestError(f"nothing to resume: {last} has no trainer_state.json. Start the run without "
                                      "--resume (or pass the --out of the run to continue).")
        return out
    state = _last_state(out)
    if state is not None and not (out / "config.json").is_file():
        try:
            step = json.loads(state.read_text()).get("step")
        except (OSError, ValueError, AttributeError):
            step = "?"
        raise InvalidRequestError(f"{out} holds an unfinished run (checkpoint at step {step}); continue it with "
                                  "--resume, or choose another --out (or delete it) to start over.")
    names = {p.name for p in out.iterdir()} if out.is_dir() else set()
    if names and names <= set(RUN_FILES):  # a run that stopped before its first checkpoint
        cwd = Path.cwd().absolute()
        if out == cwd or out in cwd.parents or out == Path.home().absolute():
            raise InvalidRequestError(f"refusing to train into {out}: it is a directory you are using; "
                                      "choose a new --out.")
        return out
    return check_checkpoint_target(out)


def check_resume_config(c: TrainConfig, saved: dict) -> None:
    """A resumed run must be the same run: every setting outside RESUME_FREE equals config.yaml's."""
    differ = [f"{k}: {saved.get(k)!r} -> {v!r}" for k, v in c.to_dict().items()
              if k not in RESUME_FREE and k in saved and saved[k] != v]
    if differ:
        raise InvalidRequestError(
            "--resume continues the same run exactly, but these settings differ from its config.yaml: "
            + "; ".join(differ) + ". Drop them, or start a new run from the checkpoint with "
            f"--init-from {Path(c.out_dir) / 'checkpoints' / 'last'}.")


def work_dir(out: Path, resume: bool) -> Path:
    """Where a run into `out` trains: `out` itself, or, for a new run into a finished checkpoint, the sibling
    `.<name>.run-<pid>`, swapped in for `out` by `finish_run` only when the run has succeeded (so a run that
    fails or is stopped leaves the finished one untouched)."""
    if not resume and (out / "config.json").is_file():
        return out.parent / f".{out.name}.run-{os.getpid()}"
    return out


def finish_run(work: Path, model: torch.nn.Module, mconfig: ModelConfig, dtype: torch.dtype, tokenizer_dir: Path,
               generation: dict, out: Path | None = None) -> None:
    """Write the final checkpoint beside `out` (default `work`), move the run's files from `work` into it, and
    swap it in for `out` whole; a separate `work` directory is then deleted. Raises `CheckpointWriteError`.

    Nothing finished is ever lost: if the run's files cannot be moved, they go back to `work` (still
    resumable); if the swap itself fails (an immutable, read-only or busy `out`), `out` is left as it was and
    the finished model is renamed to the visible `<name>.finished-<time>` beside it (which `clean_stale` never
    touches), and the error says where it is."""
    out = work if out is None else out
    final = out.parent / f".{out.name}.final-{os.getpid()}"
    shutil.rmtree(final, ignore_errors=True)
    write_checkpoint(final, model, mconfig, dtype, tokenizer_dir, generation)
    moved: list[str] = []
    try:
        for name in RUN_FILES:
            if (work / name).exists():
                os.replace(work / name, final / name)
                moved.append(name)
    except OSError as e:
        for name in moved:  # put the run back where --resume finds it
            try:
                os.replace(final / name, work / name)
            except OSError:
                pass
        if not any((final / name).exists() for name in RUN_FILES):
            shutil.rmtree(final, ignore_errors=True)
        raise write_error(work, e, work) from None
    old = out.parent / f".{out.name}.old-{os.getpid()}"
    try:
        if out.exists():
            os.replace(out, old)
        try:
            os.replace(final, out)
        except BaseException:
            if old.exists() and not out.exists():
                os.replace(old, out)
            raise
    except OSError as e:
        raise _kept_finished(final, out, e) from None
    shutil.rmtree(old, ignore_errors=True)
    if work != out:
        shutil.rmtree(work, ignore_errors=True)


def _kept_finished(final: Path, out: Path, e: OSError) -> CheckpointWriteError:
    """The error of a failed final swap, after renaming the finished model `final` to a visible, kept name."""
    reason = e.strerror or str(e) or type(e).__name__
    kept = final
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for i in range(100):
        candidate = out.parent / (f"{out.name}.finished-{stamp}" + ("" if not i else f"-{i}"))
        if candidate.exists():
            continue
        try:
            os.replace(final, candidate)
            kept = candidate
        except OSError:
            pass
        break
    return CheckpointWriteError(f"could not move the finished model into {out}: {reason}. The trained model is at "
                                f"{kept}; move it into place yourself (e.g. `mv {kept} {out}` once {out} can be "
                                "replaced).")
