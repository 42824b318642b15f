"""The Patch: per-parameter deltas that make a model without its context act as if it had it.

Deltas are keyed by Hugging Face parameter names verbatim ("model.layers.3.mlp.down_proj.weight"):

- a `RankOneUpdate` (u, v) for a weight matrix, in nn.Linear orientation ([out, in]); GPT-2's Conv1D
  stores [in, out], so it is transposed only where the delta is added;
- a vector for a bias (created for the duration of the patch if the module has none) or a norm scale.

A patch may be batched: every delta then has one leading dimension, entry i being the patch of batch
sequence i (every-position patches, one per token). Batched patches are applied through forward hooks
on a batch of sequences; single patches are added to the weights in place and removed bit for bit.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from transformers.pytorch_utils import Conv1D

from implicit_icl.atomic import write_atomically
from implicit_icl.errors import ImplicitICLError
from implicit_icl.theory import RankOneUpdate

Delta = RankOneUpdate | Tensor

_TENSORS_FILE = "patch.safetensors"
_METADATA_FILE = "patch.json"


@dataclass(frozen=True)
class Patch:
    """Deltas of one exact implicit patch, plus what is needed to use and check it.

    deltas: parameter name -> delta (see the module docstring), in the arithmetic dtype `dtype`.
    family: `config.model_type` of the model it was computed for; n_layers: its number of layers.
    output: the output-side patch ("down", "bias", "norm" or "stable").
    positions: absolute position of the patched token, one per batch entry ([p] when unbatched).
    drop: the context span [start, end) that was removed, or None when only the query is kept.
    """

    deltas: dict[str, Delta]
    family: str
    n_layers: int
    dtype: torch.dtype
    output: str
    positions: tuple[int, ...]
    drop: tuple[int, int] | None = None
    batched: bool = False

    def __getitem__(self, index: int) -> Patch:
        """The patch of batch entry `index` of a batched patch."""
        if not self.batched:
            raise ImplicitICLError("this patch is not batched; index only every-position patches")
        deltas = {name: delta[index] for name, delta in self.deltas.items()}
        return replace(self, deltas=deltas, positions=(self.positions[index],), batched=False)

    def __len__(self) -> int:
        return len(self.positions)

    def __repr__(self) -> str:
        where = f"{len(self)} positions" if self.batched else f"position {self.positions[0]}"
        dropped = f", drop={self.drop}" if self.drop else ""
        dtype = str(self.dtype).removeprefix("torch.")
        return (
            f"Patch({self.family}, {self.n_layers} layers, {len(self.deltas)} deltas, output={self.output!r}, "
            f"{dtype}, {where}{dropped})"
        )

    def summary(self) -> list[dict]:
        """Per layer and parameter: what was changed and the norm of the change (the largest over batch
        entries and stacked experts).

        The norm is ||u v^T||_F = ||u|| ||v|| for a rank-1 delta and the Euclidean norm for a vector."""
        rows = []
        for name, delta in self.deltas.items():
            rank_one = isinstance(delta, RankOneUpdate)
            norm = delta.norm() if rank_one else delta.norm(dim=-1)
            rows.append(
                dict(
                    layer=_layer_index(name),
                    parameter=name,
                    kind="rank-1" if rank_one else ("bias shift" if name.endswith("bias") else "scale shift"),
                    norm=float(norm.max()),
                )
            )
        return rows

    @property
    def modules(self) -> list[str]:
        """Names of the modules the patch changes, in layer order."""
        return list(dict.fromkeys(name.rsplit(".", 1)[0] for name in self.deltas))

    @contextmanager
    def applied(self, model: nn.Module, via: Literal["auto", "weights", "hooks"] = "auto") -> Iterator[nn.Module]:
        """Apply the patch inside a `with` block; the weights are restored bit for bit on exit, also when
        an exception is raised inside.

        via="weights" adds the deltas to the parameters in place (rank-1 by `addr_`, no dense delta);
        via="hooks" adds their effect to the module outputs, which works for batched patches and for
        modules whose weights accelerate offloads (meta device). "auto" picks hooks only when needed.
        """
        self.check_matches(model)
        if via == "auto":
            via = "hooks" if self.batched or _offloaded(model, self.deltas) else "weights"
        if via == "weights" and self.batched:
            raise ImplicitICLError("a batched patch cannot be added to the weights; use via='hooks' or index it")
        apply = weights_applied if via == "weights" else hooks_applied
        with apply(model, self.deltas, self.batched):
            yield model

    def check_matches(self, model: nn.Module) -> None:
        """Raise ImplicitICLError unless every delta fits a parameter of `model` (family, names, shapes)."""
        family = getattr(getattr(model, "config", None), "model_type", None)
        if family != self.family:
            raise ImplicitICLError(
                f"this patch was computed for a {self.family!r} model, not {family!r}; compute it for this model"
            )
        n_layers = getattr(model.config, "num_hidden_layers", self.n_layers)
        if n_layers != self.n_layers:
            raise ImplicitICLError(
                f"this patch was computed for {self.n_layers} layers but the model has {n_layers}; "
                "compute it for this model"
            )
        for name, delta in self.deltas.items():
            expected, actual = _delta_shape(delta, self.batched), _parameter_shape(model, name)
            if expected != actual:
                raise ImplicitICLError(
                    f"patch delta {name} has shape {expected} but the model's parameter has {actual}; "
                    "the patch belongs to a different model size"
                )

    def save(self, directory: str | os.PathLike) -> Path:
        """Write patch.safetensors (the factors) and patch.json (metadata) into `directory`, atomically."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        tensors, kinds = {}, {}
        for name, delta in self.deltas.items():
            if isinstance(delta, RankOneUpdate):
                tensors[f"{name}:u"], tensors[f"{name}:v"] = delta.u, delta.v
                kinds[name] = "rank-1"
            else:
                tensors[name] = delta
                kinds[name] = "vector"
        tensors = {key: value.detach().contiguous().cpu() for key, value in tensors.items()}
        metadata = dict(
            family=self.family,
            n_layers=self.n_layers,
            dtype=str(self.dtype).removeprefix("torch."),
            output=self.output,
            positions=list(self.positions),
            drop=list(self.drop) if self.drop else None,
            batched=self.batched,
            deltas=kinds,
        )
        write_atomically(directory / _TENSORS_FILE, lambda path: save_file(tensors, path))
        write_atomically(directory / _METADATA_FILE, lambda path: Path(path).write_text(json.dumps(metadata, indent=2)))
        return directory

    def to_peft(self, directory: str | os.PathLike, model: nn.Module) -> Path:
        """Write the rank-1 deltas as a PEFT LoRA adapter (r = 1) for `model`; see implicit_icl.lora."""
        from implicit_icl.lora import save_lora  # lora builds on this module

        return save_lora(self, directory, model)

    @classmethod
    def load(cls, directory: str | os.PathLike) -> Patch:
        """Read a patch written by `save`."""
        directory = Path(directory)
        if not (directory / _METADATA_FILE).is_file() or not (directory / _TENSORS_FILE).is_file():
            raise ImplicitICLError(f"{directory} holds no saved patch ({_METADATA_FILE} + {_TENSORS_FILE})")
        try:
            metadata = json.loads((directory / _METADATA_FILE).read_text())
            tensors = load_file(directory / _TENSORS_FILE)
            deltas = {
                name: RankOneUpdate(tensors[f"{name}:u"], tensors[f"{name}:v"]) if kind == "rank-1" else tensors[name]
                for name, kind in metadata["deltas"].items()
            }
            return cls(
                deltas=deltas,
                family=metadata["family"],
                n_layers=metadata["n_layers"],
                dtype=getattr(torch, metadata["dtype"]),
                output=metadata["output"],
                positions=tuple(metadata["positions"]),
                drop=tuple(metadata["drop"]) if metadata["drop"] else None,
                batched=metadata["batched"],
            )
        except Exception as error:  # truncated or edited files fail in json, safetensors or a missing key
            raise ImplicitICLError(
                f"the patch in {directory} is corrupt ({type(error).__name__}: {error}); save it again"
            ) from None


