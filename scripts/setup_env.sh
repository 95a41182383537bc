#!/usr/bin/env bash
# Create .venv in the repository and install EVE-kit into it (editable), then add the
# torchvision import guard to every interpreter of that environment. Safe to re-run.
#
# VENV (default .venv) and TRANSFORMERS (a version instead of requirements.txt's pin) make other
# environments the same way: scripts/test_transformers_floor.sh uses them.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}

[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade "pip>=23.2"
REQUIREMENTS=requirements.txt
if [ -n "${TRANSFORMERS:-}" ]; then
  REQUIREMENTS="$VENV/requirements.txt"
  sed "s/^transformers==.*/transformers==$TRANSFORMERS/" requirements.txt > "$REQUIREMENTS"
fi
# constraints.txt pins torch so that no package drags in another torch with its CUDA stack.
"$VENV/bin/python" -m pip install -q --no-compile -c constraints.txt -r "$REQUIREMENTS"
"$VENV/bin/python" -m pip install -q --no-compile --no-deps -e .

# A .pth file runs in every interpreter of the venv (pytest, torchrun and deepspeed workers):
# it loads eve/_torchvision_guard.py by path, without importing the package.
"$VENV/bin/python" - <<'PY'
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
"$VENV/bin/python" -c "import transformers, open_clip; from transformers import LlamaConfig" \
  || { echo "setup_env: the environment does not import cleanly" >&2; exit 1; }
# DeepSpeed JIT-compiles its shared-memory communication op on the first CPU run (~45 s):
# build it now, into the repo's ignored build area, so training and tests do not pay for it.
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$PWD/build/torch_extensions}
"$VENV/bin/python" -c "from deepspeed.comm.torch import build_shm_op; build_shm_op()" >/dev/null \
  || echo "setup_env: DeepSpeed's shm op did not build; it will be built on first use" >&2
echo "setup_env: $VENV ready"
