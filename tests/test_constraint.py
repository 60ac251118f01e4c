"""The grammar constraint on the canvas, with the shipped model (which knows no JSON): outputs are valid by
construction, the grammar state carries over canvases, batches and the scheduler keep unconstrained rows exact,
bad constraints are refused with their reason."""

from __future__ import annotations

import json
import re

import jsonschema
import pytest
import torch

from dgemma import Constraint, ConstraintError, DiffusionGemma
from dgemma.engine.scheduler import Request, Scheduler
from dgemma.sampling.constraint import row_constraints

PERSON = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 12}, "age": {"type": "integer", "minimum": 0, "maximum": 120},
    "role": {"enum": ["admin", "user"]}}, "required": ["name", "age", "role"], "additionalProperties": False}


@pytest.fixture(scope="module")
def model():
    return DiffusionGemma.from_pretrained("dgemma-code-tiny")


def _text(model, tokens: list[int]) -> str:
    stop = set(model.generation_config.eos_token_id)
    cut = next((i for i, t in enumerate(tokens) if t in stop), len(tokens))
    return model.tokenizer.decode(tokens[:cut], skip_special_tokens=True)


def _run(model, constraint, seeds=(0,), max_new_tokens=64, prompt="def f(x):", **kw):
    ids = model.tokenizer.encode(prompt)
    out = model.generate([ids] * len(seeds), constraint=constraint, seed=list(seeds), max_new_tokens=max_new_tokens,
                         max_denoising_steps=8, **kw)
    return [_text(model, row[len(ids):].tolist()) for row in out.sequences], out.stats


@pytest.mark.parametrize("policy", ["argmax", "dp"])
def test_json_schema_outputs_validate(model, policy):
    texts, stats = _run(model, Constraint(json_schema=PERSON), seeds=(0, 1, 2), constraint_policy=policy)
    assert stats.grammar_complete == [True, True, True]
    for text in texts:
        jsonschema.validate(json.loads(text), PERSON)


def test_grammar_state_carries_over_canvases(model):
    schema = {"type": "object", "properties": {"n": {"type": "array", "items": {"type": "integer", "maximum": 9},
                                                     "minItems": 25, "maxItems": 25}},
              "required": ["n"], "additionalProperties": False}
    texts, stats = _run(model, Constraint(json_schema=schema), max_new_tokens=128)
    assert len(stats.passes_per_canvas[0]) > 1  # the object spans canvases (the shipped model's are 32 tokens)
    assert stats.grammar_complete == [True]
    jsonschema.validate(json.loads(texts[0]), schema)


def test_regex_and_choice(model):
    texts, _ = _run(model, Constraint(regex=r"[0-9]{3}-[a-z]{2,4}"), seeds=(0, 1))
    assert all(re.fullmatch(r"[0-9]{3}-[a-z]{2,4}", t) for t in texts), texts
    texts, _ = _run(model, Constraint(choice=["yes", "no", "maybe later"]), seeds=(0, 1, 2))
    assert all(t in ("yes", "no", "maybe later") for t in texts), texts


def test_greedy_decoding_is_constrained_too(model):
    texts, _ = _run(model, Constraint(json_schema=PERSON), do_sample=False)
    jsonschema.validate(json.loads(texts[0]), PERSON)


def test_a_grammar_that_cannot_finish_reports_length(model, caplog):
    schema = {"type": "string", "minLength": 200}
    texts, stats = _run(model, Constraint(json_schema=schema), max_new_tokens=32)
    assert stats.grammar_complete == [False]
    assert texts[0].startswith('"') and not texts[0].endswith('"') or len(texts[0]) < 202
    assert "before its constraint was satisfied" in caplog.text


@pytest.mark.parametrize("policy", ["argmax", "dp"])
def test_a_dead_end_of_the_grammar_ends_incomplete(model, policy):
    """After "a" the grammar allows nothing (a rule cycle without text): the engine would allow only the
    end-of-sequence token there; the row is filled instead and reported incomplete, never complete."""
    texts, stats = _run(model, Constraint(grammar='start: "a" c | "bc"\nc: d\nd: c'), seeds=(0, 1),
                        constraint_policy=policy, max_new_tokens=32)
    for text, complete in zip(texts, stats.grammar_complete):
        assert (text, complete) in (("a", False), ("bc", True))


def test_unconstrained_rows_of_a_mixed_batch_equal_their_run_alone(model):
    ids = [model.tokenizer.encode(p) for p in ("def f(x):", "import os\n", "class A:")]
    rows = [None, Constraint(json_schema=PERSON), None]
    kw = dict(seed=[3, 4, 5], max_new_tokens=64, max_denoising_steps=8)
    mixed = model.generate([ids[0][:3], ids[1][:3], ids[2][:3]], constraint=rows, **kw).sequences
    for r in (0, 2):
        alone = model.generate([ids[r][:3]], seed=[3 + r], max_new_tokens=64, max_denoising_steps=8).sequences
        assert torch.equal(mixed[r], alone[0])
    jsonschema.validate(json.loads(_text(model, mixed[1, 3:].tolist())), PERSON)


