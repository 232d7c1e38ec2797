"""Offensive-content scores from alt-profanity-check's offline classifier (a linear model on word and
character n-grams, 0.9 MB, shipped in the wheel: no model hub, no network).

It scores one thing, how likely a text is offensive or abusive (profanity, insults, hate). It does not
understand self-harm, violence, illegal instructions or sexual content as topics; callers that report
categories must say so rather than imply coverage it does not have.

It was trained on English. On other languages its scores are noise both ways ("Was kostet die professionelle
Montage?" 0.95, a Spanish string of insults 0.03), so `other_languages` names the texts that are clearly in
another language (py3langid's offline model, shipped in its wheel). Such a text is checked against the
word list of its language instead (`offensive_words`: glin-profanity's lists of insults, slurs and
obscenities, shipped as data in its wheel, less the ordinary words among them), for German, Spanish,
French, Italian and Portuguese; in any other language it is reported as not scored rather than trusted to
a score. A word list finds the words it lists (and their plurals), and nothing phrased without them.

>>> scores = offensive_probability(["Thank you, that helped!", "You are a complete idiot."])
>>> scores[0] < 0.1 < 0.9 < scores[1]
True
"""

from __future__ import annotations

import contextlib
import functools
import json
import re
import subprocess
import sys
import unicodedata
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

# alt-profanity-check's own decision rule is p >= 0.5; screening uses it as the default.
OFFENSIVE_THRESHOLD = 0.5
CLASSIFIER = "alt-profanity-check 1.9 (offline linear classifier)"
LANGUAGE_ID = "py3langid 0.4 (offline)"
# A text counts as in another language when it is this long and P(English) is below this: measured on
# Tunery's English example data and red-team prompts (2,915 strings), no English text of 20 characters or
# more was under 0.01 but JSON (py3langid's "zxx", no language, which stays scored); 455 of the 596
# strings of examples/support-multilingual were.
MIN_LANGUAGE_CHARS, MAX_ENGLISH_PROBABILITY = 20, 0.01
WORD_LISTS = (
    "glin-profanity 4.1 word lists (offline data), less the ordinary words tunery.safety.content names"
)
# py3langid's code -> glin-profanity's list, for the languages whose lists were read entry by entry for
# Tunery (ORDINARY_WORDS, checked against glin-profanity 4.1.0: the pin in pyproject.toml); its other lists
# are not used unread, so those languages stay not scored.
WORD_LIST_FILES = {"de": "german", "es": "spanish", "fr": "french", "it": "italian", "pt": "portuguese"}
# Entries of those lists that are ordinary words as well, clinical or identity terms, childish words or
# mild exclamations, not only insults, slurs or obscenities: a shop's customers and its assistant write
# them ("pompa": a pump, "montare": to assemble, "pédale": a pedal, "se me pinche la rueda": a flat tyre,
# "casse-gueule": dangerous, "sega": a saw, "dum raio": of a spoke, "Schiesser": a brand). Left out, at the
# cost of their offensive sense ("bicha", "veado" and "pédale" are also slurs); a test checks each is in
# its list, so a new list version cannot make one of them a silent no-op.
ORDINARY_WORDS = {
    "de": {"bonze", "fratze", "kimme", "lümmel", "möpse", "mufti", "nackt", "nippel", "onanieren",
           "orgasmus", "pinkeln", "popel", "porno", "rosette", "schiesser", "wichsen"},
    "es": {"asesinato", "asno", "caca", "chupada", "chupetón", "concha", "drogas", "esperma",
           "haciendo el amor", "heroína", "infierno", "maciza", "maldito", "martillo", "nazi", "orina",
           "pervertido", "pezón", "pinche", "pis", "prostituta", "racista", "sádico", "semen", "sexo",
           "sexo oral", "travesti", "trio", "vulva"},
    "fr": {"baiser", "bander", "bordel", "bosser", "bourré", "bourrée", "branler", "caca", "cailler",
           "chatte", "clitoris", "déconne", "déconner", "drague", "folle", "gerbe", "gerber", "gueule",
           "jouir", "ménage à trois", "meuf", "pédale", "péter", "pipi", "ramoner", "tanche", "tapette",
           "teuf", "trique", "veuve"},
    "it": {"anale", "bagnarsi", "balle", "battere", "biga", "brinca", "buona donna", "cacca", "cadavere",
           "cagna", "cammello", "cappella", "carciofo", "carità", "cozza", "ditalino", "duro", "fava",
           "finocchio", "goldone", "grilletto", "guanto", "ingoio", "lumaca", "mannaggia", "manico", "mona",
           "monta", "montare", "nave scuola", "nudo", "palle", "patacca", "pesce", "pipa", "pipì", "pisello",
           "pistola", "pistolotto", "pompa", "porca", "porca miseria", "quaglia", "regina", "sbattere",
           "sbattersi", "sega", "spagnola", "tirare", "topa", "uccello", "vacca", "vangare", "venire"},
    "pt": {"aborto", "amador", "ânus", "aranha", "ariano", "bicha", "biscate", "bissexual", "boob",
           "bumbum", "burro", "cacete", "camisinha", "cerveja", "chupar", "clitoris", "cocaína", "comer",
           "consolo", "corno", "dum raio", "fecal", "frango assado", "gozar", "grelho", "heroína",
           "heterosexual", "homem gay", "homoerótico", "homosexual", "inferno", "lésbica", "lolita",
           "mama", "passar um cheque", "pau", "pênis", "pinto", "saco", "torneira", "transar", "veado",
           "vibrador"},
}  # fmt: skip
# phrases that stay offensive where a word of theirs, alone, was left out above
ADDED_WORDS = {"fr": {"ta gueule"}}
# a plural ending a listed word may take, where a plural is the singular plus an ending ("connards");
# Italian changes the last vowel instead (ITALIAN_PLURALS: "stronzo" -> "stronzi", "puttana" -> "puttane")
PLURAL_ENDINGS = {"es": "(?:e?s)?", "fr": "[sx]?", "pt": "s?", "de": "(?:e|en|n|s)?"}
ITALIAN_PLURALS = {"o": "[oi]", "a": "[ae]", "e": "[ei]"}


