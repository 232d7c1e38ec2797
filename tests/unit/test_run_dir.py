"""Where a run may start: a failed run's retry is never blocked, a finished run is never silently redone,
and a directory that is not a run is never deleted."""

from __future__ import annotations

from pathlib import Path

import pytest

from tunery.errors import TuneryError
from tunery.training.rundir import prepare_run_dir, resumed_config


def test_a_run_that_stopped_before_training_is_taken_over(tmp_path: Path) -> None:
    run = tmp_path / "run"
    (run / "screened").mkdir(parents=True)
    (run / "screening.json").write_text("{}")
    prepare_run_dir(run, resume=False, overwrite=False)
    assert run.is_dir() and [p.name for p in run.iterdir()] == [".lock"]  # this process's, while it trains


def test_resume_of_a_run_that_never_started_says_to_start_it(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    (run / "screening.json").write_text("{}")
    with pytest.raises(TuneryError, match="never started training.*without --resume"):
        prepare_run_dir(run, resume=True, overwrite=False)
    with pytest.raises(TuneryError, match="does not exist"):
        prepare_run_dir(tmp_path / "nothing", resume=True, overwrite=False)


def test_an_unfinished_run_suggests_resume_and_a_finished_one_does_not(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("model: tiny-random\n")
    with pytest.raises(TuneryError, match=f"--resume {run}"):
        prepare_run_dir(run, resume=False, overwrite=False)
    (run / "final").mkdir()
    (run / "summary.json").write_text("{}")
    with pytest.raises(TuneryError, match="finished run") as refused:
        prepare_run_dir(run, resume=False, overwrite=False)
    assert "--resume" not in str(refused.value)
    prepare_run_dir(run, resume=False, overwrite=True)
    assert [p.name for p in run.iterdir()] == [".lock"]


def test_a_directory_that_is_not_a_run_is_never_deleted(tmp_path: Path) -> None:
    mine = tmp_path / "documents"
    mine.mkdir()
    (mine / "thesis.tex").write_text("precious")
    for overwrite in (False, True):
        with pytest.raises(TuneryError, match="not a Tunery run.*thesis.tex"):
            prepare_run_dir(mine, resume=False, overwrite=overwrite)
    assert (mine / "thesis.tex").read_text() == "precious"
    a_file = tmp_path / "out.txt"
    a_file.write_text("x")
    with pytest.raises(TuneryError, match="is a file"):
        prepare_run_dir(a_file, resume=False, overwrite=True)


def test_resuming_a_finished_run_is_refused_rather_than_redone(tmp_path: Path) -> None:
    from tunery.recipes.configs import SFTConfig

    run = tmp_path / "run"
    (run / "final").mkdir(parents=True)
    (run / "config.yaml").write_text("model: tiny-random\ndata: train.jsonl\n")
    (run / "summary.json").write_text("{}")
    with pytest.raises(TuneryError, match="has finished.*tunery eval all --adapter"):
        resumed_config(SFTConfig, str(run))


def test_the_progress_line_leaves_out_a_validation_part_only_when_there_was_no_evaluation() -> None:
    from tunery.run.lifecycle import shown_line

    parts = ("loss {train_loss:.3f} acc {rewards/accuracies:.2f}", "valid {valid_loss:.3f}", "{rate:.1f}/s")
    record = {"train_loss": 0.69312, "rewards/accuracies": 0.5, "rate": 2.04}
    assert shown_line(record, parts) == "loss 0.693 acc 0.50 2.0/s"
    assert shown_line({**record, "valid_loss": 0.7}, parts) == "loss 0.693 acc 0.50 valid 0.700 2.0/s"
    with pytest.raises(KeyError):  # a misspelt training metric is a bug, not a silently shorter line
        shown_line(record, ("loss {train_los:.3f}",))


def test_a_run_directory_is_trained_into_by_one_process_at_a_time(tmp_path: Path) -> None:
    """Two processes training into one directory at once (a second `tunery train --out` of it, or a service
    replica's late start while another resumes the job) would write each other's checkpoints: the second
    waits for the first to end, then says who holds it."""
    import subprocess
    import sys

    from tunery.training import rundir

    run_dir = tmp_path / "run"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from pathlib import Path; from tunery.training.rundir import "
         "lock_run_dir; lock_run_dir(Path(sys.argv[1])); print('held', flush=True); time.sleep(60)",
         str(run_dir)],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        with pytest.raises(TuneryError, match=rf"is in use by another training process \(pid {holder.pid}\)"):
            rundir.lock_run_dir(run_dir, wait=0.5)
    finally:
        holder.kill()
        holder.wait()
    rundir.lock_run_dir(run_dir, wait=5)  # the kernel released it with the process
    rundir.lock_run_dir(run_dir, wait=0)  # held once per process: taken again at once
    (run_dir / "config.yaml").write_text("method: sft\n")
    (run_dir / "checkpoint-1").mkdir()
    rundir.prepare_run_dir(run_dir, resume=False, overwrite=True)  # clears all but the lock it holds
    assert [p.name for p in run_dir.iterdir()] == [rundir.LOCK]
    rundir.unlock_run_dir(run_dir)
    assert run_dir.resolve() not in rundir._held


def test_a_lock_file_that_is_a_symlink_is_refused_not_followed(tmp_path: Path) -> None:
    """The pid written into the lock would have truncated whatever a planted `.lock` symlink points to."""
    from tunery.training import rundir

    victim = tmp_path / "victim.txt"
    victim.write_text("precious data")
    run = tmp_path / "run"
    run.mkdir()
    (run / ".lock").symlink_to(victim)
    with pytest.raises(TuneryError, match=r"\.lock cannot be opened as the run's lock file"):
        rundir.prepare_run_dir(run, resume=False, overwrite=False)
    assert victim.read_text() == "precious data"
