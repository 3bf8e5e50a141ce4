"""Where a conversion's time goes: one falcon-bridge command under cProfile, the functions with the most time of
their own printed first (imports included, as a user's run pays them).

    python bench/profile_conversion.py import-hf HF_DIR OUT --tp 2 [--top 25]
    python bench/profile_conversion.py export-hf MEGATRON_DIR OUT
"""

import cProfile
import pstats
import sys

from falcon_bridge.cli.app import main

if __name__ == "__main__":
    args = sys.argv[1:]
    top = 25
    if "--top" in args:
        i = args.index("--top")
        top, args = int(args[i + 1]), args[:i] + args[i + 2:]
    sys.argv = ["falcon-bridge", *args]
    profiler = cProfile.Profile()
    try:
        profiler.runcall(main)
    except SystemExit:
        pass
    pstats.Stats(profiler).sort_stats("tottime").print_stats(top)
