"""An Ollama Modelfile beside an exported GGUF file: `tunery export --gguf out.gguf --ollama`.

Ollama's TEMPLATE is a Go template, not the Jinja chat template the tokenizer carries, so it is derived
here from what the Jinja template renders: the conversation is rendered with marker contents, and the
text around each marker is the role's prefix and suffix. Two layouts are recognised: a system turn of its
own (ChatML, Phi-3; a default system prompt when none is given, as SmolLM2's template has), and a system
message folded into the first user turn (Gemma, Mistral). A template that fits neither is refused with a
clear error rather than guessed. The stop tokens are the special tokens that close an assistant turn.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from tunery.errors import TuneryError

SYSTEM, USER1, ASSISTANT1, USER2 = "TUNERYSYSTEMTEXT", "TUNERYUSERONE", "TUNERYASSISTANTONE", "TUNERYUSERTWO"

Render = Callable[[list[dict[str, str]], bool], str]


@dataclass(frozen=True)
class Turns:
    """The pieces of a chat template: text before the first user turn without a system message (`opening`),
    each role's prefix and suffix, the generation prompt, and how a system message is placed."""

    opening: str
    user: tuple[str, str]
    assistant: tuple[str, str]
    generation: str
    system_inline: bool  # folded into the first user turn (Gemma, Mistral) or a turn of its own
    system: tuple[str, str]  # own turn: (text before it, text after it); inline: ("", separator)


def _split(text: str, *markers: str) -> list[str]:
    parts = []
    for marker in markers:
        if text.count(marker) != 1:
            raise ValueError(marker)
        before, text = text.split(marker)
        parts.append(before)
    parts.append(text)
    return parts


def derive_turns(render: Render) -> Turns:
    def msg(role: str, content: str) -> dict[str, str]:
        return {"role": role, "content": content}

    chat = [msg("user", USER1), msg("assistant", ASSISTANT1), msg("user", USER2)]
    with_system = [msg("system", SYSTEM), *chat]
    try:
        opening_up, ua, au, user_end = _split(render(chat, False), USER1, ASSISTANT1, USER2)
        *_, prompted_end = _split(render(chat, True), USER1, ASSISTANT1, USER2)
        *_, assistant_end = _split(render(chat[:2], False), USER1, ASSISTANT1)
        head, middle, rest = _split(render(with_system, False), SYSTEM, USER1)
    except ValueError as exc:
        raise TuneryError(f"the chat template does not show each message's content once ({exc})") from exc
    user_suffix, assistant_suffix = user_end, assistant_end
    if not (
        prompted_end.startswith(user_suffix)
        and ua.startswith(user_suffix)
        and au.startswith(assistant_suffix)
    ):
        raise TuneryError("the chat template's turns could not be told apart for an Ollama TEMPLATE")
    generation = prompted_end[len(user_suffix) :]
    assistant_prefix = ua[len(user_suffix) :]
    user_prefix = au[len(assistant_suffix) :]
    if not opening_up.endswith(user_prefix) or rest != ua + ASSISTANT1 + au + USER2 + user_end:
        raise TuneryError("the chat template's turns could not be told apart for an Ollama TEMPLATE")
    opening = opening_up[: len(opening_up) - len(user_prefix)]
    if middle.endswith(user_prefix):  # a system turn of its own
        system_inline, system = False, (head, middle[: len(middle) - len(user_prefix)])
    elif head == opening + user_prefix:  # folded into the first user turn
        system_inline, system = True, ("", middle)
    else:
        raise TuneryError("the chat template places a system message in a way Ollama's TEMPLATE cannot copy")
    return Turns(
        opening,
        (user_prefix, user_suffix),
        (assistant_prefix, assistant_suffix),
        generation,
        system_inline,
        system,
    )


def _literal(text: str) -> str:
    if "{{" in text or "}}" in text:
        raise TuneryError(
            "the chat template's own text contains '{{' or '}}', which a Go template cannot hold"
        )
    return text


def go_template(turns: Turns) -> str:
    """One line of Go template, no whitespace trimming (`{{-` would eat the template's own newlines)."""
    t = {
        k: _literal(v)
        for k, v in {
            "opening": turns.opening,
            "up": turns.user[0],
            "us": turns.user[1],
            "ap": turns.assistant[0],
            "as": turns.assistant[1],
            "gen": turns.generation,
            "s0": turns.system[0],
            "s1": turns.system[1],
        }.items()
    }
    find_system = '{{ $system := "" }}{{ range .Messages }}{{ if eq .Role "system" }}{{ $system = .Content }}{{ end }}{{ end }}'
    assistant = f'{{{{ else if eq .Role "assistant" }}}}{t["ap"]}{{{{ .Content }}}}{t["as"]}{{{{ end }}}}'
    if turns.system_inline:
        return (
            find_system
            + t["opening"]
            + "{{ $first := true }}{{ range .Messages }}"
            + f'{{{{ if eq .Role "user" }}}}{t["up"]}'
            + f"{{{{ if and $first $system }}}}{{{{ $system }}}}{t['s1']}{{{{ end }}}}{{{{ $first = false }}}}"
            + f"{{{{ .Content }}}}{t['us']}"
            + assistant
            + "{{ end }}"
            + t["gen"]
        )
    return (
        find_system
        + f"{{{{ if $system }}}}{t['s0']}{{{{ $system }}}}{t['s1']}{{{{ else }}}}{t['opening']}{{{{ end }}}}"
        + "{{ range .Messages }}"
        + f'{{{{ if eq .Role "user" }}}}{t["up"]}{{{{ .Content }}}}{t["us"]}'
        + assistant
        + "{{ end }}"
        + t["gen"]
    )


def stop_tokens(tokenizer: Any, turns: Turns) -> list[str]:
    """The special tokens that end an assistant turn, and the end-of-sequence token."""
    special = [str(t) for t in tokenizer.all_special_tokens] + [
        t.content for t in tokenizer.added_tokens_decoder.values() if t.special
    ]
    stops = [t for t in dict.fromkeys(special) if t and t in turns.assistant[1]]
    if tokenizer.eos_token and tokenizer.eos_token not in stops:
        stops.append(str(tokenizer.eos_token))
    return stops


def _quoted(text: str) -> str:
    if '"""' in text:
        raise TuneryError('the chat template contains """, which a Modelfile cannot quote')
    return f'"""{text}"""'


def modelfile(gguf_name: str, tokenizer: Any) -> str:
    def render(messages: list[dict[str, str]], prompt: bool) -> str:
        return str(tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=prompt))

    if not tokenizer.chat_template:
        raise TuneryError("the model's tokenizer has no chat template, so Ollama would not know its turns")
    turns = derive_turns(render)
    lines = [f"FROM ./{gguf_name}", f"TEMPLATE {_quoted(go_template(turns))}"]
    lines += [f'PARAMETER stop "{s}"' for s in stop_tokens(tokenizer, turns)]
    return "\n".join(lines) + "\n"
