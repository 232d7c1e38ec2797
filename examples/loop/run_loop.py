"""The continuous-improvement loop, end to end, through `tunery serve`'s HTTP API only: the current model
answers support questions, simulated labellers compare its answers in the feedback studio, a DPO job
trains on their verdicts, a blind comparison judged by the same labellers decides whether the new model
replaces the current one, and the next round starts from whichever model won.

    python examples/loop/run_loop.py                              # make demo's runs/support, 2 rounds
    python examples/loop/run_loop.py --model tiny-random --prompts 16 --eval-prompts 8 --max-tokens 16 \\
        --epochs 1 --batch-size 4 --train-set max_steps=2 --train-set safety_evals=none   # a fast smoke run
    python examples/loop/run_loop.py --base-url http://127.0.0.1:8000/v1 --api-key "$KEY"   # a running server

Without --base-url the script starts `tunery serve` on a free port with a data directory of its own
(WORK_DIR/service), creates the project's key with `tunery keys create`, and stops the server at the end.
A LoRA run directory (`make demo` writes runs/support) is merged first (`tunery export --merge`) and
offered as a base model (`tunery serve --base-model NAME=DIR`): the service has no way to serve a local
adapter as it is.

Each round, from the current model M:

1. prompts    `--prompts` support questions (examples/support/valid.jsonl and questions.jsonl, and
              examples/loop/questions.jsonl; none trained on by `make demo`) go to the service as an
              application sends them: chat completions of the model `current` (the project's current
              model, M), `n: 2`, `store: true`.
2. labels     the pairs become items of a feedback queue (POST /tunery/v1/feedback/queues, .../items);
              each of `--labellers` simulated labellers, with a labeller key of their own, fetches items
              (GET .../next) and labels them (POST /tunery/v1/feedback/items/{id}/labels). The studio's
              quality report gives their agreement (Fleiss' kappa).
3. DPO        POST .../train {method: dpo, model: M} exports the verdicts and starts the job; the script
              waits for it and reads its summary. With `--accumulate` the job trains on the verdicts of
              every round so far: each round's queue exported, joined, uploaded, and a DPO job created
              on the file (POST /v1/fine_tuning/jobs). With `--mix-in FILE` the file also holds FILE's
              written pairs (`--mix-in-lines N`: a seeded N of them a round), e.g. the refusal pairs of
              examples/support-safety/preferences.jsonl, so the verdicts do not move what they hold.
4. compare    POST /tunery/v1/comparisons {job, baseline: M, prompts_file}: a blind queue of the new model
              against M on `--eval-prompts` held-out prompts, labelled by the same labellers; its result
              is the win rate over decisive items with a 95% Wilson interval.
5. promote    POST /tunery/v1/projects/current_model when the new model wins: by default when the whole
              interval lies above 0.5 (the studio's own `promote` recommendation), with `--promote-when
              point` when the win rate alone is above 0.5; not when the DPO run raised safety flags (the
              studio's `review_safety`). The next round starts from the current model.

A simulated labeller is a rule-based judge (`prefer`) plus noise: it prefers the answer that states the
numbers of the FACTS.md facts relevant to the question and no made-up ones, is not a refusal, not cut
off, not repetitive and not long-winded; each labeller then gives the other answer with probability
`--noise`, from a random generator seeded by `--seed`. The pairs, the DPO jobs and the comparisons' answers
are seeded from `--seed` too: on the same machine a re-run repeats its rounds (measured: README).

Per round the script prints the comparisons collected, the labellers' agreement, the DPO job and its final
metrics, the win rate with its interval and whether the model was promoted, and writes the same to `--out`
(JSON, replaced atomically after every round).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import random
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import openai

from tunery.safety.evals.safety import declines
from tunery.training.progress import StepProgress

HERE = Path(__file__).resolve().parent
SUPPORT = HERE.parent / "support"
# examples/loop/questions.jsonl: 54 more support questions, written for the loop, none trained on
# examples/support-safety/train.jsonl: edgy-sounding harmless requests (lines 1-30), harmful ones (31-60)
SAFETY_PROMPTS = HERE.parent / "support-safety" / "train.jsonl"
FIRST_HARMFUL_LINE = 31
DEFAULT_PROMPTS = [
    SUPPORT / "valid.jsonl",
    SUPPORT / "questions.jsonl",
    HERE / "questions.jsonl",
]
DEFAULT_MODEL = "runs/support"  # what `make demo` trains
PROJECT = "loop"
TERMINAL = ("succeeded", "failed", "cancelled")
MIN_PAIRS = 10  # the service's minimum of training examples for a job

log = logging.getLogger("tunery")


class LoopError(Exception):
    """What stops the loop, worded for the person running it."""


# --- settings -----------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--model",
        help=f"the starting SFT model: a LoRA run directory (default {DEFAULT_MODEL}, from `make demo`), a "
        "Hugging Face model directory or a base model name (tiny-random); with --base-url a model name the "
        "service knows (default: the project's current model)",
    )
    p.add_argument("--model-name", help="the API name of a --model directory (default: the directory's name)")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--prompts", type=int, default=48, help="questions answered and labelled per round")
    p.add_argument("--eval-prompts", type=int, default=48, help="held-out questions of each blind comparison")
    p.add_argument("--labellers", type=int, default=3, help="simulated labellers; each labels every item")
    p.add_argument("--noise", type=float, default=0.15, help="chance that a labeller gives the other answer")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--promote-when",
        choices=("interval", "point"),
        default="interval",
        help="promote when the win rate's 95%% interval lies above 0.5 (interval), or the rate does (point)",
    )
    p.add_argument(
        "--safety-prompts",
        type=int,
        default=0,
        help="also send this many requests of examples/support-safety/train.jsonl a round (edgy and harmful: "
        "the labellers prefer declining the harmful ones), as an application's traffic holds some",
    )
    p.add_argument(
        "--safety-answers",
        type=int,
        default=2,
        metavar="K",
        help="answers sampled for each of those requests; the pair labelled is one that declines and one that "
        "does not where the K hold both (the safety evaluation's refusal check), else the first two",
    )
    p.add_argument(
        "--promote-despite-safety-flags",
        action="store_true",
        help="promote a winner whose DPO run got worse than its start on a safety evaluation (default: hold it)",
    )
    p.add_argument("--max-tokens", type=int, default=160, help="longest answer, in tokens")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature of the answers")
    p.add_argument("--epochs", default="auto", help="the DPO jobs' n_epochs")
    p.add_argument("--batch-size", default="auto", help="the DPO jobs' batch_size")
    p.add_argument("--beta", default="auto", help="the DPO jobs' beta")
    p.add_argument(
        "--lr-multiplier",
        default="auto",
        help="the DPO jobs' learning_rate_multiplier (of Tunery's DPO rate)",
    )
    p.add_argument(
        "--prompts-file",
        action="append",
        type=Path,
        help="JSONL of chats or prompts, repeatable (default: examples/support/valid.jsonl, questions.jsonl)",
    )
    p.add_argument("--facts", type=Path, default=SUPPORT / "FACTS.md", help="the judge's numbered fact sheet")
    p.add_argument(
        "--work-dir", type=Path, default=Path("runs/loop"), help="the started server's data and log"
    )
    p.add_argument("--overwrite", action="store_true", help="replace an earlier run's WORK_DIR/service")
    p.add_argument("--out", type=Path, help="the results as JSON (default WORK_DIR/results.json)")
    p.add_argument(
        "--train-set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="`tunery serve --train-set`: a config field for every job of the started server",
    )
    p.add_argument(
        "--accumulate",
        action="store_true",
        help="each round's DPO job trains on the verdicts of every round so far, not its own only",
    )
    p.add_argument(
        "--mix-in",
        type=Path,
        metavar="FILE",
        help="DPO pairs (OpenAI preference JSONL) added to every round's job, e.g. "
        "examples/support-safety/preferences.jsonl, so the verdicts do not move what the pairs hold",
    )
    p.add_argument(
        "--mix-in-lines",
        type=int,
        default=0,
        metavar="N",
        help="a seeded sample of N lines of --mix-in per round, a new one each round (default: every line)",
    )
    p.add_argument("--job-timeout", type=float, default=4 * 3600, help="seconds to wait for a DPO job")
    p.add_argument("--base-url", help="a running server's /v1 URL, instead of starting one")
    p.add_argument(
        "--api-key", default=os.environ.get("TUNERY_API_KEY"), help="its admin key (TUNERY_API_KEY)"
    )
    args = p.parse_args(argv)
    if args.rounds < 1 or args.prompts < 1 or args.eval_prompts < 1:
        p.error("--rounds, --prompts and --eval-prompts must be at least 1")
    if not 1 <= args.labellers <= 10:
        p.error("--labellers must be between 1 and 10 (the studio's labels_per_item)")
    if not 0 <= args.noise <= 1:
        p.error("--noise is a probability: between 0 and 1")
    if args.base_url and not args.api_key:
        p.error("--base-url needs --api-key (or TUNERY_API_KEY): an admin key of the project")
    if args.safety_answers < 2:
        p.error("--safety-answers must be at least 2: a pair is labelled")
    if args.mix_in_lines < 0 or (args.mix_in_lines and not args.mix_in):
        p.error("--mix-in-lines is a number of lines (at least 0) of a --mix-in file")
    args.out = args.out or args.work_dir / "results.json"
    args.prompts_file = args.prompts_file or DEFAULT_PROMPTS
    return args


def hyperparameters(args: argparse.Namespace) -> dict[str, Any]:
    """The DPO jobs' hyperparameters as the API takes them: "auto", or a number."""
    given: dict[str, str] = {
        "n_epochs": args.epochs,
        "batch_size": args.batch_size,
        "beta": args.beta,
        "learning_rate_multiplier": args.lr_multiplier,
    }
    floats = ("beta", "learning_rate_multiplier")
    return {k: v if v == "auto" else (float(v) if k in floats else int(v)) for k, v in given.items()}


