"""The first hour on the command line (issue 14): misspelt flags, models and adapter paths are refused at
once, by the command they were given to, with the likely fix; chat's slash commands; the RL summary line."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import chat_lines, write_jsonl
from tunery.cli import main
from tunery.commands.models import chat_loop
from tunery.commands.train import print_summary

REPO = Path(__file__).resolve().parents[2]


def refused(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    """stderr of an argparse refusal (exit status 2)."""
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    return capsys.readouterr().err


# --- unknown flags ---------------------------------------------------------------------------------------


def test_unknown_flag_shows_the_subcommands_usage_and_the_flag_meant(
    capsys: pytest.CaptureFixture[str],
) -> None:
    err = refused(["train", "sft", "--learning-rate", "1e-4", "--data", "x.jsonl"], capsys)
    assert err.startswith("usage: tunery train sft ")  # not `usage: tunery [-h] [-v] ...`
    assert "tunery train sft: error: unknown flag --learning-rate; did you mean --lr?" in err


def test_a_prefix_of_a_flag_is_refused_not_taken(capsys: pytest.CaptureFixture[str]) -> None:
    err = refused(["train", "sft", "--epoch", "1"], capsys)
    assert "unknown flag --epoch; did you mean --epochs?" in err


@pytest.mark.parametrize(
    ("argv", "meant"),
    [
        ("train sft --learning_rate 1e-4", "--lr"),
        ("train dpo --batch_size 4", "--batch-size"),
        ("train kto --num_train_epochs 2", "--epochs"),
        ("train sft --output-dir runs/x", "--out"),
        ("train grpo --temperatur 0.7", "--temperature"),
        ("generate --prompt p.jsonl --out o.jsonl", "--prompts"),  # not "--prompts is required"
        ("data screen f.jsonl --contnet warn", "--content"),
    ],
)
def test_close_flags_are_suggested(argv: str, meant: str, capsys: pytest.CaptureFixture[str]) -> None:
    err = refused(argv.split(), capsys)
    command = argv.split(" -")[0].removesuffix(" f.jsonl")
    assert err.startswith(f"usage: tunery {command} ") and f"did you mean {meant}?" in err


def test_verbose_after_the_command_says_where_it_goes(capsys: pytest.CaptureFixture[str]) -> None:
    err = refused(["train", "sft", "-v"], capsys)
    assert "-v goes before the command: tunery -v train sft" in err


# --- unknown models and adapter paths, before anything loads --------------------------------------------


def test_unknown_model_fails_before_screening_and_names_the_close_one(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = write_jsonl(tmp_path / "train.jsonl", chat_lines(12))
    out = tmp_path / "run"
    assert main(["train", "sft", "--model", "smollm2-135m", "--data", str(data), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "unknown model 'smollm2-135m'; did you mean 'smollm2-135m-instruct'?" in err
    assert "tiny-random" in err  # the list of models
    assert not out.exists()  # screening writes out/screening.json: it never ran


def test_adapter_typo_says_it_does_not_exist_and_lists_the_runs(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    runs = tmp_path / "runs"
    (runs / "mine" / "final").mkdir(parents=True)
    (runs / "mine" / "final" / "adapter_config.json").write_text("{}")
    (runs / "notes").mkdir()  # no adapter: not listed
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "Hi"}])
    typo = str(runs / "mnie")
    commands = [
        ["export", "--model", "tiny-random", "--adapter", typo, "--merge", "--out", str(tmp_path / "m")],
        ["chat", "--model", "tiny-random", "--adapter", typo],
        ["generate", "--model", "tiny-random", "--adapter", typo, "--prompts", str(prompts), "--out", "o"],
        ["compare", "--model", "tiny-random", "--adapter", typo, "--prompts", str(prompts)],
        ["eval", "safety", "--model", "tiny-random", "--adapter", typo],
        ["train", "sft", "--model", "tiny-random", "--data", str(prompts), "--out", "r", "--adapter", typo],
    ]
    for argv in commands:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert f"{typo} does not exist; did you mean {runs / 'mine'}?" in err, argv
        assert "not a LoRA adapter directory" not in err and str(runs / "notes") not in err


def test_reward_model_typo_says_it_does_not_exist(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "Hi"}])
    assert main(["score", "--rm", str(tmp_path / "rm"), "--data", str(data)]) == 2
    assert f"{tmp_path / 'rm'} does not exist" in capsys.readouterr().err


def test_cheap_failures_never_import_torch(tmp_path: Path) -> None:
    """The instant errors stay instant: no torch, transformers or peft (about 4 s of imports) behind them."""
    data = write_jsonl(tmp_path / "train.jsonl", chat_lines(12))
    table = tmp_path / "qa.csv"
    table.write_text("question,answer\nWhere is my order?,On its way.\n")
    script = f"""
