"""What a trajectory of prefix patches says, layer by layer (docs/theory.md §6), from the factors, never dense.

A layer's MLP input side — the matrices that read the MLP input z (gate and up, a fused gate_up, c_fc; a
router and the experts' gate_up) — is taken as one stacked matrix: the squared norms and inner products of
its matrices add up. For every prefix entry j of a `Trajectory`:

- update norm ||ΔW_j||_F, and the output side's change (rank-1 down, bias or norm scale) as a norm too;
- increment ||ΔW_{j+1} − ΔW_j||_F: above the first layer the query's reduced input z_j (the right factor's
  direction) moves with the prefix, so the difference has rank 2, its norm taken from differences of the
  factors, free of cancellation;
- alignment with the last entry's update, <ΔW_j, ΔW_last>_F / (||ΔW_j|| ||ΔW_last||);
- the gradient-descent view: the learning rate h_j = 1/||z_j||², and each increment split into the §6 step
  −h_{j+1} ∇L_j and the remainder that the moving reference adds, W_0 A_j read from the trajectory's recorded
  outputs: where z does not move (the first layer under relative positions) the remainder is zero and §6
  holds as it is.
Each input-side matrix's series comes from dot products of its own factors (`theory.rank_one_series`), and
the layer's are their sums.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import Tensor
from transformers import PreTrainedModel
from transformers.pytorch_utils import Conv1D

from implicit_icl.analyses.dynamics.prefixes import Trajectory
from implicit_icl.engine.apply import onloaded, owner
from implicit_icl.engine.spec import FamilySpec, layers_path, spec_for
from implicit_icl.patch import Delta, layer_index
from implicit_icl.theory import (
    LowRankUpdate,
    RankOneSeries,
    apply_factorised,
    factorised_updates,
    gradient_descent_errors,
    rank_one_series,
    rank_one_update,
)

F64 = torch.float64
SERIES_KEYS = ("updates", "with_last", "increments", "steps", "remainders", "learning_rates")
ROUNDING_FACTOR = 100  # an update under 100 eps ||W||_F (eps of the model's dtype) is rounding, not a direction


@dataclass(frozen=True)
class LayerSeries:
    """Per layer (rows, L) and prefix entry (columns, P), float64 (see the module docstring).

    update_norms, output_norms, learning_rates, alignment: [L, P] (alignment NaN without context, and where
    ||ΔW_j|| or ||ΔW_last|| is under 100 eps ||W||_F: a patch that is zero up to rounding has no direction).
    increment_norms, gradient_step_norms, remainder_norms: [L, P−1], entry j for the step j → j+1
    (the last two NaN for mixtures of experts, whose expert matrices see only the picked experts).
    reference_spread: [L] max_j ||z_j − z_0|| / ||z_0||, how far the query's reduced MLP input moves.
    """

    update_norms: Tensor
    increment_norms: Tensor
    alignment: Tensor
    output_norms: Tensor
    learning_rates: Tensor
    gradient_step_norms: Tensor
    remainder_norms: Tensor
    reference_spread: Tensor

    def as_dict(self) -> dict[str, list]:
        return {name: value.tolist() for name, value in asdict(self).items()}


def input_side_names(model: PreTrainedModel, spec: FamilySpec, layer: int) -> list[str]:
    """Parameter names of layer `layer`'s MLP input side (the matrices that read z)."""
    prefix = f"{layers_path(model, spec)}.{layer}"
    if spec.experts is not None:
        return [f"{prefix}.{spec.experts.router}.weight", f"{prefix}.{spec.experts.module}.{spec.experts.gate_up}"]
    return [f"{prefix}.{path}.weight" for path in spec.mlp_inputs]


