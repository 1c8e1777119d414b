"""The one trainer. Read it top to bottom: it drives every algorithm the same way.

Each iteration: draw a meta-batch of episodes, ask the algorithm for ``(loss, metrics)``, step the
outer optimizer. Around that: periodic validation, atomic checkpoints (every ``ckpt_every``
iterations, at chosen training minutes, and at exit, Ctrl-C and SIGTERM included), exact resume
(model, optimizer and every RNG state), ``metrics.jsonl``, a learning-curve PNG and, at the end, the test evaluation in
``results.json``. A non-finite loss or gradient stops the run before it can touch a checkpoint.
With ``train.ema_decay`` the trainer also keeps a moving average of the weights
(:func:`moving_average`); validation and testing then score the average (``eval.weights``).

Beyond episodes, optional hooks let other data sources and objectives (e.g. deep domain adaptation,
:mod:`metatl.transfer`) use this same loop:

- a batch may be any structure of tensors (lists, tuples, dicts, objects with ``.to``); it is moved
  to the device recursively (:func:`to_device`);
- a data source with ``to(device)`` is moved once (its data then lives on the device);
- a data source with ``evaluate(learner, episodes, seed, progress, device, desc)`` is scored by it
  instead of :func:`~metatl.engine.evaluator.evaluate` (same returned dict, plus an optional
  ``record`` of extra ``results.json`` fields);
- a learner with ``param_groups()`` chooses its optimizer groups (an ``lr_scale`` key in a group
  multiplies the scheduled learning rate); a learner with ``set_progress(p)`` is told the training
  progress ``p`` in [0, 1] before each step (:func:`progress_at`: iterations, or the time budget
  when it ends first; for schedules such as DANN's).

Records go to ``metrics.jsonl`` and to the loggers of ``train.logger`` (TensorBoard, MLflow:
:mod:`metatl.engine.loggers`), and to ``hooks``: objects with the loggers' ``log(record)`` and
``close(status)``, such as a sweep's pruning hook. A hook stops the run by raising :class:`StopRun`
from ``log``: the trainer writes ``last.pt``, closes its loggers and lets it through. The loggers
are opened when training starts and closed by :meth:`Trainer.close_loggers` (``metatl train``
calls it after the test and the plots, so that MLflow stores them).

Under ``torchrun`` or with ``train.processes > 1`` (:mod:`metatl.engine.distributed`) the executor
splits each meta-batch over the processes (:mod:`metatl.engine.executors.processes`) and the loop
stays as it is; process 0 alone logs, validates and checkpoints.
"""

from __future__ import annotations

import json
import math
import platform
import signal
import sys
import threading
import time
from pathlib import Path

import torch
from torch.optim.swa_utils import AveragedModel
from tqdm.auto import tqdm

from .. import __version__
from .. import checkpoint as ckpt_io
from ..build import build_learner, build_sampler, task_spec
from ..config import Config, ConfigError, from_dict
from . import distributed as ddp
from .divergence import DivergenceError, DivergenceGuard
from .evaluator import evaluate
from .executors import make_executor
from .executors.processes import over_processes
from .loggers import check_available, open_loggers
from .recompute import set_inner_checkpoint
from .run import provenance, trim_metrics
from .runtime import Runtime, allow_tf32, keep_freed_memory  # noqa: F401 (the last two: re-exported)


def to_device(batch, device):
    """``batch`` with every tensor moved to ``device``: recurses into lists, tuples and dicts, and
    calls ``.to(device)`` on anything else that has it (tensors, :class:`~metatl.data.Episode`)."""
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):  # a namedtuple
        return type(batch)(*(to_device(b, device) for b in batch))
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(b, device) for b in batch)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    return batch.to(device) if callable(getattr(batch, "to", None)) else batch


class NonFiniteLossError(DivergenceError):
    """The loss or the meta-gradient became NaN or infinite."""


