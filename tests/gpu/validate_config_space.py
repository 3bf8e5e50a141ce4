"""GPU validation of the configs accepted since the config-space round: Mamba in_proj/out_proj biases and the gated
norm with norm_before_gate or rms_norm_eps != 1e-5, on mamba-ssm's Triton kernels (the CPU tests run the
pure-torch stand-ins). Each variant of a card (random weights) goes create-random → import-hf → verify on cuda, in
fp32 and bf16, as a user runs them; a table and --json report the logits' max |Δ| / max |logit| per variant.

    python tests/gpu/validate_config_space.py [--card falcon-h1-tiny-90m] [--tp 1] [--json F]
CPU smoke test:  CUDA_VISIBLE_DEVICES= python tests/gpu/validate_config_space.py --card tiny-one-group --device cpu
"""

import argparse
import dataclasses
import json
import sys
import tempfile
from pathlib import Path

import torch

from falcon_bridge.cards import load_card
from falcon_bridge.converters.create_random import CreateRandomOptions, create_random
from falcon_bridge.converters.import_hf import ImportOptions, import_hf
from falcon_bridge.converters.verify import VerifyOptions, verify
from falcon_bridge.core.parallel import MegatronLayout

VARIANTS = {
    "as released": {},
    "gated norm, norm before gate": {"mamba_rms_norm": True, "mamba_norm_before_gate": True},
    "gated norm, eps 1e-6": {"mamba_rms_norm": True, "mamba_norm_before_gate": False, "rms_norm_eps": 1e-6},
    "in_proj + out_proj biases": {"mamba_proj_bias": True, "projectors_bias": True},
    "all of them": {"mamba_rms_norm": True, "mamba_norm_before_gate": True, "rms_norm_eps": 1e-6,
                    "mamba_proj_bias": True, "projectors_bias": True},
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--card", default="falcon-h1-tiny-90m")
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    base = load_card(args.card)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, change in VARIANTS.items():
            card = dataclasses.replace(base, arch=dataclasses.replace(base.arch, **change), provenance={})
            hf, mg = Path(tmp) / f"{len(results)}-hf", Path(tmp) / f"{len(results)}-mg"
            create_random(CreateRandomOptions(card, hf, dtype=torch.float32))
            import_hf(ImportOptions(str(hf), mg, MegatronLayout(tp=args.tp)))
            row = {"variant": name, "config": change}
            for dtype in (torch.float32, torch.bfloat16):
                report = verify(VerifyOptions(hf, mg, dtype=dtype, device=args.device))
                row[str(dtype).removeprefix("torch.")] = {"passed": report.passed, "relative": report.logits.relative,
                                                          "tolerance": report.tolerance,
                                                          "first_divergence": report.first_divergence}
            results.append(row)
    print(f"{args.card}, TP={args.tp}, {args.device}: logits max |Δ| / max |logit| (tolerance)")
    print(f"{'variant':32} {'fp32':>22} {'bf16':>22}")
    for row in results:
        cells = [f"{row[d]['relative']:.2e} ({row[d]['tolerance']:.0e}) {'ok' if row[d]['passed'] else 'FAIL'}"
                 for d in ("float32", "bfloat16")]
        print(f"{row['variant']:32} {cells[0]:>22} {cells[1]:>22}")
    if args.json:
        args.json.write_text(json.dumps({"card": args.card, "tp": args.tp, "device": args.device,
                                         "results": results}, indent=2))
    return 0 if all(row[d]["passed"] for row in results for d in ("float32", "bfloat16")) else 1


if __name__ == "__main__":
    sys.exit(main())
