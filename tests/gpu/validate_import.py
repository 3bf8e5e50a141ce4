"""GPU validation of import-hf: a real-size card (random weights) imported at several TPs, logits of our Megatron
model (mamba_ssm Triton kernels, NCCL) against transformers' FalconH1ForCausalLM on the same GPU.

    python tests/gpu/validate_import.py [--card falcon-h1-0.5b] [--tp 1,2] [--seq-len 512] [--json OUT.json]

Prints one table row per (TP, dtype); exits 1 if any row misses its tolerance.
"""

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

from falcon_bridge.converters.create_random import create_random
from falcon_bridge.converters.import_hf import import_hf
from falcon_bridge.converters.verify import DEFAULT_TOLERANCE, compare_logits, hf_logits, sample_tokens
from falcon_bridge.core.parallel import MegatronLayout
from falcon_bridge.formats.cards import load_card
from falcon_bridge.megatron.runtime import launch, megatron_logits_worker


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser()
    ap.add_argument("--card", default="falcon-h1-0.5b")
    ap.add_argument("--tp", default="1,2")
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    card = load_card(args.card)
    tokens = sample_tokens(card.arch.vocab_size, batch=2, seq_len=args.seq_len)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        hf_dirs, reference = {}, {}
        for dtype in (torch.float32, torch.bfloat16):
            name = str(dtype).removeprefix("torch.")
            hf_dirs[name] = tmp / f"hf-{name}"
            create_random(card, hf_dirs[name], seed=0, dtype=dtype)
            t0 = time.perf_counter()
            reference[name] = hf_logits(hf_dirs[name], tokens, dtype, "cuda")
            print(f"HF {name} forward: {time.perf_counter() - t0:.1f}s", flush=True)
        for tp in map(int, args.tp.split(",")):
            roots = []
            for name, hf_dir in hf_dirs.items():
                roots.append(str(tmp / f"mg-{name}-tp{tp}"))
                import_hf(str(hf_dir), Path(roots[-1]), MegatronLayout(tp=tp))
            t0 = time.perf_counter()
            results = launch(megatron_logits_worker, tp, roots, tp, 1, tokens, None)
            print(f"Megatron TP={tp} load+forward: {time.perf_counter() - t0:.1f}s", flush=True)
            for name, logits in zip(hf_dirs, results):
                r = compare_logits(reference[name], logits, DEFAULT_TOLERANCE[name])
                rows.append({"card": card.name, "tp": tp, "dtype": name, "seq_len": args.seq_len, **r.to_dict()})
    print(f"\n{'card':16} {'TP':>2} {'dtype':8} {'max|Δ|':>10} {'mean|Δ|':>10} {'max|logit|':>10} "
          f"{'rel':>10} {'argmax':>7}  result")
    for r in rows:
        print(f"{r['card']:16} {r['tp']:>2} {r['dtype']:8} {r['max_abs_diff']:10.3e} {r['mean_abs_diff']:10.3e} "
              f"{r['max_abs_logit']:10.3e} {r['relative']:10.3e} {100 * r['argmax_agreement']:6.2f}%  "
              f"{'PASS' if r['passed'] else 'FAIL'}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return rows


if __name__ == "__main__":
    sys.exit(0 if all(r["passed"] for r in main()) else 1)
