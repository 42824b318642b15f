"""Training the toy transformer with Adam on fresh prompts, seeded, with checkpoints on the way.

Each step draws new tasks. Each prompt is seen with some number k ∈ 1..N of examples: its query token
replaces example k+1 and the prediction is read there; the causal mask hides every later token, so one
[B, N+1] batch trains all context lengths without padding and without exposing y_q.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor

from implicit_icl.atomic import write_atomically
from implicit_icl.errors import ImplicitICLError
from implicit_icl.progress import progress_bar
from implicit_icl.toy.data import Prompts, sample_prompts
from implicit_icl.toy.model import ToyConfig, ToyTransformer, build_model


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 3000
    batch_size: int = 256
    learning_rate: float = 1e-2  # peak: linear warm-up, then linear decay to 0 at the last step
    warmup_steps: int = 100
    full_context_share: float = 0.8  # prompts seen with all N examples; the rest with k ~ uniform{1..N}
    n_checkpoints: int = 20  # besides step 0, evenly spaced up to the last step
    seed: int = 0

    def __post_init__(self) -> None:
        if self.steps < 1 or self.batch_size < 1 or self.n_checkpoints < 1 or self.learning_rate <= 0:
            raise ImplicitICLError(f"TrainConfig needs positive steps, batch, checkpoints and rate, got {self}")

    def checkpoint_steps(self) -> list[int]:
        count = min(self.n_checkpoints, self.steps)
        return [0] + [round(self.steps * (i + 1) / count) for i in range(count)]


@dataclass
class TrainedModel:
    """A model, its checkpoints (state dicts by step, step 0 = initialisation) and its training loss."""

    config: ToyConfig
    train: TrainConfig
    checkpoints: dict[int, dict[str, Tensor]]
    train_loss: list[float] = field(default_factory=list)

    def model_at(self, step: int, dtype: torch.dtype = torch.float32) -> ToyTransformer:
        model = ToyTransformer(self.config)
        with torch.no_grad():
            for name, parameter in model.named_parameters():
                parameter.copy_(self.checkpoints[step][name])
        return model.to(dtype).eval()

    def final(self, dtype: torch.dtype = torch.float32) -> ToyTransformer:
        return self.model_at(max(self.checkpoints), dtype)


def training_batch(prompts: Prompts, generator: torch.Generator, full_context_share: float) -> tuple[Tensor, Tensor]:
    """Tokens [B, N+1, d+1] with the query at position k, and those positions [B]: k = N for a share of
    the prompts, k ~ uniform{1..N} for the others."""
    tokens = torch.cat([prompts.example_tokens(), prompts.query_token()[:, None]], dim=1)
    positions = torch.randint(1, prompts.context_length + 1, (prompts.size,), generator=generator)
    full = torch.rand(prompts.size, generator=generator) < full_context_share
    positions = torch.where(full, prompts.context_length, positions)
    tokens[torch.arange(prompts.size), positions] = prompts.query_token()
    return tokens, positions


def train_model(config: ToyConfig, train: TrainConfig, stop_after: int | None = None) -> TrainedModel:
    """Adam on the squared error of y_q; deterministic for a given (config, train) on one machine.

    stop_after: end early at that step, on the same trajectory (to check a checkpoint without a full run).
    """
    model = build_model(config, train.seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=train.learning_rate)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: _rate_factor(step, train))
    generator = torch.Generator().manual_seed(train.seed)
    keep = set(train.checkpoint_steps())
    result = TrainedModel(config, train, {0: _snapshot(model)})
    with progress_bar() as bar:
        last = train.steps if stop_after is None else min(stop_after, train.steps)
        task = bar.add_task("training the toy model", total=last)
        for step in range(1, last + 1):
            prompts = sample_prompts(train.batch_size, config.dim, config.context_length, config.noise, generator)
            tokens, positions = training_batch(prompts, generator, train.full_context_share)
            predictions = model(tokens).gather(1, positions[:, None]).squeeze(1)
            loss = (predictions - prompts.query_label).pow(2).mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            result.train_loss.append(loss.item())
            if step in keep:
                result.checkpoints[step] = _snapshot(model)
            bar.advance(task)
    return result


def _rate_factor(step: int, train: TrainConfig) -> float:
    warmup = min(1.0, (step + 1) / max(1, train.warmup_steps))
    return warmup * (1.0 - step / train.steps)


def _snapshot(model: ToyTransformer) -> dict[str, Tensor]:
    """The parameters, each once (the block's `first_layer` is the MLP's first layer, not a copy)."""
    return {name: parameter.detach().clone() for name, parameter in model.named_parameters()}


def save_trained(trained: TrainedModel, path: Path, command: str = "") -> None:
    """Every checkpoint in one safetensors file (atomically written); configs and loss in its metadata."""
    tensors = {
        f"step{step}.{name}": t.contiguous() for step, sd in trained.checkpoints.items() for name, t in sd.items()
    }
    metadata = {
        "config": json.dumps(trained.config.to_dict()),
        "train": json.dumps(asdict(trained.train)),
        "train_loss": json.dumps([round(x, 6) for x in trained.train_loss]),
        "command": command,
    }
    write_atomically(path, lambda temporary: save_file(tensors, str(temporary), metadata=metadata))


def load_trained(path: Path) -> TrainedModel:
    if not Path(path).is_file():
        raise ImplicitICLError(f"no checkpoint file at {path}; train one with scripts/train_toy.py")
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata()
    checkpoints: dict[int, dict[str, Tensor]] = {}
    for key, tensor in load_file(str(path)).items():
        step, name = key.split(".", 1)
        checkpoints.setdefault(int(step.removeprefix("step")), {})[name] = tensor
    return TrainedModel(
        ToyConfig(**json.loads(metadata["config"])),
        TrainConfig(**json.loads(metadata["train"])),
        dict(sorted(checkpoints.items())),
        json.loads(metadata["train_loss"]),
    )
