"""`falcon-bridge train`: Megatron-LM's own training loop (`megatron.training.pretrain`, shipped in megatron-core's
wheel) driving our Falcon-H1 provider.

What this module adds to Megatron-LM is what its `pretrain_*.py` scripts add for their models, and no more:
- the architecture, µP multipliers, BitNet and tokenizer come from the checkpoint (`--load`): they become the
  argument parser's defaults, so no shape flag is typed and a typed one that contradicts the checkpoint is refused;
- every flag is classified before a process group starts (`check_flags`): flags that configure the model
  (megatron's TransformerConfig) reach our model when it implements them and are refused otherwise; the rest
  (optimizer, schedule, data, checkpointing, logging, DDP) are Megatron-LM's own business;
- `model_provider`, `forward_step` and `datasets_provider`, the three callbacks `pretrain` takes;
- beside what Megatron-LM saves, the save directory gets our run config and the tokenizer (so export-hf, and a
  resumed run, know the model).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import traceback
import warnings
from functools import partial
from pathlib import Path

import torch

from falcon_bridge.core.config import FalconH1Arch
from falcon_bridge.core.mapping import MEGATRON_LAYER_PREFIX, refuse_more_layers_than_stored
from falcon_bridge.core.parallel import MegatronLayout
from falcon_bridge.errors import BadInput
from falcon_bridge.formats import megatron as mg
from falcon_bridge.formats.hf import existing_tokenizer_files

# Megatron-LM argument (dest) → the FalconH1Arch field or derived value it must equal. These become the parser's
# defaults; a typed value that differs contradicts the checkpoint.
ARCHITECTURE_ARGS = {
    "num_layers": lambda a: a.num_layers,
    "hidden_size": lambda a: a.hidden_size,
    "ffn_hidden_size": lambda a: a.intermediate_size,
    "num_attention_heads": lambda a: a.num_heads,
    "group_query_attention": lambda a: True,
    "num_query_groups": lambda a: a.num_kv_heads,
    "kv_channels": lambda a: a.head_dim,
    "max_position_embeddings": lambda a: a.max_position_embeddings,
    "position_embedding_type": lambda a: "rope",
    "rotary_base": lambda a: int(a.rope_theta) if float(a.rope_theta).is_integer() else a.rope_theta,
    "rotary_percent": lambda a: 1.0,
    "normalization": lambda a: "RMSNorm",
    "layernorm_epsilon": lambda a: a.rms_norm_eps,
    "swiglu": lambda a: True,
    "untie_embeddings_and_output_weights": lambda a: not a.tie_word_embeddings,
    "add_bias_linear": lambda a: a.mlp_bias,
    "add_qkv_bias": lambda a: a.attention_bias,
    "hidden_dropout": lambda a: 0.0,  # neither family has dropout; our layers apply none
    "attention_dropout": lambda a: 0.0,
}
MAMBA_ARGS = {  # … and, for a family with a Mamba mixer, its sizes
    "mamba_state_dim": lambda a: a.mamba_d_state,
    "mamba_head_dim": lambda a: a.mamba_d_head,
    "mamba_num_groups": lambda a: a.mamba_n_groups,
    "mamba_num_heads": lambda a: a.mamba_n_heads,
}


def architecture_args(arch) -> dict:
    """The Megatron-LM arguments this architecture fixes (dest → its value)."""
    rules = ARCHITECTURE_ARGS | (MAMBA_ARGS if arch.has_mamba else {})
    return {name: value(arch) for name, value in rules.items()}

# TransformerConfig fields a Megatron-LM flag may change that our model implements (model.py, or the megatron-core
# modules it is built of): the provider builds the model with the values the flags give.
MODEL_RUN_SETTINGS = {
    "bf16", "fp16", "sequence_parallel",
    "recompute_granularity", "recompute_method", "recompute_num_layers", "recompute_modules",
    "distribute_saved_activations", "cuda_graph_impl", "cuda_graph_warmup_steps",
    "deterministic_mode", "calculate_per_token_loss", "barrier_with_L1_time", "timers",
    "deallocate_pipeline_outputs", "batch_p2p_comm", "batch_p2p_sync", "overlap_p2p_comm", "variable_seq_lengths",
    "disable_bf16_reduced_precision_matmul", "microbatch_group_size_per_vp_stage", "overlap_p2p_comm_warmup_flush",
}
# TransformerConfig fields a flag may change that are honoured elsewhere: the layout and dtype (the provider's own
# arguments), initialisation (the checkpoint's weights replace it), what Megatron-LM's loop sets itself.
HONOURED_ELSEWHERE = {
    "tensor_model_parallel_size", "pipeline_model_parallel_size", "params_dtype", "pipeline_dtype",
    "use_cpu_initialization", "perform_initialization", "init_method_std",
    "finalize_model_grads_func", "no_sync_func", "grad_scale_func", "inference_sampling_seed", "config_logger_dir",
}

# Flags outside TransformerConfig that our model or this command cannot honour, with why.
REFUSED_ARGS = {
    "context_parallel_size": ("> 1", lambda v: v > 1, "the Mamba mixer of our layer has no context parallelism"),
    "decoder_first_pipeline_num_layers": ("set", lambda v: v is not None,
                                          "pipeline stages hold equal numbers of layers in train"),
    "decoder_last_pipeline_num_layers": ("set", lambda v: v is not None,
                                         "pipeline stages hold equal numbers of layers in train"),
    "expert_model_parallel_size": ("> 1", lambda v: v > 1, "Falcon-H1 has no experts"),
    "num_experts": ("set", lambda v: v is not None, "Falcon-H1 has no experts"),
    "use_torch_fsdp2": ("set", bool, "use --use-distributed-optimizer (FSDP is not tried with our model)"),
    "use_megatron_fsdp": ("set", bool, "use --use-distributed-optimizer (FSDP is not tried with our model)"),
    "tp_comm_overlap": ("set", bool, "it needs Transformer Engine's userbuffers"),
    "reset_attention_mask": ("set", bool, "the Mamba state would still cross documents"),
    "reset_position_ids": ("set", bool, "the Mamba state would still cross documents"),
    "mtp_num_layers": ("set", lambda v: v is not None, "Falcon-H1 has no multi-token prediction"),
    "fp8": ("set", lambda v: v is not None, "our model has no FP8 recipe"),
    "fp4": ("set", lambda v: v is not None, "our model has no FP4 recipe"),
    "sft": ("set", bool, "prepare the SFT data with prepare-data and train on it as pretraining data"),
    "spec": ("set", lambda v: v is not None, "the layer spec is our Falcon-H1's"),
    "yaml_cfg": ("set", lambda v: v is not None, "pass flags"),
    "hybrid_layer_pattern": ("set", lambda v: v is not None, "every Falcon-H1 block is attention + Mamba + MLP"),
    "use_legacy_models": ("set", bool, "there is no legacy Falcon-H1"),
    "fp8_param_gather": ("set", bool, "our model has no FP8 recipe"),
}

CUDA_GRAPH_IMPLS = ("none", "full_iteration")  # megatron-core's per-layer graphs need TransformerLayer's hooks
RECOMPUTE_MODULES = ("core_attn",)  # selective recompute our layer honours (the attention core, via SelfAttention)


def checkpoint_dir(argv: list[str]) -> Path:
    """The checkpoint `--load` (or `--pretrained-checkpoint`) names: the model to train."""
    parser = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    parser.add_argument("--load")
    parser.add_argument("--pretrained-checkpoint")
    known, _ = parser.parse_known_args(argv)
    path = known.load or known.pretrained_checkpoint
    if path is None:
        raise BadInput("--load: required (an import-hf output, or a directory `train` saved into)")
    root = Path(path)
    if not root.is_dir():
        raise BadInput(f"--load: {path} is not a directory")
    return root


@dataclasses.dataclass(frozen=True)
class TrainingCheckpoint:
    """What `train` needs to know of the checkpoint it loads."""

    root: Path
    it_dir: Path
    run_config: dict
    arch: FalconH1Arch
    iteration: int
    has_optimizer_state: bool
    distributed_optimizer_state: bool  # saved by --use-distributed-optimizer (its per-bucket state)
    tokenizer_dir: Path | None

    @classmethod
    def open(cls, root: Path) -> TrainingCheckpoint:
        it_dir = mg.find_iteration_dir(root)
        rc = mg.read_run_config(it_dir)
        arch = mg.arch_from_run_config(rc, str(it_dir / mg.RUN_CONFIG_FILE))
        metadata = mg.checked_metadata(it_dir)
        refuse_more_layers_than_stored(arch, metadata.state_dict_metadata, MEGATRON_LAYER_PREFIX,
                                       f"{mg.run_config_path(it_dir)}: field architecture.num_layers")
        has_optimizer = any(k.startswith("optimizer.") for k in metadata.state_dict_metadata)
        distributed = any(k.startswith("optimizer.distributed.") for k in metadata.state_dict_metadata)
        iteration = 0 if it_dir.name == "release" else int(it_dir.name.removeprefix("iter_"))
        tok = next((d for d in (it_dir, root / mg.TOKENIZER_DIR) if existing_tokenizer_files(d)), None)
        return cls(root, it_dir, rc, arch, iteration, has_optimizer, distributed, tok)


def parser_defaults(ckpt: TrainingCheckpoint) -> dict:
    """Megatron-LM argument defaults that make the checkpoint's model (flags the user types still win)."""
    a = ckpt.arch
    defaults = architecture_args(a)
    dtype = ckpt.run_config["dtype"]
    defaults.update(
        bf16=dtype == "bfloat16", fp16=dtype == "float16",
        seq_length=min(4096, a.max_position_embeddings),
        ckpt_format="torch_dist",
        eval_interval=1000,  # Megatron-LM's historical default; this version has none and fails without one
        # the linears' fused wgrad accumulation would bypass the replicated-group gradient hooks (model.py)
        gradient_accumulation_fusion=False,
        # our attention is causal without a mask; building one costs memory for nothing
        create_attention_mask_in_dataloader=False,
        make_vocab_size_divisible_by=ckpt.run_config["layout"]["vocab_divisible_by"],
        distributed_backend="nccl" if torch.cuda.is_available() else "gloo",  # NCCL needs GPUs
    )
    if not torch.cuda.is_available():
        # Megatron-LM takes a saved RNG state without CUDA tracker states (none exist on CPU) as broken and exits;
        # nothing random runs in a Falcon-H1 training step (no dropout), so there is nothing to restore
        defaults.update(no_load_rng=True)
    if ckpt.tokenizer_dir is not None:
        defaults.update(tokenizer_type="HuggingFaceTokenizer", tokenizer_model=str(ckpt.tokenizer_dir))
    else:  # no tokenizer files (a tiny test card): ids are the data
        defaults.update(tokenizer_type="NullTokenizer", vocab_size=a.vocab_size - 1)
    if not ckpt.has_optimizer_state:  # an import-hf output: weights only, so this run fine-tunes from them
        defaults.update(finetune=True, no_load_optim=True, no_load_rng=True)
    return defaults


