"""The implicit update demonstration by demonstration on a real model, next to two controls (docs/experiments.md §6).

For each of N prompts of K demonstrations, one pass (analyses/dynamics/prefixes.py) gives the exact patch of the prefixes at
the demonstration boundaries — no context, then the first i demonstrations, i = 1..K — for the prompt's query;
each is the patch of that i-shot prompt (its tokens are the K-shot prompt's first tokens: checked). Per shot:
the patched query's probability and rank of the right answer's first token (equal to in-context learning with
i shots, up to float rounding: `max_abs_logit_diff`), and per layer ||ΔW_i||, the increment ||ΔW_i − ΔW_{i−1}||,
the alignment with ΔW_K and the gradient-descent split (analyses/dynamics/series.py).

Do the increments shrink because the model learns the task, or because attention averages over more tokens?
The same measurements on two controls answer it: the same prompts with the demonstrations' answers shuffled
among them (the mapping is gone, the tokens stay), and an untrained model of the same architecture (random
initialisation from the configuration, seeded; nothing learned, the same attention arithmetic). Shrinkage is
the per-prompt ratio last / first increment, summarised as a geometric mean over prompts with a bootstrap 95%
interval, and compared with each control on the same prompts (paired).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from rich.console import Console
from rich.progress import track
from torch import Tensor
from transformers import AutoModelForCausalLM, PreTrainedModel, PreTrainedTokenizerBase

from implicit_icl.analyses.dynamics.prefixes import Trajectory, prefix_patches
from implicit_icl.analyses.dynamics.series import answer_scores, input_side_names, layer_series
from implicit_icl.engine.spec import spec_for
from implicit_icl.errors import ImplicitICLError
from implicit_icl.statistics import N_RESAMPLES, bootstrap
from implicit_icl.tasks import Prompt, encode, with_outputs_deranged
from implicit_icl.theory import LowRankUpdate

CONDITIONS = ("trained", "shuffled answers", "untrained")


# --- prompts and controls --------------------------------------------------------------------------------


def demonstration_boundaries(tokenizer: PreTrainedTokenizerBase, prompt: Prompt) -> list[int]:
    """The context's length in tokens after 0, 1, …, K demonstrations: K + 1 increasing numbers, the last the
    whole context. Each prefix is the i-shot prompt's own context (checked: the tokenizer does not merge
    tokens across a demonstration boundary)."""
    whole = encode(tokenizer, prompt).context_ids
    boundaries = []
    for shots in range(len(prompt.shots) + 1):
        part = encode(tokenizer, Prompt(prompt.shots[:shots], prompt.query)).context_ids
        if part.numel() > whole.numel() or not torch.equal(whole[: part.numel()], part):
            raise ImplicitICLError(
                f"the tokenizer reads the first {shots} demonstrations differently inside the longer prompt, so "
                "its prefixes are not the shorter prompts; use a tokenizer that splits before 'Q:'"
            )
        boundaries.append(part.numel())
    return boundaries


def _computed_for(trajectory: Trajectory, encoded) -> bool:
    """Whether the trajectory's whole-context entry was computed from this prompt's context and query."""
    source = trajectory.patch.sources[-1]
    return (source.context_ids, source.query_ids) == (
        tuple(encoded.context_ids.tolist()),
        tuple(encoded.query_ids.tolist()),
    )


def shuffled_answers(prompt: Prompt, rng: random.Random) -> Prompt:
    """The prompt with its demonstrations' outputs moved so that none keeps its own (`with_outputs_deranged`);
    the query and its right answer stay."""
    return Prompt(tuple(with_outputs_deranged(prompt.shots, rng)), prompt.query)


def untrained_model(model: PreTrainedModel, seed: int) -> PreTrainedModel:
    """A model of the same architecture and dtype with HF's random initialisation (seeded), in eval mode."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        untrained = AutoModelForCausalLM.from_config(
            model.config, attn_implementation="eager", dtype=next(model.parameters()).dtype
        )
    return untrained.to(next(model.parameters()).device).eval()


