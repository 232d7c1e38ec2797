"""The `tunery` command line: one table of commands, each a plain function of its parsed arguments.

The commands live in tunery/commands/ (a module per thing they work on), each beside the function adding
its flags; `tunery train METHOD`'s flags are generated from the method's config. Heavy imports (torch,
transformers) happen inside the commands, so `tunery --help` is instant.
"""

from __future__ import annotations

import argparse
import difflib
import functools
import gc
import itertools
import logging
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

from tunery.errors import TuneryError

# --- the commands -----------------------------------------------------------------------------------------


class Command(NamedTuple):
    words: str  # e.g. "data validate": a group's commands follow its name
    run: Callable[[argparse.Namespace], int]  # the exit status
    help: str
    flags: Callable[[argparse.ArgumentParser], None] | None = None


# the commands that hold others: where their choice goes in the namespace, and their --help line
GROUPS = {
    "data": ("data_command", "check training data"),
    "train": ("method", "train a model"),
    "eval": ("eval_command", "evaluate models"),
    "graders": ("graders_command", "check and run OpenAI-format graders"),
    "keys": ("keys_command", "API keys of the service"),
    "audit": ("audit_command", "the service's audit log: verify, export, head"),
    "federated": ("federated_command", "a federation whose sites are machines of their own (Flower)"),
}


def commands() -> list[Command]:
    """Every command, in `--help` order."""
    from tunery.commands import audit, data, evals, federated, graders, models, service, train, tune
    from tunery.safety.evals import SECTIONS  # no torch: cheap at parse time

    def training(method: str) -> Callable[[argparse.ArgumentParser], None]:
        return functools.partial(train.add_flags, method=method)

    def suite(section: str) -> Command:
        what = "every evaluation" if section == "all" else f"the {section} evaluation"
        text = f"{what}: base vs tuned model (tunery/safety/evals/)"
        return Command(f"eval {section}", evals.cmd_suite, text, evals.suite_flags)

    return [
        Command("models", models.cmd_models, "list the models Tunery can load"),
        Command(
            "data validate",
            data.cmd_validate,
            "validate a chat, preference or thumbs up/down JSONL file line by line",
            data.validate_flags,
        ),
        Command(
            "data screen",
            data.cmd_screen,
            "find offensive content and personal data line by line; block, redact or warn",
            data.screen_flags,
        ),
        Command(
            "data augment",
            data.cmd_augment,
            "add counterfactual copies of training examples (gender-swapped)",
            data.augment_flags,
        ),
        Command(
            "data convert",
            data.cmd_convert,
            "convert CSV, TSV, JSON-array, ShareGPT, Alpaca or prompt/completion data to chat JSONL",
            data.convert_flags,
        ),
        Command(
            "train sft",
            train.cmd_train,
            "supervised fine-tuning on chat data (LoRA or full)",
            training("sft"),
        ),
        Command(
            "train dpo",
            train.cmd_train,
            "direct preference optimisation on comparisons (DPO, IPO, SimPO)",
            training("dpo"),
        ),
        Command(
            "train kto",
            train.cmd_train,
            "Kahneman-Tversky optimisation on unpaired thumbs up/down ratings",
            training("kto"),
        ),
        Command("train rm", train.cmd_train, "reward model from comparisons (Bradley-Terry)", training("rm")),
        Command(
            "train grpo",
            train.cmd_train,
            "reinforcement fine-tuning with graders (GRPO, RLOO)",
            training("grpo"),
        ),
        Command(
            "train ppo",
            train.cmd_train,
            "RLHF with PPO: a reward model's scores, a value head, a KL penalty",
            training("ppo"),
        ),
        Command(
            "train federated",
            train.cmd_train,
            "federated SFT of one LoRA adapter across sites whose data stays with them (Flower)",
            training("federated"),
        ),
        Command(
            "tune",
            tune.cmd_tune,
            "hyperparameter search: optuna trials of one recipe, pruned on their held-out loss",
            tune.tune_flags,
        ),
        Command(
            "federated server",
            federated.cmd_server,
            "the server of a deployed federation: waits for the sites, runs the rounds, writes the run",
            federated.server_flags,
        ),
        Command(
            "federated client",
            federated.cmd_client,
            "a site of a deployed federation: trains on its own data, which stays here",
            federated.client_flags,
        ),
        Command("chat", models.cmd_chat, "talk to a model (streams tokens)", models.chat_flags),
        Command("generate", models.cmd_generate, "complete a JSONL file of prompts", models.generate_flags),
        Command(
            "compare",
            models.cmd_compare,
            "base vs fine-tuned answers side by side, with the run's metrics",
            models.compare_flags,
        ),
        Command("score", models.cmd_score, "score answers with a reward model", models.score_flags),
        Command(
            "eval compare",
            evals.cmd_compare,
            "win rate of one model over another, judged by a reward model",
            evals.compare_flags,
        ),
        *(suite(section) for section in (*SECTIONS, "all")),
        Command(
            "card",
            evals.cmd_card,
            "(re)write a run's final/MODEL_CARD.md from the files in its directory",
            evals.card_flags,
        ),
        Command(
            "graders validate",
            graders.cmd_validate,
            "check a grader JSON file (every field, formula and template)",
            graders.validate_flags,
        ),
        Command(
            "graders run",
            graders.cmd_run,
            "grade samples against dataset rows; per-grader means and errors",
            graders.run_flags,
        ),
        Command(
            "export",
            models.cmd_export,
            "a merged model: one GGUF file for llama.cpp and Ollama, or a Hugging Face directory",
            models.export_flags,
        ),
        Command(
            "serve",
            service.cmd_serve,
            "OpenAI-compatible fine-tuning service (files, jobs, models, chat)",
            service.serve_flags,
        ),
        Command(
            "keys create",
            service.cmd_keys_create,
            "print a new API key for a project",
            service.keys_create_flags,
        ),
        Command(
            "keys list", service.cmd_keys_list, "list keys (ids, projects, prefixes)", service.service_flags
        ),
        Command("keys revoke", service.cmd_keys_revoke, "revoke a key by id", service.keys_revoke_flags),
        Command(
            "audit verify",
            audit.cmd_verify,
            "check the hash chain and head; exit 1 naming the first bad line",
            audit.verify_flags,
        ),
        Command(
            "audit export",
            audit.cmd_export,
            "a copy for auditors (JSONL or CSV) and a manifest",
            audit.export_flags,
        ),
        Command(
            "audit head",
            audit.cmd_head,
            "print the newest record's seq and hash, for an auditor to keep",
            audit.audit_flags,
        ),
    ]


