"""Optional experiment-tracking sinks beside metrics.jsonl / metrics.csv / TensorBoard.

``log.wandb=true`` logs to Weights & Biases (``WANDB_MODE=offline`` or ``log.wandb_mode=offline``
writes a local run under ``<run dir>/wandb`` that ``wandb sync`` can upload later);
``log.mlflow=true`` logs to MLflow (default: a local file store ``<run dir>/mlruns``; any
tracking URI with ``log.mlflow_uri``). Neither package is imported unless enabled. A resumed run
continues the same W&B / MLflow run (its id is kept in the run directory).

A sink has ``log(step, metrics, prefix)`` and ``close()``; :class:`mimlab.train.engine.MetricLogger`
forwards every row it writes (rank 0 only).
"""

from __future__ import annotations

import os
import secrets
import time
from pathlib import Path
from typing import Any, Optional, Protocol

from ..core.config import ConfigError, LogConfig


class Sink(Protocol):
    def log(self, step: int, metrics: dict[str, float], prefix: str) -> None: ...

    def close(self) -> None: ...


def _missing(flag: str, package: str) -> ConfigError:
    return ConfigError(
        f"{flag}=true needs the {package} package: pip install '{package}' "
        "(or pip install 'mimlab[track]'), or set it to false"
    )


def _run_id(run_dir: Path, name: str) -> Optional[str]:
    p = run_dir / name
    return (p.read_text().strip() or None) if p.exists() else None


class WandbSink:
    """Weights & Biases run in ``<run_dir>/wandb``, named after the run directory."""

    def __init__(self, cfg: LogConfig, run_dir: Path, config: dict):
        try:
            import wandb  # lazy: optional heavy dependency, only when log.wandb=true
        except ImportError:
            raise _missing("log.wandb", "wandb") from None
        id_file = "wandb_run_id"
        run_id = _run_id(run_dir, id_file) or secrets.token_hex(4)
        self.run = wandb.init(
            project=cfg.wandb_project,
            name=run_dir.name,
            dir=str(run_dir),
            config=config,
            id=run_id,
            resume="allow",
            mode=cfg.wandb_mode,
            reinit="create_new",
        )
        (run_dir / id_file).write_text(run_id)

    def log(self, step: int, metrics: dict[str, float], prefix: str) -> None:
        self.run.log({f"{prefix}/{k}": float(v) for k, v in metrics.items()}, step=step)

    def close(self) -> None:
        self.run.finish()


class MlflowSink:
    """MLflow run (experiment ``log.mlflow_experiment``) through an explicit client: no global
    tracking URI or active run is set."""

    def __init__(self, cfg: LogConfig, run_dir: Path, config: dict):
        uri = cfg.mlflow_uri or (run_dir / "mlruns").resolve().as_uri()
        if uri.startswith("file:"):
            # MLflow >= 3.7 refuses file stores unless opted in; a local store is the point here
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        try:
            from mlflow import MlflowClient  # lazy: optional heavy dependency, only when enabled
            from mlflow.entities import Metric, Param  # lazy: as above
        except ImportError:
            raise _missing("log.mlflow", "mlflow") from None
        self._metric = Metric
        self.client = MlflowClient(uri)
        self.uri = uri
        run_id = _run_id(run_dir, "mlflow_run_id")
        if run_id is None:
            exp = self.client.get_experiment_by_name(cfg.mlflow_experiment)
            eid = exp.experiment_id if exp else self.client.create_experiment(cfg.mlflow_experiment)
            run_id = self.client.create_run(eid, run_name=run_dir.name).info.run_id
            params = [Param(k, str(v)[:500]) for k, v in _flatten(config).items()]
            for i in range(0, len(params), 100):  # MLflow's batch limit
                self.client.log_batch(run_id, params=params[i : i + 100])
            (run_dir / "mlflow_run_id").write_text(run_id)
        else:
            self.client.update_run(run_id, status="RUNNING")
        self.run_id = run_id

    def log(self, step: int, metrics: dict[str, float], prefix: str) -> None:
        ts = int(time.time() * 1000)
        self.client.log_batch(
            self.run_id,
            metrics=[self._metric(f"{prefix}/{k}", float(v), ts, step) for k, v in metrics.items()],
        )

    def close(self) -> None:
        self.client.set_terminated(self.run_id)


def _flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def build_sinks(cfg: Optional[LogConfig], run_dir: Path, config: dict) -> list[Sink]:
    """The sinks enabled in ``cfg`` (``log.*``); [] when none (nothing is imported)."""
    if cfg is None:
        return []
    sinks: list[Sink] = []
    if cfg.wandb:
        sinks.append(WandbSink(cfg, Path(run_dir), config))
    if cfg.mlflow:
        sinks.append(MlflowSink(cfg, Path(run_dir), config))
    return sinks
