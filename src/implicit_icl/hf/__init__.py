"""Hugging Face models: exact implicit patches for the whole stack, from hooks on the unmodified model."""

from implicit_icl.hf.construct import compute_patch, every_position_patches
from implicit_icl.hf.spec import SPECS, FamilySpec, spec_for

__all__ = ["SPECS", "FamilySpec", "compute_patch", "every_position_patches", "spec_for"]
