"""GPU validation of `falcon-bridge train` (Megatron-LM's own pretrain loop) the way a user runs it, every step a
CLI command: create-random (a card's real shapes) → import-hf → prepare-data (a corpus from the text files of
installed Python packages: offline, real text) → train N iterations in bf16 → export-hf → transformers loads the
export, generates, and `verify` compares it with the trained Megatron checkpoint (fp32 compute).

Reported: Megatron-LM's own log lines (lm loss, ms per iteration, its TFLOP/s/GPU), tokens/s and MFU computed from
them (6·N·tokens/s over the GPU's bf16 dense peak, N the model's parameters: Megatron-LM's FLOP formula counts a
GPT's attention and MLP only, not our Mamba mixers), the loss falling, the export's verify result and a generation.

With `--bitnet` (issue 28's run: a Falcon3-1.58bit / Falcon-E card): the import is BitNet (the random weights stand in
for a `prequantized` revision's latent weights; on a GPU with onebitllms installed its Triton activation kernel
runs in the BitNet linears), the export is packed (transformers' BitLinear), and verify and the generation run
on that packed export.

    python tests/gpu/validate_train_loop.py [--card falcon-h1-0.5b] [--iters 200] [--tp 1] [--bitnet] [--json F]
CPU smoke test:  python tests/gpu/validate_train_loop.py --card falcon-h1-tiny-90m --iters 4 --seq-len 64 --cpu
(a card with a tokenizer: create-random builds none for the test cards' tiny vocabularies)
"""

import argparse
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

H200_BF16_DENSE_PEAK = 989e12  # FLOP/s, NVIDIA's H200 SXM datasheet (dense, without sparsity)


def cli(*args: str, log: Path | None = None, ok: tuple[int, ...] = (0,)) -> str:
    """A falcon-bridge command's stdout; exits on any return code outside `ok` (verify: 1 = the models differ)."""
    command = [sys.executable, "-m", "falcon_bridge.cli.app", *args]
    print("$ falcon-bridge", " ".join(args), flush=True)
    started = time.time()
    done = subprocess.run(command, capture_output=True, text=True)
    if log is not None:
        log.write_text(done.stdout + done.stderr)
    if done.returncode not in ok:
        sys.exit(f"failed ({done.returncode}): {' '.join(args)}\n{(done.stdout + done.stderr)[-6000:]}")
    print(f"  ok in {time.time() - started:.1f} s", flush=True)
    return done.stdout


def corpus(path: Path, max_bytes: int) -> int:
    """JSON lines, one document per text file of the installed packages (docstrings, READMEs, licences, code)."""
    import site

    roots = [Path(p) for p in site.getsitepackages()] + [Path(json.__file__).parent.parent]
    written = 0
    with path.open("w") as f:
        for root in roots:
            for file in sorted(root.rglob("*")):
                if file.suffix not in (".py", ".md", ".txt", ".rst") or not file.is_file():
                    continue
                text = file.read_text(errors="ignore")
                if len(text) < 200:
                    continue
                f.write(json.dumps({"text": text}) + "\n")
                written += len(text)
                if written >= max_bytes:
                    return written
    return written


