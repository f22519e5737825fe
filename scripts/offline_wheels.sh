#!/usr/bin/env bash
# Wheels to install ssltrain on an offline CUDA machine that already has torch (a CUDA build),
# transformers, accelerate, tokenizers and rich, e.g. a cluster node without registry access.
# Run here (with registry access); copy the folder over; run scripts/offline_install.sh there.
#
#   scripts/offline_wheels.sh [PYTHON_VERSION (3.12)] [OUT (.wheels)]
#
# Downloads hydra-core, omegaconf, datasets and tensorboard with their dependencies for that
# Python on manylinux x86_64, minus numpy (every torch install has it). antlr4-python3-runtime
# 4.9.3, hydra's parser runtime, is published as a source archive only: its wheel is built here.
# The wheels are split into parts of at most 56 MiB (OUT/part1, OUT/part2, ...) for copy tools
# with a size cap; pyarrow alone fills one.
set -euo pipefail
PYVER=${1:-3.12}
OUT=${2:-.wheels}
PY=${PY:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
ABI="cp${PYVER/./}"
ALL="$OUT/all"
rm -rf "$OUT"
mkdir -p "$ALL"
"$PY" -m pip wheel --quiet --no-deps "antlr4-python3-runtime==4.9.3" -w "$ALL"
"$PY" -m pip download --quiet --find-links "$ALL" --only-binary=:all: -d "$ALL" \
    --python-version "$PYVER" --implementation cp --abi "$ABI" --abi abi3 --abi none \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    "hydra-core>=1.3.2" "omegaconf>=2.3" "datasets>=2.19" "tensorboard>=2.14"
rm -f "$ALL"/numpy-*.whl
# Greedy split, largest first, into parts below the cap.
CAP=$((56 * 1024 * 1024))
part=0
declare -a sizes=()
for wheel in $(ls -S "$ALL"/*.whl); do
    size=$(stat -c %s "$wheel")
    placed=""
    for ((i = 1; i <= part; i++)); do
        if (( sizes[i] + size <= CAP )); then placed=$i; break; fi
    done
    if [ -z "$placed" ]; then part=$((part + 1)); placed=$part; sizes[part]=0; mkdir -p "$OUT/part$part"; fi
    mv "$wheel" "$OUT/part$placed/"
    sizes[placed]=$((sizes[placed] + size))
done
rmdir "$ALL"
for ((i = 1; i <= part; i++)); do
    echo "$OUT/part$i: $(ls "$OUT/part$i" | wc -l) wheels, $((sizes[i] / 1024 / 1024)) MB"
done
