"""`dgemma info`: a model's architecture, parameter counts and memory needs, from its config alone."""

from __future__ import annotations

import argparse
import json
from typing import Any

from ..config import FULL, PRESETS, SLIDING, DiffusionGemmaConfig, GenerationConfig
from ..shipped import SHIPPED
from .common import resolve_model

BYTES_PER_PARAM = {"float32": 4.0, "bfloat16": 2.0, "float16": 2.0, "fp8": 1.0, "int4": 0.5}


def _human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    raise AssertionError  # unreachable


def _human_count(n: float) -> str:
    for value, suffix in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if abs(n) >= value:
            return f"{n / value:.2f}{suffix}"
    return str(int(n))


def model_info(name: str, source: str, config: DiffusionGemmaConfig, gen: GenerationConfig) -> dict[str, Any]:
    """Everything `dgemma info` shows, as plain data (`source`: "directory" or "preset"; no weights read)."""
    t = config.text_config
    layer_types = list(t.layer_types)

    def kind_info(kind: str) -> dict[str, Any] | None:
        layers = [i for i, k in enumerate(layer_types) if k == kind]
        if not layers:
            return None
        i = layers[0]
        info = {"layers": len(layers), "kv_heads": t.layer_kv_heads(i), "head_dim": t.layer_head_dim(i),
                "values_are_keys": kind == FULL}
        if kind == SLIDING:
            info["window"] = t.sliding_window
        return info

    # KV cache, bf16, one sequence: each layer stores keys and values [kv_heads, tokens, head_dim]. Full
    # layers keep every token; sliding layers keep at most sliding_window - 1 tokens (a ring buffer).
    full_per_token = sum(2 * t.layer_kv_heads(i) * t.layer_head_dim(i) * 2
                         for i, k in enumerate(layer_types) if k == FULL)
    sliding_per_token = sum(2 * t.layer_kv_heads(i) * t.layer_head_dim(i) * 2
                            for i, k in enumerate(layer_types) if k == SLIDING)
    window_tokens = max(t.sliding_window - 1, 0)

    def kv_at(tokens: int) -> int:
        return full_per_token * tokens + sliding_per_token * min(tokens, window_tokens)

    counts = config.parameter_counts()
    return {
        "model": name,
        "source": source,
        "random_weights": source == "preset",
        "config": {
            "layers": t.num_hidden_layers,
            "sliding_layers": layer_types.count(SLIDING),
            "full_layers": layer_types.count(FULL),
            "hidden_size": t.hidden_size,
            "intermediate_size": t.intermediate_size,
            "attention_heads": t.num_attention_heads,
            "sliding_attention": kind_info(SLIDING),
            "full_attention": kind_info(FULL),
            "experts": t.num_experts,
            "top_k_experts": t.top_k_experts,
            "expert_intermediate_size": t.moe_intermediate_size,
            "vocab_size": t.vocab_size,
            "context_length": t.max_position_embeddings,
            "sliding_window": t.sliding_window,
            "canvas_length": config.canvas_length,
        },
        "generation": {"max_new_tokens": gen.max_new_tokens, "max_denoising_steps": gen.max_denoising_steps,
                       "entropy_bound": gen.entropy_bound, "t_min": gen.t_min, "t_max": gen.t_max},
        "parameters": counts,
        "weights_bytes": {k: int(counts["total"] * b) for k, b in BYTES_PER_PARAM.items()},
        "kv_cache_bf16": {
            "bytes_per_token_full_layers": full_per_token,
            "bytes_per_token_sliding_layers": sliding_per_token,
            "sliding_tokens_max": window_tokens,
            "bytes_per_1k_tokens_full_layers": full_per_token * 1024,
            "bytes_sliding_layers_max": sliding_per_token * window_tokens,
            "bytes_at_1k_tokens": kv_at(1024),
        },
    }


def format_info(info: dict[str, Any]) -> str:
    c, p, kv = info["config"], info["parameters"], info["kv_cache_bf16"]
    src = "preset, random weights" if info["source"] == "preset" else "checkpoint directory"
    lines = [
        ("model", f"{info['model']} ({src})"),
        ("layers", f"{c['layers']} ({c['sliding_layers']} sliding, {c['full_layers']} full attention)"),
        ("hidden size", f"{c['hidden_size']} (dense MLP {c['intermediate_size']})"),
        ("query heads", str(c["attention_heads"])),
    ]
    for key, label in (("sliding_attention", "  sliding"), ("full_attention", "  full")):
        a = c[key]
        if a:
            extra = f", window {a['window']}" if "window" in a else ""
            extra += ", values = keys" if a["values_are_keys"] else ""
            lines.append((label, f"{a['kv_heads']} KV head{'s' if a['kv_heads'] != 1 else ''} x head dim {a['head_dim']}{extra}"))
    lines += [
        ("experts", f"{c['experts']}, top-{c['top_k_experts']}, expert dim {c['expert_intermediate_size']}"),
        ("vocab", f"{c['vocab_size']:,}"),
        ("context", f"{c['context_length']:,} tokens"),
        ("sliding window", f"{c['sliding_window']:,} tokens"),
        ("canvas length", f"{c['canvas_length']} tokens"),
        ("parameters", f"{_human_count(p['total'])} total ({p['total']:,}), {_human_count(p['active'])} active "
                       f"per token ({p['active']:,})"),
        ("", f"embedding {_human_count(p['embedding'])}, experts {_human_count(p['experts'])}"),
        ("weights", "  ".join(f"{k} {_human_bytes(v)}" for k, v in info["weights_bytes"].items())),
        ("KV cache (bf16)", f"{_human_bytes(kv['bytes_at_1k_tokens'])} at 1k tokens of context, per sequence: "
                            f"{_human_bytes(kv['bytes_per_1k_tokens_full_layers'])} per 1k tokens "
                            f"(full layers) + sliding layers up to "
                            f"{_human_bytes(kv['bytes_sliding_layers_max'])} ({kv['sliding_tokens_max']} tokens)"),
    ]
    g = info["generation"]
    lines.append(("sampler defaults", f"{g['max_denoising_steps']} steps, entropy bound {g['entropy_bound']}, "
                                      f"t {g['t_min']}..{g['t_max']}, {g['max_new_tokens']} new tokens"))
    width = max(len(k) for k, _ in lines)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in lines)


def add_parser(sub: argparse._SubParsersAction) -> None:
    i = sub.add_parser(
        "info", help="show a model's configuration, size and memory needs",
        description="Summarise a model: architecture, parameter counts, weight memory at several precisions "
                    "and a KV-cache estimate. Reads only config.json (no weights are loaded).")
    i.add_argument("model", metavar="MODEL", help=f"checkpoint directory, shipped model ({', '.join(SHIPPED)}) or "
                                                 f"preset ({', '.join(PRESETS)})")
    i.add_argument("--json", action="store_true", help="print the summary as JSON")
    i.set_defaults(func=cmd_info)


def cmd_info(args: argparse.Namespace) -> int:
    info = model_info(args.model, *resolve_model(args.model))
    print(json.dumps(info, indent=2) if args.json else format_info(info))
    return 0
