"""Hugging Face models: exact implicit patches for the whole stack, from hooks on the unmodified model."""

from implicit_icl.hf.apply import Patch
from implicit_icl.hf.compile import CompileSettings, compile_patch
from implicit_icl.hf.construct import compute_patch, compute_patches, every_position_patches
from implicit_icl.hf.dynamics import Trajectory, prefix_patches
from implicit_icl.hf.generate import Generation, patched_generate
from implicit_icl.hf.load import LoadedModel, load_model
from implicit_icl.hf.spec import SPECS, FamilySpec, spec_for
from implicit_icl.hf.verify import Verification, verify_every_position, verify_patch

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
