"""Megatron-Bridge and Megatron-LM read our checkpoints as written, and export-hf reads theirs without flags.

These tests reproduce the exact condition each loader's code checks, cited by file and line (Megatron-Bridge
v0.6.0 = 51885cf, v0.5.1 = 5cb3444; Megatron-LM core_v0.19.0 = 5be9626), and use megatron-core's own functions
where they are the ones those loaders call. Megatron-LM's loop itself runs in tests/test_train.py, and
Megatron-Bridge 0.6.2's own config loading, checkpoint detection and mapping registry in
tests/test_megatron_bridge.py (its separate environment)."""

import json
import shutil

import pytest
import torch
import yaml
from megatron_workers import train_and_save_as_bridge

from falcon_bridge.cards import load_card
from falcon_bridge.converters.export_hf import ExportOptions, export_hf
from falcon_bridge.converters.import_hf import ImportOptions, import_hf
from falcon_bridge.converters.verify import sample_tokens
from falcon_bridge.core.mapping import megatron_extra_state_keys
from falcon_bridge.core.parallel import MegatronLayout
from falcon_bridge.errors import BadInput
from falcon_bridge.formats import megatron as mg
from falcon_bridge.formats.hf import existing_tokenizer_files, ulp_differences
from falcon_bridge.megatron.distributed import launch

CARD = "tiny-mup"  # non-unit multipliers everywhere: a run config that drops one is caught


@pytest.fixture(scope="module")
def imported(tiny_hf, tmp_path_factory):
    out = tmp_path_factory.mktemp("interop") / "mg"
    import_hf(ImportOptions(str(tiny_hf[CARD]), out, MegatronLayout(tp=2)))
    return out


def test_bridge_finds_the_iteration_without_tripping_on_iteration_zero(imported):
    # Bridge checkpointing.py v0.6.0 L322 (read_metadata): `assert iteration > 0 or release` on the txt tracker;
    # _resolve_checkpoint_iteration (L3308ff.) reads ROOT/latest_train_state.pt first, with weights_only=True
    # (checkpoint_utils.read_train_state L392), and TrainState.load_state_dict indexes all eight keys.
    state = torch.load(imported / mg.TRAIN_STATE_FILE, weights_only=True)
    assert sorted(state) == sorted(["step", "consumed_train_samples", "skipped_train_samples",
                                    "consumed_valid_samples", "floating_point_operations_so_far", "do_train",
                                    "do_valid", "do_test"])
    assert all(isinstance(v, torch.Tensor) and v.dim() == 0 for v in state.values()) and state["step"].item() == 0
    # ROOT must not look like an iteration folder (checkpoint_utils L156: run_config.yaml, train_state.pt,
    # metadata.json, .metadata mark one)
    assert not any((imported / name).exists() for name in ("run_config.yaml", "train_state.pt", "metadata.json",
                                                           ".metadata"))
    # Megatron-LM core_v0.19.0 read_metadata L371 accepts "0"
    assert (imported / mg.TRACKER_FILE).read_text().strip() == "0"


def test_common_state_has_what_megatron_lm_and_bridge_read(imported, tmp_path):
    from megatron.core.dist_checkpointing import load_common_state_dict

    it_dir = imported / "iter_0000000"
    # megatron-core ≤ 0.18 (Bridge 0.5.x) reads only common.pt (strategies/common.py L41-56); 0.19 prefers it
    from_file = torch.load(it_dir / mg.COMMON_STATE_FILE, weights_only=True)
    assert load_common_state_dict(str(it_dir)) == from_file
    # Megatron-LM without --finetune: state_dict['iteration'] or exit (checkpointing.py L2476-2486);
    # Bridge v0.5.1 L2318 indexes content_metadata even when fine-tuning
    assert from_file["iteration"] == 0 and from_file["checkpoint_version"] == 3.0
    assert isinstance(from_file["content_metadata"], dict)
    # the copy inside DCP (what 0.19 reads without common.pt) says the same
    shutil.copytree(it_dir, tmp_path / "iter")
    (tmp_path / "iter" / mg.COMMON_STATE_FILE).unlink()
    assert load_common_state_dict(str(tmp_path / "iter")) == from_file


def test_transformer_engine_norm_extra_state_is_in_the_checkpoint(imported):
    """Bridge 0.6's Falcon-H1 spec builds norm=TENorm and final_norm=TENorm (falconh1_layer_specs.py L85,
    falconh1_block.py L227), TE's RMSNorm, which has `_extra_state`; megatron's load asks for every key the model
    has (dist_ckpt_strictness assume_ok_unexpected: missing keys fail). Every such key is stored."""
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata

    meta = mg.checked_metadata(imported / "iter_0000000")
    stored = {k for k, m in meta.state_dict_metadata.items() if isinstance(m, BytesStorageMetadata)}
    arch = load_card(CARD).arch
    for key in ("decoder.final_norm._extra_state/shard_0_1", "decoder.layers.0.norm._extra_state/shard_0_1",
                "decoder.layers.3.mlp.linear_fc1._extra_state/shard_0_1", "output_layer._extra_state/shard_0_1"):
        assert key in stored
    assert set(megatron_extra_state_keys(arch)) <= stored


