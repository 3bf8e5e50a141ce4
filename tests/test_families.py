"""The Llama family (Falcon3-1.58bit / Falcon-E) through the conversion pipeline: detected from config.json, its own
table, the same import / reshard / export / packed formats as Falcon-H1, and its bad inputs refused in one line.
(Our Megatron model for it, against transformers' logits and gradients: tests/test_llama.py.)"""

import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import hub_cache_with
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file
from test_bitnet import bitnet_agree
from test_roundtrip import assert_bit_identical, assert_round_trip, hf_tensors

from falcon_bridge.cards import all_cards, load_card
from falcon_bridge.converters.create_random import CreateRandomOptions, create_random
from falcon_bridge.converters.export_hf import ExportOptions, export_hf
from falcon_bridge.converters.import_hf import ImportOptions, import_hf
from falcon_bridge.converters.reshard import ReshardOptions, reshard
from falcon_bridge.core.families import arch_from_hf
from falcon_bridge.core.llama import LlamaArch
from falcon_bridge.core.mapping import hf_tensor_shapes, is_bitnet_linear, num_parameters
from falcon_bridge.core.parallel import MegatronLayout
from falcon_bridge.errors import BadInput
from falcon_bridge.formats import megatron as mg

LLAMA_RELEASED = ["falcon3-1b-1.58bit", "falcon3-3b-1.58bit", "falcon3-7b-1.58bit", "falcon3-10b-1.58bit"]


def transformers_llama(arch: LlamaArch, seed: int = 0):
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(arch.to_hf_config()).float()
    with torch.no_grad():  # transformers initialises norms to 1 and biases to 0: make every tensor count
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model.eval()


@pytest.mark.parametrize("card", LLAMA_RELEASED)
def test_released_llama_cards_are_verified_and_count_what_transformers_counts(card):
    from transformers import LlamaForCausalLM

    c = load_card(card)
    assert c.arch.family == "llama" and c.hf_repo.startswith("tiiuae/") and c.verified
    assert set(c.provenance) == set(c.arch.to_dict())  # every value has a source
    with torch.device("meta"):
        model = LlamaForCausalLM(c.arch.to_hf_config())
    assert num_parameters(c.arch) == sum(p.numel() for p in model.parameters())
    assert hf_tensor_shapes(c.arch) == {n: tuple(p.shape) for n, p in model.state_dict().items()}


def test_a_checkpoint_transformers_saved_converts_and_comes_back_bit_identical(tmp_path):
    arch = load_card("tiny-llama-tied").arch  # tied embeddings, every bias, one KV head
    transformers_llama(arch).save_pretrained(tmp_path / "hf")
    assert arch_from_hf(json.loads((tmp_path / "hf" / "config.json").read_text()), "config.json") == arch
    import_hf(ImportOptions(str(tmp_path / "hf"), tmp_path / "a", MegatronLayout(tp=4)))
    rc = mg.read_run_config(tmp_path / "a" / "iter_0000000")
    assert rc["family"] == "llama" and rc["mup"] == {"mode": "preserve", "applied_multipliers": {}}
    assert not (tmp_path / "a" / "iter_0000000" / mg.BRIDGE_RUN_CONFIG_FILE).exists()  # Bridge's file is H1's
    reshard(ReshardOptions(tmp_path / "a", tmp_path / "b", MegatronLayout(tp=1, pp=2)))
    export_hf(ExportOptions(tmp_path / "b", tmp_path / "out"))
    saved, back = load_file(tmp_path / "hf" / "model.safetensors"), hf_tensors(tmp_path / "out")
    assert saved.keys() == back.keys()
    for name in saved:
        assert torch.equal(saved[name], back[name]), name


