"""`dgemma generate --json-schema FILE | --regex RE | --choice A,B,C | --grammar FILE` with the shipped model."""

from __future__ import annotations

import json
import re

import jsonschema
import pytest

from dgemma.cli import main

SCHEMA = {"type": "object", "properties": {"ok": {"type": "boolean"}, "n": {"type": "integer", "minimum": 1,
                                                                              "maximum": 5}},
          "required": ["ok", "n"], "additionalProperties": False}
FAST = ("--steps", "8", "--max-new-tokens", "32", "--seed", "1")


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_json_schema_file(capsys, tmp_path):
    path = tmp_path / "schema.json"
    path.write_text(json.dumps(SCHEMA))
    code, out, _ = run(capsys, "generate", "--json-schema", str(path), *FAST, "--json", "def f(x):")
    doc = json.loads(out)
    assert code == 0 and doc["complete"] is True
    jsonschema.validate(json.loads(doc["text"]), SCHEMA)


def test_regex_choice_and_grammar(capsys, tmp_path):
    code, out, _ = run(capsys, "generate", "--regex", "[a-f]{4}-[0-9]{2}", *FAST, "x")
    assert code == 0 and re.fullmatch(r"[a-f]{4}-[0-9]{2}", out.strip())
    code, out, _ = run(capsys, "generate", "--choice", "red,green,blue", *FAST, "colour:")
    assert code == 0 and out.strip() in ("red", "green", "blue")
    lark = tmp_path / "g.lark"
    lark.write_text('start: "x=" NUM ";"\nNUM: /[0-9]{1,3}/\n')
    code, out, _ = run(capsys, "generate", "--grammar", str(lark), *FAST, "x")
    assert code == 0 and re.fullmatch(r"x=[0-9]{1,3};", out.strip())


def test_an_output_that_runs_out_of_tokens_says_so(capsys):
    code, out, err = run(capsys, "generate", "--regex", "[a-z]{300}", *FAST, "x")
    assert code == 1 and "warning: the output ended at --max-new-tokens before it matched the regex" in err
    assert re.fullmatch(r"[a-z]*", out.strip())


@pytest.mark.parametrize("argv, message", [
    (("--regex", "[0-9]+("), 'regex: invalid regex "[0-9]+(": unclosed group'),
    (("--choice", ","), "choice is empty"),
    (("--json-schema", "/nonexistent/schema.json"), "cannot read the JSON schema /nonexistent/schema.json"),
    (("--regex", "a", "--choice", "a"), "not allowed with argument"),
])
def test_bad_constraints_are_one_line_errors(capsys, argv, message):
    code, out, err = run(capsys, "generate", *argv, "x")
    assert code != 0 and out == ""
    assert err.count("\n") == 1 and err.startswith("dgemma: error: ") and message in err


def test_bad_schema_file(capsys, tmp_path):
    path = tmp_path / "bad.json"
    path.write_text('{"type": "object", "properties": {"a": {"type": "strin"}}}')
    code, _, err = run(capsys, "generate", "--json-schema", str(path), "x")
    assert code != 0 and "invalid JSON schema at properties/a/type" in err
    path.write_text("{not json")
    code, _, err = run(capsys, "generate", "--json-schema", str(path), "x")
    assert code != 0 and "is not JSON" in err
