"""Data in a format Tunery does not read (CSV, TSV, JSON arrays, ShareGPT, Alpaca, legacy prompt/completion,
plain text): one error naming the file, the line and the convert command; `tunery data convert` writes
chat JSONL that validates; the service says the same on upload and in a job's error."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from tests.conftest import TOPICS, chat_lines, pair_lines, thumbs_lines, write_jsonl
from tunery.cli import main
from tunery.data.convert import SOURCES, convert_data
from tunery.data.feedback import detect_file_kind, detect_kind, load_feedback_data, validate_feedback_file
from tunery.data.formats import sniff_format
from tunery.data.prompts import validate_prompt_file
from tunery.data.validate import load_chat_data, validate_chat_file
from tunery.errors import TuneryError

QA = [(f"{q} (#{i})", a) for i, (q, a) in enumerate(TOPICS * 2)]  # 16 distinct questions


def write_table(path: Path, rows: list[list[str]], delimiter: str = ",") -> Path:
    with path.open("w", newline="") as fh:
        csv.writer(fh, delimiter=delimiter).writerows(rows)
    return path


def legacy(path: Path) -> Path:
    """OpenAI's legacy format, with its separator and stop word; a blank first line."""
    lines = [json.dumps({"prompt": q + "\n\n###\n\n", "completion": f" {a} END"}) for q, a in QA]
    path.write_text("\n" + "\n".join(lines) + "\n")
    return path


def sharegpt(path: Path) -> Path:
    turns = [
        [{"from": "system", "value": "Be brief."}, {"from": "human", "value": q}, {"from": "gpt", "value": a}]
        for q, a in QA
    ]
    return write_jsonl(path, [{"conversations": t} for t in turns])


def alpaca(path: Path) -> Path:
    rows = [{"instruction": "Answer the customer.", "input": q, "output": a} for q, a in QA]
    return write_jsonl(path, rows)


def json_array(path: Path) -> Path:
    path.write_text(json.dumps([{"question": q, "answer": a} for q, a in QA], indent=2))
    return path


def csv_file(path: Path) -> Path:
    return write_table(path, [["question", "answer"], *QA])


def tsv_file(path: Path) -> Path:
    return write_table(path, [["prompt", "response"], *QA], "\t")


def text_file(path: Path) -> Path:
    path.write_text("Where is my order?\nYou can track it from the link in your email.\n")
    return path


# (writer, file name, line shown, what the message says it looks like, whether a convert command is given)
FOREIGN = [
    (legacy, "legacy.jsonl", 2, "OpenAI's legacy prompt/completion format", True),
    (csv_file, "qa.csv", 1, "a CSV file with columns question, answer", True),
    (tsv_file, "qa.tsv", 1, "a TSV (tab-separated) file with columns prompt, response", True),
    (json_array, "qa.json", 1, "a whole-file JSON array of objects with keys question, answer", True),
    (sharegpt, "share.jsonl", 1, "ShareGPT format", True),
    (alpaca, "alpaca.jsonl", 1, "Alpaca format (keys instruction, input, output)", True),
    (text_file, "notes.txt", 1, "plain text, not JSON ('Where is my order?')", False),
]
CONVERTED = {"legacy.jsonl": "legacy.chat.jsonl", "share.jsonl": "share.chat.jsonl"}
CONVERTED |= {"alpaca.jsonl": "alpaca.chat.jsonl", "qa.csv": "qa.jsonl", "qa.tsv": "qa.jsonl"}
CONVERTED |= {"qa.json": "qa.jsonl"}


# --- detection ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("write", "name", "line", "looks", "convertible"), FOREIGN)
def test_a_foreign_format_is_one_error_naming_file_line_and_command(
    tmp_path: Path, write, name: str, line: int, looks: str, convertible: bool
) -> None:
    path = write(tmp_path / name)
    report = validate_chat_file(path)
    assert [(p.line, p.key) for p in report.problems] == [(line, "foreign_format")]
    message = report.problems[0].message
    assert message.startswith(f"this looks like {looks}") and '{"messages": [' in message
    command = f"tunery data convert {path} {tmp_path / CONVERTED.get(name, 'x')}"
    assert (f"Convert it: {command}" in message) is convertible
    with pytest.raises(TuneryError) as exc:  # what `tunery train sft` prints
        load_chat_data(path, None, 1024)  # type: ignore[arg-type]  # the check comes before tokenizing
    assert str(exc.value) == f"{path}, line {line}: {message}"


