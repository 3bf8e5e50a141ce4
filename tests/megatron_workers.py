"""Worker functions run in spawned TP processes by several tests (module-level, so `launch` can pickle them)."""

from pathlib import Path

import torch

from falcon_bridge.megatron.checkpoint import load_model, provider_from_checkpoint, save_checkpoint
from falcon_bridge.megatron.distributed import init_distributed, shutdown_distributed
from falcon_bridge.megatron.training import next_token_loss, wrap_for_training


def loss_and_gradients(rank: int, root: str, tp: int, tokens: torch.Tensor, gather_dims: dict[str, int | None]
                       ) -> dict[str, torch.Tensor] | None:
    """Training step of our model: the per-token next-token loss [b, s-1] (the vocab-parallel loss megatron trains
    with) and the gradients of its sum for the parameters in `gather_dims` (name → the dim TP shards it on, or None
    when replicated), as full tensors on rank 0."""
    from megatron.core import parallel_state as ps

    provider, it_dir = provider_from_checkpoint(root, tp=tp)
    device = init_distributed(rank, tp, tp, 1)
    try:
        model = load_model(provider, it_dir, device, parallel_output=True).train()
        loss = next_token_loss(model, tokens.to(device))
        loss.sum().backward()
        params = dict(model.named_parameters())
        out = {"loss": loss.detach().cpu()}
        for name, dim in gather_dims.items():
            g = params[name].grad.contiguous()
            if dim is not None:
                parts = [torch.empty_like(g) for _ in range(tp)]
                torch.distributed.all_gather(parts, g, group=ps.get_tensor_model_parallel_group())
                g = torch.cat(parts, dim=dim)
            out[name] = g.cpu()
        return out if rank == 0 else None
    finally:
        shutdown_distributed()


def train_and_save(rank: int, root: str, tp: int, pp: int, batches: list[torch.Tensor], out: str,
                   save_gradients: bool = False, live_out: str | None = None) -> float | None:
    """Train as Megatron-LM does: megatron-core's DDP wrapper, get_forward_backward_func's schedule (one
    microbatch per step, the summed next-token loss), finalize_model_grads and get_megatron_optimizer's AdamW,
    one step per batch; then dist_checkpointing.save the weights into `out` (a checkpoint export-hf reads, with
    the source's run config). save_gradients: no optimizer step; save the gradients of the first batch in the
    weights' place instead, so that export-hf maps them to HF names and layout. live_out: also write the trained
    model as HF there, live (converters/live.save_hf_pretrained), from the model under its DDP wrapper."""
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func


    provider, it_dir = provider_from_checkpoint(root, tp=tp, pp=pp)
    device = init_distributed(rank, tp * pp, tp, pp)
    try:
        model = load_model(provider, it_dir, device, parallel_output=True).train()
        ddp, optimizer = wrap_for_training(model)

        def forward_step(data_iterator, module):
            tokens = next(data_iterator).to(device)
            b, s = tokens.shape
            positions = torch.arange(s, device=device).expand(b, s)
            labels = torch.roll(tokens, -1, dims=1) if ps.is_pipeline_last_stage() else None
            output = module(tokens, positions, None, labels=labels)

            def loss(per_token):
                total = per_token[:, :-1].sum()  # the last position has no next token
                return total, {"loss": total.detach()}
            return output, loss

        for tokens in batches:
            ddp.zero_grad_buffer()
            optimizer.zero_grad()
            get_forward_backward_func()(forward_step_func=forward_step, data_iterator=iter([tokens]), model=[ddp],
                                        num_microbatches=1, seq_length=tokens.shape[1],
                                        micro_batch_size=tokens.shape[0], forward_only=False)
            if save_gradients:
                for p in model.parameters():
                    p.data.copy_(p.main_grad)
                break
            optimizer.step()
        # the largest difference between the TP ranks' copies of a B/C group, over every stage (0: they trained
        # in step; with save_gradients, their gradients agree)
        spread = torch.tensor([max((layer.mamba_mixer.group_copy_spread() for layer in model.decoder.layers
                                    if hasattr(layer, "mamba_mixer")), default=0.0)], device=device)  # Llama: none
        torch.distributed.all_reduce(spread, torch.distributed.ReduceOp.MAX)
        save_checkpoint(model, Path(out), it_dir)
        if live_out is not None:
            from falcon_bridge.converters.live import save_hf_pretrained

            save_hf_pretrained(ddp, Path(live_out))
        return spread.item() if rank == 0 else None
    finally:
        shutdown_distributed()