def layer_series(model: PreTrainedModel, trajectory: Trajectory) -> LayerSeries:
    """Every layer's series; the trajectory needs at least two prefix entries.

    They are computed in the patch's own precision (at least float32) and returned in float64: float64
    arithmetic on float32 factors would move them by at most ~1e-6 relative, the factors' own rounding, at
    about 1.4× the cost."""
    spec = spec_for(model)
    deltas = trajectory.patch.deltas
    working = torch.promote_types(trajectory.patch.dtype, torch.float32)
    rows: dict[str, list[Tensor]] = {key: [] for key in LayerSeries.__dataclass_fields__}
    # Without context the patch is rounding noise, and so would be its direction.
    no_context_nan = torch.tensor([torch.nan if p == 0 else 1.0 for p in trajectory.prefix_lengths], dtype=working)
    dtype = next(model.parameters()).dtype
    for layer in range(model.config.num_hidden_layers):
        names = input_side_names(model, spec, layer)
        summed = _input_side_series(spec, names, deltas, trajectory.input_side_outputs, working)
        norms = summed["updates"].sqrt()
        # A layer whose MLP input does not see the context (a parallel block's first layer) has a zero patch,
        # up to rounding of size ~eps ||W||: the direction of that rounding is no alignment.
        weight_norm = sum(matrix(model, name, dtype=None).norm().to(working) ** 2 for name in names).sqrt()
        noise = ROUNDING_FACTOR * torch.finfo(dtype).eps * weight_norm
        product = torch.where(norms > noise, norms, torch.nan) * norms[-1]
        rows["update_norms"].append(norms)
        rows["alignment"].append(summed["with_last"] / product * no_context_nan.to(norms.device))
        rows["increment_norms"].append(summed["increments"].sqrt())
        outputs = [
            delta.to(working) for name, delta in deltas.items() if layer_index(name) == layer and name not in names
        ]
        rows["output_norms"].append(sum(_squared_norms(delta) for delta in outputs).sqrt())
        reference = _references(deltas[names[0]].to(working))
        rows["learning_rates"].append(summed["learning_rates"])
        rows["reference_spread"].append(((reference - reference[:1]).norm(dim=-1) / reference[0].norm()).max())
        rows["gradient_step_norms"].append(summed["steps"].sqrt())
        rows["remainder_norms"].append(summed["remainders"].sqrt())
    # A dispatched model spreads its layers over devices: the series gather on the first layer's.
    return LayerSeries(
        **{key: torch.stack([v.to(values[0].device) for v in values]).to(F64) for key, values in rows.items()}
    )


def _input_side_series(
    spec: FamilySpec, names: list[str], deltas: dict[str, Delta], outputs: dict[str, Tensor], working: torch.dtype
) -> dict[str, Tensor]:
    """One layer's input-side series, summed over its matrices: [P] or [P−1] per key of `RankOneSeries`
    (learning_rates: h_j = ||v_j||², the first matrix's)."""
    if spec.experts is None:
        series = [rank_one_series(deltas[name].to(working), outputs=outputs[name]) for name in names]
    else:  # stacked experts first, the trajectory last, without the gradient split: experts see only their rows
        series = [rank_one_series(_entries_last(deltas[name].to(working))) for name in names]
    summed = {key: _stacked(series, key) for key in SERIES_KEYS if key != "learning_rates"}
    return summed | {"learning_rates": series[0].learning_rates.reshape(-1, summed["updates"].numel())[0]}


def _stacked(series: list[RankOneSeries], key: str) -> Tensor:
    """[P] or [P−1]: a squared series summed over the stacked matrices and blocks (experts); NaN where a
    matrix has none (experts' gradient split)."""
    values = [getattr(one, key) for one in series]
    if any(value is None for value in values):
        count = series[0].increments.shape[-1]
        return torch.full((count,), torch.nan, dtype=series[0].increments.dtype, device=series[0].increments.device)
    return sum(value.reshape(-1, value.shape[-1]).sum(0) for value in values)


def _f64(delta: Delta) -> Delta:
    return delta.to(F64)


def _entries_last(delta: LowRankUpdate) -> LowRankUpdate:
    """Batch [P, E...] -> [E..., P]: the trajectory as the last batch dimension (stacked experts first)."""
    return LowRankUpdate(delta.U.movedim(0, -3), delta.V.movedim(0, -3))


def _per_entry(values: Tensor) -> Tensor:
    """[P, E...] -> [P]: the blocks of a stacked matrix (experts) add up."""
    return values.reshape(values.shape[0], -1).sum(-1)


def _squared_norms(delta: Delta) -> Tensor:
    """||ΔW_j||² [P] of an output-side delta; a rank-1 one as two dot products (a width-1 matmul is slower)."""
    if isinstance(delta, LowRankUpdate) and delta.rank == 1:
        return _per_entry(delta.U.pow(2).sum((-2, -1)) * delta.V.pow(2).sum((-2, -1)))
    if isinstance(delta, LowRankUpdate):
        return _per_entry(delta.inner(delta))
    return _per_entry(delta.pow(2))


def _references(delta: LowRankUpdate) -> Tensor:
    """The query's reduced MLP input z_j [P, in] from a rank-1 right factor v_j = z_j / ||z_j||²
    (stacked experts share it: the first block's)."""
    v = delta.V[..., 0].reshape(delta.V.shape[0], -1, delta.V.shape[-2])[:, 0]
    return v / v.pow(2).sum(-1, keepdim=True)


def matrix(model: PreTrainedModel, name: str, dtype: torch.dtype | None = F64) -> Tensor:
    """The parameter `name` as [out, in] (GPT-2's Conv1D stores it transposed; fused experts [E, out, in]), in
    `dtype` (None: as stored)."""
    module, attribute = owner(model, name)
    with onloaded(module):
        weight = getattr(module, attribute).detach()
    weight = weight if dtype is None else weight.to(dtype)
    return weight.T if isinstance(module, Conv1D) else weight


# --- scores and the checks of §6 on real activations -------------------------------------------------------