class Interrupted(KeyboardInterrupt):
    """A second stop signal before the iteration ended: training stops at once, and no checkpoint
    is written of a step cut in the middle (``last.pt`` stays as it was)."""


class StopSignals:
    """While training (a context manager): Ctrl-C (SIGINT) and SIGTERM (``kill``'s, or a cluster
    scheduler's before it ends a job) ask the run to stop at the end of the current iteration,
    where a ``KeyboardInterrupt(signal name)`` is raised (:meth:`check`; the trainer asks all its
    processes) and the trainer writes ``last.pt``: a step cut in the middle (part of the
    optimizer's update applied) is never checkpointed, so the run resumes exactly. A second signal before then stops at once
    (:class:`Interrupted`, no checkpoint). :meth:`shield` ignores both signals from then on, while
    the checkpoint is written; the previous handlers come back on exit. Signal handlers belong to
    the main thread: elsewhere nothing changes."""

    def __init__(self):
        self.by: str | None = None
        self.previous: dict = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGINT, signal.SIGTERM):
                self.previous[s] = signal.getsignal(s)
                signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self.previous.items():
            signal.signal(s, handler if handler is not None else signal.SIG_DFL)

    def _handle(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        if self.by is not None:
            raise Interrupted(name)
        self.by = name
        print(f"{name}: stopping after this iteration ({name} again: at once, without a checkpoint)", file=sys.stderr)

    def check(self) -> None:
        """Raise ``KeyboardInterrupt`` if a stop was asked for (the trainer asks all its processes
        at once instead, so that they stop at the same iteration)."""
        if self.by is not None:
            raise KeyboardInterrupt(self.by)

    def shield(self) -> None:
        for s in self.previous:
            signal.signal(s, signal.SIG_IGN)


class StopRun(Exception):
    """Raised by a hook to stop training now (e.g. a pruned sweep trial): the trainer writes
    ``last.pt`` and closes its loggers (status ``stopped``) before it propagates."""


def hardware(device: str = "cpu") -> str:
    """The CPU model and thread count, and the GPU's name when ``device`` is a CUDA device."""
    name = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    cpu = f"{name}, {torch.get_num_threads()} threads"
    if str(device).startswith("cuda") and torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(torch.device(device))} (CPU: {cpu})"
    return cpu


def moving_average(learner, decay: float) -> AveragedModel:
    """An exponential moving average of ``learner``'s weights and floating-point buffers
    (``torch.optim.swa_utils.AveragedModel``; update it with ``update_parameters(learner)``).

    The first update copies the weights. After ``n`` updates the next one moves the average by
    ``1 - d`` towards the weights, with ``d = min(decay, (1 + n) / (10 + n))``: the warm-up of
    TensorFlow's ``ExponentialMovingAverage(num_updates=...)``, so that early in a short run the
    average follows the weights instead of staying near the initial ones. Integer buffers (counters)
    are copied, not averaged.
    """

    def update(averaged, current, n):
        d = min(decay, (1.0 + float(n)) / (10.0 + float(n)))
        for a, c in zip(averaged, current):
            if a.is_floating_point():
                a.lerp_(c, 1.0 - d)
            else:
                a.copy_(c)

    return AveragedModel(learner, multi_avg_fn=update, use_buffers=True)


