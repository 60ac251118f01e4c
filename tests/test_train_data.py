"""Training data: formats, loss masks, packing, the held-out split, and a clear error for each kind of bad data."""

from __future__ import annotations

import json
import re

import pytest

from dgemma.tokenizer import byte_tokenizer
from dgemma.train.batches import BatchStream, make_rows, pack, pad_each
from dgemma.train.data import DataError, Example, is_held_out, read_records, split_records, tokenize

TOK = byte_tokenizer()


def write_jsonl(path, *records):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


def examples(paths, ext=None):
    return [tokenize(r, TOK) for r in read_records(paths, ext)]


def target_text(e: Example) -> str:
    return TOK.decode(e.tokens[e.prompt_len:])


def test_text_file_is_one_document_with_loss_after_bos(tmp_path):
    (tmp_path / "a.txt").write_text("hello")
    [e] = examples([tmp_path / "a.txt"])
    assert e.tokens == [TOK.bos_id, *TOK.encode("hello", add_bos=False), TOK.eos_id]
    assert e.prompt_len == 1


def test_folder_walk_filters_by_extension_and_skips_empty_undecodable_and_hidden(tmp_path):
    (tmp_path / "pkg" / ".hidden").mkdir(parents=True)
    (tmp_path / "pkg" / "m.py").write_text("x = 1")
    (tmp_path / "pkg" / "__init__.py").write_text("")
    (tmp_path / "pkg" / "latin1.py").write_bytes(b"# caf\xe9\n")
    (tmp_path / "pkg" / ".hidden" / "h.py").write_text("secret = 1")
    (tmp_path / "notes.md").write_text("# notes")
    records = list(read_records([tmp_path], [".py"]))
    assert [(r.key, r.target) for r in records] == [("pkg/m.py", "x = 1")]


def test_excluded_files_are_not_read(tmp_path):
    for name in ("a.py", "b.py", "c.py"):
        (tmp_path / name).write_text(name)
    records = read_records([tmp_path, tmp_path / "c.py"], exclude=[tmp_path / "b.py", tmp_path / "c.py"])
    assert [r.target for r in records] == ["a.py"]


def test_jsonl_formats_put_the_loss_on_the_answer(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", {"text": "plain"}, {"prompt": "Q: 2+2?", "completion": " 4"}, "",
                       {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]})
    plain, completion, chat = examples([path])
    assert target_text(plain) == "plain<eos>"
    assert target_text(completion) == " 4<eos>"
    assert TOK.decode(completion.tokens[:completion.prompt_len]) == "<bos>Q: 2+2?"
    assert target_text(chat) == "Hello!<turn|>\n<eos>"
    prompt = TOK.decode(chat.tokens[:chat.prompt_len])
    assert prompt == TOK.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True)


def test_json_lines_in_a_json_file_are_records_and_other_json_is_text(tmp_path):
    """`datasets` writes JSON lines under a `.json` name; those were trained on as raw text, prompts included."""
    record = {"prompt": "Q: 2+2?", "completion": " 4"}
    write_jsonl(tmp_path / "lines.json", record, record)
    write_jsonl(tmp_path / "UPPER.JSONL", record)
    (tmp_path / "config.json").write_text(json.dumps({"name": "x", "version": 1}, indent=2))
    (tmp_path / "minified.json").write_text('{"name": "x"}\n')
    got = [(e.key, target_text(tokenize(e, TOK))) for e in read_records([tmp_path])]
    assert sum(text == " 4<eos>" for _, text in got) == 3  # two lines of lines.json, one of UPPER.JSONL
    texts = dict(got)
    assert texts["config.json"].startswith("{\n") and texts["minified.json"] == '{"name": "x"}\n<eos>'


@pytest.mark.parametrize("content, message", [
    ("", "d.jsonl: empty file"),
    ('{"text": "ok"}\n{"text": oops}\n', "d.jsonl:2: invalid JSON"),
    ('{"text": "ok"}\n\n{"body": "x"}\n', "d.jsonl:3: record has none of the fields 'text', 'prompt'/'completion', "
                                         "'messages' (keys: 'body')"),
    ('[1, 2]\n', "d.jsonl:1: expected a JSON object"),
    ('{"prompt": "only a prompt"}\n', "d.jsonl:1: 'prompt' and 'completion' must both be strings"),
    ('{"messages": [{"role": "user", "content": "hi"}]}\n', "d.jsonl:1: the last message must be the assistant's"),
])
def test_bad_jsonl_names_file_and_line(tmp_path, content, message):
    (tmp_path / "d.jsonl").write_text(content)
    with pytest.raises(DataError, match="^" + re.escape(f"{tmp_path}/{message}")):
        examples([tmp_path / "d.jsonl"])


