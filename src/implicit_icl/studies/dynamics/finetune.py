"""Explicit fine-tuning next to the implicit trajectory on a real model (docs/experiments.md §6, after Dai et al.).

Online SGD on the MLP input matrices (gate and up, of every layer or of chosen ones), one step per
demonstration in prompt order; each demonstration is fed without context as its query text "Q: x\\nA:" with the
first token of " y" as the target of the next-token cross-entropy. One step changes a linear layer by
−η Σ_t g_t z_t^T over the input's positions t (g: the loss gradient at the layer's output, z: its input), so
after i steps the update D_i stays factored, of rank at most the tokens seen. The model's weights are never
touched: D acts through forward hooks, batched (row b of a batch is one prompt with its own D and step size).

After each step i: per layer, the alignment <ΔW_i, D_i>_F / (||ΔW_i|| ||D_i||) with the implicit update of the
same prompt after i demonstrations (for its query; the layer's matrices stacked, from the factors:
<u v^T, U V^T>_F = (u^T U)·(v^T V)); the fine-tuned model's probability of the query's answer; and its
first-token accuracy on held-out queries of the task, next to in-context learning with the same i
demonstrations on those queries (what the exact patch of each query reproduces).

Step-size rule (`choose_step_size`): the η of a grid with the highest mean log-probability of the right answer
on the held-out queries, averaged over steps 1..K, on separate prompts (another seed); each model picks its own.
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from rich.console import Console
from rich.progress import track
from torch import Tensor, nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase
from transformers.pytorch_utils import Conv1D

from implicit_icl.analyses.dynamics.prefixes import last_position_logits, prefix_logits
from implicit_icl.engine.apply import parameter_shape
from implicit_icl.engine.capture import hidden_argument, hooked, with_hidden_argument
from implicit_icl.engine.forward import ForwardInputs, model_device
from implicit_icl.engine.spec import layers_of, layers_path, spec_for
from implicit_icl.errors import ImplicitICLError
from implicit_icl.patch import layer_index
from implicit_icl.studies.dynamics.study import demonstration_boundaries
from implicit_icl.tasks import Example, Prompt, Task, encode
from implicit_icl.tasks.encoding import token_ids
from implicit_icl.theory import LowRankUpdate

STEP_SIZES = (1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1)
F64 = torch.float64


def trained_matrices(model: PreTrainedModel, layers: Sequence[int] | None = None) -> list[str]:
    """Parameter names of the MLP input matrices fine-tuning changes (every layer unless `layers`)."""
    spec = spec_for(model)
    if spec.experts is not None:
        raise ImplicitICLError(
            "the fine-tuning comparison needs dense MLP input matrices; mixtures of experts have none"
        )
    count = model.config.num_hidden_layers
    layers = range(count) if layers is None else layers
    if any(not 0 <= layer < count for layer in layers):
        raise ImplicitICLError(f"fine-tuned layers must lie in 0..{count - 1}, got {list(layers)}")
    prefix = layers_path(model, spec)
    return [f"{prefix}.{layer}.{path}.weight" for layer in layers for path in spec.mlp_inputs]


class FactoredSGD:
    """Batched low-rank updates D_b = U_b V_b^T on nn.Linear matrices, applied through hooks (see the module
    docstring). U: [B, out, r], V: [B, in, r] per matrix; r grows by the tokens of each step."""

    def __init__(self, model: PreTrainedModel, names: list[str], rows: int) -> None:
        self.model, self.names, self.rows = model, names, rows
        # float32 factors unless the model computes in float64 (then the tests can check to float64 precision)
        self.dtype = torch.float64 if next(model.parameters()).dtype == torch.float64 else torch.float32
        self.modules: dict[str, nn.Module] = {}
        self.U: dict[str, Tensor] = {}
        self.V: dict[str, Tensor] = {}
        for name in names:
            module = model.get_submodule(name.rsplit(".", 1)[0])
            if not isinstance(module, nn.Linear | Conv1D):
                raise ImplicitICLError(f"{name} is not a linear layer's weight; fine-tuning hooks need one")
            out, inp = parameter_shape(model, name)  # nn.Linear orientation, also for GPT-2's Conv1D
            self.modules[name] = module
            self.U[name] = module.weight.new_zeros(rows, out, 0, dtype=self.dtype)
            self.V[name] = module.weight.new_zeros(rows, inp, 0, dtype=self.dtype)
        self._inputs: dict[str, Tensor] = {}
        self._outputs: dict[str, Tensor] = {}

    def delta(self, name: str) -> LowRankUpdate:
        return LowRankUpdate(self.U[name], self.V[name])

    @contextmanager
    def applied(self, record: bool = False) -> Iterator[None]:
        """Each module outputs W x + D_b x for the sequences of row b (any number of consecutive sequences per row).
        record: keep every module's input and output (for `step`) and let gradients flow from the first layer."""

        def hook_for(name: str):
            def hook(module, args, output):
                x = args[0]
                rows = x.reshape(self.rows, -1, x.shape[-1])  # [B, group·T, in]
                output = output + self.delta(name).apply(rows.to(self.dtype)).reshape(output.shape).to(output)
                if record:
                    self._inputs[name], self._outputs[name] = x.detach(), output
                return output

            return hook

        def differentiable(module, args, kwargs):
            hidden = hidden_argument(args, kwargs)
            return with_hidden_argument(args, kwargs, hidden.detach().requires_grad_(True))

        handles = [self.modules[name].register_forward_hook(hook_for(name)) for name in self.names]
        if record:
            first = layers_of(self.model, spec_for(self.model))[0]
            handles.append(first.register_forward_pre_hook(differentiable, with_kwargs=True))
        with hooked(handles):
            yield

    def step(self, loss: Tensor, step_sizes: Tensor) -> None:
        """One SGD step per row: D_b ← D_b − η_b Σ_t g_{b,t} z_{b,t}^T, from the outputs recorded by `applied`."""
        outputs = [self._outputs[name] for name in self.names]
        gradients = torch.autograd.grad(loss, outputs)
        eta = step_sizes.to(self.dtype)[:, None, None]
        for name, gradient in zip(self.names, gradients, strict=True):
            g, z = gradient.to(self.dtype), self._inputs[name].to(self.dtype)  # [B, T, out], [B, T, in]
            self.U[name] = torch.cat([self.U[name], -eta * g.transpose(1, 2)], -1)
            self.V[name] = torch.cat([self.V[name], z.transpose(1, 2)], -1)
        self._inputs.clear()
        self._outputs.clear()


