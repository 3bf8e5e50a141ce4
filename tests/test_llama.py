"""Our Megatron model of the Llama family (megatron-core's GPTModel, megatron/llama.py) equals transformers'
LlamaForCausalLM: logits at every TP/PP, every gradient, BitNet against transformers' packed BitLinear (logits) and
its trainable AutoBitLinear (every gradient), and verify.

Few launches on purpose (each spawns TP×PP processes that import megatron): one per layout, every checkpoint in it.
"""

import json

import pytest
import torch
from conftest import TINY_LLAMA_CARDS, run_cli
from megatron_workers import train_and_save
from test_bitnet import bitnet_agree
from test_families import edited_config
from test_training_parity import (
    assert_gradients_equal_hf,
    exported,
    hf_loss_and_gradients,
    hf_tokens,
)

from falcon_bridge.cards import load_card
from falcon_bridge.converters.export_hf import ExportOptions, export_hf
from falcon_bridge.converters.import_hf import ImportOptions, import_hf
from falcon_bridge.converters.verify import (
    VerifyOptions,
    compare_logits,
    default_tolerance,
    hf_logits,
    hf_model,
    sample_tokens,
    verify,
)
from falcon_bridge.core.parallel import MegatronLayout
from falcon_bridge.megatron.distributed import launch
from falcon_bridge.megatron.forward import megatron_logits_worker

TOKENS = sample_tokens(min(load_card(c).arch.vocab_size for c in TINY_LLAMA_CARDS), batch=2, seq_len=24, seed=11)
FP32 = default_tolerance(torch.float32, "cpu")  # verify's bar


@pytest.fixture(scope="module")
def llama_checkpoints(tiny_hf, tmp_path_factory):
    """Per card: its fp32 HF checkpoint, a TP=2 import, a TP=2 BitNet import and that one's packed export."""
    tmp = tmp_path_factory.mktemp("llama")
    out = {}
    for card in TINY_LLAMA_CARDS:
        import_hf(ImportOptions(str(tiny_hf[card]), tmp / f"{card}-mg", MegatronLayout(tp=2)))
        import_hf(ImportOptions(str(tiny_hf[card]), tmp / f"{card}-bitnet", MegatronLayout(tp=2), bitnet=True))
        export_hf(ExportOptions(tmp / f"{card}-bitnet", tmp / f"{card}-packed", fmt="packed"))
        out[card] = {"hf": tiny_hf[card], **{kind: tmp / f"{card}-{kind}" for kind in ("mg", "bitnet", "packed")}}
    return out


def test_logits_equal_transformers_at_every_tp_and_pp_bitnet_included(llama_checkpoints):
    """fp32 logits of our model = transformers' LlamaForCausalLM at TP 1, 2, 4 and PP 2 (one TP=2 import loads at
    every layout), tied embeddings included (PP 2: the last stage's output layer is the first stage's embedding);
    BitNet at TP 1 and 2 = transformers' packed BitLinear model on the export."""
    plain = [str(llama_checkpoints[c]["mg"]) for c in TINY_LLAMA_CARDS]
    bitnet = [str(llama_checkpoints[c]["bitnet"]) for c in TINY_LLAMA_CARDS]
    layouts = {(1, 1): plain + bitnet, (2, 1): plain + bitnet, (4, 1): plain, (1, 2): plain}
    ours = {(tp, pp): launch(megatron_logits_worker, tp * pp, roots, tp, pp, TOKENS, "float32")
            for (tp, pp), roots in layouts.items()}
    for i, card in enumerate(TINY_LLAMA_CARDS):
        reference = hf_logits(llama_checkpoints[card]["hf"], TOKENS, torch.float32)
        packed = hf_logits(llama_checkpoints[card]["packed"], TOKENS, torch.float32)  # transformers' BitLinear
        for (tp, pp), results in ours.items():
            r = compare_logits(reference, results[i], FP32)
            assert r.passed and r.argmax_agreement == 1.0, f"{card} TP={tp} PP={pp}: {r}"
            if len(results) > len(plain):
                ok, r = bitnet_agree(packed, results[len(plain) + i])
                assert ok, f"{card} BitNet TP={tp} vs transformers' packed model: {r}"


