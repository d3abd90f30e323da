"""Trackers: where a run's metrics, its resolved config and tables of sampled CoTs go.

`report_to` names them (the Hugging Face convention): `jsonl`, `tensorboard`, `wandb`, `trackio`,
`mlflow`, a class of your own as `package.module:Class`, `none` (the run folder's files only) or
`all` (every registered tracker that is installed and usable). `metrics.jsonl` in the run folder
is always written whatever `report_to` says: it is the run's own record, repaired and cut back
on resume (`jsonl` in the list is accepted and changes nothing).

One registry, `TRACKERS`: name -> TrackerSpec (the class, the package it needs and the reftune
extra that installs it). A tracker is a class built as `cls(run_dir, saved)` with

    log(step, metrics)            numbers of one step
    log_table(step, name, rows)   a table (a list of dicts with the same keys)
    log_config(config)            the resolved config (a nested dict)
    close()
    state() -> dict               what a resumed run needs to continue the same backend run
                                  (`saved` is what an earlier attempt's `state()` returned)
    resumed: bool                 whether it continues the earlier attempt's backend run

`reftune.runs.RunLogger` drives them; this module knows nothing of run folders' other files.
Backends are imported only when a tracker is built: validation only asks whether they are
installed (`check_report_to`), so a missing extra is refused before any folder is written.
"""

from __future__ import annotations

import atexit
import contextlib
import importlib
import importlib.util
import json
import math
import os
import secrets
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from reftune.config import ConfigError

SAMPLE_COLUMNS = ("id", "prompt", "completion", "answer", "gold", "correct", "reward", "truncated")
"""Columns of the sampled-CoT tables the online trainers log (`rollout_rows`)."""


class TrackerError(ValueError):
    """A tracker that could not start (a login missing, a store that refuses): the user's setup."""


@dataclass(frozen=True)
class TrackerSpec:
    target: str
    """`module:Class` of the tracker, imported when the tracker is built."""
    summary: str
    """One line for error messages and docs."""
    package: str = ""
    """Import name the tracker needs ("" for none beyond reftune's own dependencies)."""
    extra: str = ""
    """The reftune extra that installs it (`pip install 'reftune[<extra>]'`)."""


TRACKERS: dict[str, TrackerSpec] = {
    "jsonl": TrackerSpec("", "metrics.jsonl and samples.jsonl in the run folder, written by reftune.runs.RunLogger "
                             "(always on)"),
    "tensorboard": TrackerSpec("reftune.trackers:TensorBoardTracker", "TensorBoard events in <run>/tb (the default)",
                               "tensorboard", "tensorboard"),
    "wandb": TrackerSpec("reftune.trackers:WandbTracker", "Weights & Biases (WANDB_MODE=offline: no account)",
                         "wandb", "wandb"),
    "trackio": TrackerSpec("reftune.trackers:TrackioTracker", "Trackio (a local store in TRACKIO_DIR, or a Space)",
                           "trackio", "trackio"),
    "mlflow": TrackerSpec("reftune.trackers:MlflowTracker", "MLflow (MLFLOW_TRACKING_URI: a server, or a local store)",
                          "mlflow", "mlflow"),
}
ALWAYS = "jsonl"
_noted: set[str] = set()