def falcon_bridge_args(ckpt: TrainingCheckpoint):
    """Megatron-LM's extra_args_provider: the checkpoint's model as the parser's defaults."""
    defaults = parser_defaults(ckpt)

    def extra_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
        known = {a.dest for a in parser._actions}
        parser.set_defaults(**{k: v for k, v in defaults.items() if k in known})
        parser.error = _flag_error  # argparse would print Megatron-LM's whole usage (hundreds of lines) first
        return parser

    return extra_args


def _flag_error(message: str):
    raise BadInput(f"{message} (Megatron-LM's flags: see `falcon-bridge train --help`)")


def parse_megatron_args(argv: list[str], ckpt: TrainingCheckpoint) -> argparse.Namespace:
    """Megatron-LM's own parser over argv (no validation, no global state), with the checkpoint's defaults."""
    from megatron.training.arguments import parse_args

    saved = sys.argv
    sys.argv = ["falcon-bridge train", *argv]
    try:
        return parse_args(falcon_bridge_args(ckpt))
    finally:
        sys.argv = saved


def _model_config_fields(args: argparse.Namespace) -> dict:
    """The TransformerConfig fields Megatron-LM would set from these args (what a flag changes in the model)."""
    from megatron.core.transformer import TransformerConfig

    names = {f.name for f in dataclasses.fields(TransformerConfig)}
    fields = {name: getattr(args, name) for name in names if hasattr(args, name)}
    # derived, not a flag of its own (as core_transformer_config_from_args does): the interleaved schedule refuses both
    fields["batch_p2p_comm"] = not args.overlap_p2p_comm
    return fields