# --- per-demonstration dynamics of one condition ----------------------------------------------------------


@dataclass(frozen=True)
class ShotDynamics:
    """One condition over N prompts, at the demonstration boundaries i = 0..K (float64; L layers).

    probability, rank: [N, K+1] of the right answer's first token, the patched query after i shots.
    update_norms, alignment: [N, L, K+1]; increment_norms, remainder_norms: [N, L, K] (entry i−1: shot i).
    max_abs_logit_diff: [N], patched vs context-ful, worst over the K + 1 prefixes.
    implicit: for the first prompts (`keep_implicit`), the MLP input side's deltas {name: LowRankUpdate [K+1, ...]}.
    seconds: wall time of the N one-pass computations.
    """

    probability: Tensor
    rank: Tensor
    update_norms: Tensor
    increment_norms: Tensor
    alignment: Tensor
    remainder_norms: Tensor
    max_abs_logit_diff: Tensor
    implicit: list[dict[str, LowRankUpdate]]
    seconds: float


def shot_dynamics(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[Prompt],
    answers: Sequence[int],
    description: str = "",
    dtype: torch.dtype = torch.float64,
    keep_implicit: int = 0,
    first: Trajectory | None = None,
) -> ShotDynamics:
    """Every prompt's patches at its demonstration boundaries, one pass each. answers: the scored token of each
    prompt (the true answer's first token, also for shuffled prompts). keep_implicit: for that many first
    prompts, keep the input side's deltas (float32) for the fine-tuning comparison. first: the first prompt's
    trajectory if it is already computed (at every token prefix, say), read at the boundaries instead."""
    spec = spec_for(model)
    names = [name for layer in range(model.config.num_hidden_layers) for name in input_side_names(model, spec, layer)]
    rows: dict[str, list] = {key: [] for key in ShotDynamics.__dataclass_fields__ if key != "seconds"}
    seconds = 0.0
    progress = track(
        list(zip(prompts, answers, strict=True)),
        description=description or "prompts",
        console=Console(stderr=True),
        transient=True,
    )
    for index, (prompt, answer) in enumerate(progress):
        encoded = encode(tokenizer, prompt)
        boundaries = demonstration_boundaries(tokenizer, prompt)
        if index == 0 and first is not None and _computed_for(first, encoded):
            trajectory = first.at(boundaries)
        else:
            trajectory = prefix_patches(model, encoded.context_ids, encoded.query_ids, boundaries, dtype=dtype)
            seconds += trajectory.seconds
        series = layer_series(model, trajectory)
        probability, rank = answer_scores(trajectory.patched_logits, answer)
        rows["probability"].append(probability)
        rows["rank"].append(rank.double())
        for key in ("update_norms", "increment_norms", "alignment", "remainder_norms"):
            rows[key].append(getattr(series, key))
        rows["max_abs_logit_diff"].append(torch.tensor(trajectory.max_abs_logit_diff, dtype=torch.float64))
        if index < keep_implicit:
            rows["implicit"].append({name: trajectory.patch.deltas[name].to(torch.float32) for name in names})
    stacked = {key: torch.stack(values) for key, values in rows.items() if key != "implicit"}
    return ShotDynamics(**stacked, implicit=rows["implicit"], seconds=seconds)


# --- summaries with intervals ---------------------------------------------------------------------------


def estimate(values: Tensor, seed: int) -> dict:
    """Mean over prompts (dim 0) with a bootstrap 95% interval, per remaining entry: {"mean", "low", "high"}
    as nested lists of the remaining shape."""
    shape = values.shape[1:]
    result = bootstrap(values.double().reshape(values.shape[0], -1), torch.Generator().manual_seed(seed), N_RESAMPLES)
    return {key: getattr(result, key).reshape(shape).tolist() for key in ("mean", "low", "high")}


def geometric(log_values: Tensor, seed: int) -> dict:
    """A geometric mean over prompts: the bootstrap estimate of mean log values, exponentiated."""
    result = estimate(log_values, seed)
    return {key: torch.tensor(value).exp().tolist() for key, value in result.items()}


