"""The SFT recipe end to end on tiny-random: files, metrics, learning, exact resume, adapters, DDP."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import safetensors.torch
import torch
from peft import PeftModel

from tests.conftest import chat_lines, run_torchrun, run_two_nodes, write_jsonl
from tunery.cli import main
from tunery.errors import TuneryError
from tunery.models.load import load_model
from tunery.models.lora import apply_lora
from tunery.recipes import sft
from tunery.run.files import read_metrics

REPO = Path(__file__).resolve().parents[2]


def config(train: Path, valid: Path, out: Path, **extra) -> dict:
    base = {
        "model": "tiny-random",
        "data": str(train),
        "valid": str(valid),
        "out": str(out),
        "epochs": 2,
        "batch_size": 4,
        "lr": 2e-2,
        "lora_rank": 8,
        "seed": 0,
        "precision": "fp32",
        "save_every": 2,
        "eval_every": 3,
        "micro_batch_tokens": 256,
    }
    return base | extra


def cli_args(cfg: dict) -> list[str]:
    return ["train", "sft"] + [a for k, v in cfg.items() for a in ("--set", f"{k}={v}")]


def adapter_state(run: Path) -> dict[str, torch.Tensor]:
    return safetensors.torch.load_file(str(run / "final" / "adapter_model.safetensors"))


def test_lora_run_writes_the_contract_and_learns(chat_files, tmp_path: Path) -> None:
    train, valid = chat_files
    out = tmp_path / "run"
    summary = sft.run(None, config(train, valid, out, epochs=4))
    for name in (
        "config.yaml",
        "metrics.jsonl",
        "summary.json",
        "final/adapter_model.safetensors",
        "final/adapter_config.json",
        "final/tokenizer.json",
    ):
        assert (out / name).is_file(), name
    records = read_metrics(out)
    steps = [r for r in records if "train_loss" in r]
    assert [r["step"] for r in steps] == list(range(1, 25))  # ceil(24 / 4) * 4 epochs
    for key in ("total_steps", "train_mean_token_accuracy", "lr", "tokens", "tokens_per_second"):
        assert key in steps[0]
    assert (
        "valid_loss" in steps[2] and "valid_mean_token_accuracy" in steps[2] and "valid_loss" not in steps[0]
    )
    assert "full_valid_loss" in records[-1] and "full_valid_mean_token_accuracy" in records[-1]
    assert steps[-1]["train_loss"] < 0.7 * steps[0]["train_loss"]
    assert summary["trained_tokens"] == steps[-1]["tokens"] and summary["peak_memory_mb"] > 0
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-20", "step-22", "step-24"]

    # Every trainable parameter moved away from its initial value.
    model, _ = load_model("tiny-random")
    torch.manual_seed(0)
    initial = apply_lora(model, 8, 32.0, 0.0, "all-linear")
    init_state = {k: v for k, v in initial.state_dict().items() if "lora_" in k}
    trained = adapter_state(out)
    assert len(trained) == len(init_state) > 0
    for key, value in trained.items():
        match = [v for k, v in init_state.items() if k.replace(".default", "") == key]
        assert match and not torch.equal(match[0], value), key


def test_full_fine_tuning_saves_a_loadable_model(chat_files, tmp_path: Path) -> None:
    train, valid = chat_files
    out = tmp_path / "full"
    sft.run(None, config(train, valid, out, lora_rank=0, lr=3e-3))
    steps = [r for r in read_metrics(out) if "train_loss" in r]
    assert steps[-1]["train_loss"] < 0.7 * steps[0]["train_loss"]
    model, _ = load_model(str(out / "final"))
    assert model.config.num_hidden_layers == 2


def run_with_fault(cfg: dict, fault: str, returncode: int) -> subprocess.CompletedProcess[str]:
    """`tunery train sft` in a child process that TUNERY_FAULT stops at an exact point."""
    env = {**os.environ, "TUNERY_FAULT": fault}
    proc = subprocess.run(
        [sys.executable, "-m", "tunery", *cli_args(cfg)],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == returncode, proc.stderr[-2000:]
    return proc


@pytest.mark.parametrize(("fault", "latest"), [("after_step:3", "step-2"), ("during_save:4", "step-2")])
def test_resume_after_sigkill_is_exact(chat_files, tmp_path: Path, fault: str, latest: str) -> None:
    train, valid = chat_files
    ref = tmp_path / "ref"
    sft.run(None, config(train, valid, ref, lora_dropout=0.1))  # dropout: RNG state must be restored too

    killed = tmp_path / "killed"
    cfg = config(train, valid, killed, lora_dropout=0.1)
    run_with_fault(cfg, fault, returncode=-9)  # SIGKILL
    assert not (killed / "final").exists()
    done = sorted(p.name for p in (killed / "checkpoints").iterdir() if not p.name.startswith("."))
    assert done == [latest]
    assert main(["train", "sft", "--resume", str(killed)]) == 0

    # the losses first: when they differ, the step where they part says whether the restore (step 3, the
    # first after the checkpoint) or something later in the run differs
    ref_losses = [r["train_loss"] for r in read_metrics(ref) if "train_loss" in r]
    resumed_losses = [r["train_loss"] for r in read_metrics(killed) if "train_loss" in r]
    assert resumed_losses == ref_losses, list(zip(ref_losses, resumed_losses, strict=True))
    ref_state, resumed_state = adapter_state(ref), adapter_state(killed)
    assert ref_state.keys() == resumed_state.keys()
    for key in ref_state:
        assert torch.equal(ref_state[key], resumed_state[key]), key


def test_sigterm_checkpoints_at_a_step_boundary_and_resumes_exactly(chat_files, tmp_path: Path) -> None:
    train, valid = chat_files
    ref = tmp_path / "ref"
    sft.run(None, config(train, valid, ref, save_every=100))
    stopped = tmp_path / "stopped"
    cfg = config(train, valid, stopped, save_every=100)
    proc = run_with_fault(cfg, "after_step:3:SIGTERM", returncode=2)
    assert "stopped at step 3/12 (SIGTERM)" in proc.stderr and f"--resume {stopped}" in proc.stderr
    assert sorted(p.name for p in (stopped / "checkpoints").iterdir()) == ["step-3"]
    assert main(["train", "sft", "--resume", str(stopped)]) == 0
    for key, value in adapter_state(ref).items():
        assert torch.equal(value, adapter_state(stopped)[key]), key


def test_adapter_loads_in_peft_and_merges(chat_files, tmp_path: Path) -> None:
    train, valid = chat_files
    out = tmp_path / "run"
    sft.run(None, config(train, valid, out, epochs=1))
    base, tokenizer = load_model("tiny-random")
    ids = torch.tensor([tokenizer("Where is my order?")["input_ids"]])
    with torch.no_grad():
        base_logits = base(input_ids=ids).logits
    peft_model = PeftModel.from_pretrained(base, out / "final")
    with torch.no_grad():
        tuned_logits = peft_model(input_ids=ids).logits
    assert not torch.allclose(base_logits, tuned_logits, atol=1e-4)

    merged_dir = tmp_path / "merged"
    assert (
        main(["export", "--model", "tiny-random", "--adapter", str(out), "--merge", "--out", str(merged_dir)])
        == 0
    )
    merged, _ = load_model(str(merged_dir))
    with torch.no_grad():
        merged_logits = merged(input_ids=ids).logits
    assert torch.allclose(merged_logits, tuned_logits, atol=1e-4)


def test_bad_inputs_fail_with_actionable_messages(chat_files, tmp_path: Path, capsys) -> None:
    train, valid = chat_files
    bad = tmp_path / "bad.jsonl"
    bad.write_text(train.read_text() + '{"messages": [{"role": "user", "content": "q"}]}\n')
    with pytest.raises(TuneryError, match=r"line 25: \[example_missing_assistant_message\]"):
        sft.run(None, config(bad, valid, tmp_path / "x"))
    out = tmp_path / "exists"
    out.mkdir()
    (out / "something").write_text("keep me")
    assert main(cli_args(config(train, valid, out))) == 2
    assert "not a Tunery run" in capsys.readouterr().err and (out / "something").read_text() == "keep me"
    assert main(["train", "sft", "--resume", str(tmp_path / "nothing")]) == 2
    assert main(cli_args(config(train, valid, tmp_path / "y", epochs=0))) == 2
    assert main(cli_args(config(train, valid, tmp_path / "z", model="no-such-model"))) == 2
    err = capsys.readouterr().err
    assert "epochs must be" in err and "unknown model 'no-such-model'" in err and "tiny-random" in err

    done = tmp_path / "done"
    sft.run(None, config(train, valid, done, epochs=1, safety_evals="none"))
    assert main(["train", "sft", "--resume", str(done)]) == 2  # finished: nothing to resume
    assert "has finished" in capsys.readouterr().err
    (done / "summary.json").unlink()  # as if killed while writing its report
    train.write_text(train.read_text().replace("Be brief.", "Be short."))
    assert main(["train", "sft", "--resume", str(done)]) == 2
    assert "changed since the run started" in capsys.readouterr().err


@pytest.mark.system
def test_ddp_two_processes_match_one(chat_files, tmp_path: Path) -> None:
    _, valid = chat_files
    # 25 conversations in steps of 4: the last step has one, so one process gets none and must still
    # take part in the gradient all-reduce.
    train = write_jsonl(tmp_path / "train25.jsonl", chat_lines(25))
    single = tmp_path / "single"
    sft.run(None, config(train, valid, single, epochs=1))
    double = tmp_path / "ddp"
    proc = run_torchrun(cli_args(config(train, valid, double, epochs=1)))
    assert proc.returncode == 0, proc.stderr[-3000:]
    one = [r for r in read_metrics(single) if "train_loss" in r]
    two = [r for r in read_metrics(double) if "train_loss" in r]
    assert len(one) == len(two) == 7
    for a, b in zip(one, two, strict=True):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-4)
        assert a["tokens"] == b["tokens"]
    assert json.loads((double / "summary.json").read_text())["world_size"] == 2


@pytest.mark.system
def test_two_nodes_match_one_process(chat_files, tmp_path: Path) -> None:
    """Multi-node: two torchrun launches joined by a c10d rendezvous (two "nodes" on 127.0.0.1, sharing the
    run directory as a cluster's shared filesystem would) train what one process trains."""
    train, valid = chat_files
    single = tmp_path / "single"
    sft.run(None, config(train, valid, single, epochs=1, safety_evals="none"))
    nodes = tmp_path / "nodes"
    for proc in run_two_nodes(cli_args(config(train, valid, nodes, epochs=1, safety_evals="none"))):
        assert proc.returncode == 0, proc.stderr[-3000:]
    one = [r for r in read_metrics(single) if "train_loss" in r]
    two = [r for r in read_metrics(nodes) if "train_loss" in r]
    assert len(one) == len(two) > 1
    for a, b in zip(one, two, strict=True):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-4)
        assert a["tokens"] == b["tokens"]
    assert json.loads((nodes / "summary.json").read_text())["world_size"] == 2
    assert (nodes / "final" / "adapter_model.safetensors").is_file()