# --- the service --------------------------------------------------------------------------------------------


@dataclass
class Service:
    base_url: str  # .../v1, what the openai client takes
    key: str
    model: str | None  # the starting model's API name (None: the project's current model)

    @property
    def studio_url(self) -> str:
        return self.base_url.removesuffix("/v1") + "/tunery/v1"


def tunery(*args: str) -> str:
    """Run a `tunery` command of this environment; its stdout, or a LoopError with its output."""
    done = subprocess.run([sys.executable, "-m", "tunery", *args], capture_output=True, text=True)
    if done.returncode != 0:
        raise LoopError(f"`tunery {' '.join(args)}` failed:\n{(done.stderr or done.stdout).strip()[-2000:]}")
    return done.stdout


def served_model(model: str, name: str | None, work_dir: Path) -> tuple[str, list[str]]:
    """The API name of the starting model and the `tunery serve` flags that offer it."""
    path = Path(model)
    if not path.exists():
        if "/" in model or model.startswith("."):
            hint = " Run `make demo` first (it trains runs/support)," if model == DEFAULT_MODEL else ""
            raise LoopError(f"--model {model}: no such directory.{hint} or pass --model tiny-random.")
        return model, []  # a base model name: the service offers the bundled one and tiny-random
    name = name or path.resolve().name
    final = path / "final" if (path / "final").is_dir() else path
    if (final / "adapter_config.json").is_file():  # a LoRA run: merged once into a model directory
        merged = work_dir / "model"
        shutil.rmtree(merged, ignore_errors=True)
        log.info("merging the adapter of %s into %s", path, merged)
        tunery("export", "--adapter", str(path), "--merge", "--out", str(merged))
        final = merged
    elif not (final / "config.json").is_file():
        raise LoopError(
            f"--model {model}: neither a LoRA run (final/adapter_config.json) nor a model directory"
        )
    return name, ["--base-model", f"{name}={final.resolve()}"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_until_up(proc: subprocess.Popen[bytes], url: str, key: str, log_path: Path) -> None:
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise LoopError(
                f"tunery serve exited with {proc.returncode}; see {log_path}:\n{log_path.read_text()[-2000:]}"
            )
        with contextlib.suppress(httpx.HTTPError):
            response = httpx.get(f"{url}/models", headers={"Authorization": f"Bearer {key}"}, timeout=2)
            if response.status_code == 200:
                return
        time.sleep(0.3)
    raise LoopError(f"tunery serve did not answer within 180 s; see {log_path}")


@contextlib.contextmanager
def service(args: argparse.Namespace) -> Iterator[Service]:
    """The service the loop talks to: the one at --base-url, or `tunery serve` started here and stopped
    at the end (a fresh data directory, a new project key)."""
    if args.base_url:
        yield Service(args.base_url.rstrip("/"), args.api_key, args.model)
        return
    work_dir, data_dir = args.work_dir, args.work_dir / "service"
    if data_dir.exists():
        if not args.overwrite:
            raise LoopError(f"{data_dir} holds an earlier run's service: pass --overwrite to replace it")
        shutil.rmtree(data_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    name, flags = served_model(args.model or DEFAULT_MODEL, args.model_name, work_dir)
    # The model's answers can hold personal data it made up (a phone number): the jobs mask it rather than
    # refuse the round's whole file.
    flags += ["--screen-pii", "redact"]
    for pair in args.train_set:
        flags += ["--train-set", pair]
    key = tunery("keys", "create", "--project", PROJECT, "--data-dir", str(data_dir)).strip()
    port, log_path = free_port(), work_dir / "serve.log"
    serve = ["serve", "--port", str(port), "--data-dir", str(data_dir), *flags]
    with log_path.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "tunery", *serve], stdout=out, stderr=subprocess.STDOUT
        )
    url = f"http://127.0.0.1:{port}/v1"
    try:
        wait_until_up(proc, url, key, log_path)
        log.info("tunery serve is up at %s (log: %s)", url, log_path)
        yield Service(url, key, name)
    finally:
        proc.terminate()  # running jobs get SIGTERM and checkpoint
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def call(http: httpx.Client, method: str, path: str, **kwargs: Any) -> Any:
    """One studio request; an error status becomes a LoopError carrying the service's own message."""
    response = http.request(method, path, **kwargs)
    if response.status_code >= 400:
        try:
            message = response.json()["error"]["message"]
        except (ValueError, KeyError, TypeError):
            message = response.text[:500]
        raise LoopError(f"{method} {path}: {response.status_code} {message}")
    return response.json()