@pytest.mark.parametrize(("write", "name", "line", "looks", "convertible"), FOREIGN)
def test_every_reader_reports_the_format_for_its_method(
    tmp_path: Path, write, name: str, line: int, looks: str, convertible: bool
) -> None:
    path = write(tmp_path / name)
    for expect, wanted in (("preference", '"preferred_output"'), ("unpaired", '"label": true|false')):
        with pytest.raises(TuneryError) as exc:  # DPO, reward model; KTO
            load_feedback_data(path, None, None, expect)  # type: ignore[arg-type, call-arg]
        assert str(exc.value).startswith(f"{path}, line {line}: this looks like {looks}")
        assert wanted in str(exc.value) and "tunery data convert" not in str(exc.value)
    prompts = validate_prompt_file(path, None, None)  # type: ignore[arg-type]  # GRPO, PPO
    assert [(p.line, p.key) for p in prompts.errors] == [(line, "foreign_format")]
    assert "Reinforcement fine-tuning reads prompts" in prompts.errors[0].message


def test_validate_names_the_file_line_and_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = csv_file(tmp_path / "qa.csv")
    assert main(["data", "validate", str(path), "--model", "none"]) == 1
    out = capsys.readouterr().out
    assert out.startswith(f"{path}: 0 valid examples, 1 errors")
    assert "line 1: [foreign_format] this looks like a CSV file with columns question, answer." in out
    assert f"Convert it: tunery data convert {path} {tmp_path / 'qa.jsonl'}\n" in out
    assert "invalid JSON" not in out
    assert main(["data", "validate", str(path), "--model", "none", "--json"]) == 1
    report = json.loads(capsys.readouterr().out)
    assert report["format"] == "csv" and [p["key"] for p in report["problems"]] == ["foreign_format"]


def test_a_table_whose_columns_do_not_say_asks_for_columns(tmp_path: Path) -> None:
    path = write_table(tmp_path / "d.csv", [["id", "text", "label"], ["1", "hi", "greeting"]])
    message = validate_chat_file(path).problems[0].message
    assert "a CSV file with columns id, text, label" in message
    assert message.endswith(f"naming the columns: tunery data convert {path} {tmp_path / 'd.jsonl'} "
                            "--columns user=COL,assistant=COL")  # fmt: skip


