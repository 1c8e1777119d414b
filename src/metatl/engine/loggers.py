"""Where a run's records go besides ``metrics.jsonl``: TensorBoard and MLflow (``train.logger``).

``metrics.jsonl`` in the run folder is always written and stays the source of truth; a logger
receives the same records (:meth:`metatl.engine.trainer.Trainer.log`), as they are written:

- a training record every ``train.log_every`` iterations: ``loss`` and the algorithm's other
  metrics, ``grad_norm``, ``lr`` (the scheduled outer learning rate) and ``episodes_per_s``
  (meta-batch episodes per second of training time since the previous record, in the seconds of
  ``train.budget_clock``: wall, or CPU seconds with ``cpu``);
- a validation record every ``train.val_every`` iterations: ``val_<metric>`` and ``val_ci95``.

Each is logged at step ``iteration``. A logger has two methods, ``log(record)`` and
``close(status)`` with status ``finished``, ``failed`` or ``stopped``; the trainer opens the chosen
ones on process 0 when training starts and closes them when the run ends (after the test and the
plots, so that MLflow stores them). A resumed run appends to the same TensorBoard folder (events
after the checkpoint's iteration are purged, as ``metrics.jsonl`` is cut back) and to the same
MLflow run (its id is kept in ``mlflow_run.json``).

The packages are optional: ``pip install metatl[tensorboard]`` or ``metatl[mlflow]``.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import time
from pathlib import Path

from ..config import ConfigError, logger_names

PACKAGES = {"tensorboard": "tensorboard", "mlflow": "mlflow"}  # the module each logger imports
TIME_KEYS = ("iteration", "train_seconds", "train_minutes")  # the axes, not curves
MLFLOW_RUN = "mlflow_run.json"  # the run folder's MLflow run: tracking URI and run id, for --resume
MLFLOW_STORE = "mlflow"  # the default MLflow store in the run folder: mlflow.db and artifacts/
TENSORBOARD_DIR = "tensorboard"


def check_available(value) -> None:
    """A :class:`~metatl.config.ConfigError` naming the extra to install when a chosen logger's
    package is missing (checked before training starts, not after the first steps)."""
    for name in logger_names(value):
        module = PACKAGES.get(name)
        if module and importlib.util.find_spec(module) is None:
            raise ConfigError(
                f"train.logger={name} needs the {module} package, which is not installed: "
                f"pip install 'metatl[{name}]' (or drop {name} from train.logger)."
            )


def open_loggers(cfg, out, resumed_at: int | None = None) -> list:
    """The loggers ``cfg.train.logger`` names (``jsonl`` adds none: metrics.jsonl is always written),
    writing for the run folder ``out``; ``resumed_at``: the iteration a resumed run continues from."""
    names = logger_names(cfg.train.logger)
    check_available(names)
    loggers = []
    if "tensorboard" in names:
        loggers.append(TensorBoardLogger(Path(out) / TENSORBOARD_DIR, resumed_at))
    if "mlflow" in names:
        loggers.append(MLflowLogger(cfg, out, resumed_at))
    return loggers


def curves(record: dict) -> dict[str, float]:
    """The plottable values of a record under their curve names: ``val_<x>`` as ``val/<x>``, any
    other number ``<x>`` as ``train/<x>``; the iteration and the clocks are axes, not curves."""
    tags = {}
    for key, value in record.items():
        if key in TIME_KEYS or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        if not math.isfinite(value):
            continue
        tags[f"val/{key[4:]}" if key.startswith("val_") else f"train/{key}"] = float(value)
    return tags


class TensorBoardLogger:
    """Event files in ``log_dir`` (``torch.utils.tensorboard.SummaryWriter``): one scalar curve per
    value (:func:`curves`), at step ``iteration``. ``tensorboard --logdir RUN/tensorboard``."""

    def __init__(self, log_dir, resumed_at: int | None = None):
        from torch.utils.tensorboard import SummaryWriter

        # purge_step: TensorBoard drops the earlier events from this step on (those logged after the
        # checkpoint by the interrupted run, logged again now)
        self.writer = SummaryWriter(str(log_dir), purge_step=None if resumed_at is None else resumed_at + 1)

    def log(self, record: dict) -> None:
        step = int(record.get("iteration", 0))
        for tag, value in curves(record).items():
            self.writer.add_scalar(tag, value, step)

    def close(self, status: str = "finished") -> None:
        self.writer.close()


def mlflow_experiment(client, uri: str, name: str) -> str:
    """The id of the MLflow experiment ``name``, created if needed (a SQLite store's with its
    artifacts beside the database; another process creating it at the same moment is fine)."""
    from mlflow.exceptions import MlflowException

    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    where = None  # a server's own artifact store
    if uri.startswith("sqlite:///"):
        where = (Path(uri[len("sqlite:///") :]).parent / "artifacts").resolve().as_uri()
    try:
        return client.create_experiment(name, artifact_location=where)
    except MlflowException:  # created meanwhile by another process
        experiment = client.get_experiment_by_name(name)
        if experiment is None:
            raise
        return experiment.experiment_id


class MLflowLogger:
    """An MLflow run: the flattened config as parameters (``train.lr``, ...), every record's values
    as metrics at step ``iteration`` (:func:`curves`' names, ``/`` kept), and at the end the test
    metric (``test/<metric>`` from ``results.json``) and the run folder's files as artifacts.

    Tracking URI: ``train.tracking_uri``, else ``MLFLOW_TRACKING_URI``, else a SQLite database in
    the run folder (``mlflow/mlflow.db``; MLflow's own default backend since its file store went
    into maintenance mode). A SQLite store keeps its artifacts beside it (``artifacts/``); a server
    chooses its own. Experiment: ``MLFLOW_EXPERIMENT_NAME``, else the config's ``name``."""

    STATUS = {"finished": "FINISHED", "failed": "FAILED", "stopped": "KILLED"}

    def __init__(self, cfg, out, resumed_at: int | None = None):
        from mlflow.tracking import MlflowClient

        self.out = Path(out)
        default = f"sqlite:///{(self.out / MLFLOW_STORE / 'mlflow.db').resolve()}"
        uri = cfg.train.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or default
        self.local = uri == default  # the store lives in the run folder
        if self.local:
            (self.out / MLFLOW_STORE).mkdir(parents=True, exist_ok=True)
        self.client = MlflowClient(uri)
        kept = self.out / MLFLOW_RUN
        previous = json.loads(kept.read_text()) if resumed_at is not None and kept.exists() else {}
        if previous.get("tracking_uri") == uri:  # a resumed run continues its MLflow run
            self.run_id = previous["run_id"]
            self.client.update_run(self.run_id, status="RUNNING")
            logged = set(self.client.get_run(self.run_id).data.params)
        else:
            experiment_id = mlflow_experiment(self.client, uri, os.environ.get("MLFLOW_EXPERIMENT_NAME") or cfg.name)
            self.run_id = self.client.create_run(experiment_id, run_name=self.out.name).info.run_id
            kept.write_text(json.dumps({"tracking_uri": uri, "run_id": self.run_id}) + "\n")
            logged = set()
        self._log_params(cfg, logged)

    def _log_params(self, cfg, logged: set) -> None:
        from mlflow.entities import Param

        from .trainer import _flatten

        params = [Param(k, str(v)[:6000]) for k, v in _flatten(cfg.to_dict()).items() if k not in logged]
        for i in range(0, len(params), 100):  # MLflow's limit per batch
            self.client.log_batch(self.run_id, params=params[i : i + 100])

    def log(self, record: dict) -> None:
        self._log_metrics(curves(record), int(record.get("iteration", 0)))

    def _log_metrics(self, values: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        if values:
            self.client.log_batch(self.run_id, metrics=[Metric(k, v, now, step) for k, v in values.items()])

    def close(self, status: str = "finished") -> None:
        results = self.out / "results.json"
        if status == "finished" and results.exists():
            res = json.loads(results.read_text())
            m = res["metric"]
            test = {f"test/{m['name']}": m["mean"], "test/ci95": m["ci95"]}
            self._log_metrics({k: v for k, v in test.items() if v is not None}, res.get("iterations") or 0)
        for path in sorted(self.out.iterdir()):
            if self.local and path.name == MLFLOW_STORE:
                continue  # the store itself
            if path.is_dir():
                self.client.log_artifacts(self.run_id, str(path), path.name)
            elif path.is_file() and not path.name.startswith("."):
                self.client.log_artifact(self.run_id, str(path))
        self.client.set_terminated(self.run_id, self.STATUS.get(status, "FINISHED"))
