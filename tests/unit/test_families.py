"""Model families beyond Llama, each as a tiny random model built in code (models/tiny.py): packed
attention, chat templates, sampling, LoRA targets and a training run, per family."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch

from tests.conftest import (
    BLUE_LINES,
    metric_series,
    nudged_lora,
    pair_lines,
    thumbs_lines,
    tunery_here,
    write_jsonl,
)
from tunery.data.chat import ChatExample
from tunery.data.template import tokenize_chat
from tunery.losses.logps import OutputHead, token_logps
from tunery.models.forward import output_head
from tunery.models.load import load_model
from tunery.models.locate import BUILTIN_MODELS, TINY, TINY_FAMILIES
from tunery.models.lora import apply_lora, load_adapter
from tunery.models.sampling import SamplingParams, sample
from tunery.models.tiny import FAMILIES, WINDOW

NAMES = [TINY, *(f"{TINY}-{family}" for family in TINY_FAMILIES)]


def test_every_family_built_is_listed() -> None:
    assert set(FAMILIES) == {"llama", *TINY_FAMILIES}
    assert set(NAMES) <= set(BUILTIN_MODELS)


def eager_copy(model: torch.nn.Module) -> torch.nn.Module:
    """The same weights under transformers' own eager attention: the reference."""
    config = copy.deepcopy(model.config)
    reference = type(model)._from_config(config, attn_implementation="eager")
    reference.load_state_dict(model.state_dict())
    return reference.eval()


@pytest.mark.parametrize("name", NAMES)
def test_packed_rows_equal_separate_sequences(name: str) -> None:
    """Two conversations packed in one row (the second longer than the sliding window), and a prompt shared
    by two answers, give the logits each sequence gets alone under eager attention."""
    model, _ = load_model(name)
    model.eval()
    reference = eager_copy(model)
    g = torch.Generator().manual_seed(0)
    a, b = (torch.randint(5, 200, (1, n), generator=g) for n in (11, WINDOW + 21))
    with torch.no_grad():
        alone = [reference(input_ids=x).logits[0] for x in (a, b)]
        cu = torch.tensor([0, a.shape[1], a.shape[1] + b.shape[1]], dtype=torch.int32)
        positions = torch.cat([torch.arange(a.shape[1]), torch.arange(b.shape[1])])[None]
        packed = model(
            input_ids=torch.cat([a, b], 1), position_ids=positions, cu_seq_lens_q=cu, cu_seq_lens_k=cu
        ).logits[0]
        assert torch.allclose(packed[: a.shape[1]], alone[0], atol=1e-5)
        assert torch.allclose(packed[a.shape[1] :], alone[1], atol=1e-5)

        prompt, first, second = b[:, :9], b[:, 9:30], b[:, 30:]  # both answers cross the window
        row = torch.cat([prompt, first, second], 1)
        n = row.shape[1]
        branch_positions = torch.cat([torch.arange(30), torch.arange(9, 9 + second.shape[1])])[None]
        shared = model(
            input_ids=row,
            position_ids=branch_positions,
            cu_seq_lens_q=torch.tensor([0, n], dtype=torch.int32),
            cu_seq_lens_k=torch.tensor([0, n], dtype=torch.int32),
            prompt_lens=[9],
            branch_lens=[(21, second.shape[1])],
        ).logits[0]
        with_second = reference(input_ids=torch.cat([prompt, second], 1)).logits[0]
        assert torch.allclose(shared[:30], alone[1][:30], atol=1e-5)
        assert torch.allclose(shared[30:], with_second[9:], atol=1e-5)


@pytest.mark.parametrize("name", NAMES)
def test_fused_output_layer_gives_the_models_own_log_probabilities(name: str) -> None:
    """What the recipes train on (the fused output layer) is the model's own log-softmax, Gemma 2's
    soft-capped logits included; its cap is lowered to where the tiny model's logits feel it."""
    model, _ = load_model(name)
    model.eval()
    capped = getattr(model.config, "final_logit_softcapping", None) is not None
    ids = torch.randint(5, 200, (1, 40), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        if capped:  # half the largest logit
            model.config.final_logit_softcapping = 0.5 * float(model(input_ids=ids).logits.abs().max())
        out = model(input_ids=ids, output_hidden_states=True)
        expected = out.logits[0, :-1].float().log_softmax(-1).gather(1, ids[0, 1:, None]).squeeze(1)
        head = output_head(model)
        assert (head.softcap is not None) == capped
        got, _ = token_logps(out.hidden_states[-1][0, :-1], head, ids[0, 1:])
        assert torch.allclose(got, expected, atol=1e-5)
        if capped:  # the cap moved these log-probabilities: the check above is not the uncapped one's
            uncapped, _ = token_logps(out.hidden_states[-1][0, :-1], OutputHead(head.weight), ids[0, 1:])
            assert (uncapped - expected).abs().max() > 1e-3


@pytest.mark.parametrize("name", NAMES)
def test_chat_template_trains_the_answer_and_its_end_of_turn_token_only(name: str) -> None:
    _, tokenizer = load_model(name)
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi?"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "Bye?"},
        {"role": "assistant", "content": "Goodbye."},
    ]
    chat = tokenize_chat(tokenizer, ChatExample(line=1, messages=messages, weights=[0, 0, 1, 0, 1]))
    text = tokenizer.decode(chat.input_ids)
    assert "Be brief." in text  # a family without a system role still gets it (in the first user turn)
    trained = [t for t, m in zip(chat.input_ids, chat.label_mask, strict=True) if m]
    eot = tokenizer.eos_token
    space = " " if "mistral" in name else ""  # Mistral's template opens an answer with a space
    assert tokenizer.decode(trained) == f"{space}Hello.{eot}{space}Goodbye.{eot}"


