"""Data screening of JSONL files: field paths in every data format, the three policies, the redacted copy,
the run directory's screening.json, and the `tunery data screen` / `data validate --screen-*` commands."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import chat_lines, write_jsonl
from tunery.cli import main
from tunery.errors import TuneryError
from tunery.safety.screen import (
    REPORT_NAME,
    block_message,
    check_policies,
    screen_file,
    screen_run_data,
    screened_paths,
    text_fields,
    validation_problems,
)

REPO = Path(__file__).resolve().parents[2]


def fake_score(texts: list[str]) -> list[float]:
    """A stand-in for the classifier: the word RUDE is offensive."""
    return [0.9 if "RUDE" in t else 0.1 for t in texts]


def chat(user: str, answer: str = "Happy to help.") -> dict:
    return {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]}


LINES = [
    chat("Where is my order?"),
    chat("Mail me at jane.doe@gmail.com please"),  # line 2: personal data
    chat("You are RUDE, a complete idiot"),  # line 3: offensive (to the real classifier too)
    chat("Write to support@northwind-bikes.example or call +1 (555) 010-4477"),  # line 4: placeholders only
    chat("My card is 4539 1488 0343 6467", "Thanks, I will never store it."),  # line 5: personal data
]


@pytest.fixture
def data(tmp_path: Path) -> Path:
    return write_jsonl(tmp_path / "train.jsonl", LINES)


def test_text_fields_name_every_string_in_every_format() -> None:
    dpo = {
        "input": {
            "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
        },
        "preferred_output": [{"role": "assistant", "content": "Hello!"}],
        "non_preferred_output": [{"role": "assistant", "content": "What."}],
    }
    assert list(text_fields(dpo)) == [
        ("input.messages[0].content", "Be brief."),
        ("input.messages[1].content", "Hi"),
        ("preferred_output[0].content", "Hello!"),
        ("non_preferred_output[0].content", "What."),
    ]
    pair = {"prompt": "Q", "chosen": "A", "rejected": "B", "margin": 1.0}
    assert list(text_fields(pair)) == [("prompt", "Q"), ("chosen", "A"), ("rejected", "B")]
    rating = {"prompt": [{"role": "user", "content": "Q"}], "completion": "A", "label": True}
    assert list(text_fields(rating)) == [("prompt[0].content", "Q"), ("completion", "A")]
    rft = {"messages": [{"role": "user", "content": "7 + 5?"}], "answer": "12", "meta": {"notes": ["n"]}}
    assert list(text_fields(rft)) == [
        ("messages[0].content", "7 + 5?"),
        ("answer", "12"),
        ("meta.notes[0]", "n"),
    ]
    parts = {"messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]}
    assert list(text_fields(parts)) == [("messages[0].content[0].text", "hi")]
    call = {"role": "assistant", "tool_calls": [{"id": "c1", "type": "function",
            "function": {"name": "lookup", "arguments": '{"email": "a@b.co"}'}}]}  # fmt: skip
    assert list(text_fields(call)) == [
        ("tool_calls[0].function.name", "lookup"),
        ("tool_calls[0].function.arguments", '{"email": "a@b.co"}'),
    ]
    assert list(text_fields("a bare string")) == [("(line)", "a bare string")]


def test_findings_per_line_and_field(data: Path) -> None:
    result = screen_file(data, "warn", "warn", score=fake_score)
    assert result.lines == 5 and result.action == "warned"
    real = [(f.line, f.field, f.category) for f in result.findings if not f.fictional]
    assert real == [
        (2, "messages[0].content", "email"),
        (3, "messages[0].content", "offensive"),
        (5, "messages[0].content", "payment_card"),
    ]
    fictional = [(f.line, f.category) for f in result.findings if f.fictional]
    assert fictional == [(4, "email"), (4, "phone")]
    snippets = {f.category: f.snippet for f in result.findings if not f.fictional}
    assert snippets["email"] == "Mail me at [EMAIL] please" and "4539" not in snippets["payment_card"]
    report = result.report()
    assert report["by_category"] == {"email": 1, "offensive": 1, "payment_card": 1}
    assert report["fictional_by_category"] == {"email": 1, "phone": 1}
    assert report["flagged_lines"] == 3 and report["redacted_path"] is None
    assert [e["line"] for e in report["examples"]] == [2, 3, 5, 4, 4]  # real findings first
    assert report["examples"][1]["score"] == 0.9 and report["examples"][3]["fictional"] is True


def test_block_names_the_file_lines_and_what_to_do(data: Path, tmp_path: Path) -> None:
    result = screen_file(data, "warn", "block", tmp_path / "out.jsonl", score=fake_score)
    assert result.action == "blocked" and not (tmp_path / "out.jsonl").exists()
    message = block_message(result)
    assert str(data) in message and "personal data (email) on line 2" in message
    assert "personal data (payment_card) on line 5" in message and "screen_pii=redact" in message
    assert "offensive" not in message  # content is only warned about
    content = screen_file(data, "block", "warn", score=fake_score)
    assert content.action == "blocked" and "offensive content" in block_message(content)
    assert "line 3" in block_message(content)


def test_placeholders_never_block(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "p.jsonl", [LINES[0], LINES[3], chat("test card 4111 1111 1111 1111")])
    result = screen_file(path, "block", "block", score=fake_score)
    assert result.action == "passed" and result.report()["fictional_by_category"]["payment_card"] == 1


def test_redact_writes_a_masked_copy_and_keeps_the_original(data: Path, tmp_path: Path) -> None:
    original = data.read_bytes()
    out = tmp_path / "copy" / "train.jsonl"
    result = screen_file(data, "redact", "redact", out, score=fake_score)
    assert result.action == "redacted" and result.redacted_path == str(out)
    assert data.read_bytes() == original
    lines = out.read_text().splitlines()
    assert len(lines) == 4 and result.dropped_lines == [3]  # the offensive line is dropped
    assert json.loads(lines[1])["messages"][0]["content"] == "Mail me at [EMAIL] please"
    assert json.loads(lines[3])["messages"][0]["content"] == "My card is [PAYMENT_CARD]"
    assert json.loads(lines[3])["messages"][1]["content"] == "Thanks, I will never store it."
    source = original.decode().splitlines()
    assert lines[0] == source[0] and lines[2] == source[3]  # untouched lines stay byte for byte
    assert not list(out.parent.glob(".*"))  # no temp file left behind
    # personal data only: offensive lines stay, and nothing is written when there is nothing to mask
    only = screen_file(data, "warn", "redact", tmp_path / "only.jsonl", score=fake_score)
    assert len((tmp_path / "only.jsonl").read_text().splitlines()) == 5 and only.dropped_lines == []
    clean = write_jsonl(tmp_path / "clean.jsonl", [LINES[0]])
    assert screen_file(clean, "redact", "redact", tmp_path / "c.jsonl", score=fake_score).action == "passed"
    assert not (tmp_path / "c.jsonl").exists()
    with pytest.raises(TuneryError, match="must not replace the original"):
        screen_file(data, "warn", "redact", data, score=fake_score)


def test_a_check_only_screen_writes_nothing(data: Path, tmp_path: Path) -> None:
    result = screen_file(data, "warn", "redact", tmp_path / "x.jsonl", score=fake_score, write=False)
    assert (
        result.action == "redacted" and result.redacted_path is None and not (tmp_path / "x.jsonl").exists()
    )


def test_unreadable_lines_are_counted_not_screened(tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(LINES[0]) + "\n{not json jane@gmail.com\n\n")
    result = screen_file(path, "warn", "block", score=fake_score)
    assert (result.lines, result.unreadable_lines, result.action) == (2, 1, "passed")


def test_the_real_classifier_scores_the_file(tmp_path: Path) -> None:
    path = write_jsonl(
        tmp_path / "t.jsonl", [chat("Thanks, that helped!"), chat("You are a complete idiot.")]
    )
    result = screen_file(path, "warn", "block")
    assert [(f.line, f.category) for f in result.findings] == [(2, "offensive")]
    assert result.findings[0].score is not None and result.findings[0].score > 0.9


def test_validation_problems(data: Path) -> None:
    problems = validation_problems(screen_file(data, "warn", "block", score=fake_score))
    assert [(p.line, p.key, p.severity) for p in problems] == [
        (2, "personal_data", "error"),
        (3, "offensive_content", "warning"),
        (5, "personal_data", "error"),
    ]
    assert problems[0].message == "personal data (email) on line 2"


def test_policies_are_checked() -> None:
    check_policies("warn", "redact")
    with pytest.raises(TuneryError, match="screen_pii must be warn, block or redact, got 'off'"):
        check_policies("warn", "off")
    with pytest.raises(TuneryError, match="content policy"):
        screen_file("x.jsonl", "strict", "block")


def test_screen_run_data_writes_the_report_and_returns_what_to_train_on(data: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    valid = write_jsonl(tmp_path / "valid.jsonl", chat_lines(3))
    paths = screen_run_data({"train": str(data), "valid": str(valid)}, "warn", "redact", run)
    assert paths == {"train": str(run / "screened" / "train.jsonl"), "valid": str(valid)}
    report = json.loads((run / REPORT_NAME).read_text())
    assert report["policy"] == {"content": "warn", "pii": "redact"}
    assert report["classifier"].startswith("alt-profanity-check")
    train = report["files"]["train"]
    assert (train["path"], train["lines"], train["action"]) == (str(data), 5, "redacted")
    assert train["redacted_path"] == paths["train"] and train["by_category"]["email"] == 1
    assert (
        report["files"]["valid"]["action"] == "passed" and report["files"]["valid"]["redacted_path"] is None
    )
    # a resumed run reads the same paths back, without screening again
    assert screened_paths(run, {"train": str(data), "valid": str(valid)}) == paths
    assert screened_paths(run, {"train": str(data), "valid": None}) == {"train": paths["train"]}
    Path(paths["train"]).unlink()
    with pytest.raises(TuneryError, match="redacted copy .* is missing"):
        screened_paths(run, {"train": str(data)})
    assert screened_paths(tmp_path / "old-run", {"train": str(data)}) == {"train": str(data)}


def test_screen_run_data_blocks_without_writing(data: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    with pytest.raises(TuneryError, match=r"(?s)train.jsonl is blocked.*\(email\) on line 2"):
        screen_run_data({"train": str(data), "valid": None}, "warn", "block", run)
    assert list(run.iterdir()) == []  # the run directory stays empty: a fixed rerun needs no --overwrite


def test_cli_data_screen(data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["data", "screen", str(data)]) == 1  # personal data blocks by default
    captured = capsys.readouterr()
    assert "blocked" in captured.out and "(email) on line 2" in captured.err
    assert "jane.doe" not in captured.out  # the report masks what it found
    out = tmp_path / "masked.jsonl"
    assert main(["data", "screen", str(data), "--pii", "redact", "--redacted-out", str(out), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    entry = report["files"][str(data)]
    assert entry["action"] == "redacted" and entry["redacted_path"] == str(out) and out.is_file()
    assert [f["line"] for f in entry["findings"] if not f.get("fictional")] == [2, 3, 5]
    assert main(["data", "screen", str(data), "--pii", "warn"]) == 0
    clean = write_jsonl(tmp_path / "clean.jsonl", chat_lines(3))
    assert (
        main(
            [
                "data",
                "screen",
                str(clean),
                str(data),
                "--pii",
                "redact",
                "--redacted-out",
                str(tmp_path / "d"),
            ]
        )
        == 0
    )
    assert (tmp_path / "d" / "train.jsonl").is_file() and not (tmp_path / "d" / "clean.jsonl").exists()


def test_cli_data_validate_with_screening(data: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["data", "validate", str(data), "--model", "none", "--min-examples", "1", "--json"]
    assert main(argv) == 0
    assert "screening" not in json.loads(capsys.readouterr().out)  # only on request
    assert main([*argv, "--screen-pii", "block"]) == 1
    report = json.loads(capsys.readouterr().out)
    assert report["ok"] is False and report["screening"]["action"] == "blocked"
    keys = [
        (p["line"], p["key"], p["severity"]) for p in report["problems"] if p["key"] != "unrecognized_key"
    ]
    # content defaults to warn
    assert keys == [
        (2, "personal_data", "error"),
        (3, "offensive_content", "warning"),
        (5, "personal_data", "error"),
    ]
    assert main([*argv, "--screen-pii", "warn"]) == 0
    assert {p["severity"] for p in json.loads(capsys.readouterr().out)["problems"]} == {"warning"}


def test_the_classifier_scores_the_same_in_its_worker_process(monkeypatch: pytest.MonkeyPatch) -> None:
    """A training run starts the classifier in a child process (its import overlaps the run's set-up);
    the scores are the ones this process computes, and a worker that dies falls back to this process."""
    import sys

    from tunery.safety import content

    monkeypatch.delitem(sys.modules, "profanity_check", raising=False)  # as in a fresh `tunery train`

    texts = ["Thank you, that helped!", "You are a complete idiot.", "naïve café \u2028 line"]
    texts.append("¿Dónde está mi pedido? Lo pedí hace dos semanas.")
    content.start_worker()
    try:
        assert content._worker is not None
        in_worker = content.offensive_probability(texts)
        languages_in_worker = content.other_languages(texts)
        assert content._worker is not None  # still serving: a run scores train and valid with it
        content._worker.kill()
        content._worker.wait()
        after_death = content.offensive_probability(texts)
        assert content._worker is None
    finally:
        content.stop_worker()
    assert in_worker == after_death == content.offensive_probability(texts)
    assert in_worker[1] > 0.5 > in_worker[0]
    assert languages_in_worker == content.other_languages(texts) == [None, None, None, "es"]


def test_other_languages_are_read_by_their_word_lists_not_the_english_classifier(tmp_path: Path) -> None:
    """The classifier was trained on English: a text clearly in another language gets no score from it, so
    neither its false alarms ("professionelle" reads as offensive) nor its silence count. It is checked
    against its language's word list instead, and where there is none the report says it was not scored."""
    from tunery.safety.content import other_languages

    german = "Was kostet die professionelle Montage bei Ihnen im Laden?"
    answer = "Die Montage kostet 25 Euro und dauert einen Tag."
    texts = [
        german,
        "Eres un idiota estúpido y te odio, vete al infierno.",
        "Je voudrais annuler ma commande, elle n'est pas encore partie.",
        "Meu pedido chegou danificado, o que eu faço agora?",
        "You are a complete idiot and I hate you.",  # English, abusive: scored as ever
        "Where is my order? It has been two weeks.",
        '{"order_id": "NW-39271", "date": "2027-03-18"}',  # no language: scored
        "Danke!",  # too short to tell
    ]
    assert other_languages(texts) == ["de", "es", "fr", "pt", None, None, None, None]
    # English abuse padded with Spanish is English enough to be scored: one of its sentences is
    pad = (
        "Hola, quería preguntar por mi pedido de la semana pasada. Todavía no ha llegado y no sé qué hacer. "
    )
    assert other_languages([pad + texts[4] + " " + pad, pad * 3]) == [None, "es"]
    spanish = "Lo siento mucho, lo revisamos ahora mismo y te escribimos."
    japanese = "注文した自転車がまだ届きません。いつ届きますか？追跡番号を教えてください。"
    path = tmp_path / "mixed.jsonl"
    write_jsonl(
        path,
        [
            chat(german, answer),
            chat("You are RUDE"),
            chat("Hallo", "Sie sind RUDE und das ist nicht gut so."),
            chat("Du bist ein verdammtes ARSCHLOCH und ich hasse dich, hörst du?", answer),
            chat("¿Cuándo vuelve el artículo? Llevo dos semanas esperando, hijo\nde   puta.", spanish),
            chat("El artículo llegó roto y el vehículo también, qué ridículo.", spanish),  # no "culo" here
            chat(japanese, "申し訳ありません。すぐに確認いたします。ご迷惑をおかけしております。"),
        ],
    )
    result = screen_file(path, "block", "warn", score=lambda ts: [0.99] * len(ts))
    # line 2 (English) and "Hallo" (too short to tell) by the classifier; lines 4 and 5 by their lists
    assert result.offensive_lines == {2, 3, 4, 5}
    words = {f.line: f.words for f in result.findings if f.category == "offensive"}
    assert words == {2: (), 3: (), 4: ("arschloch",), 5: ("hijo de puta",)}  # the longest entry, once
    assert result.word_list_lines == {"de": {1, 3, 4}, "es": {5, 6}}
    assert result.report()["scored_by_word_list"] == {"de": 3, "es": 2}
    assert result.unscored_lines == {"ja": {7}} and result.report()["not_scored_for_content"] == {"ja": 1}
    assert result.action == "blocked"
    assert "other languages: their word lists" in block_message(result)
    assert [p.key for p in validation_problems(result)] == ["offensive_content", "content_not_scored"]
    alone = tmp_path / "german.jsonl"
    write_jsonl(alone, [chat(german, answer)])
    assert screen_file(alone, "block", "warn", score=lambda ts: [0.99] * len(ts)).action == "passed"


# Messages a shop's support line gets, written for this test: abuse with a word the lists hold (caught),
# abuse phrased without one (missed: a word list finds only its words), and shop talk near the lists' entries.
ABUSE_LISTED = {
    "es": [
        "Sois unos ladrones de mierda, devolvedme el dinero ya.",
        "El repartidor es un gilipollas, me tiró la caja al suelo.",
        "Eres un imbécil, ¿no sabes leer lo que te escribo?",
        "Vete a la mierda con tu encuesta de satisfacción.",
    ],
    "fr": [
        "Vous êtes des connards, remboursez-moi tout de suite.",
        "Putain, ça fait trois semaines que j'attends ce vélo !",
        "Le livreur est un vrai con, il a jeté mon colis par-dessus la grille.",
        "Allez vous faire foutre avec votre service client.",
        "Ta gueule, je veux parler à un humain et pas à un robot.",
    ],
    "de": [
        "Was für eine Scheiße, das Fahrrad ist schon wieder kaputt.",
        "Der Fahrer ist ein Wichser, er hat das Paket über den Zaun geworfen.",
    ],
    "pt": [
        "Vocês são uns filhos da puta, quero meu dinheiro de volta.",
        "Que merda de serviço, a bicicleta chegou quebrada.",
        "Vai se foder com essa pesquisa de satisfação.",
        "Caralho, já são três semanas esperando essa bicicleta!",
    ],
    "it": [
        "Siete dei ladri del cazzo, ridatemi i soldi.",
        "Il corriere è uno stronzo, mi ha lanciato il pacco oltre il cancello.",
        "Vaffanculo voi e il vostro servizio clienti.",
        "Sei un coglione, non capisci niente di quello che scrivo.",
        "Porca puttana, sono tre settimane che aspetto questa bici!",
    ],
}
ABUSE_UNLISTED = [
    "Qué empresa de pacotilla, sois todos unos inútiles y unos incompetentes.",
    "Bande d'incapables, vous ne savez rien faire correctement.",
    "Ihr seid doch alle Arschlöcher, gebt mir mein Geld zurück!",  # the list has the singular only
    "Ihr unfähigen Idioten bekommt nicht mal eine Lieferung hin.",
    "O entregador é um babaca, jogou a caixa no chão.",
    "Che schifo di azienda, siete tutti degli incapaci.",
]
SHOP_TALK = {
    "es": [
        "El artículo llegó roto y el vehículo de reparto también.",
        "¿Pueden montar los pedales en el taller? Me parece ridículo pagar otro envío.",
        "Necesito un martillo de goma para ajustar el sillín.",
    ],
    "fr": [
        "Les pédales grincent depuis hier, pouvez-vous les changer ?",
        "La selle est trop dure, puis-je l'échanger contre une autre ?",
        "Ma femme est veuve depuis peu et voudrait revendre le vélo de son mari.",
    ],
    "de": [
        "Was kostet die professionelle Montage bei Ihnen im Laden?",
        "Die Kette ist nach zwei Wochen gerissen, können Sie sie tauschen?",
    ],
    "pt": [
        "Meu pedido chegou danificado, o que eu faço agora?",
        "Vocês mandam um saco de peças sobressalentes junto com a bicicleta?",
        "A torneira do bebedouro da loja está pingando, só avisando.",
    ],
    "it": [
        "La pompa non si attacca alla valvola, cosa devo fare?",
        "Potete montare i parafanghi prima della spedizione?",
        "Il guanto sinistro della taglia M è arrivato scucito.",
    ],
}


def test_word_lists_catch_listed_abuse_and_leave_shop_talk() -> None:
    from tunery.safety.content import offensive_words, other_languages

    for language, texts in ABUSE_LISTED.items():
        assert other_languages(texts) == [language] * len(texts)
        assert all(offensive_words(t, language) for t in texts), language
    for language, texts in SHOP_TALK.items():
        assert other_languages(texts) == [language] * len(texts)
        assert [offensive_words(t, language) for t in texts] == [[]] * len(texts), language
    languages = other_languages(ABUSE_UNLISTED)
    missed = [
        t for t, lang in zip(ABUSE_UNLISTED, languages, strict=True) if not offensive_words(t, str(lang))
    ]
    print(f"abuse without a listed word, missed: {len(missed)} of {len(ABUSE_UNLISTED)}")
    # a language without a reviewed list gets None: not scored, not passed as clean
    assert offensive_words("Jullie zijn een stelletje idioten.", "nl") is None


def test_the_multilingual_example_is_read_and_passes() -> None:
    """examples/support-multilingual: its German, Spanish, French and Portuguese lines are read by their word
    lists, and none is flagged (the English classifier flagged 10 of them, all ordinary words)."""
    result = screen_file(REPO / "examples/support-multilingual/train.jsonl", "block", "warn", write=False)
    assert result.offensive_lines == {160}  # "nein, nur die Delle": too short to tell, the classifier's
    assert {k: len(v) for k, v in result.word_list_lines.items()} == {"de": 40, "es": 40, "fr": 39, "pt": 40}


def test_the_words_left_out_are_in_the_lists_they_are_left_out_of() -> None:
    """ORDINARY_WORDS was read against glin-profanity 4.1.0's lists: a version whose lists drop or respell
    an entry would make its exclusion a silent no-op (and may add unread entries), so this fails first."""
    from importlib.resources import files

    from tunery.safety.content import ORDINARY_WORDS, WORD_LIST_FILES, _fold

    for language, name in WORD_LIST_FILES.items():
        data = files("glin_profanity") / "data" / "dictionaries" / f"{name}.json"
        listed = {_fold(w).strip() for w in json.loads(data.read_text(encoding="utf-8"))["words"]}
        assert {_fold(w) for w in ORDINARY_WORDS[language]} <= listed, language
        assert len(listed) == {"de": 65, "es": 68, "fr": 95, "it": 180, "pt": 74}[language], language


def test_plurals_and_words_with_an_everyday_meaning() -> None:
    from tunery.safety.content import offensive_words

    assert offensive_words("Siete degli stronzi e delle puttane.", "it") == ["puttane", "stronzi"]
    assert offensive_words("Vous êtes des connards.", "fr") == ["connards"]
    assert offensive_words("Ferme ta gueule !", "fr") == ["ta gueule"]
    everyday = {
        "es": "No quiero que se me pinche la rueda otra vez en la bajada.",
        "fr": "Ce vélo a de la gueule, mais la descente est casse-gueule et ma chatte a griffé la selle.",
        "it": "Mi serve una sega per tagliare il cannotto, e il ditalino della signora Mona.",
        "pt": "Preciso da troca dum raio da roda traseira e de um corno para a bicicleta.",
        "de": "Die Schiesser Unterhemden und zwei Möpse im Laden.",
    }
    for language, text in everyday.items():
        assert offensive_words(text, language) == [], language