def studio_client(svc: Service, key: str) -> httpx.Client:
    return httpx.Client(base_url=svc.studio_url, headers={"Authorization": f"Bearer {key}"}, timeout=120)


# --- prompts ------------------------------------------------------------------------------------------------


def load_prompts(paths: list[Path]) -> list[list[dict[str, str]]]:
    """Each line's conversation up to its last user turn (a chat's answer is dropped), as plain
    {role, content} messages."""
    prompts = []
    for path in paths:
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except OSError as exc:
            raise LoopError(f"--prompts-file {path}: {exc.strerror}") from None
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                messages = [
                    {"role": m["role"], "content": m["content"]} for m in json.loads(line)["messages"]
                ]
            except (ValueError, KeyError, TypeError):
                raise LoopError(
                    f'{path}, line {number}: expected {{"messages": [{{role, content}}, ...]}}'
                ) from None
            while messages and messages[-1]["role"] != "user":
                messages.pop()
            if not messages:
                raise LoopError(f"{path}, line {number}: the conversation has no user turn to answer")
            prompts.append(messages)
    return prompts


def split_prompts(
    prompts: list[list[dict[str, str]]], eval_count: int, seed: int
) -> tuple[list[list[dict[str, str]]], list[list[dict[str, str]]]]:
    """(held-out prompts of the blind comparisons, prompts whose answers are labelled for training): one
    shuffle, so the comparisons never judge a question the model was trained on."""
    shuffled = prompts[:]
    random.Random(seed).shuffle(shuffled)
    if len(shuffled) < eval_count + 1:
        raise LoopError(
            f"{len(prompts)} prompts leave none to label after {eval_count} held out: lower --eval-prompts"
        )
    return shuffled[:eval_count], shuffled[eval_count:]


def jsonl_bytes(lines: list[dict[str, Any]]) -> bytes:
    return "".join(json.dumps(line) + "\n" for line in lines).encode()


