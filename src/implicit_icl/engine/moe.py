"""Mixture-of-experts MLPs (Mixtral layout): a router and fused experts, patched exactly (docs/theory.md §4).

The block computes, for its input z, router logits W_r z, picks the top-k experts with weights p_k, and
outputs Σ_k p_k W_down,k act(W_gate,k z) ⊙ (W_up,k z); the experts' matrices are stacked in two
parameters, gate_up [E, 2I, H] (gate rows first) and down [E, H, I] (names and paths: spec.ExpertsSpec).

Input side: the router and the gate_up matrix of every expert the context picked get the rank-1 update
W (z_C − z) z^T/||z||^2 (the same right factor), so the same experts, weights and activations come out.
Output side: each picked expert's down matrix gets (δ / Σ_k p_k) a_k^T/||a_k||^2, which adds δ in total.
Experts the context did not pick get zero factors, so the deltas keep the stacked [E, ...] shape.

Nothing here can be added through an output hook (the router's top-k and the experts' loop sit inside
their forward), so a removed span is handled with the deltas in the weights, in place (for a layer that
accelerate offloads: router and experts re-run with shifted weights); a one-token reduced pass replays
the context-ful router and expert outputs instead (see `replay_outputs`).
"""

from __future__ import annotations

from contextlib import ExitStack

import torch
from torch import Tensor, nn

from implicit_icl.engine.apply import deltas_applied, onloaded
from implicit_icl.engine.spec import ExpertsSpec
from implicit_icl.errors import ImplicitICLError, safe_squared_norm
from implicit_icl.patch import Delta
from implicit_icl.theory import LowRankUpdate


class ExpertsConstruction:
    """The router and experts part of one layer's construction (see the module docstring).

    context: this layer's context-ful states at the N patched tokens ("input" z_C [N, H], the router's
    "logits", "scores" [N, k] and "indices" [N, k], the experts' "output" [N, H]); deltas: the layer's
    delta dict, filled in place; other_tokens: whether the reduced input holds tokens besides the patched
    ones, which must then see the patched block (in place in the weights while it runs)."""

    def __init__(self, layer: nn.Module, index: int, spec: ExpertsSpec, context, deltas, dtype, other_tokens: bool):
        self.spec, self.index = spec, index
        self.router, self.experts = layer.get_submodule(spec.router), layer.get_submodule(spec.module)
        self.block = layer.get_submodule(spec.router.rsplit(".", 1)[0])
        self.layer, self.context, self.deltas = layer, context, deltas
        self.dtype, self.other_tokens = dtype, other_tokens
        self._applied = ExitStack()

    def register(self) -> list:
        return [
            self.block.register_forward_pre_hook(self._input_side),
            self.block.register_forward_hook(lambda module, args, output: self._applied.close()),
        ]

    def replay_outputs(self) -> dict[nn.Module, object]:
        """What router and experts give the patched tokens: their context-ful outputs (rows [N, ...])."""
        context = self.context
        return {
            self.router: (context["logits"], context["scores"], context["indices"]),
            self.experts: context["output"],
        }

    def _input_side(self, module, args) -> None:
        """Before the block runs: the input-side deltas from the reduced input z at the patched token."""
        spec = self.spec
        if f"{spec.router}.weight" in self.deltas:
            return  # a re-run of the layer, with every delta already in the weights
        z = args[0][:, -1].to(self.dtype)
        try:
            squared = safe_squared_norm("the MLP input z without context", z)
        except ImplicitICLError as error:
            raise ImplicitICLError(f"layer {self.index}, {spec.router}: {error}") from None
        difference = self.context["input"].to(self.dtype) - z
        right = z / squared[:, None]
        with onloaded(self.router), onloaded(self.experts):  # offloaded weights live on meta outside forward
            router_weight, gate_up = self.router.weight.to(z), getattr(self.experts, spec.gate_up)
            input_deltas = {
                f"{spec.router}.weight": LowRankUpdate.rank_one(difference @ router_weight.T, right),
                f"{spec.module}.{spec.gate_up}": LowRankUpdate.rank_one(
                    self._picked_products(gate_up, difference), right[:, None].expand(-1, gate_up.shape[0], -1)
                ),
            }
            # a_k of the picked experts [N, E, I], for the output side, while the weights are at hand
            gate, up = self._picked_products(gate_up, self.context["input"].to(self.dtype)).chunk(2, dim=-1)
        self._inner = getattr(self.experts, spec.activation)(gate) * up
        self.deltas.update(input_deltas)
        if self.other_tokens:
            unbatched = {name: delta[0] for name, delta in input_deltas.items()}
            self._applied.enter_context(deltas_applied(self.layer, unbatched))

    def output_side(self, shift: Tensor) -> dict[str, Delta]:
        """ΔW_down,k = (δ / Σ_k p_k) a_k^T/||a_k||^2 for the picked experts; shift δ: [N, H]."""
        picked = self._picked()
        inner = torch.where(picked[..., None], self._inner, torch.ones_like(self._inner))  # unpicked: zero factors
        squared = safe_squared_norm("the inner activation a_k of a picked expert", inner)
        weights = self.context["scores"].to(self.dtype).sum(-1)
        if (weights == 0).any():
            raise ImplicitICLError("the router gave the picked experts zero total weight, so no expert can add δ")
        mask = picked[..., None].to(self.dtype)
        left = (shift / weights[:, None])[:, None] * mask  # [N, E, H]
        down = f"{self.spec.module}.{self.spec.down}"
        return {down: LowRankUpdate.rank_one(left, inner / squared[..., None] * mask)}

    def _picked_products(self, stacked: Tensor, vectors: Tensor) -> Tensor:
        """W_e x_n for the experts e picked at token n, zero for the others, one expert at a time as HF's
        own loop does: stacked W [E, out, in], vectors x [N, in] -> [N, E, out]."""
        picked = self._picked()
        products = vectors.new_zeros(vectors.shape[0], stacked.shape[0], stacked.shape[1])
        for expert in picked.any(0).nonzero().flatten().tolist():
            rows = picked[:, expert]
            products[rows, expert] = vectors[rows] @ stacked[expert].to(vectors).T
        return products

    def _picked(self) -> Tensor:
        """[N, E] mask of the experts the context-ful run picked at each patched token."""
        indices = self.context["indices"]
        n_experts = getattr(self.experts, self.spec.gate_up).shape[0]
        picked = torch.zeros(indices.shape[0], n_experts, dtype=torch.bool, device=indices.device)
        return picked.scatter_(1, indices, True)