def check_device(name: str) -> torch.device:
    """``train.device`` as a ``torch.device``, or a ConfigError that says what to set instead;
    ``auto`` is CUDA when torch sees a device, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise ConfigError(
            f"train.device={name!r} is not a device torch knows; use cpu, cuda or cuda:N (--set train.device=cpu)."
        ) from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(
            f"train.device={name!r} but this torch has no CUDA device "
            f"(torch.cuda.is_available() is False); train on the CPU with "
            f"--set train.device=cpu."
        )
    return device


def make_optimizer(cfg: Config, params):
    t = cfg.train
    if t.optimizer == "adam":
        if t.momentum:
            raise ConfigError(
                f"train.momentum={t.momentum} applies to train.optimizer=sgd only; Adam has "
                f"its own moments (set train.momentum=0 or train.optimizer=sgd)."
            )
        return torch.optim.Adam(params, lr=t.lr, weight_decay=t.weight_decay)
    if t.optimizer == "sgd":
        return torch.optim.SGD(params, lr=t.lr, momentum=t.momentum, weight_decay=t.weight_decay)
    raise ConfigError(f"unknown train.optimizer {t.optimizer!r}; use adam or sgd.")


CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}  # train.budget_clock


def progress_at(cfg: Config, iteration: int, train_seconds: float = 0.0) -> float:
    """How far training has gone, in [0, 1]: the larger of the iteration fraction and, under
    ``train.time_budget_min``, the fraction of the time budget spent (a run ends at whichever
    limit comes first, so schedules that follow progress end with it)."""
    t = cfg.train
    frac = iteration / max(1, t.iterations)
    if t.time_budget_min:
        frac = max(frac, train_seconds / (60 * t.time_budget_min))
    return min(1.0, frac)


def lr_at(cfg: Config, iteration: int, train_seconds: float = 0.0) -> float:
    """The outer learning rate at this point of training (``train.lr_schedule``)."""
    t = cfg.train
    if t.lr_schedule == "constant":
        return t.lr
    if t.lr_schedule == "linear":  # the Reptile schedule: lr -> lr_final over the run
        return t.lr + (t.lr_final - t.lr) * progress_at(cfg, iteration, train_seconds)
    if t.lr_schedule == "cosine":  # lr -> lr_final along half a cosine over the run
        frac = progress_at(cfg, iteration, train_seconds)
        return t.lr_final + (t.lr - t.lr_final) * 0.5 * (1 + math.cos(math.pi * frac))
    if t.lr_schedule == "step":  # ProtoNets / Relation Net: lr * gamma every lr_step_every iterations
        if not t.lr_step_every or t.lr_step_every < 1:
            raise ConfigError("train.lr_schedule: step needs train.lr_step_every >= 1 (e.g. 2000).")
        return t.lr * t.lr_gamma ** (iteration // t.lr_step_every)
    raise ConfigError(f"unknown train.lr_schedule {t.lr_schedule!r}; use constant, linear, cosine or step.")


# where the data lives, not what it is: a resumed run may read it from elsewhere without naming it
RESUME_FREE_KEYS = ("data.data_dir", "data.download")


def _flatten(config: dict) -> dict:
    """``{"section.key": value}`` (and ``{"name": value}`` for top-level values)."""
    flat = {}
    for section, values in config.items():
        if isinstance(values, dict):
            flat.update({f"{section}.{key}": value for key, value in values.items()})
        else:
            flat[section] = values
    return flat


def config_changes(stored: dict, current: dict) -> dict:
    """``{"section.key": (stored value, current value)}`` for every config value that differs."""
    a, b = _flatten(stored), _flatten(current)
    return {k: (a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)}


class Trainer:
    """Meta-trains ``cfg`` into the run folder ``out_dir``."""

    def __init__(self, cfg: Config, out_dir, progress: bool = True, hooks=()):
        self.cfg, self.out = cfg, Path(out_dir)
        self.progress = progress
        t = cfg.train
        self.rank, self.world = ddp.rank(), ddp.world_size()
        if self.rank == 0:
            check_available(t.logger)  # a missing package stops the run now, not after the first steps
        self.hooks, self.loggers = list(hooks), []
        self.device = check_device(t.device)
        self.runtime = Runtime(
            t.num_threads, self.device, t.precision, t.keep_freed_memory, t.seed, ddp.local_world_size()
        )
        self.keeps_freed_memory = self.runtime.keeps_freed_memory
        self.device = ddp.local_device(self.device)
        self.train_tasks = build_sampler(cfg.data, "train")
        if callable(getattr(self.train_tasks, "to", None)):  # a data source that can live on the device
            self.train_tasks = self.train_tasks.to(self.device)
        self.learner = build_learner(cfg, self.train_tasks).to(self.device)
        if not any(p.requires_grad for p in self.learner.parameters()):
            raise ConfigError(
                f"nothing to train: algorithm {cfg.algorithm['name']!r} with backbone "
                f"{cfg.model['name']!r} has no trainable parameters (a backbone without weights "
                f"suits only algorithms that learn on top of it). Choose a backbone with weights "
                f"(`metatl list` shows them)."
            )
        set_inner_checkpoint(self.learner, t.inner_checkpoint)
        self.executor = over_processes(
            make_executor(t.executor, self.learner, self.device.type, t.precision), self.learner, t.seed
        )
        groups = getattr(self.learner, "param_groups", None)
        self.optimizer = make_optimizer(cfg, groups() if callable(groups) else self.learner.parameters())
        self.ema = moving_average(self.learner, t.ema_decay) if t.ema_decay else None
        self.generator = torch.Generator().manual_seed(t.seed)
        self.iteration, self.train_seconds, self.best = 0, 0.0, None
        self.snapshots_done: list = []
        self.resumed_changes: dict | None = None  # set by resume(): the accepted config changes
        self.guard = DivergenceGuard(t.divergence_factor)
        self.saved_last: int | None = None  # the iteration of the last.pt this trainer wrote or resumed
        self._val_tasks = self._test_tasks = None

    # -- state ------------------------------------------------------------------------------
    def state(self) -> dict:
        return {
            "config": self.cfg.to_dict(),
            "task": task_spec(self.train_tasks),
            "learner": self.learner.state_dict(),
            "averaged": self.ema.module.state_dict() if self.ema is not None else None,
            "averaged_updates": int(self.ema.n_averaged) if self.ema is not None else 0,
            "optimizer": self.optimizer.state_dict(),
            "iteration": self.iteration,
            "train_seconds": self.train_seconds,
            "best": self.best,
            "snapshots_done": self.snapshots_done,
            "generator": self.generator.get_state(),
            "rng": ckpt_io.rng_state(),
            "divergence": self.guard.state(),
            "metatl_version": __version__,
            "torch_version": str(torch.__version__),
            "format": ckpt_io.FORMAT,
        }

    def save(self, name: str = "last.pt") -> Path:
        path = self.out / name
        problem = self.guard.weights(self.learner.parameters())
        if problem:  # never over a checkpoint
            raise DivergenceError(self._stop_message(problem, f"{name} was not written"))
        if self.rank == 0:  # the processes hold the same state; one writes it ...
            ckpt_io.save_atomic(self.state(), path)
            if name == "last.pt":
                self.saved_last = self.iteration
        else:  # ... except their own random streams, kept beside it for an exact resume
            ckpt_io.save_atomic(
                {"iteration": self.iteration, "rng": ckpt_io.rng_state()}, path.with_name(f"{path.name}.rng{self.rank}")
            )
        return path

    def resume(self, path=None, allow=()) -> None:
        """Continue the run of checkpoint ``path`` (default ``last.pt`` in the run folder) exactly.

        The whole config is compared with the checkpoint's: a change is refused unless its key is
        in ``allow`` (e.g. ``["train.iterations"]`` to train longer). Accepted changes are appended
        to ``resume_log.jsonl`` in the run folder, with the iteration they start at."""
        path = Path(path) if path else self.out / "last.pt"
        state = ckpt_io.load(path)
        changes = config_changes(
            from_dict(state["config"]).to_dict(), self.cfg.to_dict()
        )  # defaults for keys added since
        refused = {k: v for k, v in changes.items() if k not in allow and k not in RESUME_FREE_KEYS}
        if refused:
            listed = "; ".join(f"{k}: run {a!r}, now {b!r}" for k, (a, b) in refused.items())
            names = " ".join(f"--allow-change {k}" for k in refused)
            raise ConfigError(
                f"cannot resume from {path}: it was trained with another config ({listed}). "
                f"Resume with the run's own config.yaml ({self.out / 'config.yaml'}); to continue "
                f"with the change on purpose, name it: {names} (it is recorded in "
                f"resume_log.jsonl); or start a new run with a different --out."
            )
        try:
            self.learner.load_state_dict(state["learner"])
        except RuntimeError as err:
            raise ConfigError(
                f"cannot resume from {path}: its weights do not fit the model of the changed config "
                f"({str(err).splitlines()[0]})."
            ) from err
        self.optimizer.load_state_dict(state["optimizer"])
        self._load_average(state)
        self.iteration, self.train_seconds = state["iteration"], state["train_seconds"]
        self.best, self.snapshots_done = state["best"], state.get("snapshots_done", [])
        self.generator.set_state(state["generator"])
        ckpt_io.set_rng_state(state["rng"])
        self.resumed_changes = changes
        self.guard.load_state(state.get("divergence"))
        self.saved_last = self.iteration
        if self.rank == 0:  # the interrupted run's lines after the checkpoint are logged again
            trim_metrics(self.out / "metrics.jsonl", self.iteration)
            record = {
                "date": provenance()["date"],
                "checkpoint": path.name,
                "iteration": self.iteration,
                "changes": {k: {"run": a, "now": b} for k, (a, b) in changes.items()},
            }
            with open(self.out / "resume_log.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")
        if self.rank > 0:
            own = path.with_name(f"{path.name}.rng{self.rank}")
            mine = ckpt_io.read(own) if own.exists() else None
            if mine is not None and mine["iteration"] == self.iteration:
                ckpt_io.set_rng_state(mine["rng"])
            else:  # e.g. a single-process checkpoint resumed in several: a fresh stream per process
                torch.manual_seed(self.cfg.train.seed + 1000 * self.rank + self.iteration)

    def _load_average(self, state: dict) -> None:
        """The checkpoint's moving average into ``self.ema``; none in it (a run without
        ``train.ema_decay``) starts a fresh average at the next step."""
        if self.ema is not None and state.get("averaged") is not None:
            self.ema.module.load_state_dict(state["averaged"])
            self.ema.n_averaged.fill_(state["averaged_updates"])

    @property
    def scored(self):
        """The learner that validation and testing score: the moving average of the weights when
        the run keeps one and ``eval.weights`` is ``averaged``, else the trained learner."""
        if self.ema is not None and self.cfg.eval.weights == "averaged":
            return self.ema.module
        return self.learner

    # -- logging ----------------------------------------------------------------------------
    def log(self, record: dict) -> None:
        if self.rank != 0:
            return
        with open(self.out / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
        for logger in self.loggers:
            logger.log(record)

    def open_loggers(self) -> None:
        """``train.logger``'s loggers and the hooks, on process 0 (a resumed run continues its own)."""
        if self.rank == 0 and not self.loggers:
            resumed_at = None if self.resumed_changes is None else self.iteration
            self.loggers = [*open_loggers(self.cfg, self.out, resumed_at), *self.hooks]
        self._paced = (self.iteration, self.train_seconds)

    def close_loggers(self, status: str = "finished") -> None:
        """Close the loggers (``finished``, ``failed`` or ``stopped``); a second call does nothing."""
        loggers, self.loggers = self.loggers, []
        for logger in loggers:
            logger.close(status)

    def pace(self) -> dict:
        """The scheduled outer learning rate and the episodes per second of training time
        (``train_seconds``, on ``train.budget_clock``) since the last call or the start of training."""
        group = self.optimizer.param_groups[0]
        done, seconds = self._paced
        self._paced = (self.iteration, self.train_seconds)
        rate = self.cfg.train.meta_batch * (self.iteration - done) / max(self.train_seconds - seconds, 1e-9)
        return {"lr": group["lr"] / group.get("lr_scale", 1.0), "episodes_per_s": rate}

    @property
    def val_tasks(self):
        if self._val_tasks is None:
            self._val_tasks = build_sampler(self.cfg.data, "val")
        return self._val_tasks

    @property
    def test_tasks(self):
        if self._test_tasks is None:
            self._test_tasks = build_sampler(self.cfg.data, "test")
        return self._test_tasks

    def check_splits(self) -> None:
        """Build the episode source of every split the run uses (validation when ``val_every``, and
        test) before the first step: a split too small for the episode shape (ways, shots,
        queries) stops the run now, with the data set's message, instead of after training."""
        if self.cfg.train.val_every:
            _ = self.val_tasks  # the properties build (and check) the split
        _ = self.test_tasks

    def _evaluate(self, tasks, episodes: int, seed: int, inner_steps, progress: bool, desc: str) -> dict:
        return evaluate_on(self.scored, tasks, self.cfg, episodes, seed, inner_steps, progress, self.device, desc)

    def validate(self) -> dict:
        c = self.cfg
        res = self._evaluate(self.val_tasks, c.train.val_episodes, c.eval.seed + 1, c.eval.inner_steps, False, "eval")
        record = {
            "iteration": self.iteration,
            "train_minutes": self.train_seconds / 60,
            f"val_{res['metric']}": res["mean"],
            "val_ci95": res["ci95"],
        }
        self.log(record)
        better = self.best is None or (
            res["mean"] > self.best if res["metric"] == "accuracy" else res["mean"] < self.best
        )
        if better:
            self.best = res["mean"]
            self.save("best.pt")
        return record

    # -- the loop ---------------------------------------------------------------------------
    def step(self) -> dict:
        batch = to_device(self.train_tasks.sample_batch(self.cfg.train.meta_batch, self.generator), self.device)
        for group in self.optimizer.param_groups:
            group["lr"] = lr_at(self.cfg, self.iteration, self.train_seconds) * group.get("lr_scale", 1.0)
        if callable(getattr(self.learner, "set_progress", None)):
            self.learner.set_progress(progress_at(self.cfg, self.iteration, self.train_seconds))
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.cfg.train.precision == "bfloat16"):
            loss, metrics = self.executor(self.learner, batch)
        if not torch.isfinite(loss):
            raise NonFiniteLossError(self._stop_message("the loss became NaN or infinite"))
        problem = self.guard.loss(float(metrics.get("loss", loss.detach())))
        if problem:
            raise DivergenceError(self._stop_message(problem))
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        params = [p for p in self.learner.parameters() if p.grad is not None]
        clip = self.cfg.train.grad_clip
        norm = torch.nn.utils.clip_grad_norm_(params, clip if clip else math.inf)
        if not torch.isfinite(norm):
            raise NonFiniteLossError(self._stop_message("the meta-gradient became NaN or infinite"))
        try:
            self.optimizer.step()
        except RuntimeError as err:  # e.g. Adam's step size lr / (1 - beta1) beyond float32's range
            if "overflow" not in str(err):
                raise
            raise DivergenceError(
                self._stop_message(f"the optimizer step overflowed ({err}; train.lr={self.cfg.train.lr:g})")
            ) from None
        problem = self.guard.weights(self.learner.parameters())
        if problem:
            raise DivergenceError(self._stop_message(problem))
        if self.ema is not None:
            self.ema.update_parameters(self.learner)
        return {**metrics, "grad_norm": float(norm)}

    def _stop_message(self, problem: str, written: str = "") -> str:
        """What happened, what is on disk, what to do: every clause true of the run folder now."""
        last = self.out / "last.pt"
        if last.exists():
            at = f" (iteration {self.saved_last})" if self.saved_last is not None else ""
            kept = f"the last good checkpoint {last}{at} is untouched"
        else:
            kept = "no checkpoint was written"
        return (
            f"training diverged in step {self.iteration + 1}: {problem}; {written + ', ' if written else ''}"
            f"{kept}. Lower train.lr or the inner learning rate, or set train.grad_clip (e.g. --set "
            f"train.grad_clip=10), then start again with --overwrite"
            + (
                ", or continue from that checkpoint with --resume and the change named (e.g. --allow-change train.lr)."
                if last.exists()
                else "."
            )
        )

    def fit(self) -> Trainer:
        c, t = self.cfg, self.cfg.train
        self.check_splits()
        self.out.mkdir(parents=True, exist_ok=True)
        fresh = self.resumed_changes is None
        if self.rank == 0 and (fresh or self.resumed_changes or not (self.out / "config.yaml").exists()):
            c.dump(self.out / "config.yaml")  # resumed unchanged: the record stays as it was written
            if self.iteration == 0:  # a fresh run: no lines of a run this one replaces
                (self.out / "metrics.jsonl").unlink(missing_ok=True)
        budget = t.time_budget_min * 60 if t.time_budget_min else math.inf
        clock = CLOCKS[t.budget_clock]
        self.guard.weights(self.learner.parameters())  # the reference norm, on a fresh run
        self.open_loggers()
        bar = tqdm(
            total=t.iterations,
            initial=self.iteration,
            desc=c.name,
            disable=not self.progress or self.rank != 0,
            dynamic_ncols=True,
        )
        with StopSignals() as signals:
            self._train_until(budget, clock, bar, signals)
        bar.close()
        self.save()
        return self

    def _train_until(self, budget: float, clock, bar, signals: StopSignals) -> None:
        t = self.cfg.train
        try:
            while self.iteration < t.iterations and self.train_seconds < budget:
                self.runtime.rebalance()
                start = clock()
                metrics = self.step()
                # the processes agree on the time spent (the slowest's), so that they stop together
                self.train_seconds = ddp.max_value(self.train_seconds + clock() - start, self.device)
                self.iteration += 1
                bar.update(1)
                if self.iteration % t.log_every == 0 or self.iteration == 1:
                    self.log(
                        {"iteration": self.iteration, "train_seconds": self.train_seconds, **metrics, **self.pace()}
                    )
                    bar.set_postfix({k: f"{v:.3g}" for k, v in metrics.items() if k != "grad_norm"})
                for minutes in t.snapshot_minutes:
                    if minutes not in self.snapshots_done and self.train_seconds >= minutes * 60:
                        self.snapshots_done.append(minutes)
                        self.save(f"snapshot_{minutes:g}min.pt")
                if t.val_every and self.iteration % t.val_every == 0 and self.rank == 0:
                    record = self.validate()
                    bar.write(" ".join(f"{k}={v:.4g}" for k, v in record.items()))
                if t.ckpt_every and self.iteration % t.ckpt_every == 0:
                    self.save()
                if ddp.max_value(float(signals.by is not None), self.device):  # all processes stop together
                    raise KeyboardInterrupt(signals.by or "a stop signal to another process")
        except Interrupted:  # a second signal: mid-step, nothing consistent to write
            self.close_loggers("stopped")
            raise
        except (KeyboardInterrupt, StopRun) as stop:  # stopped from outside (Ctrl-C, SIGTERM), or by a hook
            signals.shield()
            self.save()
            bar.close()
            self.close_loggers("stopped")
            if self.rank == 0 and isinstance(stop, KeyboardInterrupt):
                print(
                    f"stopped at iteration {self.iteration}; {self.out / 'last.pt'} holds the run: continue "
                    f"it with the same command, --out {self.out} and --resume",
                    file=sys.stderr,
                )
            raise
        except BaseException:
            self.close_loggers("failed")
            raise

    def test(self, sampler=None, checkpoint: str | None = None, name: str = "results.json") -> dict:
        """Evaluate on the fixed test episodes and write ``name`` (default ``results.json``) in the
        run folder."""
        results = score_on_test(
            self.cfg,
            self.scored,
            sampler or self.test_tasks,
            self.device,
            self.progress,
            self.iteration,
            self.train_seconds,
            checkpoint or str(self.out / "last.pt"),
            "averaged" if self.scored is not self.learner else "raw",
        )
        write_results(results, self.out / name)
        return results


