#!/usr/bin/env bash
# Create .venv in the repository and install EVE-kit into it (editable), then add the
# torchvision import guard to every interpreter of that environment. Safe to re-run.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}

[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --upgrade "pip>=23.2"
# constraints.txt pins torch so that no package drags in another torch with its CUDA stack.
.venv/bin/python -m pip install -q --no-compile -c constraints.txt -r requirements.txt
.venv/bin/python -m pip install -q --no-compile --no-deps -e .

# A .pth file runs in every interpreter of the venv (pytest, torchrun and deepspeed workers):
# it loads eve/_torchvision_guard.py by path, without importing the package.
.venv/bin/python - <<'PY'
import os
import sysconfig

guard = os.path.abspath("eve/_torchvision_guard.py")
line = (
    f"import os; p = {guard!r}; g = {{'__name__': '_eve_torchvision_guard'}}; "
    "os.path.exists(p) and (exec(compile(open(p).read(), p, 'exec'), g) or g['install']())\n"
)
pth = os.path.join(sysconfig.get_paths()["purelib"], "eve_kit_torchvision_guard.pth")
with open(pth, "w") as f:
    f.write(line)
PY
.venv/bin/python -c "import transformers, open_clip; from transformers import LlamaConfig" \
  || { echo "setup_env: the environment does not import cleanly" >&2; exit 1; }
# DeepSpeed JIT-compiles its shared-memory communication op on the first CPU run (~45 s):
# build it now, into the repo's ignored build area, so training and tests do not pay for it.
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$PWD/build/torch_extensions}
.venv/bin/python -c "from deepspeed.comm.torch import build_shm_op; build_shm_op()" >/dev/null \
  || echo "setup_env: DeepSpeed's shm op did not build; it will be built on first use" >&2
echo "setup_env: .venv ready"
