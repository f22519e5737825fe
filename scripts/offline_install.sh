#!/usr/bin/env bash
# Install ssltrain on an offline CUDA machine from the wheels of scripts/offline_wheels.sh,
# keeping the machine's own torch, transformers and accelerate. From the repository root:
#
#   scripts/offline_install.sh [WHEEL_DIR ...]    resolve hydra-core, omegaconf, datasets and
#                                                 tensorboard from the parts (default: .wheels/part*),
#                                                 then ssltrain itself in editable mode, no deps
#   scripts/offline_install.sh --part WHEEL_DIR   install one part's wheels as they are (no deps),
#                                                 for parts that arrive in separate copies; then run
#                                                 the first form with the last part
set -euo pipefail
PY=${PY:-python}
if [ "${1:-}" = "--part" ]; then
    "$PY" -m pip install --quiet --no-index --no-deps "$2"/*.whl
    echo "installed $(ls "$2"/*.whl | wc -l) wheels from $2"
    exit 0
fi
dirs=("$@")
if [ ${#dirs[@]} -eq 0 ]; then dirs=(.wheels/part*); fi
links=()
for d in "${dirs[@]}"; do links+=(--find-links "$d"); done
"$PY" -m pip install --quiet --no-index "${links[@]}" hydra-core omegaconf datasets tensorboard
"$PY" -m pip install --quiet --no-deps --no-build-isolation -e .
"$PY" -c "import hydra, omegaconf, datasets, torch, transformers, ssltrain; \
print('ssltrain ready: torch', torch.__version__, '| cuda', torch.cuda.is_available(), \
'| transformers', transformers.__version__, '| datasets', datasets.__version__)"
