"""What a patch is, as data: per-parameter deltas, where they came from, and the model they belong to.

Deltas are keyed by Hugging Face parameter names verbatim ("model.layers.3.mlp.down_proj.weight"):

- a `LowRankUpdate` (U, V) for a weight matrix, in nn.Linear orientation ([out, in]), whatever the
  module stores (GPT-2's Conv1D is transposed only where the delta is added, in engine/apply.py);
- a vector for a bias (created for the duration of the patch if the module has none) or a norm scale.

A patch may be batched: every delta then has one leading dimension, entry i being the patch of batch
sequence i (every-position patches, one pair of a batch). Nothing here touches a model: applying a patch
to a Hugging Face model is `implicit_icl.hf.Patch.applied`, a subclass of `PatchData` with the same data.

On disk: patch.safetensors (the factors and vectors) and patch.json (everything else, readable), with a
checksum over both so that a truncated, edited or mismatched pair of files is refused.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from implicit_icl import __version__
from implicit_icl.atomic import write_atomically
from implicit_icl.errors import ImplicitICLError
from implicit_icl.theory import LowRankUpdate

Delta = LowRankUpdate | Tensor

TENSORS_FILE = "patch.safetensors"
METADATA_FILE = "patch.json"
FORMAT_VERSION = 2


@dataclass(frozen=True)
class Source:
    """The token ids one patch entry was computed from.

    context_ids, query_ids: the context and the query; kept: absolute positions of the reduced input the
    patched model is fed (the query alone, or the context without a removed span, then the query); the
    patched token is the last of them.
    """

    context_ids: tuple[int, ...]
    query_ids: tuple[int, ...]
    kept: tuple[int, ...]


@dataclass(frozen=True)
class ModelFingerprint:
    """Which model a patch belongs to: its configuration, and a digest of every parameter of the modules
    the patch reads and writes (weights rounded to bfloat16, so that one checkpoint loaded in float32,
    float64 or bfloat16 has one fingerprint, and any other checkpoint or fine-tune another).

    config: the architecture's configuration entries; weights: parameter name -> hex digest.
    """

    config: dict[str, object]
    weights: dict[str, str]

    def difference(self, other: ModelFingerprint) -> str | None:
        """What differs from `other` (the model at hand), in a few words, or None when they match."""
        changed = sorted(
            key for key in self.config.keys() & other.config.keys() if self.config[key] != other.config[key]
        )
        if changed:
            shown = ", ".join(f"{key} {self.config[key]!r} vs {other.config[key]!r}" for key in changed[:3])
            return f"its configuration differs ({shown}{', ...' if len(changed) > 3 else ''})"
        differing = [name for name, digest in self.weights.items() if other.weights.get(name) != digest]
        if differing:
            return (
                f"the weights differ in {len(differing)} of the {len(self.weights)} parameters it reads and writes "
                f"(first: {differing[0]}): another checkpoint or a fine-tune"
            )
        return None


@dataclass(frozen=True)
class PatchData:
    """Deltas of one implicit patch, plus what is needed to trust, use and check it.

    deltas: parameter name -> delta (see the module docstring), in the arithmetic dtype `dtype`.
    family: `config.model_type` of the model it was computed for; n_layers: its number of layers.
    output: the output-side patch ("down", "bias", "norm", "stable"), or how a compiled patch was fitted.
    sources: per entry, the ids it was computed from (empty for a query-independent patch).
    drop: the context span [start, end) that was removed, or None when only the query is kept.
    batched: deltas carry one leading entry dimension. fingerprint: the model it belongs to (None: unchecked).
    notes: method-specific settings (JSON-serialisable), e.g. how a compiled patch was fitted.
    """

    deltas: dict[str, Delta]
    family: str
    n_layers: int
    dtype: torch.dtype
    output: str
    sources: tuple[Source, ...] = ()
    drop: tuple[int, int] | None = None
    batched: bool = False
    fingerprint: ModelFingerprint | None = None
    notes: dict[str, object] = field(default_factory=dict)
    version: str = __version__

    @property
    def positions(self) -> tuple[int, ...]:
        """Absolute position of the patched token of each entry."""
        return tuple(source.kept[-1] for source in self.sources)

    def __getitem__(self, index: int) -> PatchData:
        """The patch of batch entry `index` of a batched patch."""
        if not self.batched:
            raise ImplicitICLError("this patch is not batched; index only batched patches (one entry per sequence)")
        deltas = {name: delta[index] for name, delta in self.deltas.items()}
        sources = (self.sources[index],) if self.sources else ()
        return replace(self, deltas=deltas, sources=sources, batched=False)

    def __len__(self) -> int:
        if not self.batched:
            return 1
        return next(iter(self.deltas.values())).shape[0] if not self.sources else len(self.sources)

    def __repr__(self) -> str:
        if self.batched:
            where = f"{len(self)} entries"
        else:
            where = f"position {self.positions[0]}" if self.sources else "query-independent"
        dropped = f", drop={self.drop}" if self.drop else ""
        dtype = str(self.dtype).removeprefix("torch.")
        return (
            f"Patch({self.family}, {self.n_layers} layers, {len(self.deltas)} deltas, output={self.output!r}, "
            f"{dtype}, {where}{dropped})"
        )

    def summary(self) -> list[dict]:
        """Per layer and parameter: what was changed, its rank, and the norm of the change (the largest over
        batch entries and stacked experts): ||U V^T||_F from the factors, the Euclidean norm for a vector."""
        rows = []
        for name, delta in self.deltas.items():
            low_rank = isinstance(delta, LowRankUpdate)
            norm = delta.norm() if low_rank else delta.norm(dim=-1)
            kind = f"rank-{delta.rank}" if low_rank else ("bias shift" if name.endswith("bias") else "scale shift")
            rows.append(dict(layer=layer_index(name), parameter=name, kind=kind, norm=float(norm.max())))
        return rows

    @property
    def modules(self) -> list[str]:
        """Names of the modules the patch changes, in layer order."""
        return modules_of(self.deltas)

    def save(self, directory: str | os.PathLike) -> Path:
        """Write patch.safetensors and patch.json into `directory`, each atomically; the checksum in
        patch.json covers both, so a crash between the two writes leaves a pair that `load` refuses."""
        directory = Path(directory)
        tensors = {}
        for name, delta in self.deltas.items():
            tensors.update(delta.tensors(name) if isinstance(delta, LowRankUpdate) else {name: _cpu(delta)})
        write_atomically(directory / TENSORS_FILE, lambda path: save_file(tensors, path))
        metadata = self._metadata()
        metadata["checksum"] = _checksum(metadata, directory / TENSORS_FILE)
        write_atomically(directory / METADATA_FILE, lambda path: path.write_text(json.dumps(metadata, indent=1)))
        return directory

    @classmethod
    def load(cls, directory: str | os.PathLike):
        """Read a patch written by `save`; refuse a corrupt, edited or foreign one in one line."""
        directory = Path(directory)
        if not (directory / METADATA_FILE).is_file() or not (directory / TENSORS_FILE).is_file():
            raise ImplicitICLError(f"{directory} holds no saved patch ({METADATA_FILE} + {TENSORS_FILE})")
        try:
            metadata = json.loads((directory / METADATA_FILE).read_text())
            if metadata.get("format_version") != FORMAT_VERSION:
                raise ImplicitICLError(
                    f"the patch in {directory} has format {metadata.get('format_version')!r}, not {FORMAT_VERSION}; "
                    "compute and save it again with this version"
                )
            if metadata.pop("checksum", None) != _checksum(metadata, directory / TENSORS_FILE):
                raise ImplicitICLError(
                    f"the patch in {directory} is corrupt: edited or incomplete (checksum mismatch); save it again"
                )
            return cls._from_metadata(metadata, load_file(directory / TENSORS_FILE))
        except ImplicitICLError:
            raise
        except Exception as error:  # truncated or edited files fail in json, safetensors or a missing key
            message = str(error).splitlines()[0] if str(error) else ""
            raise ImplicitICLError(
                f"the patch in {directory} is corrupt ({type(error).__name__}: {message}); save it again"
            ) from None

    def _metadata(self) -> dict:
        return dict(
            format_version=FORMAT_VERSION,
            library_version=self.version,
            family=self.family,
            n_layers=self.n_layers,
            dtype=str(self.dtype).removeprefix("torch."),
            output=self.output,
            drop=list(self.drop) if self.drop else None,
            batched=self.batched,
            deltas={name: "low-rank" if isinstance(d, LowRankUpdate) else "vector" for name, d in self.deltas.items()},
            sources=[asdict(source) for source in self.sources],
            fingerprint=asdict(self.fingerprint) if self.fingerprint else None,
            notes=self.notes,
        )

    @classmethod
    def _from_metadata(cls, metadata: dict, tensors: dict[str, Tensor]):
        deltas = {
            name: LowRankUpdate.from_tensors(tensors, name) if kind == "low-rank" else tensors[name]
            for name, kind in metadata["deltas"].items()
        }
        fingerprint = metadata["fingerprint"]
        return cls(
            deltas=deltas,
            family=metadata["family"],
            n_layers=metadata["n_layers"],
            dtype=getattr(torch, metadata["dtype"]),
            output=metadata["output"],
            sources=tuple(
                Source(tuple(s["context_ids"]), tuple(s["query_ids"]), tuple(s["kept"])) for s in metadata["sources"]
            ),
            drop=tuple(metadata["drop"]) if metadata["drop"] else None,
            batched=metadata["batched"],
            fingerprint=ModelFingerprint(**fingerprint) if fingerprint else None,
            notes=metadata["notes"],
            version=metadata["library_version"],
        )


def concatenate(patches: Sequence[PatchData]) -> PatchData:
    """Batched patches of one model, entry after entry (every delta concatenated on its entry dimension)."""
    first = patches[0]
    if not all(patch.batched for patch in patches):
        raise ImplicitICLError("only batched patches can be concatenated; they have an entry dimension")
    if len(patches) == 1:
        return first  # frozen: nothing to copy
    deltas = {name: concatenate_deltas([patch.deltas[name] for patch in patches]) for name in first.deltas}
    return replace(first, deltas=deltas, sources=sum((patch.sources for patch in patches), ()))


def concatenate_deltas(deltas: Sequence[Delta]) -> Delta:
    """Deltas of one parameter with a leading entry dimension, joined on it (factors for low-rank ones)."""
    if isinstance(deltas[0], LowRankUpdate):
        return LowRankUpdate(torch.cat([d.U for d in deltas]), torch.cat([d.V for d in deltas]))
    return torch.cat(list(deltas))


def modules_of(parameter_names: Iterable[str]) -> list[str]:
    """The modules owning these parameters ("model.layers.3.mlp.up_proj.weight" -> "model.layers.3.mlp.up_proj"),
    each once, in order."""
    return list(dict.fromkeys(name.rsplit(".", 1)[0] for name in parameter_names))


def layer_index(name: str) -> int | None:
    """The first numeric component of a parameter name: its layer in every HF layout."""
    match = re.search(r"\.(\d+)\.", name)
    return int(match.group(1)) if match else None


def _cpu(tensor: Tensor) -> Tensor:
    return tensor.detach().contiguous().cpu()


def _checksum(metadata: dict, tensors_file: Path) -> str:
    """sha256 over the canonical JSON of the metadata and the bytes of the tensors file."""
    digest = hashlib.sha256(json.dumps(metadata, sort_keys=True).encode())
    digest.update(tensors_file.read_bytes())
    return digest.hexdigest()
