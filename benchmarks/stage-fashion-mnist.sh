#!/bin/sh
# Copy the Fashion-MNIST files into data/fashion-mnist/ (git-ignored), so that a machine without
# them (the GPU machine: no network) gets them as a carried path; then pass
# `--data-dir data/fashion-mnist` to benchmarks/gpu_check.py. About 30 MB.
#
#     sh benchmarks/stage-fashion-mnist.sh [SOURCE_DIR]    # default: Debian's package folder
set -eu
src=${1:-/usr/share/datasets/fashion-mnist}
dest="$(cd "$(dirname "$0")/.." && pwd)/data/fashion-mnist"
for f in train-images-idx3-ubyte train-labels-idx1-ubyte t10k-images-idx3-ubyte \
         t10k-labels-idx1-ubyte; do
  if [ ! -f "$src/$f.gz" ]; then
    echo "stage-fashion-mnist: $src/$f.gz not found (apt-get install dataset-fashion-mnist," \
         "or give the folder holding the four .gz files)" >&2
    exit 1
  fi
done
mkdir -p "$dest"
cp "$src"/*-ubyte.gz "$dest"/
echo "staged $(ls "$dest" | wc -l) files, $(du -sh "$dest" | cut -f1), in $dest"
