"""implicit-icl: the context of a transformer as an exact weight patch ("learning without training")."""

from implicit_icl.block import BlockStates, ContextualBlock
from implicit_icl.errors import ImplicitICLError
from implicit_icl.theory import ImplicitUpdate, RankOneUpdate, rank_one_update

__all__ = ["BlockStates", "ContextualBlock", "ImplicitICLError", "ImplicitUpdate", "RankOneUpdate", "rank_one_update"]
__version__ = "0.1.0"
