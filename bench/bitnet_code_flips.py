"""Why two correct BitNet implementations part ways at real widths: one layer's MLP of a packed checkpoint run by
transformers' BitLinear (integer activation codes × ternary weights, exact in fp32, scaled afterwards) and by our
arithmetic (codes/scale × ternary/scale, as the Megatron model computes) on the same input. The two differ by fp32
rounding (~1e-7); an activation of the down projection's input that sits that close to a rounding boundary gets
another int8 code, and one flipped code moves the layer's output by far more than the rounding did. Printed: the
down projection's input difference, how many of its codes flipped, and the MLP output's difference with our own
input against with transformers' (same codes).

    python bench/bitnet_code_flips.py PACKED_HF_DIR [--layer 0] [--tokens 64] [--seed 1]
"""

import argparse

import torch
import transformers
from transformers.integrations.bitnet import unpack_weights

from falcon_bridge.core import ternary


def our_linear(linear, x: torch.Tensor) -> torch.Tensor:
    """The packed BitLinear's ternary weights computed as our model computes them (dequantized operands)."""
    weights = unpack_weights(linear.weight, dtype=torch.float32) / linear.weight_scale.float()
    return torch.nn.functional.linear(ternary.activation_fake_quant(x), weights)


def relative(a: torch.Tensor, reference: torch.Tensor) -> float:
    return ((a - reference).abs().max() / reference.abs().max()).item()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("packed_dir")
    ap.add_argument("--layer", type=int, default=0)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--seed", type=int, default=1)
    a = ap.parse_args()
    torch.manual_seed(a.seed)
    model = transformers.AutoModelForCausalLM.from_pretrained(a.packed_dir, dtype=torch.float32)
    layer = model.model.layers[a.layer]
    seen = {}
    layer.mlp.down_proj.register_forward_pre_hook(lambda module, args: seen.__setitem__("down_input", args[0]))
    with torch.no_grad():
        x = layer.post_attention_layernorm(torch.randn(1, a.tokens, model.config.hidden_size))
        out_transformers = layer.mlp(x)
        down_transformers = seen["down_input"]
        down_ours = torch.nn.functional.silu(our_linear(layer.mlp.gate_proj, x)) * our_linear(layer.mlp.up_proj, x)

        def codes(t):
            return (t * 127 / t.abs().amax(-1, keepdim=True)).round()

        flipped = (codes(down_ours) != codes(down_transformers)).sum().item()
        print(f"down_proj input: relative difference {relative(down_ours, down_transformers):.2e}, "
              f"int8 codes flipped {flipped} of {down_ours.numel()}")
        alone = relative(our_linear(layer.mlp.down_proj, down_ours), out_transformers)
        same_codes = relative(our_linear(layer.mlp.down_proj, down_transformers), out_transformers)
        print(f"MLP output vs transformers': ours {alone:.2e}, ours on transformers' down_proj input {same_codes:.2e}")

if __name__ == "__main__":
    main()
