"""Experiment trackers (`report_to: [tensorboard, wandb, mlflow, trackio]`), each through its own library.

The run harness (`vlrl.train.harness`) drives them on rank 0: `start` once the first step of this invocation is
known (the resolved config goes along), `log` at every line it writes to metrics.jsonl (the same scalars under
the same names and steps: `vlrl.train.logging.scalars_of`, and the step's samples.jsonl rows as a table),
`close` at the end of the run, also when it raises. A library is imported only when named, and a missing one
fails before the run loads anything, with the command that installs it.

Where each writes, offline unless the user's environment says otherwise:

    tensorboard  event files in <out>/tensorboard (`tensorboard --logdir <out>/tensorboard`); config and
                 samples as text (a markdown table per logged step)
    wandb        offline run files in <out>/wandb (`wandb sync <out>/wandb/offline-run-*` uploads them), unless
                 WANDB_MODE or WANDB_API_KEY is set: then W&B's own setting decides; project $WANDB_PROJECT or
                 "vlrl"; samples as a wandb.Table per logged step
    mlflow       a file store in <out>/mlruns, unless MLFLOW_TRACKING_URI is set (MLflow 3 refuses a file store
                 unless MLFLOW_ALLOW_FILE_STORE=true, which this process sets for itself; to browse it:
                 `MLFLOW_ALLOW_FILE_STORE=true mlflow server --backend-store-uri <out>/mlruns`, with the full
                 mlflow package); experiment $MLFLOW_EXPERIMENT_NAME or "vlrl"; the config as run parameters
                 (flattened) and the artifact config.yaml; samples as the artifact samples/step-NNNNNN.json
                 (columns and data, the layout of `mlflow.log_table`)
    trackio      trackio's own local store (`trackio show`; TRACKIO_DIR moves it, TRACKIO_SPACE_ID sends it to a
                 Space); project $TRACKIO_PROJECT or "vlrl"; samples as a trackio.Table per logged step

Resume: `<out>/trackers.json` keeps each tracker's run id, so a resumed run continues the same tracker run and
its steps go on from the checkpoint's. The steps a crashed run logged after its last checkpoint run again:
TensorBoard hides the old events after the checkpoint's step (`purge_step`), so the new values replace them as
in metrics.jsonl; W&B writes one offline segment per invocation under the same run id and ignores steps below
the run's current one (online, and when `wandb sync` uploads the segments), so the first values stay; MLflow
cannot delete metric points, so the steps its run already has are not sent again (the first values stay);
trackio is sent them again.
"""

from __future__ import annotations

import html
import importlib
import json
import os
import time
import uuid
from pathlib import Path
from typing import Any

import yaml

from vlrl.config import ConfigError

MODULES = {"tensorboard": "torch.utils.tensorboard", "wandb": "wandb", "mlflow": "mlflow", "trackio": "trackio"}
IDS_FILE = "trackers.json"


def tracker_names(report_to: list[str]) -> list[str]:
    """The trackers `report_to` names, in order, without repeats; `none` (alone) or [] is none."""
    names = list(dict.fromkeys(report_to))
    unknown = [n for n in names if n not in MODULES and n != "none"]
    if unknown:
        raise ConfigError(f"report_to: unknown tracker {unknown[0]!r}; valid: {', '.join([*MODULES, 'none'])}")
    if "none" in names and len(names) > 1:
        raise ConfigError(f"report_to: `none` together with trackers ({', '.join(names)}); name either")
    return [n for n in names if n != "none"]


def check_trackers(report_to: list[str]) -> list[str]:
    """Validate the names and import each library now, so that a missing one fails before the run starts."""
    names = tracker_names(report_to)
    for name in names:
        try:
            importlib.import_module(MODULES[name])
        except ImportError as err:
            raise ConfigError(f"report_to: {name} needs a library that is not installed ({err}); "
                              f"install it with: pip install 'vlrl[{name}]'") from err
    return names


def table_of(rows: list[dict[str, Any]]) -> tuple[list[Any], list[list[Any]]]:
    """Rows as (columns, data): columns in first-seen order, a missing value None, lists and mappings as JSON."""
    columns: list[Any] = list(dict.fromkeys(k for row in rows for k in row))

    def cell(v: Any) -> Any:
        return json.dumps(v) if isinstance(v, (list, dict, tuple)) else v

    return columns, [[cell(row.get(c)) for c in columns] for row in rows]