def live_bridge_checks(rank: int, hf_dir: str, imported: str, tp: int, pp: int, mup: str, bitnet: bool, fmt: str,
                       out: str) -> dict | None:
    """The live bridge against the file path at this TP/PP: model_from_hf's weights vs import-hf +
    dist_checkpointing.load's (names of parameters that differ), the live HF tensors (rank 0's copy), and
    save_hf_pretrained into `out`."""
    from falcon_bridge.converters.live import hf_weights, model_from_hf, save_hf_pretrained

    provider, it_dir = provider_from_checkpoint(imported, tp=tp, pp=pp)
    device = init_distributed(rank, tp * pp, tp, pp)
    try:
        from_files = load_model(provider, it_dir, device)
        live = model_from_hf(hf_dir, mup=mup, bitnet=bitnet, params_dtype=provider.params_dtype, device=device)
        files_state, live_state = from_files.state_dict(), live.state_dict()
        differ = [k for k, v in files_state.items() if isinstance(v, torch.Tensor)
                  and not (v.dtype == live_state[k].dtype and torch.equal(v, live_state[k]))]
        differ_everywhere = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(differ_everywhere, differ)
        streamed = dict(hf_weights(live, fmt=fmt))
        save_hf_pretrained(live, Path(out), fmt=fmt, tokenizer_from=Path(hf_dir))
        return {"differ": sorted({k for d in differ_everywhere for k in d}), "streamed": streamed} if rank == 0 \
            else None
    finally:
        shutdown_distributed()


def live_bridge_misuse(rank: int, hf_dir: str, tp: int) -> list[list[str]]:
    """What each rank sees when the ranks misuse the live bridge: a module not built by our provider, ranks that
    built different models, a rank that stops reading early; then a collective, to show nobody hangs."""
    from falcon_bridge.converters.live import hf_weights, model_from_hf
    from falcon_bridge.errors import BadInput

    device = init_distributed(rank, tp, tp, 1)
    seen = []
    try:
        try:
            next(hf_weights(torch.nn.Linear(2, 2)))
        except BadInput as e:
            seen.append(f"not ours: {e}")
        mismatched = model_from_hf(hf_dir, mup="fold" if rank == 1 else "preserve", device=device)
        try:
            next(hf_weights(mismatched))
        except BadInput as e:
            seen.append(f"disagree: {e}")
        model = model_from_hf(hf_dir, device=device)
        try:
            for i, _ in enumerate(hf_weights(model)):
                if rank == 0 and i == 2:
                    break  # rank 0 walks away; the generator is closed here
        except BadInput as e:
            seen.append(f"abandoned: {e}")
        flag = torch.ones(1)
        torch.distributed.all_reduce(flag)  # nobody is stuck in the stream's collectives
        seen.append(f"collective after: {int(flag.item())}")
        everyone = [None] * tp
        torch.distributed.all_gather_object(everyone, seen)
        return everyone
    finally:
        shutdown_distributed()