def check_flags(argv: list[str], ckpt: TrainingCheckpoint, world_size: int) -> argparse.Namespace:
    """Classify every flag before any process group starts; raise BadInput naming the first one that contradicts
    the checkpoint, that our model cannot honour, or that Megatron-LM's own validation refuses for this world
    size. Returns the parsed args."""
    args = parse_megatron_args(argv, ckpt)
    baseline = parse_megatron_args(["--load", str(ckpt.root)], ckpt)
    flag = lambda name: "--" + name.replace("_", "-")  # noqa: E731

    fixed = architecture_args(ckpt.arch)
    for name, expected in fixed.items():
        if getattr(args, name) != expected:
            raise BadInput(f"{flag(name)} {getattr(args, name)!r:.80}: the checkpoint's model has "
                           f"{expected!r} ({ckpt.it_dir})")
    for name, (what, refused, why) in REFUSED_ARGS.items():
        if hasattr(args, name) and refused(getattr(args, name)):
            raise BadInput(f"{flag(name)} {what}: not supported by falcon-bridge's Falcon-H1 ({why})")
    for name in ("num_layers_per_virtual_pipeline_stage", "num_virtual_stages_per_pipeline_rank"):
        value = getattr(args, name)
        if value is not None and value < 1:  # Megatron-LM's validation would divide by it, or build no model chunk
            raise BadInput(f"{flag(name)} {value}: must be at least 1")
    unchanged = _model_config_fields(baseline)
    changed = {k for k, v in _model_config_fields(args).items() if v != unchanged[k]}
    for name in sorted(changed - MODEL_RUN_SETTINGS - HONOURED_ELSEWHERE - set(fixed)):
        raise BadInput(f"{flag(name)}: not supported by falcon-bridge's Falcon-H1 model (it would be ignored)")
    if args.cuda_graph_impl not in CUDA_GRAPH_IMPLS:
        raise BadInput(f"--cuda-graph-impl {args.cuda_graph_impl}: falcon-bridge's Falcon-H1 runs under "
                       f"{' or '.join(CUDA_GRAPH_IMPLS)} (megatron-core's per-layer graphs need its TransformerLayer)")
    if args.recompute_granularity == "selective" and set(args.recompute_modules or ()) - set(RECOMPUTE_MODULES):
        raise BadInput(f"--recompute-modules {' '.join(args.recompute_modules)}: falcon-bridge's Falcon-H1 "
                       f"recomputes only {', '.join(RECOMPUTE_MODULES)} selectively (or use "
                       "--recompute-granularity full)")
    if args.sequence_parallel and args.tensor_model_parallel_size == 1:
        raise BadInput("--sequence-parallel: needs --tensor-model-parallel-size > 1")

    try:
        training_layout(args, ckpt).validate(ckpt.arch)
    except BadInput as e:
        raise BadInput(f"--tensor-model-parallel-size/--pipeline-model-parallel-size: {e}") from e
    if args.tokenizer_type == "HuggingFaceTokenizer" and args.tokenizer_model:
        _check_tokenizer(Path(args.tokenizer_model), ckpt.arch)
    for path in args.data_path or ():
        _check_indexed_dataset(path)
    if not args.mock_data and not (args.data_path or args.train_data_path or args.data_args_path):
        raise BadInput("--data-path: required (a prefix `falcon-bridge prepare-data` wrote), or --mock-data")
    _check_split(args)
    if args.save:
        _check_save(Path(args.save), ckpt)
    if ckpt.has_optimizer_state and not (args.no_load_optim or args.finetune):
        _check_resumed_optimizer(args, ckpt)
    if args.lr is None:  # Megatron-LM has no default; its optimizer would fail on None on every rank
        raise BadInput("--lr: required (the learning rate; Megatron-LM has no default)")
    validated = _megatron_validation(args, world_size)
    try:  # the virtual pipeline size, which Megatron-LM derives from --num-layers-per-virtual-pipeline-stage
        layout = training_layout(validated, ckpt).validate(ckpt.arch)
    except BadInput as e:
        raise BadInput(f"--num-layers-per-virtual-pipeline-stage/--num-virtual-stages-per-pipeline-rank: {e}") from e
    if layout.vpp > 1:
        _check_interleaved_microbatches(validated, layout.pp)
    return args


