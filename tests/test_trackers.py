"""Trackers (reftune.trackers, reftune.runs.RunLogger), each read back from its own offline store:
W&B's offline run folders (WANDB_MODE=offline), Trackio's local SQLite store (TRACKIO_DIR), MLflow's
file store (MLFLOW_TRACKING_URI a folder). A RunLogger driven directly, then a short ReFT run
interrupted after a step past its checkpoint and resumed: every backend holds the config, each
step's metrics once and the tables of sampled CoTs. `report_to` is checked before any folder is
written; a missing extra is named. An audit hook refuses every socket to a non-loopback address
or name lookup while the trackers run (W&B's own service process is outside its reach: offline
mode is W&B's promise there). Environment variables set here are restored after each test."""

from __future__ import annotations

import json
import os
import socket
import struct
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import small_data, small_overrides

from reftune.cli import main
from reftune.config import ConfigError, load_config
from reftune.runs import RunLogger, read_jsonl
from reftune.trackers import SAMPLE_COLUMNS, Tracker, TrackerError, check_report_to, resolve_report_to
from reftune.trainers.online_st import OnlineSTConfig, run_online_st
from reftune.trainers.reft import ReFTConfig

# ----------------------------------------------------------------------------- no network

GUARD = """
import socket as _socket, sys as _sys
_LOOPBACK = ("127.0.0.1", "::1", "localhost", "0.0.0.0", None, "")
NETWORK_ATTEMPTS = []
NETWORK_GUARD_ON = [True]
def _network_guard(event, args):
    if not NETWORK_GUARD_ON[0]:
        return
    what = None
    if event == "socket.getaddrinfo" and args[0] not in _LOOPBACK:
        what = f"name lookup of {args[0]!r}"
    elif event == "socket.connect" and args[0].family in (_socket.AF_INET, _socket.AF_INET6) \\
            and args[1][0] not in _LOOPBACK:
        what = f"connection to {args[1]!r}"
    if what:
        NETWORK_ATTEMPTS.append(what)
        raise OSError(f"network refused in tests: {what}")
_sys.addaudithook(_network_guard)
def _report_attempts():  # registered first, so it runs after the backends' own exit handlers
    if NETWORK_ATTEMPTS and NETWORK_GUARD_ON[0]:
        print("network attempts:", NETWORK_ATTEMPTS, file=_sys.stderr, flush=True)
        __import__("os")._exit(97)
__import__("atexit").register(_report_attempts)
"""
exec(GUARD)  # noqa: S102  (defines NETWORK_ATTEMPTS / NETWORK_GUARD_ON; off outside the tests that use it)
NETWORK_GUARD_ON[0] = False  # noqa: F821


@pytest.fixture
def no_network():
    NETWORK_ATTEMPTS.clear()  # noqa: F821
    NETWORK_GUARD_ON[0] = True  # noqa: F821
    yield NETWORK_ATTEMPTS  # noqa: F821
    NETWORK_GUARD_ON[0] = False  # noqa: F821
    assert not NETWORK_ATTEMPTS, NETWORK_ATTEMPTS  # noqa: F821


@pytest.fixture
def offline(tmp_path, monkeypatch) -> dict:
    """Every backend pointed at a folder of this test; variables that would send them elsewhere unset."""
    for var in ("WANDB_PROJECT", "WANDB_NAME", "WANDB_DIR", "WANDB_RUN_ID", "WANDB_RESUME", "WANDB_API_KEY",
                "TRACKIO_SPACE_ID", "TRACKIO_SERVER_URL", "TRACKIO_PROJECT", "MLFLOW_EXPERIMENT_NAME"):
        monkeypatch.delenv(var, raising=False)
    places = {"TRACKIO_DIR": str(tmp_path / "trackio"), "MLFLOW_TRACKING_URI": (tmp_path / "mlruns").as_uri()}
    for var, value in {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "MLFLOW_ALLOW_FILE_STORE": "true",
                       **places}.items():
        monkeypatch.setenv(var, value)
    (tmp_path / "mlruns").mkdir()
    # wandb.init in this process starts a wandb-core service and exports WANDB_SERVICE so that child
    # processes share it; the processes started here get services of their own, as a command does.
    service = os.environ.pop("WANDB_SERVICE", None)
    yield places
    os.environ.pop("WANDB_SERVICE", None)
    if service is not None:
        os.environ["WANDB_SERVICE"] = service


