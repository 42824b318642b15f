"""Patches on Hugging Face models: add the deltas to the weights in place, or their effect through hooks.

`Patch` is `PatchData` (implicit_icl/patch.py) that knows how to go into a model:

- weights: deltas added to the parameters in place (low-rank by `addmm_`, no dense delta), removed by
  copying the saved originals back, so the weights are restored bit for bit on exit and on exceptions;
- hooks: the deltas' effect added to module outputs (Linear and GPT-2's Conv1D are linear in their
  weight), or the module re-run with shifted parameters (norms, routers, fused experts). Works for batched
  patches (entry i acts on batch sequence i) and for modules whose weights accelerate offloads (meta).

Before anything changes, the patch is checked against the model: family, layer count, parameter shapes,
and its fingerprint (configuration and a digest of the patched modules' parameters), so that a patch is
never silently applied to another checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import os
import weakref
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Literal

import torch
from torch import Tensor, nn
from transformers.pytorch_utils import Conv1D

from implicit_icl.engine.lora import save_lora
from implicit_icl.errors import ImplicitICLError, holds_values
from implicit_icl.patch import Delta, ModelFingerprint, PatchData
from implicit_icl.theory import LowRankUpdate

# Configuration entries that say nothing about the computation (bookkeeping, tokenizer ids, dtype).
_NOT_ARCHITECTURE = {
    "architectures", "dtype", "torch_dtype", "transformers_version", "use_cache", "output_attentions",
    "output_hidden_states", "return_dict", "id2label", "label2id", "problem_type", "chunk_size_feed_forward",
    "bos_token_id", "eos_token_id", "pad_token_id",
}  # fmt: skip


class Patch(PatchData):
    """A patch for a Hugging Face model (see `PatchData` for the data it holds)."""

    @contextmanager
    def applied(
        self, model: nn.Module, via: Literal["auto", "weights", "hooks"] = "auto", force: bool = False
    ) -> Iterator[nn.Module]:
        """Apply the patch inside a `with` block; the weights are restored bit for bit on exit, also when
        an exception is raised inside.

        via="weights" adds the deltas to the parameters; via="hooks" adds their effect to the module
        outputs (batched patches, offloaded weights); "auto" picks hooks only when needed.
        force=True applies the patch to a model whose fingerprint differs (another checkpoint, knowingly).
        """
        self.check_matches(model, force=force)
        if via == "auto":
            via = "hooks" if self.batched or offloaded(model, self.deltas) else "weights"
        if via == "weights" and self.batched:
            raise ImplicitICLError("a batched patch cannot be added to the weights; use via='hooks' or index it")
        apply = weights_applied if via == "weights" else hooks_applied
        with apply(model, self.deltas, self.batched):
            yield model

    def check_matches(self, model: nn.Module, force: bool = False) -> None:
        """Raise ImplicitICLError unless the patch fits `model`: family, layers, names and shapes, and
        (unless force) the fingerprint of the model it was computed for."""
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
            expected, actual = _delta_shape(delta, self.batched), parameter_shape(model, name)
            if expected != actual:
                raise ImplicitICLError(
                    f"patch delta {name} has shape {expected} but the model's parameter has {actual}; "
                    "the patch belongs to a different model size"
                )
        if self.fingerprint is not None and not force:
            difference = self.fingerprint.difference(model_fingerprint(model, self.modules))
            if difference is not None:
                raise ImplicitICLError(
                    f"this patch belongs to another model: {difference}; compute the patch for this model, "
                    "or pass force=True to apply it anyway"
                )

    def to_peft(self, directory: str | os.PathLike, model: nn.Module) -> Path:
        """Write the low-rank deltas as a PEFT LoRA adapter for `model`; see implicit_icl.engine.lora."""
        self.check_matches(model)
        return save_lora(self, directory, model)


# --- fingerprints --------------------------------------------------------------------------------------

# id(parameter) -> (weak reference, version counter, data pointer, digest); an entry dies with its parameter.
_DIGESTS: dict[int, tuple[weakref.ref, int, int, str]] = {}


def model_fingerprint(model: nn.Module, modules: Iterable[str]) -> ModelFingerprint:
    """The fingerprint of `model` for a patch of these modules (see ModelFingerprint). Digests are cached
    per parameter until it changes in place, so checking a patch again costs nothing."""
    config = {
        key: value
        for key, value in model.config.to_dict().items()
        if key not in _NOT_ARCHITECTURE and not key.startswith("_")
    }
    weights = {}
    for module_name in modules:
        module = model.get_submodule(module_name)
        with onloaded(module):
            for name, parameter in module.named_parameters(recurse=False):
                weights[f"{module_name}.{name}"] = _digest(parameter)
    return ModelFingerprint(json.loads(json.dumps(config, default=str)), weights)


def _digest(parameter: Tensor) -> str:
    if not holds_values(parameter):  # a model on "meta" has shapes and no weights to hash
        return f"meta {tuple(parameter.shape)}"
    cached = _cached_digest(parameter)
    if cached is not None:
        return cached
    rounded = parameter.detach().to(torch.bfloat16).contiguous().cpu()
    digest = hashlib.blake2b(str(tuple(rounded.shape)).encode(), digest_size=16)
    digest.update(rounded.view(torch.uint8).numpy().tobytes())
    _remember_digest(parameter, digest.hexdigest())
    return digest.hexdigest()


def _cached_digest(parameter: Tensor) -> str | None:
    """The cached digest, if the parameter has not changed in place since it was taken."""
    entry = _DIGESTS.get(id(parameter))
    if entry is None or entry[0]() is not parameter or entry[1:3] != (parameter._version, parameter.data_ptr()):
        return None
    return entry[3]


def _remember_digest(parameter: Tensor, digest: str) -> None:
    key = id(parameter)
    reference = weakref.ref(parameter, lambda _: _DIGESTS.pop(key, None))
    _DIGESTS[key] = (reference, parameter._version, parameter.data_ptr(), digest)


# --- application ---------------------------------------------------------------------------------------


def owner(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    """The module holding parameter `name`, and the attribute name."""
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

    A low-rank delta on stacked matrices (fused experts [E, out, in]) has factors [E, out, k], [E, in, k]."""
    if isinstance(delta, LowRankUpdate):
        return (*delta.batch_shape[int(batched) :], *delta.shape)
    return tuple(delta.shape[int(batched) :])


