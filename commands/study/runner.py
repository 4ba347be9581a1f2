"""Runs a study's grid in parallel, each run in its own process, resumable, never losing a crashed run.

Study directory layout::

    <study>/study.yaml            the study config: the file as given, or what it resolves to where it extends
                                  another or was overridden (a later `compare` may only add runs to it)
    <study>/runs/<env>/<row>/s<seed>/   a normal run directory (config.json, metrics.jsonl, final_eval.json, ...)
                                  plus study_run.json: status, attempts, wall-clock, config fingerprint
    <study>/logs/<env>/<row>/s<seed>.attempt<k>.log   stdout/stderr of each attempt
    <study>/errors.log            one block per failed attempt
    <study>/report.md, report.json, curves.png

Each run is a subprocess (``tlb-rl train --algo ...`` or the RecurrentPPO baseline), so a crash, even a
segfault or an out-of-memory kill, ends that run only. A failed attempt is recorded and retried once (from
its latest checkpoint when there is one; an sb3-contrib run from the start); a run that fails twice is
reported as failed, and the next ``compare`` tries it again. A run with ``final_eval.json`` and a matching
config fingerprint is finished and skipped.

Backends: ``local`` runs ``workers`` subprocesses at a time from a thread pool (the threads only wait);
``ray`` sends each run as a 1-CPU Ray task, so a cluster (``--address auto``) spreads them over its nodes;
there every node needs this package installed and the study directory on a shared filesystem.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import yaml

from agents import ALGORITHMS
from commands.study.config import RunSpec, StudyConfig, expand, load_study, study_source
from tlb_rl.errors import UserError

MAX_ATTEMPTS = 2
"""A run is tried once and retried once before it is reported as failed."""
ERROR_TAIL_LINES = 20
INTERRUPTED = (130, -signal.SIGINT, -signal.SIGTERM, -signal.SIGKILL)
"""Exit statuses of a run that was stopped from outside: it is resumed by the next compare, not retried."""
REPO_ROOT = Path(__file__).resolve().parents[2]
"""The checkout holding tlb_rl/, agents/ and envs/: a run's process imports this code, installed or not."""


@dataclass
class RunOutcome:
    """What became of one run: ``done``, ``skipped`` (finished earlier), ``failed`` or ``interrupted``."""

    run_id: str
    status: str
    attempts: int = 0
    wall_s: float = 0.0
    error: str | None = None


def run_dir_of(study_dir: Path, spec: RunSpec) -> Path:
    return study_dir / "runs" / spec.run_id


def is_finished(study_dir: Path, spec: RunSpec) -> bool:
    """True for a run that completed with this exact config."""
    run_dir = run_dir_of(study_dir, spec)
    record = run_dir / "study_run.json"
    if not record.exists():
        return False
    saved = json.loads(record.read_text())
    if saved.get("status") != "done" or not (run_dir / "final_eval.json").exists():
        return False
    if saved.get("fingerprint") != spec.fingerprint():
        raise UserError(
            f"run {spec.run_id} in {study_dir} was made with a different config; "
            "use another study directory (--out) or delete that run to redo it"
        )
    return True


def _command(spec: RunSpec, run_dir: Path, config_file: Path, resume: bool) -> list[str]:
    if spec.algo in ALGORITHMS:
        how = ["--resume", str(run_dir)] if resume else ["--algo", spec.algo, "--config", str(config_file)]
        return [sys.executable, "-m", "commands.cli", "train", "--no-progress", "--no-gif", *how]
    return [sys.executable, "-m", "commands.study.sb3_baseline", str(config_file), str(run_dir)]


