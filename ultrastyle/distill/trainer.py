"""The training loop: Adam over a task's trained network, with checkpoints you can resume.

A run directory holds:

- ``checkpoint.pt``: step, the trained network (and the task's training-only
  ``helpers``, e.g. knowledge review's ABF modules), the optimizer (Adam
  moments), the RNG states and the resolved config; written to a temporary file,
  fsynced and renamed, so a crash never leaves a half-written checkpoint;
- ``log.csv`` and ``losses.png``: the loss curves (see `logs`).

Resuming loads the checkpoint and continues at its step. Because every batch
is a function of the data seed and the step (`data.CropStream`), and the RNG
and optimizer states are restored, a resumed run computes the same weights as
an uninterrupted one. Ctrl-C (SIGINT) or SIGTERM finishes the current step,
writes a checkpoint and returns with status ``"interrupted"``; a second one
aborts at once.
"""

from __future__ import annotations

import math
import pickle
import random
import signal
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch.utils.data import DataLoader, Dataset

from ultrastyle.distill.config import CHECKPOINT
from ultrastyle.distill.data import DataError, step_loader
from ultrastyle.distill.logs import LossLog, is_loss_log, plot_losses
from ultrastyle.distill.tasks import Task
from ultrastyle.errors import Setting, remedied
from ultrastyle.io.atomic import atomic_write, sweep_stale

LOG = "log.csv"
PLOT = "losses.png"
CHECKPOINT_FORMAT = "ultrastyle-train-checkpoint"
CHECKPOINT_VERSION = 1


class TrainingError(RuntimeError):
    """A run that cannot start or continue; the message says why and what to do."""


class RunFolderInUse(TrainingError):
    """A fresh run asked for a run folder that holds a checkpoint (refused before anything is written)."""


