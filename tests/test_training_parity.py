"""Training in Megatron equals training in HF: the per-token loss megatron trains with (vocab-parallel cross entropy
over a TP-padded vocabulary) and the gradients of its sum match transformers' FalconH1ForCausalLM on the same
tokens, at TP=1 and TP=2, with µP multipliers applied by the model."""

import pytest
import torch
import torch.nn.functional as F
from megatron_workers import loss_and_gradients

from falcon_bridge.converters.import_hf import import_hf
from falcon_bridge.converters.verify import hf_model, sample_tokens
from falcon_bridge.core.parallel import MegatronLayout
from falcon_bridge.megatron.runtime import launch

# Megatron parameter → (HF parameter, TP dim; None: replicated). Vocab-sized ones are compared on the real rows.
PARAMETERS = {
    "embedding.word_embeddings.weight": ("model.embed_tokens.weight", 0),
    "output_layer.weight": ("lm_head.weight", 0),
    "decoder.final_norm.weight": ("model.final_layernorm.weight", None),
    "decoder.layers.0.norm.weight": ("model.layers.0.input_layernorm.weight", None),
    "decoder.layers.1.mamba_mixer.A_log": ("model.layers.1.mamba.A_log", 0),
    "decoder.layers.1.mamba_mixer.out_proj.weight": ("model.layers.1.mamba.out_proj.weight", 1),
    "decoder.layers.2.self_attention.linear_proj.weight": ("model.layers.2.self_attn.o_proj.weight", 1),
    "decoder.layers.3.mlp.linear_fc2.weight": ("model.layers.3.feed_forward.down_proj.weight", 1),
}


def hf_loss_and_gradients(hf_dir, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
    model = hf_model(hf_dir, torch.float32, "cpu").train()
    logits = model(tokens).logits[:, :-1]
    loss = F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten(), reduction="none").view_as(tokens[:, 1:])
    loss.sum().backward()
    params = dict(model.named_parameters())
    return {"loss": loss.detach(), **{hf: params[hf].grad for hf, _ in PARAMETERS.values()}}


@pytest.mark.parametrize("card", ["tiny-vocab-pad", "tiny-mup"])
@pytest.mark.parametrize("tp", [1, 2])
def test_loss_and_gradients_equal_hf(tiny_hf, tmp_path, card, tp):
    """tiny-vocab-pad: 1001 ids padded to 1024 for TP (the padded columns must not enter the softmax);
    tiny-mup: every µP multiplier ≠ 1 in the backward pass."""
    tokens = sample_tokens(1001 if card == "tiny-vocab-pad" else 256, batch=2, seq_len=24, seed=5)
    import_hf(str(tiny_hf[card]), tmp_path / "mg", MegatronLayout(tp=tp))
    ours = launch(loss_and_gradients, tp, str(tmp_path / "mg"), tp, tokens,
                  {name: dim for name, (_, dim) in PARAMETERS.items()})
    reference = hf_loss_and_gradients(tiny_hf[card], tokens)
    assert torch.allclose(ours["loss"], reference["loss"], rtol=1e-5, atol=1e-6), \
        (ours["loss"] - reference["loss"]).abs().max()
    for name, (hf_name, _) in PARAMETERS.items():
        ref = reference[hf_name]
        got, padding = ours[name][:ref.shape[0]], ours[name][ref.shape[0]:]
        rel = (got - ref).abs().max() / ref.abs().max()
        assert rel <= 1e-4, f"TP={tp} {name}: relative gradient error {rel:.2e} against HF's {hf_name}"
        assert padding.numel() == 0 or padding.abs().max() == 0, f"{name}: the vocabulary padding was trained"
