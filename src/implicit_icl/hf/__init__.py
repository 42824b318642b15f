"""Hugging Face models: exact implicit patches for the whole stack, from hooks on the unmodified model."""

from implicit_icl.analyses.compile import CompileSettings, compile_patch
from implicit_icl.analyses.dynamics.prefixes import Trajectory, prefix_patches
from implicit_icl.engine.apply import Patch
from implicit_icl.engine.construct import compute_patch, compute_patches, every_position_patches
from implicit_icl.engine.generate import Generation, patched_generate
from implicit_icl.engine.spec import SPECS, FamilySpec, spec_for
from implicit_icl.engine.verify import Verification, verify_every_position, verify_patch
from implicit_icl.models.load import LoadedModel, load_model

__all__ = [
    "SPECS",
    "CompileSettings",
    "FamilySpec",
    "Generation",
    "LoadedModel",
    "Patch",
    "Trajectory",
    "Verification",
    "compile_patch",
    "compute_patch",
    "compute_patches",
    "every_position_patches",
    "load_model",
    "patched_generate",
    "prefix_patches",
    "spec_for",
    "verify_every_position",
    "verify_patch",
]