def user_text(messages: list[dict[str, Any]]) -> str:
    return "\n".join(str(m["content"]) for m in messages if m["role"] == "user")


# --- the simulated labellers --------------------------------------------------------------------------------

WORD = re.compile(r"[a-z][a-z'-]+")
NUMBER = re.compile(r"\d+(?:[.,]\d+)*")
_STOPWORDS = (
    "about after also been before being both cannot could does from have here into just like more most must "
    "only other over same some such than that their them then there these they this those through under very "
    "want were what when where which while will with within would your yours bike bikes northwind"
)
STOPWORDS = frozenset(_STOPWORDS.split())  # and "bike": every question is about one
REFUSAL = re.compile(
    r"\b(i can(?:no|')t (?:help|assist|answer)|as an ai"
    r"|i(?:'m| am) (?:not able|unable) to (?:help|assist|answer))\b",
    re.IGNORECASE,
)
LONG_WORDS = 90  # support answers this long have stopped being brief


@dataclass(frozen=True)
class Fact:
    number: int
    words: frozenset[str]
    numbers: frozenset[str]


def content_words(text: str) -> set[str]:
    """Lowercased words of four letters or more, stopwords out, a plural's final s dropped."""
    words = (w.strip("'-") for w in WORD.findall(text.lower()))
    return {
        w[:-1] if len(w) > 4 and w.endswith("s") else w for w in words if len(w) > 3 and w not in STOPWORDS
    }


def numbers_in(text: str) -> set[str]:
    return {n.replace(",", "").rstrip(".") for n in NUMBER.findall(text)}


def parse_facts(text: str) -> list[Fact]:
    """The numbered lines of a fact sheet ("16. Return window: 30 days ...")."""
    facts = []
    for line in text.splitlines():
        found = re.match(r"^(\d+)\.\s+(.+)$", line.strip())
        if found:
            body = found.group(2)
            facts.append(
                Fact(int(found.group(1)), frozenset(content_words(body)), frozenset(numbers_in(body)))
            )
    return facts


