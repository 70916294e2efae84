"""The one reader of text data files: plain text by line or paragraph, JSON lines of texts, conversations and
prompt/answer pairs as typed records, and one clear error line for every kind of bad input."""

import json

import pytest

from deltacomp.errors import DeltacompError
from deltacomp.io.text_records import Chat, PromptAnswer, Text, read_records


def test_plain_text_by_line_or_by_paragraph(tmp_path):
    (tmp_path / "p.txt").write_text("first\nstill first\n \nsecond\r\n\r\n\nthird\n")
    assert read_records(tmp_path / "p.txt") == [Text("first", 1), Text("still first", 2), Text("second", 4),
                                                Text("third", 7)]
    assert read_records(tmp_path / "p.txt", split="paragraphs") == [Text("first\nstill first", 1),
                                                                    Text("second", 4), Text("third", 7)]
    (tmp_path / "one.txt").write_text("one\ntwo\n")  # a single paragraph: its lines
    assert read_records(tmp_path / "one.txt", split="paragraphs") == [Text("one", 1), Text("two", 2)]
    (tmp_path / "brace.txt").write_text("{ not json\nplain\n")  # a first line that is no JSON object: plain text
    assert read_records(tmp_path / "brace.txt") == [Text("{ not json", 1), Text("plain", 2)]
    with pytest.raises(ValueError, match="split must be one of"):
        read_records(tmp_path / "p.txt", split="words")


def test_json_lines_give_a_typed_record_each(tmp_path):
    chat = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    rows = [{"body": "b", "id": 1}, {"messages": chat}, {"prompt": "q", "answer": "r", "task": 1},
            {"prompt": "q2", "response": "r2"}, "a string"]
    (tmp_path / "d.txt").write_text("\n\n".join(json.dumps(r) for r in rows))  # JSON lines by their first line
    assert read_records(tmp_path / "d.txt", field="body") == [
        Text("b", 1), Chat(tuple(chat), 3), PromptAnswer("q", "r", 1, 5), PromptAnswer("q2", "r2", None, 7),
        Text("a string", 9)]
    with pytest.raises(DeltacompError, match="line 1: no field 'text' and no 'messages' \\(fields: body, id\\)"):
        read_records(tmp_path / "d.txt")  # only ``field`` is a text field
    (tmp_path / "both.jsonl").write_text(json.dumps({"text": "t", "messages": chat}) + "\n")
    assert read_records(tmp_path / "both.jsonl") == [Text("t", 1)]  # the text field comes first


BAD = [
    (None, "x.jsonl: no such file"),
    (b"\x00\x01binary", "x.jsonl is not UTF-8 text"),
    ("\n  \n\n", "x.jsonl is empty"),
    ('{"text": "ok"}\n{"text": oops}\n', "x.jsonl line 2: not valid JSON"),
    ("[1, 2]\n", "x.jsonl line 1: expected a JSON object or string, got list"),
    ('{"text": 5}\n', "line 1: field 'text' is not a string"),
    ('{"messages": "hi"}\n', "line 1: 'messages' must be a non-empty list of objects with string 'role' and 'content'"),
    ('{"messages": [{"role": "user"}]}\n', "line 1: 'messages' must be a non-empty list"),
    ('{"prompt": "a", "answer": 3}\n', "line 1: expected string fields 'prompt' and 'answer'"),
    ('{"prompt": "a", "completion": "b", "task": -1}\n',
     "line 1: 'task' must be a delta index (an integer >= 0), got -1"),
    ('{"prompt": "a", "answer": "b", "task": true}\n', "'task' must be a delta index"),
    ('{"prompt": "x"}\n', "line 1: no field 'text' and no 'messages' (fields: prompt), nor 'prompt' with one of "
                          "'answer', 'response', 'completion', 'output'"),
]


class MyError(DeltacompError):
    pass


@pytest.mark.parametrize("content, message", BAD)
def test_bad_input_is_one_clear_line_of_the_callers_error(tmp_path, content, message):
    path = tmp_path / "x.jsonl"
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        path.write_text(content)
    with pytest.raises(MyError) as e:
        read_records(path, label="training file", error=MyError)
    text = str(e.value)
    assert text.startswith(f"training file {path}") and message in text and "\n" not in text, text