def note(message: str, once: bool = False) -> None:
    """One line for the user on stderr (the format of reftune.runs.note)."""
    if once and message in _noted:
        return
    _noted.add(message)
    print(f"reftune: note: {message}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------- choosing trackers

def _spec(name: str) -> TrackerSpec | None:
    """The registered tracker `name`, or a tracker of your own named `package.module:Class`."""
    if name in TRACKERS:
        return TRACKERS[name]
    if ":" in name and all(part.replace(".", "").replace("_", "").isalnum() for part in name.split(":", 1)):
        return TrackerSpec(name, "a tracker outside reftune")
    return None


def _fail(key: str, value, allowed: str) -> ConfigError:
    return ConfigError(f"{key}={value!r}: {allowed}")


def _installed(package: str) -> bool:
    try:
        return not package or importlib.util.find_spec(package) is not None
    except (ImportError, ValueError):
        return False


def unusable(name: str) -> str | None:
    """Why tracker `name` cannot run here (a missing package, a missing setting), or None."""
    spec = _spec(name)
    if spec.package and not _installed(spec.package):
        return (f"{name} needs the {spec.package} package, which is not installed: "
                f"pip install 'reftune[{spec.extra}]'")
    if name == "mlflow" and not os.environ.get("MLFLOW_TRACKING_URI") and not (
            _installed("sqlalchemy") and _installed("alembic")):
        return ("MLFLOW_TRACKING_URI is not set, and MLflow's default store (sqlite:///mlflow.db) needs the "
                "full `mlflow` package (reftune[mlflow] installs the client, mlflow-skinny): set "
                "MLFLOW_TRACKING_URI (a tracking server http://host:5000, or a folder with "
                "MLFLOW_ALLOW_FILE_STORE=true), or pip install mlflow")
    return None


def resolve_report_to(value, tensorboard: bool = True, key: str = "report_to") -> list[str]:
    """The trackers `value` names, beyond the always-written JSONL, in order and without repeats:
    `none` (alone) is none, `all` (alone) every registered tracker that is usable here, and
    `tensorboard=False` (the deprecated alias) removes tensorboard. Unknown names are refused."""
    names = [value] if isinstance(value, str) else value
    if not isinstance(names, list) or not all(isinstance(n, str) and n.strip() for n in names):
        raise _fail(key, value, "must be a tracker name or a list of them")
    names = [n.strip() for n in names]
    for special in ("none", "all"):
        if special in names and len(names) > 1:
            raise _fail(key, value, f"`{special}` stands alone; list trackers instead")
    if names == ["all"]:
        names = [n for n in TRACKERS if unusable(n) is None]
    elif names == ["none"]:
        names = []
    for name in names:
        if _spec(name) is None:
            raise _fail(key, value, f"unknown tracker {name!r}; trackers: {', '.join(TRACKERS)}, none, all, "
                                    f"or package.module:Class (see reftune.trackers.TRACKERS)")
    names = [n for n in dict.fromkeys(names) if n != ALWAYS]
    return [n for n in names if tensorboard or n != "tensorboard"]


def check_report_to(cfg, prefix: str = "") -> list[str]:
    """Config checks of a run's tracker fields (`report_to`, `log_samples_every`, the deprecated
    `tensorboard`): a missing extra is refused here, before any folder is written, naming the
    pip extra. Returns the trackers the run will use."""
    tensorboard, every = getattr(cfg, "tensorboard", True), getattr(cfg, "log_samples_every", 0)
    if not isinstance(tensorboard, bool):
        raise _fail(f"{prefix}tensorboard", tensorboard, "must be true or false")
    if not isinstance(every, int) or isinstance(every, bool) or every < 0:
        raise _fail(f"{prefix}log_samples_every", every, "must be an integer >= 0 (0: no tables of samples)")
    names = resolve_report_to(cfg.report_to, tensorboard, f"{prefix}report_to")
    for name in names:
        why = unusable(name)
        if why:
            raise _fail(f"{prefix}report_to", cfg.report_to, why)
        if name not in TRACKERS:
            tracker_class(name, f"{prefix}report_to")
    if not tensorboard:
        note(f"{prefix}tensorboard=false is deprecated: use {prefix}report_to (e.g. report_to=none, or a list "
             f"without tensorboard)", once=True)
    return names


def tracker_class(name: str, key: str = "report_to"):
    """The class of tracker `name` (imported now)."""
    module, _, attr = _spec(name).target.partition(":")
    try:
        return getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as e:
        raise ConfigError(f"{key}: cannot import the tracker {name!r} ({e})") from None


def open_tracker(name: str, run_dir: Path, saved: dict | None):
    """Build tracker `name` for `run_dir`, continuing the backend run `saved` describes (the
    `state()` of an earlier attempt) where the backend allows. Errors name the tracker."""
    cls = tracker_class(name)
    try:
        return cls(Path(run_dir), saved)
    except Exception as e:  # noqa: BLE001  (any backend's start failure, reported as the user's setting)
        raise TrackerError(f"report_to={name}: could not start it: {type(e).__name__}: {e}") from e


# ---------------------------------------------------------------------------- what gets sent

def numbers(metrics: dict) -> dict:
    """The numeric entries of `metrics` (bools and text left out: trackers plot numbers)."""
    return {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def finite(v):
    """A JSON-safe value: non-finite floats as text."""
    return v if not isinstance(v, float) or math.isfinite(v) else str(v)


def flatten(config: dict, prefix: str = "") -> dict:
    """`{"data": {"task": x}}` -> `{"data.task": x}` (backends with flat parameters)."""
    out = {}
    for k, v in config.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def table_columns(rows: list[dict]) -> list[str]:
    """Column names of `rows`: the keys in first-seen order."""
    return list(dict.fromkeys(k for row in rows for k in row))


def rollout_rows(scored, tokenizer) -> list[dict]:
    """One row per sampled CoT of a scored rollout (reftune.trainers.rollout.ScoredRollout): the
    prompt as the model saw it (decoded from its tokens, special tokens included), the completion,
    the extracted and the gold answer, correctness, reward, and whether it was cut at
    max_new_tokens. Read through attributes only, so this module needs no torch."""
    ro = scored.rollout
    ids, mask = ro.prompt_ids.tolist(), ro.prompt_mask.tolist()
    rewards, ended = scored.scores.tolist(), ro.ended_with_eos.tolist()
    prompts: dict[int, str] = {}
    rows = []
    for i, (ex, text, graded) in enumerate(zip(scored.examples, ro.texts, scored.graded)):
        p = ro.prompt_index[i]
        if p not in prompts:
            prompts[p] = tokenizer.decode([t for t, m in zip(ids[i], mask[i]) if m], skip_special_tokens=False)
        rows.append(dict(zip(SAMPLE_COLUMNS, (ex.id, prompts[p], text, graded.answer, ex.answer, bool(graded.correct),
                                              float(rewards[i]), not ended[i]))))
    return rows


@contextlib.contextmanager
def _quiet_stdout():
    """Backends that print to stdout print to stderr instead: the CLI's stdout is its JSON result."""
    with contextlib.redirect_stdout(sys.stderr):
        yield


# ---------------------------------------------------------------------------- the trackers

class Tracker:
    """The interface (see the module doc); the defaults do nothing."""

    resumed = False

    def __init__(self, run_dir: Path, saved: dict | None = None):
        self.run_dir = Path(run_dir)

    def state(self) -> dict:
        return {}

    def log(self, step: int, metrics: dict) -> None:
        pass

    def log_table(self, step: int, name: str, rows: list[dict]) -> None:
        pass

    def log_config(self, config: dict) -> None:
        pass

    def truncate_after(self, step: int) -> None:
        """On resume: forget what was logged after `step`, where the backend can."""

    def close(self) -> None:
        pass


class TensorBoardTracker(Tracker):
    """Scalars, the config as text and tables as markdown text, in `<run>/tb`. The writer opens
    at the first record, after the trainer has said where it resumes: it then purges the events
    an earlier attempt wrote after that step (SummaryWriter's purge_step), so TensorBoard shows
    each step once."""

    def __init__(self, run_dir: Path, saved: dict | None = None):
        super().__init__(run_dir, saved)
        self.folder, self.writer, self.purge_step, self.config = self.run_dir / "tb", None, None, None

    def _writer(self):
        if self.writer is None:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(self.folder), purge_step=self.purge_step)
            if self.config is not None and self.purge_step is None:  # a resumed run's config is there already
                self.writer.add_text("config", "```\n" + json.dumps(self.config, indent=2, default=str) + "\n```", 0)
        return self.writer

    def truncate_after(self, step: int) -> None:
        if self.folder.exists() and self.writer is None:
            self.purge_step = step + 1

    def log(self, step: int, metrics: dict) -> None:
        writer = self._writer()
        for k, v in numbers(metrics).items():
            writer.add_scalar(k, v, step)

    def log_table(self, step: int, name: str, rows: list[dict]) -> None:
        self._writer().add_text(name, markdown_rows(rows), step)

    def log_config(self, config: dict) -> None:
        self.config = config

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def markdown_rows(rows: list[dict]) -> str:
    """Rows as markdown for TensorBoard's text tab: each a heading of its short fields, then its
    long text fields as code blocks (CoTs have newlines that a markdown table cannot hold)."""
    parts = []
    for i, row in enumerate(rows):
        short = {k: v for k, v in row.items() if not (isinstance(v, str) and (len(v) > 40 or "\n" in v))}
        parts.append(f"**{i}** " + ", ".join(f"{k}={v}" for k, v in short.items()))
        parts += [f"{k}:\n\n```\n{v}\n```" for k, v in row.items() if k not in short]
    return "\n\n".join(parts)


class WandbTracker(Tracker):
    """Weights & Biases. The run goes to project $WANDB_PROJECT (default `reftune`), named after the
    run folder ($WANDB_NAME overrides), its files under `<run>/wandb` ($WANDB_DIR overrides);
    WANDB_MODE=offline writes it there without an account (`wandb sync` uploads it later). A
    resumed run reopens the same W&B run id (`resume="allow"`); offline, W&B writes each attempt
    into its own offline-run folder with that id."""

    def __init__(self, run_dir: Path, saved: dict | None = None):
        import wandb

        super().__init__(run_dir, saved)
        self.wandb = wandb
        self.resumed = bool(saved and saved.get("id"))
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT") or "reftune",
                              name=os.environ.get("WANDB_NAME") or self.run_dir.name,
                              dir=None if os.environ.get("WANDB_DIR") else str(self.run_dir),
                              id=saved["id"] if self.resumed else None, resume="allow" if self.resumed else None,
                              reinit="create_new")
        # A run that ends without close() (an interruption, an error) is finished as failed at exit:
        # under a wandb-core service shared with a parent process (WANDB_SERVICE) it would otherwise
        # stay open there, and its resume would be refused as "in use".
        atexit.register(self._at_exit)

    def state(self) -> dict:
        return {"id": self.run.id, "project": self.run.project}

    def log(self, step: int, metrics: dict) -> None:
        self.run.log(numbers(metrics), step=step)

    def log_table(self, step: int, name: str, rows: list[dict]) -> None:
        columns = table_columns(rows)
        self.run.log({name: self.wandb.Table(columns=columns, data=[[r.get(c) for c in columns] for r in rows])},
                     step=step)

    def log_config(self, config: dict) -> None:
        self.run.config.update(config, allow_val_change=True)

    def close(self) -> None:
        atexit.unregister(self._at_exit)
        self.run.finish()

    def _at_exit(self) -> None:
        try:
            self.run.finish(exit_code=1)
        except Exception:  # noqa: BLE001  (the process is ending; W&B reports its own trouble)
            pass