def _layer_index(name: str) -> int | None:
    """The first numeric component of a parameter name: its layer in every HF layout."""
    match = re.search(r"\.(\d+)\.", name)
    return int(match.group(1)) if match else None


def _owner(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    module_name, attribute = name.rsplit(".", 1)
    try:
        module = model.get_submodule(module_name)
    except AttributeError:
        raise ImplicitICLError(f"the model has no module {module_name}; the patch belongs to another model") from None
    if attribute not in module._parameters:
        raise ImplicitICLError(
            f"module {module_name} has no parameter {attribute!r}; the patch belongs to another model"
        )
    return module, attribute


def _delta_shape(delta: Delta, batched: bool) -> tuple[int, ...]:
    """The parameter shape a delta is added to, in nn.Linear orientation, without the batch dimension.

    A rank-1 delta on stacked matrices (fused experts [E, out, in]) has factors [E, out] and [E, in]."""
    if isinstance(delta, RankOneUpdate):
        return (*delta.u.shape[int(batched) : -1], *delta.shape)
    return tuple(delta.shape[int(batched) :])


def _parameter_shape(model: nn.Module, name: str) -> tuple[int, ...]:
    """Shape of the parameter `name` in nn.Linear orientation; for a missing bias, the module's output size."""
    module, attribute = _owner(model, name)
    parameter = getattr(module, attribute)
    if parameter is None:
        return (module.weight.shape[1] if isinstance(module, Conv1D) else module.weight.shape[0],)
    shape = tuple(parameter.shape)
    return shape[::-1] if isinstance(module, Conv1D) and attribute == "weight" else shape


def _offloaded(model: nn.Module, deltas: dict[str, Delta]) -> bool:
    """Whether accelerate keeps the weights of a patched module elsewhere (disk or CPU offload: meta tensors)."""
    modules = (_owner(model, name)[0] for name in deltas)
    return any(parameter.device.type == "meta" for module in modules for parameter in module.parameters(recurse=False))


def deltas_applied(model: nn.Module, deltas: dict[str, Delta], batched: bool = False):
    """The deltas in place in the weights, or through hooks where that cannot work (a batched patch,
    weights that accelerate offloads to the meta device): a context manager, like `Patch.applied`."""
    use_hooks = batched or _offloaded(model, deltas)
    return (hooks_applied if use_hooks else weights_applied)(model, deltas, batched)


@contextmanager
def weights_applied(model: nn.Module, deltas: dict[str, Delta], batched: bool) -> Iterator[None]:
    originals: dict[str, Tensor | None] = {}
    try:
        with torch.no_grad():
            for name, delta in deltas.items():
                module, attribute = _owner(model, name)
                parameter = getattr(module, attribute)
                originals[name] = None if parameter is None else parameter.detach().clone()
                if parameter is None:  # a bias shift on a bias-free module: the bias exists while patched
                    setattr(module, attribute, nn.Parameter(delta.to(module.weight), requires_grad=False))
                elif isinstance(delta, RankOneUpdate):
                    u, v = delta.u.to(parameter), delta.v.to(parameter)
                    if isinstance(module, Conv1D):
                        parameter.addr_(v, u)
                    elif parameter.dim() == 3:  # stacked experts [E, out, in]: one outer product each
                        parameter.baddbmm_(u.unsqueeze(-1), v.unsqueeze(-2))
                    else:
                        parameter.addr_(u, v)
                else:
                    parameter.add_(delta.to(parameter))
        yield
    finally:
        with torch.no_grad():
            for name, original in originals.items():
                module, attribute = _owner(model, name)
                if original is None:
                    setattr(module, attribute, None)
                else:
                    getattr(module, attribute).copy_(original)


@contextmanager
def hooks_applied(model: nn.Module, deltas: dict[str, Delta], batched: bool) -> Iterator[None]:
    by_module: dict[str, dict[str, Delta]] = {}
    for name, delta in deltas.items():
        module_name, attribute = name.rsplit(".", 1)
        by_module.setdefault(module_name, {})[attribute] = delta
    handles = []
    try:
        for module_name, module_deltas in by_module.items():
            hook = delta_hook(module_deltas, batched)
            handles.append(model.get_submodule(module_name).register_forward_hook(hook))
        yield
    finally:
        for handle in handles:
            handle.remove()


def delta_hook(deltas: dict[str, Delta], batched: bool):
    """A forward hook giving a module the output it has with the deltas added to its parameters.

    Linear and Conv1D outputs [batch, T, out] are linear in the weight and bias, so the deltas' effect is
    added (rank-1 as u (v·x), never densely). Other modules (norms, routers, fused experts) are re-run with
    the shifted parameters. Batched deltas [batch, ...] act on their own batch sequence."""

    def per_sequence(tensor: Tensor, like: Tensor) -> Tensor:
        tensor = tensor.to(like)
        return tensor.unsqueeze(-2) if batched else tensor

    def hook(module: nn.Module, args: tuple, output):
        if isinstance(module, nn.Linear | Conv1D):
            x = args[0]
            for delta in deltas.values():
                if isinstance(delta, RankOneUpdate):
                    u, v = per_sequence(delta.u, output), per_sequence(delta.v, output)
                    output = output + (x * v).sum(-1, keepdim=True) * u
                else:
                    output = output + per_sequence(delta, output)
            return output
        if batched and any(isinstance(delta, RankOneUpdate) for delta in deltas.values()):
            raise ImplicitICLError(
                f"a batched patch cannot act on {type(module).__name__} through hooks; apply its entries one by one"
            )
        with onloaded(module):
            shifted = {}
            for attribute, delta in deltas.items():
                parameter = getattr(module, attribute)
                change = delta.dense() if isinstance(delta, RankOneUpdate) else per_sequence(delta, parameter)
                shifted[attribute] = parameter + change.to(parameter)
            return forward_with(module, shifted, args)

    return hook


@contextmanager
def onloaded(module: nn.Module) -> Iterator[None]:
    """The module's own parameters materialised for the block: accelerate keeps offloaded ones on the
    meta device and loads them only inside the module's forward."""
    if not any(parameter.device.type == "meta" for parameter in module.parameters(recurse=False)):
        yield
        return
    from accelerate.utils import align_module_device  # only a model accelerate dispatched gets here

    with align_module_device(module):
        yield


def forward_with(module: nn.Module, parameters: dict[str, Tensor], args: tuple):
    """The module's own forward, bypassing its hooks (this runs inside one), with parameters replaced.

    accelerate wraps `forward` to load offloaded weights over ours; its original is `_old_forward`."""
    saved = {name: module._parameters[name] for name in parameters}
    module._parameters.update(parameters)
    try:
        return getattr(module, "_old_forward", module.forward)(*args)
    finally:
        module._parameters.update(saved)