def test_bad_files_name_the_file(tmp_path):
    (tmp_path / "empty.txt").write_text("  \n")
    with pytest.raises(DataError, match="^" + re.escape(f"{tmp_path}/empty.txt: empty file")):
        examples([tmp_path / "empty.txt"])
    (tmp_path / "blob.bin").write_bytes(b"\xff\xfe\x00")
    with pytest.raises(DataError, match="^" + re.escape(f"{tmp_path}/blob.bin: not UTF-8 text")):
        examples([tmp_path / "blob.bin"])
    with pytest.raises(DataError, match="no such file or folder"):
        examples([tmp_path / "missing"])
    (tmp_path / "sub").mkdir()
    with pytest.raises(DataError, match="no files ending in .py"):
        examples([tmp_path / "sub"], [".py"])


def test_example_longer_than_the_context_without_packing(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", {"text": "short"}, {"text": "x" * 40})
    exs = examples([path])
    with pytest.raises(DataError, match="^" + re.escape(f"{path}:2: example is 42 tokens, longer than --seq-len 16")):
        make_rows(exs, 16, TOK.pad_id, packed=False)
    assert len(make_rows(exs, 16, TOK.pad_id, packed=True)) == 4  # packing cuts it instead: 7 + 42 tokens


def test_packing_concatenates_and_keeps_masks():
    a = Example([2, 10, 11, 1], 1, "a")
    b = Example([2, 20, 21, 22, 23, 1], 3, "b")
    rows = pack([a, b], 4, pad_id=0)
    assert rows.tokens.tolist() == [[2, 10, 11, 1], [2, 20, 21, 22], [23, 1, 0, 0]]
    assert rows.loss_mask.tolist() == [[False, True, True, True], [False, False, False, True],
                                       [True, True, False, False]]
    assert rows.lengths.tolist() == [4, 4, 2]
    padded = pad_each([a, b], 8, pad_id=0)
    assert padded.tokens[1].tolist() == [2, 20, 21, 22, 23, 1, 0, 0] and padded.lengths.tolist() == [4, 6]


def test_packing_drops_rows_without_targets():
    rows = pack([Example([2, 3, 4, 5, 6, 7], 4, "p")], 2, pad_id=0)  # the first two rows are all prompt
    assert rows.tokens.tolist() == [[6, 7]]


def test_holdout_split_is_deterministic_and_near_the_fraction(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", *({"text": f"doc {i}"} for i in range(400)))
    train, held = split_records(read_records([path]), 0.1)
    again = split_records(read_records([path]), 0.1)[1]
    assert [r.key for r in held] == [r.key for r in again]
    assert 20 <= len(held) <= 60 and len(train) + len(held) == 400
    assert is_held_out("anything", 0.0) is False


def test_batch_stream_resumes_from_its_position():
    rows = pad_each([Example([2, i, 1], 1, str(i)) for i in range(3, 10)], 4, pad_id=0)
    straight = BatchStream(rows, 3, seed=5)
    seen = [straight.next().tokens[:, 1].tolist() for _ in range(5)]  # crosses two epoch boundaries
    first = BatchStream(rows, 3, seed=5)
    seen_again = [first.next().tokens[:, 1].tolist() for _ in range(2)]
    resumed = BatchStream(rows, 3, seed=5, **first.state())
    seen_again += [resumed.next().tokens[:, 1].tolist() for _ in range(3)]
    assert seen == seen_again
    assert sorted(sum(seen[:2], []) + seen[2][:1]) == list(range(3, 10))  # each epoch is a permutation


def test_jsonl_lines_end_at_newlines_only(tmp_path):
    """U+2028, U+0085 and other characters str.splitlines() breaks at are valid inside a JSON string (json.dumps
    with ensure_ascii=False writes them raw); such records were refused as invalid JSON."""
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps({"text": f"a\u2028b\u0085c\x0c{i}"}, ensure_ascii=False) + "\n"
                            for i in range(3)) + "{bad\n", encoding="utf-8")
    with pytest.raises(DataError, match=re.escape(f"{path}:4: invalid JSON")):  # and lines are counted right
        list(read_records([path]))
    path.write_text(path.read_text(encoding="utf-8").replace("{bad\n", ""), encoding="utf-8")
    assert [r.target for r in read_records([path])] == [f"a\u2028b\u0085c\x0c{i}" for i in range(3)]


def test_a_metrics_file_cut_short_resumes_and_a_damaged_one_is_named(tmp_path):
    from dgemma.config import ConfigError
    from dgemma.train.report import read_metrics, truncate_metrics

    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.5}\n{"step": 3, "lo')
    truncate_metrics(path, 2)  # a run killed while writing step 3, resumed from checkpoint-2
    assert read_metrics(path) == [{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.5}]
    path.write_text('{"step": 1, "lo\n{"step": 2, "loss": 1.5}\n')
    with pytest.raises(ConfigError, match=re.escape(f"{path}:1: not a metrics record")):
        read_metrics(path)


@pytest.mark.skipif(not __import__("os").path.exists("/proc/self/mem"), reason="needs Linux's /proc")
def test_a_read_error_without_a_file_name_is_named():
    with pytest.raises(DataError, match=re.escape("/proc/self/mem: cannot read it (")):
        list(read_records(["/proc/self/mem"]))
