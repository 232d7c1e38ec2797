"""`tunery export --gguf` with a SentencePiece-style tokenizer (Llama 2, Mistral, Phi-3 and Gemma style): BPE
with byte fallback and "\u2581" for spaces, written as llama.cpp's `llama` vocabulary.

Each tokenizer here is trained in code on a few paragraphs and laid out as transformers' converters lay out
a SentencePiece model (the special tokens, the 256 byte tokens, then the pieces in merge order, with merges
that list every split of every piece). The exported file is read back by transformers' GGUF loader and by
llama.cpp (when installed: `make llama-cpp`), and their token ids are compared with the tokenizer's, string
by string, and their logits with the model's.

What still differs, and whose it is:
- transformers' GGUF reader gives a `llama` file a Metaspace pre-tokenizer with prepend_scheme "first",
  whatever the file says, so it drops the "\u2581" a Llama 2 style tokenizer puts before text that starts with
  a space or follows a special token. llama.cpp reads the file as the tokenizer does.
- A tokenizer in transformers' non-legacy Llama layout (Metaspace, "first") puts a "\u2581" only before
  raw text at the very start. llama.cpp can put one before every piece of text (the start and after each
  special token) or none; the file says none, so chat prompts, which start with a special token, split
  as the tokenizer splits them, and raw text at the start loses its "\u2581". The export warns.
- transformers' reader respells an added token of spaces (Gemma's) as "\u2581"s and then no longer treats
  it as added: it splits a run of spaces otherwise. llama.cpp reads it as the tokenizer does.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import torch
from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerFast
from transformers.tokenization_utils_base import generate_merges

from tunery.errors import TuneryError
from tunery.models import gguf_export
from tunery.models.gguf_export import compare_logits, export_gguf
from tunery.models.tiny import FAMILIES, tiny_config

SPACE = "\u2581"
LLAMA_CPP = not gguf_export.llama_cpp_missing()
needs_llama_cpp = pytest.mark.skipif(not LLAMA_CPP, reason="llama.cpp is not installed (make llama-cpp)")

TRAINING_TEXT = """The refund policy allows returns within thirty days of delivery. Items must be unused and
in their original packaging. To start a return, open your order history, choose the item and press the return
button. We send a prepaid label by email; print it and drop the parcel at any post office. Refunds reach the
original payment method within five working days after the parcel arrives at our warehouse. Shipping costs are
refunded when the item arrived damaged or when we sent the wrong item. Where is my order? Your order ships
today and arrives on Thursday. The café in Zürich serves crème brûlée, a naïve résumé of French cooking; São
Paulo and Málaga have their own. Straße, fjörd, smörgåsbord and piñata are words with accents. Thank you for
shopping with us, and have a wonderful day. What is twelve plus thirty? It is forty two."""

# leading, double and trailing spaces, newlines, a tab, accents (in the vocabulary), CJK and emoji (bytes)
TEXTS = [
    "Hello world",
    "The refund policy allows returns.",
    " leading space",
    "  two leading spaces",
    "double  spaces  inside",
    "trailing space ",
    "line one\nline two\n\nline four",
    "\n starts with a newline",
    "tab\tseparated",
    "The café in Zürich serves crème brûlée",
    "naïve résumé, São Paulo",
    "中文 and 日本語",
    "emoji 😀🎉 mixed",
    "",
    " ",
]
# special tokens (and a non-special added one) with text before and after them
LLAMA_TEXTS = ["<s>hello</s>", "</s> after a special token", "a<s> b", "<unk>x", "call <|tool|>now"]
GEMMA_TEXTS = ["<start_of_turn>user\nhi<end_of_turn>\n", "<bos> after", "a<eos>b", "x   three spaces"]
# where a "\u2581" goes before the text in one reading and not in the other (see the module docstring)
PREFIXED = {
    " leading space",
    "  two leading spaces",
    " ",
    "<s>hello</s>",
    "</s> after a special token",
    "a<s> b",
    "<unk>x",
    "call <|tool|>now",
}

LLAMA_SPECIALS = ("<unk>", "<s>", "</s>")
GEMMA_SPECIALS = ("<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>")


@cache
def trained_pieces() -> tuple[str, ...]:
    """A small BPE's pieces, trained SentencePiece's way: words start with "\u2581", no piece spans two."""
    backend = Tokenizer(models.BPE(unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement=SPACE, prepend_scheme="always", split=True)
    trainer = trainers.BpeTrainer(vocab_size=420, special_tokens=["<unk>"], show_progress=False)
    backend.train_from_iterator(TRAINING_TEXT.splitlines() * 3, trainer)
    vocab = backend.get_vocab()
    return tuple(p for p in sorted(vocab, key=vocab.__getitem__) if p != "<unk>")


def sentencepiece_tokenizer(
    spaces: str = "prepend", family: str = "mistral", rstrip: bool = False
) -> PreTrainedTokenizerFast:
    """A tokenizer.json as transformers' LlamaConverter (spaces "prepend": Llama 2, Mistral v0.1, Phi-3;
    "metaspace": the non-legacy one; "always": what transformers 5 makes of a legacy tokenizer.model) or
    GemmaConverter (family gemma2) writes one, with the
    family's chat template and special tokens. Phi-3's added tokens strip the spaces after them with
    `rstrip`, as Phi-3's own do."""
    gemma = family == "gemma2"
    specials = GEMMA_SPECIALS if gemma else LLAMA_SPECIALS
    pieces = [*specials, *(f"<0x{b:02X}>" for b in range(256)), SPACE * 2, SPACE * 4, *trained_pieces()]
    vocab = {piece: i for i, piece in enumerate(pieces)}
    # a SentencePiece model scores its pieces in merge order; the converter lists every split of each
    merges = generate_merges(vocab, {piece: -i for piece, i in vocab.items()})
    backend = Tokenizer(
        models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True)
    )
    if gemma:
        backend.normalizer = normalizers.Replace(" ", SPACE)
        backend.pre_tokenizer = pre_tokenizers.Split(" ", "merged_with_previous")
    elif spaces == "prepend":
        backend.normalizer = normalizers.Sequence(
            [normalizers.Prepend(SPACE), normalizers.Replace(" ", SPACE)]
        )
    else:  # "metaspace": prepend_scheme "first"; "always": transformers 5's conversion of a legacy one
        backend.pre_tokenizer = pre_tokenizers.Metaspace(
            replacement=SPACE, prepend_scheme="always" if spaces == "always" else "first", split=False
        )
    backend.decoder = decoders.Sequence(
        [decoders.Replace(SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
    )
    spec = FAMILIES[family]
    added = [*specials, *(s for s in spec.special if s not in specials)]
    unstripped = ("<unk>", "<s>", "<|endoftext|>")
    backend.add_special_tokens(
        [AddedToken(s, normalized=False, special=True, rstrip=rstrip and s not in unstripped) for s in added]
    )
    if gemma:  # Gemma's whitespace runs; this one is found in the text after its spaces became "\u2581"
        backend.add_tokens([AddedToken(SPACE * 3, normalized=True, special=False)])
    else:
        backend.add_tokens([AddedToken("<|tool|>", normalized=False, special=False, rstrip=rstrip)])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=spec.bos,
        eos_token=spec.eos,
        unk_token="<unk>",
        pad_token=spec.special[0] if family != "mistral" else None,
        add_bos_token=True,
    )
    tokenizer.chat_template = spec.template
    return tokenizer


def tiny_model(rows: int, family: str) -> PreTrainedModel:
    """A tiny random model of `family` with `rows` embedding rows, Gemma's as llama.cpp assumes Gemma is."""
    config = tiny_config(rows, family)
    if family.startswith("gemma"):
        config.query_pre_attn_scalar = config.head_dim
    if family == "gemma3":
        config.layer_types = ["sliding_attention"] * config.num_hidden_layers
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return AutoModelForCausalLM.from_config(config).eval()  # type: ignore[no-any-return]


LLAMA_CPP_TOKENIZE = """
import json, os, sys
from llama_cpp import Llama
path, texts, out = sys.argv[1], json.loads(open(sys.argv[2]).read()), sys.argv[3]
os.dup2(os.open(os.devnull, os.O_WRONLY), 1)
llm = Llama(path, verbose=False, n_ctx=64, vocab_only=True)
add_bos = llm.metadata.get("tokenizer.ggml.add_bos_token") == "true"
open(out, "w").write(json.dumps([llm.tokenize(t.encode(), add_bos=add_bos, special=True) for t in texts]))
"""


def llama_cpp_ids(path: Path, texts: list[str]) -> list[list[int]]:
    """llama.cpp's token ids for each text, with BOS as the file says, in a child process (native code)."""
    request, out = path.with_suffix(".texts.json"), path.with_suffix(".ids.json")
    request.write_text(json.dumps(texts))
    subprocess.run(
        [sys.executable, "-c", LLAMA_CPP_TOKENIZE, str(path), str(request), str(out)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    return json.loads(out.read_text())  # type: ignore[no-any-return]


def differing(tokenizer: PreTrainedTokenizerFast, texts: list[str], ids: list[list[int]]) -> set[str]:
    return {text for text, got in zip(texts, ids, strict=True) if got != tokenizer(text)["input_ids"]}


def transformers_ids(path: Path, texts: list[str]) -> list[list[int]]:
    theirs = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    return [theirs(text)["input_ids"] for text in texts]


def fields(path: Path) -> dict[str, Any]:
    import gguf

    reader = gguf.GGUFReader(path)
    return {key: field.contents() for key, field in reader.fields.items()}


def chat(tokenizer: PreTrainedTokenizerFast) -> str:
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Where is my order? The café 中文 😀"}], tokenize=False
    )
    return str(text)


# --- Llama 2 style: the Prepend normalizer ----------------------------------------------------------------


def test_a_llama_2_style_tokenizer_is_written_as_llama_cpp_reads_it(tmp_path: Path) -> None:
    import gguf

    tokenizer = sentencepiece_tokenizer("prepend")
    model = tiny_model(len(tokenizer) + 3, "llama")  # 3 rows of padding past the tokenizer
    path = tmp_path / "m.gguf"
    report = export_gguf(model, tokenizer, path, "f32", "tiny-llama-2")
    assert report.warnings == []
    value = fields(path)
    assert value["tokenizer.ggml.model"] == "llama" and value["tokenizer.ggml.add_space_prefix"] is True
    assert value["tokenizer.ggml.add_bos_token"] is True and value["tokenizer.ggml.add_eos_token"] is False
    assert [value[f"tokenizer.ggml.{k}_token_id"] for k in ("bos", "eos", "unknown")] == [1, 2, 0]
    assert value["tokenizer.chat_template"] == tokenizer.chat_template
    tokens, types = value["tokenizer.ggml.tokens"], value["tokenizer.ggml.token_type"]
    assert len(tokens) == len(tokenizer) + 3 and tokens[-1] == f"[PAD{len(tokenizer) + 2}]"
    kind = {token: gguf.TokenType(t).name for token, t in zip(tokens, types, strict=True)}
    assert [kind[t] for t in ("<unk>", "<s>", "<0x0A>", SPACE + "refund", "<|tool|>", tokens[-1])] == [
        "UNKNOWN", "CONTROL", "BYTE", "NORMAL", "USER_DEFINED", "UNUSED"
    ]  # fmt: skip
    # llama.cpp joins the pair making the token of highest score: a token scores minus its first merge's rank
    merges = json.loads(tokenizer.backend_tokenizer.to_str())["model"]["merges"]
    rank = next(i for i, merge in enumerate(merges) if "".join(merge) == SPACE + "refund")
    scores = dict(zip(tokens, value["tokenizer.ggml.scores"], strict=True))
    assert scores[SPACE + "refund"] == -rank and scores["<0x0A>"] == 0.0

    texts = TEXTS + LLAMA_TEXTS
    assert differing(tokenizer, texts, transformers_ids(path, texts)) == PREFIXED  # transformers' reader
    check = compare_logits(path, model, tokenizer, [chat(tokenizer), *TEXTS[:3]])
    assert check.readers[0].max_abs < 1e-4 and check.readers[0].top1 == 1.0, check.lines()
    if LLAMA_CPP:
        assert differing(tokenizer, texts, llama_cpp_ids(path, texts)) == set()
        assert check.readers[1].same_tokens and check.readers[1].max_abs < 0.05, check.lines()


@needs_llama_cpp
def test_llama_cpp_needs_the_scores_the_merges_give(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """gguf's LlamaHfVocab (llama.cpp's converter for a tokenizer.json like this) scores every token -1000: so
    written, llama.cpp joins pairs left to right and splits some words differently."""
    import gguf

    tokenizer = sentencepiece_tokenizer("prepend")
    tokenizer.save_pretrained(tmp_path / "hf")
    assert {score for _, score, _ in gguf.LlamaHfVocab(tmp_path / "hf").all_tokens()} == {-1000.0}
    write_scores = gguf.GGUFWriter.add_token_scores
    monkeypatch.setattr(
        gguf.GGUFWriter,
        "add_token_scores",
        lambda writer, scores: write_scores(writer, [-1000.0] * len(scores)),
    )
    path = tmp_path / "flat.gguf"
    export_gguf(tiny_model(len(tokenizer), "llama"), tokenizer, path, "f32")
    texts = TEXTS + LLAMA_TEXTS
    assert "The refund policy allows returns." in differing(tokenizer, texts, llama_cpp_ids(path, texts))


# --- transformers' non-legacy Llama layout: a Metaspace pre-tokenizer --------------------------------------


def test_a_metaspace_tokenizer_is_written_and_what_llama_cpp_adds_is_named(tmp_path: Path) -> None:
    """A Metaspace pre-tokenizer with prepend_scheme "first" puts a "\u2581" only before raw text at the
    start; the file asks llama.cpp for none anywhere, so text after a special token splits the same."""
    tokenizer = sentencepiece_tokenizer("metaspace")
    model = tiny_model(len(tokenizer), "llama")
    path = tmp_path / "m.gguf"
    report = export_gguf(model, tokenizer, path, "f32")
    assert len(report.warnings) == 1, report.warnings
    assert "at the very start" in report.warnings[0]
    assert fields(path)["tokenizer.ggml.add_space_prefix"] is False
    texts = TEXTS + LLAMA_TEXTS
    assert differing(tokenizer, texts, transformers_ids(path, texts)) == set()
    if LLAMA_CPP:
        raw_start = {t for t in texts if t.strip(" ") and not t.startswith((" ", "<s>", "</s>", "<unk>"))}
        assert differing(tokenizer, texts, llama_cpp_ids(path, texts)) == raw_start
        chat = "<s>[INST] Where is my order? [/INST] It ships today.</s>"
        assert differing(tokenizer, [chat], llama_cpp_ids(path, [chat])) == set()


def test_a_legacy_model_as_transformers_5_converts_it_differs_only_where_the_export_warns(
    tmp_path: Path,
) -> None:
    """transformers 5 converts a legacy SentencePiece model (a tokenizer.model, Mistral's say) into a
    Metaspace pre-tokenizer with prepend_scheme "always": a "\u2581" before each piece of text unless it
    starts with a space. llama.cpp puts one before each piece, so text that starts with a space (at the start
    or after a special token) gets two. The same texts, and only those, differed on Mistral's released
    tokenizer.model v1 and v3 (from the mistral-common package) converted by transformers 5.25."""
    tokenizer = sentencepiece_tokenizer("always")
    path = tmp_path / "m.gguf"
    report = export_gguf(tiny_model(len(tokenizer), "llama"), tokenizer, path, "f32")
    assert [w for w in report.warnings if "starts with a space" in w] == report.warnings != []
    assert fields(path)["tokenizer.ggml.add_space_prefix"] is True
    if LLAMA_CPP:
        texts = TEXTS + LLAMA_TEXTS
        spaced = {t for t in texts if t.startswith(" ") or any(f"{s} " in t for s in LLAMA_SPECIALS)}
        assert spaced and differing(tokenizer, texts, llama_cpp_ids(path, texts)) == spaced


# --- Gemma and Phi-3 --------------------------------------------------------------------------------------

PHI3_TEXTS = ["<|user|> Where is my order?<|end|>\n<|assistant|> It ships today.<|end|>", "<|endoftext|> x"]
# transformers' reader respells a token of spaces as "\u2581"s and then no longer finds it added, and does not
# strip spaces after the special tokens that strip them
TRANSFORMERS_SPLITS_OTHERWISE = {
    "gemma2": {"x   three spaces"},
    "phi3": set(),
    "phi3 rstrip": {"</s> after a special token", PHI3_TEXTS[0]},
}


@pytest.mark.parametrize(
    ("arch", "family", "rstrip"),
    [
        ("gemma2", "gemma2", False),
        ("gemma3", "gemma2", False),
        ("phi3", "phi3", False),
        ("phi3", "phi3", True),
    ],
)
def test_gemma_and_phi_3_style_tokenizers(arch: str, family: str, rstrip: bool, tmp_path: Path) -> None:
    tokenizer = sentencepiece_tokenizer("prepend", family, rstrip)
    model = tiny_model(len(tokenizer), arch)
    path = tmp_path / "m.gguf"
    report = export_gguf(model, tokenizer, path, "f32", f"tiny-random-{arch}")
    assert report.warnings == []
    value = fields(path)
    assert value["tokenizer.ggml.add_space_prefix"] is (family != "gemma2")  # Gemma puts no "\u2581" first
    # llama.cpp strips the spaces after a model's special tokens when its name says phi-3 (as Phi-3's own
    # tokenizer does): the name says so only when this tokenizer strips them so too
    renamed = arch == "phi3" and not rstrip
    assert value["general.name"] == ("tiny-random-phi" if renamed else f"tiny-random-{arch}")
    if family == "gemma2":  # a normalized added token, found by llama.cpp in the text as typed
        assert "   " in value["tokenizer.ggml.tokens"]
    texts = TEXTS + (GEMMA_TEXTS if family == "gemma2" else LLAMA_TEXTS + PHI3_TEXTS)
    expected = TRANSFORMERS_SPLITS_OTHERWISE[family + (" rstrip" if rstrip else "")]
    assert differing(tokenizer, texts, transformers_ids(path, texts)) == expected
    check = compare_logits(path, model, tokenizer, [chat(tokenizer), *TEXTS[:3]])
    assert check.readers[0].max_abs < 1e-4 and check.readers[0].top1 == 1.0, check.lines()
    if LLAMA_CPP:
        assert differing(tokenizer, texts, llama_cpp_ids(path, texts)) == set()
        assert check.readers[1].same_tokens and check.readers[1].max_abs < 0.05, check.lines()


# --- what llama.cpp cannot split so ------------------------------------------------------------------------


def byte_fallback_bpe(pieces: list[str], merges: list[tuple[str, str]]) -> PreTrainedTokenizerFast:
    vocab = {
        p: i for i, p in enumerate(["<unk>", "<s>", "</s>", *(f"<0x{b:02X}>" for b in range(256)), *pieces])
    }
    backend = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True))
    backend.normalizer = normalizers.Sequence([normalizers.Prepend(SPACE), normalizers.Replace(" ", SPACE)])
    backend.add_special_tokens([AddedToken(s, normalized=False, special=True) for s in LLAMA_SPECIALS])
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )


def test_merges_llama_cpp_would_not_follow_are_named(tmp_path: Path) -> None:
    """With "b c" before "a b" and no "a bc", tokenizers splits "abc" as a + bc; llama.cpp, which joins any
    pair making a token, goes on to abc."""
    tokenizer = byte_fallback_bpe(
        [SPACE, "a", "b", "c", "bc", "ab", "abc"], [("b", "c"), ("a", "b"), ("ab", "c")]
    )
    path = tmp_path / "m.gguf"
    report = export_gguf(tiny_model(len(tokenizer), "llama"), tokenizer, path, "f32")
    assert report.warnings == [
        "llama.cpp joins any two adjacent tokens that make a token; this tokenizer's merges leave out "
        "'a' + 'bc', so some text may split differently"
    ]
    if LLAMA_CPP:
        assert differing(tokenizer, ["abc"], llama_cpp_ids(path, ["abc"])) == {"abc"}


def unigram() -> PreTrainedTokenizerFast:
    backend = Tokenizer(models.Unigram([("<unk>", 0.0), ("a", -1.0), ("b", -2.0)], unk_id=0))
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>")


def lowercased() -> PreTrainedTokenizerFast:
    tokenizer = sentencepiece_tokenizer("prepend")
    tokenizer.backend_tokenizer.normalizer = normalizers.Sequence(
        [normalizers.Lowercase(), normalizers.Prepend(SPACE), normalizers.Replace(" ", SPACE)]
    )
    return tokenizer


def without_byte_tokens() -> PreTrainedTokenizerFast:
    backend = Tokenizer(
        models.BPE(vocab={"<unk>": 0, "a": 1, "b": 2}, merges=[], unk_token="<unk>", byte_fallback=True)
    )
    backend.normalizer = normalizers.Replace(" ", SPACE)
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>")


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (unigram, "covers BPE tokenizers: byte-level ones .* this model's tokenizer is Unigram"),
        (lowercased, "only replaces spaces by \u2581 .*Lowercase"),
        (without_byte_tokens, "no token for 256 of them"),
    ],
)
def test_what_llama_cpp_cannot_split_so_is_refused(
    make: Callable[[], PreTrainedTokenizerFast], message: str, tmp_path: Path
) -> None:
    tokenizer = make()
    with pytest.raises(TuneryError, match=message):
        export_gguf(tiny_model(len(tokenizer), "llama"), tokenizer, tmp_path / "m.gguf", "f32")
    assert list(tmp_path.iterdir()) == []  # nothing half-written
