"""Compile causal-conv1d's CUDA extension on the GPU machine, for its own GPU architecture only.

mamba-ssm's fused Mamba-2 training kernel (`mamba_split_conv1d_scan_combined`, used by megatron's MambaMixer with
use_mamba_mem_eff_path and by transformers' FalconH1 in training) needs `causal_conv1d_cuda`. Its setup.py builds
for eight architectures; one (sm_90 on an H200) compiles in a fraction of the time. No pip, no network.

    python bench/build_causal_conv1d.py .gpu/src/causal_conv1d-1.7.0.tar.gz /tmp/site

Leaves TARGET/causal_conv1d (the Python package) and TARGET/causal_conv1d_cuda.so; prints the build seconds.
A later call on the same kind of machine can carry the .so instead of building again.
"""

import shutil
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.cpp_extension import load

# setup.py's nvcc flags, minus the per-architecture list, the register report and line info.
NVCC_FLAGS = ["-O3", "-U__CUDA_NO_HALF_OPERATORS__", "-U__CUDA_NO_HALF_CONVERSIONS__",
              "-U__CUDA_NO_BFLOAT16_OPERATORS__", "-U__CUDA_NO_BFLOAT16_CONVERSIONS__",
              "-U__CUDA_NO_BFLOAT162_OPERATORS__", "-U__CUDA_NO_BFLOAT162_CONVERSIONS__",
              "--expt-relaxed-constexpr", "--expt-extended-lambda", "--use_fast_math", "--threads", "4"]
SOURCES = ("causal_conv1d.cpp", "causal_conv1d_fwd.cu", "causal_conv1d_bwd.cu", "causal_conv1d_update.cu")


def main(sdist: str, target: str) -> None:
    target_dir = Path(target)
    target_dir.mkdir(parents=True, exist_ok=True)
    major, minor = torch.cuda.get_device_capability()
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        with tarfile.open(sdist) as tar:
            tar.extractall(tmp, filter="data")
        src = next(Path(tmp).glob("causal_conv1d-*"))
        build = Path(tmp) / "build"
        build.mkdir()
        load(name="causal_conv1d_cuda", sources=[str(src / "csrc" / f) for f in SOURCES],
             extra_cflags=["-O3"], extra_include_paths=[str(src / "csrc")], build_directory=str(build), verbose=True,
             extra_cuda_cflags=[*NVCC_FLAGS, f"-gencode=arch=compute_{major}{minor},code=sm_{major}{minor}"])
        shutil.copy(build / "causal_conv1d_cuda.so", target_dir / "causal_conv1d_cuda.so")
        shutil.copytree(src / "causal_conv1d", target_dir / "causal_conv1d", dirs_exist_ok=True)
    mib = (target_dir / "causal_conv1d_cuda.so").stat().st_size / 2**20
    print(f"causal_conv1d_cuda built for sm_{major}{minor} in {time.perf_counter() - t0:.0f} s ({mib:.1f} MiB)")


if __name__ == "__main__":
    main(*sys.argv[1:])
