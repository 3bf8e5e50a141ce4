"""`falcon-bridge train`: Megatron-LM's own loop (megatron.training.pretrain) trains our model, on CPU over gloo,
every step a CLI command as a user types it.

The data makes the first batch known: prepare-data writes one document many times, and --seq-length is its length,
so every sample megatron-core's GPTDataset draws is that document (plus the next one's first token as the last
label). Iteration 1's "lm loss" is then transformers' loss on it. The runs:
- TP=1, 5 iterations, saving at 3 and 5 (the reference);
- TP=2 × PP=2 with sequence parallelism and full activation recompute, stopped after 3 of 5 iterations
  (--exit-interval, as a job's time limit would), saved, then resumed from its save at TP=1 for iterations 4–5
  and at PP=2 for iteration 4: the losses and the trained weights are the reference's;
- TP=4 (the card's one Mamba group replicated 4 times), 5 iterations: the reference's weights;
- PP=2 with two virtual pipeline stages per rank (one layer per model chunk, megatron's interleaved schedule),
  5 iterations: the reference's losses and weights;
and every trained save exports to HF with the trained model's logits (verify, fp32).
"""

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from test_training_parity import exported, relative_error

from falcon_bridge.converters.verify import hf_model

CARD = "tiny-vocab-pad"  # a tokenizer, a vocabulary padded for TP, one Mamba group
ITERATION = re.compile(r"iteration\s+(\d+)/\s*\d+ .*?lm loss: ([\d.E+-]+)")
COMMON = ["--micro-batch-size", "2", "--global-batch-size", "4", "--lr", "1e-3", "--lr-decay-style", "constant",
          "--log-interval", "1", "--eval-iters", "0", "--split", "100,0,0", "--seed", "7"]


def cli(*args: str, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "falcon_bridge.cli.app", *map(str, args)], capture_output=True,
                          text=True, cwd=cwd)


def ok(*args: str) -> str:
    done = cli(*args)
    assert done.returncode == 0, (done.stdout + done.stderr)[-5000:]
    return done.stdout


def files_of(directory) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def losses(log: str) -> dict[int, float]:
    return {int(i): float(loss) for i, loss in ITERATION.findall(log)}


@pytest.fixture(scope="module")
def imported(tiny_hf, tmp_path_factory):
    """CARD through import-hf."""
    out = tmp_path_factory.mktemp("imported") / "mg"
    ok("import-hf", tiny_hf[CARD], out)
    return out


@pytest.fixture(scope="module")
def runs(imported, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("train")
    shutil.copytree(imported, tmp / "mg")
    tokenizer = hf_tokenizer(tmp / "mg" / "iter_0000000")
    # a document whose ids (then EOS) are a multiple of 4 long: sequence parallelism splits the sequence over TP
    text = next(t for t in (" ".join(["the cat sat on a mat"] * k + ["end"] * e) for k in range(4, 12)
                            for e in range(4)) if (len(tokenizer(t)["input_ids"]) + 1) % 4 == 0)
    document = [*tokenizer(text)["input_ids"], tokenizer.eos_token_id]
    (tmp / "corpus.jsonl").write_text((json.dumps({"text": text}) + "\n") * 200)
    ok("prepare-data", tmp / "corpus.jsonl", "--tokenizer", tmp / "mg" / "iter_0000000", "--output-prefix",
       tmp / "data" / "doc")
    data = ["--data-path", tmp / "data" / "doc", "--seq-length", str(len(document))]

    def train(name, *flags, nproc=1, load=tmp / "mg"):
        out = ok("train", "--nproc-per-node", nproc, "--load", load, "--save", tmp / name, *data, *COMMON, *flags)
        return losses(out)

    result = {"tmp": tmp, "document": document, "losses": {
        "tp1": train("tp1", "--train-iters", "5", "--save-interval", "3"),
        "tp2pp2": train("tp2pp2", "--train-iters", "5", "--exit-interval", "3", "--save-interval", "3",
                        "--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2",
                        "--sequence-parallel", "--recompute-granularity", "full", "--recompute-method", "uniform",
                        "--recompute-num-layers", "1", nproc=4),
        "tp4": train("tp4", "--train-iters", "5", "--save-interval", "5", "--tensor-model-parallel-size", "4", nproc=4),
        "pp2vp2": train("pp2vp2", "--train-iters", "5", "--save-interval", "5", "--pipeline-model-parallel-size", "2",
                        "--num-layers-per-virtual-pipeline-stage", "1", nproc=2),
    }}
    result["losses"]["resumed"] = train("resumed", "--train-iters", "5", "--save-interval", "5", load=tmp / "tp2pp2")
    result["losses"]["resumed_pp2"] = train("resumed_pp2", "--train-iters", "5", "--exit-interval", "4",
                                            "--save-interval", "4", "--pipeline-model-parallel-size", "2", nproc=2,
                                            load=tmp / "tp2pp2")
    for name in ("tp1", "resumed", "tp4", "pp2vp2"):
        ok("export-hf", tmp / name, tmp / f"{name}-hf")
    return result


def hf_tokenizer(directory):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(directory))


