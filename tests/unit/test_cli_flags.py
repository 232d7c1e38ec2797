"""`tunery train METHOD`'s flags are generated from the method's config (issue 15): every field has one, its
value lands in the config, and every spelling that worked before the flags were generated still works."""

from __future__ import annotations

import argparse
import dataclasses
import subprocess
import sys
import typing
from pathlib import Path
from typing import Any

import pytest

from tunery.cli import build_parser, main
from tunery.commands.train import check_before_loading, config_overrides
from tunery.errors import TuneryError
from tunery.recipes.configs import CONFIGS
from tunery.run.config import build_config, field_help, field_types

REPO = Path(__file__).resolve().parents[2]
FIELDS = [(method, name) for method, config in CONFIGS.items() for name in field_types(config)]


@pytest.fixture(scope="module")
def parser() -> argparse.ArgumentParser:
    return build_parser()


def parse(parser: argparse.ArgumentParser, method: str, *words: str) -> dict[str, Any]:
    """The config overrides `tunery train METHOD WORDS...` gives (before the YAML file and checks)."""
    return config_overrides(parser.parse_args(["train", method, *words]))


def unchecked(method: str, overrides: dict[str, Any]) -> Any:
    """The method's config built from `overrides` as the recipe builds it (YAML-style coercion included),
    without the field checks, which would want a whole valid config around the one value."""
    config = CONFIGS[method]
    return build_config(
        type(f"Unchecked{config.__name__}", (config,), {"__post_init__": lambda self: None}), None, overrides
    )


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def sample(name: str, annotation: Any, default: Any) -> tuple[str, Any]:
    """A value for the field's flag, as typed and as the config holds it, never the default."""
    if typing.get_origin(annotation) is list:
        return "some-" + name, ["some-" + name]
    kinds = set(getattr(annotation, "__args__", (annotation,))) - {type(None)}
    if int in kinds:
        return str(default + 1 if isinstance(default, int) else 3), default + 1 if isinstance(
            default, int
        ) else 3
    if float in kinds:
        return "0.375", 0.375
    assert kinds == {str}, f"{name}: a new kind of field; give it a sample here"
    return "some-" + name, "some-" + name


# --- every field has a flag -----------------------------------------------------------------------------------


@pytest.mark.parametrize(("method", "name"), FIELDS)
def test_every_config_field_has_a_flag_that_sets_it(
    parser: argparse.ArgumentParser, method: str, name: str
) -> None:
    config = CONFIGS[method]
    annotation = field_types(config)[name]
    default = {f.name: f.default for f in dataclasses.fields(config)}[name]
    if annotation is bool:
        for words, value in (([], True), (["false"], False), (["yes"], True), (["0"], False)):
            assert parse(parser, method, flag(name), *words) == {name: value}
        assert parse(parser, method, "--no-" + flag(name)[2:]) == {name: False}
        assert getattr(unchecked(method, {name: not default}), name) is (not default)
        return
    text, value = sample(name, annotation, default)
    assert value != default
    overrides = parse(parser, method, flag(name), text)
    assert overrides == {name: value}
    if isinstance(value, list):  # a list field's flag takes several values
        assert parse(parser, method, flag(name), "a", "b") == {name: ["a", "b"]}
    assert getattr(unchecked(method, overrides), name) == value
    if str in getattr(annotation, "__args__", ()) and default == "auto":
        assert parse(parser, method, flag(name), "auto") == {name: "auto"}


@pytest.mark.parametrize("method", CONFIGS)
def test_a_flags_help_is_its_fields_comment_and_default(parser: argparse.ArgumentParser, method: str) -> None:
    train = parser._subparsers._group_actions[0].choices["train"]  # type: ignore[union-attr]
    command = train._subparsers._group_actions[0].choices[method]
    helps = {a.option_strings[0]: a.help for a in command._actions if a.option_strings}
    config = CONFIGS[method]
    for f in dataclasses.fields(config):
        comment = field_help(config)[f.name]
        assert comment, f"{config.__name__}.{f.name} has no comment: it is the flag's --help"
        assert helps[flag(f.name)].startswith(comment.replace("%", "%%")), f.name
        if f.default not in (None, "", dataclasses.MISSING):
            shown = str(f.default).lower() if isinstance(f.default, bool) else str(f.default)
            assert f"(default {shown}" in helps[flag(f.name)], f.name


def test_yaml_then_flags_then_set(parser: argparse.ArgumentParser, tmp_path: Path) -> None:
    config = tmp_path / "run.yaml"
    config.write_text("data: d.jsonl\nout: runs/x\nseed: 1\nlora_rank: 4\nepochs: 2\nlr: 0.001\n")
    args = parser.parse_args(
        ["train", "sft", "--config", str(config), "--seed", "5", "--lora-rank", "8", "--set", "lora_rank=12"]
    )
    cfg = build_config(CONFIGS["sft"], args.config, config_overrides(args))
    assert (cfg.seed, cfg.lora_rank, cfg.epochs, cfg.lr) == (5, 12, 2, 0.001)
    assert parse(parser, "sft", "--lora-rank", "8", "--full") == {"lora_rank": 0}
    assert parse(parser, "sft", "--full", "--set", "lora_rank=8") == {"lora_rank": 8}
    # a value YAML cannot read (a template) is the string as written, not a traceback
    assert parse(parser, "grpo", "--set", "guide={{item.answer}}") == {"guide": "{{item.answer}}"}


# --- the spellings of before --------------------------------------------------------------------------------