def parameter_shape(model: nn.Module, name: str) -> tuple[int, ...]:
    """Shape of the parameter `name` in nn.Linear orientation; for a missing bias, the module's output size."""
    module, attribute = owner(model, name)
    parameter = getattr(module, attribute)
    if parameter is None:
        return (module.weight.shape[1] if isinstance(module, Conv1D) else module.weight.shape[0],)
    shape = tuple(parameter.shape)
    return shape[::-1] if isinstance(module, Conv1D) and attribute == "weight" else shape


def offloaded(model: nn.Module, deltas: dict[str, Delta]) -> bool:
    """Whether accelerate keeps the weights of a patched module elsewhere (disk or CPU offload: meta tensors)."""
    modules = (owner(model, name)[0] for name in deltas)
    return any(parameter.device.type == "meta" for module in modules for parameter in module.parameters(recurse=False))


def deltas_applied(model: nn.Module, deltas: dict[str, Delta], batched: bool = False):
    """The deltas in place in the weights, or through hooks where that cannot work (a batched patch,
    weights that accelerate offloads to the meta device): a context manager, like `Patch.applied`."""
    use_hooks = batched or offloaded(model, deltas)
    return (hooks_applied if use_hooks else weights_applied)(model, deltas, batched)


def add_delta_(module: nn.Module, attribute: str, delta: Delta) -> None:
    """Add one delta to `module.<attribute>` in place (nn.Linear or Conv1D orientation); a bias shift on a
    module without a bias becomes its bias."""
    parameter = getattr(module, attribute)
    if parameter is None:
        setattr(module, attribute, nn.Parameter(delta.to(module.weight).clone(), requires_grad=False))
    elif isinstance(delta, LowRankUpdate):
        delta.add_to_(parameter, transposed=isinstance(module, Conv1D))
    else:
        parameter.add_(delta.to(parameter))


@contextmanager
def weights_applied(model: nn.Module, deltas: dict[str, Delta], batched: bool) -> Iterator[None]:
    originals: dict[str, tuple[Tensor | None, str | None]] = {}  # name -> (copy, digest before the change)
    try:
        with torch.no_grad():
            for name, delta in deltas.items():
                module, attribute = owner(model, name)
                parameter = getattr(module, attribute)
                # a bias shift on a bias-free module: the bias exists while patched
                originals[name] = (
                    (None, None) if parameter is None else (parameter.detach().clone(), _cached_digest(parameter))
                )
                add_delta_(module, attribute, delta)
        yield
    finally:
        with torch.no_grad():
            for name, (original, digest) in originals.items():
                module, attribute = owner(model, name)
                if original is None:
                    setattr(module, attribute, None)
                    continue
                parameter = getattr(module, attribute)
                parameter.copy_(original)
                if digest is not None:  # restored bit for bit: the digest taken before still holds
                    _remember_digest(parameter, digest)


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
    added (U (V^T x), never densely). Other modules (norms, routers, fused experts) are re-run with the
    shifted parameters. Batched deltas [batch, ...] act on their own batch sequence."""

    def per_sequence(tensor: Tensor, like: Tensor) -> Tensor:
        tensor = tensor.to(like)
        return tensor.unsqueeze(-2) if batched else tensor

    def hook(module: nn.Module, args: tuple, output):
        if isinstance(module, nn.Linear | Conv1D):
            # In bfloat16 or float16 the effect is summed in float32 and rounded once, at the end: rounding
            # U (V^T x) and the sum separately would cost two roundings of the size of the patched output.
            x, model_dtype = args[0], output.dtype
            working = output.float() if output.element_size() < 4 else output
            for delta in deltas.values():
                if isinstance(delta, LowRankUpdate):
                    working = working + delta.apply(x.to(working.dtype))
                else:
                    working = working + per_sequence(delta, working)
            return working.to(model_dtype)
        if batched and any(isinstance(delta, LowRankUpdate) for delta in deltas.values()):
            raise ImplicitICLError(
                f"a batched patch cannot act on {type(module).__name__} through hooks; apply its entries one by one"
            )
        with onloaded(module):
            shifted = {}
            for attribute, delta in deltas.items():
                parameter = getattr(module, attribute)
                change = delta.dense() if isinstance(delta, LowRankUpdate) else per_sequence(delta, parameter)
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


def normalized_by(norm: nn.Module, inputs: Tensor, unit_weight: float) -> Tensor:
    """n(x) computed by the norm's own forward (its dtype, its float32 upcast) with its scale set to one.

    inputs: [..., d]; unit_weight: the stored weight that means scale one (1 for w, 0 for Gemma's 1 + w).
    The forward is called directly, so no hook fires (ours would record this call)."""
    dtype = norm.weight.dtype
    weight = torch.full(norm.weight.shape, unit_weight, dtype=dtype, device=inputs.device)
    with onloaded(norm):
        return forward_with(norm, {"weight": weight}, (inputs.to(dtype),))