def test_the_network_guard_refuses_outside_connections(no_network):
    for attempt in (lambda: socket.create_connection(("192.0.2.1", 80), timeout=1),
                    lambda: socket.getaddrinfo("example.com", 443)):
        with pytest.raises(OSError, match="network refused in tests"):
            attempt()
    assert len(no_network) == 2
    no_network.clear()


# ----------------------------------------------------------------------------- reading each store back

def wandb_records(run_dir: Path) -> list:
    """Every record of the W&B offline runs under `run_dir/wandb`, attempts in order. The .wandb file
    is W&B's LevelDB-style log: a 7-byte header, then 32 KiB blocks of chunks (crc32, length, type)
    that join into protobuf Records."""
    from wandb.proto import wandb_internal_pb2 as pb

    records = []
    for path in sorted(run_dir.glob("wandb/offline-run-*/run-*.wandb")):
        raw, pos, buf = path.read_bytes(), 7, b""
        assert raw[:4] == b":W&B"
        while pos + 7 <= len(raw):
            left = 32768 - pos % 32768
            _, length, kind = struct.unpack("<IHB", raw[pos:pos + 7]) if left >= 7 else (0, 0, 0)
            if left < 7 or (length == 0 and kind == 0):
                pos += left
                continue
            buf, pos = buf + raw[pos + 7:pos + 7 + length], pos + 7 + length
            if kind in (1, 4):  # a full record, or the last chunk of one
                record = pb.Record()
                record.ParseFromString(buf)
                records.append((path.parent, record))
                buf = b""
    return records


def wandb_read(run_dir: Path) -> dict:
    out = {"ids": [], "steps": [], "config": {}, "tables": {}}
    for folder, r in wandb_records(run_dir):
        kind = r.WhichOneof("record_type")
        if kind == "run":
            out["ids"].append(r.run.run_id)
        elif kind == "config":
            out["config"].update({i.key: json.loads(i.value_json) for i in r.config.update})
        elif kind == "history":
            items = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item}
            if "reft/score" in items:
                out["steps"].append((items["_step"], items["reft/score"]))
            if items.get("samples/_type") == "table-file":
                out["tables"][items["_step"]] = json.loads((folder / "files" / items["samples/path"]).read_text())
    return out


def mlflow_read(uri: str, run_id: str) -> dict:
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    run = client.get_run(run_id)
    tables = {}
    for item in client.list_artifacts(run_id, "samples"):
        local = client.download_artifacts(run_id, item.path)
        tables[int(Path(item.path).stem.split("-")[1])] = json.loads(Path(local).read_text())
    return {"steps": [(m.step, m.value) for m in client.get_metric_history(run_id, "reft/score")],
            "params": run.data.params, "status": run.info.status, "tables": tables,
            "runs": [r.info.run_id for r in client.search_runs([run.info.experiment_id])]}


TRACKIO_READ = """
import json, sys
from trackio.sqlite_storage import SQLiteStorage as S
project, name = sys.argv[1:]
print(json.dumps({"runs": S.get_runs(project), "logs": S.get_logs(project, name),
                  "config": S.get_run_config(project, name)}, default=str))
"""