@pytest.mark.parametrize("name", NAMES)
def test_greedy_sampling_equals_the_models_own_forward(name: str) -> None:
    """Greedy completions (decoding engine or the generic sampler, whichever the family takes) against a
    full eager forward per token, with prompts and completions longer than the sliding window."""
    model, tokenizer = load_model(name)
    model.eval()
    reference = eager_copy(model)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(5, 200, (n,), generator=g).tolist() for n in (WINDOW + 3, 7)]
    params = SamplingParams(max_new_tokens=12, temperature=0.0, ignore_eos=True)
    completions = sample(model, tokenizer, prompts, params)
    for prompt, completion in zip(prompts, completions, strict=True):
        ids = list(prompt)
        with torch.no_grad():
            for _ in range(params.max_new_tokens):
                ids.append(int(reference(input_ids=torch.tensor([ids])).logits[0, -1].argmax()))
        assert completion.token_ids == ids[len(prompt) :]


@pytest.mark.parametrize("name", NAMES)
def test_lora_all_linear_covers_attention_and_mlp(name: str) -> None:
    model, _ = load_model(name)
    targets = {n.rsplit(".", 1)[-1] for n, m in apply_lora(model, 4, 8, 0.0, "all-linear").named_modules()
               if hasattr(m, "lora_A")}  # fmt: skip
    fused = "phi3" in name  # Phi-3 fuses q/k/v and gate/up
    expected = (
        {"qkv_proj", "o_proj", "gate_up_proj", "down_proj"}
        if fused
        else {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    )
    assert targets == expected


@pytest.mark.parametrize("name", NAMES[1:])
def test_sft_learns_chat_answers_and_export_round_trips(name: str, tmp_path: Path) -> None:
    data = write_jsonl(tmp_path / "train.jsonl", BLUE_LINES)
    out = tmp_path / "run"
    tunery_here(["train", "sft", "--model", name, "--data", str(data), "--out", str(out), "--epochs", "3",
               "--batch-size", "4", "--lr", "0.02", "--safety-evals", "none", "--seed", "0"])  # fmt: skip
    losses = metric_series(out, "train_loss")
    assert losses[-1] < losses[0] / 2, losses
    question = "Colour number 99?\n/exit\n"
    chat = tunery_here(["chat", "--model", name, "--adapter", str(out), "--max-tokens", "8"], stdin=question)
    assert "Blue." in chat

    # export round-trip: the merged model directory loads as --model and computes what base + adapter did
    merged = tmp_path / "merged"
    tunery_here(["export", "--model", name, "--adapter", str(out), "--merge", "--out", str(merged)])
    exported, exported_tokenizer = load_model(str(merged))
    base, tokenizer = load_model(name)
    adapted = load_adapter(base, str(out))
    assert exported_tokenizer.chat_template == tokenizer.chat_template
    ids = torch.tensor(
        [
            tokenize_chat(
                tokenizer, ChatExample(line=1, messages=BLUE_LINES[0]["messages"], weights=[0, 1])
            ).input_ids
        ]
    )
    with torch.no_grad():
        assert torch.allclose(exported.eval()(input_ids=ids).logits, adapted.eval()(input_ids=ids).logits,
                              atol=1e-4)  # fmt: skip
    chat = tunery_here(["chat", "--model", str(merged), "--max-tokens", "8"], stdin=question)
    assert "Blue." in chat


@pytest.mark.parametrize("name", NAMES[1:])
def test_dpo_and_grpo_learn(name: str, tmp_path: Path) -> None:
    """DPO raises the chosen answers' margin (its loss falls from ln 2); GRPO raises a reward for vowels
    (24 steps at lr 0.01: measured, a higher lr collapsed Gemma's policy to empty answers; Qwen2 got there
    within 16 steps on 1-2 of seeds 0-3, within 24 on all four)."""
    pairs = write_jsonl(tmp_path / "pairs.jsonl", pair_lines(16))
    tunery_here(["train", "dpo", "--model", name, "--data", str(pairs), "--out", str(tmp_path / "dpo"), "--epochs", "3",
         "--batch-size", "4", "--lr", "0.01", "--safety-evals", "none", "--seed", "0"])  # fmt: skip
    losses = metric_series(tmp_path / "dpo", "train_loss")
    assert losses[0] == pytest.approx(math.log(2), abs=1e-3) and sum(losses[-3:]) / 3 < 0.5, losses

    prompts = [{"messages": [{"role": "user", "content": f"Say something about {w}"}]}
               for w in ("tea", "rain", "maps", "snow", "ink", "owls", "salt", "moss")]  # fmt: skip
    data = write_jsonl(tmp_path / "prompts.jsonl", prompts)
    (tmp_path / "r.py").write_text(
        "def vowels(sample, item):\n"
        "    text = sample['output_text']\n"
        "    return sum(ch in 'aeiou' for ch in text) / max(len(text), 1)\n"
    )
    tunery_here(["train", "grpo", "--model", name, "--data", str(data), "--grader", f"{tmp_path / 'r.py'}:vowels",
         "--out", str(tmp_path / "grpo"), "--group-size", "4", "--batch-size", "4", "--epochs", "12",
         "--max-new-tokens", "8", "--lr", "0.01", "--lora-rank", "8", "--safety-evals", "none", "--seed", "0"])  # fmt: skip
    rewards = metric_series(tmp_path / "grpo", "train_reward_mean")
    assert sum(rewards[-2:]) / 2 > sum(rewards[:2]) / 2 + 0.2, rewards


@pytest.mark.parametrize("name", NAMES)
def test_decoding_engine_covers_what_tunery_models_says(name: str) -> None:
    """Where `tunery models` says the engine runs, it samples what the model's own forward samples, with a
    LoRA adapter on every linear layer (Phi-3's fused ones included) and prompts longer than the window;
    where it says not, the engine declines with that reason."""
    from tunery.models.decode import decode_model_for, unsupported_reason
    from tunery.models.locate import ENGINE_FALLBACK
    from tunery.models.sampling import _sample_generic

    model, tokenizer = load_model(name)
    family = name.removeprefix(f"{TINY}-") if name != TINY else "llama"
    assert unsupported_reason(model) == ENGINE_FALLBACK.get(family)
    if family in ENGINE_FALLBACK:
        return
    peft = nudged_lora(model).eval()
    assert decode_model_for(peft) is not None
    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(5, 200, (n,), generator=g).tolist() for n in (WINDOW + 5, 4, WINDOW + 5)]
    params = SamplingParams(max_new_tokens=WINDOW, temperature=1.0, seed=3, ignore_eos=True)
    fast, slow = sample(peft, tokenizer, prompts, params), _sample_generic(peft, tokenizer, prompts, params)
    assert [c.token_ids for c in fast] == [c.token_ids for c in slow]
    for f, s in zip(fast, slow, strict=True):
        assert torch.allclose(torch.tensor(f.logprobs), torch.tensor(s.logprobs), atol=1e-4)


