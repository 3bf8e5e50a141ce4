"""GPU validation of training at TP > mamba_n_groups: a card with one Mamba group (random weights) imported once, then
N AdamW steps at TP=2 as Megatron-LM trains (megatron-core's DDP wrapper, get_forward_backward_func,
finalize_model_grads, get_megatron_optimizer: bf16 weights, fp32 main grads and fp32 master weights), eager and under
the full-iteration CUDA graph, and eager at TP=1 from the same import.

Checked: the copies of each HF B/C group that the TP ranks hold (in_proj rows, conv1d channels) are bit-identical
after training; each checkpoint saved with dist_checkpointing exports without a replica-divergence warning; the
trained TP=2 model's logits equal transformers' on the export (bf16 and fp32) and the checkpoint's loaded at TP=1.
Reported: every run's loss curve and how far the TP=2 weights are from TP=1's after N steps (bf16: not bit for bit).

    python tests/gpu/validate_training.py [--card falcon-h1-0.5b] [--tp 2] [--steps 5] [--seq-len 256] [--no-graph]
                                          [--device cuda|cpu] [--dtype bf16|fp32] [--json F]
(--tp 1 on a one-GPU machine: the bf16 optimizer, the graph and the export are checked; no replicas exist at TP=1.)
CPU smoke test (no CUDA graph on CPU):
    CUDA_VISIBLE_DEVICES= python tests/gpu/validate_training.py --card tiny-one-group --steps 2 --no-graph --dtype fp32
"""

import argparse
import json
import math
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file

from falcon_bridge.cards import load_card
from falcon_bridge.converters.create_random import CreateRandomOptions, create_random
from falcon_bridge.converters.export_hf import ExportOptions, export_hf
from falcon_bridge.converters.import_hf import ImportOptions, import_hf
from falcon_bridge.converters.verify import (
    compare_logits,
    default_tolerance,
    difference,
    gpus_hidden,
    hf_logits,
    sample_tokens,
)
from falcon_bridge.core.parallel import MegatronLayout
from falcon_bridge.megatron.checkpoint import load_model, provider_from_checkpoint, save_checkpoint
from falcon_bridge.megatron.distributed import init_distributed, launch, shutdown_distributed
from falcon_bridge.megatron.forward import megatron_logits_worker, pipeline_forward
from falcon_bridge.megatron.training import next_token_loss, wrap_for_training

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def forward_step(data_iterator, model):
    """tests/megatron_workers.py::train_and_save's microbatch: the summed next-token loss, in the schedule's
    two-value form. The batch comes as {"tokens": ...}, the form FullCudaGraphWrapper copies into static buffers."""
    def loss(per_token):
        total = per_token.float().sum()
        return total, {"loss": total.detach()}
    return next_token_loss(model, next(data_iterator)["tokens"]), loss


def tp_gather(t: torch.Tensor, dim: int) -> torch.Tensor:
    """The TP ranks' `t`, concatenated along dim in rank order (on every rank)."""
    from megatron.core import parallel_state as ps

    group = ps.get_tensor_model_parallel_group()
    parts = [torch.empty_like(t) for _ in range(group.size())]
    torch.distributed.all_gather(parts, t.contiguous(), group=group)
    return torch.cat(parts, dim)


