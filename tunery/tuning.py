"""Hyperparameter search: `tunery tune --config base.yaml --trials N --space "lr=loguniform(1e-5,1e-3)" ...`.

Optuna proposes each trial's values (TPE by default), and the trial is a normal run: `tunery train METHOD
--config base.yaml --set FIELD=VALUE ... --out OUT/trial-NNN`, a process of its own whose output goes to
OUT/logs/trial-NNN.log. While it trains, its metrics.jsonl is read as it grows and each periodic
held-out value (`valid_loss` by default) goes to `trial.report`; when optuna's pruner (median by default)
says the trial is behind, the run gets SIGTERM, checkpoints and stops, and the trial is PRUNED. A trial's
value is its final full held-out evaluation (`full_valid_loss`) from summary.json.

The study lives in optuna's database storage: SQLite at OUT/study.db by default, or `--storage URL`
(PostgreSQL) shared by `tunery tune` processes on several machines, which then split the N trials between
them. `--parallel K` runs K trials at once from this process. `--trials N` counts finished trials (complete
or pruned) over every run of the command, so running it again continues the study: a trial interrupted by
Ctrl-C, or whose process died (its heartbeat stops; after `HEARTBEAT_GRACE` seconds another worker notices),
is tried again with the same values and resumes its run directory from its last checkpoint.

At the end: the trials table (printed and OUT/trials.csv), the best config (OUT/best.yaml: the base config
with the best trial's values), and optuna's parameter-importance plot (OUT/importance.png).
"""

from __future__ import annotations

import csv
import logging
import math
import os
import re
import signal
import subprocess
import sys
import threading
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml

from tunery.errors import TuneryError

log = logging.getLogger("tunery")

HEARTBEAT_SECONDS = 10
HEARTBEAT_GRACE = 40  # a RUNNING trial whose heartbeat is older than this is failed and tried again
POLL_SECONDS = 1.0  # how often a running trial's metrics.jsonl is read
KINDS = ("loguniform", "uniform", "int", "logint", "choice")


# --- the search space -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Dimension:
    name: str
    kind: str
    low: float = 0.0
    high: float = 0.0
    choices: tuple[Any, ...] = ()

    def suggest(self, trial: Any) -> Any:
        if self.kind == "choice":
            return trial.suggest_categorical(self.name, list(self.choices))
        if self.kind in ("int", "logint"):
            return trial.suggest_int(self.name, int(self.low), int(self.high), log=self.kind == "logint")
        return trial.suggest_float(self.name, self.low, self.high, log=self.kind == "loguniform")

    def text(self) -> str:
        inside = (
            ", ".join(map(str, self.choices)) if self.kind == "choice" else f"{self.low:g}, {self.high:g}"
        )
        return f"{self.name}={self.kind}({inside})"


SPEC = re.compile(r"^\s*([A-Za-z_][A-Za-z0-9_-]*)\s*=\s*([a-z]+)\s*\((.*)\)\s*$")