class TrackioTracker(Tracker):
    """Trackio. Project $TRACKIO_PROJECT (default `reftune`); the run is named after the run folder
    plus a short random suffix (Trackio identifies runs by name). Logs go to Trackio's local
    SQLite store in $TRACKIO_DIR (default ~/.cache/huggingface/trackio; `trackio show` opens it),
    or to the Space $TRACKIO_SPACE_ID names. A resumed run reopens the same Trackio run."""

    def __init__(self, run_dir: Path, saved: dict | None = None):
        import trackio

        super().__init__(run_dir, saved)
        self.trackio = trackio
        self.resumed = bool(saved and saved.get("name"))
        self.project = saved["project"] if self.resumed else os.environ.get("TRACKIO_PROJECT") or "reftune"
        self.name = saved["name"] if self.resumed else f"{self.run_dir.name}-{secrets.token_hex(3)}"
        with _quiet_stdout():
            self.run = trackio.init(project=self.project, name=self.name, resume="allow")

    def state(self) -> dict:
        return {"project": self.project, "name": self.name}

    def log(self, step: int, metrics: dict) -> None:
        self.run.log(numbers(metrics), step=step)

    def log_table(self, step: int, name: str, rows: list[dict]) -> None:
        columns = table_columns(rows)
        self.run.log({name: self.trackio.Table(columns=columns, data=[[r.get(c) for c in columns] for r in rows])},
                     step=step)

    def log_config(self, config: dict) -> None:
        self.run.config.update(config)  # Trackio sends the config with the run's first record

    def close(self) -> None:
        # Through trackio.finish() while this run is Trackio's current one: it also forgets it, so
        # Trackio's exit handler does not finish it a second time (and print on stdout then).
        context = getattr(self.trackio, "context_vars", None)
        with _quiet_stdout():
            if context is not None and context.current_run.get() is self.run:
                self.trackio.finish()
            else:
                self.run.finish()


