"""`tunery export --gguf`: every covered family written, read back by transformers' GGUF loader and by
llama.cpp (when installed: `make llama-cpp`) and compared logit by logit with the model it came from; the
Ollama Modelfile's Go template rendered by Go's own text/template (when `go` is installed) against the Jinja
chat template."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from tunery.cli import main
from tunery.errors import TuneryError
from tunery.models import gguf_export
from tunery.models.gguf_export import compare_logits, export_gguf
from tunery.models.ollama import derive_turns, go_template, modelfile
from tunery.models.tiny import FAMILIES, tiny_config, tiny_model, tiny_tokenizer

# CI builds llama.cpp (make llama-cpp) and sets TUNERY_TEST_REQUIRE_LLAMA_CPP=1: there the llama.cpp checks
# cannot be skipped
REQUIRED = os.environ.get("TUNERY_TEST_REQUIRE_LLAMA_CPP") == "1"
LLAMA_CPP = not gguf_export.llama_cpp_missing() or REQUIRED
needs_llama_cpp = pytest.mark.skipif(not LLAMA_CPP, reason="llama.cpp is not installed (make llama-cpp)")
GO = shutil.which("go")


def family_model(family: str, llama_cpp_layout: bool = True):  # type: ignore[no-untyped-def]
    """A tiny model of `family`. Gemma's tiny configs differ from what llama.cpp assumes of Gemma (it scales
    attention by 1/sqrt(head_dim) and gives Gemma 3 full attention on every 6th layer), so by default they
    are built as the released Gemma models are."""
    tokenizer = tiny_tokenizer(family)
    if not llama_cpp_layout or not family.startswith("gemma"):
        return tiny_model(len(tokenizer), family=family).eval(), tokenizer
    config = tiny_config(len(tokenizer), family)
    config.query_pre_attn_scalar = config.head_dim
    if family == "gemma3":
        config.layer_types = ["sliding_attention"] * config.num_hidden_layers
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config)
    return model.eval(), tokenizer


def prompt(tokenizer, family: str) -> str:  # type: ignore[no-untyped-def]
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Refund 12 items?"}], tokenize=False, add_generation_prompt=True
    )
    # Mistral's tiny sliding window (16 tokens) is one llama.cpp's `llama` architecture does not have
    return text[:15] if family == "mistral" else text


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_every_family_reads_back_with_the_same_logits(family: str, tmp_path: Path) -> None:
    model, tokenizer = family_model(family)
    texts = [prompt(tokenizer, family)]
    report = export_gguf(model, tokenizer, tmp_path / "m-f32.gguf", "f32", f"tiny-random-{family}")
    assert report.tensors > 0
    assert len(report.warnings) == (family == "mistral")  # its window; the test's text stays inside it
    check = compare_logits(tmp_path / "m-f32.gguf", model, tokenizer, texts)
    transformers = check.readers[0]
    assert transformers.reader == "transformers" and transformers.max_abs < 1e-4 and transformers.top1 == 1.0
    if LLAMA_CPP:
        assert len(check.readers) == 2, check.lines()  # llama.cpp ran the file (in its own process)
        llama = check.readers[1]
        assert llama.reader == "llama.cpp" and llama.same_tokens
        assert llama.max_abs < 0.05, llama.line()  # llama.cpp keeps its KV cache in f16
    # 16-bit and 8-bit files, within a stated tolerance of the fp32 model
    for quant, mean_tolerance in (("f16", 0.01), ("q8_0", 0.1)):
        path = tmp_path / f"m-{quant}.gguf"
        export_gguf(model, tokenizer, path, quant)
        for agreement in compare_logits(path, model, tokenizer, texts).readers:
            assert agreement.mean_abs < mean_tolerance, (quant, agreement.line())


SCALINGS = {  # Llama 3.1's kind (its original context small, so most frequencies are scaled) and linear
    "llama3": {
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 32,
    },
    "linear": {"factor": 4.0},
}


def scaled_llama(kind: str):  # type: ignore[no-untyped-def]
    tokenizer = tiny_tokenizer("llama")
    config = tiny_config(len(tokenizer), "llama")
    theta = config.rope_parameters["rope_theta"]
    config.rope_parameters = {"rope_type": kind, "rope_theta": theta, **SCALINGS[kind]}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config)
    return model.eval(), tokenizer


@pytest.mark.parametrize("kind", sorted(SCALINGS))
def test_rope_scaling_is_written_as_llama_cpp_reads_it(
    kind: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Llama 3.1 and later scale RoPE per frequency (llama.cpp: the rope_freqs tensor), others linearly (the
    rope.scaling keys). 144 tokens, so that the positions reach past the original context."""
    model, tokenizer = scaled_llama(kind)
    text = prompt(tokenizer, "llama") + " and then a few more words to take the positions further along" * 2
    report = export_gguf(model, tokenizer, tmp_path / "scaled.gguf", "f32")
    assert report.tensors == (21 if kind == "llama3" else 20)  # rope_freqs.weight for Llama 3's
    check = compare_logits(tmp_path / "scaled.gguf", model, tokenizer, [text])
    assert check.readers[0].max_abs < 1e-4, check.lines()
    if LLAMA_CPP:
        assert check.readers[1].reader == "llama.cpp" and check.readers[1].max_abs < 0.05, check.lines()
        # the same file without the scaling: llama.cpp's logits are far off, so the check above can fail
        monkeypatch.setattr(gguf_export, "_rope_scaling", lambda config: {})
        export_gguf(model, tokenizer, tmp_path / "unscaled.gguf", "f32")
        monkeypatch.undo()
        unscaled = compare_logits(tmp_path / "unscaled.gguf", model, tokenizer, [text])
        assert unscaled.readers[1].max_abs > 1.0, unscaled.lines()
    config = model.config
    config.rope_parameters = {**config.rope_parameters, "rope_type": "yarn"}
    with pytest.raises(TuneryError, match="'yarn'"):
        export_gguf(model, tokenizer, tmp_path / "yarn.gguf", "f32")