def _new_id() -> str:
    return uuid.uuid4().hex[:12]


class TensorBoardTracker:
    def __init__(self, run_dir: Path) -> None:
        self.run_dir = run_dir
        self.writer: Any = None

    def start(self, config: dict[str, Any], first_step: int, ids: dict[str, str]) -> None:
        from torch.utils.tensorboard import SummaryWriter

        # events at or after purge_step that an earlier invocation wrote are hidden: the steps after the
        # checkpoint run again and replace them
        self.writer = SummaryWriter(log_dir=str(self.run_dir / "tensorboard"), purge_step=first_step + 1)
        text = "\n".join("    " + ln for ln in yaml.safe_dump(config, sort_keys=False).splitlines())
        self.writer.add_text("config", text, first_step)

    def log_scalars(self, step: int, scalars: dict[str, float]) -> None:
        for k, v in scalars.items():
            self.writer.add_scalar(k, v, step)
        self.writer.flush()  # a curve shows the step as soon as it is logged

    def log_table(self, step: int, rows: list[dict[str, Any]]) -> None:
        columns, data = table_of(rows)

        def cell(v: Any) -> str:  # escaped, or TensorBoard's markdown would drop tags such as <answer>
            return html.escape("" if v is None else str(v)).replace("|", "\\|").replace("\n", "<br>")

        lines = ["| " + " | ".join(cell(c) for c in columns) + " |", "|" + " --- |" * len(columns)]
        lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in data]
        self.writer.add_text("samples", "\n".join(lines), step)
        self.writer.flush()

    def close(self, failed: bool) -> None:
        self.writer.close()


class WandbTracker:
    def __init__(self, run_dir: Path) -> None:
        self.run_dir = run_dir
        self.run: Any = None

    def start(self, config: dict[str, Any], first_step: int, ids: dict[str, str]) -> None:
        import wandb

        user_set = "WANDB_MODE" in os.environ or "WANDB_API_KEY" in os.environ
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "vlrl"), name=self.run_dir.name,
                              id=ids.setdefault("wandb", _new_id()), resume="allow", dir=str(self.run_dir),
                              config=config, mode=None if user_set else "offline")  # fmt: skip

    def log_scalars(self, step: int, scalars: dict[str, float]) -> None:
        self.run.log(scalars, step=step)

    def log_table(self, step: int, rows: list[dict[str, Any]]) -> None:
        import wandb

        columns, data = table_of(rows)
        self.run.log({"samples": wandb.Table(columns=columns, data=data, allow_mixed_types=True)}, step=step)

    def close(self, failed: bool) -> None:
        self.run.finish(exit_code=1 if failed else 0)


def _flat(tree: dict[str, Any], prefix: str = "") -> dict[str, str]:
    out: dict[str, str] = {}
    for k, v in tree.items():
        if isinstance(v, dict) and v:
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = json.dumps(v) if isinstance(v, (list, dict)) else str(v)
    return out


