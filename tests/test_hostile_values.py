"""Values wrong in size or kind, beyond test_hostile_inputs: sizes larger than the files hold, YAML aliases, cards of
the wrong shape, values too large for their use, flags that contradict the checkpoint or each other, and outputs
`check` must not call clean. Each is one `error:` line and exit 2 (exit 1 naming the entry for `check`), in
bounded time, nothing at OUT, the source unchanged."""

import json
import os
import shutil
import struct
import time

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_hostile_inputs import CARD, cli, megatron_ckpt, one_error_line, src, tree  # noqa: F401 - fixtures

from falcon_bridge.cards import CARDS_DIR
from falcon_bridge.converters.create_random import SEED_RANGE
from falcon_bridge.converters.import_hf import ImportOptions, import_hf
from falcon_bridge.core.choices import MupMode
from falcon_bridge.core.parallel import MegatronLayout
from falcon_bridge.formats import megatron as mg

SOME = settings(max_examples=8, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
LONGEST_LINE = 600  # a message names a path or two and shows a bounded prefix of a value


def refused(capsys, monkeypatch, args, out, *needles, source=None, seconds=60):
    """`falcon-bridge ARGS` exits 2 within `seconds` with one error line holding the needles; nothing at `out`,
    `source` (a directory) unchanged. Returns the line."""
    before = tree(source) if source else None
    t0 = time.monotonic()
    code, err = cli(capsys, monkeypatch, *args)
    assert code == 2 and time.monotonic() - t0 < seconds, (code, err)
    one_error_line(err, *needles)
    assert len(err.strip()) < LONGEST_LINE, err
    assert not out.exists() and not list(out.parent.glob(".falcon-bridge-partial-*"))
    if source:
        assert tree(source) == before
    return err.strip()


def edit_json(path, edit):
    doc = json.loads(path.read_text())
    edit(doc)
    path.write_text(json.dumps(doc))


@pytest.fixture
def ckpt(megatron_ckpt, tmp_path):  # noqa: F811 - the fixture imported above
    path = tmp_path / "ckpt"
    shutil.copytree(megatron_ckpt, path)
    return path


@pytest.fixture(scope="module")
def folded_ckpt(tiny_hf, tmp_path_factory):
    out = tmp_path_factory.mktemp("mg-fold") / "ckpt"
    import_hf(ImportOptions(str(tiny_hf[CARD]), out, MegatronLayout(), mup_mode=MupMode.FOLD, dtype=torch.float32))
    return out


# ---- item 3: nothing sized by a claim the files do not back, nothing parsed or rendered without bound -------------
HF_SIZE_FIELDS = ["num_hidden_layers", "vocab_size", "hidden_size", "intermediate_size", "mamba_d_ssm",
                  "mamba_d_state", "mamba_d_conv"]


@SOME
@given(field=st.sampled_from(HF_SIZE_FIELDS), value=st.integers(5, 10**30))
def test_config_sizes_beyond_what_the_files_hold(src, tmp_path, capsys, monkeypatch, field, value):  # noqa: F811
    """A config.json claiming more layers than the safetensors headers hold is refused naming the field, before
    anything loops over the layers (10**9 layers looped while memory grew); any other size is checked against the
    headers' shapes before a tensor is read."""
    config = src / "config.json"
    original = config.read_text()
    edit_json(config, lambda c: c.update({field: c[field] * value if field != "num_hidden_layers" else value}))
    try:
        line = refused(capsys, monkeypatch, ["import-hf", src, tmp_path / "out"], tmp_path / "out", "config.json",
                       seconds=30)
        if field == "num_hidden_layers":
            assert f"field num_hidden_layers is {value}, but the checkpoint holds tensors of 4 layers" in line
        else:  # the field, or the tensor it shapes
            assert field in line or "config.json implies" in line, line
    finally:
        config.write_text(original)


@pytest.mark.parametrize("source", ["run config", "hf-config", "card", "bridge run_config.yaml"])
def test_megatron_architecture_claiming_more_layers_than_stored(source, ckpt, src, tmp_path, capsys,  # noqa: F811
                                                                monkeypatch):
    it_dir = ckpt / "iter_0000000"
    flags = []
    if source == "run config":
        edit_json(it_dir / mg.RUN_CONFIG_FILE, lambda rc: (rc["architecture"].update(num_layers=10**9),
                                                           rc["layout"].update(pp_layers=[10**9])))
        field = "falcon_bridge_run_config.json: field architecture.num_layers is 1000000000"
    elif source == "hf-config":
        edit_json(src / "config.json", lambda c: c.update(num_hidden_layers=10**9))
        flags, field = ["--hf-config", src / "config.json"], "config.json: field num_hidden_layers is 1000000000"
    elif source == "card":
        card = tmp_path / "deep.yaml"
        card.write_text((CARDS_DIR / "tiny" / f"{CARD}.yaml").read_text().replace("num_layers: 4",
                                                                                   "num_layers: 1000000000"))
        flags, field = ["--card", card], "field num_layers is 1000000000"
    else:
        (it_dir / mg.RUN_CONFIG_FILE).unlink()
        yaml_file = it_dir / mg.BRIDGE_RUN_CONFIG_FILE
        yaml_file.write_text(yaml_file.read_text().replace("num_layers: 4", "num_layers: 1000000000"))
        field = "run_config.yaml: field model.num_layers is 1000000000"
    refused(capsys, monkeypatch, ["export-hf", ckpt, tmp_path / "out", *flags], tmp_path / "out", field,
            "holds tensors of 4 layers", source=ckpt, seconds=30)


def test_create_random_of_a_card_claiming_a_billion_layers(tmp_path, capsys, monkeypatch):
    """Its size is counted from one layer and refused for the free space, before a loop over its layers."""
    card = card_document(tmp_path, (CARDS_DIR / "tiny" / f"{CARD}.yaml").read_text().replace(
        "num_layers: 4", "num_layers: 1000000000"))
    refused(capsys, monkeypatch, ["create-random", card, tmp_path / "out"], tmp_path / "out", "not enough disk space",
            seconds=30)


@pytest.mark.parametrize("field", ["eos_token_id", "pad_token_id", "bos_token_id"])
def test_token_ids_beyond_the_vocabulary(field, src, tmp_path, capsys, monkeypatch):  # noqa: F811
    """create-random's tokenizer held one special token per id up to the largest: an id of 10**9 grew without
    bound."""
    card = card_document(tmp_path, (CARDS_DIR / "tiny" / "tiny-vocab-pad.yaml").read_text().replace(
        f"  {field}: ", f"  {field}: 1000000000  # "))
    refused(capsys, monkeypatch, ["create-random", card, tmp_path / "out"], tmp_path / "out",
            f"field {field}: token id 1000000000 is outside the vocabulary [0, 1001)", seconds=30)
    edit_json(src / "config.json", lambda c: c.update({field: [5, 256]}))
    refused(capsys, monkeypatch, ["import-hf", src, tmp_path / "out"], tmp_path / "out",
            f"field {field}: token id 256 is outside the vocabulary [0, 256)", source=src)


def test_a_safetensors_header_is_parsed_once(src, tmp_path, capsys, monkeypatch):  # noqa: F811
    """99 MB of whitespace in a header (safetensors' limit is 100 MB) was parsed again for every tensor: 25 s
    instead of 0.4 s for a tiny model. CPU time, so that other work on the machine does not count."""
    def import_cpu_seconds(source, out):
        t0 = time.process_time()
        code, err = cli(capsys, monkeypatch, "import-hf", source, out)
        assert code == 0, err
        return time.process_time() - t0

    padded = tmp_path / "padded"
    shutil.copytree(src, padded)
    raw = (padded / "model.safetensors").read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    header = raw[8:8 + length].rstrip(b" ") + b" " * 99_000_000
    header += b" " * (-len(header) % 8)
    (padded / "model.safetensors").write_bytes(struct.pack("<Q", len(header)) + header + raw[8 + length:])
    plain = import_cpu_seconds(src, tmp_path / "plain")
    assert import_cpu_seconds(padded, tmp_path / "from-padded") < plain + 3.0

    def weights(out):
        return {name: data for name, data in tree(out).items() if name.endswith(".distcp")}
    assert weights(tmp_path / "plain") == weights(tmp_path / "from-padded")


ALIAS_BOMB = "".join([f"a0: &a0 [{', '.join(['lol'] * 9)}]\n"]
                     + [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]\n" for i in range(1, 9)])


def test_yaml_alias_bomb_in_megatron_bridge_run_config(ckpt, tmp_path, capsys, monkeypatch):
    """9**9 items behind nine lines: export-hf hung rendering the expanded value into its message."""
    it_dir = ckpt / "iter_0000000"
    (it_dir / mg.RUN_CONFIG_FILE).unlink()  # a Megatron-Bridge checkpoint: its run_config.yaml gives the model
    yaml_file = it_dir / mg.BRIDGE_RUN_CONFIG_FILE
    yaml_file.write_text(ALIAS_BOMB + yaml_file.read_text().replace("vocab_size: 256", "vocab_size: *a8"))
    refused(capsys, monkeypatch, ["export-hf", ckpt, tmp_path / "out"], tmp_path / "out", "run_config.yaml: line 2",
            "aliases", source=ckpt, seconds=30)


def test_yaml_aliases_in_a_card(tmp_path, capsys, monkeypatch):
    card = tmp_path / "card.yaml"
    card.write_text(ALIAS_BOMB + (CARDS_DIR / "tiny" / f"{CARD}.yaml").read_text().replace("vocab_size: 256",
                                                                                           "vocab_size: *a8"))
    refused(capsys, monkeypatch, ["create-random", card, tmp_path / "out"], tmp_path / "out", "card.yaml: line 2",
            "aliases")


HUGE_VALUES = {"long list": list(range(2_000_000)), "long string": "x" * 20_000_000,
               "deep list": json.loads("[" * 200 + "]" * 200), "wide object": {str(i): i for i in range(500_000)}}


@SOME
@given(field=st.sampled_from(["vocab_size", "num_attention_heads", "rms_norm_eps", "mamba_rms_norm",
                              "ssm_multipliers", "rope_scaling", "model_type", "hidden_act"]),
       value=st.sampled_from(sorted(HUGE_VALUES)))
def test_messages_show_a_bounded_prefix_of_a_value(src, tmp_path, capsys, monkeypatch, field, value):  # noqa: F811
    config = src / "config.json"
    original = config.read_text()
    edit_json(config, lambda c: c.update({field: HUGE_VALUES[value]}))
    try:
        refused(capsys, monkeypatch, ["import-hf", src, tmp_path / "out"], tmp_path / "out", field, seconds=30)
    finally:
        config.write_text(original)


# ---- item 5: one line instead of a traceback -----------------------------------------------------------------
def card_document(tmp_path, text):
    path = tmp_path / "card.yaml"
    path.write_text(text)
    return path


def released_card(tmp_path, old, new):
    text = (CARDS_DIR / "falcon-h1-0.5b.yaml").read_text()
    assert text.count(old) == 1
    return card_document(tmp_path, text.replace(old, new))


CARDS = {
    "a string document": (lambda t: card_document(t, "name architecture multipliers\n"),
                          "expected a mapping of card fields, got str"),
    "a list document": (lambda t: card_document(t, "[name, architecture, multipliers]\n"),
                        "expected a mapping of card fields, got list"),
    "architecture a number": (lambda t: released_card(t, "architecture:\n", "architecture: 5\nold_architecture:\n"),
                              "field architecture: expected a mapping, got 5"),
    "name a list": (lambda t: released_card(t, "name: falcon-h1-0.5b", "name: [a, b]"),
                    "field name: expected a string, got ['a', 'b']"),
    "provenance a number": (lambda t: released_card(t, "provenance:\n", "provenance: 7\nold_provenance:\n"),
                            "field provenance: expected a mapping"),
    "provenance entry a list": (lambda t: released_card(t, "default: {verified: true, source: cfg}",
                                                        "default: [true, cfg]"),
                                "field 'vocab_size' has no provenance naming one of its sources"),
    "provenance source a list": (lambda t: released_card(t, "source: cfg}", "source: [cfg]}"),
                                 "field 'vocab_size' has no provenance naming one of its sources"),
    "verified a string": (lambda t: released_card(t, "verified: true", "verified: 'no'"),
                          "field verified: expected true or false, got 'no'"),
    "sources a number": (lambda t: released_card(t, "sources:\n", "sources: 5\nold_sources:\n"),
                         "field sources: expected a mapping"),
    "an integer of 5000 digits": (lambda t: released_card(t, "vocab_size: 32784", "vocab_size: " + "9" * 5000),
                                  "not a readable model card"),
}


@pytest.mark.parametrize("command", ["create-random", "export-hf --card"])
@pytest.mark.parametrize("case", CARDS)
def test_cards_of_the_wrong_shape(case, command, ckpt, tmp_path, capsys, monkeypatch):
    make, message = CARDS[case]
    card, out = make(tmp_path), tmp_path / "out"
    args = ["create-random", card, out] if command == "create-random" else ["export-hf", ckpt, out, "--card", card]
    refused(capsys, monkeypatch, args, out, str(card), message)


def test_disk_full_while_common_pt_is_written(src, tmp_path, capsys, monkeypatch):  # noqa: F811
    """torch.save's own file writer turns the kernel's ENOSPC into RuntimeError('basic_ios::clear: iostream
    error'). The disk fills up exactly there: common.pt's bytes go to /dev/full, whose writes fail with ENOSPC."""
    real_save = torch.save

    def save_onto_a_full_disk(obj, f, *args, **kwargs):
        if os.path.basename(str(getattr(f, "name", f))) != mg.COMMON_STATE_FILE:
            return real_save(obj, f, *args, **kwargs)
        if isinstance(f, str | os.PathLike):
            return real_save(obj, "/dev/full", *args, **kwargs)
        with open("/dev/full", "wb") as full:
            return real_save(obj, full, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save_onto_a_full_disk)
    refused(capsys, monkeypatch, ["import-hf", src, tmp_path / "out"], tmp_path / "out", "disk full", source=src)


@pytest.mark.parametrize("content, message", [
    ("[1, 100000000000000000000000]", "token id 100000000000000000000000 is outside the vocabulary [0, 256)"),
    ("1 2 -3", "token id -3 is outside the vocabulary"),
    ("[" * 15_000 + "1" + "]" * 15_000, "expected token ids"),
    ("1 " + "9" * 5000, "expected token ids"),
])
def test_verify_token_files_with_ids_too_large_or_too_deep(content, message, megatron_ckpt, tiny_hf,  # noqa: F811
                                                           tmp_path, capsys, monkeypatch):
    tokens = tmp_path / "tokens.txt"
    tokens.write_text(content)
    code, err = cli(capsys, monkeypatch, "verify", tiny_hf[CARD], megatron_ckpt, "--tokens", tokens)
    assert code == 2
    one_error_line(err, "tokens.txt", message)


@pytest.mark.parametrize("seed", [10**30, -(10**30), SEED_RANGE[1] + 1, SEED_RANGE[0] - 1])
def test_create_random_seed_out_of_range(seed, tmp_path, capsys, monkeypatch):
    refused(capsys, monkeypatch, ["create-random", CARD, tmp_path / "out", "--seed", seed], tmp_path / "out",
            f"--seed {seed}: expected an integer from")


@pytest.mark.parametrize("seed", SEED_RANGE)
def test_create_random_accepts_the_ends_of_the_seed_range(seed, tmp_path, capsys, monkeypatch):
    code, err = cli(capsys, monkeypatch, "create-random", CARD, tmp_path / "out", "--seed", seed)
    assert code == 0, err


# ---- item 6: accepted although wrong -------------------------------------------------------------------------
@pytest.mark.parametrize("field", ["head_dim", "mamba_d_head", "mamba_d_ssm", "num_key_value_heads"])
def test_a_zero_size_is_refused_not_derived(field, src, tmp_path, capsys, monkeypatch):  # noqa: F811
    edit_json(src / "config.json", lambda c: c.update({field: 0}))
    refused(capsys, monkeypatch, ["import-hf", src, tmp_path / "out"], tmp_path / "out",
            f"field {field}: expected a positive integer, got 0")


@pytest.mark.parametrize("size", [0, -1])
@pytest.mark.parametrize("command", ["create-random", "export-hf"])
def test_max_shard_size_must_be_positive(command, size, ckpt, tmp_path, capsys, monkeypatch):
    source = CARD if command == "create-random" else ckpt
    refused(capsys, monkeypatch, [command, source, tmp_path / "out", "--max-shard-size", size], tmp_path / "out",
            f"--max-shard-size {size}: expected a positive number of bytes")


@pytest.mark.parametrize("command", ["export-hf", "reshard"])
def test_card_and_hf_config_are_alternatives(command, ckpt, tiny_hf, tmp_path, capsys, monkeypatch):
    refused(capsys, monkeypatch, [command, ckpt, tmp_path / "out", "--card", CARD, "--hf-config",
                                  tiny_hf[CARD] / "config.json"], tmp_path / "out", "--card and --hf-config are "
            "alternatives", source=ckpt)


def test_keep_folded_needs_a_folded_checkpoint(ckpt, folded_ckpt, tmp_path, capsys, monkeypatch):
    refused(capsys, monkeypatch, ["export-hf", ckpt, tmp_path / "out", "--mup", "keep-folded"], tmp_path / "out",
            "--mup keep-folded: the weights hold no folded multipliers (mode preserve)", source=ckpt)
    code, err = cli(capsys, monkeypatch, "export-hf", folded_ckpt, tmp_path / "kept", "--mup", "keep-folded")
    assert code == 0, err


def metadata_json_directory(it_dir):
    (it_dir / "metadata.json").unlink()
    (it_dir / "metadata.json").mkdir()


RUN_CONFIG_EDITS = {
    "metadata.json a directory": (metadata_json_directory, "metadata.json: not a regular file"),
    "metadata.json of another backend": (
        lambda d: edit_json(d / "metadata.json", lambda m: m.update(sharded_backend="zarr")),
        "metadata.json: field sharded_backend: expected 'torch_dist', got 'zarr'"),
    "folded multipliers changed": (
        lambda d: edit_json(d / mg.RUN_CONFIG_FILE,
                            lambda rc: rc["mup"]["folded_multipliers"].update(embedding_multiplier=3.0)),
        "field mup.folded_multipliers.embedding_multiplier is 3.0, but the architecture's multipliers make it"),
    "folded multipliers not numbers": (
        lambda d: edit_json(d / mg.RUN_CONFIG_FILE,
                            lambda rc: rc["mup"]["folded_multipliers"].update(key_multiplier="big")),
        "field mup.folded_multipliers: field key_multiplier: expected a finite number, got 'big'"),
    "applied multipliers changed": (
        lambda d: edit_json(d / mg.RUN_CONFIG_FILE,
                            lambda rc: rc["mup"]["applied_multipliers"].update(ssm_in_multiplier=2.0)),
        "field mup.applied_multipliers.ssm_in_multiplier is 2.0"),
    "tokenizer files outside": (
        lambda d: edit_json(d / mg.RUN_CONFIG_FILE, lambda rc: rc.update(tokenizer_files=["../../etc/passwd"])),
        "field tokenizer_files: expected a list of file names"),
    "tokenizer files a number": (
        lambda d: edit_json(d / mg.RUN_CONFIG_FILE, lambda rc: rc.update(tokenizer_files=7)),
        "field tokenizer_files: expected a list of file names, got 7"),
    "layout.tp not dividing the heads": (
        lambda d: edit_json(d / mg.RUN_CONFIG_FILE, lambda rc: rc["layout"].update(tp=3)),
        "field layout (the parallelism the checkpoint was written for) does not fit its architecture: --tp 3"),
    "layout.pp_layers not summing to the layers": (
        lambda d: edit_json(d / mg.RUN_CONFIG_FILE, lambda rc: rc["layout"].update(pp_layers=[1, 1])),
        "field layout (the parallelism the checkpoint was written for) does not fit"),
}


@pytest.mark.parametrize("command", ["export-hf", "reshard", "verify"])
@pytest.mark.parametrize("case", RUN_CONFIG_EDITS)
def test_run_config_fields_are_checked(case, command, folded_ckpt, tiny_hf, tmp_path, capsys, monkeypatch):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(folded_ckpt, ckpt)
    damage, message = RUN_CONFIG_EDITS[case]
    damage(ckpt / "iter_0000000")
    args = [command, ckpt, tmp_path / "out"] if command != "verify" else ["verify", tiny_hf[CARD], ckpt]
    refused(capsys, monkeypatch, args, tmp_path / "out", message, source=ckpt)


def fifo(out):
    os.mkfifo(out / "fifo")
    return "fifo: FIFO not in the manifest"


def empty_directory(out):
    (out / "empty").mkdir()
    return "empty: directory not in the manifest"


def link_to_etc(out):
    (out / "etc").symlink_to("/etc")
    return "etc: symbolic link not in the manifest"


def file_in_a_new_directory(out):
    (out / "extra").mkdir()
    (out / "extra" / "notes.txt").write_text("x")
    return "extra: directory not in the manifest"


def file_replaced_by_a_link_to_its_copy(out):
    config = out / "iter_0000000" / mg.RUN_CONFIG_FILE
    shutil.copy(config, out.parent / "copy.json")
    config.unlink()
    config.symlink_to(out.parent / "copy.json")
    return f"iter_0000000/{mg.RUN_CONFIG_FILE}: a symbolic link, not the regular file the manifest records"


def iteration_directory_replaced_by_a_link(out):
    it_dir = out / "iter_0000000"
    it_dir.rename(out.parent / "moved")
    it_dir.symlink_to(out.parent / "moved")
    return "iter_0000000: symbolic link not in the manifest"


@pytest.mark.parametrize("addition", [fifo, empty_directory, link_to_etc, file_in_a_new_directory,
                                      file_replaced_by_a_link_to_its_copy, iteration_directory_replaced_by_a_link])
def test_check_refuses_what_the_manifest_does_not_list(addition, megatron_ckpt, tmp_path, capsys,  # noqa: F811
                                                       monkeypatch):
    out = tmp_path / "out"
    shutil.copytree(megatron_ckpt, out)
    assert cli(capsys, monkeypatch, "check", out) == (0, "")
    problem = addition(out)
    code, err = cli(capsys, monkeypatch, "check", out)
    assert code == 1 and f"mismatch: {out / problem}" in err.splitlines(), err