def test_first_loss_is_transformers_loss_on_the_batch(runs, tiny_hf):
    """Iteration 1 of Megatron-LM's loop reports transformers' next-token loss on the batch it drew, at TP=1 and at
    TP=2 × PP=2 with sequence parallelism and recompute (the vocabulary padding masked out of the softmax)."""
    document = torch.tensor(runs["document"])
    tokens, labels = document[None], torch.roll(document, -1)[None]  # the last label: the next document's first id
    with torch.no_grad():
        logits = hf_model(tiny_hf[CARD], torch.float32, "cpu")(tokens).logits
    expected = torch.nn.functional.cross_entropy(logits[0], labels[0]).item()
    for name in ("tp1", "tp2pp2", "tp4", "pp2vp2"):
        assert runs["losses"][name][1] == pytest.approx(expected, rel=2e-6), name


def test_layouts_and_resume_train_alike(runs):
    """The same 5 iterations at TP=1, at TP=4, at PP=2 with two virtual stages per rank (megatron's interleaved
    schedule), and at TP=2 × PP=2 (sequence parallel, recompute) for 3 then resumed from its save at TP=1
    (optimizer state, iteration count and data position carried over; and at PP=2 for iteration 4): the same
    losses, and the same trained weights (to the fp32 noise Adam amplifies: tests/test_training_parity.py)."""
    got = runs["losses"]
    assert sorted(got["tp1"]) == [1, 2, 3, 4, 5] and sorted(got["resumed"]) == [4, 5]
    assert got["tp1"][5] < got["tp1"][1]  # it learns the document
    # After a resume, Megatron-LM's log line at iteration 5 reports the mean of iterations 4 and 5 (its first log
    # window after loading spans both; the trained state is the uninterrupted run's, bit for bit, at one layout)
    resumed_5 = (got["tp1"][4] + got["tp1"][5]) / 2
    assert sorted(got["resumed_pp2"]) == [4]
    for name in ("tp2pp2", "resumed", "resumed_pp2", "tp4", "pp2vp2"):
        for iteration, loss in got[name].items():
            expected = got["tp1"][iteration] if (name, iteration) != ("resumed", 5) else resumed_5
            assert loss == pytest.approx(expected, rel=1e-5), (name, iteration)
    reference = exported(runs["tmp"] / "tp1-hf")
    for name in ("resumed", "tp4", "pp2vp2"):
        ours = exported(runs["tmp"] / f"{name}-hf")
        assert ours.keys() == reference.keys()
        errors = {n: relative_error(ours[n], reference[n]) for n in reference}
        worst = max(errors, key=errors.get)
        assert errors[worst] <= 2e-4, f"{name}: {worst} differs from TP=1 training by {errors[worst]:.2e}"


@pytest.mark.parametrize("name,tp", [("tp1", 1), ("tp4", 4), ("resumed", 1), ("pp2vp2", 1)])
def test_trained_save_exports_its_logits(runs, name, tp):
    """What the loop saved exports to an HF checkpoint whose transformers logits are the trained model's, the
    model run at the layout it trained in (verify, fp32)."""
    report = json.loads(ok("verify", runs["tmp"] / f"{name}-hf", runs["tmp"] / name, "--tp", tp, "--device",
                           "cpu", "--dtype", "fp32", "--json"))
    assert report["passed"] and report["logits"]["relative"] < 1e-5, report["logits"]