# --- argument parsing ------------------------------------------------------------------------------------

VERBOSE_FLAGS = ("-v", "--verbose")  # tunery's own, before the command


def build_parser() -> argparse.ArgumentParser:
    parser = TuneryParser(prog="tunery", description="Fine-tune and align language models locally.")
    parser.add_argument(*VERBOSE_FLAGS, action="store_true", help="show library warnings and debug logs")
    subcommands = {"": parser.add_subparsers(dest="command", required=True)}
    for command in commands():
        group, _, name = command.words.rpartition(" ")
        if group not in subcommands:  # the group's first command: the group's own parser first
            dest, text = GROUPS[group]
            subcommands[group] = (
                subcommands[""].add_parser(group, help=text).add_subparsers(dest=dest, required=True)
            )
        p = subcommands[group].add_parser(name, help=command.help)
        if command.flags is not None:
            command.flags(p)
        p.set_defaults(func=command.run)
    return parser


class TuneryParser(argparse.ArgumentParser):
    """Every parser and subparser (add_subparsers makes them of this class). No prefix matching: `--epoch`
    must not silently become `--epochs`. An unknown flag is refused by the subcommand it was given to, with
    that subcommand's usage and its closest flags; plain argparse hands a subcommand's leftovers up to the
    top parser, whose message shows `tunery`'s usage. (`exit_on_error=False` does not help in Python 3.11:
    unrecognized and missing required arguments still call error().)"""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def parse_known_args(  # type: ignore[override]
        self, args: Sequence[str] | None = None, namespace: Any = None
    ) -> tuple[Any, list[str]]:
        # before argparse's own checks, so a misspelt flag is named rather than "arguments are required"
        words = list(sys.argv[1:] if args is None else args)
        if self._subparsers is not None:  # the flags before the subcommand are this parser's
            words = list(itertools.takewhile(lambda word: word.startswith("-"), words))
        self._refuse_unknown(
            [flag for flag in _option_like(words) if flag not in self._option_string_actions]
        )
        namespace, extras = super().parse_known_args(args, namespace)
        if extras:
            self._refuse_unknown(list(_option_like(extras)))
            self.error(f"unrecognized arguments: {' '.join(extras)}")
        return namespace, extras

    def _refuse_unknown(self, flags: list[str]) -> None:
        if not flags:
            return
        if flags[0] in VERBOSE_FLAGS:
            command = self.prog.removeprefix("tunery ")
            self.error(f"{flags[0]} goes before the command: tunery {flags[0]} {command} ...")
        known = [s for a in self._actions for s in a.option_strings if s.startswith("--") and s != "--help"]
        hints = {flag: _close_flags(flag, known) for flag in flags}
        if len(flags) == 1 and hints[flags[0]]:
            self.error(f"unknown flag {flags[0]}; did you mean {' or '.join(hints[flags[0]])}?")
        if len(flags) == 1:
            self.error(f"unknown flag {flags[0]}; `{self.prog} --help` describes the flags above")
        self.error(
            "unknown flags "
            + ", ".join(f + (f" (did you mean {' or '.join(hints[f])}?)" if hints[f] else "") for f in flags)
        )