def test_legacy_prompt_completion_is_not_kto_feedback(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = legacy(tmp_path / "legacy.jsonl")
    assert detect_kind({"prompt": "q", "completion": "a"}) == "prompt-completion"
    assert detect_file_kind(path) == "prompt-completion"
    for expect in (None, "unpaired"):
        report = validate_feedback_file(path, expect=expect)  # type: ignore[arg-type]
        assert [p.key for p in report.problems] == ["foreign_format"]
        assert "legacy prompt/completion" in report.problems[0].message
        assert (
            'add "label": true (thumbs up) or false (thumbs down) to every line'
            in report.problems[0].message.lower()
        )
    assert main(["data", "validate", str(path), "--model", "none", "--json"]) == 1
    report = json.loads(capsys.readouterr().out)
    assert report["format"] == "prompt-completion"
    assert "'label' must be" not in json.dumps(report) and "unpaired" not in json.dumps(report)


def test_openai_formats_are_detected_as_before(tmp_path: Path) -> None:
    files = {
        "chat": write_jsonl(tmp_path / "c.jsonl", chat_lines(12)),
        "preference": write_jsonl(tmp_path / "p.jsonl", pair_lines(12)),
        "pairs": write_jsonl(tmp_path / "t.jsonl", pair_lines(12, openai_format=False)),
        "unpaired": write_jsonl(tmp_path / "u.jsonl", thumbs_lines(12)),
    }
    for kind, path in files.items():
        assert sniff_format(path) is None
        assert detect_file_kind(path) == ("preference" if kind == "pairs" else kind)
    # a ratings file whose first line lost its label is still ratings, with that line's error as before
    lines = thumbs_lines(12)
    del lines[0]["label"]
    path = write_jsonl(tmp_path / "lost.jsonl", lines)
    assert detect_file_kind(path) == "unpaired"
    problems = validate_feedback_file(path).problems
    assert [(p.line, p.key) for p in problems] == [(1, "invalid_label")]
    assert "'label' must be true (thumbs up) or false (thumbs down), got None" in problems[0].message


def test_broken_jsonl_keeps_its_line_errors(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", chat_lines(11) + ['{"messages": [}', "{'messages': []}"])
    assert sniff_format(path) is None
    keys = [(p.line, p.key) for p in validate_chat_file(path).problems]
    assert keys == [(12, "invalid_json"), (13, "invalid_json")]


# --- conversion -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(("write", "name"), [(w, n) for w, n, *_ in FOREIGN if n != "notes.txt"])
def test_each_conversion_validates(tmp_path: Path, write, name: str) -> None:
    out = tmp_path / "out.jsonl"
    conversion = convert_data(write(tmp_path / name), out)
    assert len(conversion.rows) == len(QA) and not conversion.skipped
    report = validate_chat_file(out)
    assert report.errors == [] and len(report.examples) == len(QA)
    first = [(m["role"], m["content"]) for m in report.examples[0].messages]
    question, answer = QA[0]
    if name == "share.jsonl":
        assert first == [("system", "Be brief."), ("user", question), ("assistant", answer)]
    elif name == "alpaca.jsonl":
        assert first == [("user", f"Answer the customer.\n\n{question}"), ("assistant", answer)]
    elif name == "legacy.jsonl":  # trailing whitespace only: the separator and stop word are the user's call
        assert first == [("user", f"{question}\n\n###"), ("assistant", f" {answer} END")]
        assert any("every completion ends with ' END'" in n for n in conversion.notes)
        assert any("every prompt ends with '\\n\\n###'" in n for n in conversion.notes)
    else:
        assert first == [("user", question), ("assistant", answer)]


def test_converted_files_pass_validate_with_the_tiny_model(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    for write, name, *_ in FOREIGN[:-1]:
        out = tmp_path / f"{name}.out.jsonl"
        assert main(["data", "convert", str(write(tmp_path / name)), str(out)]) == 0
        assert main(["data", "validate", str(out), "--model", "tiny-random"]) == 0, capsys.readouterr().out
        assert f"{out}: {len(QA)} valid examples, 0 errors" in capsys.readouterr().out


def test_convert_reports_skipped_lines_and_why(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rows = [["question", "answer", "id"], *[[q, a, str(i)] for i, (q, a) in enumerate(QA[:11])]]
    rows[3][1] = ""  # line 4: no answer
    rows.insert(5, ["two\nlines", "an answer"])  # lines 6-7: one field short
    path = write_table(tmp_path / "qa.csv", rows)
    out = tmp_path / "qa.jsonl"
    assert main(["data", "convert", str(path), str(out), "--system", "Be brief."]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert (
        printed[0] == f"converted 10 of 12 examples in {path} (csv, user=question, assistant=answer) to {out}"
    )
    assert printed[1:4] == [
        "  skipped line 4: 'answer' is missing or empty (the assistant turn)",
        "  skipped line 6: has 2 fields; the header has 3",
        "  note: not converted: id",
    ]
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(lines) == 10 and all(
        line["messages"][0] == {"role": "system", "content": "Be brief."} for line in lines
    )
    assert lines[3]["messages"][1]["content"] == QA[4][0]  # the row after the two-line record


def test_a_json_array_skips_items_by_the_line_they_start_on(tmp_path: Path) -> None:
    items = [{"prompt": q, "completion": a} for q, a in QA[:11]]
    items[2] = {"prompt": "no answer"}
    path = tmp_path / "a.json"
    path.write_text(json.dumps(items, indent=2))  # "[" on line 1, then four lines an item: 2-5, 6-9, 10-
    conversion = convert_data(path, tmp_path / "a.jsonl")
    assert conversion.skipped == [(10, "'completion' is missing or empty")]
    assert len(conversion.rows) == 10


def test_a_json_array_of_openai_lines_is_written_one_per_line(tmp_path: Path) -> None:
    path = tmp_path / "pairs.json"
    path.write_text(json.dumps(pair_lines(12), indent=2))
    message = sniff_format(path).message("preference")  # type: ignore[union-attr]
    assert message.endswith(f"Convert it: tunery data convert {path} {tmp_path / 'pairs.jsonl'}")
    convert_data(path, tmp_path / "pairs.jsonl")
    report = validate_feedback_file(tmp_path / "pairs.jsonl", expect="preference")
    assert report.errors == [] and len(report.examples) == 12


def test_flat_jsonl_objects_convert_by_their_keys(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "qa.jsonl", [{"ask": q, "say": a, "topic": "shop"} for q, a in QA])
    assert sniff_format(path) is None  # not a format of its own: validation reports the missing messages
    with pytest.raises(
        TuneryError, match=r"line 1: cannot tell .* \(keys: ask, say, topic\); name them: --columns"
    ):
        convert_data(path, tmp_path / "out.jsonl")
    conversion = convert_data(
        path, tmp_path / "out.jsonl", columns={"user": ["ask", "topic"], "assistant": ["say"]}
    )
    assert conversion.source == "jsonl" and conversion.mapping == "user=ask+topic, assistant=say"
    assert conversion.rows[0]["messages"][0] == {"role": "user", "content": f"{QA[0][0]}\n\nshop"}
    assert validate_chat_file(tmp_path / "out.jsonl").errors == []


def test_the_cli_offers_every_source(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["data", "convert", "--help"])
    assert "--from {" + ",".join(SOURCES) + "}" in capsys.readouterr().out


def test_convert_refuses_what_it_cannot_do_safely(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    def refused(*argv: str) -> str:
        assert main(["data", "convert", *argv]) == 2
        return capsys.readouterr().err.strip()

    table = write_table(
        tmp_path / "d.csv", [["id", "text", "label"], *[[str(i), q, a] for i, (q, a) in enumerate(QA)]]
    )
    out = tmp_path / "d.jsonl"
    message = refused(str(table), str(out))
    assert "(columns: id, text, label); name them: --columns user=COL,assistant=COL" in message
    assert not out.exists()
    assert "no column 'reply'" in refused(str(table), str(out), "--columns", "user=text,assistant=reply")
    assert "write it as user=COL,assistant=COL" in refused(str(table), str(out), "--columns", "text,label")
    assert main(["data", "convert", str(table), str(out), "--columns", "user=text,assistant=label"]) == 0
    capsys.readouterr()
    before = out.read_text()
    assert refused(str(table), str(out), "--columns", "user=text,assistant=label") == (
        f"tunery: error: {out} exists; pass --overwrite to replace it"
    )
    assert out.read_text() == before
    args = [str(table), str(out), "--columns", "user=label,assistant=text", "--overwrite"]
    assert main(["data", "convert", *args]) == 0
    assert out.read_text() != before
    assert "is the input file" in refused(str(table), str(table), "--overwrite")
    assert (
        "plain text has no user and assistant turns"
        in refused(str(text_file(tmp_path / "t.txt")), "o.jsonl").lower()
    )
    chat = write_jsonl(tmp_path / "chat.jsonl", chat_lines(3))
    assert "already in an OpenAI format Tunery reads" in refused(str(chat), str(tmp_path / "o.jsonl"))
    assert not (tmp_path / "o.jsonl").exists()


# --- the service ----------------------------------------------------------------------------------------


def test_the_service_upload_says_what_a_csv_is_and_how_to_convert_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tests.server.conftest import fake_settings
    from tunery.server.app import create_app
    from tunery.server.auth import create_key
    from tunery.server.store import Store

    monkeypatch.delenv("TUNERY_DATABASE_URL", raising=False)
    settings = fake_settings(tmp_path / "service")
    store = Store(settings.database_url)
    key = create_key(store, "acme")[1]
    store.close()
    content = csv_file(tmp_path / "qa.csv").read_bytes()
    with TestClient(create_app(settings), raise_server_exceptions=False) as client:
        r = client.post(
            "/v1/files",
            headers={"Authorization": f"Bearer {key}"},
            files={"file": ("qa.csv", content)},
            data={"purpose": "fine-tune"},
        )
    assert r.status_code == 400
    error = r.json()["error"]
    assert error["code"] == "invalid_file_format" and error["message"].startswith(
        "Invalid file format for Fine-Tuning API. Must be .jsonl. qa.csv: This looks like a CSV file with "
        "columns question, answer."
    )
    assert error["message"].endswith("Convert it: tunery data convert qa.csv qa.jsonl. Then upload qa.jsonl.")


def test_a_job_on_a_foreign_file_fails_with_the_format_not_unpaired_feedback(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from tunery.server.jobs import foreign_format, validation_error

    path = legacy(tmp_path / "training.jsonl")  # the job's link to the uploaded legacy.jsonl
    assert main(["data", "validate", str(path), "--json", "--model", "none", "--format", "auto"]) == 1
    report = json.loads(capsys.readouterr().out)
    for kind, says in (("supervised", "Convert it: tunery data convert legacy.jsonl legacy.chat.jsonl"),
                       ("kto", 'Add "label": true (thumbs up) or false (thumbs down) to every line')):  # fmt: skip
        error = validation_error(
            report, "training_file", "file-1", kind, foreign_format(report, path, "legacy.jsonl", kind)
        )
        assert error is not None and error["code"] == "invalid_training_file"
        assert error["message"].startswith(
            "The job failed due to an invalid training file. Input file file-1, line 2: this looks like "
            "OpenAI's legacy prompt/completion format"
        )
        assert error["message"].endswith(says) and "unpaired-feedback" not in error["message"]
        assert str(tmp_path) not in error["message"]  # the service's paths stay private