def train_and_save_as_bridge(rank: int, root: str, tp: int, batches: list[torch.Tensor], out: str,
                             iteration: int = 5) -> None:
    """A few AdamW steps, then a checkpoint laid out as Megatron-Bridge saves one during training: iter_{iteration}
    holding the model, optimizer state and an RNG ShardedObject (megatron-core's dist_checkpointing.save), a common
    state with Megatron-LM's `args` (argparse.Namespace), `iteration` and `checkpoint_version`, Bridge's
    run_config.yaml and tokenizer/ folder, trackers at `iteration`; no falcon-bridge run config."""
    import argparse
    import shutil

    from megatron.core import dist_checkpointing
    from megatron.core import parallel_state as ps
    from megatron.core.dist_checkpointing import ShardedObject

    from falcon_bridge.formats import megatron as mg
    from falcon_bridge.formats.hf import existing_tokenizer_files

    provider, it_dir = provider_from_checkpoint(root, tp=tp)
    device = init_distributed(rank, tp, tp, 1)
    try:
        model = load_model(provider, it_dir, device, parallel_output=True).train()
        ddp, optimizer = wrap_for_training(model)
        for tokens in batches:
            ddp.zero_grad_buffer()
            optimizer.zero_grad()
            next_token_loss(model, tokens.to(device)).sum().backward()
            ddp.finish_grad_sync()
            optimizer.step()
        model_sd = model.sharded_state_dict()
        state = {"model": model_sd, "optimizer": optimizer.sharded_state_dict(model_sd),
                 "rng_state": ShardedObject("rng_state", [{"torch_rng_state": torch.get_rng_state()}], (1, tp),
                                            (0, ps.get_tensor_model_parallel_rank()), replica_id=0),
                 "args": argparse.Namespace(num_layers=provider.arch.num_layers, tensor_model_parallel_size=tp,
                                            no_save_rng=False),
                 "iteration": iteration, "checkpoint_version": 3.0}
        out_it = Path(out) / mg.iteration_dir_name(iteration)
        out_it.mkdir(parents=True, exist_ok=True)
        dist_checkpointing.save(state, str(out_it))
        if rank == 0:
            import yaml

            (out_it / mg.BRIDGE_RUN_CONFIG_FILE).write_text(yaml.safe_dump(mg.bridge_run_config(
                provider.arch, provider.multipliers or provider.arch.multipliers, provider.params_dtype, tp, 1)))
            (out_it / "tokenizer").mkdir()
            for f in existing_tokenizer_files(it_dir):
                shutil.copy(f, out_it / "tokenizer" / f.name)
            mg.write_tracker(Path(out), iteration)
            torch.save(mg.train_state(iteration), Path(out) / mg.TRAIN_STATE_FILE)
    finally:
        shutdown_distributed()


# ---- provider-first live bridge (tests/test_live_provider.py) ------------------------------------------------
def own_process_groups(tp: int, pp: int):
    """Process groups of our own (not megatron's global parallel state) for a TP × PP model on every tp · pp
    consecutive ranks, each laid out as megatron lays TP × PP out (rank = pp_rank · tp + tp_rank): what a framework
    that runs trainer and rollout in separate groups passes."""
    from megatron.core.process_groups_config import ProcessGroupCollection

    rank, size = torch.distributed.get_rank(), tp * pp
    bases = range(0, torch.distributed.get_world_size(), size)

    def mine(rank_lists):  # every rank creates every group, in the same order
        groups = [torch.distributed.new_group(ranks) for ranks in rank_lists]
        return next(g for g, ranks in zip(groups, rank_lists) if rank in ranks)

    pipelines = [list(range(b + t, b + size, tp)) for b in bases for t in range(tp)]
    alone = mine([[r] for r in range(torch.distributed.get_world_size())])  # no CP, one data-parallel replica
    tensors = [list(range(b + p * tp, b + (p + 1) * tp)) for b in bases for p in range(pp)]
    return ProcessGroupCollection(tp=mine(tensors), pp=mine(pipelines),
                                  embd=mine([sorted({r[0], r[-1]}) for r in pipelines]), cp=alone, dp=alone,
                                  dp_cp=alone)


