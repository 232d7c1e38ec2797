"""How the documentation test reads command blocks and rewrites commands, on a small sample document and
a fake command table (no tunery import, no subprocess): milliseconds."""

from __future__ import annotations

import argparse
from pathlib import Path

from tests.docs.markdown_commands import (
    Command,
    Rewriter,
    cli_spec,
    extract_blocks,
    find_invocation,
    make_target,
    split_commands,
)

SAMPLE = """\
# Sample

```bash
source .venv/bin/activate

tunery models                      # what can be loaded
# a whole-line comment
tunery train sft --model smollm2-135m-instruct \\
    --data "a file#1.jsonl" --out runs/x   # trailing comment with a '#'
tunery train sft --model nope  # fails: unknown model
echo 'it''s # not a comment' | grep -c it
```

<!-- not run: needs a GPU -->
```bash
torchrun --nproc_per_node=8 -m tunery train sft --config big.yaml
```

```yaml
model: smollm2-135m-instruct
```

<!-- not run -->

```python
print("hello")
```

```sh
make test
```

<!-- not run: nothing follows this marker -->
Some prose.
"""


def sample(tmp_path: Path) -> str:
    path = tmp_path / "SAMPLE.md"
    path.write_text(SAMPLE)
    return path.read_text()


def test_blocks_markers_and_problems(tmp_path: Path) -> None:
    extraction = extract_blocks(sample(tmp_path), "SAMPLE.md")
    blocks = extraction.blocks
    assert [(b.id, b.lang, b.line, b.not_run) for b in blocks] == [
        ("SAMPLE.md:1", "bash", 4, None),
        ("SAMPLE.md:2", "bash", 16, "needs a GPU"),
        ("SAMPLE.md:3", "python", 26, ""),  # a marker without a reason: the markers test refuses it
    ]
    assert blocks[2].text == 'print("hello")'
    assert len(extraction.problems) == 2
    assert "```sh block is never run" in extraction.problems[0]
    assert "line 33" in extraction.problems[1] and "not just before a block" in extraction.problems[1]


def test_comments_continuations_and_fails(tmp_path: Path) -> None:
    block = extract_blocks(sample(tmp_path), "SAMPLE.md").blocks[0]
    commands = split_commands(block.text, block.line)
    assert [(c.line, c.text, c.comment, c.expect_failure) for c in commands] == [
        (4, "source .venv/bin/activate", "", False),
        (6, "tunery models", "what can be loaded", False),
        (
            8,
            'tunery train sft --model smollm2-135m-instruct     --data "a file#1.jsonl" --out runs/x',
            "trailing comment with a '#'",
            False,
        ),
        (10, "tunery train sft --model nope", "fails: unknown model", True),
        (11, "echo 'it''s # not a comment' | grep -c it", "", False),
    ]


def test_continuation_ends_at_a_comment_and_heredocs_stay_whole() -> None:
    text = "tunery a \\\n    --b 1   # done here\n    [--c 2]\ncat > f.jsonl <<'EOF'\n{\"x\": 1}  # kept\nEOF\nls"
    commands = split_commands(text)
    assert [c.text for c in commands] == [
        "tunery a     --b 1",
        "[--c 2]",  # not part of the command above: bash runs it on its own (and fails)
        "cat > f.jsonl <<'EOF'\n{\"x\": 1}  # kept\nEOF",
        "ls",
    ]
    assert split_commands('echo "two\nlines" # c')[0].text == 'echo "two\nlines"'


def fake_cli() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tunery")
    parser.add_argument("-v", action="store_true")
    sub = parser.add_subparsers(dest="command")
    train = sub.add_parser("train").add_subparsers(dest="method")
    for method in ("sft", "rm"):
        p = train.add_parser(method)
        for flag in ("--model", "--config", "--max-steps", "--resume", "--set"):
            p.add_argument(flag)
        if method == "sft":
            p.add_argument("--safety-evals")
    for name in ("chat", "models"):
        p = sub.add_parser(name)
        if name == "chat":
            p.add_argument("--model", default="smollm2-135m-instruct")
    serve = sub.add_parser("serve")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--train-set", action="append")
    keys = sub.add_parser("keys").add_subparsers(dest="action")
    create = keys.add_parser("create")
    create.add_argument("--project")
    create.add_argument("--labeller")
    return parser