def test_run_config_yaml_is_bridges_provider_with_our_architecture(imported):
    it_dir = imported / "iter_0000000"
    doc = yaml.safe_load((it_dir / mg.BRIDGE_RUN_CONFIG_FILE).read_text())
    model = doc["model"]
    # model_load_save.load_model_config L271-275: instantiate(run_config["model"]); the training loader reads
    # model.tensor/pipeline_model_parallel_size and checkpoint.save_rng/save_optim (checkpointing.py L2232-2278)
    assert model["_target_"] == "megatron.bridge.models.falcon_h1.falconh1_provider.FalconH1ModelProvider"
    assert model["activation_func"] == {"_target_": "torch.nn.functional.silu", "_call_": False}  # default: gelu
    assert model["tensor_model_parallel_size"] == 2 and model["pipeline_model_parallel_size"] == 1
    assert model["hybrid_override_pattern"] is None and model["falconh1_ratio"] == 1.0
    assert doc["checkpoint"]["save_optim"] is False and doc["checkpoint"]["save_rng"] is False
    # the provider's fields describe exactly the HF architecture, multipliers included
    assert mg.arch_from_bridge_run_config(it_dir).to_hf() == {**load_card(CARD).arch.to_hf(), **{
        k: v for k, v in mg.arch_from_bridge_run_config(it_dir).to_hf().items()
        if k in ("bos_token_id", "eos_token_id", "pad_token_id")}}


def test_folded_import_tells_bridge_to_apply_no_multiplier(tiny_hf, tmp_path):
    import_hf(ImportOptions(str(tiny_hf[CARD]), tmp_path / "mg", MegatronLayout(), mup_mode="fold"))
    model = yaml.safe_load((tmp_path / "mg" / "iter_0000000" / mg.BRIDGE_RUN_CONFIG_FILE).read_text())["model"]
    assert model["embedding_multiplier"] == 1.0 and model["ssm_multipliers"] == [1.0] * 5


@pytest.fixture(scope="module")
def bridge_checkpoint(imported, tiny_hf, tmp_path_factory):
    out = tmp_path_factory.mktemp("bridge") / "ckpt"
    batches = [sample_tokens(256, 2, 16, seed=s) for s in range(2)]
    launch(train_and_save_as_bridge, 2, str(imported), 2, batches, str(out), 5)
    # tiny-mup's 256 ids are too few for a tokenizer: Bridge's tokenizer/ folder gets a real one from another card
    for f in existing_tokenizer_files(tiny_hf["tiny-vocab-pad"]):
        shutil.copy(f, out / "iter_0000005" / "tokenizer" / f.name)
    return out


def test_export_reads_a_bridge_checkpoint_without_flags(bridge_checkpoint, tiny_hf, tmp_path):
    """Optimizer and RNG state, iteration 5, Megatron-LM args in the common state, Bridge's run_config.yaml and
    tokenizer/ folder, no run config of ours: export-hf needs no flag, and gives what --hf-config gives."""
    summary = export_hf(ExportOptions(bridge_checkpoint, tmp_path / "hf"))
    export_hf(ExportOptions(bridge_checkpoint, tmp_path / "given", hf_config=tiny_hf[CARD] / "config.json"))
    assert set(ulp_differences(tmp_path / "hf", tmp_path / "given").values()) == {0}
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    source = json.loads((tiny_hf[CARD] / "config.json").read_text())
    for key in ("hidden_size", "mamba_d_ssm", "mamba_n_groups", "ssm_multipliers", "mlp_multipliers",
                "key_multiplier", "embedding_multiplier", "tie_word_embeddings", "rope_theta"):
        assert config[key] == source[key], key
    tokenizer = sorted(p.name for p in (bridge_checkpoint / "iter_0000005" / "tokenizer").iterdir())
    assert "tokenizer.json" in tokenizer and sorted(summary.tokenizer_files) == tokenizer


def test_a_run_config_yaml_that_is_not_bridges_falcon_h1_is_refused(bridge_checkpoint, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(bridge_checkpoint, bad)
    path = bad / "iter_0000005" / mg.BRIDGE_RUN_CONFIG_FILE
    doc = yaml.safe_load(path.read_text())
    path.write_text(yaml.safe_dump({**doc, "model": {**doc["model"], "_target_": "megatron.bridge.models.Llama"}}))
    with pytest.raises(BadInput, match="run_config.yaml: field model._target_"):
        export_hf(ExportOptions(bad, tmp_path / "out"))
    path.write_text(yaml.safe_dump({**doc, "model": {**doc["model"], "hidden_size": 96}}))
    with pytest.raises(BadInput, match="has shape .* the architecture implies"):
        export_hf(ExportOptions(bad, tmp_path / "out"))
    assert not (tmp_path / "out").exists()
