"""fishprune: one-shot pruning at initialization, with Fisher-Taylor Sensitivity at its centre.

>>> import fishprune as fp
>>> masks = fp.prune(model, "fts", 0.98, batches)      # doctest: +SKIP
"""

from fishprune._version import __version__
from fishprune.criteria import criteria, register, register_criterion
from fishprune.exporting import export, load_pruned
from fishprune.hvp import ScoreInfo
from fishprune.masking import Masker, apply_masks
from fishprune.params import PrunableReport, prunable_parameters, prunable_report
from fishprune.schedule import prune
from fishprune.scoring import LayerCollapseWarning, score
from fishprune.selection import density_of, layer_densities, select

__all__ = [
    "LayerCollapseWarning",
    "Masker",
    "PrunableReport",
    "ScoreInfo",
    "__version__",
    "apply_masks",
    "criteria",
    "density_of",
    "export",
    "layer_densities",
    "load_pruned",
    "prunable_parameters",
    "prunable_report",
    "prune",
    "register",
    "register_criterion",
    "score",
    "select",
]
