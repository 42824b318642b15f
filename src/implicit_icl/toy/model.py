"""The toy transformer of [D] §4: causal self-attention followed by an MLP, on [x ; y] tokens.

Every block maps tokens [..., T, d+1] -> [..., T, d+1] and is a library `ContextualBlock`:

    no skip (the paper's block):  y = MLP(A(s)),              A: d+1 -> attention_width
    skip:                          y = r + MLP(norm(r)), r = s + A(norm(s)),   A: d+1 -> d+1

with norm a LayerNorm when pre_norm is set, else the identity. The prediction is the last coordinate of
the last block's output at the query position.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import Tensor, nn

from implicit_icl.errors import ImplicitICLError
from implicit_icl.theory import ImplicitUpdate
from implicit_icl.toy.attention import CausalSelfAttention
from implicit_icl.toy.block import ContextualBlock


@dataclass(frozen=True)
class ToyConfig:
    """Shape of the regression world and of the model that learns it."""

    dim: int = 2  # d
    context_length: int = 50  # N, the most examples a prompt holds
    noise: float = 0.0  # label noise σ
    n_blocks: int = 1
    n_heads: int = 4
    attention_width: int = 32  # heads × head size; also the width W reads in the no-skip block
    mlp_width: int = 128
    mlp_skip: bool = False
    pre_norm: bool = False

    def __post_init__(self) -> None:
        for name in ("dim", "context_length", "n_blocks", "n_heads", "attention_width", "mlp_width"):
            if getattr(self, name) < 1:
                raise ImplicitICLError(f"ToyConfig.{name} must be ≥ 1, got {getattr(self, name)}")
        if self.attention_width % self.n_heads:
            raise ImplicitICLError(
                f"attention_width {self.attention_width} is not a multiple of n_heads {self.n_heads}; pick one that is"
            )

    def to_dict(self) -> dict:
        return asdict(self)


def _block(config: ToyConfig) -> ContextualBlock:
    token = config.dim + 1
    head_dim = config.attention_width // config.n_heads
    reads = token if config.mlp_skip else config.attention_width
    attention = CausalSelfAttention(token, reads, config.n_heads, head_dim)
    norm = nn.LayerNorm(reads) if config.pre_norm else None
    contextual = nn.Sequential(nn.LayerNorm(token), attention) if config.pre_norm else attention
    mlp = nn.Sequential(nn.Linear(reads, config.mlp_width), nn.GELU(), nn.Linear(config.mlp_width, token))
    return ContextualBlock(contextual, mlp, skip=config.mlp_skip, mlp_reads="residual", norm=norm)


class ToyTransformer(nn.Module):
    """A stack of contextual blocks on prompt tokens: [..., T, d+1] -> predictions [..., T]."""

    def __init__(self, config: ToyConfig) -> None:
        super().__init__()
        self.config = config
        self.blocks = nn.ModuleList(_block(config) for _ in range(config.n_blocks))

    def forward(self, tokens: Tensor, updates: list[ImplicitUpdate] | None = None) -> Tensor:
        """Predictions at every position, with each block's implicit update applied if given."""
        hidden = tokens
        for index, block in enumerate(self.blocks):
            hidden = block(hidden, updates[index] if updates else None)
        return hidden[..., -1]

    def predict(self, tokens: Tensor) -> Tensor:
        """The prediction for the query, the last token: [B, T, d+1] -> [B]."""
        return self(tokens)[..., -1]

    def implicit_updates(self, tokens: Tensor) -> list[ImplicitUpdate]:
        """One update per block that lets the query token alone reproduce the prediction with its context.

        tokens: [B, T, d+1] (T ≥ 2), the query last. Chained as in docs/theory.md §5: once blocks < l are patched,
        the lone query enters block l with its context-ful state, so block l's update is that of its own
        context-ful input sequence. Factors: [B, ·] per block.
        """
        updates, hidden = [], tokens
        for block in self.blocks:
            updates.append(block.update_for_last_tokens(hidden))
            hidden = block(hidden)
        return updates

    def predict_patched(self, query_tokens: Tensor, updates: list[ImplicitUpdate]) -> Tensor:
        """T_{W+ΔW}(x): the query alone, [B, d+1], through the patched blocks -> [B]."""
        return self(query_tokens[:, None], updates)[:, -1]

    def first_block(self) -> ContextualBlock:
        """The block whose update the token-by-token dynamics study: only defined for one-block models."""
        if len(self.blocks) != 1:
            raise ImplicitICLError(
                f"the token-by-token dynamics need a one-block model, this one has {len(self.blocks)}; "
                "use n_blocks=1 for experiments (b)-(d)"
            )
        return self.blocks[0]


def build_model(config: ToyConfig, seed: int) -> ToyTransformer:
    """A freshly initialised model, the same for the same seed; the global RNG is left as it was."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return ToyTransformer(config)
