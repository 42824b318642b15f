"""implicit-icl: the context of a transformer as an exact weight patch ("learning without training")."""

import importlib

from implicit_icl.errors import ImplicitICLError
from implicit_icl.theory import ImplicitUpdate, LowRankUpdate, rank_one_update
from implicit_icl.toy.block import BlockStates, ContextualBlock

__all__ = [
    "BlockStates",
    "ContextualBlock",
    "ImplicitICLError",
    "ImplicitUpdate",
    "LowRankUpdate",
    "Patch",
    "compile_patch",
    "compute_patch",
    "compute_patches",
    "every_position_patches",
    "load_model",
    "patched_generate",
    "prefix_patches",
    "rank_one_update",
]
__version__ = "0.2.0"

# The Hugging Face engine imports transformers, which takes seconds: load it on first use only.
_LAZY = {
    "Patch": "implicit_icl.hf",
    "compile_patch": "implicit_icl.hf",
    "compute_patch": "implicit_icl.hf",
    "compute_patches": "implicit_icl.hf",
    "every_position_patches": "implicit_icl.hf",
    "load_model": "implicit_icl.hf",
    "patched_generate": "implicit_icl.hf",
    "prefix_patches": "implicit_icl.hf",
}


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'implicit_icl' has no attribute {name!r}")
    return getattr(importlib.import_module(_LAZY[name]), name)
