#!/usr/bin/env bash
# Builds, on the development machine, the kit that a session lent a GPU machine carries to it.
#
# The GPU machine (see benchmarks/README.md, "On a GPU") has JAX with CUDA, optax, chex and
# matplotlib, but no package index: this project's other dependencies travel as wheels, and the
# benchmark batches travel as .npz files (the real QM9 sample and the ASE-built OC20-like slabs,
# which need data and packages that machine lacks). Everything goes to .device-kit/ (git-ignored,
# about 46 MB, inside the 64 MiB a call may carry). Run from the repository root with the project's
# environment active:
#
#     bash benchmarks/device/prepare.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
KIT=.device-kit
PYTHON_VERSION=${PYTHON_VERSION:-3.12}  # the GPU machine's python3
CUDA=${CUDA:-cu13}                      # its JAX plugin is jax-cuda13
mkdir -p "$KIT/wheels" "$KIT/batches"
platforms=()
for tag in manylinux_2_35 manylinux_2_34 manylinux_2_31 manylinux_2_28 manylinux_2_27 manylinux_2_24 \
           manylinux_2_17 manylinux2014; do
    platforms+=(--platform "${tag}_x86_64")
done
python -m pip download --quiet --no-deps --only-binary=:all: --python-version "$PYTHON_VERSION" \
    --implementation cp "${platforms[@]}" --platform any -d "$KIT/wheels" \
    e3nn-jax==0.21.0 dm-haiku==0.0.17 jmp==0.0.4 jraph==0.0.6.dev0 ml-collections==1.1.0 \
    cuequivariance==0.13.0 cuequivariance-jax==0.13.0 \
    "cuequivariance-ops-jax-$CUDA==0.13.0" "cuequivariance-ops-$CUDA==0.13.0"
python benchmarks/inputs.py --save "$KIT/batches" --configs nbody qm9 oc20
du -sh "$KIT"