class MlflowTracker(Tracker):
    """MLflow, through its client API (no global active run). The store is $MLFLOW_TRACKING_URI
    (MLflow's default when unset); the experiment $MLFLOW_EXPERIMENT_NAME (default `reftune`);
    the run is named after the run folder. The config goes in as flat parameters plus a
    config.json artifact; tables as JSON artifacts `<name>/step-<step>.json` in the layout
    `log_table` writes ({"columns", "data"}), which needs no pandas. A resumed run reopens the
    same MLflow run id."""

    PARAM_LENGTH, PARAMS_PER_CALL = 500, 100  # the limits every MLflow store accepts

    def __init__(self, run_dir: Path, saved: dict | None = None):
        import mlflow
        from mlflow import MlflowClient

        super().__init__(run_dir, saved)
        with _quiet_stdout():
            self.client = MlflowClient()
            self.uri = mlflow.get_tracking_uri()
            self.run_id = self._reopen(saved) or self._create()
        self.resumed = bool(saved) and saved.get("run_id") == self.run_id
        atexit.register(self._at_exit)  # a run that ends without close() shows as KILLED, not RUNNING

    def _reopen(self, saved: dict | None) -> str | None:
        if not saved or not saved.get("run_id"):
            return None
        try:
            self.client.get_run(saved["run_id"])
        except Exception:  # noqa: BLE001  (any store's "no such run")
            note(f"mlflow: the run {saved['run_id']} of the earlier attempt is not in {self.uri}; starting a new one")
            return None
        self.client.update_run(saved["run_id"], status="RUNNING")
        return saved["run_id"]

    def _create(self) -> str:
        name = os.environ.get("MLFLOW_EXPERIMENT_NAME") or "reftune"
        experiment = self.client.get_experiment_by_name(name)
        experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(name)
        run = self.client.create_run(experiment_id, run_name=self.run_dir.name,
                                     tags={"reftune.run_dir": str(self.run_dir.resolve())})
        return run.info.run_id

    def state(self) -> dict:
        return {"run_id": self.run_id, "tracking_uri": self.uri}

    def log(self, step: int, metrics: dict) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        values = [Metric(k, float(v), now, step) for k, v in numbers(metrics).items()]
        if values:
            self.client.log_batch(self.run_id, metrics=values)

    def log_table(self, step: int, name: str, rows: list[dict]) -> None:
        columns = table_columns(rows)
        table = {"columns": columns, "data": [[finite(r.get(c)) for c in columns] for r in rows]}
        self.client.log_dict(self.run_id, table, f"{name}/step-{step:06d}.json")

    def log_config(self, config: dict) -> None:
        from mlflow.entities import Param

        # A parameter cannot change once set: a resumed run keeps the first attempt's values.
        have = self.client.get_run(self.run_id).data.params
        params = [Param(k, str(v)[:self.PARAM_LENGTH]) for k, v in flatten(config).items() if k not in have]
        for i in range(0, len(params), self.PARAMS_PER_CALL):
            self.client.log_batch(self.run_id, params=params[i:i + self.PARAMS_PER_CALL])
        self.client.log_dict(self.run_id, config, "config.json")

    def close(self) -> None:
        atexit.unregister(self._at_exit)
        self.client.set_terminated(self.run_id, "FINISHED")

    def _at_exit(self) -> None:
        try:
            self.client.set_terminated(self.run_id, "KILLED")
        except Exception:  # noqa: BLE001  (the process is ending)
            pass