def test_a_killed_run_resumes_from_its_last_complete_save(runs):
    """SIGKILL to every rank at some point after the first save (while training or saving a later one): the tracker
    still names a complete iteration, and the same command resumes there and finishes."""
    tmp = runs["tmp"]
    save = tmp / "killed"
    args = [sys.executable, "-m", "falcon_bridge.cli.app", "train", "--load", tmp / "mg", "--save", save,
            "--data-path", tmp / "data" / "doc", "--seq-length", len(runs["document"]), *COMMON,
            "--train-iters", "8", "--save-interval", "2"]
    run = subprocess.Popen(list(map(str, args)), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                           start_new_session=True)
    tracker = save / "latest_checkpointed_iteration.txt"
    try:
        while not (tracker.exists() and tracker.read_text().strip() == "2") and run.poll() is None:
            time.sleep(0.05)
    finally:
        os.killpg(run.pid, signal.SIGKILL)
        run.wait()
    stopped = int(tracker.read_text())
    assert stopped in (2, 4, 6) and (save / f"iter_{stopped:07d}" / ".metadata").is_file()
    load = args.index("--load") + 1
    got = losses(ok(*args[3:load], save, *args[load + 1:]))  # resumed as Megatron-LM resumes: --load SAVE
    assert sorted(got) == list(range(stopped + 1, 9))
    assert tracker.read_text().strip() == "8"
    ok("export-hf", save, tmp / "killed-hf")


@pytest.mark.parametrize("card", ["tiny-one-group", "tiny-llama-tied"])
def test_bitnet_trains_and_exports_packed(tiny_hf, tmp_path, card):
    """BitNet b1.58 fine-tuning in the loop (TP=2; Falcon-H1 with one Mamba group replicated, and a BitNet GPT of
    the Llama family, as Falcon-E is): the packed export (transformers' BitLinear format, which verify's reference
    loads in transformers) computes the trained model's logits."""
    ok("import-hf", tiny_hf[card], tmp_path / "mg", "--bitnet")
    out = ok("train", "--nproc-per-node", 2, "--load", tmp_path / "mg", "--save", tmp_path / "trained",
             "--tensor-model-parallel-size", 2, "--mock-data", "--seq-length", 32, "--train-iters", 2,
             "--save-interval", 2, *COMMON)
    assert sorted(losses(out)) == [1, 2]
    ok("export-hf", tmp_path / "trained", tmp_path / "packed", "--format", "packed")
    report = json.loads(ok("verify", tmp_path / "packed", tmp_path / "trained", "--tp", 2, "--device", "cpu",
                           "--dtype", "fp32", "--tolerance", "1e-2", "--json"))
    assert report["passed"], report["logits"]