@functools.cache
def _identifier() -> Any:
    from py3langid.langid import MODEL_FILE, LanguageIdentifier  # its model unpacks in ~1 s

    return LanguageIdentifier.from_model_file(MODEL_FILE, norm_probs=True)


def _languages(texts: Sequence[str]) -> list[str | None]:
    return [_language(text) for text in texts]


# sentences, split after their end; a text in another language with one English sentence stays scored
_SENTENCE_END = re.compile(r"(?<=[.!?。！？\n])\s+")


def _language(text: str) -> str | None:
    """The language `text` is clearly in when that is not English, checked on the whole text and on each
    of its sentences long enough to tell: English abuse padded with another language's text stays
    scored."""
    language = _foreign(text)
    if language is None:
        return None
    sentences = [s for s in _SENTENCE_END.split(text) if len(s.strip()) >= MIN_LANGUAGE_CHARS]
    if len(sentences) > 1 and any(_foreign(s) is None for s in sentences):
        return None
    return language


def _foreign(text: str) -> str | None:
    if len(text.strip()) < MIN_LANGUAGE_CHARS:
        return None
    ranked = _identifier().rank(text)
    top, english = ranked[0][0], dict(ranked).get("en", 0.0)
    return str(top) if top not in ("en", "zxx") and english < MAX_ENGLISH_PROBABILITY else None


def _fold(text: str) -> str:
    return unicodedata.normalize("NFC", text).casefold()


@functools.cache
def _word_pattern(language: str) -> re.Pattern[str] | None:
    """The language's list as one pattern: each entry whole (no letter or digit on either side, so
    "artículo" does not hold "culo"), case folded, a phrase's spaces matching any white space."""
    name = WORD_LIST_FILES.get(language)
    if name is None:
        return None
    from importlib.resources import files

    data = files("glin_profanity") / "data" / "dictionaries" / f"{name}.json"
    words = {_fold(w).strip() for w in json.loads(data.read_text(encoding="utf-8"))["words"]}
    words -= {_fold(w) for w in ORDINARY_WORDS.get(language, ())}
    words |= ADDED_WORDS.get(language, set())
    entries = sorted((w for w in words if w), key=len, reverse=True)  # the longest entry first
    alternatives = "|".join(_entry_pattern(w, language) for w in entries)
    plural = PLURAL_ENDINGS.get(language, "")  # the lists hold singulars: "connards" is "connard"'s plural
    return re.compile(rf"(?<!\w)(?:{alternatives}){plural}(?!\w)")


def _entry_pattern(entry: str, language: str) -> str:
    pattern = r"\s+".join(map(re.escape, entry.split()))
    if language == "it" and entry[-1] in ITALIAN_PLURALS:
        pattern = pattern[:-1] + ITALIAN_PLURALS[entry[-1]]
    return pattern


def offensive_words(text: str, language: str) -> list[str] | None:
    """The words of `language`'s list that `text` holds, as they stand in it (case folded, plurals kept;
    sorted), or None when there is no list for that language (an ISO 639-1 code as `other_languages` gives
    it).

    >>> offensive_words("Eres un idiota y te odio.", "es"), offensive_words("El artículo llegó.", "es")
    (['idiota'], [])
    """
    pattern = _word_pattern(language)
    if pattern is None:
        return None
    return sorted({re.sub(r"\s+", " ", m.group(0)) for m in pattern.finditer(_fold(text))})