def _check_interleaved_microbatches(args: argparse.Namespace, pp: int) -> None:
    """megatron-core's interleaved schedule runs the micro-batches in groups of N (default: PP) and raises in the
    first step, on every rank, unless PP ≤ N ≤ M and the last group is whole or at least PP long; Megatron-LM's
    validation does not check it."""
    micro = args.global_batch_size // (args.micro_batch_size * args.data_parallel_size)
    group = args.microbatch_group_size_per_vp_stage or pp
    if not pp <= group <= micro or 0 < micro % group < pp:
        raise BadInput(f"--global-batch-size {args.global_batch_size}: {micro} micro-batches per step (of "
                       f"{args.micro_batch_size} on each of {args.data_parallel_size} data-parallel ranks); "
                       f"megatron's interleaved schedule runs them in groups of {group} (from the pipeline size "
                       f"{pp} up to the micro-batch count), the last group whole or at least {pp} long")


def training_layout(args: argparse.Namespace, ckpt: TrainingCheckpoint) -> MegatronLayout:
    """The layout Megatron-LM's args train in: TP, PP and virtual pipeline stages (which Megatron-LM's validation
    derives: before it, none)."""
    return MegatronLayout(tp=args.tensor_model_parallel_size, pp=args.pipeline_model_parallel_size,
                          vpp=1 if getattr(args, "virtual_pipeline_model_parallel_size", None) is None
                          else args.virtual_pipeline_model_parallel_size,
                          vocab_divisible_by=ckpt.run_config["layout"]["vocab_divisible_by"])


