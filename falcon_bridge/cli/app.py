"""The falcon-bridge command line: parse flags, call a converter, render progress and errors. Nothing else."""

from __future__ import annotations

import json
import signal
import sys
import time
import traceback
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from falcon_bridge.core import choices
from falcon_bridge.core.choices import Device, DType, ExportFormat, MupExport, MupMode
from falcon_bridge.errors import BadInput, Interrupted, printable

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Move Falcon-H1 checkpoints between Hugging Face and Megatron Core, and prove nothing changed.")
# emoji codes off: rich would print a path like `a:smile:b` with an emoji in it
out = Console(width=None if sys.stdout.isatty() else 140, emoji=False)
err = Console(stderr=True, emoji=False)
STATE = {"debug": False}

# options several commands share (defaults: core/choices, which the converters' options use too; the converters
# themselves are imported by the command that runs, so --help and `check` start without torch)
JsonFlag = Annotated[bool, typer.Option("--json", help="Print a JSON summary.")]
PPLayers = Annotated[str | None, typer.Option(help="Layers per pipeline stage, e.g. 10,12,14.")]
ArchCard = Annotated[str | None, typer.Option(help="Architecture, for checkpoints without our run config.")]
ArchConfig = Annotated[Path | None, typer.Option(help="Architecture from an HF config.json instead.")]
Workers = Annotated[int | None, typer.Option(
    help="Processes sharing the conversion (default: what the cores and free memory allow). Under torchrun each "
         "rank is one worker.", show_default=False)]


def literal(text: object) -> str:
    """User text (a path, a tensor name, a config value) as rich markup that prints it as written, on one line:
    its [bold] or [/x] is text, not markup, and its control characters are escaped (errors.printable)."""
    return escape(printable(text))


