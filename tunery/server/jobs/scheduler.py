"""The scheduler: a thread in the server process that starts each job's commands (processes.py), follows
them, and turns what they report into the job's statuses, events and checkpoints. Every status change
happens under its lock, the API's actions (cancel, pause, resume) included.

Several `tunery serve` processes may share a database (PostgreSQL): each answers the API, and one at a
time schedules, the one holding the database's scheduler lease (store.LeaseHolder). The API's actions
change the job's row on whichever process takes the request; the scheduling one sees the change at its
next look and stops the job's process (`_follow_requests`). When the holder dies, another takes the lease
over within `scheduler_lease_seconds` and recovers the jobs as a restarted service does: with Ray it
follows the Ray jobs again, locally it stops the orphaned process and resumes from its checkpoint."""

from __future__ import annotations

import logging
import signal
import threading
import time

from sqlalchemy import select
from sqlalchemy.orm import Session

from tunery.safety.audit import AuditLog
from tunery.server.catalog import job_dir
from tunery.server.errors import APIError
from tunery.server.jobs.audit import log_job_changes
from tunery.server.jobs.create import TERMINAL, add_event, check_queue_quota, next_queue_seq
from tunery.server.jobs.executors import RayExecutor
from tunery.server.jobs.outcomes import DIED, fail, record_progress, resumable, retry_or_fail, succeed
from tunery.server.jobs.processes import (
    Proc,
    attach_training,
    job_resources,
    send,
    start_training,
    start_validation,
    stop_orphan,
)
from tunery.server.jobs.reports import (
    checkpoint_steps,
    death_cause,
    finished_summary,
    foreign_format,
    read_check_report,
    resume_point,
    screening_warnings,
    stop_cause,
    tail_error,
    unreported_check_error,
    validation_error,
)
from tunery.server.settings import Settings
from tunery.server.store import File, Job, LeaseHolder, Store, now, remove_expired_files

log = logging.getLogger("tunery.server")

EXPIRED_FILES_EVERY = 60.0  # seconds between sweeps for files past their expiry
VALIDATIONS_AT_ONCE = 2  # file checks running at once, of different projects
# a Ray job waiting this long for room does not hold the queue up any more (it may ask for more than any
# node has): the next job is submitted beside it
RAY_WAIT_ALONE_SECONDS = 120.0