import sys
from tunery.cli import main
runs = [
    main(["train", "sft", "--data", "/nonexistent.jsonl", "--out", {str(tmp_path / "a")!r}]),
    main(["train", "dpo", "--model", "smollm2-135m", "--data", {str(data)!r}, "--out", {str(tmp_path / "b")!r}]),
    main(["chat", "--adapter", {str(tmp_path / "nowhere")!r}]),
    main(["train", "sft", "--data", {str(table)!r}, "--out", {str(tmp_path / "c")!r}]),
    main(["train", "sft", "--data", {str(data)!r}, "--out", {str(tmp_path)!r}]),
    main(["models"]),
]
print(runs, sorted(m for m in ("torch", "transformers", "peft") if m in sys.modules))
"""
    proc = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    assert "this looks like a CSV file" in proc.stderr and "is not a Tunery run" in proc.stderr
    assert not (tmp_path / "c").exists()  # refused before screening
    assert proc.stdout.splitlines()[-1] == "[2, 2, 2, 2, 2, 0] []", (
        proc.stdout + proc.stderr
    )  # last: `models` prints


# --- chat ------------------------------------------------------------------------------------------------


def chat(
    lines: list[str | type[BaseException]], answer=lambda messages: "ok"
) -> tuple[int, list[list[dict]]]:
    """Run chat_loop on typed `lines` (an exception class is raised at that prompt): (status, what the
    model was asked each time)."""
    typed, asked = iter(lines), []

    def read(_prompt: str) -> str:
        line = next(typed)
        if isinstance(line, type):
            raise line
        return line

    def reply(messages: list[dict]) -> str:
        asked.append(messages)
        return answer(messages)

    return chat_loop(reply, "tiny-random", system="Be brief.", read=read), asked


def test_chat_slash_commands(capsys: pytest.CaptureFixture[str]) -> None:
    status, asked = chat(["Hello", "/reset", "/rest", "Again", "/exit", "never read"])
    assert status == 0
    assert [[m["content"] for m in messages] for messages in asked] == [
        ["Be brief.", "Hello"],
        ["Be brief.", "Again"],  # /reset kept the system message only; /rest and /exit went nowhere
    ]
    err = capsys.readouterr().err
    assert err.count("/reset clears the conversation") == 2  # the banner, and after the unknown /rest
    assert err.count("Chatting with tiny-random") == 1
    assert "conversation cleared" in err and "unknown command /rest" in err


def test_chat_keeps_history_and_quit_leaves() -> None:
    status, asked = chat(["One", "Two", "/quit", "never read"])
    assert status == 0 and [m["content"] for m in asked[1]] == ["Be brief.", "One", "ok", "Two"]


@pytest.mark.parametrize("key", [EOFError, KeyboardInterrupt])  # Ctrl-D, Ctrl-C at the prompt
def test_chat_ctrl_d_and_ctrl_c_leave_quietly(key: type[BaseException]) -> None:
    assert chat(["Hi", key, "never read"]) == (
        0,
        [[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]],
    )


def test_chat_ctrl_c_during_an_answer_drops_that_turn() -> None:
    def answer(messages: list[dict]) -> str:
        if messages[-1]["content"] == "long":
            raise KeyboardInterrupt
        return "ok"

    status, asked = chat(["long", "short", ""], answer)
    assert status == 0 and [m["content"] for m in asked[-1]] == ["Be brief.", "short"]


# --- the summary line ------------------------------------------------------------------------------------


def summary(**extra) -> dict:
    base = {"steps": 6, "trained_tokens": 2263, "tokens_per_second": 321.3, "train_seconds": 7.04,
            "wall_seconds": 9.2, "run_dir": "runs/x", "final_metrics": {"train_reward_mean": 0.25}}  # fmt: skip
    return base | extra


def test_rl_summary_reports_completions_not_trained_tokens(capsys: pytest.CaptureFixture[str]) -> None:
    print_summary(summary(completions=96, completions_per_second=13.636))
    line = capsys.readouterr().out.splitlines()[0]
    assert line.startswith("done: 6 steps, 96 completions at 13.6/s (7 s training, 9 s in all);"), line
    assert "tok/s" not in line


def test_sft_summary_reports_tokens(capsys: pytest.CaptureFixture[str]) -> None:
    print_summary(summary())
    assert capsys.readouterr().out.startswith(
        "done: 6 steps, 2263 tokens at 321 tok/s (7 s training, 9 s in all)"
    )


def test_flag_words_are_matched_against_the_real_flags() -> None:
    """The suggestions come from the subcommand's own flags: one a subcommand lacks is never suggested."""
    from tunery.cli import _close_flags

    assert _close_flags("--learning-rate", ["--lr", "--lr-multiplier"]) == ["--lr"]
    assert _close_flags("--learning-rate-multiplier", ["--lr", "--lr-multiplier"]) == ["--lr-multiplier"]
    assert _close_flags("--learning-rate", ["--temperature"]) == []
    assert _close_flags("--bs", ["--batch-size", "--beta"]) == ["--batch-size"]


def test_output_piped_into_head_stops_quietly(tmp_path: Path) -> None:
    """`tunery data validate big.jsonl | head` closed the pipe and got a BrokenPipeError traceback."""
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"messages": [{"role": "user", "content": "q"}]}] * 20_000)
    proc = subprocess.Popen(
        # --json: 3.6 MB, far more than a pipe holds, so the writer is still writing when the pipe closes
        [sys.executable, "-m", "tunery", "data", "validate", str(bad), "--model", "none", "--json"],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None and proc.stderr is not None
    assert proc.stdout.readline().startswith("{")
    proc.stdout.close()  # as `head -1` does
    stderr = proc.stderr.read()
    assert proc.wait(timeout=60) == 0
    assert "Traceback" not in stderr and "BrokenPipe" not in stderr, stderr
