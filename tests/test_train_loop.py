"""The training loop: exact resume, stop on a signal, outputs, refusals, and 2 processes == 1 process."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import dgemma
from dgemma import ConfigError
from dgemma.train import TrainConfig, loop, train

SMALL = dict(model="tiny", batch_size=4, seq_len=32, warmup=2, holdout_frac=0.25, eval_every=2, eval_batches=1)



@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("corpus")
    for i in range(8):
        (root / f"m{i}.py").write_text("".join(f"def f{i}_{j}(x):\n    return x * {j} + {i}\n" for j in range(6)))
    return root


def weights(checkpoint: Path) -> dict[str, torch.Tensor]:
    """The full model's weights, or a LoRA run's adapter weights."""
    [file] = [f for f in ("model.safetensors", "adapter_model.safetensors") if (checkpoint / f).is_file()]
    return load_file(str(checkpoint / file))


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def losses(out: Path) -> list[tuple]:
    return [(r["step"], r.get("loss"), r.get("eval_loss")) for r in metrics(out)]


@pytest.mark.parametrize("lora", [0, 4])
def test_resume_reproduces_an_uninterrupted_run(corpus, tmp_path, monkeypatch, lora):
    straight = train(TrainConfig(data=[str(corpus)], out=str(tmp_path / "a"), steps=4, save_every=2, lora=lora,
                                 **SMALL))

    save = loop.save_checkpoint

    def crash_after_first_save(out, model, optimizer, state, lora):
        path = save(out, model, optimizer, state, lora)
        if state.step == 2:
            raise KeyboardInterrupt  # as if killed right after checkpoint-2 was written
        return path

    monkeypatch.setattr(loop, "save_checkpoint", crash_after_first_save)
    cfg = TrainConfig(data=[str(corpus)], out=str(tmp_path / "b"), steps=4, save_every=2, lora=lora, **SMALL)
    with pytest.raises(KeyboardInterrupt):
        train(cfg)
    monkeypatch.undo()
    resumed = train(TrainConfig(**{**cfg.__dict__, "resume": True}))

    assert resumed.name == straight.name == "checkpoint-4"
    a, b = weights(straight), weights(resumed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert losses(tmp_path / "a") == losses(tmp_path / "b")  # the resumed run's log replaces steps after 2
    assert [r["step"] for r in metrics(tmp_path / "b") if "eval_loss" in r] == [2, 4]
    state = json.loads((resumed / "trainer_state.json").read_text())
    assert state["step"] == 4 and state["config"]["seq_len"] == 32
    assert (tmp_path / "b" / "loss_curve.png").stat().st_size > 1000


def test_refuses_to_overwrite_or_resume_with_other_settings(corpus, tmp_path):
    cfg = TrainConfig(data=[str(corpus)], out=str(tmp_path), steps=1, **SMALL)
    train(cfg)
    with pytest.raises(ConfigError, match="already holds checkpoint-1: pass --resume"):
        train(cfg)
    with pytest.raises(ConfigError, match=r"cannot resume with different settings \(seq_len: 32 -> 16\)"):
        train(TrainConfig(**{**cfg.__dict__, "resume": True, "seq_len": 16}))


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "dgemma", "train", *args]


@pytest.mark.parametrize("flags, message", [
    (["--lr", "-1"], "--lr must be a number > 0, got -1.0"),
    (["--lr", "nan"], "--lr must be a number > 0, got nan"),
    (["--warmup", "-5"], "--warmup must be >= 0, got -5"),
    (["--clip", "0"], "--clip must be a number > 0 (inf: no clipping), got 0.0"),
    (["--weight-decay", "-1"], "--weight-decay must be a number >= 0, got -1.0"),
    (["--seed", "-1"], "--seed must be >= 0, got -1"),
    (["--holdout-frac", "1"], "--holdout-frac must be in [0, 1), got 1.0"),
    (["--lora-alpha", "4"], "--lora-alpha needs --lora and a number > 0, got 4.0"),
    (["--lora", "2", "--lora-alpha", "-1"], "--lora-alpha needs --lora and a number > 0, got -1.0"),
    (["--model", "runs/x/checkpoint-9", "--config-json", "c.json"],
     "--config-json makes random weights, so --model runs/x/checkpoint-9 would be ignored: pass one or the other"),
])
def test_cli_refuses_bad_optimiser_settings_before_any_work(flags, message, tmp_path, capsys):
    from dgemma.cli import main

    code = main(["train", "--data", str(tmp_path), "--out", str(tmp_path / "run"), "--device", "cpu", *flags])
    assert code == 1
    assert capsys.readouterr().err.strip() == f"dgemma: error: {message}"
    assert not (tmp_path / "run").exists()


def _run_cli(corpus: Path, out: Path, *flags: str) -> int:
    from dgemma.cli import main

    return main(["train", "--data", str(corpus), "--out", str(out), "--steps", "1", "--batch-size", "4",
                 "--seq-len", "32", "--device", "cpu", *flags])


def test_warns_when_nothing_is_held_out_to_evaluate(corpus, tmp_path, capsys):
    from dgemma.train.data import is_held_out

    assert not any(is_held_out(f"m{i}.py", 0.01) for i in range(8))  # the default fraction holds none of 8 files
    assert _run_cli(corpus, tmp_path / "a", "--eval-every", "1") == 0
    err = capsys.readouterr().err
    assert ("dgemma: warning: 0 held-out rows (--holdout-frac 0.01 of this data holds none out): --eval-every will "
            "not evaluate; use a larger --holdout-frac or --eval-data\n") in err
    assert not any("eval_loss" in r for r in metrics(tmp_path / "a"))
    assert _run_cli(corpus, tmp_path / "b", "--eval-every", "1", "--holdout-frac", "0") == 0  # asked for none
    assert "warning: 0 held-out rows" not in capsys.readouterr().err


def test_says_when_the_loss_curve_is_not_drawn(corpus, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` fails as if not installed
    assert _run_cli(corpus, tmp_path, "--holdout-frac", "0.25") == 0
    err = capsys.readouterr().err
    assert "dgemma: warning: loss_curve.png not drawn: it needs matplotlib (pip install 'dgemma[train]')\n" in err
    assert (tmp_path / "metrics.jsonl").is_file() and not (tmp_path / "loss_curve.png").exists()


def test_sigterm_saves_a_checkpoint_that_resumes(corpus, tmp_path):
    out = tmp_path / "run"
    args = ["--data", str(corpus), "--out", str(out), "--batch-size", "2", "--seq-len", "32", "--save-every", "1000",
            "--device", "cpu"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(_cli(*args, "--steps", "1000"), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    deadline = time.monotonic() + 60
    while not (out / "metrics.jsonl").is_file() or not (out / "metrics.jsonl").read_text():
        assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read() if proc.poll() else "timeout"
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    [checkpoint] = list(out.glob("checkpoint-*"))
    step = int(checkpoint.name.split("-")[1])
    assert step >= 1 and (checkpoint / "optimizer.pt").is_file()
    done = subprocess.run(_cli(*args, "--steps", str(step + 1), "--resume"), env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == str(out / f"checkpoint-{step + 1}")


def test_two_processes_match_one(corpus, tmp_path):
    args = ["--data", str(corpus), "--steps", "3", "--batch-size", "4", "--seq-len", "32", "--warmup", "1",
            "--holdout-frac", "0.25", "--eval-every", "3", "--device", "cpu", "--lr", "1e-3"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "dgemma",
                "train", *args, "--out", str(tmp_path / "two")]
    two = subprocess.Popen(torchrun, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    one = subprocess.run(_cli(*args, "--out", str(tmp_path / "one")), env=env, capture_output=True, text=True,
                         timeout=180)
    _, err = two.communicate(timeout=180)
    assert one.returncode == 0, one.stderr
    assert two.returncode == 0, err
    m1, m2 = metrics(tmp_path / "one"), metrics(tmp_path / "two")
    assert [r["step"] for r in m1] == [r["step"] for r in m2] == [1, 2, 3, 3]
    for r1, r2 in zip(m1, m2):
        for key in ("loss", "diffusion_loss", "ar_loss", "eval_loss"):
            if key in r1:
                assert r2[key] == pytest.approx(r1[key], rel=1e-4), key
    a, b = weights(tmp_path / "one" / "checkpoint-3"), weights(tmp_path / "two" / "checkpoint-3")
    # the gradients are summed in another order over two processes (fp32 rounding), which AdamW's normalised
    # step turns into differences up to ~2e-5 on weights of ~0.02 after three steps
    assert all(torch.allclose(a[k], b[k], atol=1e-4) for k in a)


def test_a_resumed_model_trains_on_its_own_aligned_storage(corpus, tmp_path):
    """Loaded tensors are views into the checkpoint file at arbitrary offsets, where CPU kernels round
    differently (a resumed run drifted from an uninterrupted one after ~30 steps): training takes copies."""
    from dgemma.train.distributed import Distributed

    cfg = TrainConfig(data=[str(corpus)], out=str(tmp_path), steps=1, **SMALL)
    checkpoint = train(cfg)
    loaded = dgemma.DiffusionGemma.from_pretrained(checkpoint)
    assert any(p.data_ptr() % 64 for p in loaded.model.parameters())  # the file's layout, as loaded
    model = loop._setup_model(cfg, checkpoint, tmp_path, Distributed())
    assert all(p.data_ptr() % 64 == 0 for p in model.model.parameters())
    for (name, p), q in zip(model.model.named_parameters(), loaded.model.parameters()):
        assert torch.equal(p, q), name


def test_eval_data_covering_all_data_is_named(corpus, tmp_path, capsys):
    assert _run_cli(corpus, tmp_path / "run", "--eval-data", str(corpus), "--holdout-frac", "0") == 1
    assert capsys.readouterr().err.strip() == ("dgemma: error: every --data input is also under --eval-data, which "
                                               "is held out whole: nothing is left to train on")
