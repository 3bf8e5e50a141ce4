"""GPU validation of BitNet Falcon-H1: import --bitnet at TP=2, a few training steps of our Megatron BitNet model on
a repeated batch (the loss must be finite and fall), save with megatron's dist_checkpointing, export packed, reload
in transformers and compare its logits with the trained Megatron model's.

    python tests/gpu/validate_bitnet.py [--card falcon-h1-0.5b] [--tp 2] [--steps 8] [--seq-len 256] [--json F]
"""

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

import torch

from falcon_bridge.cards import load_card
from falcon_bridge.converters.create_random import CreateRandomOptions, create_random
from falcon_bridge.converters.export_hf import ExportOptions, export_hf
from falcon_bridge.converters.import_hf import ImportOptions, import_hf
from falcon_bridge.converters.verify import compare_logits, hf_logits, sample_tokens
from falcon_bridge.core.parallel import MegatronLayout
from falcon_bridge.formats import megatron as mg
from falcon_bridge.megatron.checkpoint import load_model, provider_from_checkpoint
from falcon_bridge.megatron.distributed import init_distributed, launch, shutdown_distributed
from falcon_bridge.megatron.forward import pipeline_forward
from falcon_bridge.megatron.training import next_token_loss


def train_worker(rank: int, root: str, out: str, tp: int, steps: int, batch: torch.Tensor, probe: torch.Tensor):
    """Train on `batch` for `steps` steps, save to `out`, return (losses, logits of `probe`) on rank 0."""
    from megatron.core import dist_checkpointing

    provider, it_dir = provider_from_checkpoint(Path(root), tp=tp)
    device = init_distributed(rank, tp, tp, 1)
    try:
        model = load_model(provider, it_dir, device, parallel_output=True).train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0)
        tokens = batch.to(device)
        losses = []
        for _ in range(steps):
            optimizer.zero_grad()
            loss = next_token_loss(model, tokens).mean()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
        model.eval()
        dist_checkpointing.save(model.sharded_state_dict(), out)
        full = provider.provide(parallel_output=False)  # logits gathered over TP for the comparison
        full.load_state_dict(model.state_dict())
        logits = pipeline_forward(full.to(device).eval(), probe.to(device), provider.arch.hidden_size,
                                  provider.params_dtype)
        return (losses, logits[..., :provider.arch.vocab_size].float().cpu()) if rank == 0 else None
    finally:
        shutdown_distributed()


def kernel_agreement() -> dict:
    """onebitllms' Triton quantizers against our torch reference (falcon_bridge.core.ternary) on the same inputs:
    the fraction of values that differ (only exact .5 ties can: floor(x+0.5) vs round-half-even)."""
    from onebitllms.kernels import activation_quant_triton, weight_quant_triton

    from falcon_bridge.core import ternary

    g = torch.Generator(device="cuda").manual_seed(0)
    out = {}
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(4, 512, 3072, device="cuda", generator=g).to(dtype)
        a, b = activation_quant_triton(x), ternary.activation_fake_quant(x)
        out[f"activation_{dtype}"] = {"differing_fraction": (a != b).float().mean().item(),
                                      "max_abs_diff": (a.float() - b.float()).abs().max().item()}
        w = (0.02 * torch.randn(3072, 1024, device="cuda", generator=g)).to(dtype)
        a, b = weight_quant_triton(w), ternary.weight_fake_quant(w)
        out[f"weight_{dtype}"] = {"differing_fraction": (a != b).float().mean().item(),
                                  "max_abs_diff": (a.float() - b.float()).abs().max().item()}
    return out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser()
    ap.add_argument("--card", default="falcon-h1-0.5b")
    ap.add_argument("--tp", type=int, default=2)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    card = load_card(args.card)
    batch = sample_tokens(card.arch.vocab_size, batch=2, seq_len=args.seq_len, seed=1)
    probe = sample_tokens(card.arch.vocab_size, batch=2, seq_len=args.seq_len, seed=2)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        create_random(CreateRandomOptions(card, tmp / "hf", seed=0, dtype=torch.float32))
        import_hf(ImportOptions(str(tmp / "hf"), tmp / "mg", MegatronLayout(tp=args.tp), bitnet=True))
        trained = tmp / "trained"
        (trained / "iter_0000000").mkdir(parents=True)
        losses, logits = launch(train_worker, args.tp, str(tmp / "mg"), str(trained / "iter_0000000"), args.tp,
                                args.steps, batch, probe)
        shutil.copy(tmp / "mg" / "iter_0000000" / mg.RUN_CONFIG_FILE, trained / "iter_0000000")
        mg.write_tracker(trained)
        export_hf(ExportOptions(trained, tmp / "packed", fmt="packed"))
        reference = hf_logits(tmp / "packed", probe, torch.float32, "cuda" if torch.cuda.is_available() else "cpu")
    r = compare_logits(reference, logits, tolerance=1e-2)
    from falcon_bridge.megatron.bitnet import onebitllms_activation_kernel

    kernels = {"onebitllms_activation_kernel": onebitllms_activation_kernel() is not None}
    if torch.cuda.is_available():
        kernels["agreement_with_torch_reference"] = kernel_agreement()
    result = {"card": card.name, "tp": args.tp, "steps": args.steps, "losses": losses, **kernels,
              "loss_falls": all(map(torch.isfinite, torch.tensor(losses))) and losses[-1] < losses[0],
              **{f"packed_vs_megatron_{k}": v for k, v in r.to_json().items()}}
    result["passed"] = result["loss_falls"] and r.passed and r.argmax_agreement >= 0.95
    print(json.dumps(result, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    sys.exit(0 if main()["passed"] else 1)