def differing(reference: dict, other: dict) -> list[str]:
    """Names of the tensors of `reference` that `other` lacks or holds with another dtype or other values."""
    return [k for k, v in reference.items() if isinstance(v, torch.Tensor)
            and not (k in other and v.dtype == other[k].dtype and torch.equal(v, other[k]))]


def provider_first_checks(rank: int, hf_dir: str, imported: str, tp: int, pp: int,
                          float16_module: bool = False) -> dict | None:
    """A provider-first model (provider settings changed before building, our own process groups, megatron's
    global parallel state re-initialized for another layout first; float16_module: in the imported checkpoint's
    dtype, under megatron's Float16Module when loaded) loaded from HF, against import-hf + dist_checkpointing.load's
    model: names of tensors that differ on any rank, and the settings the built model runs with."""
    from megatron.core import parallel_state as ps

    from falcon_bridge.converters.live import load_hf_weights, provider_from_hf

    provider, it_dir = provider_from_checkpoint(imported, tp=tp, pp=pp)
    init_distributed(rank, tp * pp, tp, pp)
    try:
        from_files = load_model(provider, it_dir, torch.device("cpu"))
        if float16_module:  # as Megatron-LM runs a bf16 model: wrapped, which casts every parameter (Mamba's A, D)
            from megatron.core.transformer.module import Float16Module

            from_files = Float16Module(from_files.config, from_files).module
        from_files = from_files.state_dict()
        # the global state now describes another layout (every rank a whole model, data parallel): the model
        # below must take its layout and ranks from its own groups (megatron-core's tied output layer still reads
        # the global data-parallel rank for a replica id, so some global state must exist)
        ps.destroy_model_parallel()
        ps.initialize_model_parallel()
        groups = own_process_groups(tp, pp)
        live_provider = provider_from_hf(hf_dir, params_dtype=provider.params_dtype, pg_collection=groups)
        live_provider.seq_length = 64
        live_provider.run_settings |= {"recompute_granularity": "full", "recompute_method": "uniform",
                                       "recompute_num_layers": 1}
        model = live_provider.provide(pg_collection=groups)
        if float16_module:
            load_hf_weights(Float16Module(model.config, model), hf_dir)
        else:
            load_hf_weights(model, hf_dir)
        differ = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(differ, differing(from_files, model.state_dict()))
        settings = (model.config.recompute_granularity, model.config.tensor_model_parallel_size,
                    model.config.pipeline_model_parallel_size)
        return {"differ": sorted({k for d in differ for k in d}), "settings": settings} if rank == 0 else None
    finally:
        shutdown_distributed()


def _global_layer_names(state: dict, offset: int) -> dict:
    """A chunk's state dict under global layer indices (its layers are offset.. in the whole model)."""
    import re

    return {re.sub(r"(decoder\.layers\.)(\d+)", lambda m: f"{m[1]}{int(m[2]) + offset}", k): v
            for k, v in state.items() if isinstance(v, torch.Tensor)}