def shrinkage(increments: Tensor) -> Tensor:
    """log(last / first) per-shot increment [N, L, K] -> [N, L]."""
    return increments[..., -1].log() - increments[..., 0].log()


def stacked_increments(dynamics: ShotDynamics) -> Tensor:
    """The whole MLP input side of every layer as one matrix: sqrt of the sum over layers, [N, K]."""
    return dynamics.increment_norms.pow(2).sum(1).sqrt()


def summarize(results: dict[str, ShotDynamics], seed: int) -> dict:
    """Per condition: answer probability and top-1 share per shot, the median rank, increments per shot (all
    layers stacked) relative to the first, per-layer shrinkage (geometric mean of last / first), alignment
    with ΔW_K, the remainder share of the gradient-descent split; and the paired comparisons with the controls."""
    summary: dict = {"conditions": {}}
    for name, dynamics in results.items():
        stacked = stacked_increments(dynamics)
        remainder_share = (dynamics.remainder_norms / dynamics.increment_norms).mean(-1)  # [N, L]
        summary["conditions"][name] = {
            "answer_probability": estimate(dynamics.probability, seed),
            "top1": estimate((dynamics.rank == 1).double(), seed),
            "median_rank": dynamics.rank.median(0).values.tolist(),
            "relative_increment": geometric(stacked.log() - stacked[:, :1].log(), seed),
            "increment_per_update": estimate(
                (dynamics.increment_norms / dynamics.update_norms[..., 1:]).median(1).values, seed
            ),
            "shrinkage_stacked": geometric(shrinkage(stacked[:, None])[:, 0], seed),
            "shrinkage_per_layer": geometric(shrinkage(dynamics.increment_norms), seed),
            "alignment_with_last": estimate(dynamics.alignment[..., 1:].nanmean(1), seed),
            "remainder_share_per_layer": estimate(remainder_share, seed),
            "max_abs_logit_diff": float(dynamics.max_abs_logit_diff.max()),
            "seconds": dynamics.seconds,
        }
    trained = results.get("trained")
    summary["trained_vs_controls"] = {}
    for name, control in results.items():
        if name == "trained" or trained is None:
            continue
        paired = shrinkage(stacked_increments(trained)[:, None]) - shrinkage(stacked_increments(control)[:, None])
        per_layer = shrinkage(trained.increment_norms) - shrinkage(control.increment_norms)
        summary["trained_vs_controls"][name] = {
            "shrinkage_ratio_stacked": geometric(paired[:, 0], seed),
            "shrinkage_ratio_per_layer": geometric(per_layer, seed),
            "answer_probability_difference": estimate(trained.probability - control.probability, seed),
        }
    return summary


def run_conditions(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[Prompt],
    seed: int,
    untrained: PreTrainedModel | None = None,
    keep_implicit: int = 0,
    first: Trajectory | None = None,
) -> tuple[dict[str, ShotDynamics], list[Prompt]]:
    """The three conditions on the same prompts; returns them and the shuffled prompts. keep_implicit, first
    (the trained model's trajectory of the first prompt): see `shot_dynamics`."""
    rng = random.Random(f"shuffled answers:{seed}")
    shuffled = [shuffled_answers(prompt, rng) for prompt in prompts]
    answers = [encode(tokenizer, prompt).answer_token for prompt in prompts]
    if untrained is None:
        untrained = untrained_model(model, seed)
    results = {
        "trained": shot_dynamics(
            model, tokenizer, prompts, answers, "trained model", keep_implicit=keep_implicit, first=first
        ),
        "shuffled answers": shot_dynamics(
            model, tokenizer, shuffled, answers, "shuffled answers", keep_implicit=keep_implicit
        ),
        "untrained": shot_dynamics(
            untrained, tokenizer, prompts, answers, "untrained model", keep_implicit=keep_implicit
        ),
    }
    return results, shuffled
