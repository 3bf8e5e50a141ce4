"""prepare-data: text → megatron-core's indexed dataset (NAME.bin + NAME.idx), what Megatron-LM's training loop reads
with `--data-path`, tokenized with the checkpoint's own HF tokenizer and written by megatron-core's own
`IndexedDatasetBuilder` (the binary format is never spelled out here).

What a document is:
- `.jsonl` / `.json`: JSON lines (Megatron-LM's convention): every line an object, the document its `json_key`
  string; lines holding only whitespace are skipped.
- `.txt`: documents are separated by blank lines (lines holding only whitespace); a document is its lines exactly as
  the file has them, without the last line's line break.
- a directory: every `.jsonl`, `.json` and `.txt` file below it, recursively, in sorted path order (names starting
  with a dot are skipped), so the output does not depend on the file system's listing order.
Files are UTF-8 (a leading byte-order mark is dropped).

A document's ids are `tokenizer(text).input_ids` (the tokenizer's own special-token rule, as Megatron-LM's
HuggingFaceTokenizer applies it) followed by the EOS id unless `append_eod` is off; a document that gives no ids is
skipped and counted. One sequence per document. The .bin dtype is megatron-core's `DType.optimal_dtype(len(tokenizer))`
(uint16 below 65,500 ids, else int32).

Output: `output_prefix` = OUT/NAME. OUT is an atomic output directory like every other command's (written beside,
renamed into place when complete, with falcon_bridge_manifest.json, nothing at OUT on failure or interruption) and
holds NAME.bin and NAME.idx; `--data-path OUT/NAME` trains on it. `overwrite` replaces OUT only when it is an earlier
prepare-data output (a data directory holding other things is never replaced).

Streaming: files are read line by line (one document in memory, at most MAX_DOCUMENT_BYTES) and tokenized in
batches of about BATCH_CHARS characters.
"""

from __future__ import annotations

import json
import logging
import os
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

from falcon_bridge.converters.output import refuse_overlap
from falcon_bridge.converters.run import QUIET, Run, Summary, unrecorded
from falcon_bridge.errors import BadInput, first_line
from falcon_bridge.formats.hf import existing_tokenizer_files
from falcon_bridge.formats.manifest import MANIFEST_FILE, BackgroundHashes
from falcon_bridge.formats.untrusted import read_json, regular_file_size

JSON_SUFFIXES = (".jsonl", ".json")
TEXT_SUFFIXES = (".txt",)
SUFFIXES = JSON_SUFFIXES + TEXT_SUFFIXES
MAX_DOCUMENT_BYTES = 256 * 1024**2  # one line or paragraph; bounds memory (its text, its ids) per document
BATCH_CHARS = 1 << 20  # characters handed to the tokenizer at once (its Rust side encodes a batch in parallel)
BATCH_DOCUMENTS = 4096
BOM = b"\xef\xbb\xbf"
TOKENIZER_NEEDS = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


@dataclass(frozen=True)
class PrepareDataOptions:
    """inputs: files (.jsonl/.json JSON lines, .txt blank-line-separated documents) and directories (searched
    recursively for them); tokenizer: a directory with the checkpoint's HF tokenizer files; output_prefix: OUT/NAME,
    written as OUT/NAME.bin and OUT/NAME.idx into the output directory OUT."""

    inputs: tuple[Path, ...]
    tokenizer: Path
    output_prefix: Path = unrecorded()
    json_key: str = "text"
    append_eod: bool = True
    overwrite: bool = unrecorded(default=False)
    name: str = field(init=False, default="")  # NAME, the file name part of output_prefix

    def __post_init__(self):
        object.__setattr__(self, "inputs", tuple(Path(p) for p in self.inputs))
        object.__setattr__(self, "name", Path(self.output_prefix).name)

    @property
    def out(self) -> Path:
        """The output directory (what Run.output writes atomically)."""
        return Path(self.output_prefix).parent