def test_continued_sft_starts_from_the_merged_adapter(chat_files, tmp_path: Path) -> None:
    """`--adapter`: the first run's adapter is merged into the base and a new one trains on top; final/
    carries the first adapter along, so it loads on its own (what the service's continued jobs use)."""
    from tunery.models.lora import load_adapter

    train, valid = chat_files
    first, second = tmp_path / "first", tmp_path / "second"
    sft.run(None, config(train, valid, first, epochs=3, safety_evals="none"))
    sft.run(None, config(train, valid, second, epochs=1, adapter=str(first), safety_evals="none"))
    start_of_first = read_metrics(first)[0]["train_loss"]
    end_of_first = [r for r in read_metrics(first) if "train_loss" in r][-1]["train_loss"]
    start_of_second = read_metrics(second)[0]["train_loss"]
    assert end_of_first < start_of_first and start_of_second < (start_of_first + end_of_first) / 2
    assert (second / "final" / "base_adapter" / "adapter_config.json").is_file()

    ids = torch.tensor([[5, 17, 42, 99, 7]])
    base, _ = load_model("tiny-random")
    with torch.no_grad():
        only_first = load_adapter(base, first)(input_ids=ids).logits
    base, _ = load_model("tiny-random")
    with torch.no_grad():
        both = load_adapter(base, second)(input_ids=ids).logits
    assert not torch.allclose(only_first, both, atol=1e-4)  # the second adapter is applied on top


