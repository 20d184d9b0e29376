#!/usr/bin/env bash
# A fresh virtual environment with the package's extras, the way a user installs it (about a minute here with a
# warm pip cache): torch pinned first, then `.[deepspeed,lightning,transformers,async]` under constraints.txt;
# checks that torch stayed the pinned CPU build and that the import hook (doublesqueeze.pth) is active.
#   tools/check_install.sh [VENV_DIR]          (Horovod's extra needs tools/horovod_wheel.sh first: see README)
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${1:-$(mktemp -d)/venv}
python3 -m venv "$VENV"
"$VENV/bin/pip" install -q torch==2.13.0
"$VENV/bin/pip" install -q -c constraints.txt ".[deepspeed,lightning,transformers,async]"
cd /
"$VENV/bin/python" - <<'PY'
import accelerate, deepspeed, lightning, torch, transformers, zmq
import async_ps, deepspeed_ext, dsq_plugins
assert torch.__version__.startswith("2.13.0"), torch.__version__
assert deepspeed._dsq_original_initialize is not None, "doublesqueeze.pth did not load the import hook"
print("ok:", "torch", torch.__version__, "deepspeed", deepspeed.__version__, "lightning", lightning.__version__,
      "transformers", transformers.__version__, "accelerate", accelerate.__version__, "from", dsq_plugins.__file__)
PY