def test_what_llama_cpp_cannot_express_is_named(tmp_path: Path) -> None:
    model, tokenizer = family_model(
        "gemma2", llama_cpp_layout=False
    )  # query_pre_attn_scalar 256, head_dim 16
    report = export_gguf(model, tokenizer, tmp_path / "g.gguf", "f16")
    assert any("query_pre_attn_scalar = 256" in w for w in report.warnings)
    model, tokenizer = family_model("mistral")
    report = export_gguf(model, tokenizer, tmp_path / "m.gguf", "f16")
    assert any("sliding window of 16" in w for w in report.warnings)


def test_the_file_carries_the_tokenizer_and_chat_template(tmp_path: Path) -> None:
    import gguf

    model, tokenizer = family_model("qwen2")
    export_gguf(model, tokenizer, tmp_path / "q.gguf", "q8_0", "support-bot")
    fields = gguf.GGUFReader(tmp_path / "q.gguf").fields
    value = {k: fields[k].contents() for k in fields if not k.startswith("tokenizer.ggml.tok")}
    assert value["general.architecture"] == "qwen2" and value["general.name"] == "support-bot"
    assert value["tokenizer.ggml.model"] == "gpt2" and value["tokenizer.ggml.pre"] == "gpt-2"
    assert value["tokenizer.chat_template"] == tokenizer.chat_template
    assert value["tokenizer.ggml.eos_token_id"] == tokenizer.eos_token_id
    tokens = fields["tokenizer.ggml.tokens"].contents()
    assert len(tokens) == model.get_input_embeddings().weight.shape[0]
    assert tokens[tokenizer.eos_token_id] == "<|im_end|>"
    kinds = gguf.GGUFReader(tmp_path / "q.gguf").tensors
    types = {t.name: t.tensor_type.name for t in kinds}
    assert types["blk.0.attn_q.weight"] == "Q8_0" and types["blk.0.attn_norm.weight"] == "F32"
    assert "output.weight" not in types  # tied: llama.cpp reads the token embedding


@needs_llama_cpp
def test_k_quants_go_through_llama_cpp(tmp_path: Path) -> None:
    model, tokenizer = family_model("llama")
    report = export_gguf(model, tokenizer, tmp_path / "k.gguf", "q4_k_m")
    assert report.quant == "q4_k_m" and not list(tmp_path.glob(".*tmp"))
    check = compare_logits(tmp_path / "k.gguf", model, tokenizer, [prompt(tokenizer, "llama")])
    assert all(a.mean_abs < 1.0 for a in check.readers), check.lines()  # 4-5 bits on a 64-wide random model