BAD_FLAGS = [
    (["--num-layers", "99"], "--num-layers 99: the checkpoint's model has 4"),
    (["--hidden-size", "48"], "--hidden-size 48: the checkpoint's model has 64"),
    (["--tensor-model-parallel-size", "3"], "--tensor-model-parallel-size/--pipeline-model-parallel-size"),
    (["--context-parallel-size", "2"], "--context-parallel-size > 1: not supported"),
    (["--cuda-graph-impl", "local"], "--cuda-graph-impl local"),
    (["--recompute-granularity", "selective", "--recompute-modules", "mlp"], "--recompute-modules mlp"),
    (["--sequence-parallel"], "--sequence-parallel: needs --tensor-model-parallel-size > 1"),
    (["--num-layers-per-virtual-pipeline-stage", "0"], "--num-layers-per-virtual-pipeline-stage 0: must be at least 1"),
    (["--num-virtual-stages-per-pipeline-rank", "0"], "--num-virtual-stages-per-pipeline-rank 0: must be at least 1"),
    (["--decoder-first-pipeline-num-layers", "1"], "--decoder-first-pipeline-num-layers set: not supported"),
    (["--nproc-per-node", "2", "--pipeline-model-parallel-size", "2", "--num-layers-per-virtual-pipeline-stage", "1",
      "--global-batch-size", "6"], "3 micro-batches per step (of 2 on each of 1 data-parallel ranks); megatron's "),
    (["--nproc-per-node", "2", "--pipeline-model-parallel-size", "2", "--num-virtual-stages-per-pipeline-rank", "4"],
     "--num-virtual-stages-per-pipeline-rank: 4 virtual pipeline stages per rank: the layers of each pipeline stage"),
    (["--num-layers-per-virtual-pipeline-stage", "1"], "interleaved schedule is used, pipeline-model-parallel size"),
    (["--no-such-flag"], "unrecognized arguments: --no-such-flag"),
    (["--global-batch-size", "3"], "Megatron-LM refuses these flags"),
    (["--save-interval", "0"], "Megatron-LM refuses these flags: `assert args.save_interval"),
    (["--tokenizer-model", "/nonexistent/tok[bold]"], "--tokenizer-model /nonexistent/tok[bold]: not a Hugging Face"),
    (["--tokenizer-model", "BIGTOK"], "tokens, but the checkpoint's vocabulary has 1001"),
    (["--data-path", "/nonexistent/data"], "--data-path /nonexistent/data: no /nonexistent/data.bin"),
    (["--data-path", "DATA", "--eval-iters", "10"], "--split 100,0,0: without a validation part, pass --eval-iters 0"),
    (["--save", "LOAD"], "inside the checkpoint this run fine-tunes from"),
    (["--save", "LOAD/iter_0000000/x[bold]"], "x[bold]: inside the checkpoint this run fine-tunes from"),
    (["--save", "LINK"], "inside the checkpoint this run fine-tunes from"),
    (["--save", "FILE"], "exists and is not a directory"),
]


@pytest.mark.parametrize("flags,message", BAD_FLAGS, ids=[" ".join(f) for f, _ in BAD_FLAGS])
def test_bad_flags_are_one_line_before_anything_starts(imported, tmp_path, flags, message):
    """A flag that contradicts the checkpoint, that the model cannot honour or that Megatron-LM refuses: one line
    naming it, exit code 2, no process group started and nothing saved."""
    source_files = files_of(imported)
    save = tmp_path / "refused"
    mock = [] if "--data-path" in flags else ["--mock-data"]
    if "DATA" in flags:  # a real indexed dataset
        (tmp_path / "doc.jsonl").write_text(json.dumps({"text": "a few words of text"}) + "\n")
        ok("prepare-data", tmp_path / "doc.jsonl", "--tokenizer", imported / "iter_0000000", "--output-prefix",
           tmp_path / "data" / "doc")
        flags = [str(tmp_path / "data" / "doc") if f == "DATA" else f for f in flags]
    if "BIGTOK" in flags:  # another model's tokenizer: more ids than the checkpoint's embedding has rows
        bigger = hf_tokenizer(imported / "iter_0000000")
        bigger.add_tokens([f"word{i}" for i in range(1000)])
        bigger.save_pretrained(tmp_path / "BIGTOK")
    (tmp_path / "FILE").write_text("not a directory")
    (tmp_path / "LINK").symlink_to(imported)  # the source under another name
    flags = [f.replace("LOAD", str(imported)) if f.startswith("LOAD") else
             str(tmp_path / f) if f in ("FILE", "LINK", "BIGTOK") else f for f in flags]
    done = cli("train", "--load", imported, "--save", save, "--save-interval", "1", *mock, "--seq-length",
               "32", "--train-iters", "1", *COMMON, *flags)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1 and lines[0].startswith("error:"), done.stderr[-3000:]
    assert message in lines[0], lines[0]
    assert not save.exists()
    assert files_of(imported) == source_files  # the source as import-hf wrote it


def test_missing_load_data_and_lr_are_one_line(imported, tmp_path):
    lr = COMMON.index("--lr")
    without_lr = COMMON[:lr] + COMMON[lr + 2:]
    for args, message in (
        ([*COMMON, "--mock-data"], "--load: required"),
        ([*COMMON, "--load", tmp_path / "nothing"], "is not a directory"),
        ([*COMMON, "--load", imported], "--data-path: required"),
        ([*without_lr, "--load", imported, "--mock-data"], "--lr: required"),
    ):
        done = cli("train", *args)
        assert done.returncode == 2 and message in done.stderr and len(done.stderr.strip().splitlines()) == 1, \
            done.stderr[-3000:]


