#!/usr/bin/env bash
# Build .venv-megatron-bridge: Megatron-Bridge 0.6.2 beside (not inside) the project's .venv, for the tests that
# run Megatron-Bridge's own code on our checkpoints (tests/test_megatron_bridge.py).
#
# Why a second environment: megatron-bridge 0.6.2 pins transformers <= 5.12.1 (we allow < 6) and declares about
# thirty heavy dependencies (wandb, mlflow, diffusers, flashinfer, Transformer Engine extras...) that its config,
# checkpoint and mapping code never import. So every package is installed pinned and with --no-deps: the wheel,
# the transformers it accepts with that transformers' own hub/tokenizers, and what `import megatron.bridge` needs
# on CPU. torch, megatron-core, safetensors and the rest come from the project's .venv through a .pth file (they are
# found after this environment's own packages, so the transformers pinned here wins).
# Transformer Engine is not installed: tests/megatron_bridge/te_stub.py explains the one import that needs a stand-in.
#
# Usage: tools/megatron-bridge-env.sh [VENV_DIR]   (default .venv-megatron-bridge; needs .venv; idempotent)
set -euo pipefail
cd "$(dirname "$0")/.."
DEST=${1:-.venv-megatron-bridge}
MAIN_PY=.venv/bin/python
[ -x "$MAIN_PY" ] || { echo "error: .venv is missing (run: make venv)" >&2; exit 2; }
PINS=(
  megatron-bridge==0.6.2
  # the transformers it accepts, and what that transformers needs that the project's .venv holds in other versions
  # (kernels: transformers >= 5.2x requires it, and 5.12.1 calls an API that kernels 0.19 refuses; 5.12.1 declares <0.13)
  transformers==5.12.1 huggingface-hub==1.33.0 tokenizers==0.22.2 httpx==0.29.0 httpcore==1.0.9 kernels==0.12.3
  certifi==2026.10.19.post1
  # imported by `import megatron.bridge` and its training.checkpointing / model_load_save modules on CPU
  omegaconf==2.3.1 hydra-core==1.3.8 antlr4-python3-runtime==4.9.3
  tensorboard==2.21.0 protobuf==7.36.2 absl-py==2.5.1
  datasets==5.2.0 multiprocess==0.70.19 dill==0.4.1 xxhash==4.1.0 pandas==3.1.1 python-dateutil==4.0.0
  pyarrow==26.0.1 requests==2.34.2 urllib3==2.8.0
  megatron-energon==7.4.1 braceexpand==0.1.7 filetype==1.2.0 rapidyaml==0.15.2 webdataset==1.0.2 pillow==13.0.0
  multi-storage-client==1.3.1 xattr==1.3.1 cffi==2.1.1 lark==1.3.1 wcmatch==12.0.3 bracex==3.2.3 deprecation==2.1.0
  jsonschema==4.26.0 jsonschema-specifications==2025.9.1 referencing==0.37.0 rpds-py==2026.9.1 attrs==26.1.0
  opentelemetry-api==1.45.2 opentelemetry-sdk==1.45.2 opentelemetry-semantic-conventions==0.66b2
  nvidia-modelopt==0.47.0 pulp==4.2.0 orloge==1.0.0 cpsat-logutils==1.0.0
)
STAMP="$DEST/.pins"
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "${PINS[*]}" ]; then exit 0; fi
rm -rf "$DEST"
BASE=$("$MAIN_PY" -c 'import sys; print(sys.base_prefix)')
"$BASE/bin/python3.12" -m venv "$DEST"
SITE=$("$DEST/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
"$MAIN_PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])' > "$SITE/falcon_bridge_main_venv.pth"
"$DEST/bin/python" -m pip install -q --disable-pip-version-check --no-deps "${PINS[@]}"
echo "${PINS[*]}" > "$STAMP"