def _check_save(save: Path, ckpt: TrainingCheckpoint) -> None:
    """--save: a directory (or a new path). Into the checkpoint being resumed is Megatron-LM's way; into an
    import-hf output being fine-tuned from (or a folder inside it) would change that source, its manifest no longer
    matching."""
    if save.exists() and not save.is_dir():
        raise BadInput(f"--save {save}: exists and is not a directory")
    resolved, source = save.resolve(), ckpt.root.resolve()
    if not ckpt.has_optimizer_state and (resolved == source or source in resolved.parents):
        raise BadInput(f"--save {save}: inside the checkpoint this run fine-tunes from ({ckpt.root}), which must "
                       "stay as import-hf wrote it; save elsewhere")


def _check_resumed_optimizer(args: argparse.Namespace, ckpt: TrainingCheckpoint) -> None:
    """Resuming an optimizer state the loop would fail to load, on every rank, after start-up: one saved with the
    distributed optimizer into a run without it or the other way round (megatron-core looks up keys the other kind
    never wrote); and, without Transformer Engine or Apex, any distributed-optimizer state (megatron-core 0.19.2's
    DistributedOptimizer.state_dict asserts one `step` over a state that is still empty while it loads)."""
    from importlib.metadata import version

    from megatron.core.optimizer import distrib_optimizer

    fresh = "or pass --no-load-optim to resume the weights with a fresh optimizer"
    if ckpt.distributed_optimizer_state != bool(args.use_distributed_optimizer):
        saved = "with" if ckpt.distributed_optimizer_state else "without"
        raise BadInput(f"--use-distributed-optimizer: the optimizer state in {ckpt.it_dir} was saved {saved} it; "
                       f"resume {saved} it, {fresh}")
    if args.use_distributed_optimizer and not distrib_optimizer.HAVE_APEX_OR_TE:
        raise BadInput(f"--use-distributed-optimizer: resuming its state ({ckpt.it_dir}) needs Transformer Engine or "
                       f"Apex in megatron-core {version('megatron-core')} (without them its loader fails); install "
                       f"one, {fresh}")


def _check_split(args: argparse.Namespace) -> None:
    """A --split without a validation part, while --eval-iters > 0: Megatron-LM 0.19 still evaluates on that
    missing set after the last iteration (its do_valid tests a list holding None) and every rank crashes there,
    after training. (A missing test part is skipped as it should be.)"""
    from megatron.core.datasets.blended_megatron_dataset_config import parse_and_normalize_split

    if args.mock_data or not args.data_path or not args.eval_iters:
        return
    if not parse_and_normalize_split(args.split)[1]:
        raise BadInput(f"--split {args.split}: without a validation part, pass --eval-iters 0 (Megatron-LM would "
                       "evaluate on the missing validation set after training and fail)")


