#!/usr/bin/env bash
# Install ssltrain on an offline CUDA machine from the wheels of scripts/offline_wheels.sh,
# keeping the machine's own torch, transformers and accelerate. From the repository root:
#
#   scripts/offline_install.sh [WHEEL_DIR ...]    resolve hydra-core, omegaconf, datasets and
#                                                 tensorboard from the parts (default: .wheels/part*),
#                                                 then ssltrain itself in editable mode, no deps
#   scripts/offline_install.sh --part WHEEL_DIR   install the wheels of one part whose projects are
#                                                 not installed yet, as they are (no deps): for a part
#                                                 that cannot stay until the others arrive; then run
#                                                 the first form with the last part
#
# Where the parts can wait for each other (copied one after another into the same tree), copy them
# all and run the first form once: pip then resolves every version against what is installed.
set -euo pipefail
PY=${PY:-python}
if [ "${1:-}" = "--part" ]; then
    n=0
    for wheel in "$2"/*.whl; do
        project=$(basename "$wheel" | cut -d- -f1)
        if "$PY" -m pip show --quiet "$project" >/dev/null 2>&1; then
            continue  # never replace what the machine has (its transformers may pin it)
        fi
        "$PY" -m pip install --quiet --no-index --no-deps "$wheel"
        n=$((n + 1))
    done
    echo "installed $n wheels from $2 (projects already installed were left alone)"
    exit 0
fi
dirs=("$@")
if [ ${#dirs[@]} -eq 0 ]; then dirs=(.wheels/part*); fi
links=()
for d in "${dirs[@]}"; do links+=(--find-links "$d"); done
"$PY" -m pip install --quiet --no-index "${links[@]}" hydra-core omegaconf datasets tensorboard
# Built in isolation with the parts' setuptools: the machine's own may predate pyproject's build-system.
"$PY" -m pip install --quiet --no-index "${links[@]}" --no-deps -e .
"$PY" -c "import hydra, omegaconf, datasets, torch, transformers, ssltrain; \
print('ssltrain ready: torch', torch.__version__, '| cuda', torch.cuda.is_available(), \
'| transformers', transformers.__version__, '| datasets', datasets.__version__)"
