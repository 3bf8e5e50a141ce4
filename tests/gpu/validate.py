"""GPU validation on a real-size card (random weights): import-hf, reshard, µP fold, export-hf.

For every route, our Megatron model (mamba-ssm Triton kernels, NCCL, TP processes) runs the same tokens as
transformers' FalconH1ForCausalLM on GPU 0, and the checkpoint is exported back to HF and compared with the source
(preserve routes: byte for byte; fold routes: within one ulp, since the multipliers are not powers of two).

    python tests/gpu/validate.py [--card falcon-h1-0.5b] [--tp 1,2,4] [--fold-tp 2] [--seq-len 512] [--json F]
"""

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

from falcon_bridge.cards import load_card
from falcon_bridge.converters.create_random import CreateRandomOptions, create_random
from falcon_bridge.converters.export_hf import ExportOptions, export_hf
from falcon_bridge.converters.import_hf import ImportOptions, import_hf
from falcon_bridge.converters.reshard import ReshardOptions, reshard
from falcon_bridge.converters.verify import DEFAULT_TOLERANCE, compare_logits, hf_logits, sample_tokens
from falcon_bridge.core.parallel import MegatronLayout
from falcon_bridge.formats.hf import ulp_differences
from falcon_bridge.megatron.distributed import launch
from falcon_bridge.megatron.forward import megatron_logits_worker


def max_ulps(a_dir: Path, b_dir: Path) -> float:
    """Largest difference in units in the last place between same-named tensors (inf: a tensor missing or reshaped)."""
    return max((float("inf") if d is None else d for d in ulp_differences(a_dir, b_dir).values()), default=0)


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser()
    ap.add_argument("--card", default="falcon-h1-0.5b")
    ap.add_argument("--tp", default="1,2,4")
    ap.add_argument("--fold-tp", type=int, default=2, help="0: no µP-fold route")
    ap.add_argument("--direct", action="store_true", help="import at the run TP instead of resharding to it")
    ap.add_argument("--no-export", action="store_true", help="skip the export-and-compare step")
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    card = load_card(args.card)
    tokens = sample_tokens(card.arch.vocab_size, batch=2, seq_len=args.seq_len)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        hf, reference = {}, {}
        for dtype in (torch.float32, torch.bfloat16):
            name = str(dtype).removeprefix("torch.")
            hf[name] = tmp / f"hf-{name}"
            create_random(CreateRandomOptions(card, hf[name], seed=0, dtype=dtype))
            reference[name] = hf_logits(hf[name], tokens, dtype, "cuda" if torch.cuda.is_available() else "cpu")
        # route → (run TP, TP import-hf prepares for, µP mode); a run TP other than the import's goes through reshard
        routes = {f"tp{tp}": (tp, tp if args.direct else max(tp // 2, 1), "preserve")
                  for tp in map(int, args.tp.split(","))}
        if args.fold_tp:
            routes[f"tp{args.fold_tp}-fold"] = (args.fold_tp, args.fold_tp, "fold")
        for route, (tp, import_tp, mup_mode) in routes.items():
            roots = []
            for name, hf_dir in hf.items():
                first, final = tmp / f"{route}-{name}-import", tmp / f"{route}-{name}"
                import_hf(ImportOptions(str(hf_dir), first if import_tp != tp else final,
                                        MegatronLayout(tp=import_tp), mup_mode=mup_mode))
                if import_tp != tp:
                    reshard(ReshardOptions(first, final, MegatronLayout(tp=tp)))
                roots.append(str(final))
            t0 = time.perf_counter()
            results = launch(megatron_logits_worker, tp, roots, tp, 1, tokens, None)
            seconds = time.perf_counter() - t0
            for (name, hf_dir), root, logits in zip(hf.items(), roots, results):
                ulps = 0
                if not args.no_export:
                    export_hf(ExportOptions(Path(root), tmp / f"{route}-{name}-export"))
                    ulps = max_ulps(hf_dir, tmp / f"{route}-{name}-export")
                r = compare_logits(reference[name], logits, DEFAULT_TOLERANCE[name])
                rows.append({"card": card.name, "route": route, "tp": tp, "dtype": name, "seq_len": args.seq_len,
                             "export_max_ulps": None if args.no_export else ulps,
                             "megatron_seconds": round(seconds, 1), **r.to_json()})
                rows[-1]["passed"] = r.passed and (ulps == 0 if mup_mode == "preserve" else ulps <= 1)
    print(f"\n{'route':10} {'dtype':8} {'max|Δ|':>10} {'mean|Δ|':>10} {'max|logit|':>10} {'rel':>10} "
          f"{'argmax':>7} {'export ulps':>11}  result")
    for r in rows:
        print(f"{r['route']:10} {r['dtype']:8} {r['max_abs_diff']:10.3e} {r['mean_abs_diff']:10.3e} "
              f"{r['max_abs_logit']:10.3e} {r['relative']:10.3e} {100 * r['argmax_agreement']:6.2f}% "
              f"{r['export_max_ulps']!s:>11}  {'PASS' if r['passed'] else 'FAIL'}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return rows


if __name__ == "__main__":
    sys.exit(0 if all(r["passed"] for r in main()) else 1)
