"""`dgemma chat`: each reply is the conversation so far generated with the chat template, seed S + k."""

from __future__ import annotations

import io
import sys

import pytest
import torch

from dgemma import DiffusionGemma
from dgemma.cli import main
from dgemma.tokenizer import byte_tokenizer

ARGS = ["--model", "tiny", "--max-new-tokens", "32", "--steps", "3", "--device", "cpu"]


def chat(capsys, monkeypatch, stdin: str, *argv: str) -> tuple[int, str, str]:
    monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    code = main(["chat", *ARGS, *argv])
    out, err = capsys.readouterr()
    return code, out, err


def generate_chat(capsys, prompt: str, seed: int) -> str:
    """What `dgemma generate --chat` prints for one user turn."""
    assert main(["generate", "--chat", *ARGS, "--seed", str(seed), prompt]) == 0
    return capsys.readouterr().out


@pytest.fixture(scope="module")
def tiny():
    return DiffusionGemma.from_pretrained("tiny")


def reply(tiny, messages, seed: int) -> str:
    """The text of a reply to `messages`, generated through the Python API."""
    ids = tiny.tokenizer.apply_chat_template(messages, tokenize=True)
    stops = [1, *tiny.tokenizer.stop_ids]
    out = tiny.generate(torch.tensor([ids]), max_new_tokens=32, max_denoising_steps=3, seed=seed,
                        eos_token_id=stops)
    tokens = out.sequences[0, len(ids):].tolist()
    cut = next((i for i, t in enumerate(tokens) if t in stops), len(tokens))
    return tiny.tokenizer.decode(tokens[:cut], skip_special_tokens=True)


def shown(text: str) -> str:
    """A reply as printed: its text, ended by a line break."""
    return text + ("" if text.endswith("\n") else "\n")


def test_each_reply_continues_the_conversation_with_the_next_seed(capsys, monkeypatch, tiny):
    first = reply(tiny, [{"role": "user", "content": "Hello there"}], seed=5)
    assert generate_chat(capsys, "Hello there", seed=5) == shown(first)  # the first turn is `generate --chat`'s
    code, out, err = chat(capsys, monkeypatch, "Hello there\nAnd then?\n", "--seed", "5")
    assert code == 0, err
    history = [{"role": "user", "content": "Hello there"}, {"role": "assistant", "content": first},
               {"role": "user", "content": "And then?"}]
    assert out == shown(first) + shown(reply(tiny, history, seed=6))
    assert err.count(" tokens, 1 canvas, 3.0 passes/canvas") == 2


def test_reset_system_and_a_message_over_several_lines(capsys, monkeypatch, tiny):
    script = 'Hi\n/reset\n"""two\nlines"""\n/system Be brief.\n/nonsense\n/thinking maybe\nHi\n/exit\nnever read\n'
    code, out, err = chat(capsys, monkeypatch, script, "--seed", "0")
    assert code == 0, err
    texts = [reply(tiny, [{"role": "user", "content": "Hi"}], 0),
             reply(tiny, [{"role": "user", "content": "two\nlines"}], 1),  # after /reset: a new conversation
             reply(tiny, [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}], 2)]
    assert out == "".join(shown(t) for t in texts)
    for said in ("(conversation cleared)", "(system prompt set; conversation cleared)",
                 "(unknown command /nonsense; /help lists them)", "(usage: /thinking on|off)"):
        assert said in err
    assert err.count(" tokens, ") == 3  # "never read": /exit ended the session


def test_a_turn_past_the_context_is_refused_and_the_conversation_goes_on(capsys, monkeypatch, tiny):
    code, out, err = chat(capsys, monkeypatch, "x" * 5000 + "\nHi\n", "--seed", "0")  # tiny: 4096 positions
    assert code == 0 and "Traceback" not in err
    assert "dgemma: error:" in err and "the turn is dropped; /reset starts over" in err
    text = reply(tiny, [{"role": "user", "content": "Hi"}], 0)  # the refused turn is not in the history
    assert out == "\n" + shown(text)


def test_thinking_shows_the_reasoning_apart_and_keeps_only_the_answer(capsys, monkeypatch):
    from dgemma.engine.generate import CanvasCommit, GenerationResult, GenerationStats

    prompts = []
    answer = byte_tokenizer().encode("<|channel>thought\nHmm.<channel|>Yes.<turn|>", add_bos=False)

    def fake(self, input_ids, generation_config=None, seed=None, **kwargs):
        prompts.append(self.tokenizer.decode(input_ids[0]))
        row = torch.tensor([answer + [0] * (32 - len(answer))])
        yield CanvasCommit(0, row, torch.tensor([True]), torch.tensor([2]))
        yield GenerationResult([row[0].tolist()], GenerationStats([[2]], [2], [len(answer)], [len(answer) / 2],
                                                                 0.01, 0.01))

    monkeypatch.setattr(DiffusionGemma, "stream_generate", fake)
    code, out, err = chat(capsys, monkeypatch, "Q1\nQ2\n", "--thinking")
    assert code == 0, err
    assert out == "Yes.\nYes.\n" and err.count("Hmm.\n") == 2  # each reasoning ends its line
    assert "<|think|>" in prompts[0]  # thinking on in the template
    assert "Hmm." not in prompts[1] and "Yes." in prompts[1]


def test_the_input_ending_inside_a_block_leaves_and_a_bad_system_prompt_is_refused(capsys, monkeypatch):
    code, out, err = chat(capsys, monkeypatch, '"""half\ntyped\n', "--seed", "0")
    assert code == 0 and out == "" and " tokens, " not in err  # nothing half-typed was sent
    code, out, err = chat(capsys, monkeypatch, "/system a\udcff\n", "--seed", "0")
    assert code == 0 and "(the system prompt is not valid UTF-8 text; unchanged)" in err
    code, out, err = chat(capsys, monkeypatch, "Hi\n", "--system", "a\udcff")
    assert code == 2 and "dgemma: error: --system is not valid UTF-8 text" in err