def parse_space(specs: list[str], fields: dict[str, Any]) -> list[Dimension]:
    """`name=kind(args)` for each dimension; `name` a config field of the method (dashes allowed)."""
    import difflib

    dimensions = []
    for spec in specs:
        match = SPEC.match(spec)
        if not match:
            raise TuneryError(
                f'--space {spec!r}: expected NAME=KIND(ARGS), e.g. "lr=loguniform(1e-5,1e-3)" or '
                f'"lora_rank=choice(8,16,32)"; KIND is one of {", ".join(KINDS)}'
            )
        name, kind, args = match.group(1).replace("-", "_"), match.group(2), match.group(3)
        if name not in fields:
            close = difflib.get_close_matches(name, list(fields), n=1)
            hint = f"; did you mean {close[0]}?" if close else ""
            raise TuneryError(f"--space {spec!r}: {name} is not a config field of this method{hint}")
        if kind not in KINDS:
            raise TuneryError(f"--space {spec!r}: {kind} is not one of {', '.join(KINDS)}")
        try:
            values = [_value(a) for a in args.split(",")] if args.strip() else []
        except yaml.YAMLError as exc:
            raise TuneryError(f"--space {spec!r}: cannot read the values ({exc})") from exc
        if kind == "choice":
            if not values or any(isinstance(v, dict | list) or v is None for v in values):
                raise TuneryError(f"--space {spec!r}: choice needs one or more plain values")
            dimensions.append(Dimension(name, kind, choices=tuple(values)))
            continue
        if len(values) != 2 or not all(
            isinstance(v, int | float) and not isinstance(v, bool) for v in values
        ):
            raise TuneryError(f"--space {spec!r}: {kind} takes two numbers, low and high")
        low, high = float(values[0]), float(values[1])
        if not low < high:
            raise TuneryError(f"--space {spec!r}: low must be below high")
        if kind in ("loguniform", "logint") and low <= 0:
            raise TuneryError(f"--space {spec!r}: a log scale needs a positive low")
        if kind in ("int", "logint") and not (low.is_integer() and high.is_integer()):
            raise TuneryError(f"--space {spec!r}: int takes whole numbers")
        dimensions.append(Dimension(name, kind, low, high))
    names = [d.name for d in dimensions]
    if len(set(names)) != len(names):
        raise TuneryError("--space names a field twice")
    if not dimensions:
        raise TuneryError('--space: give at least one dimension, e.g. "lr=loguniform(1e-5,1e-3)"')
    return dimensions


def _value(text: str) -> Any:
    """A number as Python reads it (PyYAML reads `1e-4` as text), else a YAML scalar (`true`, `cosine`)."""
    text = text.strip()
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return yaml.safe_load(text)


# --- the study --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Search:
    method: str
    base_config: Path | None
    base_values: dict[str, Any]  # the base config's fields with --set applied (for best.yaml)
    sets: list[str]  # the user's --set pairs, passed to every trial
    space: list[Dimension]
    out: Path
    trials: int
    metric: str  # the periodic held-out metric the pruner sees (valid_loss)
    direction: Literal["minimize", "maximize"]
    parallel: int
    storage: str
    study_name: str
    pruner: str  # median | hyperband | none
    sampler: str  # tpe | random
    seed: int
    launcher: tuple[str, ...] = (sys.executable, "-m", "tunery")  # what runs `train ...` (tests: a fake)


def final_name(metric: str) -> str:
    return metric if metric.startswith("full_") else f"full_{metric}"