@pytest.mark.parametrize("card", TINY_LLAMA_CARDS)
def test_every_gradient_equals_transformers_at_tp2(tiny_hf, tmp_path, card):
    """One step of the summed next-token loss under megatron-core's DDP and schedule at TP=2, on a batch holding
    pad tokens (as labels too); the gradients saved in the weights' place and exported through the map equal
    transformers' for every parameter, the pad row's included (untied: none; tied: the lm_head's part only)."""
    import_hf(ImportOptions(str(tiny_hf[card]), tmp_path / "mg", MegatronLayout(tp=2)))
    launch(train_and_save, 2, str(tmp_path / "mg"), 2, 1, [hf_tokens(card)], str(tmp_path / "grads"), True)
    export_hf(ExportOptions(tmp_path / "grads", tmp_path / "grads-hf"))
    assert_gradients_equal_hf(card, exported(tmp_path / "grads-hf"),
                              hf_loss_and_gradients(tiny_hf[card], hf_tokens(card)), "TP=2")


def test_verify_passes_on_a_llama_import_plain_and_bitnet(llama_checkpoints, capsys, monkeypatch):
    """`falcon-bridge verify` on a TP=2 import: one row per layer with Llama's branches (attention, mlp), no
    Mamba. BitNet against its packed export (tiny-llama-tied: no activation code crosses a rounding boundary on
    verify's tokens, so every branch stays at fp32 noise)."""
    card = llama_checkpoints["tiny-llama"]
    code, out, err = run_cli(capsys, monkeypatch, "verify", card["hf"], card["mg"], "--tp", "2")
    assert code == 0, out + err
    assert "attention rel" in out and "mlp rel" in out and "mamba" not in out
    assert "LlamaForCausalLM" in out and "first divergence: none" in out

    tied = llama_checkpoints["tiny-llama-tied"]
    report = verify(VerifyOptions(tied["packed"], tied["bitnet"], tp=2, dtype=torch.float32, tolerance=1e-2))
    assert report.passed, report.to_json()
    assert [(row["layer"], row["component"]) for row in report.layers] == \
        [(None, "embedding"), (0, "attention"), (0, "mlp"), (1, "attention"), (1, "mlp"), (None, "final_norm")]
    assert max(row["relative"] for row in report.layers) < 1e-5  # quantized on both sides, fp32 noise apart


# transformers' trainable BitNet: AutoBitLinear in online mode fake-quantizes the latent weight (absmean, per tensor)
# and the input (int8, per token) on every forward, both with a straight-through estimator
ONLINE_BITNET = {"quant_method": "bitnet", "linear_class": "autobitlinear", "quantization_mode": "online",
                 "modules_to_not_convert": ["lm_head"]}


@pytest.mark.parametrize("card", TINY_LLAMA_CARDS)
def test_every_bitnet_gradient_equals_transformers_autobitlinear_at_tp2(tiny_hf, tmp_path, card):
    """BitNet training: one step at TP=2 under megatron-core's DDP and schedule, from the latent weights, on the
    batch with pad tokens (as labels too); every exported gradient equals transformers' own latent BitNet path
    (from_pretrained of the same weights with an online autobitlinear quantization_config, on CPU), pad rows as in
    the plain test. The straight-through estimator makes each gradient a continuous function of the forward's
    values, so the fp32 bar holds as long as no quantization code differs between the two forwards: a weight or
    activation code that flipped would move a branch's output by ~1/127 of its scale; verify on this very batch shows
    every branch agreeing to < 1e-5, so none did. transformers' quantizers run eagerly (the same ops; inductor's
    compile of them would add 25 s on CPU)."""
    online = edited_config(tiny_hf[card], tmp_path / "online", quantization_config=ONLINE_BITNET)
    assert import_hf(ImportOptions(str(online), tmp_path / "mg", MegatronLayout(tp=2))).bitnet  # from its config
    tokens = hf_tokens(card)
    (tmp_path / "tokens.json").write_text(json.dumps(tokens.tolist()))
    with torch.compiler.set_stance("force_eager"):
        linear = hf_model(online, torch.float32, "cpu").model.layers[0].mlp.down_proj
        assert type(linear).__name__ == "AutoBitLinear" and linear.online_quant and linear.weight.requires_grad
        report = verify(VerifyOptions(online, tmp_path / "mg", tp=2, dtype=torch.float32,
                                      tokens_file=tmp_path / "tokens.json"))
        reference = hf_loss_and_gradients(online, tokens)
    assert report.passed and max(row["relative"] for row in report.layers) < 1e-5, report.to_json()
    launch(train_and_save, 2, str(tmp_path / "mg"), 2, 1, [tokens], str(tmp_path / "grads"), True)
    export_hf(ExportOptions(tmp_path / "grads", tmp_path / "grads-hf"))  # latent: the gradients as they are
    assert_gradients_equal_hf(card, exported(tmp_path / "grads-hf"), reference, "BitNet TP=2")