def _megatron_validation(args: argparse.Namespace, world_size: int) -> argparse.Namespace:
    """Megatron-LM's validate_args on a copy, for this world size: its asserts (batch sizes that do not divide,
    a world size that is not a multiple of TP×PP, missing required flags) become one line here instead of a
    traceback on every rank. Returns the validated copy (with what Megatron-LM derives, such as the virtual
    pipeline size)."""
    import contextlib
    import copy
    import io

    from megatron.training.arguments import validate_args

    trial = copy.deepcopy(args)
    trial.rank, trial.world_size = 0, world_size
    try:
        with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            validate_args(trial, {})
    except (AssertionError, ValueError) as e:
        # many of its asserts carry no message: their source line names the flag (`assert args.save_interval …`)
        where = traceback.extract_tb(e.__traceback__)[-1]
        why = " ".join(str(e).split()) or f"`{where.line}` ({Path(where.filename).name}:{where.lineno})"
        raise BadInput(f"Megatron-LM refuses these flags: {why}") from e
    return trial


def _check_tokenizer(directory: Path, arch: FalconH1Arch) -> None:
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
    except Exception as e:  # noqa: BLE001 - transformers raises many kinds; all mean "not a tokenizer here"
        raise BadInput(f"--tokenizer-model {directory}: not a Hugging Face tokenizer ({type(e).__name__})") from e
    if len(tok) > arch.vocab_size:
        raise BadInput(f"--tokenizer-model {directory}: {len(tok)} tokens, but the checkpoint's vocabulary has "
                       f"{arch.vocab_size}")


def _check_indexed_dataset(path: str) -> None:
    """--data-path entries: a weight or a prefix with .bin and .idx (megatron-core's indexed dataset)."""
    try:
        float(path)
        return  # a blend weight
    except ValueError:
        pass
    for suffix in (".bin", ".idx"):
        if not Path(path + suffix).is_file():
            raise BadInput(f"--data-path {path}: no {path}{suffix} (prepare it with `falcon-bridge prepare-data`)")
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    try:
        IndexedDataset(path, mmap=True)
    except Exception as e:  # noqa: BLE001 - a damaged index fails in numpy or in megatron's own asserts
        raise BadInput(f"--data-path {path}: not a megatron-core indexed dataset ({type(e).__name__})") from e


# ---- the three callbacks pretrain() takes ---------------------------------------------------------------------
def model_provider(ckpt: TrainingCheckpoint, pre_process=True, post_process=True, vp_stage=None, config=None,
                   pg_collection=None):
    """Our model's stage for this rank (with virtual pipeline stages, its chunk `vp_stage`: Megatron-LM asks for
    each), configured by Megatron-LM's args (layout, dtype, run-time settings)."""
    from megatron.training import get_args

    from falcon_bridge.megatron.checkpoint import recorded_multipliers
    from falcon_bridge.megatron.provider import provider_class

    args = get_args()
    rc = ckpt.run_config
    settings = {name: value for name, value in _model_config_fields(args).items() if name in MODEL_RUN_SETTINGS}
    multipliers = recorded_multipliers(rc, ckpt.arch, str(mg.run_config_path(ckpt.it_dir)))
    provider = provider_class(ckpt.arch)(
        ckpt.arch, training_layout(args, ckpt).validate(ckpt.arch), params_dtype=args.params_dtype,
        seq_length=args.seq_length, multipliers=multipliers, bitnet=rc.get("bitnet", False), run_settings=settings)
    model = provider.provide(vp_stage=vp_stage, pg_collection=pg_collection)
    assert (model.pre_process, model.post_process) == (pre_process, post_process)
    return model


BATCH_KEYS = ("tokens", "labels", "loss_mask", "position_ids")  # what GPTDataset gives and forward_step uses


def batch_on_this_rank(data_iterator) -> dict[str, torch.Tensor]:
    """The micro-batch: read by the TP group's first rank (only it has a data iterator, as datasets_provider
    builds them) and broadcast to the others."""
    from megatron.core import parallel_state
    from megatron.training import get_args

    args = get_args()
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    shape = (args.micro_batch_size, args.seq_length)
    if parallel_state.get_tensor_model_parallel_rank() == 0:
        sample = next(data_iterator)
        batch = {key: sample[key].to(device, non_blocking=True) for key in BATCH_KEYS}
    else:
        batch = {key: torch.empty(shape, dtype=torch.float32 if key == "loss_mask" else torch.int64, device=device)
                 for key in BATCH_KEYS}
    for key in BATCH_KEYS:
        torch.distributed.broadcast(batch[key], parallel_state.get_tensor_model_parallel_src_rank(),
                                    group=parallel_state.get_tensor_model_parallel_group())
    return batch