def virtual_pipeline_checks(rank: int, hf_dir: str, batches: list[torch.Tensor]) -> dict | None:
    """PP = 2 with 2 virtual stages per rank, each chunk under megatron's DDP before the load, against the whole
    model (PP = 1) each rank builds over process groups of its own: the weights (chunks' tensors under global
    layer names) that differ, whether loading kept every parameter's storage (DDP's buffers), and both models'
    logits of `batches` (the chunks run by megatron's interleaved schedule)."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from falcon_bridge.converters.live import load_hf_weights, provider_from_hf

    init_distributed(rank, 2, 1, 2)
    try:
        alone = own_process_groups(1, 1)  # each rank a model of its own
        whole = provider_from_hf(hf_dir, pg_collection=alone).provide(pg_collection=alone).eval()
        load_hf_weights(whole, hf_dir)

        provider = provider_from_hf(hf_dir, vpp=2)
        chunks = [provider.provide(vp_stage=v) for v in range(2)]
        ddp_config = DistributedDataParallelConfig(grad_reduce_in_fp32=True)
        wrapped = [DistributedDataParallel(c.config, ddp_config, c) for c in chunks]
        storage = [p.data_ptr() for c in chunks for p in c.parameters()]
        load_hf_weights(wrapped, hf_dir)
        kept_storage = storage == [p.data_ptr() for c in chunks for p in c.parameters()]
        mine = {}
        for v, c in enumerate(chunks):
            mine |= _global_layer_names(c.state_dict(), provider.layout.chunk(provider.arch.num_layers, rank, v)[1])
        everyone = [None] * 2
        torch.distributed.all_gather_object(everyone, mine)
        merged = everyone[0] | everyone[1]
        differ = differing(whole.state_dict(), merged)

        def forward_step(data_iterator, model):
            tokens = next(data_iterator)
            positions = torch.arange(tokens.shape[1]).expand_as(tokens)
            return model(tokens, positions, None), lambda output, non_loss_data=False: output

        for c in wrapped:
            c.eval()
        logits = get_forward_backward_func(pp_size=2, vp_size=2)(
            forward_step_func=forward_step, data_iterator=[iter(batches) for _ in wrapped], model=wrapped,
            num_microbatches=len(batches), seq_length=batches[0].shape[1], micro_batch_size=batches[0].shape[0],
            forward_only=True, collect_non_loss_data=True)
        chunk_logits = [None] * 2
        torch.distributed.all_gather_object(chunk_logits, [t.detach() for t in logits] if logits else None)
        with torch.no_grad():
            whole_logits = [whole(t, torch.arange(t.shape[1]).expand_as(t), None) for t in batches]

        # one training step's gradients: into DDP's buffers through the interleaved schedule, against autograd's
        # in the whole model (the same summed next-token loss, averaged over the microbatches as the schedule does)
        def loss_step(data_iterator, model):
            tokens = next(data_iterator)
            positions = torch.arange(tokens.shape[1]).expand_as(tokens)
            labels = torch.roll(tokens, -1, dims=1) if model.module.post_process else None
            return model(tokens, positions, None, labels=labels), lambda t: (t[:, :-1].sum(), {})

        for c in wrapped:
            c.train()
            c.zero_grad_buffer()
        config = chunks[0].config
        config.finalize_model_grads_func = finalize_model_grads
        config.no_sync_func = [c.no_sync for c in wrapped]
        get_forward_backward_func(pp_size=2, vp_size=2)(
            forward_step_func=loss_step, data_iterator=[iter(batches) for _ in wrapped], model=wrapped,
            num_microbatches=len(batches), seq_length=batches[0].shape[1], micro_batch_size=batches[0].shape[0])
        grads = {}
        for v, c in enumerate(chunks):
            offset = provider.layout.chunk(provider.arch.num_layers, rank, v)[1]
            grads |= _global_layer_names({n: p.main_grad for n, p in c.named_parameters()}, offset)
        everyone = [None] * 2
        torch.distributed.all_gather_object(everyone, grads)
        whole.train()
        loss = sum(whole(t, torch.arange(t.shape[1]).expand_as(t), None, labels=torch.roll(t, -1, dims=1))[:, :-1]
                   .sum() for t in batches) / len(batches)
        loss.backward()
        chunk_grads = everyone[1] | everyone[0]  # rank 0's embedding gradient is the tied weight's, summed
        gradient_error = max((chunk_grads[n] - p.grad).abs().max().item() / p.grad.abs().max().item()
                             for n, p in whole.named_parameters())
        return {"differ": differ, "compared": len(whole.state_dict()), "kept_storage": kept_storage,
                "chunk_logits": chunk_logits[1], "whole_logits": whole_logits,
                "gradient_error": gradient_error} if rank == 0 else None
    finally:
        shutdown_distributed()


def live_provider_misuse(rank: int, hf_dir: str, llama_dir: str, other_dir: str) -> list[str]:
    """What provider-first misuse raises at PP = 2 (rank 0's messages, one per misuse): a chunk asked for without
    its virtual stage, a layout unlike the process groups', virtual stages that do not split the layers, chunks of
    two providers, a source of another family or architecture, and another µP treatment than the model's."""
    from dataclasses import replace

    from falcon_bridge.converters.live import load_hf_weights, provider_from_hf
    from falcon_bridge.errors import BadInput

    init_distributed(rank, 2, 1, 2)
    seen = []

    def refused(action) -> None:
        try:
            action()
        except BadInput as e:
            seen.append(str(e))
        else:
            seen.append("accepted")

    try:
        provider = provider_from_hf(hf_dir, vpp=2)
        refused(lambda: provider.provide())
        chunks = [provider.provide(vp_stage=v) for v in range(2)]
        unlike = provider_from_hf(hf_dir, vpp=2)
        unlike.layout = replace(unlike.layout, tp=2, pp=1, vpp=1)
        refused(lambda: unlike.provide())
        refused(lambda: provider_from_hf(hf_dir, vpp=3))
        refused(lambda: load_hf_weights([chunks[0], provider_from_hf(hf_dir, vpp=2).provide(vp_stage=1)], hf_dir))
        refused(lambda: load_hf_weights(chunks, llama_dir))
        refused(lambda: load_hf_weights(chunks, other_dir))
        refused(lambda: load_hf_weights(chunks, hf_dir, mup="fold"))
        return seen
    finally:
        shutdown_distributed()


# ---- transfer plan and bucketed export (tests/test_live_transfer.py) ----------------------------------------
def _streamed(stream) -> tuple[dict, str]:
    """A stream's tensors and a digest of their names, dtypes and bytes (to compare ranks without sending them)."""
    import hashlib

    tensors, digest = {}, hashlib.sha256()
    for name, tensor in stream:
        assert name not in tensors, f"{name} streamed twice"
        tensors[name] = tensor
        digest.update(f"{name} {tensor.dtype} {tuple(tensor.shape)}".encode())
        digest.update(tensor.contiguous().view(torch.uint8).numpy().tobytes())
    return tensors, digest.hexdigest()


def live_transfer_checks(rank: int, hf_dir: str, tp: int, pp: int, vpp: int, wrap: bool) -> dict | None:
    """One model (a chunk list with virtual stages when vpp > 1; under megatron's DDP when `wrap`) exported through
    one transfer plan at several bucket sizes, filtered, and one selected tensor per bucket; then a replicated copy
    changed on the last rank. Returns rank 0's tensors and plan, and every rank's digests and divergences."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    from falcon_bridge.converters.live import (
        export_hf_buckets,
        export_hf_weights,
        load_hf_weights,
        provider_from_hf,
        transfer_plan,
    )

    device = init_distributed(rank, tp * pp, tp, pp)
    try:
        provider = provider_from_hf(hf_dir, vpp=vpp)
        chunks = [provider.provide(vp_stage=v if vpp > 1 else None).to(device) for v in range(vpp)]
        models = [DistributedDataParallel(c.config, DistributedDataParallelConfig(), c) for c in chunks] if wrap \
            else chunks
        load_hf_weights(models, hf_dir)
        plan = transfer_plan(models if vpp > 1 else models[0])
        sizes = {"default": None, "3x-smallest": 3 * plan.min_bucket_bytes, "smallest": plan.min_bucket_bytes}
        streams, digests, divergences, buckets = {}, {}, {}, {}
        for label, size in sizes.items():
            divergences[label] = {}
            streams[label], digests[label] = _streamed(export_hf_weights(models, plan, bucket_bytes=size,
                                                                         divergence=divergences[label]))
            buckets[label] = sum(1 for _ in export_hf_buckets(models, plan, bucket_bytes=size))
        subset = plan.filter(lambda name: name.endswith(("q_proj.weight", "norm.weight")))
        streams["filtered"], digests["filtered"] = _streamed(export_hf_weights(models, subset))
        q_proj = plan.filter(lambda name: name.endswith("q_proj.weight"))
        one_each = [[name for name, _ in b] for b in export_hf_buckets(models, q_proj,
                                                                          bucket_bytes=q_proj.min_bucket_bytes)]
        changed = None
        if tp > 1 and pp == 1 and provider.arch.has_mamba:  # the last TP rank's copy of layer 0's B group drifts
            if rank == tp - 1:
                mixer = next(m for m in chunks[0].modules() if hasattr(m, "_group_rows"))
                param, (b_row, _) = next(iter(mixer._group_rows()))
                with torch.no_grad():
                    param[b_row] += 1.0
            divergences["changed"] = {}
            changed, digests["changed"] = _streamed(export_hf_weights(models, plan, divergence=divergences["changed"]))
        everyone = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(everyone, (digests, divergences))
        if rank != 0:
            return None
        return {"streams": streams, "changed": changed, "buckets": buckets, "one_each": one_each,
                "plan": [(t.name, t.shape, t.dtype, t.stage, t.chunk, t.nbytes) for t in plan.tensors],
                "subset": [t.name for t in subset.tensors], "digests": [d for d, _ in everyone],
                "divergences": [v for _, v in everyone]}
    finally:
        shutdown_distributed()


def live_transfer_misuse(rank: int, hf_dir: str, other_hf_dir: str) -> list[list[str]]:
    """What each of 2 ranks (TP = 2) sees when the export is misused: a plan used with another model, a plan whose
    parameters were reallocated, bucket_bytes below the largest tensor, ranks with different selections or bucket
    sizes, a rank that stops after one tensor and one that fails half-way, a filter naming a tensor the plan lacks;
    then a collective, to show nobody hangs."""
    from contextlib import closing

    from falcon_bridge.converters.live import export_hf_weights, model_from_hf, transfer_plan
    from falcon_bridge.errors import BadInput

    device = init_distributed(rank, 2, 2, 1)
    seen = []

    def attempt(label: str, stream, stop_after: int | None = None, fail_after: int | None = None):
        try:
            with closing(stream):
                for i, _ in enumerate(stream):
                    if i == stop_after:
                        break
                    if i == fail_after:
                        raise RuntimeError("the consumer failed")
            seen.append(f"{label}: done")
        except (BadInput, RuntimeError) as e:
            seen.append(f"{label}: {e}")

    try:
        model = model_from_hf(hf_dir, device=device)
        plan = transfer_plan(model)
        try:
            plan.filter(["model.layers.0.mamba.in_proj.weight", "model.nope"])
        except BadInput as e:
            seen.append(f"unknown name: {e}")
        attempt("other model", export_hf_weights(model_from_hf(other_hf_dir, device=device), plan))
        attempt("too small", export_hf_weights(model, plan, bucket_bytes=plan.min_bucket_bytes - 1))
        mine = plan.filter(lambda name: "layers.0." in name) if rank == 1 else plan
        attempt("selection", export_hf_weights(model, mine))
        attempt("bucket sizes", export_hf_weights(model, plan, bucket_bytes=plan.min_bucket_bytes * (1 + rank)))
        small = plan.min_bucket_bytes  # several buckets, one in flight when rank 0 stops
        attempt("stopped", export_hf_weights(model, plan, bucket_bytes=small), stop_after=1 if rank == 0 else None)
        attempt("failed", export_hf_weights(model, plan, bucket_bytes=small), fail_after=3 if rank == 1 else None)
        attempt("after", export_hf_weights(model, plan, bucket_bytes=small))
        for p in model.parameters():  # as an offload to CPU and back would
            p.data = p.data.clone()
        attempt("reallocated", export_hf_weights(model, plan))
        flag = torch.ones(1)
        torch.distributed.all_reduce(flag)
        seen.append(f"collective after: {int(flag.item())}")
        everyone = [None] * 2
        torch.distributed.all_gather_object(everyone, seen)
        return everyone
    finally:
        shutdown_distributed()