def make_study(search: Search) -> Any:
    import optuna
    from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback

    optuna.logging.set_verbosity(optuna.logging.ERROR)  # a failed trial is told once, by `run_search`
    with warnings.catch_warnings():  # "experimental" since optuna 2.8; the failed-trial names go in 6.0
        warnings.simplefilter("ignore", category=optuna.exceptions.ExperimentalWarning)
        storage = RDBStorage(
            search.storage,
            heartbeat_interval=HEARTBEAT_SECONDS,
            grace_period=HEARTBEAT_GRACE,
            heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(max_retry=2),
        )
    pruner: Any = {
        "median": optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=0),
        "hyperband": optuna.pruners.HyperbandPruner(min_resource=1),
        "none": optuna.pruners.NopPruner(),
    }[search.pruner]
    sampler: Any = (
        optuna.samplers.TPESampler(seed=search.seed, n_startup_trials=min(5, max(2, search.trials // 3)))
        if search.sampler == "tpe"
        else optuna.samplers.RandomSampler(seed=search.seed)
    )
    study = optuna.create_study(
        storage=storage,
        study_name=search.study_name,
        direction=search.direction,
        pruner=pruner,
        sampler=sampler,
        load_if_exists=True,
    )
    known = study.user_attrs.get("space")
    wanted = [d.text() for d in search.space]
    if known is not None and known != wanted:
        raise TuneryError(
            f"the study {search.study_name} in {search.storage} searched {', '.join(known)}; this command "
            f"searches {', '.join(wanted)}: keep the same --space, or choose another --out or --study"
        )
    study.set_user_attr("space", wanted)
    study.set_user_attr("method", search.method)
    return study


def counted(study: Any) -> tuple[int, int]:
    """(finished trials: complete or pruned, failed trials that will not be tried again)."""
    from optuna.trial import TrialState

    trials = study.get_trials(deepcopy=False)
    finished = sum(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in trials)
    retried = {t.user_attrs.get("resume_of") for t in trials} | {
        t.system_attrs.get("failed_trial") for t in trials
    }
    failed = sum(
        t.state == TrialState.FAIL and not t.user_attrs.get("interrupted") and t.number not in retried
        for t in trials
    )
    return finished, failed


def requeue_interrupted(study: Any) -> None:
    """Trials stopped by Ctrl-C last time: the same values again, resuming their run directories."""
    from optuna.trial import TrialState

    trials = study.get_trials(deepcopy=False)
    taken = {t.user_attrs.get("resume_of") for t in trials}
    for t in trials:
        if t.state == TrialState.FAIL and t.user_attrs.get("interrupted") and t.number not in taken:
            study.enqueue_trial(
                t.params, user_attrs={"resume_of": t.number, "run_dir": t.user_attrs.get("run_dir")}
            )


class Interrupted(Exception):
    """Ctrl-C or SIGTERM reached `tunery tune`: running trials were stopped at a checkpoint."""


class Objective:
    """One trial: start its run, feed the pruner from its metrics.jsonl, return its final held-out value."""

    def __init__(self, search: Search) -> None:
        self.search = search
        self.stopping = threading.Event()
        self.threads = max(1, (os.cpu_count() or 1) // search.parallel)

    def __call__(self, trial: Any) -> float:
        import optuna
        from optuna.storages import RetryHeartbeatStaleTrialCallback

        search = self.search
        original = trial.user_attrs.get("resume_of")
        if original is None:  # a trial whose process died: the heartbeat's retry names it
            frozen = next(t for t in trial.study.get_trials(deepcopy=False) if t.number == trial.number)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", category=optuna.exceptions.ExperimentalWarning)
                original = RetryHeartbeatStaleTrialCallback.retried_trial_number(frozen)
        number = trial.number if original is None else original
        run_dir = search.out / f"trial-{number:03d}"
        trial.set_user_attr("run_dir", str(run_dir))
        values = {d.name: d.suggest(trial) for d in search.space}
        command = [*search.launcher, "train", search.method]
        if original is not None and (run_dir / "checkpoints").is_dir():
            command += ["--resume", str(run_dir)]  # the values are in its config.yaml
        else:
            if search.base_config is not None:
                command += ["--config", str(search.base_config)]
            for pair in search.sets:
                command += ["--set", pair]
            for name, value in values.items():
                command += ["--set", f"{name}={_yaml_scalar(value)}"]
            command += ["--out", str(run_dir), "--overwrite"]
        logs = search.out / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "OMP_NUM_THREADS": str(self.threads), "MKL_NUM_THREADS": str(self.threads)}
        started = time.monotonic()
        with (logs / f"trial-{number:03d}.log").open("a", encoding="utf-8") as out:
            out.write(f"$ {' '.join(command)}\n")
            out.flush()
            process = subprocess.Popen(
                command, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                start_new_session=True,  # Ctrl-C reaches tune, which stops the trials itself
            )  # fmt: skip
            pruned = self._follow(trial, process, run_dir)
        trial.set_user_attr("seconds", round(time.monotonic() - started, 1))
        if pruned:
            raise optuna.TrialPruned()
        if process.returncode != 0 and self.stopping.is_set():
            trial.set_user_attr("interrupted", True)
            raise Interrupted()
        if process.returncode != 0:
            error = f"the run exited with status {process.returncode}; see {logs / f'trial-{number:03d}.log'}"
            trial.set_user_attr("error", error)
            raise TrialFailed(error)
        try:
            return self._value(run_dir)
        except TrialFailed as exc:
            trial.set_user_attr("error", str(exc))
            raise

    def _follow(self, trial: Any, process: subprocess.Popen[Any], run_dir: Path) -> bool:
        """Report each new periodic value; SIGTERM the run when the pruner says so (or tune is stopping).
        True when pruned."""
        from tunery.run.files import read_metrics

        reported: set[int] = set()
        while True:
            done = process.poll() is not None
            for record in read_metrics(run_dir) if run_dir.exists() else []:
                value, step = record.get(self.search.metric), record.get("step")
                if isinstance(value, int | float) and isinstance(step, int) and step not in reported:
                    reported.add(step)
                    if math.isfinite(value):
                        trial.report(float(value), step)
                    if not done and trial.should_prune():
                        trial.set_user_attr("pruned_at_step", step)
                        self._stop(process)
                        return True
            if done:
                return False
            if self.stopping.is_set():
                self._stop(process)
                return False
            time.sleep(POLL_SECONDS)

    @staticmethod
    def _stop(process: subprocess.Popen[Any]) -> None:
        """SIGTERM: the run checkpoints and exits (resumable); SIGKILL if it has not within a minute."""
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()

    def _value(self, run_dir: Path) -> float:
        from tunery.run.files import read_summary

        summary = read_summary(run_dir)
        if summary is None:
            raise TrialFailed(f"{run_dir} has no summary.json")
        final = summary.final_metrics
        for name in (final_name(self.search.metric), self.search.metric):
            value = final.get(name)
            if isinstance(value, int | float) and math.isfinite(value):
                return float(value)
        raise TrialFailed(
            f"{run_dir}: the run reported no {final_name(self.search.metric)} (does it have --valid?)"
        )


def _yaml_scalar(value: Any) -> str:
    """`value` as --set reads it back (YAML): floats always with a dot (`1.0e-04`, not `1e-04`)."""
    if isinstance(value, float):
        return f"{value:.17e}"  # exact, and with the dot YAML 1.1 needs
    return str(yaml.safe_dump(value, default_flow_style=True)).strip().removesuffix("...").strip()


class TrialFailed(Exception):
    pass


def run_search(search: Search) -> Any:
    """Run trials until `search.trials` have finished (over every run of the command); returns the study."""
    study = make_study(search)
    requeue_interrupted(study)
    objective = Objective(search)
    finished, failed = counted(study)
    if finished >= search.trials:
        print(f"the study has {finished} finished trials already (--trials {search.trials}): nothing to run")
        return study

    def enough(study: Any, trial: Any) -> None:
        if trial.state.name == "FAIL" and trial.user_attrs.get("error"):
            print(f"  trial {trial.number} failed: {trial.user_attrs['error']}", flush=True)
        finished, failed = counted(study)
        if finished >= search.trials or failed >= max(3, search.trials):
            study.stop()
        print(
            f"  {finished}/{search.trials} trials finished" + (f", {failed} failed" if failed else ""),
            flush=True,
        )

    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}

    def stop(signum: int, _frame: Any) -> None:
        objective.stopping.set()

    for sig in previous:
        signal.signal(sig, stop)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", category=UserWarning)  # optuna's note on n_jobs with SQLite
            while not objective.stopping.is_set() and counted(study)[0] < search.trials:
                remaining = search.trials - counted(study)[0]
                study.optimize(
                    objective,
                    n_trials=remaining,
                    n_jobs=search.parallel,
                    callbacks=[enough],
                    catch=(TrialFailed,),
                )
                if counted(study)[1] >= max(3, search.trials):
                    break
    except Interrupted:
        pass
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if objective.stopping.is_set():
        raise TuneryError(
            "stopped: the running trials checkpointed and will resume; continue with the same command"
        )
    return study


# --- the report ---------------------------------------------------------------------------------------------


def trial_rows(study: Any, search: Search) -> list[dict[str, Any]]:
    rows = []
    for t in study.get_trials(deepcopy=False):
        rows.append(
            {
                "trial": t.number,
                "state": t.state.name.lower(),
                final_name(search.metric): t.value if t.state.name == "COMPLETE" else None,
                **{d.name: t.params.get(d.name) for d in search.space},
                "last_step": t.last_step,
                "seconds": t.user_attrs.get("seconds"),
                "run_dir": t.user_attrs.get("run_dir"),
            }
        )
    return rows


def report(study: Any, search: Search) -> dict[str, Any]:
    """Print the trials table; write trials.csv, best.yaml and importance.png. Returns what it wrote."""
    from tunery.training.io import atomic_write_text

    rows = trial_rows(study, search)
    columns = list(rows[0]) if rows else []
    if rows:
        path = search.out / "trials.csv"
        tmp = path.with_name(".trials.csv.tmp")
        with tmp.open("w", newline="", encoding="utf-8") as fh:
            writer = csv.DictWriter(fh, fieldnames=columns)
            writer.writeheader()
            writer.writerows(rows)
        os.replace(tmp, path)
    print(_table(rows, columns))
    written: dict[str, Any] = {"trials": search.out / "trials.csv"}
    complete = [t for t in study.get_trials(deepcopy=False) if t.state.name == "COMPLETE"]
    if not complete:
        print("no trial completed, so there is no best config")
        return written
    best = study.best_trial
    values = {**search.base_values, **best.params}
    values.pop("out", None)
    header = (
        f"# best of {len(complete)} completed trials ({search.study_name}): trial {best.number}, "
        f"{final_name(search.metric)} {best.value:.4f}\n# its run: {best.user_attrs.get('run_dir')}\n"
    )
    atomic_write_text(search.out / "best.yaml", header + yaml.safe_dump(values, sort_keys=False))
    written["best"] = search.out / "best.yaml"
    print(f"best: trial {best.number}, {final_name(search.metric)} {best.value:.4f}, "
          + ", ".join(f"{k}={v}" for k, v in best.params.items()) + f" -> {search.out / 'best.yaml'}")  # fmt: skip
    plot = importance_plot(study, search.out / "importance.png")
    if plot is not None:
        written["importance"] = plot
        print(f"parameter importances: {plot}")
    return written


def importance_plot(study: Any, path: Path) -> Path | None:
    """optuna's parameter-importance plot (fANOVA on the completed trials), as a PNG."""
    import optuna

    complete = [t for t in study.get_trials(deepcopy=False) if t.state.name == "COMPLETE"]
    if len(complete) < 2:
        print("parameter importances need two completed trials: no plot")
        return None
    import matplotlib

    matplotlib.use("Agg")
    from optuna.visualization.matplotlib import plot_param_importances

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", category=optuna.exceptions.ExperimentalWarning)
        try:
            axes = plot_param_importances(study)
        except (RuntimeError, ValueError) as exc:  # e.g. every trial had the same values
            print(f"parameter importances could not be computed ({exc}): no plot")
            return None
    figure: Any = axes.figure
    figure.set_size_inches(7, 1.5 + 0.5 * len(study.best_trial.params))
    figure.tight_layout()
    tmp = path.with_name(".importance.png.tmp.png")
    figure.savefig(tmp, dpi=110)
    os.replace(tmp, path)
    import matplotlib.pyplot as plt

    plt.close(figure)
    return path


def _table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    def shown(value: Any) -> str:
        if value is None:
            return "-"
        if isinstance(value, float):
            return f"{value:.4g}"
        return str(value)

    cells = [[shown(r[c]) for c in columns] for r in rows]
    widths = [
        max(len(c), *(len(row[i]) for row in cells)) if cells else len(c) for i, c in enumerate(columns)
    ]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)) for row in cells]
    return "\n".join(lines)
