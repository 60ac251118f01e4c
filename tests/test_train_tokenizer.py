"""`dgemma tokenizer train`: Gemma 4 special ids fixed, byte fallback, lossless round trip, a model trains on it."""

from __future__ import annotations

import json
import re

import pytest

import dgemma
from dgemma.cli import main
from dgemma.tokenizer import GEMMA4_SPECIAL_IDS, Tokenizer
from dgemma.tokenizer_train import train_tokenizer

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
    assert {p.name for p in tok_dir.iterdir()} == {"tokenizer.json", "chat_template.jinja"}
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
