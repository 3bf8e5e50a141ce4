"""Runs Megatron-Bridge's own code on falcon-bridge outputs; executed by tests/test_megatron_bridge.py inside
.venv-megatron-bridge (tools/megatron-bridge-env.sh), where falcon_bridge itself is not importable.

Input (argv[1]): a JSON list of cases, each {"checkpoint": dir or null, "iteration_dir": dir, "hf_dir": dir,
"params": {megatron parameter name: [its HF tensor names]}}. Output (stdout, last line): per case what Bridge
made of them. No judgement here: the test compares the answers with our model's table."""

import json
import sys

from te_stub import only_for_bridges_lora

with only_for_bridges_lora():
    import megatron.bridge  # noqa: F401  (registers the model bridges)

from megatron.bridge import AutoBridge
from megatron.bridge.models.falcon_h1.falconh1_bridge import FalconH1Bridge
from megatron.bridge.training.model_load_save import load_model_config
from megatron.bridge.training.utils.checkpoint_utils import checkpoint_exists, read_train_state

FIELDS = ("vocab_size", "hidden_size", "ffn_hidden_size", "num_layers", "num_attention_heads", "num_query_groups",
          "kv_channels", "mamba_state_dim", "mamba_head_dim", "mamba_num_heads", "mamba_num_groups", "d_conv",
          "chunk_size", "conv_bias", "rmsnorm", "norm_before_gate", "add_qkv_bias", "add_bias_linear",
          "layernorm_epsilon", "rotary_base", "seq_length", "share_embeddings_and_output_weights",
          "embedding_multiplier", "lm_head_multiplier", "key_multiplier", "attention_in_multiplier",
          "attention_out_multiplier", "ssm_in_multiplier", "ssm_out_multiplier", "mlp_multipliers",
          "ssm_multipliers", "tensor_model_parallel_size", "pipeline_model_parallel_size")


def provider_fields(provider) -> dict:
    out = {f: getattr(provider, f) for f in FIELDS}
    return {"class": type(provider).__name__,
            **{k: list(v) if isinstance(v, tuple) else v for k, v in out.items()}}


def hf_names(mapping) -> list[str] | None:
    if mapping is None:
        return None
    hf = mapping.hf_param
    return sorted(hf.values() if isinstance(hf, dict) else [hf])


def probe(case: dict, registry) -> dict:
    out = {}
    if case["checkpoint"]:
        out["checkpoint_exists"] = [checkpoint_exists(case["checkpoint"]), checkpoint_exists(case["iteration_dir"])]
        out["train_state_step"] = int(read_train_state(case["checkpoint"] + "/latest_train_state.pt").step)
    config, mlm_args = load_model_config(case["iteration_dir"])
    out["run_config_provider"] = provider_fields(config)
    out["run_config_is_bridges"] = mlm_args is None
    out["hf_provider"] = provider_fields(
        AutoBridge.from_hf_pretrained(case["hf_dir"]).to_megatron_provider(load_weights=False))
    out["megatron_to_hf"] = {name: hf_names(registry.megatron_to_hf_lookup(name)) for name in case["params"]}
    out["hf_to_megatron"] = {}
    for hf in sorted({h for names in case["params"].values() for h in names}):
        mapping = registry.hf_to_megatron_lookup(hf)
        out["hf_to_megatron"][hf] = None if mapping is None else mapping.megatron_param
    return out


def main() -> None:
    with open(sys.argv[1]) as f:
        cases = json.load(f)
    registry = FalconH1Bridge().mapping_registry()
    print(json.dumps([probe(case, registry) for case in cases]))


if __name__ == "__main__":
    main()