ITERATION = re.compile(r"iteration\s+(\d+)/\s*\d+ .*?elapsed time per iteration \(ms\): ([\d.]+).*?"
                       r"(?:throughput per GPU \(TFLOP/s/GPU\): ([\d.]+).*?)?lm loss: ([\d.E+-]+)")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--card", default="falcon-h1-0.5b")
    p.add_argument("--iters", type=int, default=200)
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--micro-batch", type=int, default=4)
    p.add_argument("--global-batch", type=int, default=8)
    p.add_argument("--corpus-mb", type=float, default=40.0)
    p.add_argument("--cpu", action="store_true", help="gloo and fp32 (a smoke test of this script)")
    p.add_argument("--recompute", action="store_true", help="full activation recompute, one layer per span")
    p.add_argument("--bitnet", action="store_true", help="import as BitNet, export packed")
    p.add_argument("--workdir")
    p.add_argument("--json")
    a = p.parse_args()
    work = Path(a.workdir or tempfile.mkdtemp(prefix="train-loop-"))
    dtype = "fp32" if a.cpu else "bf16"

    cli("create-random", a.card, str(work / "hf"), "--dtype", dtype)
    cli("import-hf", str(work / "hf"), str(work / "mg"), *(["--bitnet"] if a.bitnet else []))
    text_bytes = corpus(work / "corpus.jsonl", int(a.corpus_mb * 2**20))
    cli("prepare-data", str(work / "corpus.jsonl"), "--tokenizer", str(work / "mg" / "iter_0000000"),
        "--output-prefix", str(work / "data" / "corpus"))
    train_flags = [
        "--load", str(work / "mg"), "--save", str(work / "trained"),
        "--tensor-model-parallel-size", str(a.tp),
        "--micro-batch-size", str(a.micro_batch), "--global-batch-size", str(a.global_batch),
        "--seq-length", str(a.seq_len), "--train-iters", str(a.iters),
        "--lr", "3e-4", "--min-lr", "3e-5", "--lr-decay-style", "cosine",
        "--lr-warmup-iters", str(max(1, a.iters // 10)),
        "--weight-decay", "0.1", "--adam-beta2", "0.95", "--clip-grad", "1.0",
        "--data-path", str(work / "data" / "corpus"), "--split", "98,2,0",
        "--log-interval", str(max(1, a.iters // 20)), "--log-throughput",
        "--eval-interval", str(a.iters), "--eval-iters", "2", "--save-interval", str(a.iters),
        "--use-distributed-optimizer", "--overlap-grad-reduce",
        "--distributed-backend", "gloo" if a.cpu else "nccl",
    ]
    if a.tp > 1:
        train_flags.append("--sequence-parallel")
    if a.recompute:
        train_flags += ["--recompute-granularity", "full", "--recompute-method", "uniform",
                        "--recompute-num-layers", "1"]
    started = time.time()
    cli("train", "--nproc-per-node", str(a.tp), *train_flags, log=work / "train.log")
    train_seconds = time.time() - started
    log = (work / "train.log").read_text()
    rows = [(int(i), float(ms), float(tf) if tf else None, float(loss)) for i, ms, tf, loss in ITERATION.findall(log)]
    if len(rows) < 2:
        sys.exit(f"no iteration lines in Megatron-LM's log:\n{log[-4000:]}")

    cli("export-hf", str(work / "trained"), str(work / "hf-trained"), *(["--format", "packed"] if a.bitnet else []))
    # verify computes in fp32 on the bf16 weights: it tests that export-hf wrote what training left (fp32 on GPU
    # is TF32 in the Mamba scan: bar 1e-3). Two implementations computing in bf16 drift apart with depth on trained
    # weights (2-6 % per branch in the deep layers of the 0.5B after 200 steps), which says nothing about the export.
    # BitNet: quantization is discrete, so a 1e-7 difference upstream can flip one int8 activation code and move the
    # logits by ~1e-3 of their range (tests/test_bitnet.py, bitnet_agree): the bar is 1e-2
    def verified(hf: Path, megatron: Path) -> dict:
        """verify's report (a mismatch recorded, not fatal: the table shows where the models part ways)."""
        return json.loads(cli("verify", str(hf), str(megatron), "--device", "cpu" if a.cpu else "cuda",
                              "--dtype", "fp32", "--json", *(["--tolerance", "1e-2"] if a.bitnet else []), ok=(0, 1)))

    verify = verified(work / "hf-trained", work / "trained")
    # BitNet: the same check before training (the import's packed export), to tell what training changed
    untrained = None
    if a.bitnet:
        cli("export-hf", str(work / "mg"), str(work / "hf-untrained"), "--format", "packed")
        untrained = verified(work / "hf-untrained", work / "mg")

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from falcon_bridge.cards import load_card
    from falcon_bridge.core.mapping import num_parameters

    device = "cpu" if a.cpu else "cuda"
    model = AutoModelForCausalLM.from_pretrained(str(work / "hf-trained"), dtype=torch.bfloat16 if not a.cpu
                                                 else torch.float32).to(device).eval()
    tok = AutoTokenizer.from_pretrained(str(work / "hf-trained"))
    prompt = tok("import torch\n\ndef ", return_tensors="pt").to(device)
    with torch.no_grad():
        generated = model.generate(**prompt, max_new_tokens=24, do_sample=False)
    text = tok.decode(generated[0])

    steady = [r for r in rows if r[0] > rows[0][0]]  # the first logged window includes start-up
    ms = sum(r[1] for r in steady) / len(steady)
    tokens_per_s = a.global_batch * a.seq_len / (ms / 1e3) / a.tp
    params = num_parameters(load_card(a.card).arch)
    result = {
        "card": a.card, "bitnet": a.bitnet, "iterations": a.iters, "tp": a.tp, "recompute": a.recompute,
        "seq_len": a.seq_len,
        "global_batch": a.global_batch,
        "micro_batch": a.micro_batch, "corpus_bytes": text_bytes, "train_seconds": round(train_seconds, 1),
        "loss_first": rows[0][3], "loss_last": rows[-1][3], "loss_curve": [[r[0], r[3]] for r in rows],
        "ms_per_iteration": round(ms, 1), "tokens_per_s_per_gpu": round(tokens_per_s),
        "megatron_tflops_per_gpu": steady[-1][2], "mfu_6N": round(6 * params * tokens_per_s / H200_BF16_DENSE_PEAK, 4),
        "verify_passed": verify["passed"], "verify_logits": verify.get("logits"),
        "verify_first_divergence": verify.get("first_divergence"), "verify_layers": verify.get("layers"),
        "untrained_verify": untrained, "generation": text,
    }
    print(f"{'iteration':>9} {'lm loss':>9} {'ms/iter':>8} {'TFLOP/s (MLM)':>13}")
    for i, ms_i, tf, loss in rows:
        print(f"{i:>9} {loss:>9.4f} {ms_i:>8.1f} {tf if tf is not None else '-':>13}")
    print(json.dumps({k: v for k, v in result.items() if k not in ("loss_curve", "verify_layers", "untrained_verify")},
                     indent=1))
    before = {(r["layer"], r["component"]): r["relative"] for r in (untrained or {}).get("layers", [])}
    print(f"{'layer':>5} {'branch':>10} {'relative':>9} {'untrained':>9}")
    for r in verify.get("layers", []):
        print(f"{str(r['layer']):>5} {r['component']:>10} {r['relative']:>9.2e} "
              f"{before.get((r['layer'], r['component']), float('nan')):>9.2e}")
    ok = rows[-1][3] < rows[0][3] and verify["passed"]
    print("PASS" if ok else "FAIL")
    if a.json:
        Path(a.json).write_text(json.dumps(result, indent=1))
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
