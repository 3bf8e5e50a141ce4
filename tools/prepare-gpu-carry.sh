#!/usr/bin/env bash
# Collect, into .gpu/ (git-ignored), what a GPU host without network needs beyond its own image (Python 3.12,
# torch, transformers, triton, einops, psutil, typer, rich, safetensors) to run falcon-bridge: the megatron-core
# wheel we pin, onebitllms' wheel (BitNet's Triton kernels) and mamba-ssm's Python sources (Mamba-2 needs only its
# Triton kernels; its CUDA extensions are not built). Run it here, where PyPI is reachable, after `make venv`.
#   tools/prepare-gpu-carry.sh           the above
#   tools/prepare-gpu-carry.sh --conv    also causal-conv1d's source, to compile on the GPU host (fused Mamba path)
#   tools/prepare-gpu-carry.sh --profile also py-spy's wheel (a sampling profiler that follows --workers' children;
#                                        installed as /tmp/site/bin/py-spy by the preamble below)
# Then carry ".gpu" and start the GPU command with (docs/VALIDATION.md shows whole commands):
#   python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .gpu/whl/*.whl \
#     && cp -r .gpu/site/. /tmp/site/ && export PYTHONPATH=/tmp/site:$PWD
set -euo pipefail
cd "$(git rev-parse --show-toplevel)"
grep -qx '/.gpu/' .gitignore || { echo "error: .gitignore must list /.gpu/" >&2; exit 2; }
py=${PY:-$PWD/.venv/bin/python}
"$py" -c 'import torch' 2>/dev/null || { echo "error: $py has no torch: run 'make venv' or set PY=" >&2; exit 2; }
megatron=$(sed -n 's/.*"megatron-core==\([0-9.]*\)".*/\1/p' pyproject.toml)
mkdir -p .gpu/whl .gpu/site .gpu/src
scratch=$(mktemp -d); trap 'rm -rf "$scratch"' EXIT
wheel_platform=(--only-binary=:all: --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64
                --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
"$py" -m pip download -q --no-deps "${wheel_platform[@]}" -d .gpu/whl "megatron-core==$megatron" onebitllms==0.0.4
if [ ! -d .gpu/site/mamba_ssm ]; then
  # the sdist's setup.py wants to compile CUDA code; these two variables make it hand over the sources only
  MAMBA_SKIP_CUDA_BUILD=TRUE MAMBA_FORCE_BUILD=TRUE "$py" -m pip download -q --no-deps --no-binary=:all: \
    --no-build-isolation -d "$scratch" mamba-ssm==2.3.2.post1
  tar -xzf "$scratch"/mamba_ssm-*.tar.gz -C "$scratch"
  cp -r "$scratch"/mamba_ssm-*/mamba_ssm .gpu/site/
fi
# mamba_ssm/__init__ imports Mamba-1's compiled selective scan, which Mamba-2 never calls
echo '"""Mamba-1 selective-scan extension: not built (falcon-bridge uses Mamba-2 Triton kernels only)."""' \
  > .gpu/site/selective_scan_cuda.py
if [[ " $* " == *" --profile "* ]]; then
  "$py" -m pip download -q --no-deps "${wheel_platform[@]}" --platform manylinux1_x86_64 -d .gpu/whl py-spy==0.4.3
fi
if [[ " $* " == *" --conv "* ]] && ! ls .gpu/src/causal_conv1d-*.tar.gz >/dev/null 2>&1; then
  CAUSAL_CONV1D_SKIP_CUDA_BUILD=TRUE CAUSAL_CONV1D_FORCE_BUILD=TRUE "$py" -m pip download -q --no-deps \
    --no-binary=:all: --no-build-isolation -d .gpu/src causal-conv1d==1.7.0
fi
du -sh .gpu | sed 's/^/.gpu: /'