@dataclass(frozen=True)
class PrepareDataSummary(Summary):
    command: ClassVar[str] = "prepare-data"
    data_path: str  # what --data-path takes
    output: str
    files: int
    documents: int
    skipped_empty: int  # documents that gave no ids
    tokens: int  # EOS included
    dtype: str
    vocab_size: int
    eod: int | None


# ---- inputs ----------------------------------------------------------------------------------------------------
def input_files(inputs: tuple[Path, ...]) -> list[Path]:
    """The files to read, in order: each input file as given, each directory's usable files in sorted order."""
    if not inputs:
        raise BadInput("no input given (files or directories of .jsonl, .json or .txt)")
    files: list[Path] = []
    for given in inputs:
        if given.is_dir():
            found = sorted((p for p in given.rglob("*") if p.suffix.lower() in SUFFIXES and not any(
                part.startswith(".") for part in p.relative_to(given).parts) and p.is_file()),
                key=lambda p: p.relative_to(given).parts)
            if not found:
                raise BadInput(f"{given}: a directory with no .jsonl, .json or .txt file in it (searched "
                               "recursively; names starting with a dot are skipped)")
            files += found
        elif os.path.lexists(given) and given.suffix.lower() not in SUFFIXES:
            raise BadInput(f"{given}: unsupported input file (expected .jsonl or .json, JSON lines, or .txt, "
                           "documents separated by blank lines)")
        else:
            files.append(given)
    seen: dict[Path, Path] = {}
    for f in files:
        regular_file_size(f, 1 << 62, "corpus file")  # exists, a regular file (a FIFO would block forever)
        real = f.resolve()
        if real in seen:
            raise BadInput(f"{f}: given twice (also as {seen[real]}); every file is read once")
        seen[real] = f
    return files


def _lines(path: Path, progress) -> Iterator[tuple[int, str]]:
    """(line number, text with its line break) of a UTF-8 file, bounded per line; reports bytes read."""
    try:
        f = open(path, "rb")
    except OSError as e:
        raise BadInput(f"{path}: cannot be read ({e.strerror})") from None
    with f:
        number = 0
        while True:
            try:
                raw = f.readline(MAX_DOCUMENT_BYTES + 1)
            except OSError as e:
                raise BadInput(f"{path}: cannot be read ({e.strerror})") from None
            if not raw:
                return
            number += 1
            progress(len(raw))
            if len(raw) > MAX_DOCUMENT_BYTES:
                raise BadInput(f"{path}: line {number} is longer than {MAX_DOCUMENT_BYTES:,} bytes (split it "
                               "into several documents)")
            if number == 1 and raw.startswith(BOM):
                raw = raw[len(BOM):]
            try:
                yield number, raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise BadInput(f"{path}: line {number} is not UTF-8 text (byte {e.start + 1} of the line)"
                               ) from None


def _json_documents(path: Path, key: str, progress) -> Iterator[str]:
    for number, line in _lines(path, progress):
        if not line.strip(" \t\r\n"):
            continue
        try:
            value = json.loads(line)
        except (json.JSONDecodeError, RecursionError) as e:
            why = f"{e.msg} at column {e.colno}" if isinstance(e, json.JSONDecodeError) else "nested too deeply"
            raise BadInput(f"{path}: line {number} is not valid JSON ({why}; {path.suffix} files are read "
                           "as JSON lines, one object per line)") from None
        if not isinstance(value, dict):
            raise BadInput(f"{path}: line {number} is a JSON {type(value).__name__}, expected an object with "
                           f"a {json.dumps(key)} string")
        if key not in value:
            raise BadInput(f"{path}: line {number} has no {json.dumps(key)} key (--json-key chooses it)")
        text = value[key]
        if not isinstance(text, str):
            raise BadInput(f"{path}: line {number}: {json.dumps(key)} is a JSON "
                           f"{'null' if text is None else type(text).__name__}, expected a string")
        _check_unicode(text, path, number)
        yield text