def train_worker(rank: int, root: str, tp: int, batches: list[torch.Tensor], probe: torch.Tensor, out: str,
                 graphed: bool) -> dict | None:
    """One AdamW step per batch at `tp` (graphed: the schedule under the full-iteration CUDA graph), then the probe's
    logits and the B/C replica check, then saved into `out` as train_and_save saves. Returns on rank 0 the mean
    next-token loss per step, the logits [b, s, vocab] (fp32, CPU) and each layer's group_copy_spread (TP > 1)."""
    from megatron.core.full_cuda_graph import FullCudaGraphWrapper
    from megatron.core.pipeline_parallel import get_forward_backward_func

    provider, it_dir = provider_from_checkpoint(Path(root), tp=tp)
    device = init_distributed(rank, tp, tp, 1, cuda_graphs=graphed)  # graph-safe RNG generators when graphed
    try:
        model = load_model(provider, it_dir, device, parallel_output=True).train()
        # bf16: Float16OptimizerWithFloat16Params, Adam on fp32 master copies of the bf16 weights (as Megatron-LM's
        # --bf16); fp32: megatron's FP32Optimizer on the weights themselves
        ddp, optimizer = wrap_for_training(model)
        forward_backward = get_forward_backward_func()
        if graphed:
            # Megatron-LM's --cuda-graph-impl full_iteration: step 1 eager, step 2 captured, then replays. No config
            # flag is needed (in megatron-core 0.19.2 config.cuda_graph_impl="full_iteration" only switches TE's
            # fused cross entropy, unused here); the graph-safe RNG is init_distributed's.
            forward_backward = FullCudaGraphWrapper(forward_backward, cuda_graph_warmup_steps=1)
        losses = []
        for tokens in batches:
            ddp.zero_grad_buffer()
            optimizer.zero_grad()
            store = forward_backward(forward_step_func=forward_step,
                                     data_iterator=iter([{"tokens": tokens.to(device)}]), model=[ddp],
                                     num_microbatches=1, seq_length=tokens.shape[1],
                                     micro_batch_size=tokens.shape[0], forward_only=False)
            optimizer.step()
            losses.append(store[0]["loss"].item() / (tokens.shape[0] * (tokens.shape[1] - 1)))
        model.eval()
        logits = tp_gather(pipeline_forward(model, probe.to(device), provider.arch.hidden_size, provider.params_dtype),
                           -1)  # each rank holds its vocab shard (parallel_output)
        replicas = [layer.mamba_mixer.group_copy_spread() for layer in model.decoder.layers] if tp > 1 else []
        save_checkpoint(model, Path(out), it_dir)
        if rank == 0:
            return {"losses": losses, "logits": logits[..., :provider.arch.vocab_size].float().cpu(),
                    "replicas": replicas}
        return None
    finally:
        shutdown_distributed()


def exported(directory: Path) -> dict[str, torch.Tensor]:
    return {k: v for f in sorted(directory.glob("*.safetensors")) for k, v in load_file(f).items()}


def weight_difference(reference_dir: Path, candidate_dir: Path) -> dict:
    """The exported tensor that differs most, relative to its largest value: {tensor, relative, max_abs_diff}."""
    reference, candidate = exported(reference_dir), exported(candidate_dir)
    diffs = {name: difference(reference[name], candidate[name]) for name in reference}
    worst = max(diffs, key=lambda n: diffs[n]["relative"])
    return {"tensor": worst, "relative": diffs[worst]["relative"], "max_abs_diff": diffs[worst]["max_abs_diff"]}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser()
    ap.add_argument("--card", default="falcon-h1-0.5b")
    ap.add_argument("--tp", type=int, default=2, help="the TP trained at (and compared with TP=1 when > 1)")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--no-graph", action="store_true", help="skip the full-iteration CUDA graph run")
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", choices=list(DTYPES), help="default: bf16 on cuda, fp32 on cpu")
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    graph = not args.no_graph
    if args.device == "cuda" and torch.cuda.device_count() < args.tp:
        ap.error(f"--device cuda: TP={args.tp} needs {args.tp} GPUs, {torch.cuda.device_count()} visible")
    if graph and (args.device == "cpu" or args.steps < 2):
        ap.error("the CUDA graph run needs --device cuda and --steps >= 2 (a captured step); or pass --no-graph")
    dtype = DTYPES[args.dtype or ("bf16" if args.device == "cuda" else "fp32")]
    if dtype == torch.bfloat16 and args.device == "cpu":
        ap.error("--dtype bf16 needs --device cuda: megatron's bf16 optimizer (fp32 master weights) takes CUDA tensors")
    card = load_card(args.card)
    batches = [sample_tokens(card.arch.vocab_size, 2, args.seq_len, seed=1 + i) for i in range(args.steps)]
    probe = sample_tokens(card.arch.vocab_size, 2, args.seq_len, seed=0)
    tp = args.tp
    tested_runs = [f"tp{tp}-eager", *([f"tp{tp}-graph"] if graph else [])]  # the runs at the TP under test
    runs = {name: (tp, name.endswith("graph")) for name in tested_runs} | ({"tp1-eager": (1, False)} if tp > 1 else {})
    result = {"card": card.name, "mamba_n_groups": card.arch.mamba_n_groups, "dtype": str(dtype).removeprefix("torch."),
              "device": args.device, "steps": args.steps, "seq_len": args.seq_len, "runs": {}, "comparisons": []}

    def compare(what: str, reference: torch.Tensor, candidate: torch.Tensor, *dtypes: torch.dtype) -> None:
        # the coarser compute dtype of the two sides sets the tolerance
        tolerance = default_tolerance(torch.bfloat16 if torch.bfloat16 in dtypes else torch.float32, args.device)
        result["comparisons"].append({"comparison": what, **compare_logits(reference, candidate, tolerance).to_json()})

    # a CPU run on a GPU machine: the spawned Megatron processes must not see the GPUs
    with tempfile.TemporaryDirectory() as tmp, gpus_hidden(args.device == "cpu" and torch.cuda.is_available()):
        tmp = Path(tmp)
        create_random(CreateRandomOptions(card, tmp / "hf", seed=0, dtype=dtype))
        # TP-agnostic: every run loads this import
        import_hf(ImportOptions(str(tmp / "hf"), tmp / "mg", MegatronLayout(tp=1)))
        logits = {}
        for name, (run_tp, graphed) in runs.items():
            r = launch(train_worker, run_tp, str(tmp / "mg"), run_tp, batches, probe, str(tmp / name), graphed)
            summary = export_hf(ExportOptions(tmp / name, tmp / f"{name}-hf"))
            logits[name] = r["logits"]
            result["runs"][name] = {"tp": run_tp, "cuda_graph": graphed, "losses": r["losses"],
                                    "replica_max_abs_diff_per_layer": r["replicas"],
                                    "export_warnings": summary.warnings,
                                    "diverged_group_replicas": summary.diverged_group_replicas}
        at_tp1 = launch(megatron_logits_worker, 1, [str(tmp / name) for name in tested_runs], 1, 1, probe, None)
        for name, reloaded in zip(tested_runs, at_tp1):
            compare(f"{name} vs its checkpoint at TP=1", reloaded, logits[name], dtype)
        for hf_dtype in (torch.bfloat16, torch.float32):
            for name in tested_runs:
                reference = hf_logits(tmp / f"{name}-hf", probe, hf_dtype, args.device)
                compare(f"{name} vs HF {str(hf_dtype).removeprefix('torch.')} on export", reference, logits[name],
                        dtype, hf_dtype)
        result["weights"] = {f"{name} vs tp1-eager": weight_difference(tmp / "tp1-eager-hf", tmp / f"{name}-hf")
                             for name in tested_runs if name != "tp1-eager"}
        if graph:
            result["weights"][f"tp{tp}-graph vs tp{tp}-eager"] = weight_difference(tmp / f"tp{tp}-eager-hf",
                                                                                   tmp / f"tp{tp}-graph-hf")
    tested = [result["runs"][name] for name in tested_runs]
    result["replicas_identical"] = all(max(r["replica_max_abs_diff_per_layer"], default=0) == 0 for r in tested)
    result["exports_clean"] = all(not r["export_warnings"] and not r["diverged_group_replicas"] for r in tested)
    result["losses_finite"] = all(map(math.isfinite, (x for r in result["runs"].values() for x in r["losses"])))
    result["passed"] = (result["replicas_identical"] and result["exports_clean"] and result["losses_finite"]
                        and all(c["passed"] for c in result["comparisons"]))
    print_table(result)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return result