def test_k_quants_without_llama_cpp_name_the_make_target(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(gguf_export, "llama_cpp_missing", lambda: True)
    with pytest.raises(TuneryError, match="make llama-cpp"):
        gguf_export.check_quant("q4_k_m")
    gguf_export.check_quant("q4_1")  # written here: no llama.cpp needed
    with pytest.raises(TuneryError, match="choose one of"):
        gguf_export.check_quant("q3")


# --- the command ----------------------------------------------------------------------------------------


def test_export_a_lora_run_to_gguf_with_a_modelfile(
    run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "ollama" / "support.gguf"
    assert (
        main(
            [
                "export",
                "--adapter",
                str(run_dir),
                "--gguf",
                str(out),
                "--quant",
                "q8_0",
                "--ollama",
                "--check",
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert f"wrote {out} (llama, q8_0" in printed and "transformers: logits max |diff|" in printed
    text = (out.parent / "support.Modelfile").read_text()
    assert text.startswith("FROM ./support.gguf\nTEMPLATE") and 'PARAMETER stop "<|im_end|>"' in text
    # the adapter was merged: the file differs from the base model's
    from tunery.models.load import load_model

    base, tokenizer = load_model("tiny-random")
    check = compare_logits(out, base.eval(), tokenizer)
    assert check.readers[0].max_abs > 1e-3


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--gguf", "x.bin"], "name the file with a .gguf ending"),
        (["--gguf", "x.gguf", "--quant", "q9"], "choose one of"),
        (["--merge"], "--merge needs --out DIR"),
        ([], "export needs --gguf FILE"),
        (["--out", "d", "--merge", "--ollama"], "--quant and --ollama go with --gguf"),
    ],
)
def test_export_refuses_bad_flags(
    argv: list[str],
    message: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.chdir(tmp_path)
    assert main(["export", "--model", "tiny-random", *argv]) != 0
    assert message in capsys.readouterr().err


@pytest.fixture
def run_dir(chat_files, tmp_path: Path) -> Path:  # type: ignore[no-untyped-def]
    from tests.recipes.test_sft import config
    from tunery.recipes import sft

    train, valid = chat_files
    sft.run(None, config(train, valid, tmp_path / "run", epochs=1))
    return tmp_path / "run"


# --- the Ollama Modelfile ---------------------------------------------------------------------------------


def test_chatml_turns_are_read_off_the_template() -> None:
    turns = derive_turns(
        lambda messages, prompt: tiny_tokenizer("llama").apply_chat_template(
            messages, tokenize=False, add_generation_prompt=prompt
        )
    )
    assert turns.user == ("<|im_start|>user\n", "<|im_end|>\n")
    assert turns.assistant == ("<|im_start|>assistant\n", "<|im_end|>\n")
    assert turns.generation == "<|im_start|>assistant\n"
    assert turns.opening == "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"  # the default
    assert not turns.system_inline and turns.system == ("<|im_start|>system\n", "<|im_end|>\n")


def test_a_template_that_drops_a_message_is_refused() -> None:
    def render(messages, prompt):  # type: ignore[no-untyped-def]
        return "".join(m["content"] for m in messages if m["role"] != "assistant")

    with pytest.raises(TuneryError, match="content once"):
        derive_turns(render)


CONVERSATIONS = [
    [{"role": "user", "content": "Hi"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
    [
        {"role": "user", "content": "Where is my order?"},
        {"role": "assistant", "content": "It ships today."},
        {"role": "user", "content": "Thanks\nbye"},
    ],
    [
        {"role": "system", "content": "You are a support agent."},
        {"role": "user", "content": "Refund?"},
        {"role": "assistant", "content": "Yes, within 30 days."},
        {"role": "user", "content": "And shipping?"},
    ],
]


@pytest.mark.skipif(GO is None, reason="Go is not installed (apt-get install golang-go)")
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_the_modelfile_template_renders_as_the_chat_template(family: str, tmp_path: Path) -> None:
    """Go's text/template (what Ollama runs) renders each conversation exactly as the Jinja template does."""
    binary = tmp_path / "render"
    source = Path(__file__).parent / "go" / "render_template.go"
    subprocess.run([GO, "build", "-o", str(binary), str(source)], check=True, cwd=source.parent, timeout=300)
    tokenizer = tiny_tokenizer(family)
    text = modelfile("m.gguf", tokenizer)
    template = text.split('TEMPLATE """', 1)[1].split('"""', 1)[0]
    (tmp_path / "t.tmpl").write_text(template)
    for conversation in CONVERSATIONS:
        rendered = subprocess.run(
            [str(binary), str(tmp_path / "t.tmpl")],
            input=json.dumps(conversation),
            capture_output=True,
            text=True,
            check=True,
            timeout=60,
        ).stdout
        expected = tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)
        assert rendered == expected, (family, conversation)


def test_go_template_has_no_whitespace_trimming() -> None:
    turns = derive_turns(
        lambda m, p: tiny_tokenizer("gemma2").apply_chat_template(m, tokenize=False, add_generation_prompt=p)
    )
    assert turns.system_inline
    assert "{{-" not in go_template(turns) and "-}}" not in go_template(turns)


def test_a_crash_inside_llama_cpp_is_a_message(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """llama.cpp runs in a child process: a segfault there (its AMX kernels on some CPUs) is reported."""
    from tunery.models import llama_cpp_run

    crashing = tmp_path / "python"
    crashing.write_text("#!/bin/sh\nkill -SEGV $$\n")
    crashing.chmod(0o755)
    monkeypatch.setattr(llama_cpp_run.sys, "executable", str(crashing))
    with pytest.raises(
        llama_cpp_run.LlamaCppFailed, match="killed by SIGSEGV running m.gguf.*make llama-cpp"
    ):
        llama_cpp_run.scores(tmp_path / "m.gguf", [[1, 2]], ["x"])
    monkeypatch.undo()
    with pytest.raises(llama_cpp_run.LlamaCppFailed, match=r"could not run missing.gguf \(exit status 1\)"):
        llama_cpp_run.scores(tmp_path / "missing.gguf", [[1, 2]], ["x"])