# --- held-out queries and scoring ------------------------------------------------------------------------


def held_out_examples(task: Task, prompt: Prompt, count: int, rng: random.Random, seed: int) -> list[Example]:
    """`count` examples of the task that are neither the prompt's query nor among its demonstrations; for a
    recall task (its answers exist only in the prompt) the prompt's other demonstrations instead."""
    if task.query_in_context:
        pool = [shot for shot in prompt.shots if shot.input != prompt.query.input]
    else:
        seen = {shot.input for shot in prompt.shots} | {prompt.query.input}
        pool = [example for example in task.pool(seed) if example.input not in seen]
    return rng.sample(pool, min(count, len(pool)))


def _queries(tokenizer: PreTrainedTokenizerBase, examples: Sequence[Example]) -> tuple[list[Tensor], Tensor]:
    """Query ids "Q: x\\nA:" and the answers' first tokens."""
    queries = [torch.tensor(token_ids(tokenizer, Prompt((), ex).query_text)) for ex in examples]
    answers = torch.tensor([token_ids(tokenizer, Prompt((), ex).answer_text)[0] for ex in examples])
    return queries, answers


def _answer_scores(model, inputs: ForwardInputs, answers: Tensor) -> tuple[Tensor, Tensor]:
    """Log-probability and top-1 correctness of each sequence's answer token at its last position."""
    logits = last_position_logits(model, inputs.to(model_device(model))).to(F64)
    answers = answers.to(logits.device)
    log_probability = logits.log_softmax(-1).gather(-1, answers[:, None])[:, 0]
    return log_probability.cpu(), (logits.argmax(-1) == answers).cpu()


# --- the online SGD run ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class FineTuning:
    """Online SGD over K demonstrations for B prompts (rows), measured after each step i = 0..K (0: none).

    alignment: [B, L, K] per fine-tuned layer, cosine of D_i with the implicit ΔW_i (None without implicit).
    query_log_probability: [B, K+1] of the prompt's query answer; heldout_log_probability, heldout_correct:
    [B, K+1, M] on the held-out queries. layers: the fine-tuned layers; step_sizes: [B].
    """

    alignment: Tensor | None
    query_log_probability: Tensor
    heldout_log_probability: Tensor
    heldout_correct: Tensor
    layers: list[int]
    step_sizes: Tensor