@contextmanager
def progress_bar(description: str, quiet: bool):
    """A rich progress bar; yields the (done, total, item) callback the converters take. Items are user paths,
    printed literally."""
    if quiet:
        yield None
        return
    if not err.is_interactive:  # a log or a pipe: plain lines instead (a bar draws nothing there)
        yield plain_progress(description)
        return
    with Progress(TextColumn(f"[bold]{description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  TextColumn("{task.fields[item]}"), console=err, transient=True,
                  disable=not err.is_interactive) as bar:
        task = bar.add_task(description, total=None, item="")
        yield lambda done, total, item: bar.update(task, completed=done, total=total, item=literal(item))


PLAIN_PROGRESS_SECONDS = 10.0  # a run shorter than this prints no progress line


def plain_progress(description: str):
    """The converters' progress callback for a log: a line on stdout at most every PLAIN_PROGRESS_SECONDS (percent,
    items per second, ETA), so a long conversion shows it is alive where no bar can be drawn; stderr stays free
    for the one `error:` line."""
    start = last = time.monotonic()

    def step(done: int, total: int | None, item: str) -> None:
        nonlocal last
        now = time.monotonic()
        if now - last < PLAIN_PROGRESS_SECONDS:
            return
        last = now
        rate = done / (now - start)
        where = f"{100 * done / total:.0f}% ({done}/{total}), ETA {(total - done) / rate:.0f} s" if total else f"{done}"
        out.print(f"{description}: {where}, {rate:.1f}/s: {literal(item)}", highlight=False, soft_wrap=True)
    return step


def report(summary, as_json: bool) -> None:
    """Print a converter's summary (its warnings on stderr); values (paths among them) printed literally. None: a
    torchrun rank other than 0, whose rank 0 reports."""
    if summary is None:
        return
    fields = summary.to_json()
    for line in fields.get("warnings", []):
        err.print("[yellow]warning:[/]", literal(line), highlight=False, soft_wrap=True)
    if as_json:  # ASCII: a path's undecodable byte (a lone surrogate) would not encode to a strict UTF-8 stdout
        out.print_json(json.dumps(fields), ensure_ascii=True)
        return
    shown_fields = {k: summary_value(v) for k, v in fields.items() if k != "warnings"}  # warnings: on stderr
    if out.is_terminal:
        table = Table("", "", show_header=False, box=None, title=f"[bold]{fields['command']}[/]")
        for k, v in shown_fields.items():
            table.add_row(k, literal(v))
        out.print(table, highlight=False)
    else:  # a log: one line of key=value, easy to grep
        out.print(" ".join(f"{k}={literal(v)}" for k, v in shown_fields.items()), highlight=False, soft_wrap=True)


def summary_value(value) -> str:
    """A summary value as text: lists joined by commas, mappings as JSON, no Python reprs."""
    if isinstance(value, list | tuple):
        return ",".join(map(str, value)) or "-"
    if isinstance(value, dict):
        return json.dumps(value) if value else "-"
    return str(value)


def print_version(wanted: bool) -> None:
    if wanted:
        from falcon_bridge import __version__

        out.print(f"falcon-bridge {__version__}", highlight=False)
        raise typer.Exit()


@app.callback()
def main_options(debug: Annotated[bool, typer.Option(help="Show tracebacks for expected errors.")] = False,
                 version: Annotated[bool, typer.Option("--version", callback=print_version, is_eager=True,
                                                       help="Print the version and exit.")] = False):
    STATE["debug"] = debug


@app.command()
def cards(as_json: JsonFlag = False):
    """List the model cards (released Falcon-H1 and Falcon3-1.58bit sizes, tiny test shapes)."""
    from falcon_bridge.cards import all_cards
    from falcon_bridge.core.mapping import num_parameters

    if as_json:
        out.print_json(json.dumps([{
            "card": c.name, "family": c.arch.family, "hf_repo": c.hf_repo, "test_shape": c.is_test,
            "parameters": num_parameters(c.arch),
            "verified": c.verified, "unverified_fields": sorted(n for n, p in c.provenance.items() if not p.verified),
            "config": c.arch.to_hf()} for c in all_cards()]))
        return
    table = Table("card", "family", "HF repo", "params", "layers", "hidden", "mamba groups", "gated norm",
                  "verified")
    for c in all_cards():
        a = c.arch
        checked = sum(p.verified for p in c.provenance.values())
        verified = "test shape" if c.is_test else ("yes" if c.verified else
                                                   f"{checked} of {len(c.provenance)} values")
        mamba = (str(a.mamba_n_groups), "yes" if a.mamba_rms_norm else "no") if a.has_mamba else ("-", "-")
        table.add_row(c.name, a.family, c.hf_repo or "-", f"{num_parameters(a):,}", str(a.num_layers),
                      str(a.hidden_size), *mamba, verified)
    out.print(table)


@app.command("create-random")
def create_random(
    card: Annotated[str, typer.Argument(help="Card name (see `falcon-bridge cards`) or a card YAML path.")],
    output: Annotated[Path, typer.Argument(help="Output HF directory.")],
    seed: int = 0,
    dtype: Annotated[DType, typer.Option(help="dtype of the weights.")] = choices.CREATE_RANDOM_DTYPE,
    max_shard_size: Annotated[int, typer.Option(help="Bytes per safetensors shard.")
                              ] = choices.CREATE_RANDOM_MAX_SHARD_BYTES,
    overwrite: bool = False,
    as_json: JsonFlag = False,
):
    """Write an HF checkpoint of a card's exact shape with random, realistic weights (streamed)."""
    from falcon_bridge.cards import load_card
    from falcon_bridge.converters.create_random import CreateRandomOptions
    from falcon_bridge.converters.create_random import create_random as convert
    from falcon_bridge.converters.run import Run

    options = CreateRandomOptions(card=load_card(card), out=output, seed=seed, dtype=dtype.torch,
                                  max_shard_bytes=max_shard_size, overwrite=overwrite)
    with progress_bar("create-random", as_json) as cb:
        summary = convert(options, Run(cb, sys.argv))
    report(summary, as_json)


@app.command("import-hf")
def import_hf(
    source: Annotated[str, typer.Argument(help="HF checkpoint directory or Hub repo id.")],
    output: Annotated[Path, typer.Argument(help="Output Megatron checkpoint directory.")],
    tp: Annotated[int, typer.Option(help="Default tensor-parallel size recorded for verify, and checked to fit "
                                         "the model (the checkpoint itself loads at any TP).")] = 1,
    pp: Annotated[int, typer.Option(help="Default pipeline-parallel size recorded, likewise.")] = 1,
    pp_layers: PPLayers = None,
    dtype: Annotated[DType | None, typer.Option(help="Stored dtype (default: the source's dtype).")] = None,
    mup: Annotated[MupMode, typer.Option(help="preserve: the model applies the µP multipliers; fold: into the "
                                              "weights")] = MupMode.PRESERVE,
    bitnet: Annotated[bool, typer.Option(help="BitNet b1.58 model: ternary linears in attention, Mamba, MLP.")
                      ] = False,
    allow_extra: Annotated[bool, typer.Option(help="Ignore tensors the architecture does not use.")] = False,
    check_finite: Annotated[bool, typer.Option(help="Refuse NaN/Inf weights.")] = choices.IMPORT_CHECK_FINITE,
    workers: Workers = None,
    overwrite: bool = False,
    as_json: JsonFlag = False,
):
    """Convert a Hugging Face Falcon-H1 checkpoint into a Megatron torch_dist checkpoint (streaming)."""
    from falcon_bridge.converters.import_hf import ImportOptions
    from falcon_bridge.converters.import_hf import import_hf as convert
    from falcon_bridge.converters.run import Run
    from falcon_bridge.core.parallel import MegatronLayout

    options = ImportOptions(
        source=source, out=output, layout=MegatronLayout(tp=tp, pp=pp, pp_layers=parse_layers(pp_layers)),
        dtype=dtype.torch if dtype else None, overwrite=overwrite, mup_mode=mup, allow_extra=allow_extra,
        check_finite=check_finite, bitnet=bitnet, workers=workers)
    with progress_bar("import-hf", as_json) as cb:
        summary = convert(options, Run(cb, sys.argv))
    report(summary, as_json)


@app.command("export-hf")
def export_hf(
    source: Annotated[Path, typer.Argument(help="Megatron checkpoint directory (any TP/PP).")],
    output: Annotated[Path, typer.Argument(help="Output HF directory.")],
    card: ArchCard = None,
    hf_config: ArchConfig = None,
    dtype: Annotated[DType | None, typer.Option(help="dtype of every tensor (default: the HF source's dtype).")
                     ] = None,
    max_shard_size: Annotated[int, typer.Option(help="Bytes per safetensors shard.")
                              ] = choices.EXPORT_MAX_SHARD_BYTES,
    check_finite: Annotated[bool, typer.Option(help="Refuse NaN/Inf weights.")] = choices.EXPORT_CHECK_FINITE,
    mup: Annotated[MupExport, typer.Option(help="Folded checkpoints: unfold (restore the original weights and "
                                                "multipliers) or keep-folded (multipliers 1.0)")
                   ] = MupExport.UNFOLD,
    fmt: Annotated[ExportFormat, typer.Option("--format", help="BitNet checkpoints: latent (full-precision weights) "
                                                               "| packed (transformers BitLinear) | "
                                                               "packed-autobitlinear (AutoBitLinear, offline) "
                                                               "| dequantized")
                   ] = ExportFormat.LATENT,
    workers: Workers = None,
    overwrite: bool = False,
    as_json: JsonFlag = False,
):
    """Convert a Megatron torch_dist checkpoint into a Hugging Face Falcon-H1 checkpoint (streaming)."""
    from falcon_bridge.converters.export_hf import ExportOptions
    from falcon_bridge.converters.export_hf import export_hf as convert
    from falcon_bridge.converters.run import Run

    options = ExportOptions(source=source, out=output, card=card, hf_config=hf_config,
                            dtype=dtype.torch if dtype else None, max_shard_bytes=max_shard_size,
                            check_finite=check_finite, overwrite=overwrite, mup_export=mup, fmt=fmt, workers=workers)
    with progress_bar("export-hf", as_json) as cb:
        summary = convert(options, Run(cb, sys.argv))
    report(summary, as_json)


@app.command()
def reshard(
    source: Annotated[Path, typer.Argument(help="Megatron checkpoint directory.")],
    output: Annotated[Path, typer.Argument(help="Output Megatron checkpoint directory.")],
    tp: int = 1,
    pp: int = 1,
    pp_layers: PPLayers = None,
    card: ArchCard = None,
    hf_config: ArchConfig = None,
    workers: Workers = None,
    overwrite: bool = False,
    as_json: JsonFlag = False,
):
    """Rewrite a Megatron checkpoint for another TP/PP, offline on CPU (streaming)."""
    from falcon_bridge.converters.reshard import ReshardOptions
    from falcon_bridge.converters.reshard import reshard as convert
    from falcon_bridge.converters.run import Run
    from falcon_bridge.core.parallel import MegatronLayout

    options = ReshardOptions(source=source, out=output,
                             layout=MegatronLayout(tp=tp, pp=pp, pp_layers=parse_layers(pp_layers)), card=card,
                             hf_config=hf_config, overwrite=overwrite, workers=workers)
    with progress_bar("reshard", as_json) as cb:
        summary = convert(options, Run(cb, sys.argv))
    report(summary, as_json)


@app.command()
def check(directory: Annotated[Path, typer.Argument(help="An output directory written by falcon-bridge.")],
          as_json: JsonFlag = False):
    """Re-hash every file against the directory's falcon_bridge_manifest.json; exit 1 naming any mismatch."""
    from falcon_bridge.formats.manifest import check_manifest

    problems = check_manifest(directory)
    if as_json:
        out.print_json(json.dumps({"directory": str(directory), "passed": not problems, "problems": problems}),
                       ensure_ascii=True)
        raise typer.Exit(1 if problems else 0)
    for line in problems:  # a line names a manifest entry: text anyone could have written
        err.print("[red]mismatch:[/]", literal(directory / line), highlight=False, soft_wrap=True)
    if problems:
        raise typer.Exit(1)
    out.print(f"{literal(directory)}: every file matches its manifest", highlight=False, soft_wrap=True)


def parse_layers(value: str | None) -> tuple[int, ...] | None:
    if value is None:
        return None
    try:
        return tuple(int(v) for v in value.split(","))
    except ValueError:
        raise BadInput(f"--pp-layers {value!r}: expected comma-separated integers") from None


@app.command()
def verify(
    hf_dir: Annotated[Path, typer.Argument(help="HF checkpoint directory.")],
    megatron_dir: Annotated[Path, typer.Argument(help="Megatron checkpoint directory written by import-hf.")],
    tp: Annotated[int | None, typer.Option(help="Tensor-parallel processes (default: the layout recorded at "
                                                "import).")] = None,
    pp: Annotated[int | None, typer.Option(help="Pipeline-parallel processes (default: as recorded).")] = None,
    dtype: Annotated[DType, typer.Option(help="The dtype both models compute in.")] = choices.VERIFY_DTYPE,
    device: Annotated[Device | None, typer.Option(help="Default: cuda when a GPU is visible.")] = None,
    tokens: Annotated[Path | None, typer.Option(help="Token ids: a JSON list or whitespace-separated ints.")
                      ] = None,
    prompt: Annotated[str | None, typer.Option(help="Text, tokenized with the checkpoint's tokenizer.")] = None,
    tolerance: Annotated[float | None, typer.Option(
        help="Max |Δ| / max |reference| accepted (default 1e-4 fp32, 3e-2 bf16; 1e-3 fp32 on cuda, where "
             "mamba-ssm's Triton scan computes in TF32 unless TRITON_F32_DEFAULT=ieee).")] = None,
    seq_len: Annotated[int, typer.Option(help="Length of the fixed random ids used without --tokens/--prompt.")
                       ] = choices.VERIFY_SEQ_LEN,
    as_json: JsonFlag = False,
):
    """Run the HF model and our Megatron model (TP×PP processes) on the same tokens; compare every block's Mamba,
    attention and MLP output, the final norm and the logits, and name the first place they part ways.

    Exit code 0: everything agrees within tolerance; 1: it does not; 2: bad input."""
    from falcon_bridge.converters.verify import VerifyOptions
    from falcon_bridge.converters.verify import verify as run

    report_ = run(VerifyOptions(hf_dir=hf_dir, megatron_dir=megatron_dir, tp=tp, pp=pp, dtype=dtype.torch,
                                tolerance=tolerance, seq_len=seq_len, device=device, tokens_file=tokens,
                                prompt=prompt))
    if as_json:
        out.print_json(json.dumps(report_.to_json()))
    else:
        print_layers(report_)
        print_comparison(f"logits: HF vs Megatron (TP={report_.tp}, PP={report_.pp}, {dtype})", report_.logits)
        out.print(f"reference: {report_.reference}")
        if report_.fold_rounding is not None:
            out.print(f"µP fold rounding (by design, not judged): folding moved the logits by "
                      f"{report_.fold_rounding.relative:.2e} × max |logit| from the unfolded HF model's")
        first = report_.first_divergence
        out.print("first divergence: " + (f"layer {first['layer']} {first['component']}" if first and
                                          first["layer"] is not None else first["component"] if first else "none"))
    raise typer.Exit(0 if report_.passed else 1)


def print_layers(r) -> None:
    """One row per block: max |Δ| / max |ref| and cosine of each of its branches (the family's: Falcon-H1's Mamba,
    attention and MLP, Llama's attention and MLP)."""
    rows = {(row["layer"], row["component"]): row for row in r.layers}
    branches = list(dict.fromkeys(component for layer, component in rows if layer is not None))
    table = Table("layer", *(f"{b} {what}" for b in branches for what in ("rel", "cos")),
                  title=f"per block (tolerance {r.tolerance:.0e})")

    def cell(row, key):
        bad = row["relative"] > r.tolerance
        text = f"{row[key]:.2e}" if key == "relative" else f"{row[key]:.6f}"
        return f"[red]{text}" if bad else text

    for layer in sorted({k[0] for k in rows if k[0] is not None}):
        cells = []
        for comp in branches:
            cells += [cell(rows[(layer, comp)], "relative"), cell(rows[(layer, comp)], "cosine")]
        table.add_row(str(layer), *cells)
    # the embedding and the final norm are no block's branch: lines of their own, not rows under the branch columns
    whole = {name: f"{name}: max |Δ| / max |ref| {cell(rows[(None, key)], 'relative')}, cosine "
                   f"{cell(rows[(None, key)], 'cosine')}" for key, name in (("embedding", "embedding"),
                                                                            ("final_norm", "final norm"))}
    out.print(whole["embedding"])
    out.print(table)
    out.print(whole["final norm"])


def print_comparison(title: str, r) -> None:
    table = Table("max |Δ|", "mean |Δ|", "max |logit|", "max |Δ| / max |logit|", "tolerance", "argmax agree",
                  "result", title=title)
    table.add_row(f"{r.max_abs_diff:.3e}", f"{r.mean_abs_diff:.3e}", f"{r.max_abs_logit:.3e}", f"{r.relative:.3e}",
                  f"{r.tolerance:.0e}", f"{100 * r.argmax_agreement:.1f}%",
                  "[green]PASS" if r.passed else "[red]FAIL")
    out.print(table)


@app.command()
def demo(
    card: str = "tiny-one-group",
    workdir: Annotated[Path, typer.Option(help="Where the demo writes its checkpoints.")] = Path("out/demo"),
    tp: int = 2,
    as_json: JsonFlag = False,
):
    """The main job on an embedded default: tiny card → create-random → import-hf (TP=2) → logits compared."""
    import torch

    from falcon_bridge.cards import load_card
    from falcon_bridge.converters.create_random import CreateRandomOptions
    from falcon_bridge.converters.create_random import create_random as make
    from falcon_bridge.converters.import_hf import ImportOptions
    from falcon_bridge.converters.import_hf import import_hf as run_import
    from falcon_bridge.converters.run import Run
    from falcon_bridge.converters.verify import VerifyOptions
    from falcon_bridge.converters.verify import verify as run_verify
    from falcon_bridge.core.parallel import MegatronLayout

    hf_dir, mg_dir = workdir / f"{card}-hf", workdir / f"{card}-megatron-tp{tp}"

    def step(text: str) -> None:
        if not as_json:
            out.print(text, highlight=False, soft_wrap=True)

    step(f"[bold]1/3[/] create-random {literal(card)} → {literal(hf_dir)}")
    with progress_bar("create-random", as_json) as cb:
        created = make(CreateRandomOptions(card=load_card(card), out=hf_dir, dtype=torch.float32, overwrite=True),
                       Run(cb))
    if not as_json:
        report(created, False)
    step(f"[bold]2/3[/] import-hf {literal(hf_dir)} → {literal(mg_dir)} (TP={tp})")
    with progress_bar("import-hf", as_json) as cb:
        imported = run_import(ImportOptions(source=str(hf_dir), out=mg_dir, layout=MegatronLayout(tp=tp),
                                            overwrite=True), Run(cb))
    if not as_json:
        report(imported, False)
    step(f"[bold]3/3[/] verify: HF FalconH1ForCausalLM vs our Megatron model at TP={tp} ({tp} processes)")
    result = run_verify(VerifyOptions(hf_dir=hf_dir, megatron_dir=mg_dir, tp=tp))
    if as_json:
        out.print_json(json.dumps({"create_random": created.to_json(), "import_hf": imported.to_json(),
                                   "verify": result.to_json()}), ensure_ascii=True)
    else:
        print_comparison(f"{literal(card)}: HF vs Megatron (TP={tp}, fp32)", result.logits)
        first = result.first_divergence
        step(f"every block's Mamba, attention and MLP output compared too: "
             f"{'all agree' if first is None else f'first divergence at {first}'}")
    raise typer.Exit(0 if result.passed else 1)


@app.command("prepare-data")
def prepare_data(
    inputs: Annotated[list[Path], typer.Argument(
        help="Files or directories. .jsonl/.json: JSON lines, one document per line (its --json-key string); "
             ".txt: documents separated by blank lines; a directory: its .jsonl/.json/.txt files, recursively, in "
             "sorted order.", show_default=False)],
    tokenizer: Annotated[Path, typer.Option(
        help="Directory with the checkpoint's HF tokenizer files (an HF checkpoint, or a Megatron checkpoint's "
             "iter_0000000).", show_default=False)],
    output_prefix: Annotated[Path, typer.Option(
        help="OUT/NAME: writes NAME.bin and NAME.idx into the new directory OUT (atomically, with a manifest); "
             "train with --data-path OUT/NAME.", show_default=False)],
    json_key: Annotated[str, typer.Option(help="The key holding each JSON line's text.")] = "text",
    append_eod: Annotated[bool, typer.Option(help="End every document with the tokenizer's EOS id.")] = True,
    overwrite: Annotated[bool, typer.Option(help="Replace OUT if it is an earlier prepare-data output.")] = False,
    as_json: JsonFlag = False,
):
    """Tokenize text with the checkpoint's tokenizer into megatron-core's indexed dataset (.bin/.idx) for
    Megatron-LM's --data-path, written by megatron-core's own IndexedDatasetBuilder (streaming).

    Each document's ids are what the tokenizer gives for it (its own special-token rule), then EOS; documents that
    give no ids are skipped. The .bin dtype is megatron-core's choice for the vocabulary size (uint16 or int32)."""
    from falcon_bridge.converters.prepare_data import PrepareDataOptions
    from falcon_bridge.converters.prepare_data import prepare_data as convert
    from falcon_bridge.converters.run import Run

    options = PrepareDataOptions(inputs=tuple(inputs), tokenizer=tokenizer, output_prefix=output_prefix,
                                 json_key=json_key, append_eod=append_eod, overwrite=overwrite)
    with progress_bar("prepare-data", as_json) as cb:
        summary = convert(options, Run(cb, sys.argv))
    report(summary, as_json)


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def train(
    ctx: typer.Context,
    nproc_per_node: Annotated[int, typer.Option(
        help="Processes on this host (TP × PP × data-parallel ranks), started with torchrun.")] = 1,
):
    """Train with Megatron-LM's own loop (megatron.training.pretrain) from a checkpoint: `--load OUT` of import-hf
    (fine-tuning: weights only) or a directory this command saved into (resumed: optimizer, RNG, data position).

    Every other flag is Megatron-LM's: parallelism (--tensor-model-parallel-size, --pipeline-model-parallel-size,
    --sequence-parallel), batches, optimizer, LR schedule, data (--data-path PREFIX from prepare-data, or
    --mock-data), --save/--save-interval, logging. The architecture, µP, BitNet and tokenizer come from the
    checkpoint; a flag that contradicts it or that the model cannot honour is refused in one line before anything
    starts. Several hosts: `torchrun ... -m falcon_bridge.megatron.trainer FLAGS` on each."""
    from falcon_bridge.megatron.trainer import train as run

    if nproc_per_node < 1:
        raise BadInput(f"--nproc-per-node {nproc_per_node}: expected a positive integer")
    raise typer.Exit(run(list(ctx.args), nproc_per_node))


def _interrupt(signum, frame):
    raise Interrupted(signal.Signals(signum).name)


def main() -> None:
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, _interrupt)
    try:
        app()
    except BadInput as e:
        if STATE["debug"]:
            traceback.print_exc()
        err.print("[red]error:[/]", literal(e), highlight=False, soft_wrap=True)  # it names user paths
        sys.exit(2)
    except Interrupted as e:
        if STATE["debug"]:
            traceback.print_exc()
        err.print(f"[red]error:[/] interrupted ({e.signal_name}); no partial output was left", highlight=False,
                  soft_wrap=True)
        sys.exit(128 + signal.Signals[e.signal_name])


if __name__ == "__main__":
    main()