class MlflowTracker:
    MAX_PARAM = 6000  # MLflow's limit on a parameter's value (characters)

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = run_dir
        self.client: Any = None
        self.run_id = ""
        self.done_through = 0  # steps up to this one are in the run already (a resumed run)

    def start(self, config: dict[str, Any], first_step: int, ids: dict[str, str]) -> None:
        from mlflow.entities import Param
        from mlflow.exceptions import MlflowException
        from mlflow.tracking import MlflowClient

        uri = os.environ.get("MLFLOW_TRACKING_URI")
        if not uri:
            uri = (self.run_dir / "mlruns").resolve().as_uri()
            # MLflow 3 keeps its file store working but refuses it unless asked for
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        self.client = client = MlflowClient(tracking_uri=uri)
        name = os.environ.get("MLFLOW_EXPERIMENT_NAME", "vlrl")
        exp = client.get_experiment_by_name(name)
        exp_id = exp.experiment_id if exp is not None else client.create_experiment(name)
        run = None
        if "mlflow" in ids:
            try:
                run = client.get_run(ids["mlflow"])
            except MlflowException:
                run = None  # another store than the one the id came from: a new run
        if run is not None:
            self.run_id = run.info.run_id
            client.update_run(self.run_id, status="RUNNING")
            self.done_through = max((m.step for key in run.data.metrics
                                     for m in client.get_metric_history(self.run_id, key)), default=0)
        else:
            self.run_id = client.create_run(exp_id, run_name=self.run_dir.name).info.run_id
            ids["mlflow"] = self.run_id
            params = [Param(k, v[: self.MAX_PARAM]) for k, v in _flat(config).items()]
            for i in range(0, len(params), 100):  # log_batch takes at most 100 parameters
                client.log_batch(self.run_id, params=params[i : i + 100])
        client.log_text(self.run_id, yaml.safe_dump(config, sort_keys=False), "config.yaml")

    def log_scalars(self, step: int, scalars: dict[str, float]) -> None:
        from mlflow.entities import Metric

        if step <= self.done_through:
            return
        ms = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, float(v), ms, step) for k, v in scalars.items()])

    def log_table(self, step: int, rows: list[dict[str, Any]]) -> None:
        if step <= self.done_through:
            return
        columns, data = table_of(rows)
        self.client.log_dict(self.run_id, {"columns": columns, "data": data}, f"samples/step-{step:06d}.json")

    def close(self, failed: bool) -> None:
        self.client.set_terminated(self.run_id, status="FAILED" if failed else "FINISHED")


class TrackioTracker:
    def __init__(self, run_dir: Path) -> None:
        self.run_dir = run_dir
        self.run: Any = None

    def start(self, config: dict[str, Any], first_step: int, ids: dict[str, str]) -> None:
        import trackio

        # run names are per project: the run directory's name alone could collide with another run's
        name = ids.setdefault("trackio", f"{self.run_dir.name}-{_new_id()}")
        self.run = trackio.init(project=os.environ.get("TRACKIO_PROJECT", "vlrl"), name=name, config=config,
                                resume="allow")

    def log_scalars(self, step: int, scalars: dict[str, float]) -> None:
        self.run.log(scalars, step=step)

    def log_table(self, step: int, rows: list[dict[str, Any]]) -> None:
        import trackio

        columns, data = table_of(rows)
        self.run.log({"samples": trackio.Table(columns=columns, data=data)}, step=step)

    def close(self, failed: bool) -> None:
        self.run.finish()


ADAPTERS: dict[str, Any] = {"tensorboard": TensorBoardTracker, "wandb": WandbTracker, "mlflow": MlflowTracker,
                            "trackio": TrackioTracker}


class Trackers:
    """The trackers of one run (none when `enabled` is false: ranks other than 0). Construction validates the
    names and imports the libraries; `start` opens the tracker runs."""

    def __init__(self, report_to: list[str], run_dir: Path, enabled: bool = True) -> None:
        names = check_trackers(report_to)
        self.run_dir = run_dir
        self.waiting = [ADAPTERS[n](run_dir) for n in names] if enabled else []
        self.open: list[Any] = []

    def __bool__(self) -> bool:
        return bool(self.waiting or self.open)

    def start(self, config: dict[str, Any], first_step: int) -> None:
        """Open each tracker's run (continuing the one `trackers.json` names) and log the config."""
        if not self.waiting:
            return
        path = self.run_dir / IDS_FILE
        ids: dict[str, str] = json.loads(path.read_text()) if path.exists() else {}
        try:
            while self.waiting:
                self.waiting[0].start(config, first_step, ids)
                self.open.append(self.waiting.pop(0))
        finally:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(ids, indent=1) + "\n")

    def log(self, step: int, scalars: dict[str, float], rows: list[dict[str, Any]]) -> None:
        for t in self.open:
            t.log_scalars(step, scalars)
            if rows:
                t.log_table(step, rows)

    def close(self, failed: bool = False) -> None:
        """Flush and close every open tracker; one that fails to close is reported and the others still close."""
        while self.open:
            t = self.open.pop()
            try:
                t.close(failed)
            except Exception as err:  # the run's own outcome (or exception) matters more than a tracker's
                print(f"warning: closing {type(t).__name__} failed: {err!r}")
