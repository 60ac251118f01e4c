"""`dgemma tokenizer train`: Gemma 4 special ids fixed, byte fallback, lossless round trip, a model trains on it."""

from __future__ import annotations

import errno
import json
import os
import re
from pathlib import Path

import pytest

import dgemma
from dgemma.cli import main
from dgemma.tokenizer import GEMMA4_SPECIAL_IDS, Tokenizer
from dgemma.train.tokenizer import train_tokenizer

CODE = "".join(f"def handler_{i}(request):\n    return {{'status': {200 + i}, 'body': request.body}}\n\n"
               for i in range(200))


def test_special_ids_are_fixed_and_text_round_trips():
    tok = train_tokenizer([CODE], vocab_size=700)
    assert 512 < tok.vocab_size <= 700  # fewer when the corpus runs out of pairs worth merging
    for name, i in GEMMA4_SPECIAL_IDS.items():
        assert tok.token_to_id(name) == i
    unused = min(set(range(256)) - set(GEMMA4_SPECIAL_IDS.values()))
    assert tok.token_to_id(f"<unused{unused}>") == unused
    assert tok.token_to_id("<0x00>") == 256 and tok.token_to_id("<0xFF>") == 511
    for text in (CODE[:300], "unseen: héllo 世界 🎉\t\r\n  x", "<|turn>user\nhi<turn|>\n"):
        assert tok.decode(tok.encode(text, add_bos=False)) == text
    ids = tok.encode("\n    return", add_bos=False)
    assert [tok.backend.id_to_token(i) for i in ids] == ["\n   ", " return"]  # learned indentation and keyword
    assert tok.encode("<|turn>", add_bos=False) == [105]
    assert tok.encode("世", add_bos=False) == [256 + b for b in "世".encode()]  # byte fallback


def test_cli_writes_a_tokenizer_a_model_can_train_with(tmp_path, capsys):
    (tmp_path / "code.py").write_text(CODE)
    tok_dir = tmp_path / "tok"
    assert main(["tokenizer", "train", "--data", str(tmp_path / "code.py"), "--vocab-size", "640",
                 "--out", str(tok_dir)]) == 0
    assert {p.name for p in tok_dir.iterdir()} == {"tokenizer.json", "chat_template.jinja", "tokenizer_config.json"}
    tok = Tokenizer.from_dir(tok_dir)
    assert tok.vocab_size <= 640 and tok.bos_id == 2 and tok.eos_id == 1 and tok.pad_id == 0

    out = tmp_path / "run"
    assert main(["train", "--data", str(tmp_path / "code.py"), "--tokenizer", str(tok_dir), "--out", str(out),
                 "--steps", "1", "--batch-size", "2", "--seq-len", "32", "--device", "cpu"]) == 0, \
        capsys.readouterr().err
    config = json.loads((out / "checkpoint-1" / "config.json").read_text())
    assert config["text_config"]["vocab_size"] == tok.vocab_size
    model = dgemma.DiffusionGemma.from_pretrained(out / "checkpoint-1")
    assert model.tokenizer.vocab_size == tok.vocab_size


def test_vocab_must_exceed_the_reserved_ids():
    with pytest.raises(dgemma.ConfigError, match="must exceed the 512 reserved ids"):
        train_tokenizer([CODE], vocab_size=512)


@pytest.mark.parametrize("kwargs, message", [
    (dict(vocab_size=10**11), "vocab size must be at most 1048576, got 100000000000"),  # was an abort in Rust
    (dict(vocab_size=600, min_frequency=-3), "min frequency must be >= 0, got -3"),  # was an OverflowError
])
def test_vocab_size_and_min_frequency_are_checked(kwargs, message):
    with pytest.raises(dgemma.ConfigError, match=re.escape(message)):
        train_tokenizer([CODE], **kwargs)


CHATS = [[{"role": "user", "content": "Write handler_7, please."}],
         [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "def f(x):\n    return x"},
          {"role": "assistant", "content": "It returns x."}, {"role": "user", "content": "héllo 世界"}]]


