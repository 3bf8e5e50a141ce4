import json
import re

import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from falcon_bridge.cards import load_card
from falcon_bridge.converters.create_random import CreateRandomOptions, create_random
from falcon_bridge.core.mapping import hf_tensor_shapes, num_parameters


def test_sharded_output_loads_in_transformers_with_every_tensor(tmp_path):
    card = load_card("tiny-groups-gated-norm")
    out = tmp_path / "ckpt"
    summary = create_random(CreateRandomOptions(card, out, seed=3, dtype=torch.bfloat16, max_shard_bytes=100_000))
    assert len(summary.files) > 1
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(hf_tensor_shapes(card.arch))
    config = json.loads((out / "config.json").read_text())
    assert config["head_dim"] == card.arch.head_dim and config["ssm_multipliers"] == list(card.arch.multipliers.ssm)
    assert (out / "generation_config.json").exists()
    model = AutoModelForCausalLM.from_pretrained(out)
    assert sum(p.numel() for p in model.parameters()) == num_parameters(card.arch) == summary.parameters
    state = model.state_dict()
    for name, file in index["weight_map"].items():
        with safe_open(out / file, "pt") as f:
            assert torch.equal(f.get_tensor(name), state[name]), name


def test_weights_are_realistic_and_reproducible(tmp_path):
    card = load_card("tiny-one-group")
    a, b = tmp_path / "a", tmp_path / "b"
    create_random(CreateRandomOptions(card, a, seed=7, dtype=torch.float32))
    create_random(CreateRandomOptions(card, b, seed=7, dtype=torch.float32))
    assert (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()
    with safe_open(a / "model.safetensors", "pt") as f:
        a_log = f.get_tensor("model.layers.0.mamba.A_log")
        dt_bias = f.get_tensor("model.layers.0.mamba.dt_bias")
        d = f.get_tensor("model.layers.0.mamba.D")
        norm = f.get_tensor("model.layers.0.input_layernorm.weight")
    n = card.arch.mamba_n_heads
    assert not torch.allclose(a_log, torch.log(torch.arange(1, n + 1, dtype=torch.float32)))
    assert (a_log.exp() >= 1).all() and (a_log.exp() <= 16).all()
    dt = torch.nn.functional.softplus(dt_bias)
    assert (dt > 9e-4).all() and (dt < 0.11).all()
    assert not torch.allclose(d, torch.ones_like(d)) and not torch.allclose(norm, torch.ones_like(norm))


def test_a_small_tokenizer_is_built_offline_with_the_configs_special_ids(tmp_path):
    from transformers import AutoTokenizer

    card = load_card("tiny-vocab-pad")  # vocabularies under 512 ids get none (too small for byte-level BPE)
    summary = create_random(CreateRandomOptions(card, tmp_path / "ckpt", dtype=torch.float32))
    assert "tokenizer.json" in summary.tokenizer_files
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "ckpt")
    ids = tokenizer("Falcon-H1 is a parallel hybrid").input_ids
    assert tokenizer.decode(ids) == "Falcon-H1 is a parallel hybrid" and max(ids) < card.arch.vocab_size
    assert (tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id) == (0, 1, 2)
    small = CreateRandomOptions(load_card("tiny-mup"), tmp_path / "small", dtype=torch.float32)
    assert create_random(small).tokenizer_files == []


def test_progress_in_a_log_is_plain_lines_on_stdout(tmp_path, capsys, monkeypatch):
    """Without a terminal (a CI log, a pipe) progress is a plain line at most every PLAIN_PROGRESS_SECONDS (here 0:
    every step), on stdout before the summary; stderr stays empty; --json prints only JSON."""
    from conftest import run_cli

    from falcon_bridge.cli import app as cli_app

    monkeypatch.setattr(cli_app, "PLAIN_PROGRESS_SECONDS", 0.0)
    code, out, err = run_cli(capsys, monkeypatch, "create-random", "tiny-one-group", tmp_path / "hf")
    lines = out.strip().splitlines()
    assert code == 0 and err == ""
    assert all(re.fullmatch(r"create-random: \d+% \(\d+/\d+\), ETA \d+ s, [\d.]+/s: \S+", line) for line in lines[:-1])
    assert len(lines) > 10 and lines[-2].startswith("create-random: 100% ") and lines[-1].startswith("command=")
    code, out, _ = run_cli(capsys, monkeypatch, "create-random", "tiny-one-group", tmp_path / "j", "--json")
    assert code == 0 and json.loads(out)["card"] == "tiny-one-group"