def trackio_read(project: str, name: str) -> dict:
    """Trackio fixes its folder when imported: read its store in a process started with TRACKIO_DIR set."""
    proc = subprocess.run([sys.executable, "-c", TRACKIO_READ, project, name], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads(proc.stdout.strip().splitlines()[-1])
    logs = data.pop("logs")
    data["steps"] = [(r["step"], r["reft/score"]) for r in logs if "reft/score" in r]
    data["tables"] = {r["step"]: r["samples"]["_value"] for r in logs if "samples" in r}
    return data


def tensorboard_steps(run_dir: Path, tag: str) -> list[int]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tb"))
    events.Reload()
    return [s.step for s in events.Scalars(tag)]


# ----------------------------------------------------------------------------- choosing trackers

def test_report_to_names_none_all_and_the_deprecated_alias(capfd, monkeypatch):
    assert resolve_report_to(["tensorboard"]) == ["tensorboard"]
    assert resolve_report_to("wandb") == ["wandb"]
    assert resolve_report_to(["jsonl", "mlflow", "mlflow"]) == ["mlflow"]  # JSONL is always on; repeats dropped
    assert resolve_report_to("none") == resolve_report_to([]) == []
    assert resolve_report_to(["tensorboard", "wandb"], tensorboard=False) == ["wandb"]
    assert "tensorboard" in resolve_report_to("all") and "jsonl" not in resolve_report_to("all")
    assert ReFTConfig().report_to == ["tensorboard"] and ReFTConfig().log_samples_every == 0
    for bad, says in [("wandbb", "unknown tracker 'wandbb'"), (["none", "wandb"], "`none` stands alone"),
                      ([""], "must be a tracker name"), (3, "must be a tracker name")]:
        with pytest.raises(ConfigError, match=says):
            resolve_report_to(bad)
    with pytest.raises(ConfigError, match=r"log_samples_every=-1: must be an integer >= 0"):
        ReFTConfig(model="m", log_samples_every=-1).validate()
    with pytest.raises(ConfigError, match=r"expected a list|is not a"):
        load_config(ReFTConfig, None, ["report_to=[1]"])
    capfd.readouterr()
    import reftune.trackers

    monkeypatch.setattr(reftune.trackers, "_noted", set())  # the note is said once per process: earlier tests said it
    cfg = load_config(ReFTConfig, None, ["model=m", "tensorboard=false"])
    assert check_report_to(cfg) == []
    assert "tensorboard=false is deprecated: use report_to" in capfd.readouterr().err


@pytest.mark.parametrize("backend", ["wandb", "trackio", "mlflow"])
def test_a_missing_extra_is_named_before_any_folder_is_written(backend, monkeypatch, capsys, tmp_path, tiny_model):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", (tmp_path / "mlruns").as_uri())
    monkeypatch.setitem(sys.modules, backend, None)  # as if not installed: importlib finds no spec
    out = tmp_path / "run"
    code = main(["train", f"model={tiny_model}", f"out_dir={out}", f"report_to=[tensorboard,{backend}]",
                 "device=cpu", "progress=false", *small_overrides()])
    err = capsys.readouterr().err
    assert code == 2 and f"pip install 'reftune[{backend}]'" in err and "Traceback" not in err, err
    assert not out.exists()


def test_mlflow_without_a_store_to_write_to_is_refused(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setitem(sys.modules, "sqlalchemy", None)  # mlflow-skinny: no SQL store for MLflow's default
    with pytest.raises(ConfigError, match="MLFLOW_TRACKING_URI is not set"):
        ReFTConfig(model="m", report_to=["mlflow"]).validate()


class Failing(Tracker):
    """A tracker of one's own (report_to=test_trackers:Failing) whose backend breaks at step 2."""

    steps: list[int] = []

    def log(self, step: int, metrics: dict) -> None:
        if step == 2:
            raise RuntimeError("the disk is full")
        Failing.steps.append(step)


def test_a_tracker_that_breaks_is_dropped_and_the_run_goes_on(tmp_path, capfd):
    Failing.steps = []
    logger = RunLogger(tmp_path, report_to=["test_trackers:Failing"])
    for step in (1, 2, 3):
        logger.log(step, {"x": float(step)})
    logger.close()
    assert Failing.steps == [1]
    assert [r["step"] for r in read_jsonl(tmp_path / "metrics.jsonl")] == [1, 2, 3]
    err = capfd.readouterr().err
    assert "report_to=test_trackers:Failing: log failed (RuntimeError: the disk is full)" in err


class Unreachable(Tracker):
    def __init__(self, run_dir: Path, saved: dict | None = None):
        raise ConnectionError("the tracking server does not answer")


def test_a_tracker_that_cannot_start_stops_the_run_with_its_name(tmp_path):
    with pytest.raises(TrackerError, match="report_to=test_trackers:Unreachable: could not start it: "
                                           "ConnectionError: the tracking server does not answer"):
        RunLogger(tmp_path, report_to=["tensorboard", "test_trackers:Unreachable"])
    assert issubclass(TrackerError, ValueError)  # the CLI's "error:" line, exit 2: a setup to fix, not a bug


# ----------------------------------------------------------------------------- a RunLogger, two attempts

CONFIG = {"model": "tiny", "lr": 3e-7, "data": {"task": "gsm8k", "style": "nl"}}


def rows(step: int) -> list[dict]:
    return [dict(zip(SAMPLE_COLUMNS, (f"q{i}", f"Question:\n{i} + {step}\n", f"{i} + {step} = {i + step}",
                                      str(i + step), str(i + step), True, 1.0, False))) for i in range(3)]


def two_attempts(run_dir: Path, report_to: list[str]) -> None:
    """Steps 1-3 with a table at step 2, an interruption (the checkpoint was at step 2), then a
    resumed attempt that runs steps 3-4 again with other numbers and a table at step 4."""
    for attempt, (resume_at, steps) in enumerate([(0, (1, 2, 3)), (2, (3, 4))]):
        logger = RunLogger(run_dir, report_to=report_to, config=CONFIG, samples_every=2)
        logger.truncate_after(resume_at)
        for step in steps:
            if step % 2 == 0:
                logger.log_samples(step, rows(step))
            logger.log(step, {"reft/score": step + 10 * attempt, "reft/note": "text is kept out of trackers"})
        logger.close()


def test_run_logger_tensorboard_wandb_and_mlflow_hold_each_step_once(tmp_path, offline, no_network, capfd):
    run = tmp_path / "run"
    two_attempts(run, ["tensorboard", "wandb", "mlflow"])
    assert "report_to=wandb: keeps step 3 as the interrupted attempt sent it" in capfd.readouterr().err
    # the run's own record: the resumed attempt's numbers
    jsonl = [(r["step"], r["reft/score"]) for r in read_jsonl(run / "metrics.jsonl")]
    assert jsonl == [(1, 1), (2, 2), (3, 13), (4, 14)]
    assert [(r["step"], r["id"]) for r in read_jsonl(run / "samples.jsonl")] == [(2, "q0"), (2, "q1"), (2, "q2"),
                                                                                 (4, "q0"), (4, "q1"), (4, "q2")]
    assert tensorboard_steps(run, "reft/score") == [1, 2, 3, 4]  # the first attempt's step 3 purged
    state = json.loads((run / "trackers.json").read_text())

    wb = wandb_read(run)
    assert len(wb["ids"]) == 2 and set(wb["ids"]) == {state["wandb"]["id"]}  # two attempts, one W&B run
    assert wb["steps"] == [(1, 1), (2, 2), (3, 3), (4, 14)]  # step 3 from the attempt that sent it first
    assert wb["config"]["data"] == CONFIG["data"] and wb["config"]["lr"] == CONFIG["lr"]
    assert sorted(wb["tables"]) == [2, 4] and wb["tables"][4]["columns"] == list(SAMPLE_COLUMNS)
    assert wb["tables"][4]["data"][1][:3] == ["q1", "Question:\n1 + 4\n", "1 + 4 = 5"]

    ml = mlflow_read(offline["MLFLOW_TRACKING_URI"], state["mlflow"]["run_id"])
    assert ml["runs"] == [state["mlflow"]["run_id"]] and ml["status"] == "FINISHED"
    assert ml["steps"] == [(1, 1.0), (2, 2.0), (3, 3.0), (4, 14.0)]
    assert ml["params"]["data.task"] == "gsm8k" and ml["params"]["lr"] == "3e-07"
    assert sorted(ml["tables"]) == [2, 4] and ml["tables"][2]["columns"] == list(SAMPLE_COLUMNS)
    assert ml["tables"][2]["data"][0][6] == 1.0


TRACKIO_ATTEMPTS = """
import sys
sys.path.insert(0, sys.argv[2])
from pathlib import Path
from test_trackers import two_attempts
two_attempts(Path(sys.argv[1]), ["trackio"])
"""


def test_run_logger_trackio_holds_each_step_once(tmp_path, offline):
    run = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-c", GUARD + TRACKIO_ATTEMPTS, str(run), str(Path(__file__).parent)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout == ""  # Trackio's messages go to stderr: a command's stdout is its JSON result
    state = json.loads((run / "trackers.json").read_text())["trackio"]
    assert state["project"] == "reftune" and state["name"].startswith("run-")
    tio = trackio_read(state["project"], state["name"])
    assert tio["runs"] == [state["name"]]
    assert tio["steps"] == [(1, 1), (2, 2), (3, 3), (4, 14)]
    assert tio["config"]["data"] == CONFIG["data"]
    assert sorted(tio["tables"]) == [2, 4] and tio["tables"][4][2]["completion"] == "2 + 4 = 6"
    assert Path(offline["TRACKIO_DIR"], "reftune.db").exists()


SHARED_SERVICE_ATTEMPT = """
import sys
from pathlib import Path
from reftune.runs import RunLogger
logger = RunLogger(Path(sys.argv[1]), report_to=["wandb"], config={"lr": 0.1})
step = int(sys.argv[2])
logger.truncate_after(step - 1)
logger.log(step, {"reft/score": float(step)})
if step == 1:
    raise KeyboardInterrupt  # the attempt ends without close()
logger.close()
"""


SHARED_SERVICE_PARENT = """
import os, subprocess, sys, wandb
wandb.init(project="reftune", dir=sys.argv[2], reinit="create_new").finish()
assert os.environ.get("WANDB_SERVICE")  # this process's wandb-core service, which its children share
for step in (1, 2):
    attempt = subprocess.run([sys.executable, "-c", sys.argv[1], sys.argv[2] + "/run", str(step)],
                             capture_output=True, text=True)
    print(step, attempt.returncode, attempt.stderr[-2000:], file=sys.stderr)
    assert (attempt.returncode == 0) == (step == 2), attempt.stderr
"""


def test_an_interrupted_wandb_run_resumes_under_a_wandb_service_shared_with_a_parent(tmp_path, offline):
    """A parent that used W&B exports its wandb-core service (WANDB_SERVICE) to the processes it starts
    (the demo runs its stages so): an attempt that ended without close() must not leave the run open
    there, or its resume is refused as "in use"."""
    parent = subprocess.run([sys.executable, "-c", SHARED_SERVICE_PARENT, GUARD + SHARED_SERVICE_ATTEMPT,
                             str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert parent.returncode == 0, parent.stderr[-4000:]
    wb = wandb_read(tmp_path / "run")
    assert wb["steps"] == [(1, 1), (2, 2)] and len(wb["ids"]) == 2 and len(set(wb["ids"])) == 1


# ----------------------------------------------------------------------------- trainers

RUNNER = """
import os, sys
if os.environ.get("STOP_AFTER_STEP"):  # an interruption right after a step past the checkpoint is logged
    import reftune.runs as R
    _log = R.RunLogger.log
    def log(self, step, metrics):
        _log(self, step, metrics)
        if step == int(os.environ["STOP_AFTER_STEP"]):
            raise KeyboardInterrupt
    R.RunLogger.log = log
from reftune.cli import main
sys.exit(main(sys.argv[1:]))
"""


def cli(*argv, stop_after: int | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, **({"STOP_AFTER_STEP": str(stop_after)} if stop_after else {})}
    return subprocess.run([sys.executable, "-c", GUARD + RUNNER, *map(str, argv)], capture_output=True, text=True,
                          env=env, timeout=600)


def test_a_short_reft_run_interrupted_and_resumed_leaves_its_record_in_every_backend(tmp_path, offline,
                                                                                     warmup_model):
    run = tmp_path / "reft"
    argv = ["train", f"model={warmup_model}", f"out_dir={run}", "steps=4", "save_every=2", "eval_every=0",
            "questions_per_step=4", "mini_batch_size=2", "ppo_epochs=1", "max_new_tokens=8",
            "eval_max_new_tokens=4", "device=cpu", "progress=false", "report_to=[wandb,trackio,mlflow]",
            "log_samples_every=1", *small_overrides()]
    first = cli(*argv, stop_after=3)
    assert first.returncode == 130 and "interrupted" in first.stderr, first.stderr[-3000:]
    resumed = cli("train", "--resume", run)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert json.loads(resumed.stdout)["best_accuracy"] >= 0  # stdout is the result alone
    assert "report_to=mlflow: keeps step 3 as the interrupted attempt sent it" in resumed.stderr
    jsonl = [(r["step"], r["reft/score"]) for r in read_jsonl(run / "metrics.jsonl")]
    assert [s for s, _ in jsonl] == [1, 2, 3, 4]
    samples = read_jsonl(run / "samples.jsonl")
    assert [r["step"] for r in samples] == [s for s in (1, 2, 3, 4) for _ in range(4)]
    assert all("Question" in r["prompt"] and r["reward"] in (0.0, 0.1, 1.0) for r in samples)
    assert set(samples[0]) == {"step", "table", *SAMPLE_COLUMNS}
    state = json.loads((run / "trackers.json").read_text())
    assert {name: entry["last_step"] for name, entry in state.items()} == {"wandb": 4, "trackio": 4, "mlflow": 4}

    wb = wandb_read(run)
    ml = mlflow_read(offline["MLFLOW_TRACKING_URI"], state["mlflow"]["run_id"])
    tio = trackio_read(state["trackio"]["project"], state["trackio"]["name"])
    assert set(wb["ids"]) == {state["wandb"]["id"]} and ml["runs"] == [state["mlflow"]["run_id"]]
    for backend in (wb, ml, tio):
        assert [s for s, _ in backend["steps"]] == [1, 2, 3, 4], backend["steps"]
        # steps 1-2 from the first attempt, 4 from the resumed one (3: the attempt that sent it first)
        values = [v for _, v in backend["steps"]]
        assert values[:2] + values[3:] == pytest.approx([v for _, v in jsonl][:2] + [jsonl[3][1]])
        assert sorted(backend["tables"]) == [1, 2, 3, 4]
    assert wb["config"]["model"] == warmup_model and wb["config"]["report_to"] == ["wandb", "trackio", "mlflow"]
    assert ml["params"]["model"] == warmup_model and tio["config"]["model"] == warmup_model
    assert [row[:2] for row in wb["tables"][4]["data"]] == [[r["id"], r["prompt"]] for r in samples if r["step"] == 4]
    assert ml["tables"][1]["data"] == wb["tables"][1]["data"]
    assert [row["completion"] for row in tio["tables"][2]] == [r["completion"] for r in samples if r["step"] == 2]


def test_online_st_logs_a_table_of_samples_every_n_steps(tmp_path, warmup_model, small_task):
    cfg = OnlineSTConfig(model=warmup_model, data=small_data(), out_dir=str(tmp_path / "ost"), steps=2,
                         questions_per_step=4, mini_batch_size=2, max_new_tokens=8, eval_max_new_tokens=4,
                         eval_every=0, save_every=0, device="cpu", progress=False, report_to="none",
                         log_samples_every=2)
    run_online_st(cfg, task=small_task)
    run = Path(cfg.out_dir)
    samples = read_jsonl(run / "samples.jsonl")
    assert [r["step"] for r in samples] == [2] * 4  # every 2 steps: step 2 only
    questions = {ex.id: ex for ex in small_task.train}
    for r in samples:
        assert questions[r["id"]].question in r["prompt"] and r["gold"] == questions[r["id"]].answer
        assert r["reward"] == {True: 1.0, False: 0.1 if r["answer"] is not None else 0.0}[r["correct"]]
    assert not (run / "tb").exists() and not (run / "trackers.json").exists()  # report_to=none