def _text_documents(path: Path, progress) -> Iterator[str]:
    paragraph: list[str] = []
    size, first = 0, 0
    for number, line in _lines(path, progress):
        if not line.strip():
            if paragraph:
                yield _paragraph(paragraph)
            paragraph, size = [], 0
            continue
        if not paragraph:
            first = number
        paragraph.append(line)
        size += len(line)
        if size > MAX_DOCUMENT_BYTES:
            raise BadInput(f"{path}: the document starting on line {first} is longer than "
                           f"{MAX_DOCUMENT_BYTES:,} characters (separate documents with a blank line)")
    if paragraph:
        yield _paragraph(paragraph)


def _paragraph(lines: list[str]) -> str:
    last = lines[-1]
    lines[-1] = last[:-2] if last.endswith("\r\n") else last[:-1] if last.endswith("\n") else last
    return "".join(lines)


def _check_unicode(text: str, path: Path, number: int) -> None:
    """JSON's \\ud800 escapes can make strings no tokenizer can encode (unpaired surrogates)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise BadInput(f"{path}: line {number}: the string holds an unpaired surrogate "
                       f"(\\u{ord(text[e.start]):04x}), which is not Unicode text") from None


def documents(path: Path, key: str, progress) -> Iterator[str]:
    """The documents of one input file (see the module docstring)."""
    if path.suffix.lower() in JSON_SUFFIXES:
        return _json_documents(path, key, progress)
    return _text_documents(path, progress)


# ---- tokenizer -------------------------------------------------------------------------------------------------
def load_tokenizer(directory: Path):
    """The HF tokenizer of a local directory (no network, no remote code); its files for the manifest."""
    if not directory.is_dir():
        raise BadInput(f"{directory}: --tokenizer must be a directory holding tokenizer.json or "
                       "tokenizer_config.json" + ("" if directory.exists() else " (it does not exist)"))
    files = existing_tokenizer_files(directory)
    if not any(f.name in TOKENIZER_NEEDS for f in files):
        hint = ""
        if (directory / "latest_checkpointed_iteration.txt").exists():
            hint = " (a Megatron checkpoint keeps them in its iteration directory, e.g. iter_0000000)"
        raise BadInput(f"{directory}: no tokenizer files (tokenizer.json, tokenizer_config.json or "
                       f"tokenizer.model){hint}")
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(directory), local_files_only=True, trust_remote_code=False)
    except Exception as e:  # noqa: BLE001 - transformers and tokenizers raise many types for a bad directory
        raise BadInput(f"{directory}: transformers cannot load this tokenizer ({first_line(e)})") from None
    finally:
        hf_logging.set_verbosity(verbosity)
    if not callable(tokenizer):
        raise BadInput(f"{directory}: transformers loaded a {type(tokenizer).__name__}, not a tokenizer")
    return tokenizer, files


def _indexed_dataset_module():
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)  # "no CUDA runtime" on CPU machines
    with warnings.catch_warnings():  # megatron-core's import-time notices (no TE, no Apex) are not for users
        warnings.simplefilter("ignore")
        from megatron.core.datasets import indexed_dataset
    return indexed_dataset


# ---- the job ---------------------------------------------------------------------------------------------------
def _check_output(options: PrepareDataOptions, files: list[Path]) -> None:
    prefix = Path(options.output_prefix)
    if not options.name or options.name in (".", "..") or str(options.output_prefix).endswith(os.sep):
        raise BadInput(f"--output-prefix {prefix}: expected OUT/NAME (NAME.bin and NAME.idx are written into "
                       "the directory OUT)")
    if len(prefix.parts) < 2:
        raise BadInput(f"--output-prefix {prefix}: expected OUT/NAME with a directory OUT this command writes "
                       "(NAME alone would make the current directory the output)")
    refuse_overlap(options.out, [*files, *options.inputs, options.tokenizer])
    out = options.out
    if options.overwrite and out.is_dir() and not out.is_symlink():
        manifest = out / MANIFEST_FILE
        command = None
        if manifest.is_file():
            record = read_json(manifest, "manifest")
            command = record.get("command", {}).get("name") if isinstance(record.get("command"), dict) else None
        if command != PrepareDataSummary.command:
            raise BadInput(f"{out}: exists and is not a prepare-data output (no {MANIFEST_FILE} of "
                           "prepare-data in it); --overwrite replaces only those: choose another OUT in "
                           "--output-prefix OUT/NAME")


def prepare_data(options: PrepareDataOptions, run: Run = QUIET) -> PrepareDataSummary:
    run = run.start()
    files = input_files(options.inputs)
    if not isinstance(options.json_key, str) or not options.json_key:
        raise BadInput("--json-key: expected a non-empty key")
    _check_output(options, files)
    tokenizer, tokenizer_files = load_tokenizer(Path(options.tokenizer))
    eod = tokenizer.eos_token_id
    if options.append_eod and not isinstance(eod, int):
        raise BadInput(f"{options.tokenizer}: the tokenizer has no EOS token to end documents with (pass "
                       "--no-append-eod to write documents without one)")
    vocab_size = len(tokenizer)
    idx = _indexed_dataset_module()
    dtype = idx.DType.optimal_dtype(vocab_size)
    total = sum(f.stat().st_size for f in files)
    # about 4 bytes of text per token (BPE on prose); a full disk is caught anyway
    estimate = total // 4 * dtype().itemsize
    sources = BackgroundHashes([*files, *tokenizer_files])
    counts = {"documents": 0, "skipped": 0, "tokens": 0, "read": 0}
    with run.output(PrepareDataSummary.command, options, estimate, sources, [*files, *options.inputs,
                                                                           Path(options.tokenizer)]) as tmp:
        builder = idx.IndexedDatasetBuilder(str(tmp / f"{options.name}.bin"), dtype=dtype)
        def progress(n: int) -> None:
            counts["read"] += n

        try:
            for f in files:
                batch: list[str] = []
                chars = 0
                for text in documents(f, options.json_key, progress):
                    batch.append(text)
                    chars += len(text)
                    if chars >= BATCH_CHARS or len(batch) >= BATCH_DOCUMENTS:
                        _write(builder, tokenizer, batch, eod if options.append_eod else None, vocab_size, f,
                               counts)
                        run.step(counts["read"], total, f.name)
                        batch, chars = [], 0
                _write(builder, tokenizer, batch, eod if options.append_eod else None, vocab_size, f, counts)
                run.step(counts["read"], total, f.name)
            if counts["documents"] == 0:
                raise BadInput(f"{files[0] if len(files) == 1 else 'the inputs'}: no document with any "
                               "text to tokenize")
            builder.finalize(str(tmp / f"{options.name}.idx"))
        finally:
            builder.data_file.close()
    return PrepareDataSummary(
        data_path=str(options.out / options.name), output=str(options.out), files=len(files),
        documents=counts["documents"], skipped_empty=counts["skipped"], tokens=counts["tokens"],
        dtype=dtype.__name__, vocab_size=vocab_size, eod=eod if options.append_eod else None,
        seconds=run.seconds())


def _write(builder, tokenizer, batch: list[str], eod: int | None, vocab_size: int, path: Path,
           counts: dict) -> None:
    """Tokenize a batch of documents and add each as one document of one sequence (its ids, then EOS)."""
    if not batch:
        return
    for doc in tokenizer(batch, return_attention_mask=False, verbose=False)["input_ids"]:
        if not doc:
            counts["skipped"] += 1
            continue
        if eod is not None:
            doc = [*doc, eod]
        if max(doc) >= vocab_size or min(doc) < 0:
            bad = max(doc) if max(doc) >= vocab_size else min(doc)
            raise BadInput(f"{path}: the tokenizer gave id {bad} for a document, outside its vocabulary of "
                           f"{vocab_size} ids (an inconsistent tokenizer)")
        builder.add_document(doc, [len(doc)])
        counts["documents"] += 1
        counts["tokens"] += len(doc)