def online_sgd(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[Prompt],
    held_out: Sequence[Sequence[Example]],
    step_sizes: Tensor,
    layers: Sequence[int] | None = None,
    implicit: Sequence[dict[str, LowRankUpdate]] | None = None,
    description: str = "fine-tuning",
) -> FineTuning:
    """Fine-tune every prompt's own copy of the MLP input matrices on its demonstrations (see the module
    docstring); rows are prompts, all K of them with the same number of demonstrations and held-out queries."""
    if len({len(p.shots) for p in prompts}) != 1 or len({len(h) for h in held_out}) != 1:
        raise ImplicitICLError("every prompt of one fine-tuning batch needs the same shots and held-out count")
    names = trained_matrices(model, layers)
    layer_of = [layer_index(name) for name in names]
    fine_tuned = sorted(set(layer_of))
    sgd = FactoredSGD(model, names, len(prompts))
    evaluated = [[p.query, *examples] for p, examples in zip(prompts, held_out, strict=True)]
    group = len(evaluated[0])
    queries, answers = _queries(tokenizer, [example for row in evaluated for example in row])
    evaluation = ForwardInputs.padded(queries)
    shots = len(prompts[0].shots)
    log_probabilities, correct, alignments = [], [], []

    def evaluate() -> None:
        with torch.no_grad(), sgd.applied():
            log_probability, right = _answer_scores(model, evaluation, answers)
        log_probabilities.append(log_probability.reshape(len(prompts), group))
        correct.append(right.reshape(len(prompts), group))

    evaluate()
    for step in track(range(shots), description=description, console=Console(stderr=True), transient=True):
        examples = [p.shots[step] for p in prompts]
        inputs, targets = _queries(tokenizer, examples)
        with torch.enable_grad(), sgd.applied(record=True):
            logits = last_position_logits(model, ForwardInputs.padded(inputs).to(model_device(model)))
            loss = nn.functional.cross_entropy(logits.float(), targets.to(logits.device), reduction="sum")
            sgd.step(loss, step_sizes)
        evaluate()
        if implicit is not None:
            alignments.append(_alignment(sgd, names, layer_of, fine_tuned, implicit, step + 1))
    log_probability, right = torch.stack(log_probabilities, 1), torch.stack(correct, 1)
    return FineTuning(
        alignment=torch.stack(alignments, -1) if implicit is not None else None,
        query_log_probability=log_probability[..., 0],
        heldout_log_probability=log_probability[..., 1:],
        heldout_correct=right[..., 1:],
        layers=fine_tuned,
        step_sizes=step_sizes,
    )


def _alignment(sgd: FactoredSGD, names, layer_of, layers, implicit, shots: int) -> Tensor:
    """[B, len(layers)] cosine of the stacked D with the stacked implicit ΔW after `shots` demonstrations."""
    inner = torch.zeros(sgd.rows, len(layers), dtype=F64)
    implicit_squared, explicit_squared = torch.zeros_like(inner), torch.zeros_like(inner)
    for name, layer in zip(names, layer_of, strict=True):
        column = layers.index(layer)
        U, V = sgd.U[name].to(F64), sgd.V[name].to(F64)
        u = torch.stack([deltas[name].U[shots, :, 0] for deltas in implicit]).to(F64)  # [B, out]
        v = torch.stack([deltas[name].V[shots, :, 0] for deltas in implicit]).to(F64)
        inner[:, column] += ((u[:, None] @ U)[:, 0] * (v[:, None] @ V)[:, 0]).sum(-1)
        implicit_squared[:, column] += u.pow(2).sum(-1) * v.pow(2).sum(-1)
        explicit_squared[:, column] += ((U.transpose(1, 2) @ U) * (V.transpose(1, 2) @ V)).sum((-1, -2))
    return inner / (implicit_squared * explicit_squared).sqrt()


def icl_heldout(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prompts: Sequence[Prompt], held_out
) -> tuple[Tensor, Tensor]:
    """In-context learning on the held-out queries with the first i demonstrations of each prompt, i = 0..K:
    log-probability and correctness [B, K+1, M], all prefixes and queries of a prompt in one pass."""
    log_probabilities, correct = [], []
    for prompt, examples in zip(prompts, held_out, strict=True):
        context = encode(tokenizer, prompt).context_ids
        queries, answers = _queries(tokenizer, examples)
        boundaries = demonstration_boundaries(tokenizer, prompt)
        copies = [(p, query) for p in boundaries for query in queries]
        logits = prefix_logits(model, context, copies).to(F64).reshape(len(boundaries), len(queries), -1)
        answers = answers.to(logits.device)
        log_probabilities.append(
            logits.log_softmax(-1).gather(-1, answers.expand(len(boundaries), -1)[..., None])[..., 0]
        )
        correct.append(logits.argmax(-1) == answers)
    return torch.stack(log_probabilities).cpu(), torch.stack(correct).cpu()


def choose_step_size(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[Prompt],
    held_out: Sequence[Sequence[Example]],
    grid: Sequence[float] = STEP_SIZES,
    layers: Sequence[int] | None = None,
) -> tuple[float, list[float]]:
    """The rule: the η of the grid with the highest held-out log-probability of the right answer, averaged
    over steps 1..K and the separate `prompts` (a diverging η scores −inf). The whole grid runs as one batch."""
    if not grid:
        raise ImplicitICLError("the step-size grid is empty; give at least one SGD step size")
    repeated = [p for _ in grid for p in prompts]
    repeated_held_out = [h for _ in grid for h in held_out]
    step_sizes = torch.tensor(list(grid), dtype=F64).repeat_interleave(len(prompts))
    run = online_sgd(model, tokenizer, repeated, repeated_held_out, step_sizes, layers, description="step sizes")
    scores = run.heldout_log_probability[:, 1:].reshape(len(grid), -1).mean(-1)
    scores = torch.where(scores.isfinite(), scores, -torch.inf).tolist()
    return grid[max(range(len(grid)), key=scores.__getitem__)], scores