@dataclass(frozen=True)
class TrainOptions:
    """Optimisation and bookkeeping of one run (steps count optimizer updates)."""

    steps: int
    lr: float = 1e-4
    lr_schedule: str = "constant"  # or "cosine": lr * (1 + cos(pi * step / steps)) / 2, down to lr / 100
    warmup_steps: int = 0  # linear ramp from lr / warmup_steps over the first steps (Adam's first steps are large)
    batch_size: int = 4
    checkpoint_every: int = 200
    log_every: int = 10
    val_every: int = 0  # 0: validate at each checkpoint
    workers: int = 0
    device: str = "cpu"

    def __post_init__(self) -> None:  # `config.RunConfig.check` says the same of a whole run's settings, as `ConfigError`s
        if self.lr_schedule not in ("constant", "cosine"):
            raise ValueError(f"lr_schedule: expected constant or cosine, got {self.lr_schedule!r}")
        for name in ("steps", "batch_size", "checkpoint_every", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: expected at least 1, got {getattr(self, name)!r}")


@dataclass
class StepReport:
    """What a progress display needs after each step."""

    step: int
    steps: int
    losses: dict[str, float]
    seconds: float
    event: str = ""  # "checkpoint" / "val" when one was just written / run


@dataclass
class TrainResult:
    status: Literal["done", "interrupted"]
    step: int
    steps: int
    seconds: float
    last: dict[str, float] = field(default_factory=dict)
    val: dict[str, float] = field(default_factory=dict)
    signal: int | None = None  # what stopped an "interrupted" run: signal.SIGINT (Ctrl-C) or signal.SIGTERM


def learning_rate(opts: TrainOptions, step: int) -> float:
    """Learning rate of step ``step`` (0-based): a function of the step alone, so resuming keeps it."""
    ramp = min(1.0, (step + 1) / opts.warmup_steps) if opts.warmup_steps else 1.0
    if opts.lr_schedule == "constant":
        return opts.lr * ramp
    floor = opts.lr / 100
    return ramp * (floor + (opts.lr - floor) * (1 + math.cos(math.pi * min(step, opts.steps) / opts.steps)) / 2)


def atomic_save(obj: object, path: Path) -> None:
    """``torch.save`` to a temp file beside ``path``, fsync, rename (`ultrastyle.io.atomic`)."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_write(path) as f:
            torch.save(obj, f)
    except OSError as exc:
        if exc.filename is not None:
            raise
        # torch.save names no file ("[Errno 28] No space left on device"): the checkpoint's path goes with it
        raise OSError(exc.errno, exc.strerror or str(exc), str(path)) from exc


def read_checkpoint(path: Path) -> dict:
    """A training checkpoint, loaded with ``weights_only=True``; `TrainingError` if it is not one."""
    try:
        ck = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        # torch's own text for an unpickling error suggests weights_only=False, which would run pickled code: not repeated here
        why = ("not tensors alone, or not a torch file" if isinstance(exc, pickle.UnpicklingError)
               else f"{type(exc).__name__}: {' '.join(str(exc).split())[:160]}")  # fmt: skip
        raise TrainingError(
            f"{path}: damaged or not a checkpoint ({why}); delete it to start the run again from step 0, or start a new run in another folder"
        ) from exc
    if not isinstance(ck, dict) or ck.get("format") != CHECKPOINT_FORMAT:
        raise TrainingError(f"{path}: not an ultrastyle training checkpoint")
    if ck.get("version", 0) > CHECKPOINT_VERSION:
        raise TrainingError(f"{path}: checkpoint version {ck.get('version')} is newer than this ultrastyle reads")
    return ck


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: Mapping) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _next_batch(batches: Iterator[dict]) -> dict:
    """The next batch; a `DataError` from a loader worker as its own message (torch's carries the worker's traceback)."""
    try:
        return next(batches)
    except DataError as exc:
        text = str(exc)
        if "Original Traceback" not in text:
            raise
        raise DataError(text.strip().splitlines()[-1].partition(": ")[2] or text) from None


class _StopOnSignal:
    """The first SIGINT or SIGTERM sets a flag (the loop stops after its step); the second goes to the handler before.

    SIGTERM is what `kill`, systemd and job schedulers (SLURM, Kubernetes) send before they kill: a checkpoint is written.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.requested = False
        self.signum: int | None = None
        self._old: dict[int, Any] = {}

    def __enter__(self) -> _StopOnSignal:
        if threading.current_thread() is threading.main_thread():
            for signum in self.SIGNALS:
                if signal.getsignal(signum) is not signal.SIG_IGN:  # a signal ignored by the parent stays ignored
                    self._old[signum] = signal.signal(signum, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested:
            old = self._old.get(signum)
            if callable(old):
                old(signum, frame)  # Python's KeyboardInterrupt for SIGINT; the command line's for SIGTERM
            raise KeyboardInterrupt
        self.requested, self.signum = True, signum

    def __exit__(self, *exc: object) -> None:
        for signum, old in self._old.items():
            if old is not None:  # None: set outside Python, which cannot be put back
                signal.signal(signum, old)
        self._old = {}


def refuse_overwrite(run_dir: str | Path, resume: bool) -> None:
    """`TrainingError` when ``run_dir`` holds a checkpoint that a fresh run (not ``resume``) would overwrite."""
    if not resume and (Path(run_dir) / CHECKPOINT).exists():
        raise remedied(RunFolderInUse(f"{run_dir} already holds a checkpoint; resume it (resume=True) or choose another run folder"),
                       Setting("resume", True))  # fmt: skip


class Trainer:
    """Runs ``task`` for ``options.steps`` steps over ``stream``, checkpointing into ``run_dir``.

    ``stream`` is an endless dataset of batch items (`data.PairStream`);
    ``val_data`` (optional) a finite one, evaluated at ``val_every`` steps;
    ``config`` is stored in every checkpoint (the resolved run configuration);
    ``on_step`` receives a `StepReport` after every step.
    """

    def __init__(
        self,
        task: Task,
        run_dir: str | Path,
        options: TrainOptions,
        stream: Dataset,
        *,
        val_data: Dataset | None = None,
        config: Mapping | None = None,
        on_step: Callable[[StepReport], None] | None = None,
    ) -> None:
        self.task, self.options, self.stream, self.val_data = task, options, stream, val_data
        self.run_dir = Path(run_dir)
        self.config = dict(config or {})
        self.on_step = on_step
        self.device = torch.device(options.device)
        self.optimizer: torch.optim.Optimizer | None = None

    def lr_at(self, step: int) -> float:
        return learning_rate(self.options, step)

    @property
    def checkpoint_path(self) -> Path:
        return self.run_dir / CHECKPOINT

    def _save(self, step: int, seconds: float) -> None:
        assert self.optimizer is not None
        atomic_save(
            {
                "format": CHECKPOINT_FORMAT,
                "version": CHECKPOINT_VERSION,
                "step": step,
                "steps": self.options.steps,
                "seconds": seconds,
                "trained": {k: v.detach().cpu() for k, v in self.task.trained.state_dict().items()},
                **({"helpers": {k: v.detach().cpu() for k, v in self.task.helpers.state_dict().items()}}
                   if self.task.helpers is not None else {}),  # fmt: skip
                "optimizer": self.optimizer.state_dict(),
                "rng": _rng_state(),
                "config": self.config,
            },
            self.checkpoint_path,
        )
        plot_losses(self.run_dir / LOG, self.run_dir / PLOT, title=str(self.run_dir.name))

    def _checkpoint(self, log: LossLog, step: int, seconds: float, sums: dict[str, float], count: int) -> int:
        if count:  # the partial log interval, so the log reaches the checkpoint
            log.append(step, "train", seconds, self.lr_at(step - 1), {k: v / count for k, v in sums.items()})
        self._save(step, seconds)
        return step

    def _load(self) -> tuple[int, float]:
        assert self.optimizer is not None
        ck = read_checkpoint(self.checkpoint_path)
        try:
            self.task.trained.load_state_dict(ck["trained"])
            if self.task.helpers is not None:  # training-only modules (e.g. knowledge review's ABF)
                self.task.helpers.load_state_dict(ck["helpers"])
            self.optimizer.load_state_dict(ck["optimizer"])
        except (RuntimeError, ValueError, KeyError) as exc:
            raise TrainingError(
                f"{self.checkpoint_path}: does not fit this run ({exc}); was it written with another architecture or task?"
            ) from exc
        _set_rng_state(ck["rng"])
        return int(ck["step"]), float(ck.get("seconds", 0.0))

    @torch.no_grad()
    def validate(self) -> dict[str, float]:
        """Mean of each loss over ``val_data`` (eval mode, no gradients)."""
        if not self.val_data:
            return {}
        self.task.train(False)
        sums: dict[str, float] = {}
        n = 0
        loader = DataLoader(self.val_data, batch_size=self.options.batch_size)
        for batch in loader:
            losses = self.task({k: v.to(self.device) for k, v in batch.items()})
            m = next(iter(batch.values())).shape[0]
            for k, v in losses.items():
                sums[k] = sums.get(k, 0.0) + float(v) * m
            n += m
        self.task.train(True)
        return {k: v / n for k, v in sums.items()}

    def fit(self, *, resume: bool = False) -> TrainResult:
        """Train to ``options.steps``; with ``resume``, continue from the run's checkpoint if there is one."""
        opts = self.options
        self.run_dir.mkdir(parents=True, exist_ok=True)
        sweep_stale(self.run_dir)  # checkpoints of a run killed mid-save
        refuse_overwrite(self.run_dir, resume)
        self.task.to(self.device)
        self.task.train(True)
        self.optimizer = torch.optim.Adam(self.task.parameters_to_train(), lr=opts.lr)
        start, spent = 0, 0.0
        if resume and self.checkpoint_path.exists():
            start, spent = self._load()
        log_path = self.run_dir / LOG
        if start == 0 and log_path.exists():  # an earlier run's (its checkpoint deleted): its columns and rows are not this run's
            if not is_loss_log(log_path):  # someone's own file, in a run folder they chose
                raise remedied(RunFolderInUse(f"{log_path} is no loss log of a run, and a run writes its log there; move it away, or "
                                              "choose another run folder (run_dir)"), Setting("run_dir"))  # fmt: skip
            log_path.unlink()
        log = LossLog(log_path)
        log.truncate(start)  # rows after the checkpoint belong to lost steps
        if start >= opts.steps:
            return TrainResult("done", start, opts.steps, spent)
        if not self.checkpoint_path.exists():
            self._save(0, 0.0)  # a run folder always holds a resumable state, even before step 1

        sums: dict[str, float] = {}
        count = 0
        last: dict[str, float] = {}
        val: dict[str, float] = {}
        t0 = time.perf_counter() - spent
        saved_at = start
        loader = step_loader(self.stream, opts.batch_size, start, opts.steps, opts.workers)
        batches = None
        step = start
        with _StopOnSignal() as stop:
            try:
                batches = iter(loader)
                while step < opts.steps and not stop.requested:
                    batch = _next_batch(batches)
                    losses = self.task({k: v.to(self.device, non_blocking=True) for k, v in batch.items()})
                    loss = losses["loss"]
                    value = float(loss.detach())
                    if not math.isfinite(value):
                        raise TrainingError(
                            f"loss became {value} at step {step + 1}; lower the learning rate "
                            f"(now {opts.lr:g}) and resume from the last checkpoint (step {saved_at})"
                        )
                    lr = self.lr_at(step)
                    for group in self.optimizer.param_groups:
                        group["lr"] = lr
                    self.optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    self.optimizer.step()
                    step += 1
                    last = {k: float(v.detach()) for k, v in losses.items()}
                    for k, v in last.items():
                        sums[k] = sums.get(k, 0.0) + v
                    count += 1
                    event = ""
                    now = time.perf_counter() - t0
                    if step % opts.log_every == 0 or step == opts.steps:
                        log.append(step, "train", now, lr, {k: v / count for k, v in sums.items()})
                        sums, count = {}, 0
                    at_checkpoint = step % opts.checkpoint_every == 0 or step == opts.steps
                    if self.val_data and ((opts.val_every and step % opts.val_every == 0) or (not opts.val_every and at_checkpoint)):
                        val = self.validate()
                        log.append(step, "val", now, lr, val)
                        event = "val"
                    if at_checkpoint or stop.requested:
                        saved_at = self._checkpoint(log, step, now, sums, count)
                        sums, count = {}, 0
                        event = "checkpoint"
                    if self.on_step:
                        self.on_step(StepReport(step, opts.steps, last, now, event))
            finally:
                # Shut the workers down now: an exception's traceback holds the iterator past this frame, and at exit
                # multiprocessing would join workers that ignore the SIGTERM it sends them (`data._worker_init`): a hang.
                shutdown = getattr(batches, "_shutdown_workers", None)  # torch's multi-process iterator
                if shutdown is not None:
                    shutdown()
                batches = loader = None  # noqa: F841
            seconds = time.perf_counter() - t0
            if saved_at != step:  # a stop requested by the last step's callback
                self._checkpoint(log, step, seconds, sums, count)
        status: Literal["done", "interrupted"] = "done" if step >= opts.steps else "interrupted"
        return TrainResult(status, step, opts.steps, seconds, last, val, stop.signum if status == "interrupted" else None)