def print_table(result: dict) -> None:
    print(f"\n{result['card']} ({result['mamba_n_groups']} Mamba group), {result['dtype']} on {result['device']}, "
          f"{result['steps']} AdamW steps of 2×{result['seq_len']} tokens")
    print(f"{'run':10} {'B/C replicas max|Δ|':>19}  {'export':8} mean next-token loss per step")
    for name, r in result["runs"].items():
        replicas = f"{max(r['replica_max_abs_diff_per_layer']):.1e}" if r["replica_max_abs_diff_per_layer"] else "-"
        export = "warning" if r["export_warnings"] or r["diverged_group_replicas"] else "clean"
        print(f"{name:10} {replicas:>19}  {export:8} {' '.join(f'{x:.4f}' for x in r['losses'])}")
    print(f"\n{'logits':38} {'max|Δ|':>10} {'max|logit|':>10} {'rel':>10} {'tol':>8} {'argmax':>7}  result")
    for c in result["comparisons"]:
        print(f"{c['comparison']:38} {c['max_abs_diff']:10.3e} {c['max_abs_logit']:10.3e} {c['relative']:10.3e} "
              f"{c['tolerance']:8.1e} {100 * c['argmax_agreement']:6.2f}%  {'PASS' if c['passed'] else 'FAIL'}")
    print(f"\n{'trained weights':38} {'rel':>10}  worst tensor (max|Δ| / its max|w|)")
    for what, w in result["weights"].items():
        print(f"{what:38} {w['relative']:10.3e}  {w['tensor']}")
    print(f"\n{'PASS' if result['passed'] else 'FAIL'}")


if __name__ == "__main__":
    sys.exit(0 if main()["passed"] else 1)
