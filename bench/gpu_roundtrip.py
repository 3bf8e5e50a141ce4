"""The full round trip on a GPU machine, timed, through the CLI as a user runs it.

For each card (random bf16 weights of its real shapes) and each TP:
  create-random → import-hf --tp N → verify --device cuda --tp N (HF on GPU 0 against our model in N processes,
  every block compared) → export-hf → every exported tensor compared with the source, bit for bit.
Each command is its own process, so every time includes its imports (and verify's first Triton compilations).

    python bench/gpu_roundtrip.py [--cards falcon-h1-0.5b,falcon-h1-1.5b] [--tp 1,2] [--dtypes fp32]
                                  [--seq-len 512] [--workdir DIR] [--json FILE] [--device cuda]
"""

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

from falcon_bridge.formats.hf import ulp_differences

CLI = [sys.executable, "-m", "falcon_bridge.cli.app"]


def run(*args: str) -> tuple[float, str]:
    t0 = time.perf_counter()
    proc = subprocess.run([*CLI, *args], capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    # verify exits 1 with its JSON report when the models disagree: a result, not a crash
    if proc.returncode and not (args[0] == "verify" and proc.returncode == 1 and proc.stdout.lstrip().startswith("{")):
        raise SystemExit(f"falcon-bridge {' '.join(args)} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return seconds, proc.stdout


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cards", default="falcon-h1-0.5b,falcon-h1-1.5b")
    ap.add_argument("--tp", default="1,2")
    ap.add_argument("--dtypes", default="fp32", help="verify's compute dtypes, e.g. fp32,bf16")
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--device", default="cuda", help="cpu: a smoke test of this script on a tiny card")
    ap.add_argument("--workdir", default="/tmp/fb-gpu")
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    rows = []
    for card in args.cards.split(","):
        work = Path(args.workdir) / card
        shutil.rmtree(work, ignore_errors=True)
        hf = work / "hf"
        create_s, _ = run("create-random", card, str(hf), "--dtype", "bf16", "--json")
        for tp in map(int, args.tp.split(",")):
            mg, back = work / f"tp{tp}", work / f"tp{tp}-export"
            import_s, _ = run("import-hf", str(hf), str(mg), "--tp", str(tp), "--json")
            for dtype in args.dtypes.split(","):
                verify_s, out = run("verify", str(hf), str(mg), "--tp", str(tp), "--device", args.device,
                                    "--dtype", dtype, "--seq-len", str(args.seq_len), "--json")
                v = json.loads(out)
                rows.append({"card": card, "tp": tp, "dtype": dtype, "create_s": create_s, "import_s": import_s,
                             "verify_s": verify_s, "passed": v["passed"], "relative": v["logits"]["relative"],
                             "max_abs_diff": v["logits"]["max_abs_diff"], "argmax": v["argmax_agreement"],
                             "worst_block_relative": max(r["relative"] for r in v["layers"]),
                             "first_divergence": v["first_divergence"]})
            export_s, _ = run("export-hf", str(mg), str(back), "--json")
            ulps = ulp_differences(hf, back)
            differ = [name for name, d in ulps.items() if d != 0]
            for r in rows:
                if r["card"] == card and r["tp"] == tp:
                    r.update(export_s=export_s, export_differing_tensors=len(differ), tensors=len(ulps))
                    r["passed"] = r["passed"] and not differ
                    print(json.dumps(r), flush=True)  # partial results survive a run cut short
            if args.json:
                Path(args.json).write_text(json.dumps(rows, indent=2))
    print(f"\n{'card':16} {'tp':>2} {'dtype':5} {'import s':>8} {'verify s':>8} {'export s':>8} {'logits rel':>10} "
          f"{'worst block':>11} {'argmax':>7} {'export':>9}  result")
    for r in rows:
        export = f"{r['tensors']} same" if r["export_differing_tensors"] == 0 else \
            f"{r['export_differing_tensors']} differ"
        print(f"{r['card']:16} {r['tp']:2} {r['dtype']:5} {r['import_s']:8.1f} {r['verify_s']:8.1f} "
              f"{r['export_s']:8.1f} {r['relative']:10.2e} {r['worst_block_relative']:11.2e} "
              f"{100 * r['argmax']:6.2f}% {export:>9}  {'PASS' if r['passed'] else 'FAIL'}")
    return rows


if __name__ == "__main__":
    sys.exit(0 if all(r["passed"] for r in main()) else 1)
