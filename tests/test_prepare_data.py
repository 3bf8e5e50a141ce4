"""prepare-data: text → megatron-core's indexed dataset. The .bin/.idx read back through megatron-core's own
IndexedDataset give exactly the HF tokenizer's ids (+ EOS) per document; GPTDataset builds samples from them; runs
are deterministic; bad input is one `error:` line, exit 2, nothing left at the output."""

import json
import signal
import subprocess
import sys
import time
import warnings

import numpy as np
import pytest
from conftest import run_cli as cli
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from falcon_bridge.cards import load_card
from falcon_bridge.converters.output import TMP_MARK
from falcon_bridge.converters.prepare_data import PrepareDataOptions, prepare_data
from falcon_bridge.converters.tokenizer import build_tokenizer
from falcon_bridge.errors import BadInput
from falcon_bridge.formats.manifest import MANIFEST_FILE, check_manifest


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    """The small byte-level BPE tokenizer create-random writes (EOS id 2), built offline."""
    path = tmp_path_factory.mktemp("tokenizer")
    assert build_tokenizer(load_card("tiny-vocab-pad").arch, path)
    return path


@pytest.fixture(scope="module")
def hf_tok(tok_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tok_dir), local_files_only=True)


def expected(hf_tok, texts, eod=True):
    """What every document should become: the tokenizer's ids, then EOS; documents without ids are skipped."""
    out = []
    for text in texts:
        ids = hf_tok(text)["input_ids"]
        if ids:
            out.append(ids + [hf_tok.eos_token_id] if eod else ids)
    return out