def readme_train_example() -> list[list[str]]:
    """The command lines of README's train example (the fenced block after its train-example marker)."""
    text = (Path(__file__).parents[1] / "README.md").read_text()
    block = text.split("<!-- train-example", 1)[1].split("```", 2)[1]
    return [shlex.split(line) for line in block.strip().splitlines()]


def test_readme_train_example_runs_as_shown(tmp_path):
    commands = readme_train_example()
    assert [c[:2] for c in commands] == [["falcon-bridge", name] for name in
                                         ("create-random", "import-hf", "prepare-data", "train", "export-hf", "verify")]
    words = "the quick brown fox jumps over a lazy dog while seven wise owls hum quietly at night".split()
    rows = [" ".join(words[(i * 7 + j) % len(words)] for j in range(40 + i % 13)) for i in range(200)]
    (tmp_path / "corpus.jsonl").write_text("".join(json.dumps({"text": r}) + "\n" for r in rows))
    for command in commands:
        done = cli(*command[1:], cwd=tmp_path)
        assert done.returncode == 0, (command, (done.stdout + done.stderr)[-4000:])
    assert "PASS" in done.stdout or '"passed": true' in done.stdout, done.stdout


@pytest.mark.parametrize("method,k,spans", [
    (None, None, [(0, 5, False)]),
    ("uniform", 1, [(0, 1, True), (1, 2, True), (2, 3, True), (3, 4, True), (4, 5, True)]),
    ("uniform", 2, [(0, 2, True), (2, 4, True), (4, 5, True)]),
    ("block", 2, [(0, 1, True), (1, 2, True), (2, 5, False)]),
    ("block", 9, [(0, 1, True), (1, 2, True), (2, 3, True), (3, 4, True), (4, 5, True)]),
])
def test_full_recompute_spans_follow_megatron(method, k, spans):
    """--recompute-granularity full: which layers of a 5-layer stage run under tensor_parallel.checkpoint."""
    from types import SimpleNamespace

    from falcon_bridge.megatron.model import FalconH1Stack

    config = SimpleNamespace(recompute_granularity="full" if method else None, recompute_method=method,
                             recompute_num_layers=k)
    assert FalconH1Stack._layer_spans(SimpleNamespace(config=config, layers=[None] * 5)) == spans


def test_an_optimizer_state_the_loop_cannot_load_is_refused_in_one_line(runs, tmp_path):
    """Resuming with the other optimizer kind than the one that saved the state, or a distributed-optimizer state
    without Transformer Engine/Apex (megatron-core 0.19.2's loader fails then): one line, exit 2, before any rank
    starts; --no-load-optim (weights only) is the way out the line names."""
    from megatron.core.optimizer.distrib_optimizer import HAVE_APEX_OR_TE

    tmp = runs["tmp"]
    data = ["--mock-data", "--seq-length", "32", "--train-iters", "1", *COMMON]
    ok("train", "--load", tmp / "tp1", "--save", tmp_path / "distributed", "--use-distributed-optimizer",
       "--finetune", "--save-interval", "1", *data)
    cases = [(tmp / "tp1", ["--use-distributed-optimizer"], "tp1/iter_0000005 was saved without it; resume without"),
             (tmp_path / "distributed", [], "iter_0000001 was saved with it; resume with it, or pass --no-load-optim")]
    if not HAVE_APEX_OR_TE:
        cases.append((tmp_path / "distributed", ["--use-distributed-optimizer"], "needs Transformer Engine or Apex"))
    for load, flags, message in cases:
        done = cli("train", "--load", load, "--save", tmp_path / "resumed", "--save-interval", "1", *data, *flags)
        lines = done.stderr.strip().splitlines()
        assert done.returncode == 2 and len(lines) == 1 and message in lines[0], done.stderr[-3000:]
        assert not (tmp_path / "resumed").exists()