def test_a_run_that_failed_at_set_up_is_retried_with_the_same_command_and_max_steps_ends_it(
    chat_files, tmp_path: Path
) -> None:
    """A new user's first attempt fails after screening (here: a model directory with nothing in it); the
    corrected command with the same --out must just run, not ask for --resume or --overwrite."""
    train, valid = chat_files
    out = tmp_path / "run"
    empty_model = tmp_path / "not-a-model"
    empty_model.mkdir()
    (empty_model / "config.json").write_text("{}")  # passes the CLI's early check, fails to load
    cfg = config(train, valid, out, epochs=1, safety_evals="none", track_energy=False)
    assert main(cli_args(cfg | {"model": str(empty_model)})) != 0
    assert (out / "screening.json").is_file() and not (out / "config.yaml").exists()
    assert main(cli_args(cfg) + ["--max-steps", "2"]) == 0
    assert (out / "final").is_dir()
    assert json.loads((out / "summary.json").read_text())["steps"] == 2  # --max-steps: 2 of the 6 steps
    assert max(r["step"] for r in read_metrics(out)) == 2


@pytest.mark.system
def test_sharded_full_fine_tuning_matches_one_process(chat_files, tmp_path: Path) -> None:
    """--shard (FSDP2) under torchrun: the same losses as one unsharded process, with an uneven last step
    (one process has no conversation and runs a copy that counts for nothing); checkpoints are every
    process's shards; a run killed mid-way resumes from them and ends where the uninterrupted one did;
    final/ is an ordinary model directory holding the same weights. The same checkpoint also resumes in
    one process (DCP reshards on load)."""
    _, valid = chat_files
    train = write_jsonl(tmp_path / "train25.jsonl", chat_lines(25))
    full = {"lora_rank": 0, "lr": 2e-3, "epochs": 1, "safety_evals": "none", "eval_every": 2}
    single = tmp_path / "single"
    sft.run(None, config(train, valid, single, **full))
    sharded = tmp_path / "sharded"
    args = cli_args(config(train, valid, sharded, shard=True, **full))
    killed = run_torchrun(args, env={"TUNERY_FAULT": "after_step:5"})
    assert killed.returncode != 0
    checkpoint = sharded / "checkpoints" / "step-4"
    assert (checkpoint / "sharded" / ".metadata").is_file() and (checkpoint / "rng-1.pt").is_file()
    assert not (checkpoint / "model").exists()  # no process wrote the whole model
    shrunk = tmp_path / "shrunk"  # the same checkpoint resumed in one process, unsharded
    shutil.copytree(sharded, shrunk)
    assert main(["train", "sft", "--resume", str(shrunk)]) == 0
    proc = run_torchrun(["train", "sft", "--resume", str(sharded)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    one = [r for r in read_metrics(single) if "train_loss" in r]
    two = {r["step"]: r for r in read_metrics(sharded) if "train_loss" in r}  # resumed steps overwrite
    assert len(one) == len(two) == 7
    for a in one:
        b = two[a["step"]]
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-4), a["step"]
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-3), a["step"]
        assert a["tokens"] == b["tokens"]
    assert one[-1]["train_loss"] < one[0]["train_loss"]
    valid_one = [r["valid_loss"] for r in read_metrics(single) if "valid_loss" in r]
    valid_two = [r["valid_loss"] for r in read_metrics(sharded) if "valid_loss" in r][-len(valid_one) :]
    assert valid_one == pytest.approx(valid_two, rel=1e-4)

    summary = json.loads((sharded / "summary.json").read_text())
    assert summary["world_size"] == 2
    a, _ = load_model(str(single / "final"))
    b, _ = load_model(str(sharded / "final"))
    c, _ = load_model(str(shrunk / "final"))
    ids = torch.tensor([[5, 17, 42, 99, 7]])
    with torch.no_grad():
        assert torch.allclose(a(ids).logits, b(ids).logits, atol=1e-4)
        assert torch.allclose(a(ids).logits, c(ids).logits, atol=1e-4)
        base, _ = load_model("tiny-random")
        assert not torch.allclose(base(ids).logits, b(ids).logits, atol=1e-2)  # it did train


def test_shard_needs_full_fine_tuning_in_a_method_that_shards(chat_files, tmp_path: Path, capsys) -> None:
    from tunery.recipes.configs import PPOConfig, SFTConfig

    with pytest.raises(TuneryError, match="add --full"):
        SFTConfig(data="t.jsonl", out="o", shard=True)  # LoRA
    with pytest.raises(TuneryError, match="ppo trains LoRA only: drop --shard"):
        PPOConfig(data="t.jsonl", out="o", shard=True, reward_model="rm")
    train, _ = chat_files
    assert main(["train", "sft", "--data", str(train), "--out", str(tmp_path / "r"), "--shard"]) == 2
    assert "add --full" in capsys.readouterr().err and not (tmp_path / "r").exists()