@pytest.mark.parametrize("name", NAMES[1:])
def test_the_other_recipes_run_on_each_family(name: str, tmp_path: Path) -> None:
    """KTO, a reward model and PPO against it: each runs to its end on the family's tiny model (a smoke
    run: two steps each, final/ written). SFT, DPO and GRPO are shown to learn above."""
    thumbs = write_jsonl(tmp_path / "thumbs.jsonl", thumbs_lines(12))
    pairs = write_jsonl(tmp_path / "pairs.jsonl", pair_lines(12))
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"messages": [{"role": "user", "content": f"Hi {i}"}]}
                                                       for i in range(12)])  # fmt: skip
    common = ["--model", name, "--max-steps", "2", "--batch-size", "4"]
    no_evals = ["--safety-evals", "none"]  # (a reward model has no chat evaluations)
    tunery_here(["train", "kto", "--data", str(thumbs), "--out", str(tmp_path / "kto"), *common, *no_evals])
    tunery_here(["train", "rm", "--data", str(pairs), "--out", str(tmp_path / "rm"), *common])
    tunery_here(["train", "ppo", "--data", str(prompts), "--reward-model", str(tmp_path / "rm"),
               "--out", str(tmp_path / "ppo"), "--max-new-tokens", "8", *common, *no_evals])  # fmt: skip
    for method, key in (("kto", "train_loss"), ("rm", "train_loss"), ("ppo", "policy_loss")):
        assert len(metric_series(tmp_path / method, key)) == 2, method
        assert (tmp_path / method / "final" / "MODEL_CARD.md").is_file(), method
