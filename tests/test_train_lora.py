"""LoRA: which layers get adapters, merge equality, adapter save/load, and the CLI's train --lora / train merge."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

import dgemma
from dgemma.cli import main
from dgemma.config import preset
from dgemma.train.lora import TARGET_MODULES, add_lora, attach_adapter, merge_lora, save_adapter

pytest.importorskip("peft")



def outputs(model: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """Encoder AR logits and self-conditioned decoder logits of a fixed input."""
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 512, (2, 40), generator=g)
    canvas = torch.randint(0, 512, (2, 32), generator=g)
    with torch.no_grad():
        hidden, kv = model.encode_sequence(tokens)
        context = kv.at(torch.tensor([5, 30]))
        first = model.denoise(canvas, context)
        return model.logits(hidden), model.denoise(canvas, context, first)


def lora_model(rank: int = 4) -> torch.nn.Module:
    model = dgemma.DiffusionGemma.from_config(preset("tiny"), seed=0).model
    add_lora(model, rank)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # peft starts B at zero (a no-op adapter); make the adapter matter
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return model


def test_adapters_sit_on_the_linear_layers_and_only_they_train():
    model = lora_model()
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    wrapped = {n.split(".lora_")[0].rsplit(".", 1)[1] for n in trainable}
    assert wrapped == set(TARGET_MODULES)
    assert any(n.startswith("self_conditioning.mlp.") for n in trainable)
    assert not any("experts" in n for n in trainable)  # 3-D expert tensors stay frozen


def test_merged_model_matches_the_adapter_model():
    model = lora_model()
    before = outputs(model)
    base = outputs(dgemma.DiffusionGemma.from_config(preset("tiny"), seed=0).model)
    assert (before[0] - base[0]).abs().max() > 1e-3  # the adapter changes the outputs
    merge_lora(model)
    assert not any("lora" in n for n, _ in model.named_parameters())
    for a, b in zip(before, outputs(model)):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=0)


def test_saved_adapter_attaches_to_a_fresh_base(tmp_path):
    model = lora_model()
    save_adapter(model, tmp_path)
    assert {p.name for p in tmp_path.iterdir()} == {"adapter_config.json", "adapter_model.safetensors"}
    fresh = dgemma.DiffusionGemma.from_config(preset("tiny"), seed=0).model
    attach_adapter(fresh, tmp_path)
    for a, b in zip(outputs(model), outputs(fresh)):
        torch.testing.assert_close(b, a, atol=0, rtol=0)


def test_cli_lora_run_then_merge(tmp_path, capsys):
    data = tmp_path / "d.jsonl"
    records = ({"prompt": f"{i} + {i} =", "completion": f" {2 * i}"} for i in range(40))
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    out = tmp_path / "run"
    code = main(["train", "--data", str(data), "--out", str(out), "--lora", "4", "--merge", "--steps", "2",
                 "--batch-size", "4", "--seq-len", "16", "--no-pack", "--lr", "1e-2", "--device", "cpu"])
    assert code == 0, capsys.readouterr().err
    checkpoint = out / "checkpoint-2"
    assert (checkpoint / "adapter_model.safetensors").is_file() and not (checkpoint / "model.safetensors").exists()
    assert (out / "base" / "model.safetensors").is_file()  # the random base, kept so the adapter can be merged

    # the adapter keeps the run's tokenizer, and `train merge` gives it to the merged model (it took the base's,
    # wrong where --tokenizer replaced it): marked here by a chat template of its own
    assert (checkpoint / "tokenizer.json").is_file()
    (checkpoint / "chat_template.jinja").write_text("{{ 'the run' }}")
    assert main(["train", "merge", str(checkpoint), "--out", str(tmp_path / "merged")]) == 0
    assert (tmp_path / "merged" / "chat_template.jinja").read_text() == "{{ 'the run' }}"
    merged = dgemma.DiffusionGemma.from_pretrained(tmp_path / "merged").model
    at_end = dgemma.DiffusionGemma.from_pretrained(out / "merged").model
    base = dgemma.DiffusionGemma.from_pretrained(out / "base").model
    for a, b, c in zip(outputs(merged), outputs(at_end), outputs(base)):
        torch.testing.assert_close(a, b, atol=0, rtol=0)
        assert (a - c).abs().max() > 0  # training moved the adapters
    capsys.readouterr()
    # an adapter is not a model; a directory without an adapter is not one to merge (peft looked it up online)
    assert main(["generate", "--model", str(checkpoint), "def f("]) == 1
    assert "a LoRA adapter, not a model: merge it into its base with `dgemma train merge" in capsys.readouterr().err
    assert main(["train", "merge", str(out / "base"), "--out", str(tmp_path / "m2")]) == 1
    assert "base: no adapter_config.json (not a LoRA checkpoint" in capsys.readouterr().err


def saved_adapter(tmp_path) -> Path:
    """An adapter in tmp_path/adapter, trained (as it records) on the tiny base saved in tmp_path/base."""
    base = dgemma.DiffusionGemma.from_config(preset("tiny"), seed=0)
    base.save_pretrained(tmp_path / "base")
    add_lora(base.model, 4, base=str(tmp_path / "base"))
    save_adapter(base.model, tmp_path / "adapter")
    return tmp_path / "adapter"


def test_merge_refuses_an_adapter_of_another_architecture(tmp_path, capsys):
    adapter = saved_adapter(tmp_path)
    config = preset("tiny")
    narrow = dataclasses.replace(config, text_config=dataclasses.replace(config.text_config, hidden_size=32))
    dgemma.DiffusionGemma.from_config(narrow, seed=0).save_pretrained(tmp_path / "narrow")
    args = ["train", "merge", str(adapter), "--base", str(tmp_path / "narrow"), "--out", str(tmp_path / "merged")]
    assert main(args) == 1
    assert capsys.readouterr().err.strip() == (
        f"dgemma: error: {adapter}: the adapter does not fit the base model {tmp_path / 'narrow'}: "
        f"layers.0.self_attn.q_proj.lora_A.weight is [4, 64] in the adapter but [4, 32] in the base "
        f"(the adapter was trained on {tmp_path / 'base'})")
    assert not (tmp_path / "merged").exists()
    assert main(["train", "merge", str(adapter), "--out", str(tmp_path / "merged")]) == 0  # its own base fits


def test_merge_names_corrupt_adapter_weights(tmp_path, capsys):
    adapter = saved_adapter(tmp_path)
    weights = adapter / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    assert main(["train", "merge", str(adapter), "--out", str(tmp_path / "merged")]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"dgemma: error: {weights}: not a readable safetensors file, truncated or corrupt (")
    assert "Traceback" not in err and err.count("\n") == 1
    assert not (tmp_path / "merged").exists()


def test_merge_names_a_corrupt_adapter_config(tmp_path, capsys):
    adapter = saved_adapter(tmp_path)
    config = adapter / "adapter_config.json"
    config.write_text("{\n")
    assert main(["train", "merge", str(adapter), "--out", str(tmp_path / "merged")]) == 1
    assert capsys.readouterr().err.strip() == (f"dgemma: error: {config}: not valid JSON (Expecting property name "
                                               "enclosed in double quotes: line 2 column 1 (char 2))")
    config.write_text("[]")
    assert main(["train", "merge", str(adapter), "--out", str(tmp_path / "merged")]) == 1
    assert capsys.readouterr().err.strip() == (f"dgemma: error: {config}: not a LoRA adapter config "
                                               '(no "peft_type": "LORA")')
    assert not (tmp_path / "merged").exists()


def test_merge_refuses_a_preset_or_a_missing_base(tmp_path, capsys):
    adapter = saved_adapter(tmp_path)
    assert main(["train", "merge", str(adapter), "--base", "tiny", "--out", str(tmp_path / "merged")]) == 2
    assert capsys.readouterr().err.strip() == (
        "dgemma: error: --base tiny is a preset of random weights, not a trained model: pass --base DIR, the "
        f"checkpoint the adapter was trained on ({tmp_path / 'base'})")
    (tmp_path / "base").rename(tmp_path / "moved")
    assert main(["train", "merge", str(adapter), "--out", str(tmp_path / "merged")]) == 2
    assert capsys.readouterr().err.strip() == (f"dgemma: error: {adapter}: the base model it was trained on, "
                                               f"{tmp_path / 'base'}, is not there: pass --base DIR")
    assert not (tmp_path / "merged").exists()
    assert main(["train", "merge", str(adapter), "--base", str(tmp_path / "moved"),
                 "--out", str(tmp_path / "merged")]) == 0


def test_cli_lora_on_a_bfloat16_base(tmp_path, capsys):
    """--dtype bfloat16 keeps the frozen base in bf16 (half the memory) while the adapters train in fp32; the
    merged checkpoint is bf16 and equals the bf16 base with the trained adapters folded in."""
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"text": f"{i} plus {i} is {2 * i}"}) + "\n" for i in range(40)))
    out = tmp_path / "run"
    code = main(["train", "--data", str(data), "--out", str(out), "--lora", "4", "--dtype", "bfloat16", "--merge",
                 "--steps", "2", "--batch-size", "2", "--seq-len", "16", "--lr", "1e-2", "--device", "cpu",
                 "--holdout-frac", "0"])
    assert code == 0, capsys.readouterr().err
    from safetensors import safe_open
    with safe_open(str(out / "checkpoint-2" / "adapter_model.safetensors"), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.float32}
    with safe_open(str(out / "merged" / "model.safetensors"), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}
    merged = dgemma.DiffusionGemma.from_pretrained(out / "merged", dtype=torch.bfloat16).model
    base = dgemma.DiffusionGemma.from_pretrained(out / "base", dtype=torch.bfloat16).model
    attach_adapter(base, out / "checkpoint-2")
    for name, p in base.named_parameters():
        assert p.dtype == (torch.float32 if ".lora_" in name else torch.bfloat16), name
    merge_lora(base)
    for a, b in zip(outputs(merged), outputs(base)):
        torch.testing.assert_close(a, b, atol=0, rtol=0)
    # a resumed run must keep the dtype; full training cannot take one
    assert main(["train", "--data", str(data), "--out", str(out), "--lora", "4", "--steps", "3", "--batch-size", "2",
                 "--seq-len", "16", "--device", "cpu", "--holdout-frac", "0", "--resume"]) == 1
    assert "cannot resume with different settings (dtype: 'bfloat16' -> 'float32')" in capsys.readouterr().err
    assert main(["train", "--data", str(data), "--out", str(tmp_path / "full"), "--dtype", "bfloat16"]) == 1
    assert "--dtype bfloat16 needs --lora" in capsys.readouterr().err