# `tunery train METHOD --help` before its flags were generated (tunery/cli.py at f339a6a)
BEFORE_EVERY_METHOD = (
    "--config --model --data --valid --out --resume --overwrite --epochs --max-steps --batch-size --lr "
    "--lr-multiplier --lora-rank --lora-alpha --lora-dropout --lora-targets --full --max-length "
    "--micro-batch-tokens --seed --precision --save-every --eval-every --set --adapter"
)
BEFORE = {
    "sft": "--safety-evals",
    "dpo": "--safety-evals --loss --beta --label-smoothing --simpo-gamma --sft-weight",
    "kto": "--safety-evals --beta --desirable-weight --undesirable-weight",
    "rm": "--center-coef",
    "grpo": "--safety-evals --grader --group-size --max-new-tokens --max-prompt-length --temperature --beta "
    "--baseline --scale-rewards --loss-aggregation --num-iterations",
    "ppo": "--safety-evals --reward-model --completions-per-prompt --max-new-tokens --max-prompt-length "
    "--temperature --kl-coef --kl-target --ppo-epochs --num-minibatches --vf-coef",
}
CHOICES_BEFORE = {
    "--precision": ("bf16", "fp32", "auto"),
    "--safety-evals": ("none", "quick", "default", "full"),
    "--loss": ("dpo", "ipo", "simpo"),
    "--baseline": ("mean", "rloo"),
    "--scale-rewards": ("group", "batch", "none"),
    "--loss-aggregation": ("token", "sequence", "fixed"),
}
RENAMED = {"--lr-multiplier": "learning_rate_multiplier"}  # kept as an alias of its field's flag
SPELLINGS = [
    (method, old) for method, extra in BEFORE.items() for old in (BEFORE_EVERY_METHOD + " " + extra).split()
]


@pytest.mark.parametrize(("method", "old"), SPELLINGS)
def test_every_flag_of_before_still_sets_the_same_field(
    parser: argparse.ArgumentParser, method: str, old: str
) -> None:
    types = field_types(CONFIGS[method])
    if old in ("--config", "--resume"):
        assert getattr(parser.parse_args(["train", method, old, "x"]), old[2:]) == "x"
    elif old == "--overwrite":
        assert parser.parse_args(["train", method, old]).overwrite is True
    elif old == "--set":
        assert parse(parser, method, "--set", "seed=5", "--set", "lora-rank=4") == {"seed": 5, "lora_rank": 4}
    elif old == "--full":
        assert parse(parser, method, old) == {"lora_rank": 0}
    elif old == "--max-length" and "max_length" not in types:  # grpo, ppo: refused, naming the budgets
        args = parser.parse_args(["train", method, old, "64"])
        with pytest.raises(TuneryError, match="use --max-prompt-length and --max-new-tokens instead"):
            args.func(args)
    else:
        name = RENAMED.get(old, old[2:].replace("-", "_"))
        default = {f.name: f.default for f in dataclasses.fields(CONFIGS[method])}[name]
        for text, value in [(c, c) for c in CHOICES_BEFORE.get(old, ())] or [
            sample(name, types[name], default)
        ]:
            assert parse(parser, method, old, text) == {name: value}
            assert getattr(unchecked(method, {name: value}), name) == value


# --- unknown and abbreviated flags ---------------------------------------------------------------------------


@pytest.mark.parametrize("method", CONFIGS)
def test_misspelt_and_abbreviated_flags_get_the_usage_and_the_flag_meant(
    method: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """`--max_steps` (the YAML key) and `--max-step` (a prefix, which argparse would take) are refused by the
    subcommand, with its usage and the flag meant, for every field's flag."""
    for name in field_types(CONFIGS[method]):
        meant = flag(name)
        for typed in {meant[:-1], "--" + name} - {meant}:
            with pytest.raises(SystemExit) as exc:
                main(["train", method, typed, "1"])
            assert exc.value.code == 2
            err = capsys.readouterr().err
            assert err.startswith(f"usage: tunery train {method} "), err
            last = err.splitlines()[-1]
            assert last.startswith(f"tunery train {method}: error: unknown flag {typed}; did you mean "), err
            assert meant in last.removesuffix("?").split("did you mean ")[1].split(" or "), err


def test_a_bad_value_is_refused_before_torch_loads(tmp_path: Path) -> None:
    """A value the config's checks refuse (no argparse choices any more) stops before the recipe's imports,
    as do `tunery --help` and `tunery train sft --help`."""
    data = tmp_path / "train.jsonl"
    data.write_text(
        '{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}\n'
    )
    script = f"""
import contextlib, io, sys
from tunery.cli import main
for argv in (["--help"], ["train", "sft", "--help"], ["train", "--help"]):
    with contextlib.redirect_stdout(io.StringIO()):
        try:
            main(argv)
        except SystemExit:
            pass
print(sorted(m for m in ("torch", "transformers", "peft") if m in sys.modules))
common = ["--data", {str(data)!r}, "--out", {str(tmp_path / "run")!r}]
codes = [main(["train", "sft", "--precision", "bf17", *common]), main(["train", "dpo", "--loss", "simple", *common])]
print(codes, sorted(m for m in ("torch", "transformers", "peft") if m in sys.modules))
"""
    proc = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == ["[]", "[2, 2] []"], proc.stdout + proc.stderr
    assert "precision must be bf16, fp32 or auto, got 'bf17'" in proc.stderr
    assert "loss must be one of dpo, ipo, simpo, got 'simple'" in proc.stderr
    assert not (tmp_path / "run").exists()


def test_the_early_checks_build_the_config(parser: argparse.ArgumentParser, tmp_path: Path) -> None:
    data = tmp_path / "prompts.jsonl"
    data.write_text('{"messages": [{"role": "user", "content": "2+2?"}]}\n')
    args = parser.parse_args(["train", "grpo", "--data", str(data), "--out", str(tmp_path / "run")])
    with pytest.raises(TuneryError, match="no grader"):
        check_before_loading(args, config_overrides(args))