@st.composite
def llama_architectures(draw):
    kv = draw(st.sampled_from([1, 2, 4]))
    bias = draw(st.booleans())
    return LlamaArch(vocab_size=draw(st.integers(17, 300)), hidden_size=draw(st.sampled_from([16, 24])),
                     intermediate_size=draw(st.sampled_from([8, 20])), num_layers=draw(st.sampled_from([2, 4])),
                     num_heads=kv * draw(st.sampled_from([1, 2])), num_kv_heads=kv,
                     head_dim=draw(st.sampled_from([4, 8])), rope_theta=1e4, attention_bias=bias, mlp_bias=bias,
                     tie_word_embeddings=draw(st.booleans()), pad_token_id=None, bos_token_id=1, eos_token_id=2)


@settings(max_examples=8, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(arch=llama_architectures(), first=st.sampled_from([(1, 1), (2, 1), (1, 2)]),
       second=st.sampled_from([(1, 1), (2, 2), (4, 1)]))
def test_llama_roundtrip_property(arch, first, second, tmp_path_factory):
    assert_round_trip(arch, first, second, tmp_path_factory.mktemp("llama"), seed=0, dtype=torch.bfloat16)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_packed_llama_survives_import_and_export_byte_for_byte(tmp_path, dtype):
    """bitnet import → packed export is transformers' BitLinear layout; that packed checkpoint → import at TP=2 →
    packed export gives it back byte for byte (the same ternary values and the same weight_scale bits)."""
    arch = load_card("tiny-llama").arch
    create_random(CreateRandomOptions(load_card("tiny-llama"), tmp_path / "hf", seed=3, dtype=dtype))
    import_hf(ImportOptions(str(tmp_path / "hf"), tmp_path / "mg", MegatronLayout(), bitnet=True))
    export_hf(ExportOptions(tmp_path / "mg", tmp_path / "packed", fmt="packed"))
    config = json.loads((tmp_path / "packed" / "config.json").read_text())
    assert config["model_type"] == "llama" and config["quantization_config"]["quant_method"] == "bitnet"
    packed = hf_tensors(tmp_path / "packed")
    bitnet = [n for n in hf_tensor_shapes(arch) if is_bitnet_linear(arch, n)]
    assert len(bitnet) == 7 * arch.num_layers  # q k v o gate up down; never lm_head, embeddings or norms
    assert all(packed[n].dtype == torch.uint8 and n.removesuffix("weight") + "weight_scale" in packed for n in bitnet)
    summary = import_hf(ImportOptions(str(tmp_path / "packed"), tmp_path / "mg2", MegatronLayout(tp=2)))
    assert summary.bitnet  # implied by the packed source
    export_hf(ExportOptions(tmp_path / "mg2", tmp_path / "again", fmt="packed"))
    assert_bit_identical(tmp_path / "packed", tmp_path / "again")


def edited_config(src, dst, **changes):
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    for key, value in changes.items():
        node = cfg
        *path, last = key.split(".")
        for p in path:
            node = node.setdefault(p, {})
        node[last] = value
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


@pytest.mark.parametrize("field,value,message", [
    ("model_type", "mistral", "field model_type: 'mistral' is not a supported model"),
    ("pretraining_tp", 2, "field pretraining_tp = 2 is not supported"),
    ("rope_scaling", {"rope_type": "llama3", "factor": 8.0}, "field rope_scaling = .* is not supported"),
    ("hidden_act", "gelu", "field hidden_act: only 'silu'"),
    ("quantization_config.quant_method", "bitnet", "no tensor is packed"),
])
def test_llama_configs_the_model_does_not_implement_are_refused_naming_the_field(tiny_hf, tmp_path, field, value,
                                                                                 message):
    src = edited_config(tiny_hf["tiny-llama"], tmp_path / "src", **{field: value})
    with pytest.raises(BadInput, match=message):
        import_hf(ImportOptions(str(src), tmp_path / "out", MegatronLayout()))
    assert not (tmp_path / "out").exists()


def test_packed_llama_bad_inputs_name_the_field_or_tensor(tiny_hf, tmp_path):
    import_hf(ImportOptions(str(tiny_hf["tiny-llama"]), tmp_path / "mg", MegatronLayout(), bitnet=True))
    export_hf(ExportOptions(tmp_path / "mg", tmp_path / "packed", fmt="packed"))
    for field, value, message in [
            ("quantization_config.linear_class", "int2", "field quantization_config.linear_class: 'int2' is not supp"),
            ("quantization_config.quantization_mode", "dynamic", "quantization_mode: 'dynamic' is not one of"),
            ("quantization_config.use_rms_norm", True, "field quantization_config.use_rms_norm = True")]:
        src = edited_config(tmp_path / "packed", tmp_path / field, **{field: value})
        with pytest.raises(BadInput, match=message):
            import_hf(ImportOptions(str(src), tmp_path / "out", MegatronLayout()))
    # one linear left in full precision (modules_to_not_convert beyond lm_head): our model would ternarize it
    name = "model.layers.1.mlp.down_proj.weight"
    shutil.copytree(tmp_path / "packed", tmp_path / "float-linear")
    tensors = load_file(tmp_path / "packed" / "model.safetensors")
    tensors[name] = torch.randn(64, 96)
    del tensors["model.layers.1.mlp.down_proj.weight_scale"]
    save_file(tensors, tmp_path / "float-linear" / "model.safetensors")
    with pytest.raises(BadInput, match=f"tensor {name} is not packed"):
        import_hf(ImportOptions(str(tmp_path / "float-linear"), tmp_path / "out", MegatronLayout()))
    # a packed tensor without its scale
    tensors = load_file(tmp_path / "packed" / "model.safetensors")
    del tensors["model.layers.0.self_attn.q_proj.weight_scale"]
    shutil.copytree(tmp_path / "packed", tmp_path / "no-scale")
    save_file(tensors, tmp_path / "no-scale" / "model.safetensors")
    with pytest.raises(BadInput, match="tensor model.layers.0.self_attn.q_proj.weight_scale is missing"):
        import_hf(ImportOptions(str(tmp_path / "no-scale"), tmp_path / "out", MegatronLayout()))
    assert not (tmp_path / "out").exists()


def test_llama_has_no_mup_to_fold(tiny_hf, tmp_path):
    with pytest.raises(BadInput, match="the llama family has no µP multipliers"):
        import_hf(ImportOptions(str(tiny_hf["tiny-llama"]), tmp_path / "out", MegatronLayout(), mup_mode="fold"))


def test_a_card_names_a_known_family(tmp_path):
    card = tmp_path / "card.yaml"
    card.write_text("name: x\nfamily: gpt-j\narchitecture: {}\n")
    with pytest.raises(BadInput, match="field family: 'gpt-j' is not a known family"):
        load_card(card)
    assert {c.arch.family for c in all_cards()} == {"falcon_h1", "llama"}


def test_autobitlinear_checkpoints_read_as_transformers_runs_them(tmp_path):
    """transformers' other BitNet class: offline, the same packed bytes with weight_scale = mean|W| (its output is
    multiplied by it, BitLinear's divided); online, latent weights and no scale. transformers gives the same logits
    for our bitlinear export and its autobitlinear-offline twin; both import to the same Megatron tensors; the
    online checkpoint imports as a BitNet model of its latent weights; the twin survives import → packed export."""
    from transformers import AutoModelForCausalLM

    create_random(CreateRandomOptions(load_card("tiny-llama"), tmp_path / "hf", seed=4, dtype=torch.float32))
    import_hf(ImportOptions(str(tmp_path / "hf"), tmp_path / "mg", MegatronLayout(), bitnet=True))
    export_hf(ExportOptions(tmp_path / "mg", tmp_path / "bitlinear", fmt="packed"))
    shutil.copytree(tmp_path / "bitlinear", tmp_path / "auto")
    tensors = load_file(tmp_path / "bitlinear" / "model.safetensors")
    for name in [n for n in tensors if n.endswith("weight_scale")]:
        tensors[name] = tensors[name].reciprocal()
    save_file(tensors, tmp_path / "auto" / "model.safetensors")
    edited = edited_config(tmp_path / "auto", tmp_path / "autobitlinear", **{
        "quantization_config.linear_class": "autobitlinear", "quantization_config.quantization_mode": "offline"})
    tokens = torch.randint(0, 200, (2, 12))
    logits = {}
    for variant in ("bitlinear", "autobitlinear"):
        model = AutoModelForCausalLM.from_pretrained(tmp_path / variant, dtype=torch.float32)
        assert type(model.model.layers[0].mlp.down_proj).__name__ == {"bitlinear": "BitLinear",
                                                                        "autobitlinear": "AutoBitLinear"}[variant]
        logits[variant] = model(tokens).logits.detach()
    ok, report = bitnet_agree(logits["bitlinear"], logits["autobitlinear"])  # its two classes' arithmetic orders
    assert ok, report
    for variant in ("bitlinear", "autobitlinear"):
        import_hf(ImportOptions(str(edited if variant == "autobitlinear" else tmp_path / variant),
                                tmp_path / f"mg-{variant}", MegatronLayout(tp=2)))
    a, b = (mg.TorchDistReader(tmp_path / f"mg-{v}" / "iter_0000000") for v in ("bitlinear", "autobitlinear"))
    for key in a.tensors:
        assert torch.allclose(a.get(key), b.get(key), rtol=1e-6, atol=0), key
    export_hf(ExportOptions(tmp_path / "mg-autobitlinear", tmp_path / "again", fmt="packed"))
    assert_bit_identical(tmp_path / "bitlinear", tmp_path / "again")  # written back as bitlinear
    online = edited_config(tmp_path / "hf", tmp_path / "online", **{
        "quantization_config": {"quant_method": "bitnet", "linear_class": "autobitlinear",
                                "quantization_mode": "online"}})
    summary = import_hf(ImportOptions(str(online), tmp_path / "mg-online", MegatronLayout()))
    assert summary.bitnet
    c, d = (mg.TorchDistReader(tmp_path / f"mg{v}" / "iter_0000000") for v in ("", "-online"))
    assert all(torch.equal(c.get(k), d.get(k)) for k in c.tensors)


def test_packed_autobitlinear_export_is_what_transformers_autobitlinear_offline_reads(tmp_path):
    """`--format packed-autobitlinear`: the bytes `--format packed` writes, but weight_scale = mean|W| (what
    AutoBitLinear offline multiplies by) and config.json naming that class; transformers builds AutoBitLinear layers
    with the bitlinear export's logits, and the checkpoint survives import (TP=2) → export byte for byte."""
    from transformers import AutoModelForCausalLM

    # fp32: transformers 5.24 refuses to run a bf16 autobitlinear checkpoint loaded as fp32 (its unpacked weight
    # stays bf16), and compares the two classes best at fp32 noise
    create_random(CreateRandomOptions(load_card("tiny-llama"), tmp_path / "hf", seed=4, dtype=torch.float32))
    import_hf(ImportOptions(str(tmp_path / "hf"), tmp_path / "mg", MegatronLayout(), bitnet=True))
    for fmt in ("packed", "packed-autobitlinear"):
        export_hf(ExportOptions(tmp_path / "mg", tmp_path / fmt, fmt=fmt))
    quantization = json.loads((tmp_path / "packed-autobitlinear" / "config.json").read_text())["quantization_config"]
    assert quantization["linear_class"] == "autobitlinear" and quantization["quantization_mode"] == "offline"
    bitlinear, auto = hf_tensors(tmp_path / "packed"), hf_tensors(tmp_path / "packed-autobitlinear")
    assert bitlinear.keys() == auto.keys()
    for name in bitlinear:
        if name.endswith("weight_scale"):  # reciprocals, each rounded once
            assert torch.allclose(auto[name] * bitlinear[name], torch.ones(1), rtol=1e-6), name
        else:
            assert torch.equal(auto[name], bitlinear[name]), name
    tokens = torch.randint(0, 200, (2, 12), generator=torch.Generator().manual_seed(0))
    logits = {}
    for fmt in ("packed", "packed-autobitlinear"):
        model = AutoModelForCausalLM.from_pretrained(tmp_path / fmt, dtype=torch.float32)
        logits[fmt] = model(tokens).logits.detach()
    assert type(model.model.layers[0].self_attn.q_proj).__name__ == "AutoBitLinear"
    ok, report = bitnet_agree(logits["packed"], logits["packed-autobitlinear"])
    assert ok, report
    import_hf(ImportOptions(str(tmp_path / "packed-autobitlinear"), tmp_path / "mg2", MegatronLayout(tp=2)))
    export_hf(ExportOptions(tmp_path / "mg2", tmp_path / "again", fmt="packed-autobitlinear"))
    assert_bit_identical(tmp_path / "packed-autobitlinear", tmp_path / "again")


def readme_falcon_e_example() -> list[str]:
    text = (Path(__file__).parents[1] / "README.md").read_text()
    return text.split("<!-- falcon-e-example", 1)[1].split("```", 2)[1].strip().splitlines()


def word_tokenizer(words: list[str], arch: LlamaArch, out_dir: Path) -> None:
    """A tokenizer of whole `words` (one id each, after the config's pad/bos/eos ids and an unknown-word id) saved
    into `out_dir`: the tiny cards' vocabularies are too small for create-random's byte-level one, and a released
    checkpoint comes with its tokenizer."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = {"pad": arch.pad_token_id, "bos": arch.bos_token_id, "eos": arch.eos_token_id}
    vocab = {f"<|{kind}|>": i for kind, i in specials.items()} | {"<|unk|>": max(specials.values()) + 1}
    vocab |= {w: len(vocab) + i for i, w in enumerate(dict.fromkeys(words))}
    assert len(vocab) <= arch.vocab_size
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<|unk|>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<|unk|>",
                            **{f"{kind}_token": f"<|{kind}|>" for kind in specials}).save_pretrained(str(out_dir))


def test_readme_falcon_e_example_runs_as_shown(tiny_hf, tmp_path):
    """README's Falcon-E lines, literally: the prequantized branch read from the Hugging Face cache (a tiny Llama
    checkpoint placed there, the Hub unreachable), imported as BitNet at TP=2, its tokenizer preparing a corpus,
    trained two iterations at TP=2 in Megatron-LM's loop, the trained checkpoint exported packed, and that packed
    export through another import (PP=2) and export gives the same bytes."""
    words = "a ternary falcon learns to fly over the dunes at dawn and lands by the sea".split()
    shutil.copytree(tiny_hf["tiny-llama"], tmp_path / "prequantized")
    word_tokenizer(words, load_card("tiny-llama").arch, tmp_path / "prequantized")
    hub_cache_with(tmp_path / "cache", "tiiuae/Falcon-E-1B-Base", "prequantized", tmp_path / "prequantized")
    env = os.environ | {"HF_HUB_CACHE": str(tmp_path / "cache"), "HF_ENDPOINT": "http://127.0.0.1:9"}
    rows = [" ".join(words[(i * 5 + j) % len(words)] for j in range(40 + i % 11)) for i in range(200)]
    (tmp_path / "corpus.jsonl").write_text("".join(json.dumps({"text": r}) + "\n" for r in rows))
    lines = readme_falcon_e_example()
    assert [shlex.split(line)[1] for line in lines] == ["import-hf", "prepare-data", "train", "export-hf",
                                                        "import-hf", "export-hf"]
    for line in lines:
        command = shlex.split(line)
        assert command[0] == "falcon-bridge", line
        done = subprocess.run([sys.executable, "-m", "falcon_bridge.cli.app", *command[1:]], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, (line, done.stderr[-3000:])
    trained = mg.find_iteration_dir(tmp_path / "falcon-e-trained")  # what export-hf read: the two iterations' save
    assert trained.name == mg.iteration_dir_name(2) and mg.read_run_config(trained)["bitnet"]
    config = json.loads((tmp_path / "falcon-e-packed" / "config.json").read_text())
    assert config["model_type"] == "llama" and config["quantization_config"]["linear_class"] == "bitlinear"
    assert_bit_identical(tmp_path / "falcon-e-packed", tmp_path / "falcon-e-packed-again")