def answer_scores(logits: Tensor, token: int) -> tuple[Tensor, Tensor]:
    """Probability [P] (softmax in float64) and rank [P] (1 = the argmax) of `token` in logits [P, V]."""
    logits = logits.to(F64)
    probability = logits.softmax(-1)[:, token]
    rank = (logits > logits[:, token : token + 1]).sum(-1) + 1
    return probability, rank


def spread_indices(count: int, most: int) -> list[int]:
    """At most `most` indices of 1..count−1, evenly spread, the last included (entry 0 is the reference)."""
    if count - 1 <= most:
        return list(range(1, count))
    return sorted({round(1 + i * (count - 2) / (most - 1)) for i in range(most)})


def gradient_descent_check(
    model: PreTrainedModel, trajectory: Trajectory, shared_tolerance: float | None = None, most: int = 16
) -> list[dict]:
    """Per layer, on the real activations of the first MLP input matrix W_0 (docs/theory.md §6):

    - patch_vs_theory: max relative difference between the hooks' factors (u_j, v_j) and the theory's
      rank_one_update(W_0, A_j, z_j) on the recorded MLP inputs: the patch is the §6 update in every layer;
    - shared_reference: whether the query's reduced input z_j stays put over the prefixes (relative spread
      under shared_tolerance: 1e-10 for float64 models, 1e-5 otherwise), and where it does,
      gd_identity_max_error: the largest error of W_{j+1} = W_j − h ∇L_j(W_j) with the gradient taken by
      autograd (`theory.gradient_descent_errors`, dense, on at most `most` prefixes), relative to max |W_0|.
    Mixtures of experts are skipped (their experts see only the picked experts' rows).
    """
    spec = spec_for(model)
    if spec.experts is not None:
        return []
    if shared_tolerance is None:
        shared_tolerance = 1e-10 if next(model.parameters()).dtype == F64 else 1e-5
    checks = []
    chosen = [0, *spread_indices(len(trajectory.prefix_lengths), most)]
    for layer in range(model.config.num_hidden_layers):
        name = input_side_names(model, spec, layer)[0]
        weight, delta = matrix(model, name), _f64(trajectory.patch.deltas[name])
        context = trajectory.mlp_inputs[layer].to(F64)
        reference = _references(delta)
        theory = rank_one_update(weight, context, reference)
        patch_vs_theory = max(_relative(delta.U, theory.U), _relative(delta.V, theory.V))
        spread = float(((reference - reference[:1]).norm(dim=-1) / reference[0].norm()).max())
        shared = spread <= shared_tolerance
        error = None
        if shared:
            errors = gradient_descent_errors(weight, context[chosen[1:]], reference[0])
            error = float(errors.max() / weight.abs().max())
        checks.append(
            dict(
                layer=layer,
                matrix=name,
                patch_vs_theory=patch_vs_theory,
                reference_spread=spread,
                shared_reference=shared,
                gd_identity_max_error=error,
            )
        )
    return checks


def factorised_check(model: PreTrainedModel, trajectory: Trajectory, layers: list[int] | None = None) -> list[dict]:
    """The factorised form of docs/theory.md §6 per layer, over the trajectory's prefixes, with the last
    entry's reference a = z_last: W̃ = W_0 (I + u_1 v_1^T) … (I + u_m v_m^T), factor k mapping A_{k−1} to A_k
    (A_0 = a, A_k the MLP input with the k-th prefix), so W̃ a = W_0 A_last like the additive W_0 + ΔW_last.

    Entries without context (prefix 0) are left out. Per layer (the stacked input side): max_relative_error of W̃ a against W_0 A_last, the norms of W̃ − W_0
    (dense, rank up to m) and of ΔW_last, and their cosine. Dense [in, in] products: meant for a few layers."""
    spec = spec_for(model)
    if spec.experts is not None:
        return []
    results = []
    for layer in range(model.config.num_hidden_layers) if layers is None else layers:
        names = input_side_names(model, spec, layer)
        weight = torch.cat([matrix(model, name) for name in names])
        additive = torch.cat([_f64(trajectory.patch.deltas[name])[-1].dense() for name in names])
        with_context = torch.tensor(trajectory.prefix_lengths) > 0
        context = trajectory.mlp_inputs[layer].to(F64)[with_context]
        reference = _references(_f64(trajectory.patch.deltas[names[0]]))[-1]
        factors = factorised_updates(context.flip(0), reference)
        produced = apply_factorised(weight, factors, reference)
        identity = torch.eye(weight.shape[1], dtype=F64, device=weight.device)
        change = apply_factorised(weight, factors, identity).T - weight
        results.append(
            dict(
                layer=layer,
                max_relative_error=_relative(produced, weight @ context[-1]),
                factorised_norm=float(change.norm()),
                additive_norm=float(additive.norm()),
                cosine=float((change * additive).sum() / (change.norm() * additive.norm())),
            )
        )
    return results


def _relative(a: Tensor, b: Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(torch.finfo(F64).tiny))
