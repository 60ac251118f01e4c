"""Sharded training (`dgemma train --fsdp`) in real torchrun runs on the CPU (gloo): the same losses and weights
as one unsharded process, sharded checkpoints that resume exactly and at another number of processes, the
export to the Hugging Face layout, LoRA over a sharded base, and the refusals."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dgemma import ConfigError
from dgemma.config import preset
from dgemma.train import TrainConfig
from dgemma.train.sharded_checkpoint import check_sharded

ARGS = ["--steps", "4", "--batch-size", "4", "--seq-len", "32", "--warmup", "1", "--holdout-frac", "0.25",
        "--eval-every", "2", "--save-every", "2", "--accum", "2", "--lr", "1e-3", "--device", "cpu"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
# two processes sum gradients in another order than one (fp32 rounding); AdamW's normalised step turns that into
# weight differences up to ~3e-5 after four steps (weights ~0.02), losses agree to ~1e-7 relative
LOSS_REL, WEIGHT_ATOL = 1e-5, 1e-4


def _torchrun(n: int, *args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(n), "-m",
            "dgemma", "train", *args]


def _plain(*args: str) -> list[str]:
    return [sys.executable, "-m", "dgemma", "train", *args]


def _run(*commands: list[str]) -> list[subprocess.CompletedProcess]:
    """Run the commands side by side; each must succeed."""
    procs = [subprocess.Popen(c, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for c in commands]
    done = []
    for proc, command in zip(procs, commands):
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, f"{' '.join(command)}\n{err[-3000:]}"
        done.append(subprocess.CompletedProcess(command, proc.returncode, out, err))
    return done


def metrics(out: Path) -> list[dict]:
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in ("elapsed_s", "tokens_per_s")} for r in records]


def assert_close_metrics(got: list[dict], expected: list[dict], rel: float) -> None:
    assert [r["step"] for r in got] == [r["step"] for r in expected]
    for g, e in zip(got, expected):
        assert g.keys() == e.keys()
        for key in e:
            assert g[key] == pytest.approx(e[key], rel=rel if key != "grad_norm" else 10 * rel), (g["step"], key)


def export(checkpoint: Path, out: Path) -> dict[str, torch.Tensor]:
    from dgemma.cli import main

    assert main(["train", "export", str(checkpoint), "--out", str(out)]) == 0
    return load_file(str(out / "model.safetensors"))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("corpus")
    for i in range(8):
        (root / f"m{i}.py").write_text("".join(f"def f{i}_{j}(x):\n    return x * {j} + {i}\n" for j in range(6)))
    return root


def _continue(source: Path, step: int, out: Path, partial_save: bool = False) -> Path:
    """A run directory as a run killed right after checkpoint-`step` leaves it (optionally with a save of the next
    checkpoint cut short)."""
    out.mkdir()
    shutil.copytree(source / f"checkpoint-{step}", out / f"checkpoint-{step}")
    shutil.copy(source / "metrics.jsonl", out / "metrics.jsonl")  # later records too: the resumed run drops them
    if partial_save:
        shards = out / f"checkpoint-{step + 2}.partial" / "shards"
        shards.mkdir(parents=True)
        (shards / "__0_0.distcp").write_bytes(b"cut short")
    return out


@pytest.fixture(scope="module")
def runs(corpus, tmp_path_factory) -> dict[str, Path]:
    """Four steps (checkpoints at 2 and 4, two micro-batches per step, clipping on) of: one unsharded process
    ("plain"), two sharded processes ("two"), one sharded process with activation checkpointing and CPU offload
    ("one", which also exports its final model); and "killed": "two" resumed from checkpoint-2 as a kill during the save of checkpoint-4 leaves it."""
    root = tmp_path_factory.mktemp("runs")
    data = ["--data", str(corpus), *ARGS, "--out"]
    _run(_torchrun(2, *data, str(root / "two"), "--fsdp"), _plain(*data, str(root / "plain")))
    killed = _continue(root / "two", 2, root / "killed", partial_save=True)
    _run(_torchrun(1, *data, str(root / "one"), "--fsdp", "--grad-checkpoint", "--fsdp-offload", "--export"),
         _torchrun(2, *data, str(killed), "--fsdp", "--resume"))
    return {name: root / name for name in ("plain", "two", "one", "killed")}


def test_two_sharded_processes_match_one_process(runs, tmp_path):
    assert_close_metrics(metrics(runs["two"]), metrics(runs["plain"]), LOSS_REL)
    assert [r["step"] for r in metrics(runs["two"]) if "eval_loss" in r] == [2, 4]
    expected = load_file(str(runs["plain"] / "checkpoint-4" / "model.safetensors"))
    got = export(runs["two"] / "checkpoint-4", tmp_path / "two")
    assert got.keys() == expected.keys()
    assert all(torch.allclose(got[k], expected[k], atol=WEIGHT_ATOL) for k in expected)
    # each process wrote its own shard file
    assert sorted(p.name for p in (runs["two"] / "checkpoint-4" / "shards").glob("*.distcp")) == \
        ["__0_0.distcp", "__1_0.distcp"]


def test_one_sharded_process_is_the_unsharded_run_bit_for_bit(runs, tmp_path):
    """One process: the same sums in the same order, with activation checkpointing and CPU offload too."""
    assert metrics(runs["one"]) == metrics(runs["plain"])
    expected = load_file(str(runs["plain"] / "checkpoint-4" / "model.safetensors"))
    for got in (export(runs["one"] / "checkpoint-4", tmp_path / "one"),
                load_file(str(runs["one"] / "export" / "model.safetensors"))):  # --export
        assert got.keys() == expected.keys() and all(torch.equal(got[k], expected[k]) for k in expected)


@torch.no_grad()
def test_the_export_loads_in_transformers_and_dgemma_with_identical_logits(runs, tmp_path):
    pytest.importorskip("transformers")
    from transformers import DiffusionGemmaForBlockDiffusion
    from transformers.cache_utils import DynamicCache

    export(runs["one"] / "checkpoint-4", tmp_path / "exported")
    models = [DiffusionGemmaForBlockDiffusion.from_pretrained(path).eval()
              for path in (tmp_path / "exported", runs["plain"] / "checkpoint-4")]
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 512, (1, 12), generator=g)
    canvas = torch.randint(0, 512, (1, 32), generator=g)
    logits = []
    for model in models:
        cache = DynamicCache(config=model.config.get_text_config(decoder=True))
        model.model.encoder(input_ids=ids, past_key_values=cache)
        logits.append(model(decoder_input_ids=canvas, past_key_values=cache).logits)
    assert torch.equal(logits[0], logits[1])
    from dgemma.cli import main

    assert main(["generate", "--model", str(tmp_path / "exported"), "--max-new-tokens", "8", "--seed", "0",
                 "def f("]) == 0  # with its tokenizer


def test_sharded_checkpoints_resume_exactly_and_at_another_world_size(runs, corpus, tmp_path):
    data = ["--data", str(corpus), *ARGS, "--fsdp", "--resume", "--out"]
    two_to_one = _continue(runs["two"], 2, tmp_path / "two_to_one")
    one_to_two = _continue(runs["one"], 2, tmp_path / "one_to_two")
    _run(_torchrun(1, *data, str(two_to_one)), _torchrun(2, *data, str(one_to_two)))

    # the same processes: exactly the uninterrupted run
    killed = runs["killed"]
    assert metrics(killed) == metrics(runs["two"])
    assert not (killed / "checkpoint-4.partial").exists()
    expected = export(runs["two"] / "checkpoint-4", tmp_path / "two")
    got = export(killed / "checkpoint-4", tmp_path / "killed_export")
    assert all(torch.equal(got[k], expected[k]) for k in expected)
    # another number of processes: the same loss curve, within float summation order
    for resumed, straight in ((two_to_one, runs["two"]), (one_to_two, runs["one"])):
        assert_close_metrics(metrics(resumed), metrics(straight), LOSS_REL)
        weights = export(resumed / "checkpoint-4", tmp_path / f"{resumed.name}_export")
        reference = export(straight / "checkpoint-4", tmp_path / f"{resumed.name}_reference")
        assert all(torch.allclose(weights[k], reference[k], atol=WEIGHT_ATOL) for k in reference)
    state = json.loads((two_to_one / "checkpoint-4" / "trainer_state.json").read_text())
    assert state["step"] == 4 and state["config"]["fsdp"] is True


def test_lora_shards_the_frozen_base_resumes_and_merges(corpus, tmp_path):
    data = ["--data", str(corpus), *ARGS, "--lora", "4", "--merge"]
    _run(_torchrun(2, *data, "--fsdp", "--out", str(tmp_path / "two")), _plain(*data, "--out", str(tmp_path / "one")))
    resumed = _continue(tmp_path / "two", 2, tmp_path / "resumed")
    _run(_torchrun(1, *data, "--fsdp", "--resume", "--out", str(resumed)))  # the adapters' shards, at 1 process
    for run in ("two", "resumed"):
        assert_close_metrics(metrics(tmp_path / run), metrics(tmp_path / "one"), LOSS_REL)
    checkpoint = tmp_path / "two" / "checkpoint-4"
    assert (checkpoint / "adapter_config.json").is_file()  # what `dgemma train merge` reads
    for run in ("two", "resumed"):
        for name in ("checkpoint-4/adapter_model.safetensors", "merged/model.safetensors"):
            got, expected = (load_file(str(tmp_path / r / name)) for r in (run, "one"))
            assert got.keys() == expected.keys()
            assert all(torch.allclose(got[k], expected[k], atol=WEIGHT_ATOL) for k in expected), (run, name)
    # only the adapters (and AdamW's state for them) are in the shards: the frozen base is --model's
    index = torch.distributed.checkpoint.FileSystemReader(str(checkpoint / "shards")).read_metadata()
    names = {k for k in index.state_dict_metadata if k.startswith("model.") and not k.endswith("layer_scalar")}
    assert names and all(".lora_" in k for k in names)


def test_refusals(runs, corpus, tmp_path, monkeypatch, capsys):
    from dgemma.cli import main

    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    assert main(["train", "--data", str(corpus), "--out", str(tmp_path / "run"), "--fsdp", "--device", "cpu"]) == 1
    assert capsys.readouterr().err.strip() == (
        "dgemma: error: --fsdp runs under torchrun (torchrun --nproc_per_node N -m dgemma train --fsdp ...; N may "
        "be 1): RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT not set")

    with pytest.raises(ConfigError, match=r"^--fsdp needs a --batch-size that the 2 processes divide, got 3: every "
                                          r"process runs every pass, since each pass gathers the sharded weights "
                                          r"from all of them$"):
        TrainConfig(data=["x"], out="y", batch_size=3, fsdp=True).validate(2)  # what each process checks first

    checkpoint = shutil.copytree(runs["two"] / "checkpoint-4", tmp_path / "checkpoint-4")
    with pytest.raises(ConfigError, match=r"checkpoint-4: saved for another model config \(head_dim 16 there, "
                                          r"64 here\): resume with the model it was trained from"):
        check_sharded(checkpoint, preset("bench"))
    (checkpoint / "shards" / "__1_0.distcp").unlink()
    assert main(["train", "export", str(checkpoint), "--out", str(tmp_path / "export")]) == 1
    assert capsys.readouterr().err.strip() == (
        f"dgemma: error: {checkpoint / 'shards'}: shard file __1_0.distcp is missing (the checkpoint has 2, one per "
        "process that saved it): restore it, or resume from an earlier checkpoint")
    assert main(["train", "export", str(runs["plain"] / "checkpoint-4"), "--out", str(tmp_path / "e")]) == 1
    assert "it is in the Hugging Face layout already" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="--fsdp-offload needs --fsdp"):
        TrainConfig(data=["x"], out="y", fsdp_offload=True).validate(1)


def test_a_vision_tower_goes_through_the_shards_to_the_export(vision_model_dir, corpus, tmp_path):
    """The tower is part of the model's weights: sharded with the rest, saved in the shards and exported; text
    training keeps it frozen, so it comes out bit for bit as it went in."""
    out = tmp_path / "run"
    _run(_torchrun(2, "--data", str(corpus), *ARGS, "--model", str(vision_model_dir), "--fsdp", "--export",
                   "--out", str(out)))
    base = load_file(str(vision_model_dir / "model.safetensors"))
    exported = load_file(str(out / "export" / "model.safetensors"))
    tower = sorted(k for k in base if k.startswith(("model.encoder.vision_tower.", "model.encoder.embed_vision.")))
    assert tower and all(torch.equal(exported[k], base[k].float()) for k in tower)