def evaluate_on(
    learner, tasks, cfg: Config, episodes: int, seed: int, inner_steps, progress: bool, device, desc: str = "eval"
) -> dict:
    """The data source's own ``evaluate`` when it has one, else the episodic evaluator."""
    if callable(getattr(tasks, "evaluate", None)):
        return tasks.evaluate(learner, episodes=episodes, seed=seed, progress=progress, device=device, desc=desc)
    return evaluate(learner, tasks, episodes, seed, inner_steps, cfg.eval.transductive, progress, device, desc=desc)


def score_on_test(
    cfg: Config,
    learner,
    tasks,
    device,
    progress: bool,
    iterations: int,
    train_seconds: float,
    checkpoint: str,
    weights: str,
) -> dict:
    """The test record of ``learner`` on ``tasks`` (``eval.episodes`` fixed episodes, and each of
    ``eval.extra_steps``), as written to ``results.json``."""
    e = cfg.eval
    res = evaluate_on(learner, tasks, cfg, e.episodes, e.seed, e.inner_steps, progress, device, "test")
    results = results_record(cfg, learner, res, iterations, train_seconds, checkpoint, weights)
    for steps in e.extra_steps:
        extra = evaluate_on(learner, tasks, cfg, e.episodes, e.seed, steps, False, device, "eval")
        results.setdefault("by_inner_steps", {})[str(steps)] = {"mean": extra["mean"], "ci95": extra["ci95"]}
    return results