class LocalRuns:
    """The local backend's running runs, each in a session of its own, so that a stop request reaches each run
    once, from ``compare``: a Ctrl-C at the terminal reaches only ``compare``, and SIGTERM (``kill``, a
    scheduler) or SIGHUP (the terminal closed) does what a Ctrl-C does, also for a study running in the
    background, where SIGINT is ignored. The first request lets every run checkpoint after its current update
    and starts no new run; a second stops the runs at once, as for ``tlb-rl train``."""

    def __init__(self) -> None:
        self._lock = threading.RLock()  # re-entrant: a second signal may arrive while the handler holds it
        self._running: set[subprocess.Popen] = set()
        self._stopping = False

    def run(self, command: list[str], **popen_kwargs: Any) -> int:
        """The command's exit status; 130 without starting it once a stop was requested."""
        with self._lock:
            if self._stopping:
                return 130
            proc = subprocess.Popen(command, start_new_session=True, **popen_kwargs)
            self._running.add(proc)
        try:
            return proc.wait()
        finally:
            with self._lock:
                self._running.discard(proc)

    def _stop(self, signum: int, frame: Any) -> None:
        with self._lock:
            self._stopping = True
            running = list(self._running)
        for proc in running:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
        raise KeyboardInterrupt

    @contextlib.contextmanager
    def forward_stop_signals(self) -> Iterator[None]:
        """While inside, SIGINT, SIGTERM and SIGHUP to this process stop the runs (main thread only, where
        Python delivers signals)."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        stops = [signal.SIGINT, signal.SIGTERM]
        hangup = getattr(signal, "SIGHUP", None)  # POSIX only
        if hangup is not None and signal.getsignal(hangup) is not signal.SIG_IGN:  # under nohup the runs go on
            stops.append(hangup)  # the terminal closed: the runs, in sessions of their own, would not know
        previous = {sig: signal.signal(sig, self._stop) for sig in stops}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)


def run_one(study_dir: str, spec_dict: dict[str, Any], local: LocalRuns | None = None) -> dict[str, Any]:
    """Run one grid cell to completion with up to :data:`MAX_ATTEMPTS` attempts; returns a RunOutcome dict.

    Takes and returns plain dicts so a Ray worker can run it as well as a local thread; the local backend
    passes ``local``, which starts the run's process and passes stop requests on to it.
    """
    study = Path(study_dir)
    spec = RunSpec(**spec_dict)
    run_dir = run_dir_of(study, spec)
    log_stem = study / "logs" / spec.run_id
    log_stem.parent.mkdir(parents=True, exist_ok=True)
    ours = spec.algo in ALGORITHMS
    config_file = log_stem.with_suffix(".config.yaml" if ours else ".config.json")
    config = {**spec.config, "run_dir": str(run_dir)} if ours else spec.config
    config_file.write_text(yaml.safe_dump(config) if ours else json.dumps(config))
    record = run_dir / "study_run.json"
    previous = json.loads(record.read_text()) if record.exists() else {}
    if previous.get("fingerprint") != spec.fingerprint() and run_dir.exists():
        shutil.rmtree(run_dir)  # an unfinished run made with another config: its checkpoint is no use
        previous = {}
    attempts, wall = int(previous.get("attempts", 0)), float(previous.get("wall_s", 0.0))
    error: str | None = "not started"
    for _ in range(MAX_ATTEMPTS):
        resume = ours and ALGORITHMS[spec.algo].resumable and (run_dir / "checkpoints" / "latest.pt").exists()
        if not resume and run_dir.exists():
            shutil.rmtree(run_dir)  # a fresh start must not append to a dead attempt's metrics
        run_dir.mkdir(parents=True, exist_ok=True)
        attempts += 1
        _write_record(record, spec, "running", attempts, wall, None)
        log = Path(f"{log_stem}.attempt{attempts}.log")
        started = time.perf_counter()
        with open(log, "w") as out:
            # The child must import this checkout even where the package is not installed (a Ray worker).
            env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")])}
            command = _command(spec, run_dir, config_file, resume)
            if local is None:
                code = subprocess.run(command, stdout=out, stderr=out, env=env).returncode
            else:
                code = local.run(command, stdout=out, stderr=out, env=env)
        wall += time.perf_counter() - started
        if code == 0 and (run_dir / "final_eval.json").exists():
            error = None
            break
        if code in INTERRUPTED:  # Ctrl-C or a kill: not the run's fault, and the user wants to stop
            _write_record(record, spec, "interrupted", attempts, wall, None)
            return asdict(RunOutcome(spec.run_id, "interrupted", attempts, wall, None))
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-ERROR_TAIL_LINES:])
        error = f"exit status {code} (log: {log})\n{tail}"
        with open(study / "errors.log", "a") as f:
            f.write(f"=== {spec.run_id} attempt {attempts} ({time.strftime('%Y-%m-%d %H:%M:%S')}) {error}\n\n")
    status = "done" if error is None else "failed"
    _write_record(record, spec, status, attempts, wall, error)
    return asdict(RunOutcome(spec.run_id, status, attempts, wall, error))


def _write_record(record: Path, spec: RunSpec, status: str, attempts: int, wall: float, error: str | None) -> None:
    """study_run.json; written when an attempt starts too, so a killed study still knows the run's config."""
    fields = {"run_id": spec.run_id, "status": status, "attempts": attempts, "wall_s": wall}
    fields.update(fingerprint=spec.fingerprint(), error=error)
    record.write_text(json.dumps(fields, indent=2) + "\n")