def test_transformers_loads_a_saved_tokenizer_with_dgemma_ids(tmp_path):
    """Without a tokenizer_config.json naming the generic fast class, transformers' AutoTokenizer loads a dgemma
    model directory as GemmaTokenizer, whose own normalizer and pre-tokenizer give other ids."""
    transformers = pytest.importorskip("transformers")
    tok = train_tokenizer([CODE], vocab_size=700)
    model = dgemma.DiffusionGemma.from_pretrained("tiny")
    model.tokenizer = tok
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "tokenizer_config.json").read_text())["tokenizer_class"] == "PreTrainedTokenizerFast"
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path)
    assert (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id) == (tok.bos_id, tok.eos_id, tok.pad_id)
    for text in ("def f(x):\n    return {'status': 200}", "unseen: héllo 世界 🎉", CODE[:200]):
        assert hf.encode(text, add_special_tokens=False) == tok.encode(text, add_bos=False)
    for messages in CHATS:
        for thinking in (False, True):
            assert list(hf.apply_chat_template(messages, add_generation_prompt=True, enable_thinking=thinking,
                                               return_dict=False)) == \
                tok.apply_chat_template(messages, enable_thinking=thinking, tokenize=True)
    again = Tokenizer.from_dir(tmp_path)  # dgemma reads the directory as before
    assert again.chat_template == tok.chat_template
    assert again.apply_chat_template(CHATS[1], tokenize=True) == tok.apply_chat_template(CHATS[1], tokenize=True)


def test_a_checkpoints_own_tokenizer_config_is_kept(tmp_path):
    tok = train_tokenizer([CODE], vocab_size=600)
    own = '{"tokenizer_class": "GemmaTokenizer", "bos_token": "<bos>", "chat_template": "cfg"}'
    (tmp_path / "tokenizer_config.json").write_text(own)
    tok.save(tmp_path)
    assert (tmp_path / "tokenizer_config.json").read_text() == own
    assert Tokenizer.from_dir(tmp_path).chat_template == tok.chat_template  # chat_template.jinja comes first


def test_read_errors_name_the_file(tmp_path, monkeypatch, capsys):
    """An I/O error carries no file name (it used to print just "[Errno 5] Input/output error")."""
    data = tmp_path / "code.py"
    data.write_text(CODE)

    read_text = Path.read_text

    def unreadable(self, *args, **kwargs):
        if self == data:
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        return read_text(self, *args, **kwargs)

    monkeypatch.setattr(Path, "read_text", unreadable)
    assert main(["tokenizer", "train", "--data", str(data), "--vocab-size", "600", "--out", str(tmp_path / "t")]) == 1
    assert f"{data}: cannot read it ({os.strerror(errno.EIO)})" in capsys.readouterr().err


def test_a_lone_surrogate_names_the_file_and_line(tmp_path, capsys):
    data = tmp_path / "data.jsonl"
    data.write_text('{"text": "fine"}\n{"text": "abc\\ud800def"}\n')
    assert main(["tokenizer", "train", "--data", str(data), "--vocab-size", "600", "--out", str(tmp_path / "t")]) == 1
    assert f"{data}:2: text is not valid Unicode" in capsys.readouterr().err


@pytest.mark.parametrize("out, message", [("", "--out is empty"), ("file", "exists and is not a directory"),
                                          ("file/sub", "exists and is not a directory")])
def test_a_bad_out_is_refused_before_training(tmp_path, monkeypatch, capsys, out, message):
    (tmp_path / "code.py").write_text(CODE)
    (tmp_path / "file").write_text("")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("dgemma.cli.tokenizer.train_tokenizer", lambda *a: pytest.fail("trained"))
    assert main(["tokenizer", "train", "--data", "code.py", "--vocab-size", "600", "--out", out]) == 2
    assert message in capsys.readouterr().err