def results_record(
    cfg: Config, learner, res: dict, iterations: int, train_seconds: float, checkpoint: str, weights: str = "raw"
) -> dict:
    d = cfg.data
    return {
        "algorithm": cfg.algorithm["name"],
        "algorithm_config": cfg.algorithm,
        "dataset": d.name,
        "split": getattr(d, "split", None),
        "train_subset": getattr(d, "train_subset", None),
        "ways": getattr(d, "ways", None) if learner.task_type == "classification" else None,
        "shots": getattr(d, "shots", None),
        "queries": getattr(d, "queries", None),
        "episodes": res["episodes"],
        "metric": {"name": res["metric"], "mean": res["mean"], "ci95": res["ci95"], "std": res["std"]},
        "diverged_episodes": res.get("diverged", 0),
        "inner_steps_test": cfg.eval.inner_steps
        if cfg.eval.inner_steps is not None
        else getattr(learner, "inner_steps_test", None),
        "weights": weights,
        "ema_decay": cfg.train.ema_decay if weights == "averaged" else None,
        "bn_mode": cfg.model.get("bn_mode", "batch"),
        "transductive": cfg.eval.transductive,
        "backbone": cfg.model["name"],
        "train_precision": cfg.train.precision,  # evaluation runs in float32
        "train_seconds": train_seconds,
        "iterations": iterations,
        "seed": cfg.train.seed,
        "eval_seed": cfg.eval.seed,
        "checkpoint": checkpoint,
        "metatl_version": __version__,
        "torch_version": str(torch.__version__),
        **provenance(),
        "hardware": hardware("cuda" if cfg.train.device == "auto" and torch.cuda.is_available() else cfg.train.device),
        **res.get("record", {}),  # extra fields from a data source's own evaluate (e.g. the direction)
    }


def _json_safe(value):
    """NaN and infinities as null: JSON has no literal for them (``json.dumps`` would write ``NaN``)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def write_results(results: dict, path) -> None:
    """``results`` as strict JSON (a non-finite number becomes null), written atomically."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(_json_safe(results), indent=2, allow_nan=False))
    tmp.replace(path)
