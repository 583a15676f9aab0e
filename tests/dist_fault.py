"""``fishprune`` under torchrun with a deliberate fault on the last rank (for the tests only):
its copy of the training images differs by one pixel, as a rank reading a corrupt or different
dataset file would. The run must stop with an error naming that rank."""

from __future__ import annotations

import os
import sys

import fishprune.pipeline as pipeline
from fishprune.cli import main

if int(os.environ["RANK"]) == int(os.environ["WORLD_SIZE"]) - 1:
    load = pipeline.load_dataset

    def corrupted(*args, **kwargs):
        ds = load(*args, **kwargs)
        ds.train_x[0, 0, 0, 0] ^= 1
        return ds

    pipeline.load_dataset = corrupted

sys.exit(main(sys.argv[1:]))