def forward_step(data_iterator, model):
    """Megatron-LM's forward step for a GPT-style batch: the per-token next-token loss on the last stage (our model
    masks the TP vocabulary padding out of its softmax), summed under loss_mask by loss_of_batch. The chunk that
    embeds reads the tokens, the chunk that computes the loss the labels (with virtual pipeline stages a rank holds
    several chunks: which one runs is the model's own pre/post-process flags, not the rank's)."""
    from megatron.core.utils import get_attr_wrapped_model

    first, last = get_attr_wrapped_model(model, "pre_process"), get_attr_wrapped_model(model, "post_process")
    batch = batch_on_this_rank(data_iterator) if first or last else dict.fromkeys(BATCH_KEYS)
    output = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"] if last else None)
    return output, partial(loss_of_batch, batch["loss_mask"])


def loss_of_batch(loss_mask: torch.Tensor, per_token: torch.Tensor):
    """Sum of the masked per-token losses, the token count, and what Megatron-LM logs as 'lm loss'."""
    mask = loss_mask.view(-1).float()
    loss = torch.sum(per_token.view(-1).float() * mask)
    tokens = mask.sum().to(torch.int)
    return loss, tokens, {"lm loss": torch.cat([loss.detach().view(1), tokens.view(1)])}


def datasets_provider(train_valid_test_num_samples, vp_stage=None):
    """Megatron-core's GPT datasets (indexed or mock) built on the ranks that read data (for a rank's virtual
    pipeline chunk `vp_stage`: Megatron-LM asks once per chunk)."""
    from megatron.core import parallel_state
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig, MockGPTDataset
    from megatron.training import get_args, get_tokenizer
    from megatron.training.utils import get_blend_and_blend_per_split

    args = get_args()
    blend, blend_per_split = get_blend_and_blend_per_split(args)
    config = GPTDatasetConfig(
        random_seed=args.seed, sequence_length=args.seq_length, blend=blend, blend_per_split=blend_per_split,
        split=args.split, num_dataset_builder_threads=args.num_dataset_builder_threads,
        path_to_cache=args.data_cache_path, mmap_bin_files=args.mmap_bin_files, tokenizer=get_tokenizer(),
        reset_position_ids=False, reset_attention_mask=False, eod_mask_loss=args.eod_mask_loss,
        create_attention_mask=False)

    def built_on_this_rank():
        stage = (parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage)
                 or parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage))
        return stage and parallel_state.get_tensor_model_parallel_rank() == 0

    kind = MockGPTDataset if args.mock_data else GPTDataset
    return BlendedMegatronDatasetBuilder(kind, train_valid_test_num_samples, built_on_this_rank, config).build()


datasets_provider.is_distributed = True  # Megatron-LM: every rank calls it (it decides where data is built)


# ---- the run ----------------------------------------------------------------------------------------------------
def write_save_dir_files(ckpt: TrainingCheckpoint, args: argparse.Namespace) -> None:
    """Our run config (at the layout and dtype this run trains in) and the tokenizer, in the save directory beside
    Megatron-LM's iteration folders; written whole or not at all (rank 0, before training)."""
    save = Path(args.save)
    save.mkdir(parents=True, exist_ok=True)
    rc = dict(ckpt.run_config)
    layout = training_layout(args, ckpt).validate(ckpt.arch)
    rc["layout"] = {**rc["layout"], "tp": layout.tp, "pp": layout.pp,
                    "pp_layers": list(layout.stage_layers(ckpt.arch.num_layers))}
    rc["dtype"] = str(args.params_dtype).removeprefix("torch.")
    tmp = save / f".{mg.RUN_CONFIG_FILE}.tmp"
    tmp.write_text(json.dumps(rc, indent=2) + "\n")
    os.replace(tmp, save / mg.RUN_CONFIG_FILE)
    if ckpt.tokenizer_dir is not None and ckpt.tokenizer_dir.resolve() != (save / mg.TOKENIZER_DIR).resolve():
        staging = save / f".{mg.TOKENIZER_DIR}.tmp"
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir()
        for f in existing_tokenizer_files(ckpt.tokenizer_dir):
            shutil.copyfile(f, staging / f.name)
        shutil.rmtree(save / mg.TOKENIZER_DIR, ignore_errors=True)
        os.replace(staging, save / mg.TOKENIZER_DIR)