class Scheduler:
    def __init__(self, store: Store, settings: Settings, audit: AuditLog | None = None) -> None:
        self.store, self.settings, self.audit = store, settings, audit
        log_job_changes(store)  # a line on the serve console per status change, whoever makes it
        self.lock = threading.RLock()  # every status change happens under it (API threads and the loop)
        self.procs: dict[tuple[str, str], Proc] = {}  # (job id, kind) -> process
        self._turns: dict[str, float] = {}  # project id -> when its last training process started
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self.ray = (
            RayExecutor(settings.ray_address, settings.stop_grace_seconds)
            if settings.executor == "ray"
            else None
        )
        self.lease = LeaseHolder(store, "scheduler", settings.scheduler_lease_seconds)
        self.leading = False  # this process holds the lease and schedules
        self._renewed = 0.0
        self._swept = 0.0  # when expired files were last removed

    # --- life cycle -------------------------------------------------------------------------------------

    def start(self) -> None:
        for path in (self.settings.files_dir, self.settings.jobs_dir, self.settings.logs_dir):
            path.mkdir(parents=True, exist_ok=True)
        self._lead()  # the first process on a database schedules (and recovers) before it answers
        self._thread = threading.Thread(target=self._loop, name="tunery-scheduler", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop the loop; running jobs checkpoint and stop, and stay `running` to resume on next start."""
        self._stopping.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
        with self.lock:
            self._let_go()
        self.lease.release()  # another process takes over at once

    def _let_go(self, record: bool = True) -> None:
        """Stop scheduling: local training processes checkpoint and stop (SIGTERM, then SIGKILL after the
        grace period) and stay `running` to resume on the next start; Ray jobs run on, to be followed again
        by whoever schedules next; file checks are killed and rerun. `record`: write what the stopped
        processes left to their jobs (this process still holds the lease). Not when another process took
        the lease: the jobs are its to record now, and it may already run them in processes of its own."""
        self.leading = False  # first: the last tick below records, it starts nothing
        detached = []
        for key, proc in self.procs.items():
            if proc.kind == "train" and self.ray is not None:
                detached.append(key)
            elif proc.runner.poll() is None:
                proc.stop_reason = proc.stop_reason or "shutdown"  # validation reruns on the next start
                send(proc, signal.SIGTERM if proc.kind == "train" else signal.SIGKILL)
        for key in detached:
            proc = self.procs.pop(key)
            proc.runner.copy_output()
            proc.log.close()
        deadline = time.monotonic() + self.settings.stop_grace_seconds
        for proc in self.procs.values():
            if proc.runner.wait(timeout=max(0.0, deadline - time.monotonic())) is None:
                send(proc, signal.SIGKILL)
                proc.runner.wait(timeout=None)
        if record:
            self._tick()  # record what the stopped processes left (a finished job, the last metrics)
        for proc in self.procs.values():
            proc.log.close()
        self.procs.clear()

    def _lead(self) -> bool:
        """Whether this process schedules: it takes the lease when it is free, renews it while it holds it
        (every third of its term), and recovers the jobs when it takes it. A process stalled past its term
        schedules on if no other took the lease meanwhile (the only process on a database always does);
        one whose lease was taken lets its processes go."""
        term = self.settings.scheduler_lease_seconds
        if self.leading and self.lease.held(margin=term / 2) and time.monotonic() - self._renewed < term / 3:
            return True
        with self.lock:
            if self.leading and not self.lease.held():
                if self.lease.hold(own_only=True):
                    log.warning(
                        "this tunery serve was stalled past the scheduler lease's term; no other took it, "
                        "so it schedules on"
                    )
                    self._renewed = time.monotonic()
                    return True
                # another process may have scheduled meanwhile, so this one lets go and, if it takes the
                # lease again, recovers as a newcomer
                log.warning("the scheduler lease ran out while this tunery serve was stalled; letting go")
                self._let_go(record=False)
        held = self.lease.hold()
        self._renewed = time.monotonic()
        with self.lock:
            if held and not self.leading:
                try:
                    self.recover()
                except Exception:  # e.g. the Ray cluster did not answer: recover at the next look
                    log.exception("recovering the jobs failed; trying again")
                    for proc in self.procs.values():
                        proc.log.close()
                    self.procs.clear()
                    return False
                self.leading = True
                log.info("scheduling jobs (holding the database's scheduler lease)")
            elif not held and self.leading:
                log.warning("another tunery serve holds the scheduler lease now; this one stops scheduling")
                self._let_go(record=False)
        return held and self.leading

    def wake(self) -> None:
        self._wake.set()

    def recover(self) -> None:
        """Jobs the last server left running go back to the queue, first in line, to resume. A process
        found gone (the server and its job both died, or the machine restarted) counts as a retry: a job
        that takes the machine down with it is not retried forever."""
        settings = self.settings
        with self.lock, self.store.session() as session:
            for job in session.scalars(select(Job).where(Job.status.in_(("running", "paused", "cancelled")))):
                died = False
                if job.ray_job is not None and self._follow(session, job):
                    continue
                if job.ray_job is not None:  # the cluster has no such job (it was restarted)
                    died, job.ray_job = job.status == "running", None
                if job.pid is not None:
                    died = not stop_orphan(job.pid, job.id, settings.stop_grace_seconds)
                    job.pid = None
                if job.status != "running":
                    continue
                run_dir = job_dir(settings, job.id) / "run"
                if not (job_dir(settings, job.id) / "training.jsonl").is_file():
                    fail(
                        session,
                        settings,
                        job,
                        "job_interrupted",
                        "The service restarted and the job's data directory is gone; it cannot be resumed.",
                    )
                    continue
                summary = finished_summary(run_dir)
                if summary is not None:  # it finished while the service was down
                    succeed(session, settings, job, run_dir, summary)
                elif died:
                    retry_or_fail(session, settings, job, "ended while the service was down")
                else:
                    job.status = "queued"
                    where = resume_point(run_dir)
                    add_event(session, job.id, f"The service restarted; the job will resume from {where}")
            for job in session.scalars(select(Job).where(Job.status == "queued", Job.ray_job.is_not(None))):
                if not self._follow(session, job):  # submitted, then lost with the cluster before it started
                    job.ray_job = None

    def _follow(self, session: Session, job: Job) -> bool:
        """Follow the job's Ray job again (a restart, or another process took the lease over): it goes on
        where it is, and its end is handled as if this process had started it. A job paused or cancelled
        while no one followed it is stopped. False when the cluster does not have it."""
        if self.ray is None:
            return False
        proc = attach_training(self.settings, job, self.ray)
        if proc is None:
            return False
        proc.announced = job.status != "queued"
        if job.status in ("paused", "cancelled"):
            proc.stop_reason = "pause" if job.status == "paused" else "cancel"
            self._terminate(proc, graceful=True)
        self.procs[(job.id, "train")] = proc
        add_event(session, job.id, f"The service restarted; it follows {proc.runner.name} again")
        return True

    def _loop(self) -> None:
        while not self._stopping.is_set():
            try:
                if self._lead():
                    with self.lock:
                        if self.lease.held():  # not if it stalled since (waiting for the lock, say)
                            self._tick()
            except Exception:  # the loop must survive anything one job does
                log.exception("scheduler tick failed")
            self._wake.wait(self.settings.poll_seconds)
            self._wake.clear()

    def _tick(self) -> None:
        self._follow_requests()
        for key, proc in list(self.procs.items()):
            code = proc.runner.poll()
            if proc.kind == "train":
                if not proc.announced and proc.runner.started():
                    self._announce(proc)
                proc.runner.copy_output()
                self._read_run(proc)
            if code is not None:
                del self.procs[key]
                proc.log.close()
                if proc.kind == "train":
                    self._finished_training(proc, code)
                else:
                    self._finished_validation(proc, code)
            elif proc.kill_at is not None and time.monotonic() >= proc.kill_at:
                send(proc, signal.SIGKILL)
                proc.kill_at = None
            elif proc.stop_reason is not None and proc.runner.ray_job is not None:
                proc.runner.stop(force=False)  # again, if the cluster did not take it the first time
        # new work only with time left on the lease: a start must not land after another process took over
        if self._stopping.is_set() or not self.leading or not self.lease.held(self.lease.seconds / 3):
            return
        self._start_validations()
        self._start_training()
        if time.monotonic() - self._swept >= EXPIRED_FILES_EVERY:
            self._swept = time.monotonic()
            self._remove_expired_files()

    def _remove_expired_files(self) -> None:
        """Files past their `expires_after` are deleted, rows and bytes, as OpenAI deletes them (the API has
        not shown them since they expired; before, their bytes stayed on disk for good)."""
        for project, row in remove_expired_files(self.store, self.settings.files_dir):
            if self.audit is not None:
                expired = {
                    "file_id": row.id,
                    "filename": row.filename,
                    "purpose": row.purpose,
                    "bytes": row.bytes,
                }
                self.audit.append(project, "file.expired", expired)

    def _follow_requests(self) -> None:
        """Cancel and pause requests another `tunery serve` on the database took: the job's row says
        cancelled or paused while its process here runs on. (Requests taken here stopped it already.)"""
        if not self.procs:
            return
        with self.store.session() as session:
            ids = {job_id for job_id, _kind in self.procs}
            rows = session.execute(select(Job.id, Job.status).where(Job.id.in_(ids)))
            statuses = {job_id: status for job_id, status in rows}
        for (job_id, kind), proc in self.procs.items():
            status = statuses.get(job_id)
            if proc.stop_reason is None and status in ("cancelled", "paused"):
                proc.stop_reason = "cancel" if status == "cancelled" else "pause"
                self._terminate(proc, graceful=kind == "train")

    def _terminate(self, proc: Proc, graceful: bool) -> None:
        if graceful:
            send(proc, signal.SIGTERM)
            proc.kill_at = time.monotonic() + self.settings.stop_grace_seconds
        else:
            send(proc, signal.SIGKILL)

    # --- actions from the API (under the lock) ---------------------------------------------------------

    def cancel(self, session: Session, job: Job) -> None:
        if job.status in TERMINAL:
            raise APIError(
                400,
                f"Job {job.id} has already {_past(job.status)} and cannot be cancelled.",
                code="job_not_cancellable",
            )
        job.status, job.finished_at, job.estimated_finish = "cancelled", now(), None
        add_event(session, job.id, "Fine-tuning job cancelled")
        for kind in ("validate", "train"):
            proc = self.procs.get((job.id, kind))
            if proc is not None and proc.runner.poll() is None:
                proc.stop_reason = "cancel"
                self._terminate(proc, graceful=kind == "train")
        self.wake()

    def pause(self, session: Session, job: Job) -> None:
        if job.status not in ("running", "queued", "validating_files"):
            raise APIError(
                400,
                f"Job {job.id} is {job.status}; only running or queued jobs can be paused.",
                code="job_not_pausable",
            )
        proc = self.procs.get((job.id, "train"))
        if proc is not None and proc.runner.poll() is None:
            proc.stop_reason = "pause"
            self._terminate(proc, graceful=True)
        if job.status == "running":  # its process stops here, or where the scheduling process runs it
            add_event(
                session, job.id, "Pausing the job: a checkpoint is saved at the end of the current step"
            )
        else:
            validating = self.procs.get((job.id, "validate"))
            if validating is not None:
                validating.stop_reason = "pause"
                self._terminate(validating, graceful=False)
            add_event(session, job.id, "Fine-tuning job paused")
        job.status, job.estimated_finish = "paused", None
        self.wake()

    def resume(self, session: Session, job: Job) -> None:
        """A paused job, or a failed one whose training process kept dying (with a fresh count of retries)."""
        if job.status == "failed" and (job.error or {}).get("code") == DIED and resumable(self.settings, job):
            check_queue_quota(session, self.settings, job.project_id)
            run_dir = job_dir(self.settings, job.id) / "run"
            job.status, job.error, job.finished_at = "queued", None, None
            job.queue_seq = next_queue_seq(session)
            add_event(
                session,
                job.id,
                f"Fine-tuning job resumed after its training process died; it continues from "
                f"{resume_point(run_dir)}",
                data={"retry": 0},  # the retries start over (outcomes.deaths)
            )
            self.wake()
            return
        if job.status != "paused":
            raise APIError(
                400,
                f"Job {job.id} is {job.status}; only paused jobs, and failed jobs whose training process "
                "died after it had started the run, can be resumed.",
                code="job_not_paused",
            )
        check_queue_quota(session, self.settings, job.project_id)
        job.status = "queued" if job.stats is not None else "validating_files"
        job.queue_seq = next_queue_seq(session)
        add_event(session, job.id, "Fine-tuning job resumed; it continues from its last checkpoint")
        self.wake()

    # --- validation -------------------------------------------------------------------------------------

    def _start_validations(self) -> None:
        """File checks, VALIDATIONS_AT_ONCE at a time and one a project: a project's huge file (checking
        512 MB takes many minutes) never holds up another project's."""
        checking = [p for p in self.procs.values() if p.kind == "validate"]
        if len(checking) >= VALIDATIONS_AT_ONCE:
            return
        busy = {p.project for p in checking}
        with self.store.session() as session:
            for job in session.scalars(select(Job).where(Job.status == "validating_files").order_by(Job.seq)):
                if job.project_id in busy or (job.id, "validate") in self.procs:
                    continue
                directory = job_dir(self.settings, job.id)
                files = [("training_file", job.training_file, directory / "training.jsonl")]
                if job.validation_file:
                    files.append(("validation_file", job.validation_file, directory / "validation.jsonl"))
                names = " and validation file: ".join(f for _, f, _ in files)
                add_event(session, job.id, f"Validating training file: {names}")
                self.procs[(job.id, "validate")] = start_validation(self.settings, job, files, {})
                busy.add(job.project_id)
                if len(busy) >= VALIDATIONS_AT_ONCE:
                    return

    def _finished_validation(self, proc: Proc, code: int) -> None:
        assert proc.current is not None and proc.out_path is not None
        param, file_id, path = proc.current
        with self.store.session() as session:
            job = session.get(Job, proc.job_id)
            if job is None or job.status != "validating_files" or proc.stop_reason:
                return
            report = read_check_report(proc.out_path)
            if code not in (0, 1) or report is None:
                log_path = job_dir(self.settings, job.id) / "validate.log"
                error = unreported_check_error(log_path, code, proc.log_offset, param)
                fail(session, self.settings, job, error["code"], error["message"], error["param"])
                return
            upload = session.get(File, file_id)
            name = upload.filename if upload is not None else file_id
            foreign = foreign_format(report, path, name, job.method["type"])
            found = validation_error(report, param, file_id, job.method["type"], foreign)
            if found is not None:
                fail(session, self.settings, job, found["code"], found["message"], found["param"])
                return
            for message in screening_warnings(report, param, file_id, self.settings):
                add_event(session, job.id, message, level="warn")
            stats = proc.stats | {param: report["stats"]}
            if proc.pending:
                self.procs[(job.id, "validate")] = start_validation(self.settings, job, proc.pending, stats)
                return
            job.stats = stats
            job.status, job.queue_seq = "queued", next_queue_seq(session)
            add_event(session, job.id, "Files validated, moving job to queued state")
        self.wake()

    # --- training ---------------------------------------------------------------------------------------

    def _start_training(self) -> None:
        """Start queued jobs while there are free slots. Projects take turns: a project with no job running
        goes first, then the one whose job started least recently; a project's own jobs keep their queue
        order. With every slot busy, a job that has trained for its turn gives its slot up (`_take_turns`)."""
        training = [p for p in self.procs.values() if p.kind == "train"]
        if self.ray is not None and any(
            not p.runner.started() and time.monotonic() - p.started < RAY_WAIT_ALONE_SECONDS for p in training
        ):
            return  # one Ray job at a time waits for room on the cluster: the queue's order stays ours
        limit = self.settings.max_running_jobs or 10**9
        per_project = self.settings.project_running_jobs or 10**9
        running: dict[str, int] = {}
        for proc in training:
            running[proc.project] = running.get(proc.project, 0) + 1
        with self.store.session() as session:
            queued = [
                job
                for job in session.scalars(
                    select(Job).where(Job.status == "queued").order_by(Job.queue_seq, Job.seq)
                )
                if (job.id, "train") not in self.procs  # a paused process still checkpointing
                and running.get(job.project_id, 0) < per_project
            ]
            if not queued:
                return
            if len(training) >= limit:
                self._take_turns(session, training, queued)
                return
            queued.sort(key=lambda job: (job.project_id in running, self._turns.get(job.project_id, 0.0)))
            for job in queued[: 1 if self.ray is not None else limit - len(training)]:
                if running.get(job.project_id, 0) < per_project:
                    running[job.project_id] = running.get(job.project_id, 0) + 1
                    self._spawn_training(session, job)

    def _take_turns(self, session: Session, training: list[Proc], queued: list[Job]) -> None:
        """A job that has trained for `job_turn_minutes` while another project's job waits is stopped at its
        next step boundary (it checkpoints, as on pause) and queued again; it continues
        from that checkpoint when its project's turn comes. One job at a time, the one that has run longest."""
        turn = self.settings.job_turn_minutes * 60
        if turn <= 0:
            return
        waiting = {job.project_id for job in queued}
        due = [
            p
            for p in training
            if p.stop_reason is None and waiting - {p.project} and time.monotonic() - p.started >= turn
        ]
        if not due or any(p.stop_reason == "turn" for p in training):
            return
        proc = min(due, key=lambda p: p.started)
        proc.stop_reason = "turn"
        self._terminate(proc, graceful=True)
        add_event(
            session,
            proc.job_id,
            f"Another project's job is waiting: this job gives up its training slot after "
            f"{self.settings.job_turn_minutes:g} minutes, at the end of the current step, and continues from "
            "there when its turn comes",
        )

    def _spawn_training(self, session: Session, job: Job) -> None:
        proc = start_training(self.settings, job, self.ray)
        # Starting can take a while (a Ray submit, a slow disk): if the lease ran short meanwhile, or another
        # process took the job, this start must not land in the job's row. Its process is stopped at once;
        # the run directory's lock (training/rundir.py) keeps it from writing beside the other one.
        session.refresh(job)
        if not self.lease.held(self.lease.seconds / 3) or (job.status, job.pid, job.ray_job) != (
            "queued",
            None,
            None,
        ):
            log.warning(
                "job %s: started after this tunery serve lost its turn to schedule; stopped again", job.id
            )
            send(proc, signal.SIGKILL)
            proc.runner.wait(timeout=self.settings.stop_grace_seconds)
            proc.log.close()
            return
        self._turns[job.project_id] = time.monotonic()
        self.procs[(job.id, "train")] = proc
        job.attempts += 1
        job.pid = proc.runner.pid
        if self.ray is None:
            self._announce(proc, job, session)
            return
        job.ray_job = proc.runner.ray_job
        add_event(
            session,
            job.id,
            f"Submitted to the Ray cluster as {proc.runner.name}, asking for "
            f"{job_resources(self.settings, job).describe()}; it starts when a node has room",
        )

    def _announce(self, proc: Proc, job: Job | None = None, session: Session | None = None) -> None:
        """The training process runs (a Ray job once the cluster has placed it): the job is `running`."""
        proc.announced = True
        proc.started = time.monotonic()
        if session is None or job is None:
            with self.store.session() as session:
                job = session.get(Job, proc.job_id)
                if job is not None and job.status == "queued":
                    self._announce(proc, job, session)
            return
        job.status = "running"
        job.started_at = job.started_at or now()
        if not proc.resumed:
            add_event(session, job.id, "Fine-tuning job started")
        elif proc.resumed_from is not None:
            add_event(session, job.id, f"Fine-tuning job resumed from step {proc.resumed_from}")
        else:
            add_event(session, job.id, "Fine-tuning job restarted")

    def _read_run(self, proc: Proc) -> None:
        """What the running recipe has written since the last look (outcomes.record_progress)."""
        run_dir = job_dir(self.settings, proc.job_id) / "run"
        assert proc.metrics is not None
        records = proc.metrics.new_records()
        steps = checkpoint_steps(run_dir)
        if not records and not steps:
            return
        with self.store.session() as session:
            job = session.get(Job, proc.job_id)
            if job is not None:
                record_progress(session, job, proc, run_dir, records, steps)

    def _finished_training(self, proc: Proc, code: int) -> None:
        directory = job_dir(self.settings, proc.job_id)
        run_dir = directory / "run"
        with self.store.session() as session:
            job = session.get(Job, proc.job_id)
            if job is None or (job.pid, job.ray_job) not in (
                (proc.runner.pid, proc.runner.ray_job),
                (None, None),
            ):
                return  # the job runs in another process now (another tunery serve took it over)
            job.pid = job.ray_job = None
            if job.status == "cancelled" or proc.stop_reason == "cancel":
                return
            summary = finished_summary(run_dir)
            if summary is not None:
                if code != 0 and proc.stop_reason is None:
                    how = death_cause(code) or f"exited with status {code}"
                    add_event(
                        session,
                        job.id,
                        f"The training process {how} after it had saved the final model and its summary",
                        level="warn",
                    )
                succeed(session, self.settings, job, run_dir, summary)
            elif proc.stop_reason == "pause":
                steps = sorted(checkpoint_steps(run_dir))
                at = f"step {steps[-1]}" if steps else "the start"
                add_event(session, job.id, f"Job paused; it will resume from {at}")
            elif proc.stop_reason == "shutdown":
                pass  # stays `running`: recover() queues it again on the next start
            elif proc.stop_reason == "turn" and job.status == "paused":  # paused meanwhile, elsewhere
                add_event(session, job.id, f"Job paused; it will resume from {resume_point(run_dir)}")
            elif proc.stop_reason == "turn":  # its project's turn comes again after the others' (_take_turns)
                job.status, job.estimated_finish = "queued", None  # first of its project's jobs, as before
                add_event(session, job.id, f"Job queued again; it will continue from {resume_point(run_dir)}")
            else:
                message = tail_error(directory / "train.log", code, proc.log_offset)
                unplaced = proc.runner.unplaced()
                if unplaced is not None:
                    asked = job_resources(self.settings, job).describe()
                    fail(
                        session,
                        self.settings,
                        job,
                        "resources_unavailable",
                        f"No node of the Ray cluster could run the job, which asks for {asked}: {unplaced}",
                    )
                    self.wake()
                    return
                cause = proc.runner.lost() or death_cause(code) or stop_cause(message)
                if cause is not None:
                    retry_or_fail(session, self.settings, job, cause)
                else:
                    fail(session, self.settings, job, "training_failed", f"Fine-tuning failed: {message}")
        self.wake()


def _past(status: str) -> str:
    return {"succeeded": "succeeded", "failed": "failed", "cancelled": "been cancelled"}.get(status, status)