@dataclass(frozen=True)
class Verdict:
    """What the screen can say of one text. `language` is None for English (or too short to tell, or no
    language): the classifier's probability is `score`. For another language with a word list, `score`
    is 1.0 when it holds a listed word (`words`), else 0.0; without a list, None: not scored."""

    language: str | None
    score: float | None
    words: tuple[str, ...] = ()

    @property
    def flagged(self) -> bool:
        return self.score is not None and self.score >= OFFENSIVE_THRESHOLD


def verdict(text: str, score: float, language: str | None) -> Verdict:
    """The verdict on `text` from its classifier score and its language (`other_languages`)."""
    if language is None:
        return Verdict(None, score)
    words = offensive_words(text, language)
    if words is None:
        return Verdict(language, None)
    return Verdict(language, 1.0 if words else 0.0, tuple(words))


def judge(texts: Sequence[str]) -> list[Verdict]:
    """A verdict for each text, in order: English by the classifier, other languages by their word lists.

    >>> [(v.language, v.flagged, v.words) for v in judge(["Vete a la mierda, imbécil de tienda."])]
    [('es', True, ('imbécil', 'vete a la mierda'))]
    """
    scores, languages = offensive_probability(texts), other_languages(texts)
    return [verdict(t, s, lang) for t, s, lang in zip(texts, scores, languages, strict=True)]


@functools.cache
def _predict_prob() -> Callable[[Sequence[str]], Any]:
    from profanity_check import predict_prob  # sklearn import, ~1.5 s: only when first needed

    return predict_prob  # type: ignore[no-any-return]


_worker: subprocess.Popen[bytes] | None = None


def start_worker() -> None:
    """Load the classifier in a child process now, so that its import (sklearn and scipy, ~1 s) runs on
    another core while the caller sets up (a training run imports torch and loads its model meanwhile).
    `offensive_probability` then scores there. If the child cannot start or fails, scoring falls back to
    this process: the scores are the same either way."""
    global _worker
    if _worker is None and "profanity_check" not in sys.modules:
        try:
            _worker = subprocess.Popen(
                [sys.executable, "-m", "tunery.safety.content"],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL,
            )
        except OSError:  # e.g. a sandbox that allows no new process
            _worker = None


def stop_worker() -> None:
    """End the child, if one was started. It holds nothing to save, so it is killed rather than left to
    its interpreter's shutdown (~0.2 s the caller would wait for)."""
    global _worker
    worker, _worker = _worker, None
    if worker is not None:
        worker.kill()
        worker.wait()
        for stream in (worker.stdin, worker.stdout):
            if stream is not None:
                with contextlib.suppress(OSError):  # a dead child's pipe: what was left unsent stays unsent
                    stream.close()


def _ask_worker(question: str, texts: list[str]) -> list[Any] | None:
    worker = _worker
    if worker is None or worker.stdin is None or worker.stdout is None:
        return None
    try:
        worker.stdin.write(json.dumps({"question": question, "texts": texts}).encode() + b"\n")
        worker.stdin.flush()
        answers = json.loads(worker.stdout.readline())
    except (OSError, ValueError):
        answers = None
    if not isinstance(answers, list) or len(answers) != len(texts):
        stop_worker()
        return None
    return answers


def offensive_probability(texts: Sequence[str]) -> list[float]:
    """P(offensive) for each text, in order. Batched: ~70k short texts per second on 2 cores."""
    if not texts:
        return []
    scores = _ask_worker("scores", list(texts))
    return [float(p) for p in (scores if scores is not None else _predict_prob()(list(texts)))]


def other_languages(texts: Sequence[str]) -> list[str | None]:
    """For each text, the language it is clearly written in when that is not English (an ISO 639-1 code,
    e.g. "de"), else None: English, too short to tell (under MIN_LANGUAGE_CHARS), or no language (JSON).

    >>> other_languages(["Was kostet die professionelle Montage bei Ihnen?", "Where is my order?", "ok"])
    ['de', None, None]
    """
    if not texts:
        return []
    languages = _ask_worker("languages", list(texts))
    return languages if languages is not None else _languages(texts)


def _serve() -> None:
    """The child of `start_worker`: one JSON object {"question": "scores" | "languages", "texts": [...]} per
    line in, one JSON list of answers out."""
    predict, _ = _predict_prob(), _identifier()
    for line in sys.stdin.buffer:
        request = json.loads(line)
        texts = request["texts"]
        if request["question"] == "languages":
            answers: list[Any] = _languages(texts)
        else:
            answers = [float(p) for p in predict(texts)]
        sys.stdout.write(json.dumps(answers) + "\n")
        sys.stdout.flush()


if __name__ == "__main__":
    _serve()
