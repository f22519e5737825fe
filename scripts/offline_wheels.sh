#!/usr/bin/env bash
# Wheels to install ssltrain on an offline CUDA machine that already has torch (a CUDA build),
# transformers, accelerate, tokenizers and rich, e.g. a cluster node without registry access.
# Run here (with registry access); copy the folder over; install there.
#
#   scripts/offline_wheels.sh [PYTHON_VERSION (3.12)] [OUT (.wheels)]
#       hydra-core, omegaconf, datasets and tensorboard with their dependencies for that Python on
#       manylinux x86_64, and the setuptools that builds ssltrain (pyproject.toml's build-system),
#       minus numpy (every torch install has it), split into parts of at most
#       56 MiB (OUT/part1, OUT/part2, ...) for copy tools with a size cap; pyarrow alone fills one.
#       Install there with scripts/offline_install.sh.
#
#   scripts/offline_wheels.sh --device [OUT (.wheels/device)]
#       Only what the image of the GPU machine lent to this project lacks (Python 3.12; it has torch,
#       transformers, accelerate, tokenizers, rich, pyarrow, pandas, scikit-learn, tensorboard, ...):
#       hydra-core, omegaconf, antlr4 and datasets with dill and multiprocess, plus the fsspec and
#       pyarrow versions that datasets accepts, all resolved against the image's own versions in
#       scripts/device_image.txt. One folder of ~45 MB, under the device tool's 64 MiB carry limit;
#       scripts/bench_gpu.sh puts it on PYTHONPATH (WHEELS=OUT), the image's torch stays.
#
# antlr4-python3-runtime 4.9.3, hydra's parser runtime, is published as a source archive only:
# its wheel is built here.
set -euo pipefail
PY=${PY:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
DEVICE=""
if [ "${1:-}" = "--device" ]; then
    DEVICE=1
    PYVER=${WHEELS_PYTHON:-3.12}  # another only to try the plumbing on a machine with another Python
    OUT=${2:-.wheels/device}
else
    PYVER=${1:-3.12}
    OUT=${2:-.wheels}
fi
ABI="cp${PYVER/./}"
ALL="$OUT/all"
rm -rf "$OUT"
mkdir -p "$ALL"
"$PY" -m pip wheel --quiet --no-deps "antlr4-python3-runtime==4.9.3" -w "$ALL"

download() {  # download REQUIREMENT... [pip options]: wheels for PYVER on manylinux x86_64 into $ALL
    "$PY" -m pip download --quiet --find-links "$ALL" --only-binary=:all: -d "$ALL" \
        --python-version "$PYVER" --implementation cp --abi "$ABI" --abi abi3 --abi none \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 "$@"
}

if [ -n "$DEVICE" ]; then
    download -c "${CONSTRAINTS:-$(dirname "$0")/device_image.txt}" "hydra-core>=1.3.2" "omegaconf>=2.3" "datasets>=2.19"
    # Keep what the image lacks (and the two that datasets caps: fsspec, pyarrow); drop the rest.
    keep='^(antlr4_python3_runtime|hydra_core|omegaconf|datasets|dill|multiprocess|fsspec|pyarrow)-'
    for wheel in "$ALL"/*.whl; do
        basename "$wheel" | grep -qE "$keep" || rm -f "$wheel"
    done
    mv "$ALL"/*.whl "$OUT/"
    rmdir "$ALL"
    echo "$OUT: $(ls "$OUT" | wc -l) wheels, $(du -sm "$OUT" | cut -f1) MB: $(ls "$OUT" | cut -d- -f1-2 | tr '\n' ' ')"
    exit 0
fi

# setuptools: what pyproject.toml's build-system asks for, to build ssltrain there without the registry.
download "hydra-core>=1.3.2" "omegaconf>=2.3" "datasets>=2.19" "tensorboard>=2.14" "setuptools>=77"
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