def test_rows_with_different_grammars(model):
    ids = model.tokenizer.encode("x = ")
    flag = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"],
            "additionalProperties": False}
    rows = [Constraint(regex=r"[a-c]{5}"), Constraint(choice=["alpha", "beta"]), Constraint(json_schema=flag)]
    out = model.generate([ids] * 3, constraint=rows, seed=[0, 1, 2], max_new_tokens=32, max_denoising_steps=8)
    texts = [_text(model, row[len(ids):].tolist()) for row in out.sequences]
    assert re.fullmatch(r"[a-c]{5}", texts[0]) and texts[1] in ("alpha", "beta")
    jsonschema.validate(json.loads(texts[2]), flag)


def test_scheduler_constrains_one_request_and_keeps_the_other_exact(model):
    gen = model.generation_config.updated(max_new_tokens=64, max_denoising_steps=8)
    ids = model.tokenizer.encode("def f(x):")
    compiler = model.grammar_compiler(gen.eos_token_id)
    constraint = row_constraints(compiler, Constraint(json_schema=PERSON), 1, gen.pad_token_id)[0]
    scheduler = Scheduler(model.model, slots=2, max_len=256, max_queue=2)
    results = {}
    scheduler.submit([Request(ids, gen, 7, constraint=constraint), Request(ids, gen, 8)],
                     lambda i, e: results.__setitem__(i, e) if hasattr(e, "stats") else None)
    while scheduler.step():
        pass
    jsonschema.validate(json.loads(_text(model, results[0].tokens[0])), PERSON)
    assert results[0].stats.grammar_complete == [True] and results[1].stats.grammar_complete == [None]
    alone = model.generate([ids], seed=8, max_new_tokens=64, max_denoising_steps=8).sequences[0, len(ids):]
    assert results[1].tokens[0] == alone.tolist()


@pytest.mark.parametrize("constraint, message", [
    (dict(json_schema={"type": "strin"}), "invalid JSON schema"),
    (dict(json_schema={"type": "array", "uniqueItems": True}), 'unsupported JSON schema keywords ["uniqueItems"]'),
    (dict(json_schema={"not": {"type": "string"}}), 'unsupported JSON schema keywords ["not"]'),
    (dict(regex="[0-9]+("), "unclosed group"),
    (dict(choice=[]), "choice is empty"),
    (dict(regex="a[^\\s\\S]"), "regex matches no text"),
    (dict(grammar="start: foo"), "foo"),
    (dict(json_schema={"type": "string", "enum": ["x" * 100] * 1000}), "at most 65536 are allowed"),
    (dict(regex="(" * 40 + "a" + ")" * 40), "more than 32 levels deep"),
    (dict(json_schema=json.loads('{"items":' * 40 + "{}" + "}" * 40)), "nested more than 32 levels"),
])
def test_bad_constraints_are_refused_naming_the_problem(model, constraint, message):
    with pytest.raises(ConstraintError, match=re.escape(message)):
        _run(model, Constraint(**constraint))


def test_constraint_takes_exactly_one_kind():
    with pytest.raises(ConstraintError, match="exactly one"):
        Constraint(regex="a", choice=["a"])
    with pytest.raises(ConstraintError, match="exactly one"):
        Constraint()


def test_a_pass_over_its_mask_budget_leaves_the_tail_to_the_last_pass(model, monkeypatch):
    """With one token mask per pass, intermediate drafts are cut (a valid prefix, then the model's argmax); the
    pass that commits walks the rest, so every output still validates."""
    import dgemma.sampling.constraint as constraint_module

    monkeypatch.setattr(constraint_module, "MASK_WORK_PER_PASS", 1)
    cut = []
    original = constraint_module.CanvasConstraint.constrain

    def constrain(self, probs, argmax, final=True):
        out = original(self, probs, argmax, final)
        cut.append(self.cut)
        return out

    monkeypatch.setattr(constraint_module.CanvasConstraint, "constrain", constrain)
    texts, stats = _run(model, Constraint(json_schema=PERSON), seeds=(0, 1, 2))
    assert any(cut) and stats.grammar_complete == [True, True, True]
    for text in texts:
        jsonschema.validate(json.loads(text), PERSON)


def test_masked_distributions_keep_outputs_valid_and_other_rows_exact(model):
    """The measured alternative: entropy and self-conditioning from the distributions masked to the grammar."""
    from dgemma.engine.generate import generate

    gen = model.generation_config.updated(max_new_tokens=64, max_denoising_steps=8)
    ids = model.tokenizer.encode("def f(x):")
    compiler = model.grammar_compiler(gen.eos_token_id)
    rows = row_constraints(compiler, [Constraint(json_schema=PERSON), None], 2, gen.pad_token_id,
                           distributions="masked")
    seeds = [torch.Generator().manual_seed(s) for s in (0, 1)]
    out = generate(model.model, [ids, ids], gen, seeds, constraints=rows)
    assert rows[0].complete
    jsonschema.validate(json.loads(_text(model, out.tokens[0])), PERSON)
    alone = model.generate([ids], seed=1, max_new_tokens=64, max_denoising_steps=8).sequences[0, len(ids):]
    assert out.tokens[1] == alone.tolist()
