"""Tokenizer, Gemma 4 chat template, incremental detokenizer, reasoning split (tiny BPE built here, no network)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from jinja2.exceptions import TemplateError
from tokenizers import Tokenizer as Backend
from tokenizers import decoders, models, normalizers, pre_tokenizers, trainers

from dgemma.tokenizer import IncrementalDetokenizer, Tokenizer, split_reasoning

SPECIALS = ["<pad>", "<eos>", "<bos>", "<|turn>", "<turn|>", "<|think|>", "<|channel>", "<channel|>"]
CORPUS = [
    "Hello world! How are you today?",
    "The café serves crème brûlée.",
    "日本語のテキストです。",
    "I love 🙂 emoji 🙂!",
    "Write a long essay about Portugal.",
    "user model system thought",
]
# "🚀", "한국" and "€" are not in the corpus, so they encode as byte-fallback tokens (<0xF0> <0x9F> ...).
STREAM_TEXT = "Hé, 日本語 🙂 and 🚀 한국 cost 5€!🙂🚀"
PROMPT = "Write a long essay about Portugal."


def build_backend() -> Backend:
    """A small SentencePiece-style BPE (byte fallback, ▁ for spaces) with Gemma 4 markers at fixed ids."""
    backend = Backend(models.BPE(byte_fallback=True))
    backend.normalizer = normalizers.Replace(" ", "▁")
    backend.pre_tokenizer = pre_tokenizers.Split("▁", behavior="merged_with_next")
    backend.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    backend.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=200, special_tokens=SPECIALS,
                                                             show_progress=False))
    data = json.loads(backend.to_str())
    vocab = data["model"]["vocab"]
    for b in range(256):  # byte fallback needs <0x00> ... <0xFF> in the vocabulary
        vocab.setdefault(f"<0x{b:02X}>", len(vocab))
    return Backend.from_str(json.dumps(data))


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("model")
    build_backend().save(str(path / "tokenizer.json"))
    return path


@pytest.fixture(scope="module")
def tok(model_dir: Path) -> Tokenizer:
    return Tokenizer.from_dir(model_dir)


def test_special_ids(tok: Tokenizer) -> None:
    assert (tok.pad_id, tok.eos_id, tok.bos_id) == (0, 1, 2)
    assert [tok.token_to_id(t) for t in SPECIALS] == list(range(len(SPECIALS)))
    assert tok.stop_ids == (1, tok.token_to_id("<turn|>"))
    assert tok.token_to_id("<not a token>") is None
    assert tok.vocab_size == tok.backend.get_vocab_size(with_added_tokens=True) > 256


@pytest.mark.parametrize("text", ["Hello world!", "crème brûlée", "日本語", "I love 🙂", STREAM_TEXT, " a  b "])
def test_round_trip(tok: Tokenizer, text: str) -> None:
    ids = tok.encode(text, add_bos=False)
    assert tok.decode(ids) == text
    with_bos = tok.encode(text)
    assert with_bos == [tok.bos_id, *ids]
    assert tok.decode(with_bos) == "<bos>" + text
    assert tok.decode(with_bos, skip_special_tokens=True) == text


def test_markers_encode_to_single_ids(tok: Tokenizer) -> None:
    ids = tok.encode("<|turn>user\nHi<turn|>", add_bos=False)
    assert ids[0] == tok.token_to_id("<|turn>") and ids[-1] == tok.token_to_id("<turn|>")
    assert tok.decode(ids, skip_special_tokens=True) == "user\nHi"


def test_chat_template_thinking_off(tok: Tokenizer) -> None:
    # The exact prompt google/diffusiongemma-26B-A4B-it renders (transformers' DiffusionGemma integration test).
    messages = [{"role": "user", "content": PROMPT}]
    assert tok.apply_chat_template(messages) == (
        "<bos><|turn>user\nWrite a long essay about Portugal.<turn|>\n<|turn>model\n<|channel>thought\n<channel|>"
    )


def test_chat_template_thinking_on(tok: Tokenizer) -> None:
    messages = [{"role": "user", "content": PROMPT}]
    assert tok.apply_chat_template(messages, enable_thinking=True) == (
        "<bos><|turn>system\n<|think|>\n<turn|>\n<|turn>user\nWrite a long essay about Portugal.<turn|>\n<|turn>model\n"
    )


def test_chat_template_system(tok: Tokenizer) -> None:
    messages = [{"role": "system", "content": " Be brief.\n"}, {"role": "user", "content": "Hi"}]
    assert tok.apply_chat_template(messages) == (
        "<bos><|turn>system\nBe brief.<turn|>\n<|turn>user\nHi<turn|>\n<|turn>model\n<|channel>thought\n<channel|>"
    )
    assert tok.apply_chat_template(messages, enable_thinking=True) == (
        "<bos><|turn>system\n<|think|>\nBe brief.<turn|>\n<|turn>user\nHi<turn|>\n<|turn>model\n"
    )


def test_chat_template_multi_turn(tok: Tokenizer) -> None:
    messages = [
        {"role": "user", "content": "Hi"},
        # history drops the thinking channel, as Gemma 4's template does
        {"role": "assistant", "content": "<|channel>thought\nGreet back.<channel|>Hello! "},
        {"role": "user", "content": [{"type": "text", "text": "How are you?"}]},
    ]
    history = "<bos><|turn>user\nHi<turn|>\n<|turn>model\nHello!<turn|>\n<|turn>user\nHow are you?<turn|>\n"
    assert tok.apply_chat_template(messages) == history + "<|turn>model\n<|channel>thought\n<channel|>"
    assert tok.apply_chat_template(messages, enable_thinking=True) == (
        "<bos><|turn>system\n<|think|>\n<turn|>\n" + history.removeprefix("<bos>") + "<|turn>model\n"
    )
    assert tok.apply_chat_template(messages, add_generation_prompt=False) == history


def test_chat_template_tokenize(tok: Tokenizer) -> None:
    messages = [{"role": "user", "content": PROMPT}]
    ids = tok.apply_chat_template(messages, tokenize=True)
    text = tok.apply_chat_template(messages)
    assert ids == tok.encode(text, add_bos=False)
    assert ids[:2] == [tok.bos_id, tok.token_to_id("<|turn>")]
    assert ids[-1] == tok.token_to_id("<channel|>")
    assert ids.count(tok.bos_id) == 1
    assert tok.decode(ids) == text


def test_chat_template_rejects_unsupported(tok: Tokenizer) -> None:
    with pytest.raises(TemplateError, match="role 'function'"):
        tok.apply_chat_template([{"role": "function", "content": "42"}])
    with pytest.raises(TemplateError, match="takes text, image and video content, not audio"):
        tok.apply_chat_template([{"role": "user", "content": [{"type": "audio", "url": "x.wav"}]}])
    with pytest.raises(TemplateError, match="arguments must be an object"):  # tools render (docs/structured-output.md)
        tok.apply_chat_template([{"role": "assistant", "content": None, "tool_calls": [
            {"function": {"name": "f", "arguments": "{}"}}]}])


def test_chat_template_rejects_an_empty_conversation(tok: Tokenizer) -> None:
    with pytest.raises(ValueError, match="empty conversation"):
        tok.apply_chat_template([])


def test_chat_template_sources(model_dir: Path, tmp_path: Path) -> None:
    (tmp_path / "tokenizer.json").write_bytes((model_dir / "tokenizer.json").read_bytes())
    config = {"chat_template": "cfg:{{ messages[0]['content'] }}", "bos_token": {"content": "<bos>"}}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    assert Tokenizer.from_dir(tmp_path).apply_chat_template([{"role": "user", "content": "x"}]) == "cfg:x"
    (tmp_path / "chat_template.jinja").write_text("jinja:{{ messages | tojson }}")
    assert Tokenizer.from_dir(tmp_path).apply_chat_template([{"role": "user", "content": "é"}]) == (
        'jinja:[{"role": "user", "content": "é"}]'
    )


def test_missing_tokenizer_json(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="tokenizer.json") as info:
        Tokenizer.from_dir(tmp_path)
    assert str(tmp_path) in str(info.value)


def test_unreadable_tokenizer_json(tmp_path: Path) -> None:
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(ValueError) as info:
        Tokenizer.from_dir(tmp_path)
    assert str(tmp_path / "tokenizer.json") in str(info.value)


def stream(tok: Tokenizer, ids: list[int], chunk: int, skip_special_tokens: bool = False) -> list[str]:
    detok = IncrementalDetokenizer(tok, skip_special_tokens=skip_special_tokens)
    pieces = [detok.add(ids[i:i + chunk]) for i in range(0, len(ids), chunk)]
    return [*pieces, detok.flush()]


@pytest.mark.parametrize("chunk", [1, 2, 3])
def test_incremental_detokenizer_matches_decode(tok: Tokenizer, chunk: int) -> None:
    ids = tok.encode(STREAM_TEXT, add_bos=False)
    assert tok.token_to_id("<0xF0>") in ids  # the test exercises byte fallback
    pieces = stream(tok, ids, chunk)
    assert "".join(pieces) == tok.decode(ids) == STREAM_TEXT
    assert not any("\ufffd" in piece for piece in pieces)
    assert sum(1 for piece in pieces if piece) > 5  # it streams, not just flushes


@pytest.mark.parametrize("chunk", [1, 2, 3])
def test_incremental_detokenizer_special_tokens(tok: Tokenizer, chunk: int) -> None:
    ids = tok.apply_chat_template([{"role": "user", "content": STREAM_TEXT}], tokenize=True)
    assert "".join(stream(tok, ids, chunk)) == tok.decode(ids)
    assert "".join(stream(tok, ids, chunk, skip_special_tokens=True)) == tok.decode(ids, skip_special_tokens=True)


def test_incremental_detokenizer_malformed_bytes(tok: Tokenizer) -> None:
    # A complete "€" then a truncated "🚀": decode renders the whole byte run as U+FFFD, and so must the stream.
    euro, rocket = (tok.encode(c, add_bos=False) for c in ("€", "🚀"))
    for ids in (euro + rocket[:2], euro + rocket[:2] + tok.encode("ok", add_bos=False)):
        for chunk in (1, 2, 3):
            assert "".join(stream(tok, ids, chunk)) == tok.decode(ids)


def test_incremental_detokenizer_window_stays_small(tok: Tokenizer) -> None:
    ids = tok.encode(STREAM_TEXT * 50, add_bos=False)
    decoded: list[int] = []
    detok = IncrementalDetokenizer(tok)
    real_decode = tok.backend.decode

    class Spy:
        def decode(self, window: list[int], skip_special_tokens: bool) -> str:
            decoded.append(len(window))
            return real_decode(window, skip_special_tokens=skip_special_tokens)

    detok._backend = Spy()  # count how many tokens each decode call sees
    text = "".join(detok.add([i]) for i in ids) + detok.flush()
    assert text == STREAM_TEXT * 50
    assert max(decoded) < 20


def test_split_reasoning() -> None:
    assert split_reasoning("<|channel>thought\nLet me think.\n<channel|>The answer is 4.") == (
        "Let me think.", "The answer is 4.")
    assert split_reasoning("<|channel>thought\n<channel|>Direct answer.") == ("", "Direct answer.")
    assert split_reasoning("Plain answer.") == ("", "Plain answer.")
    assert split_reasoning("<|channel>thought\nStill thinking") == ("Still thinking", "")
    assert split_reasoning("Opened by the prompt.<channel|>Answer") == ("Opened by the prompt.", "Answer")
    assert split_reasoning("<|channel>thought\nA<channel|>x <|channel>thought\nB<channel|>y") == ("A\nB", "x y")


def test_split_reasoning_while_streaming() -> None:
    """`final=False`: text that may still grow; a block's reasoning waits until its `thought` label is known."""
    for partial in ("", "thou", "thought", "thought\n"):
        assert split_reasoning(f"A<|channel>thought\nx<channel|>B<|channel>{partial}", final=False) == ("x", "AB")
        assert split_reasoning(partial, opened=True, final=False) == ("", "")
    assert split_reasoning("<|channel>thou", final=True) == ("thou", "")
    assert split_reasoning("<|channel>thought<channel|>", final=False) == ("thought", "")  # closed: no label
    assert split_reasoning("<|channel>thoughts", final=False) == ("thoughts", "")
