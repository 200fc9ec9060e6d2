"""Averaged-gradient optimizer wrappers (spec §3): AG-1, AG-2 (and Linear), AG-3 / AG-3-1, and
SAM as the baseline, around any torch optimizer or SOAP."""

from .ag3 import AG3, anchor_index
from .anchors import AnchorStore
from .base import OptimizerWrapper
from .factory import OPTIMIZERS, SOAP, create_optimizer
from .forward_looking import AG1, AG2
from .sam import SAM
from .snapshot import OptimizerSnapshot, dry_run

__all__ = ["AG1", "AG2", "AG3", "SAM", "SOAP", "OptimizerWrapper", "OptimizerSnapshot", "AnchorStore",
           "anchor_index", "create_optimizer", "dry_run", "OPTIMIZERS"]