def load_facts(path: Path) -> list[Fact]:
    try:
        facts = parse_facts(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise LoopError(f"--facts {path}: {exc.strerror}") from None
    if not facts:
        raise LoopError(f"--facts {path}: no numbered facts ('1. ...' lines) to judge answers by")
    return facts


def relevant_facts(prompt: str, facts: list[Fact], top: int = 3) -> list[Fact]:
    """The facts sharing the most telling words with the question: words weighted by how few facts use
    them (idf), so "warranty" counts for more than "order"."""
    asked = content_words(prompt)
    weight = {
        w: math.log(len(facts) / sum(w in f.words for f in facts))
        for w in asked
        if any(w in f.words for f in facts)
    }
    scored = sorted(
        ((sum(weight.get(w, 0.0) for w in f.words), f.number, f) for f in facts), key=lambda t: (-t[0], t[1])
    )
    return [f for score, _, f in scored[:top] if score > 0]


def score_answer(prompt: str, answer: str, facts: list[Fact]) -> float:
    """How much the judge likes one answer: the relevant facts' numbers stated, minus made-up numbers,
    refusals, an answer cut off mid-sentence, repetition and length. Only differences between two answers
    to the same question mean anything."""
    text = answer.strip()
    if not text:
        return -10.0
    words = text.split()
    relevant = relevant_facts(prompt, facts)
    said = numbers_in(text) - numbers_in(prompt)  # repeating the customer's own numbers states nothing
    score = 2.0 * len(said & set().union(*(f.numbers for f in relevant)))
    score -= 1.0 * len(said - set().union(*(f.numbers for f in facts)))
    score += 0.5 * min(6, len(content_words(text) & set().union(*(f.words for f in relevant))))
    if REFUSAL.search(text):
        score -= 4.0
    if text[-1] not in ".!?)\"'":
        score -= 2.0
    trigrams = list(zip(words, words[1:], words[2:], strict=False))
    if len(trigrams) >= 10 and len(set(trigrams)) < 0.6 * len(trigrams):
        score -= 3.0
    if len(words) > LONG_WORDS:
        score -= (len(words) - LONG_WORDS) / 20
    return score - 0.002 * len(text)  # of two otherwise equal answers, the shorter


def prefer(prompt: str, left: str, right: str, facts: list[Fact], harmful: bool = False) -> str:
    """The judge's choice between two answers: "left", "right", "tie" or "both_bad".

    >>> facts = parse_facts("16. Return window: 30 days from the delivery date.")
    >>> prefer("How long is the return window?", "You have 30 days from delivery.", "I can't help.", facts)
    'left'
    """
    if harmful:  # a harmful request: the answer that declines it (or points to help), then the shorter
        left_declines, right_declines = declines(left, False), declines(right, False)
        if not left_declines and not right_declines:
            # both play along: a person marks both bad rather than pick one to train towards (picking the
            # shorter made 32 of 39 harmful pairs of a 3-round run "this compliance over that one")
            return "both_bad"
        diff = float(left_declines) - float(right_declines)
        diff = diff or 0.002 * (len(right.strip()) - len(left.strip()))
    else:
        diff = score_answer(prompt, left, facts) - score_answer(prompt, right, facts)
    return "tie" if abs(diff) < 1e-9 else "left" if diff > 0 else "right"


def noisy(verdict: str, rng: random.Random, noise: float) -> str:
    """A labeller's label: the judge's verdict, or with probability `noise` the other answer."""
    if rng.random() >= noise:
        return verdict
    if verdict in ("tie", "both_bad"):
        return rng.choice(("left", "right"))
    return "right" if verdict == "left" else "left"


@dataclass
class Labeller:
    name: str
    key_id: str
    http: httpx.Client
    rng: random.Random
    labels: int = 0
    as_judged: int = 0  # labels equal to the noise-free judge's verdict


def create_labellers(studio: httpx.Client, svc: Service, args: argparse.Namespace) -> list[Labeller]:
    """A labeller key each (POST /labellers); names carry the run's time, since a project's labellers need
    names of their own and a running server may have met this script before."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    labellers = []
    for i in range(args.labellers):
        made = call(studio, "POST", "/labellers", json={"name": f"simulated-{i + 1}-{stamp}"})
        labellers.append(
            Labeller(
                made["name"], made["id"], studio_client(svc, made["key"]), random.Random(args.seed * 1000 + i)
            )
        )
    return labellers


def label_queue(
    queue_id: str,
    labellers: list[Labeller],
    facts: list[Fact],
    noise: float,
    harmful: frozenset[str] = frozenset(),
) -> None:
    """Each labeller works through the queue as a person would: the next item, a label, until none is left.
    The seconds sent are a simulated reading time, so the studio's too-fast check sees people's pace."""
    for person in labellers:
        seen: set[str] = set()
        while (item := call(person.http, "GET", f"/feedback/queues/{queue_id}/next")["item"]) is not None:
            if item["id"] in seen:
                raise LoopError(
                    f"queue {queue_id}: item {item['id']} came back to {person.name} after its label"
                )
            seen.add(item["id"])
            prompt = user_text(item["messages"])
            verdict = prefer(prompt, item["left"], item["right"], facts, prompt in harmful)
            choice = noisy(verdict, person.rng, noise)
            seconds = round(4 + (len(item["left"]) + len(item["right"])) / 40 + person.rng.uniform(0, 6), 1)
            call(
                person.http,
                "POST",
                f"/feedback/items/{item['id']}/labels",
                json={"choice": choice, "seconds": seconds},
            )
            person.labels += 1
            person.as_judged += choice == verdict


# --- one round: answers, labels, DPO, blind comparison, promotion -------------------------------------------


@dataclass
class Loop:
    args: argparse.Namespace
    client: openai.OpenAI
    studio: httpx.Client
    labellers: list[Labeller]
    facts: list[Fact]
    pool: list[list[dict[str, str]]]  # prompts whose answers are labelled for training
    eval_file: str  # the held-out prompts, uploaded
    eval_count: int
    safety_pool: list[list[dict[str, str]]]  # edgy and harmful requests mixed into each round's traffic
    harmful: frozenset[str]  # the user texts of the harmful ones: the labellers prefer their declines
    queues: list[str] = field(default_factory=list)  # the labelled queues of the rounds so far
    mix_in: list[str] = field(default_factory=list)  # --mix-in's lines, added to every round's DPO job


def read_mix_in(path: Path) -> list[str]:
    """--mix-in's non-empty lines, each a preference pair as Tunery's data checks read one
    (`check_feedback_example`), so a bad line is named before any round runs."""
    from tunery.data.feedback import check_feedback_example

    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise LoopError(f"--mix-in {path}: cannot read it ({exc})") from exc
    lines = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise LoopError(f"--mix-in {path}, line {number}: not JSON ({exc.msg})") from exc
        example, problems = check_feedback_example(obj, number)
        errors = [p for p in problems if p.severity == "error"]
        if errors:
            raise LoopError(f"--mix-in {path}, {errors[0]}")
        if example is None or example.rejected is None:
            raise LoopError(
                f"--mix-in {path}, line {number}: a rating, not a pair; a DPO job trains on pairs"
            )
        lines.append(line)
    if not lines:
        raise LoopError(f"--mix-in {path}: no pairs in it")
    return lines


def sample_pairs(loop: Loop, model: str, round_no: int) -> tuple[list[dict[str, Any]], int]:
    """Two answers to each of this round's prompts from the project's current model, asked for as an
    application does (`model: "current"`, `store: true`); `model` is the one the loop promoted last, and each
    answer must say it wrote it. A safety request gets `--safety-answers` answers, of which the pair to label
    is `contrasting_pair`'s. (queue items, prompts skipped: the same answer twice, or an empty one)."""
    args = loop.args
    prompts = random.Random(args.seed * 100 + round_no).sample(loop.pool, min(args.prompts, len(loop.pool)))
    safety = min(args.safety_prompts, len(loop.safety_pool))
    n_support = len(prompts)
    prompts += random.Random(args.seed * 100 + round_no + 50).sample(loop.safety_pool, safety)
    items, skipped = [], 0
    with StepProgress(len(prompts), description=f"round {round_no}: answers from {model}") as bar:
        for i, messages in enumerate(prompts):
            completion = loop.client.chat.completions.create(
                model="current",
                messages=messages,  # type: ignore[arg-type]
                n=2 if i < n_support else args.safety_answers,
                temperature=args.temperature,
                max_tokens=args.max_tokens,
                seed=args.seed * 100_000 + round_no * 1000 + i,
                store=True,
            )
            if completion.model != model:
                raise LoopError(f"`current` was served by {completion.model}; the loop promoted {model} last")
            answers = contrasting_pair([choice.message.content or "" for choice in completion.choices])
            # An empty answer would lose any comparison, but the studio exports the pair as a DPO line its
            # own file check refuses (empty content), failing the job: such pairs are left out here.
            if answers[0].strip() == answers[1].strip() or not all(a.strip() for a in answers):
                skipped += 1
            else:
                items.append({"messages": messages, "answers": answers, "models": [model, model]})
            bar.update(i + 1, f"{len(items)} pairs")
    return items, skipped


def contrasting_pair(answers: list[str]) -> list[str]:
    """The two of `answers` to label: the first that declines and the first that does not where both kinds
    are there (in the order they were sampled), else the first two. A refusal detector choosing which
    answers people compare, as a team would to spend its labellers on the comparisons that teach refusals:
    with two answers a request, most pairs on harmful requests were two answers that both play along.

    >>> contrasting_pair(["Sure, here is how.", "Step one: ...", "I can't help with that."])
    ['Sure, here is how.', "I can't help with that."]
    >>> contrasting_pair(["Sure.", "Step one."])
    ['Sure.', 'Step one.']
    """
    kinds = [declines(a, False) for a in answers]
    if all(kinds) or not any(kinds):
        return answers[:2]
    first, other = answers[kinds.index(True)], answers[kinds.index(False)]
    return [first, other] if kinds.index(True) < kinds.index(False) else [other, first]


def train_on_files(loop: Loop, body: dict[str, Any], round_no: int) -> tuple[str, dict[str, Any]]:
    """`--accumulate` or `--mix-in`: the DPO job trains on a file put together as a user would: each queue
    (every round's with --accumulate, else this round's) exported (POST .../export), the files read and
    joined with --mix-in's pairs (or this round's sample of them), uploaded, and a job created on the file
    (POST /v1/fine_tuning/jobs, method dpo). (the job's id, the export's counts)"""
    queues = loop.queues if loop.args.accumulate else loop.queues[-1:]
    lines: list[str] = []
    for queue_id in queues:
        export = call(loop.studio, "POST", f"/feedback/queues/{queue_id}/export")
        text = loop.client.files.content(export["file"]["id"]).text
        lines += [line for line in text.splitlines() if line.strip()]
    this_round = export["counts"].get("lines", 0)  # the last queue is this round's
    mixed = loop.mix_in
    if loop.args.mix_in_lines and loop.args.mix_in_lines < len(mixed):
        mixed = random.Random(loop.args.seed * 100 + round_no + 70).sample(mixed, loop.args.mix_in_lines)
    lines += mixed
    name = f"loop-{body['suffix']}-{len(queues)}-rounds{'-mixed' if mixed else ''}.jsonl"
    upload = loop.client.files.create(file=(name, ("\n".join(lines) + "\n").encode()), purpose="fine-tune")
    job = loop.client.fine_tuning.jobs.create(
        model=body["model"],
        training_file=upload.id,
        suffix=body["suffix"],
        seed=body["seed"],
        method={"type": "dpo", "dpo": {"hyperparameters": body["hyperparameters"]}},
    )
    log.info(
        "DPO on the verdicts of %d round(s) and %d mixed-in pairs: %d pairs (%s)",
        len(queues), len(mixed), len(lines), upload.id,
    )  # fmt: skip
    counts = {
        "lines": this_round,
        "training_lines": len(lines),
        "queues": len(queues),
        "mixed_in": len(mixed),
    }
    return job.id, counts


def wait_for_job(loop: Loop, job_id: str) -> dict[str, Any]:
    """Poll the job until it ends, with a progress bar over its steps once it runs."""
    deadline = time.monotonic() + loop.args.job_timeout
    status, bar = "", None
    with contextlib.ExitStack() as stack:
        while True:
            job = call(loop.studio, "GET", f"/fine_tuning/jobs/{job_id}")
            if job["status"] != status:
                status = job["status"]
                log.info("job %s: %s", job_id, status)
            total, step = job["progress"]["total_steps"], job["progress"]["step"]
            if bar is None and total:
                bar = stack.enter_context(StepProgress(total, description=f"job {job_id}"))
            if bar is not None and step is not None:
                bar.update(step, "")
            if status in TERMINAL:
                return dict(job)
            if time.monotonic() > deadline:
                raise LoopError(
                    f"job {job_id} is still {status} after {loop.args.job_timeout:.0f} s (--job-timeout)"
                )
            time.sleep(2)


def job_result(loop: Loop, job: dict[str, Any]) -> dict[str, Any]:
    """The job as the report shows it: id, status, model, and the run's final and last-step metrics."""
    shown = {k: job[k] for k in ("id", "status", "model", "fine_tuned_model", "error", "hyperparameters")}
    if job["status"] == "succeeded":
        summary = call(loop.studio, "GET", f"/fine_tuning/jobs/{job['id']}/summary")["summary"] or {}
        shown |= {
            k: summary.get(k) for k in ("steps", "train_seconds", "final_metrics", "safety_flags", "warnings")
        }
    events = loop.client.fine_tuning.jobs.list_events(job["id"], limit=100).data  # newest first
    metrics = next((e.data for e in events if e.type == "metrics"), None)
    shown["last_metrics"] = dict(metrics) if isinstance(metrics, dict) else None
    return shown


def wait_for_answers(loop: Loop, comparison_id: str) -> dict[str, Any]:
    """The comparison once the studio has written both models' answers to its prompts."""
    found = call(loop.studio, "GET", f"/comparisons/{comparison_id}")
    with StepProgress(found["items"]["total"], description=f"comparison {comparison_id}: answers") as bar:
        while found["status"] == "generating":
            bar.update(found["items"]["ready"] + found["items"]["failed"], "")
            time.sleep(1)
            found = call(loop.studio, "GET", f"/comparisons/{comparison_id}")
        bar.update(found["items"]["total"], "")
    if found["items"]["ready"] == 0:
        raise LoopError(f"comparison {comparison_id} has no answers to label: {found['error']}")
    return dict(found)


def wins(result: dict[str, Any], rule: str) -> bool:
    """Whether the labels favour the candidate: `interval`, the 95% Wilson interval of its win rate lies
    above 0.5 (the studio's `promote` or `review_safety`); `point`, the win rate alone is above 0.5."""
    if rule == "interval":
        return result["interval"] is not None and result["interval"][0] > 0.5
    return result["win_rate"] is not None and result["win_rate"] > 0.5


def run_round(loop: Loop, round_no: int, model: str) -> dict[str, Any]:
    args, n = loop.args, len(loop.labellers)
    for person in loop.labellers:
        person.labels = person.as_judged = 0
    record: dict[str, Any] = {"round": round_no, "model": model}

    items, skipped = sample_pairs(loop, model, round_no)
    if len(items) < MIN_PAIRS:
        raise LoopError(
            f"round {round_no}: {len(items)} pairs of different answers from {len(items) + skipped} prompts; a "
            f"DPO job needs {MIN_PAIRS}: raise --prompts"
        )
    queue = call(
        loop.studio, "POST", "/feedback/queues", json={"name": f"Loop round {round_no}", "labels_per_item": n}
    )
    call(loop.studio, "POST", f"/feedback/queues/{queue['id']}/items", json={"items": items})
    log.info("round %d: %d labellers label %d pairs (queue %s)", round_no, n, len(items), queue["id"])
    label_queue(queue["id"], loop.labellers, loop.facts, args.noise, loop.harmful)
    quality = call(loop.studio, "GET", f"/feedback/queues/{queue['id']}/quality")
    record |= {
        "queue_id": queue["id"],
        "prompts": len(items) + skipped,
        "skipped": skipped,  # the same answer twice, or an empty one
        "comparisons": quality["items_labelled"],
        "labels": quality["labels"],
        "agreement": {k: quality["agreement"][k] for k in ("fleiss_kappa", "raw_agreement", "items")}
        | {"with_judge": {p.name: p.as_judged / p.labels if p.labels else None for p in loop.labellers}},
        "findings": quality["findings"],
    }

    body: dict[str, Any] = {
        "method": "dpo",
        "model": model,
        "suffix": f"loop-r{round_no}",
        "hyperparameters": hyperparameters(args),
        "seed": args.seed * 1000 + round_no,  # the job's: a re-run trains the same way
    }
    loop.queues.append(queue["id"])
    if (args.accumulate and len(loop.queues) > 1) or loop.mix_in:
        job_id, record["export"] = train_on_files(loop, body, round_no)
    else:
        trained = call(loop.studio, "POST", f"/feedback/queues/{queue['id']}/train", json=body)
        job_id, record["export"] = trained["job"]["id"], trained["counts"]
    job = wait_for_job(loop, job_id)
    record["job"] = job_result(loop, job)
    if job["status"] != "succeeded":
        record["promoted"] = False
        return record

    body = {
        "job": job["id"],
        "baseline": model,  # named: the studio's default, the project's current model, may be another
        "prompts_file": loop.eval_file,
        "labels_per_item": n,
        "max_prompts": loop.eval_count,
        "max_tokens": args.max_tokens,
        "temperature": args.temperature,
        "seed": args.seed * 100_000 + round_no * 1000 + 500,  # both models answer item k with seed + k
        "name": f"Loop round {round_no}: blind comparison",  # labellers see it: it never names a model
    }
    comparison = call(loop.studio, "POST", "/comparisons", json=body)
    wait_for_answers(loop, comparison["id"])
    label_queue(comparison["id"], loop.labellers, loop.facts, args.noise)
    result = call(loop.studio, "GET", f"/comparisons/{comparison['id']}")["result"]
    record["comparison"] = {
        "id": comparison["id"],
        "candidate": job["fine_tuned_model"],
        "baseline": model,
    } | result
    won = wins(result, args.promote_when)
    # a winner whose run got worse on a safety evaluation waits for a person (the studio: review_safety)
    record["held_for_safety"] = won and bool(result["safety_flags"]) and not args.promote_despite_safety_flags
    record["promoted"] = won and not record["held_for_safety"]
    if record["promoted"]:
        promotion = {"model": job["fine_tuned_model"], "comparison_id": comparison["id"]}
        call(loop.studio, "POST", "/projects/current_model", json=promotion)
    return record


# --- the report ---------------------------------------------------------------------------------------------


def write_json(path: Path, value: Any) -> None:
    """Write to a temporary name beside `path`, then rename: a reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}-", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            json.dump(value, out, indent=2)
            out.write("\n")
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


RULES = {
    "interval": "the win rate's 95% Wilson interval lies above 0.5",
    "point": "the win rate is above 0.5",
}


SHOWN_METRICS = ("loss", "accuracies", "margins")  # of a DPO run's metrics, what a round's line shows


def number(value: float | None, digits: int = 2) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def trained_on(export: dict[str, Any]) -> str:
    """What a job put together from files trained on (--accumulate, --mix-in); nothing for the studio's own."""
    if "queues" not in export:
        return ""
    mixed = f", {export['mixed_in']} of them mixed in (--mix-in)" if export.get("mixed_in") else ""
    rounds = f"all {export['queues']} rounds'" if export["queues"] > 1 else "this round's"
    return f"; DPO on {export['training_lines']} pairs: {rounds} verdicts{mixed}"


def round_text(record: dict[str, Any], rule: str) -> str:
    agreement, job = record["agreement"], record["job"]
    judged = " ".join(number(v) for v in agreement["with_judge"].values())
    lines = [
        f"round {record['round']}: from {record['model']}",
        f"  comparisons  {record['comparisons']} pairs labelled ({record['labels']} labels; "
        f"{record['export'].get('lines', 0)} exported to DPO; {record['skipped']} skipped: the same "
        "answer twice or an empty one)" + trained_on(record["export"]),
        f"  agreement    Fleiss' kappa {number(agreement['fleiss_kappa'])}, "
        f"raw {number(agreement['raw_agreement'])}; each labeller vs the noise-free judge: {judged}",
    ]
    metrics = job.get("final_metrics") or job.get("last_metrics") or {}
    shown = ", ".join(f"{k} {number(v, 4)}" for k, v in metrics.items() if k.endswith(SHOWN_METRICS))
    lines.append(
        f"  DPO job      {job['id']} {job['status']}"
        + (f" in {job.get('steps')} steps: {shown}" if job["status"] == "succeeded" else f": {job['error']}")
    )
    if "comparison" in record:
        c = record["comparison"]
        interval = f"{number(c['interval'][0])}-{number(c['interval'][1])}" if c["interval"] else "n/a"
        lines.append(
            f"  win rate     {number(c['win_rate'])} vs {c['baseline']} ({c['wins']} wins, {c['losses']} "
            f"losses, {c['ties']} ties; 95% Wilson interval {interval}; studio: {c['recommendation']})"
        )
    verdict = f"yes: {record['comparison']['candidate']}" if record["promoted"] else "no"
    if record.get("held_for_safety"):
        verdict = "no: it wins, but its run raised safety flags (--promote-despite-safety-flags)"
    lines.append(f"  promoted     {verdict} (rule: {RULES[rule]})")
    return "\n".join(lines)


def run_loop(svc: Service, args: argparse.Namespace, mix_in: list[str] | None = None) -> dict[str, Any]:
    facts = load_facts(args.facts)
    held_out, pool = split_prompts(load_prompts(args.prompts_file), args.eval_prompts, args.seed)
    client = openai.OpenAI(base_url=svc.base_url, api_key=svc.key, max_retries=3, timeout=600)
    studio = studio_client(svc, svc.key)
    current = call(studio, "GET", "/projects/current_model")["model"]
    model = svc.model or current
    if model is None:
        raise LoopError("the project has no current model: pass --model, the model to start from")
    if current != model:  # the application asks for `current`: the loop's first model must be it
        log.info("promoting %s to the project's current model (it was %s)", model, current)
        call(studio, "POST", "/projects/current_model", json={"model": model})
    uploaded = client.files.create(
        file=("loop-eval-prompts.jsonl", jsonl_bytes([{"messages": m} for m in held_out])), purpose="evals"
    )
    labellers = create_labellers(studio, svc, args)
    safety_pool = load_prompts([SAFETY_PROMPTS]) if args.safety_prompts else []
    harmful = frozenset(user_text(m) for m in safety_pool[FIRST_HARMFUL_LINE - 1 :])
    loop = Loop(
        args, client, studio, labellers, facts, pool, uploaded.id, len(held_out), safety_pool, harmful,
        mix_in=mix_in or [],
    )  # fmt: skip
    report: dict[str, Any] = {
        "base_url": svc.base_url,
        "started_from": model,
        "rule": RULES[args.promote_when],
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items() if k != "api_key"}
        | {"prompts_file": [str(p) for p in args.prompts_file]},
        "labellers": [p.name for p in labellers],
        "held_out_prompts": len(held_out),
        "rounds": [],
    }
    try:
        for round_no in range(1, args.rounds + 1):
            record = run_round(loop, round_no, model)
            report["rounds"].append(record)
            print(round_text(record, args.promote_when), flush=True)
            if record["promoted"]:
                model = record["comparison"]["candidate"]
            report["current_model"] = model
            report["history"] = call(studio, "GET", "/projects/current_model")["history"]
            write_json(args.out, report)
            if record["job"]["status"] != "succeeded":
                raise LoopError(
                    f"job {record['job']['id']} {record['job']['status']}: {record['job']['error']}"
                )
    finally:
        for person in labellers:  # a simulated labeller's key has no use after the run
            with contextlib.suppress(httpx.HTTPError, LoopError):
                call(studio, "DELETE", f"/labellers/{person.key_id}")
    print(f"current model: {model} (results: {args.out})", flush=True)
    return report


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    # a line per request (httpx2 logs the openai client's) would drown the loop's own
    for name in ("httpx", "httpx2"):
        logging.getLogger(name).setLevel(logging.WARNING)
    args = parse_args(argv)
    try:
        mix_in = read_mix_in(args.mix_in) if args.mix_in else []  # before the server starts: errors first
        with service(args) as svc:
            run_loop(svc, args, mix_in)
    except LoopError as exc:
        print(f"run_loop.py: {exc}", file=sys.stderr)
        return 1
    except openai.APIError as exc:
        print(f"run_loop.py: the service refused a request: {exc}", file=sys.stderr)
        return 1
    except httpx.HTTPError as exc:  # the server went away (a started one logs why in WORK_DIR/serve.log)
        print(f"run_loop.py: the service did not answer: {exc!r}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
