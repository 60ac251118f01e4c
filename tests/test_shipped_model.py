"""The model shipped in the repo loads (by path, and by name from anywhere), has learned Python, and generates."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import dgemma
from dgemma import shipped
from dgemma.cli import main
from dgemma.evaluate.loss import heldout_loss
from dgemma.train.base import load_base

SHIPPED = Path(__file__).resolve().parents[1] / "models" / "dgemma-code-tiny"
pytestmark = pytest.mark.skipif(not (SHIPPED / "config.json").is_file(), reason="no shipped model in this checkout")


@pytest.fixture(scope="module")
def model():
    return dgemma.DiffusionGemma.from_pretrained(SHIPPED)


def test_shipped_model_is_small_and_complete(model):
    size = sum(p.stat().st_size for p in SHIPPED.iterdir())
    assert size < 40 * 2**20
    assert model.tokenizer is not None and model.tokenizer.vocab_size == model.config.text_config.vocab_size
    assert model.config.text_config.num_experts > 1 and {"sliding_attention", "full_attention"} <= set(
        model.config.text_config.layer_types)


def test_shipped_model_predicts_held_out_python_far_better_than_chance(model):
    """Uniform guessing costs log(vocab) = 8.3 nats per token; the trained model must do much better on
    standard-library files it never saw."""
    loss = heldout_loss(model, length=256, max_chunks=4)
    assert loss["ar_loss"] < 5.0  # measured 4.1 (training eval, step 1300)
    assert loss["diffusion_loss_t0.25"] < loss["diffusion_loss_t0.75"] < 8.3


def test_shipped_model_generates_text(model):
    ids = model.tokenizer.encode("import os\n\n\ndef ")
    out = model.generate(input_ids=[ids], max_new_tokens=32, seed=0)
    text = model.tokenizer.decode(out.sequences[0, len(ids):], skip_special_tokens=True)
    assert text.strip() and out.tokens_per_forward.item() > 1.0
    # read as transformers' ModelOutput is: by key, by position over the fields set, unused fields None
    assert out["sequences"] is out.sequences and out[0] is out.sequences and out[1] is out.tokens_per_forward
    assert out.keys() == ["sequences", "tokens_per_forward", "stats"] and len(out.to_tuple()) == 3
    assert out.scores is None and out.logits is None and out.past_key_values is None and "scores" not in out
    with pytest.raises(KeyError):
        out["scores"]


# -- found by name ----------------------------------------------------------------------------------

def test_loads_by_name_from_any_directory(model, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    by_name = dgemma.DiffusionGemma.from_pretrained("dgemma-code-tiny")
    assert by_name.tokenizer is not None
    for (name, a), (_, b) in zip(model.model.state_dict().items(), by_name.model.state_dict().items()):
        assert torch.equal(a, b), name


def test_an_existing_path_wins_over_the_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert shipped.resolve("dgemma-code-tiny") == ("directory", SHIPPED)
    (tmp_path / "dgemma-code-tiny").mkdir()
    assert shipped.resolve("dgemma-code-tiny") == ("directory", Path("dgemma-code-tiny"))
    assert shipped.resolve("tiny") == ("preset", "tiny")


def test_found_in_the_installation_data_directory(tmp_path, monkeypatch):
    """A wheel installs the model under <data>/share/dgemma (pyproject.toml's data-files), where it is looked
    for when the package does not run from a source checkout."""
    pyproject = Path(__file__).resolve().parents[1] / "pyproject.toml"
    tomllib = pytest.importorskip("tomllib")
    data_files = tomllib.loads(pyproject.read_text())["tool"]["setuptools"]["data-files"]
    target = "/".join((*shipped.DATA_SUBDIR, "dgemma-code-tiny"))
    assert data_files[target] == ["models/dgemma-code-tiny/*"]
    installed = tmp_path.joinpath(*shipped.DATA_SUBDIR, "dgemma-code-tiny")
    installed.mkdir(parents=True)
    for f in SHIPPED.iterdir():
        (installed / f.name).symlink_to(f)
    monkeypatch.setattr(shipped, "_SOURCE_MODELS", tmp_path / "no-checkout")
    monkeypatch.setattr(shipped.sysconfig, "get_paths", lambda: {"data": str(tmp_path)})
    monkeypatch.chdir(tmp_path)
    assert shipped.resolve("dgemma-code-tiny") == ("directory", installed)


def test_not_installed_or_empty_name(tmp_path, monkeypatch):
    monkeypatch.setattr(shipped, "_SOURCE_MODELS", tmp_path / "none")
    monkeypatch.setattr(shipped.sysconfig, "get_paths", lambda: {"data": str(tmp_path / "none")})
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match="dgemma-code-tiny: the shipped model is not installed here"):
        dgemma.DiffusionGemma.from_pretrained("dgemma-code-tiny")
    for name in ("", " "):
        with pytest.raises(dgemma.ConfigError, match="empty model name"):
            dgemma.DiffusionGemma.from_pretrained(name)
    (tmp_path / "weights.bin").write_bytes(b"")
    with pytest.raises(dgemma.ConfigError, match="weights.bin: not a model directory"):
        dgemma.DiffusionGemma.from_pretrained("weights.bin")
    with pytest.raises(dgemma.ConfigError, match="weights.bin: not a model directory"):
        load_base("weights.bin")


def test_cli_uses_the_shipped_model_by_default(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    argv = ["generate", "def add(a, b):", "--max-new-tokens", "32", "--seed", "0", "--device", "cpu", "--json"]
    assert main(argv) == 0
    default_out, err = capsys.readouterr()
    assert "random weights" not in err
    assert main([*argv, "--model", str(SHIPPED)]) == 0
    by_path = json.loads(capsys.readouterr()[0])
    default = json.loads(default_out)
    assert default["model"] == "dgemma-code-tiny" and default["tokens"] == by_path["tokens"]
    assert main(["generate", "x", "--model", ""]) != 0
    assert "dgemma: error: empty model name" in capsys.readouterr()[1]
    (tmp_path / "notes.txt").write_text("x")
    assert main(["info", "notes.txt"]) != 0
    assert "dgemma: error: notes.txt: not a model directory" in capsys.readouterr()[1]


def test_fine_tuning_starts_from_the_name(model, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    base = load_base("dgemma-code-tiny")
    assert torch.equal(base.model.embed_tokens.weight, model.model.embed_tokens.weight)