def test_rewrites_for_speed() -> None:
    rewriter = Rewriter(cli_spec(fake_cli()))

    def ran(text: str) -> str:
        return rewriter.plan(Command(text, 1)).text

    assert ran("tunery train sft --model smollm2-135m-instruct --out r") == (
        "tunery train sft --model tiny-random --out r --max-steps 2 --safety-evals none"
    )
    assert ran("tunery train rm --model x") == "tunery train rm --model x --max-steps 2"  # no --safety-evals
    assert (
        ran("tunery train sft --model m --max-steps 5 --set safety_evals=full")
        == "tunery train sft --model m --max-steps 5 --set safety_evals=full --max-steps 2"
    )
    assert ran("tunery train rm --model m --set max_steps=9") == (
        "tunery train rm --model m --set max_steps=9 --set max_steps=2"
    )
    assert ran("tunery train sft --resume runs/x") == "tunery train sft --resume runs/x"
    assert ran("torchrun --nproc_per_node=2 -m tunery train rm --model m 2>&1 | tail -1") == (
        "torchrun --nproc_per_node=2 -m tunery train rm --model m --max-steps 2 2>&1 | tail -1"
    )
    assert ran("X=1 tunery -v chat") == "X=1 tunery -v chat --model tiny-random"
    assert rewriter.plan(Command("tunery chat --model m", 1)).stdin.endswith("/exit\n")
    assert ran("echo tunery train sft") == "echo tunery train sft"
    assert rewriter.plan(Command("source .venv/bin/activate", 1)).kind == "noop"
    assert rewriter.plan(Command("make test", 1)).kind == "not run"
    assert rewriter.plan(Command("make demo", 1)).kind == "make demo"
    assert find_invocation("cd x && tunery train sft > log", rewriter.spec).path == ("train", "sft")


def test_training_without_a_model_gets_the_tiny_one(tmp_path: Path) -> None:
    (tmp_path / "named.yaml").write_text("model: tiny-random\nlr: 0.1\n")
    (tmp_path / "unnamed.yaml").write_text("lr: 0.1\n")
    rewriter = Rewriter(cli_spec(fake_cli()), workdir=tmp_path)

    def ran(text: str) -> str:
        return rewriter.plan(Command(text, 1)).text

    assert ran("tunery train rm --out r") == "tunery train rm --out r --max-steps 2 --model tiny-random"
    assert ran("tunery train rm --config named.yaml") == "tunery train rm --config named.yaml --max-steps 2"
    assert ran("tunery train rm --config=unnamed.yaml") == (
        "tunery train rm --config=unnamed.yaml --max-steps 2 --model tiny-random"
    )
    assert ran("tunery train rm --resume r") == "tunery train rm --resume r"


def test_service_port_and_key() -> None:
    rewriter = Rewriter(cli_spec(fake_cli()))
    plan = rewriter.plan(Command("tunery serve --port 9000", 1), free_port=51234)
    assert (plan.kind, plan.doc_port) == ("serve", 9000)
    assert plan.text == (
        "tunery serve --port 9000 --port 51234 --train-set max_steps=2 --train-set safety_evals=none"
    )
    assert rewriter.plan(Command("tunery serve", 1)).doc_port == 8000
    rewriter.ports[9000] = 51234
    rewriter.keep_key(rewriter.plan(Command("tunery keys create --project acme", 1)), "sk-tunery-abc_1\n")
    rewriter.keep_key(
        rewriter.plan(Command("tunery keys create --project a --labeller Ana", 1)), "sk-tunery-lab\n"
    )
    code = (
        'OpenAI(base_url="http://127.0.0.1:9000/v1", api_key="sk-tunery-...", model="smollm2-135m-instruct")'
    )
    assert rewriter.text(code) == (
        'OpenAI(base_url="http://127.0.0.1:51234/v1", api_key="sk-tunery-abc_1", model="tiny-random")'
    )


def test_make_target() -> None:
    makefile = "VENV ?= .venv\n\ndemo: $(STAMP)\n\t$(VENV)/bin/tunery train sft \\\n\t  --overwrite\n\t@$(PY) x.py\n\ntest:\n\tpytest\n"
    assert make_target(makefile, "demo", "/v/bin", "/v/bin/python") == [
        "/v/bin/tunery train sft --overwrite",
        "/v/bin/python x.py",
    ]