def read_back(prefix):
    """Every document of an indexed dataset through megatron-core's own reader (one sequence per document)."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    ds = IndexedDataset(str(prefix))
    assert list(ds.document_indices) == list(range(len(ds) + 1))
    return [ds[i].tolist() for i in range(len(ds))]


def one_error_line(stderr: str, *needles: str) -> None:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), stderr
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


def write_jsonl(path, texts, key="text", **extra):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({key: t, **extra}) + "\n" for t in texts), encoding="utf-8")
    return path


def run(inputs, tok_dir, prefix, **kw):
    return prepare_data(PrepareDataOptions(inputs=tuple(inputs), tokenizer=tok_dir, output_prefix=prefix, **kw))


# ---- what gets written ---------------------------------------------------------------------------------------
def test_jsonl_text_and_directory_round_trip(tok_dir, hf_tok, tmp_path, capsys, monkeypatch):
    corpus = tmp_path / "corpus"
    jsonl = ["Falcon-H1 runs attention and Mamba side by side.", "", "ünïcödé ✓ 日本語 [bold]x[/] \\n",
             "two\nlines"]
    write_jsonl(corpus / "b" / "a.jsonl", jsonl, meta={"id": 1})
    (corpus / "b" / "a.jsonl").write_text((corpus / "b" / "a.jsonl").read_text() + "\n   \n")  # blank lines
    (corpus / "a.txt").write_bytes(b"first paragraph\nsecond line\r\n\n \t\nsecond doc\n\n\nthird doc")
    write_jsonl(corpus / "c.json", ["json lines in a .json file"])
    (corpus / "notes.md").write_text("not read")
    (corpus / ".hidden").mkdir()
    write_jsonl(corpus / ".hidden" / "x.jsonl", ["hidden, not read"])
    extra = write_jsonl(tmp_path / "extra.jsonl", ["an explicit file after the directory"])

    prefix = tmp_path / "new" / "deeper" / "out" / "corpus"  # OUT's parents are created, as for every command
    code, stdout, stderr = cli(capsys, monkeypatch, "prepare-data", corpus, extra, "--tokenizer", tok_dir,
                               "--output-prefix", prefix, "--json")
    assert code == 0, stderr
    summary = json.loads(stdout)

    texts = (["first paragraph\nsecond line", "second doc", "third doc"]  # a.txt sorts before b/a.jsonl
             + jsonl + ["json lines in a .json file", "an explicit file after the directory"])
    want = expected(hf_tok, texts)
    assert read_back(prefix) == want
    assert summary["files"] == 4 and summary["documents"] == len(want) == len(texts) - 1
    assert summary["skipped_empty"] == 1 and summary["tokens"] == sum(map(len, want))
    assert summary["data_path"] == str(prefix) and summary["dtype"] == "uint16" and summary["eod"] == 2
    out = prefix.parent
    assert sorted(p.name for p in out.iterdir()) == ["corpus.bin", "corpus.idx", MANIFEST_FILE]
    assert check_manifest(out) == []
    manifest = json.loads((out / MANIFEST_FILE).read_text())
    assert manifest["command"]["name"] == "prepare-data"
    assert str(corpus / "a.txt") in manifest["sources"] and str(tok_dir / "tokenizer.json") in manifest["sources"]
    assert np.fromfile(prefix.with_suffix(".bin"), dtype=np.uint16).tolist() == [i for d in want for i in d]


def test_json_key_no_eod_and_overwrite(tok_dir, hf_tok, tmp_path, capsys, monkeypatch):
    src = write_jsonl(tmp_path / "in.jsonl", ["alpha beta", "gamma"], key="content")
    prefix = tmp_path / "out" / "data"
    code, _, stderr = cli(capsys, monkeypatch, "prepare-data", src, "--tokenizer", tok_dir, "--output-prefix",
                          prefix, "--json-key", "content", "--no-append-eod")
    assert code == 0, stderr
    assert read_back(prefix) == expected(hf_tok, ["alpha beta", "gamma"], eod=False)
    write_jsonl(src, ["delta"], key="content")  # --overwrite replaces an earlier prepare-data output
    code, _, stderr = cli(capsys, monkeypatch, "prepare-data", src, "--tokenizer", tok_dir, "--output-prefix",
                          prefix, "--json-key", "content", "--overwrite")
    assert code == 0, stderr
    assert read_back(prefix) == expected(hf_tok, ["delta"])
    assert not list(tmp_path.glob(f"{TMP_MARK}*"))


def test_two_runs_are_byte_identical(tok_dir, tmp_path):
    corpus = tmp_path / "corpus"
    for i in range(5):
        write_jsonl(corpus / f"part{i}" / "x.jsonl", [f"document {i}.{j} " * (j + 1) for j in range(50)])
        (corpus / f"part{i}" / "y.txt").write_text("\n\n".join(f"paragraph {i}.{j}" for j in range(20)))
    a = run([corpus], tok_dir, tmp_path / "a" / "c")
    b = run([corpus], tok_dir, tmp_path / "b" / "c")
    assert a.documents == b.documents == 5 * 70
    for suffix in (".bin", ".idx"):
        assert (tmp_path / "a" / f"c{suffix}").read_bytes() == (tmp_path / "b" / f"c{suffix}").read_bytes()


def test_large_vocabularies_get_megatron_cores_int32(tok_dir, hf_tok, tmp_path, monkeypatch):
    """The dtype is megatron-core's DType.optimal_dtype of the tokenizer's size (int32 from 65,500 ids)."""
    from megatron.core.datasets.indexed_dataset import DType

    assert DType.optimal_dtype(498) is np.uint16 and DType.optimal_dtype(65_500) is np.int32
    monkeypatch.setattr(type(hf_tok), "__len__", lambda self: 70_000)  # the class prepare-data loads too
    src = write_jsonl(tmp_path / "in.jsonl", ["wide ids"])
    summary = run([src], tok_dir, tmp_path / "out" / "c")
    assert summary.dtype == "int32"
    assert read_back(tmp_path / "out" / "c")[0][-1] == 2


def test_tokenizer_from_an_hf_checkpoint_or_a_megatron_iteration_directory(tiny_hf, tok_dir, tmp_path, capsys,
                                                                             monkeypatch):
    """create-random writes the tokenizer beside the weights, import-hf copies it into iter_0000000: both load."""
    from falcon_bridge.converters.import_hf import ImportOptions, import_hf

    hf_dir = tiny_hf["tiny-vocab-pad"]
    megatron = tmp_path / "megatron"
    import_hf(ImportOptions(source=str(hf_dir), out=megatron))
    src = write_jsonl(tmp_path / "in.jsonl", ["the same ids from every copy of the tokenizer"])
    outputs = []
    for name, directory in (("fixture", tok_dir), ("hf", hf_dir), ("iteration", megatron / "iter_0000000")):
        run([src], directory, tmp_path / name / "c")
        outputs.append((tmp_path / name / "c.bin").read_bytes())
    assert outputs[0] == outputs[1] == outputs[2]
    code, _, stderr = cli(capsys, monkeypatch, "prepare-data", src, "--tokenizer", megatron, "--output-prefix",
                          tmp_path / "root" / "c")
    assert code == 2
    one_error_line(stderr, f"{megatron}: no tokenizer files", "e.g. iter_0000000")


# ---- megatron-core's GPTDataset reads it --------------------------------------------------------------------
class MinimalTokenizer:
    """What GPTDataset asks of a tokenizer: the vocabulary size, EOD, pad, and identifiers for its cache keys."""

    def __init__(self, vocab_size, eod):
        self.vocab_size, self.eod, self.pad = vocab_size, eod, -1
        self.unique_identifiers = {"class": "MinimalTokenizer", "vocab_size": vocab_size}


def test_gpt_dataset_builds_samples(tok_dir, hf_tok, tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
        from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig

    texts = [f"sample text number {i} for the GPT dataset" for i in range(40)]
    src = write_jsonl(tmp_path / "in.jsonl", texts)
    prefix = tmp_path / "out" / "gpt"
    summary = run([src], tok_dir, prefix)
    seq = 16
    config = GPTDatasetConfig(random_seed=1234, sequence_length=seq, blend=([str(prefix)], None), split="1,0,0",
                              tokenizer=MinimalTokenizer(len(hf_tok), hf_tok.eos_token_id),
                              reset_position_ids=False, reset_attention_mask=False, eod_mask_loss=False,
                              path_to_cache=None)
    n = summary.tokens // (seq + 1)
    train, valid, test = BlendedMegatronDatasetBuilder(GPTDataset, [n, None, None], lambda: True, config).build()
    assert valid is None and test is None and len(train) >= n
    stream = [i for d in expected(hf_tok, texts) for i in d]
    vocabulary = set(stream)
    eos_seen = False
    for k in range(len(train)):
        sample = train[k]
        tokens, labels = sample["tokens"].tolist(), sample["labels"].tolist()
        assert len(tokens) == len(labels) == seq and tokens[1:] == labels[:-1]
        assert set(tokens) <= vocabulary
        eos_seen |= hf_tok.eos_token_id in tokens
    assert eos_seen


# ---- hypothesis: any text round-trips -----------------------------------------------------------------------
TEXT = st.text(st.characters(codec="utf-8"), max_size=40) | st.sampled_from(
    ["", "\n", "[bold]", "[/]", "\\", "\"", "{\"text\": 1}", "\r\n", "\u2028", "\x00", "\ufeff"])
# a leading BOM is dropped from a file (documented), so .txt lines hold none
LINE = st.text(st.characters(codec="utf-8", exclude_characters="\r\n\ufeff"), min_size=1, max_size=30).filter(str.strip)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(jsonl_docs=st.lists(TEXT, max_size=12), txt_docs=st.lists(st.lists(LINE, min_size=1, max_size=3),
                                                                   max_size=6), ascii_json=st.booleans())
def test_random_unicode_documents_round_trip(tok_dir, hf_tok, tmp_path_factory, jsonl_docs, txt_docs, ascii_json):
    root = tmp_path_factory.mktemp("fuzz")
    (root / "in").mkdir()
    (root / "in" / "a.jsonl").write_text("".join(json.dumps({"text": t}, ensure_ascii=ascii_json) + "\n"
                                                 for t in jsonl_docs), encoding="utf-8")
    paragraphs = ["\n".join(lines) for lines in txt_docs]
    (root / "in" / "b.txt").write_text("\n\n".join(paragraphs) + "\n", encoding="utf-8")
    want = expected(hf_tok, jsonl_docs + paragraphs)
    if not want:
        with pytest.raises(BadInput, match="no document with any text"):
            run([root / "in"], tok_dir, root / "out" / "c")
        assert not (root / "out").exists()
        return
    summary = run([root / "in"], tok_dir, root / "out" / "c")
    assert read_back(root / "out" / "c") == want
    assert summary.documents + summary.skipped_empty == len(jsonl_docs) + len(paragraphs)


# ---- bad input: one line, exit 2, nothing left ----------------------------------------------------------------
def bad_case(name):
    """Build the inputs for one bad case under tmp; return (args, needles)."""
    def build(tmp, tok_dir):
        good = write_jsonl(tmp / "good.jsonl", ["fine"])
        prefix = tmp / "out" / "c"
        args = [good, "--tokenizer", tok_dir, "--output-prefix", prefix]
        if name == "missing input":
            return [tmp / "nope.jsonl", *args[1:]], [f"{tmp / 'nope.jsonl'}: file not found"]
        if name == "markup in a path":
            weird = tmp / "a[bold]b[/]" / "x[/red].jsonl"
            return [weird, *args[1:]], [f"{weird}: file not found"]
        if name == "empty directory":
            (tmp / "docs").mkdir()
            (tmp / "docs" / "readme.md").write_text("x")
            return [tmp / "docs", *args[1:]], [f"{tmp / 'docs'}: a directory with no .jsonl, .json or .txt"]
        if name == "unsupported file":
            (tmp / "x.csv").write_text("a,b")
            return [tmp / "x.csv", *args[1:]], [f"{tmp / 'x.csv'}: unsupported input file"]
        if name == "invalid JSON":
            (tmp / "bad.jsonl").write_text('{"text": "a"}\n\n{"text": "b"\n')
            return [tmp / "bad.jsonl", *args[1:]], [f"{tmp / 'bad.jsonl'}: line 3 is not valid JSON"]
        if name == "not an object":
            (tmp / "bad.jsonl").write_text('["text"]\n')
            return [tmp / "bad.jsonl", *args[1:]], ["line 1 is a JSON list, expected an object"]
        if name == "missing key":
            write_jsonl(tmp / "bad.jsonl", ["a", "b"], key="body")
            return [tmp / "bad.jsonl", *args[1:]], [f"{tmp / 'bad.jsonl'}: line 1 has no \"text\" key"]
        if name == "number value":
            (tmp / "bad.jsonl").write_text('{"text": "a"}\n{"text": 3}\n')
            return [tmp / "bad.jsonl", *args[1:]], ["line 2: \"text\" is a JSON int, expected a string"]
        if name == "null value":
            (tmp / "bad.jsonl").write_text('{"text": null}\n')
            return [tmp / "bad.jsonl", *args[1:]], ["line 1: \"text\" is a JSON null"]
        if name == "unpaired surrogate":
            (tmp / "bad.jsonl").write_text('{"text": "a\\ud800b"}\n')
            return [tmp / "bad.jsonl", *args[1:]], ["line 1: the string holds an unpaired surrogate (\\ud800)"]
        if name == "not UTF-8":
            (tmp / "bad.txt").write_bytes(b"fine\n\xff\xfe bad\n")
            return [tmp / "bad.txt", *args[1:]], [f"{tmp / 'bad.txt'}: line 2 is not UTF-8 text"]
        if name == "FIFO input":
            import os

            os.mkfifo(tmp / "pipe.jsonl")
            return [tmp / "pipe.jsonl", *args[1:]], ["pipe.jsonl: not a regular file"]
        if name == "input twice":
            return [good, tmp, *args[1:]], ["given twice"]
        if name == "no documents":
            write_jsonl(tmp / "empty.jsonl", ["", ""])
            return [tmp / "empty.jsonl", *args[1:]], ["no document with any text"]
        if name == "tokenizer without files":
            (tmp / "tok").mkdir()
            return [good, "--tokenizer", tmp / "tok", "--output-prefix", prefix], [f"{tmp / 'tok'}: no tokenizer files"]
        if name == "tokenizer missing":
            return [good, "--tokenizer", tmp / "tok", "--output-prefix", prefix], ["(it does not exist)"]
        if name == "corrupt tokenizer":
            (tmp / "tok").mkdir()
            (tmp / "tok" / "tokenizer.json").write_text("{not json")
            return [good, "--tokenizer", tmp / "tok", "--output-prefix", prefix], [
                f"{tmp / 'tok'}: transformers cannot load this tokenizer"]
        if name == "output inside an input":
            (tmp / "docs").mkdir()
            write_jsonl(tmp / "docs" / "d.jsonl", ["x"])
            return [tmp / "docs", "--tokenizer", tok_dir, "--output-prefix", tmp / "docs" / "out" / "c"], [
                "overlaps the input"]
        if name == "output is an input":
            return [good, "--tokenizer", tok_dir, "--output-prefix", good / "c"], ["overlaps the input"]
        if name == "prefix without a directory":
            return [good, "--tokenizer", tok_dir, "--output-prefix", "c"], ["expected OUT/NAME"]
        if name == "existing output":
            (tmp / "out").mkdir()
            return args, [f"{tmp / 'out'}: already exists (pass --overwrite"]
        if name == "overwrite of another directory":
            (tmp / "out").mkdir()
            (tmp / "out" / "precious.txt").write_text("keep me")
            return [*args, "--overwrite"], ["is not a prepare-data output"]
        raise AssertionError(name)
    return build


BAD_CASES = ["missing input", "markup in a path", "empty directory", "unsupported file", "invalid JSON",
             "not an object", "missing key", "number value", "null value", "unpaired surrogate", "not UTF-8",
             "FIFO input", "input twice", "no documents", "tokenizer without files", "tokenizer missing",
             "corrupt tokenizer", "output inside an input", "output is an input", "prefix without a directory",
             "existing output", "overwrite of another directory"]


@pytest.mark.parametrize("case", BAD_CASES)
def test_bad_input_is_one_line(case, tok_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args, needles = bad_case(case)(tmp_path, tok_dir)
    before = sorted(str(p) for p in tmp_path.rglob("*"))
    code, stdout, stderr = cli(capsys, monkeypatch, "prepare-data", *args)
    assert code == 2 and stdout == "", (stdout, stderr)
    one_error_line(stderr, *needles)
    assert "Traceback" not in stderr
    assert sorted(str(p) for p in tmp_path.rglob("*")) == before  # nothing written, nothing removed


def test_interrupt_leaves_nothing(tok_dir, tmp_path):
    corpus = tmp_path / "big.jsonl"
    line = json.dumps({"text": "Falcon-H1 is a parallel hybrid language model. " * 40}) + "\n"
    corpus.write_text(line * 40_000)  # ~80 MB: tokenizing takes far longer than the signal needs to arrive
    prefix = tmp_path / "out" / "c"
    proc = subprocess.Popen([sys.executable, "-m", "falcon_bridge.cli.app", "prepare-data", str(corpus),
                             "--tokenizer", str(tok_dir), "--output-prefix", str(prefix), "--json"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not list(tmp_path.glob(f"{TMP_MARK}out.*/c.bin")) and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(0.3)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGINT, err
    one_error_line(err, "interrupted (SIGINT)")
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(f"{TMP_MARK}*"))