def _option_like(args: Sequence[str]) -> list[str]:
    """The flag names among command-line words, as argparse tells flags from values (`--x=1` names --x;
    negative numbers, `-` and words with spaces are values; nothing after `--` is a flag)."""
    flags = []
    for arg in args:
        if arg == "--":
            break
        if not arg.startswith("-") or arg == "-" or " " in arg or _is_number(arg):
            continue
        flags.append(arg.split("=", 1)[0] if arg.startswith("--") else arg)
    return flags


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


# other tools' names whose words the rules in _close_flags cannot map to Tunery's
_FLAG_SYNONYMS = {"output": "out", "output-dir": "out", "max-seq-length": "max-length"}


def _close_flags(flag: str, known: list[str]) -> list[str]:
    """The known flags an unknown one most likely meant: the same words spelt differently (`--batch_size`,
    `--batchsize`, `--epoch`, `--lr-mult`, `--bs`, `--learning-rate` -> `--lr` by initials), else one with a
    word fewer (`--num-epochs`, `--data-file`), else difflib's closest spellings."""
    name = flag.lstrip("-").lower().replace("_", "-")
    words = name.split("-")
    forms = {name, _FLAG_SYNONYMS.get(name, name)}
    for i in range(len(words)):  # a run of whole words by its initials: learning-rate -> lr
        for j in range(i + 2, len(words) + 1):
            if all(len(w) > 2 for w in words[i:j]):
                forms.add("-".join([*words[:i], "".join(w[0] for w in words[i:j]), *words[j:]]))

    def respelt(parts: list[str]) -> bool:
        squashed = "".join(parts)
        if any(
            squashed in (f.replace("-", ""), f.replace("-", "") + "s") or f == squashed + "s" for f in forms
        ):
            return True
        if len(parts) > 1 and name == "".join(p[0] for p in parts):  # --bs
            return True
        return len(parts) == len(words) and all(p.startswith(w) for p, w in zip(parts, words, strict=True))

    def shortened(parts: list[str]) -> bool:
        return len(parts) < len(words) and parts in (words[: len(parts)], words[-len(parts) :])

    split = {option: option.lstrip("-").split("-") for option in known}
    for rule in (respelt, shortened):
        found = [option for option, parts in split.items() if rule(parts)]
        if found:
            return found[:3]
    close = difflib.get_close_matches(name, [option.lstrip("-") for option in known], n=3, cutoff=0.6)
    return [f"--{option}" for option in close]


def _quiet_libraries(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO, format="%(message)s", stream=sys.stderr
    )
    if not verbose:
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        import warnings

        warnings.filterwarnings("ignore")
        for name in ("transformers", "peft", "torch", "httpx", "huggingface_hub", "alembic", "flwr", "ray"):
            logging.getLogger(name).setLevel(logging.ERROR)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _quiet_libraries(args.verbose)
    from tunery.training.memory import keep_freed_memory

    keep_freed_memory()
    try:
        return int(args.func(args))
    except TuneryError as exc:
        print(f"tunery: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ntunery: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `tunery ... | head` closed the pipe: stop quietly, as other tools do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit
        return 0


def entry() -> None:
    """The `tunery` command (and `python -m tunery`): `main`, then an exit that does not walk the objects
    a run leaves behind. The interpreter's shutdown collections took ~0.8 s after a training run; frozen
    objects are skipped by them (atexit handlers still run). `main` itself stays freeze-free for callers
    that go on, such as the tests. bitsandbytes waits until a run quantizes (`_imports.defer_bitsandbytes`),
    and transformers' hub kernels stay out (`_imports.hide_hub_kernels`)."""
    from tunery._imports import defer_bitsandbytes, hide_hub_kernels

    defer_bitsandbytes()
    hide_hub_kernels()
    code = main()
    gc.freeze()
    raise SystemExit(code)


if __name__ == "__main__":
    entry()