def _use_prebuilt_dataset_helpers() -> None:
    """Megatron-LM compiles megatron-core's C++ dataset helpers at start-up with `make` in the package directory;
    megatron-core's wheel ships them compiled (helpers_cpp) and without the Makefile, so that `make` fails and
    pretrain() exits. Importing the compiled module is what the compilation was for."""
    from megatron.core.datasets import utils

    def compile_helpers():
        import megatron.core.datasets.helpers_cpp  # noqa: F401 - an ImportError says the wheel lacks them

    utils.compile_helpers = compile_helpers


def pretrain_worker(argv: list[str]) -> None:
    """One rank of the run (under torchrun, or alone): Megatron-LM's pretrain with our callbacks."""
    from falcon_bridge.megatron import cpu_support

    cpu_support.install_training()
    _use_prebuilt_dataset_helpers()
    ckpt = TrainingCheckpoint.open(checkpoint_dir(argv))

    from megatron.core.enums import ModelType
    from megatron.training import get_args, pretrain
    from megatron.training.argument_utils import pretrain_cfg_container_from_args
    from megatron.training.arguments import parse_and_validate_args

    sys.argv = ["falcon-bridge train", *argv]
    parse_and_validate_args(extra_args_provider=falcon_bridge_args(ckpt))
    args = get_args()
    if args.save and args.rank == 0:
        write_save_dir_files(ckpt, args)
    with warnings.catch_warnings():  # "use a ModelConfig": the model comes from our provider, as in pretrain_*.py
        warnings.filterwarnings("ignore", message=".*recommended to use a ModelConfig.*")
        cfg = pretrain_cfg_container_from_args(args)
    pretrain(cfg, datasets_provider, ModelType.encoder_or_decoder, forward_step,
             model_provider=partial(model_provider, ckpt))



def under_torchrun() -> bool:
    return "TORCHELASTIC_RUN_ID" in os.environ or "LOCAL_RANK" in os.environ


def train(argv: list[str], nproc_per_node: int = 1) -> int:
    """`falcon-bridge train`: check every flag once, here, before any process group starts; then run
    pretrain_worker in this process (one process) or in nproc_per_node processes started by torchrun (its
    `torch.distributed.run` module; rendezvous on this host). Under torchrun already (several hosts), every rank
    runs pretrain_worker itself: `torchrun ... -m falcon_bridge.megatron.trainer FLAGS`. Returns the exit code."""
    from falcon_bridge.megatron import cpu_support
    from falcon_bridge.megatron.distributed import free_port, quiet

    quiet()  # megatron's import-time notices (no TE/Apex) would bury a refused flag's one line
    cpu_support.install_training()
    # Megatron-LM requires it at TP > 1 on GPUs before Blackwell (its launch scripts export it): kernels are then
    # queued in issue order, so TP communication overlaps compute as megatron-core schedules it
    os.environ.setdefault("CUDA_DEVICE_MAX_CONNECTIONS", "1")
    ckpt = TrainingCheckpoint.open(checkpoint_dir(argv))
    world = int(os.environ.get("WORLD_SIZE", nproc_per_node))
    check_flags(argv, ckpt, world_size=world)
    if under_torchrun():
        pretrain_worker(argv)
        return 0
    if nproc_per_node == 1:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), RANK="0", WORLD_SIZE="1",
                          LOCAL_RANK="0")
        pretrain_worker(argv)
        return 0
    command = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc_per_node}",
               "--master-addr=127.0.0.1", f"--master-port={free_port()}", "-m", __name__, *argv]
    return subprocess.run(command).returncode


if __name__ == "__main__":  # one rank under torchrun: the same checks as `falcon-bridge train`, one line on failure
    try:
        sys.exit(train(sys.argv[1:]))
    except BadInput as error:
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
