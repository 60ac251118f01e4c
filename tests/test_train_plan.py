"""`dgemma train --plan`: memory per process from the config alone, checked against the model and measurements."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from dgemma.config import preset
from dgemma.model.model import DiffusionGemmaModel
from dgemma.train.batches import pad_each
from dgemma.train.data import Example
from dgemma.train.lora import add_lora
from dgemma.train.objective import LossTotals, TrainingStep, plan_canvases
from dgemma.train.plan import Setup, activation_bytes, memory, parameter_counts


@pytest.mark.parametrize("name", ["tiny", "bench", "26b-a4b"])
def test_parameter_counts_are_the_models(name):
    config = preset(name)
    with torch.device("meta"):
        model = DiffusionGemmaModel(config)
    counts = parameter_counts(config)
    assert counts.total == sum(p.numel() for p in model.parameters())
    assert counts.layers == tuple(sum(p.numel() for p in layer.parameters()) for layer in model.layers)
    add_lora(model, 3)
    adapters = sum(p.numel() for n, p in model.named_parameters() if ".lora_" in n)
    assert adapters == 3 * (counts.root_adapters + sum(counts.layer_adapters))


def _saved_bytes(model: DiffusionGemmaModel, rows: int, seq_len: int) -> int:
    """Bytes autograd keeps for the backward pass of one TrainingStep (storages other than weights)."""
    config = model.config
    vocab = config.text_config.vocab_size
    g = torch.Generator().manual_seed(0)
    batch = pad_each([Example([2] + torch.randint(3, vocab, (seq_len - 2,), generator=g).tolist() + [1], 1, str(i))
                      for i in range(rows)], seq_len, pad_id=0)
    plan = plan_canvases(batch, config.canvas_length, vocab, 0, g, self_cond_prob=1.0)
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(t):
        if t.untyped_storage().data_ptr() not in weights:
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        TrainingStep(model)(batch, plan, LossTotals.of(batch, plan))
    return sum(saved.values())


@pytest.mark.parametrize("lora, grad_checkpoint, rows, seq_len, within", [
    (0, False, 1, 128, 0.05), (0, False, 2, 64, 0.05), (8, False, 2, 64, 0.05),
    # checkpointed: the plan also counts the encoder's keys and values the decoder holds, which autograd does not
    (0, True, 2, 128, 0.25),
])
def test_activations_are_what_autograd_keeps(lora, grad_checkpoint, rows, seq_len, within):
    config = preset("tiny")
    model = DiffusionGemmaModel(config).train().requires_grad_(not lora)
    if lora:
        add_lora(model, lora)
    model.gradient_checkpointing = grad_checkpoint
    measured = _saved_bytes(model, rows, seq_len)
    planned = activation_bytes(config, rows, seq_len, grad_checkpoint, "float32", lora).saved
    assert planned == pytest.approx(measured, rel=within)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _shard_and_step(rank: int, world: int, port: int, out: str, results) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    from torch.distributed.tensor import DTensor

    from dgemma.train import loop
    from dgemma.train.config import TrainConfig
    from dgemma.train.distributed import Distributed
    from dgemma.train.optim import build_optimizer

    def local(tensors):
        return sum((t.to_local() if isinstance(t, DTensor) else t).nbytes for t in tensors)

    dist = Distributed.start(torch.device("cpu"), sharded=True)
    for lora in LORA_RANKS:
        cfg = TrainConfig(data=[], out=out, model="tiny", batch_size=2, seq_len=32, fsdp=True, lora=lora)
        model, step = loop._setup_sharded(cfg, Path(out), dist)
        params = [p for p in step.parameters() if p.requires_grad]
        optimizer = build_optimizer(params, cfg.lr, cfg.betas, cfg.weight_decay)
        g = torch.Generator().manual_seed(0)
        batch = pad_each([Example([2] + torch.randint(3, 500, (28,), generator=g).tolist() + [1], 1, str(i))
                          for i in range(2)], 32, pad_id=0)
        plan = plan_canvases(batch, model.config.canvas_length, 512, 0, g)
        loop.train_step(step, batch, plan, optimizer, params, 1e-3, cfg, dist)
        state = [v for s in optimizer.state.values() for v in s.values() if v.dim()]
        results[rank, lora] = (local(step.parameters()), local(state),
                               all(isinstance(p, DTensor) for p in step.parameters()))
    dist.close()


LORA_RANKS = (0, 8)


def test_two_processes_hold_half_the_weights_and_optimizer_state_as_planned(tmp_path):
    """Measured in real sharded processes (the bytes of each one's shards after a step), full training and LoRA
    (whose frozen base is sharded too)."""
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_shard_and_step, args=(2, _free_port(), str(tmp_path), results), nprocs=2)
        results = dict(results)
    assert len(results) == 2 * len(LORA_RANKS)
    for (rank, lora), (params, optimizer, sharded) in results.items():
        planned = memory(preset("tiny"), Setup(world_size=2, fsdp=True, lora=lora, compute="float32"))
        alone = memory(preset("tiny"), Setup(world_size=1, fsdp=True, lora=lora, compute="float32"))
        assert sharded and (params, optimizer) == (planned.parameters, planned.optimizer), (rank, lora)
        assert params + optimizer == (alone.parameters + alone.optimizer) // 2


def test_plan_of_the_26b_model_from_its_config_alone(capsys, monkeypatch):
    from dgemma.cli import main

    def refuse(*args, **kwargs):
        raise AssertionError("the plan built a model")

    monkeypatch.setattr(DiffusionGemmaModel, "__init__", refuse)
    assert main(["train", "--plan", "--model", "26b-a4b", "--world-size", "8", "--fsdp", "--batch-size", "8",
                 "--seq-len", "2048", "--grad-checkpoint"]) == 0
    out = capsys.readouterr().out
    assert "model 26b-a4b: 25,250,986,752 parameters" in out
    lines = {line[:58].strip(): line[58:].split() for line in out.splitlines() if "process" in line[:58]}
    # float32 weights, gradients and AdamW's two moments of 25.25e9 parameters: 94.1 + 94.1 + 188.1 GiB
    assert lines["full, replicated, 1 process"][:3] == ["94.1", "94.1", "188.1"]
    assert lines["full, replicated, 1 process"][-1] == "no"
    assert lines["full, sharded, 8 processes"][-1] == "yes"
    assert lines["full, sharded + offload, 1 process"][-1] == "no"


def test_plan_refusals(capsys):
    from dgemma.cli import main

    assert main(["train", "--world-size", "2", "--data", "x", "--out", "y"]) == 2
    assert capsys.readouterr().err.strip() == ("dgemma: error: --world-size needs --plan (a run's processes are the "
                                               "ones torchrun starts)")
    assert main(["train", "--plan", "--world-size", "0"]) == 2
    assert capsys.readouterr().err.strip() == "dgemma: error: --world-size must be >= 1, got 0"
