"""The rollout side of an RL loop, end to end: the trainer's model built provider-first from an HF checkpoint (its
settings set before building, TP=2), wrapped in megatron's DDP and loaded, one training step, then its weights
streamed by HF name into a transformers model — standing in for the inference engine, started from other weights —
and the engine's logits compared with the trainer's.

    python examples/rl_refit.py HF_DIR [--tp 2]

Runs on CPU (gloo) or on GPUs (NCCL, one per rank). Without HF_DIR's weights at hand, make some first:
    falcon-bridge create-random tiny-one-group HF_DIR --dtype fp32
"""

import argparse

import torch

from falcon_bridge.converters.live import export_hf_weights, load_hf_weights, provider_from_hf, transfer_plan
from falcon_bridge.megatron.distributed import init_distributed, launch, shutdown_distributed
from falcon_bridge.megatron.training import next_token_loss, wrap_for_training

SEQUENCE = 32


def full_logits(model, tokens: torch.Tensor) -> torch.Tensor:
    """The trainer's logits [b, s, vocab]: its vocabulary shards gathered over TP, the TP padding dropped."""
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    positions = torch.arange(tokens.shape[1], device=tokens.device).expand_as(tokens)
    with torch.no_grad():
        shards = model(tokens, positions, None)
    return gather_from_tensor_model_parallel_region(shards)[..., :model.module.provider.arch.vocab_size]


def worker(rank: int, hf_dir: str, tp: int) -> dict | None:
    device = init_distributed(rank, tp, tp, 1)  # your training framework has done this already
    try:
        # trainer: the provider first, its settings the framework's, then the model, wrapped, then the weights
        provider = provider_from_hf(hf_dir)  # laid out over megatron's process groups (or pass pg_collection=)
        provider.seq_length = SEQUENCE
        # provider.run_settings |= {"sequence_parallel": True, "recompute_granularity": "full", ...} on GPUs
        model = provider.provide().to(device)
        trainer, optimizer = wrap_for_training(model)
        load_hf_weights(trainer, hf_dir)  # each rank reads only its slices, into DDP's parameters in place
        optimizer.reload_model_params()  # an optimizer built before the load refreshes its copies
        plan = transfer_plan(trainer)  # made once, after wrapping: every refit step reuses it

        generator = torch.Generator().manual_seed(0)
        tokens = torch.randint(0, provider.arch.vocab_size, (2, SEQUENCE), generator=generator).to(device)
        trainer.zero_grad_buffer()
        optimizer.zero_grad()
        next_token_loss(trainer, tokens).mean().backward()
        trainer.finish_grad_sync()
        optimizer.step()

        # rollout: the engine (rank 0's) takes the new weights by name, one tensor at a time as they arrive
        engine = None
        if rank == 0:
            from transformers import AutoConfig, AutoModelForCausalLM

            engine = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(hf_dir),
                                                      dtype=provider.params_dtype).to(device).eval()
        received = set()
        for name, tensor in export_hf_weights(trainer, plan, device=device):  # every rank, to the end
            if engine is not None:
                with torch.no_grad():
                    engine.get_parameter(name).copy_(tensor)
                received.add(name)
        trainer_logits = full_logits(trainer, tokens)
        if engine is None:
            return None
        with torch.no_grad():
            engine_logits = engine(tokens).logits
        missing = {n for n, _ in engine.named_parameters()} - received  # tied lm_head: the embedding's
        return {"streamed_tensors": len(received), "not_streamed": sorted(missing),
                "max_abs_logit_difference": (engine_logits - trainer_logits).abs().max().item(),
                "logit_scale": trainer_logits.abs().max().item()}
    finally:
        shutdown_distributed()


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("hf_dir")
    ap.add_argument("--tp", type=int, default=2)
    args = ap.parse_args()
    print(launch(worker, args.tp, args.hf_dir, args.tp))
