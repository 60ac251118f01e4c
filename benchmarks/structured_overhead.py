#!/usr/bin/env python
"""What the grammar constraint costs, and what its design choices do. Prints one JSON object.

  engine      the constraint's own work per denoising pass at Gemma 4's vocabulary (262,144, the benchmark BPE of
              `big_vocab.py`) and canvas 256: a row's `CanvasConstraint` driven through a canvas's passes
              (constrain the draft, check the accepted samples, commit), with no model, so only its own work is
              timed. Two synthetic models: `settling` (each position's argmax is the reference JSON's token from a
              random pass on, a random token before it, as drafts settle over passes) and `random` (every argmax
              random: the worst case, a mask and a masked argmax at every position).
  end_to_end  constrained against unconstrained generation, same prompts and seeds: tokens/s, passes per canvas,
              validity, the constraint's work per pass and the log-probability of the committed output under the
              model, for the masked argmax and the dynamic program, with the model's own distributions for
              entropy and self-conditioning and with them masked to the grammar. On the `bench` preset (random
              weights, the shipped model's 4096-token tokenizer) and the shipped model.

    python benchmarks/structured_overhead.py                     # both parts
    python benchmarks/structured_overhead.py --parts engine --passes 16
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from big_vocab import gemma_sized_tokenizer  # noqa: E402
from common import Parser, machine_info  # noqa: E402

from dgemma import Constraint, DiffusionGemma  # noqa: E402
from dgemma.config import preset  # noqa: E402
from dgemma.engine.generate import generate  # noqa: E402
from dgemma.sampling.constraint import DISTRIBUTIONS, POLICIES, CanvasConstraint, row_constraints  # noqa: E402
from dgemma.sampling.grammar import GrammarCompiler  # noqa: E402
from dgemma.shipped import resolve  # noqa: E402
from dgemma.tokenizer import Tokenizer  # noqa: E402

PROG = Path(__file__).name
RECORD = {"type": "object", "properties": {
    "id": {"type": "integer", "minimum": 0, "maximum": 99999}, "name": {"type": "string", "maxLength": 24},
    "email": {"type": "string", "format": "email"}, "score": {"type": "number", "minimum": 0, "maximum": 1},
    "role": {"enum": ["admin", "editor", "viewer"]}, "tags": {"type": "array", "items": {"type": "string",
                                                                                          "maxLength": 10},
                                                                "maxItems": 4}},
    "required": ["id", "name", "email", "score", "role", "tags"], "additionalProperties": False}
# end to end: a record the shipped model can finish (its numbers and strings bounded; it knows no JSON)
ROW = {"type": "object", "properties": {
    "id": {"type": "integer", "minimum": 0, "maximum": 9999}, "name": {"type": "string", "maxLength": 12},
    "role": {"enum": ["admin", "editor", "viewer"]}, "active": {"type": "boolean"},
    "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "maxItems": 3}},
    "required": ["id", "name", "role", "active", "tags"], "additionalProperties": False}
SCHEMA = {"type": "object", "properties": {"people": {"type": "array", "items": RECORD, "minItems": 1}},
          "required": ["people"], "additionalProperties": False}


def _reference_json(n: int) -> str:
    """A document valid under SCHEMA with n records, written compactly (as the constraint writes JSON)."""
    rng = random.Random(0)
    words = ["ada", "grace", "alan", "edsger", "barbara", "donald", "ken", "dennis", "linus", "guido"]
    people = [{"id": rng.randrange(100000), "name": f"{rng.choice(words).title()} {rng.choice(words).title()}",
               "email": f"{rng.choice(words)}{i}@example.org", "score": round(rng.random(), 3),
               "role": rng.choice(["admin", "editor", "viewer"]), "tags": rng.sample(words, rng.randrange(4))}
              for i in range(n)]
    return json.dumps({"people": people}, separators=(",", ":"))


def _ms(values: list[float]) -> dict[str, float]:
    values = sorted(values)
    return {"mean_ms": round(1e3 * statistics.fmean(values), 3), "median_ms": round(1e3 * statistics.median(values), 3),
            "p90_ms": round(1e3 * values[int(0.9 * (len(values) - 1))], 3), "max_ms": round(1e3 * values[-1], 3)}


# -- the constraint alone at Gemma 4's vocabulary ----------------------------------------------------------------

def engine_part(args: argparse.Namespace) -> dict[str, Any]:
    tok = gemma_sized_tokenizer()
    vocab, c, eos, pad = tok.vocab_size, args.canvas, [tok.eos_id], tok.pad_id
    t0 = time.perf_counter()
    compiler = GrammarCompiler(tok.backend.to_str(), vocab, eos)
    setup_s = time.perf_counter() - t0
    target = tok.encode(_reference_json(args.records), add_bos=False) + [eos[0]]
    canvases = [target[i:i + c] for i in range(0, len(target), c)][:args.canvases]
    gen = torch.Generator().manual_seed(0)
    noise = torch.randn(c, vocab, generator=gen)  # the logits' background, shared by every pass
    out: dict[str, Any] = {"vocab": vocab, "canvas": c, "passes": args.passes, "canvases": len(canvases),
                           "target_tokens": len(target), "compiler_setup_s": round(setup_s, 2), "runs": []}
    for model in args.synthetic.split(","):
        for policy in args.policies.split(","):
            variants = [(True, "model"), (False, "model"), (True, "masked")] if policy == "argmax" else [(True, "model")]
            for budget, dists in variants:
                if policy == "dp" and model == "random" and not args.dp_random:
                    continue
                out["runs"].append(_engine_run(compiler, canvases, noise, model, policy, args, pad, vocab, budget,
                                               dists))
                print(f"engine {model} {policy} budget={budget} {dists}: {out['runs'][-1]['per_pass']}",
                      file=sys.stderr)
    return out


def _engine_run(compiler, canvases, noise, model: str, policy: str, args, pad: int, vocab: int,
                budget: bool, dists: str) -> dict[str, Any]:
    """`budget` False: every pass walks the whole draft (as the last pass does), for comparison; `dists` "masked":
    each pass also computes the masks that masking entropy and self-conditioning needs."""
    rng = random.Random(1)
    constraint = CanvasConstraint(compiler.matcher(Constraint(json_schema=SCHEMA)), compiler.stop_ids, vocab, pad,
                                  policy, distributions=dists)
    per_pass, final_pass, masks, walked = [], [], [], 0
    c = noise.shape[0]
    for target in canvases:
        target = target + [pad] * (c - len(target))
        settle = [rng.randrange(int(0.7 * args.passes)) for _ in range(c)]
        argmax = [rng.randrange(vocab) for _ in range(c)]
        for k in range(args.passes):
            for i in range(c):
                if model == "settling" and k >= settle[i]:
                    argmax[i] = target[i]
                elif rng.random() < 0.5:  # an unsettled position's argmax moves half of the passes
                    argmax[i] = rng.randrange(vocab)
            am = torch.tensor(argmax)
            logits = noise.clone()
            logits[torch.arange(c), am] += 12.0
            probs = torch.softmax(logits, -1)
            accepted = torch.zeros(c, dtype=torch.bool)
            accepted[torch.randperm(c, generator=torch.Generator().manual_seed(k))[:c // args.passes]] = True
            sampled = torch.where(torch.rand(c, generator=torch.Generator().manual_seed(k + 99)) < 0.9, am,
                                  torch.randint(vocab, (c,), generator=torch.Generator().manual_seed(k + 7)))
            work0, masks0 = constraint.work_s, constraint.masks_computed
            draft = constraint.constrain(probs, am, final=k == args.passes - 1 or not budget)
            if dists == "masked":
                constraint.position_masks(c)
            constraint.accept(draft, sampled, accepted)
            (final_pass if k == args.passes - 1 else per_pass).append(constraint.work_s - work0)
            masks.append(constraint.masks_computed - masks0)
        tokens = draft.tolist()
        if constraint._ended:  # noqa: SLF001 -- as the engine commits: pad after the stop token
            end = next(i for i, t in enumerate(tokens) if t in constraint.stop_ids)
            tokens = tokens[:end + 1] + [pad] * (c - end - 1)
        constraint.commit(tokens)
        walked += 1
    return {"model": model, "policy": policy, "pass_budget": budget, "distributions": dists, "per_pass": _ms(per_pass + final_pass),
            "passes_before_the_last": _ms(per_pass), "last_pass": _ms(final_pass),
            "masks_per_pass": round(statistics.fmean(masks), 2), "canvases": walked}


# -- end to end ---------------------------------------------------------------------------------------------------

def _models() -> dict[str, DiffusionGemma]:
    shipped = DiffusionGemma.from_pretrained("dgemma-code-tiny")
    bench = DiffusionGemma.from_config(preset("bench"), seed=0)
    bench.tokenizer = Tokenizer.from_dir(resolve("dgemma-code-tiny")[1])  # 4096 tokens, as the preset's vocabulary
    bench.generation_config = shipped.generation_config
    return {"bench": bench, "dgemma-code-tiny": shipped}


def end_to_end_part(args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {"schema": ROW, "rows": args.rows, "max_new_tokens": args.max_new_tokens,
                           "max_denoising_steps": args.steps, "runs": []}
    variants = [("unconstrained", None, None)] + [(f"{p}/{d}", p, d) for p in POLICIES for d in DISTRIBUTIONS]
    for name, model in _models().items():
        prompt = model.tokenizer.encode('data = {"a": 1, "b": [2, 3], "c": "x"}\nvalue = ')
        gen = model._generation_config(None, len(prompt), dict(max_new_tokens=args.max_new_tokens,  # noqa: SLF001
                                                                 max_denoising_steps=args.steps))
        for _, policy, dists in variants:
            _generate(model, prompt, gen, 1, policy, dists)  # warm-up
        runs: dict[str, list] = {label: [] for label, _, _ in variants}
        for _ in range(args.repeats):  # interleaved: a drift in the machine's load hits every variant alike
            for label, policy, dists in variants:
                runs[label].append(_generate(model, prompt, gen, args.rows, policy, dists))
        for label, _, _ in variants:
            result, constraints, _ = runs[label][0]
            wall = statistics.median(r[2] for r in runs[label])
            out["runs"].append(_summary(name, label, model, prompt, result, constraints, wall))
            print(f"e2e {name} {label}: {out['runs'][-1]}", file=sys.stderr)
    return out


def _generate(model, prompt, gen, rows: int, policy: str | None, dists: str | None):
    constraints = None
    if policy is not None:
        compiler = model.grammar_compiler(gen.eos_token_id)
        constraints = row_constraints(compiler, Constraint(json_schema=ROW), rows, gen.pad_token_id, policy, dists)
    generators = model._generators(rows, list(range(rows)), gen.do_sample)  # noqa: SLF001
    t0 = time.perf_counter()
    result = generate(model.model, [prompt] * rows, gen, generators, None, None, constraints)
    return result, constraints, time.perf_counter() - t0


def _summary(name, label, model, prompt, result, constraints, wall) -> dict[str, Any]:
    import jsonschema

    stats = result.stats
    passes = [p for row in stats.passes_per_canvas for p in row]
    canvases = max(map(len, stats.passes_per_canvas))
    executed = sum(max(row[ci] for row in stats.passes_per_canvas if ci < len(row)) for ci in range(canvases))
    info = {"model": name, "variant": label, "wall_s": round(wall, 3), "new_tokens": sum(stats.new_tokens),
            "tokens_per_s": round(sum(stats.new_tokens) / wall, 1), "ms_per_batch_pass": round(1e3 * wall / executed, 2),
            "passes_per_canvas": round(statistics.fmean(passes), 2), "canvases": len(passes)}
    if constraints is None:
        return info
    stop = set(model.generation_config.eos_token_id)
    valid = 0
    for tokens, c in zip(result.tokens, constraints):
        tokens = tokens[:next((i for i, t in enumerate(tokens) if t in stop), len(tokens))]
        if c.complete:
            jsonschema.validate(json.loads(model.tokenizer.decode(tokens, skip_special_tokens=True)), ROW)
            valid += 1  # (an invalid complete output raises: validity by construction is not measured, it is checked)
    info.update(complete=sum(c.complete for c in constraints), valid=valid,
                constraint_ms_per_pass=round(1e3 * sum(c.work_s for c in constraints) / max(sum(passes), 1), 3),
                masks_per_pass=round(sum(c.masks_computed for c in constraints) / max(sum(passes), 1), 2),
                committed_logp_per_token=round(sum(c.committed_logp for c in constraints)
                                               / max(sum(c.committed_tokens for c in constraints), 1), 3))
    return info


def main(argv: list[str] | None = None) -> int:
    p = Parser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--parts", default="engine,end_to_end")
    p.add_argument("--canvas", type=int, default=256)
    p.add_argument("--passes", type=int, default=16, help="denoising passes per canvas (engine part)")
    p.add_argument("--canvases", type=int, default=3)
    p.add_argument("--records", type=int, default=12, help="records in the reference JSON (engine part)")
    p.add_argument("--synthetic", default="settling,random", help="synthetic models of the engine part")
    p.add_argument("--policies", default=",".join(POLICIES))
    p.add_argument("--dp-random", action="store_true", help="also run the dynamic program on random argmaxes")
    p.add_argument("--rows", type=int, default=8, help="rows per generate call (end-to-end part)")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--steps", type=int, default=16)
    p.add_argument("--repeats", type=int, default=3, help="timed runs per variant (median wall time)")
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    result: dict[str, Any] = {"machine": machine_info("cpu"), "command": " ".join(["python", "benchmarks/" + PROG,
                                                                                   *(argv or sys.argv[1:])])}
    parts = args.parts.split(",")
    if "engine" in parts:
        result["engine"] = engine_part(args)
    if "end_to_end" in parts:
        result["end_to_end"] = end_to_end_part(args)
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