def _check_study_file(
    study_dir: Path, config_path: str | Path, study: StudyConfig, overrides: list[str] | tuple[str, ...] = ()
) -> None:
    """A study directory belongs to one config, which may grow: a config that keeps every run of the saved one
    with the same settings and adds runs (seeds, envs, agents, cores) is taken, anything else refused. The
    config is kept in the directory so `tlb-rl report` can re-render without it."""
    saved = study_dir / "study.yaml"
    given = study_source(config_path, overrides)
    if saved.exists() and yaml.safe_load(saved.read_text()) != yaml.safe_load(given):
        new = {spec.run_id: spec.fingerprint() for spec in expand(study)}
        source = f"{config_path} with {' '.join(overrides)}" if overrides else str(config_path)
        for spec in expand(load_study(saved, runnable=False)):
            if new.get(spec.run_id) != spec.fingerprint():
                what = "drops" if spec.run_id not in new else "changes the settings of"
                raise UserError(
                    f"{study_dir} holds a study made from another config (see {saved}), and {source} {what} "
                    f"its run {spec.run_id}; a config may only add runs to a study: use --out for a new directory"
                )
    study_dir.mkdir(parents=True, exist_ok=True)
    saved.write_text(given)


def _run_local(study_dir: Path, todo: list[RunSpec], workers: int, on_done: Callable[[dict], None]) -> None:
    local = LocalRuns()
    pool = ThreadPoolExecutor(max_workers=workers)
    with local.forward_stop_signals():
        try:
            futures = [pool.submit(run_one, str(study_dir), asdict(spec), local) for spec in todo]
            for future in as_completed(futures):
                on_done(future.result())
        finally:
            # After a stop request the running runs save a checkpoint and end; queued runs never start.
            pool.shutdown(wait=True, cancel_futures=True)


def _run_ray(
    study_dir: Path, todo: list[RunSpec], workers: int | None, address: str | None, on_done: Callable[[dict], None]
) -> None:
    try:
        import ray
    except ImportError:
        raise UserError("--backend ray needs Ray: pip install 'tlb-rl[ray]' (or pip install ray)") from None
    if address:
        ray.init(address=address, log_to_driver=False)
    else:  # a local Ray instance with `workers` CPUs
        # Ray starts its workers at niceness 15, so on a busy machine the runs, which are all the work
        # there is, would yield to every other process; the local backend's runs keep normal priority too.
        os.environ.setdefault("RAY_worker_niceness", "0")
        ray.init(num_cpus=workers, include_dashboard=False, log_to_driver=False)
    try:
        task = ray.remote(num_cpus=1, max_retries=0)(run_one)
        pending = [task.remote(str(study_dir.resolve()), asdict(spec)) for spec in todo]
        while pending:
            finished, pending = ray.wait(pending, num_returns=1)
            on_done(ray.get(finished[0]))
    finally:
        ray.shutdown()


def run_study(
    config_path: str | Path,
    study_dir: str | Path,
    backend: str = "local",
    workers: int | None = None,
    address: str | None = None,
    log: Callable[[str], None] = print,
    overrides: list[str] | tuple[str, ...] = (),
) -> list[RunOutcome]:
    """Run every unfinished run of the study in ``config_path`` (with ``key=value`` ``overrides``) into
    ``study_dir``; returns one outcome per run of the grid.

    :raises UserError: a bad config, or a study directory that holds runs the config drops or changes.
    """
    study, study_dir = load_study(config_path, overrides=overrides), Path(study_dir)
    _check_study_file(study_dir, config_path, study, overrides)
    specs = expand(study)
    done = {s.run_id for s in specs if is_finished(study_dir, s)}
    todo = [s for s in specs if s.run_id not in done]
    outcomes = [RunOutcome(run_id, "skipped") for run_id in sorted(done)]
    log(f"{len(specs)} runs: {len(done)} finished earlier, {len(todo)} to run ({backend} backend)")

    def on_done(result: dict) -> None:
        outcome = RunOutcome(**result)
        outcomes.append(outcome)
        note = f" after {outcome.attempts} attempts: {outcome.error.splitlines()[0]}" if outcome.error else ""
        log(f"[{len(outcomes)}/{len(specs)}] {outcome.run_id}: {outcome.status} ({outcome.wall_s:.0f} s){note}")

    if todo:
        if backend == "local":
            _run_local(study_dir, todo, workers or 1, on_done)
        elif backend == "ray":
            _run_ray(study_dir, todo, workers, address, on_done)
        else:
            raise UserError(f"unknown backend '{backend}'; use local or ray")
    return outcomes


def failed(outcomes: Iterable[RunOutcome]) -> list[RunOutcome]:
    return [o for o in outcomes if o.status == "failed"]
