"""Tiny random-initialised Hugging Face models, one per supported family, for exactness tests.

    model = tiny_model("llama", seed=0, dtype=torch.float64)                 # the family's default variant
    model = tiny_model("gpt_neox", variant="sequential")                     # a family-specific variant
    for family, variant in ZOO_CASES: ...                                    # every (family, variant) pair

Families are named by their `config.model_type` (BERT's is "bert", Gemma 3 text is "gemma3_text").
Every model is built with `attn_implementation="eager"` and put in eval mode; decoders come from
`AutoModelForCausalLM.from_config`, BERT from `AutoModel.from_config` (the encoder, no head: its output is
`last_hidden_state`).

The sizes avoid the defaults on purpose, because shape bugs hide behind square matrices: hidden 36 with
intermediate 50, grouped-query attention (6 query heads sharing 2 key/value heads) wherever the family
has it, 2-3 layers, vocabulary 97, 128 positions, tied embeddings in some families and untied in others.

Weights are re-drawn from one seeded generator instead of HF's initialisation, which sets every bias and
norm offset to zero and every norm scale to one: a patch that forgot a bias or a (1 + w) norm scale
would then still pass. Here matrices are normal with std 1/sqrt(fan_in) (so activations keep their size
through depth and the context changes the output visibly), and every 1-D parameter (biases, norm scales
and offsets) gets a perturbation of std 0.2 around HF's value. Weights are drawn in float32 and cast, so
the models of one seed in float32, float64 and bfloat16 hold the same weights up to the cast; the same
family, variant, seed and dtype give bit-identical weights. Mixture-of-experts models use the eager
(per-expert loop) experts implementation, the only one that runs in float64.
"""

from __future__ import annotations

import torch
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, PreTrainedModel
from transformers.pytorch_utils import Conv1D

from implicit_icl.engine.spec import SPECS
from implicit_icl.errors import ImplicitICLError

VOCAB_SIZE = 97
MAX_POSITIONS = 128

# Sizes shared by the Llama-like families: odd width, a non-square MLP; grouped-query attention where the
# family has it (6 query heads sharing 2 key/value heads).
_SIZES = dict(
    vocab_size=VOCAB_SIZE,
    hidden_size=36,
    intermediate_size=50,
    num_hidden_layers=2,
    num_attention_heads=6,
    max_position_embeddings=MAX_POSITIONS,
)
_GQA = dict(_SIZES, num_key_value_heads=2)
# Gemma-like families set head_dim apart from hidden / heads, as the real checkpoints do.
_GEMMA = dict(_GQA, head_dim=8, num_hidden_layers=3)
# Partial rotary embeddings (GPT-NeoX, Phi) on head_dim 12: 6 rotated dimensions.
_PARTIAL_ROPE = {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5}
# Falcon names the MLP width ffn_hidden_size.
_FALCON = {("ffn_hidden_size" if key == "intermediate_size" else key): value for key, value in _SIZES.items()}

# family -> variant -> config keyword arguments; the first variant of each family is its default.
FAMILY_CONFIGS: dict[str, dict[str, dict]] = {
    "gpt2": {
        "default": dict(vocab_size=VOCAB_SIZE, n_positions=MAX_POSITIONS, n_embd=36, n_layer=2, n_head=4, n_inner=50),
        "untied": dict(
            vocab_size=VOCAB_SIZE,
            n_positions=MAX_POSITIONS,
            n_embd=36,
            n_layer=3,
            n_head=3,
            n_inner=52,
            tie_word_embeddings=False,
        ),
    },
    "gpt_neox": {
        "parallel": dict(_SIZES, num_attention_heads=3, use_parallel_residual=True, rope_parameters=_PARTIAL_ROPE),
        "sequential": dict(
            _SIZES,
            num_attention_heads=3,
            use_parallel_residual=False,
            tie_word_embeddings=True,
            rope_parameters=_PARTIAL_ROPE,
        ),
    },
    "llama": {
        "default": dict(_GQA, tie_word_embeddings=False),
        "tied": dict(_GQA, num_hidden_layers=3, tie_word_embeddings=True, mlp_bias=True, attention_bias=True),
    },
    "mistral": {"default": dict(_GQA, sliding_window=48)},
    "qwen2": {"default": dict(_GQA, tie_word_embeddings=True)},
    "qwen3": {"default": dict(_GQA, head_dim=10, tie_word_embeddings=False)},
    "gemma": {"default": dict(_GEMMA)},
    "gemma2": {
        "default": dict(
            _GEMMA,
            query_pre_attn_scalar=10,
            sliding_window=24,
            attn_logit_softcapping=5.0,
            final_logit_softcapping=3.0,
        ),
    },
    "gemma3_text": {
        # Layers 0 and 2 slide over 16 tokens, layer 1 attends to everything, each with its own RoPE.
        "default": dict(
            _GEMMA,
            query_pre_attn_scalar=10,
            sliding_window=16,
            layer_types=["sliding_attention", "full_attention", "sliding_attention"],
        ),
    },
    "olmo2": {"default": dict(_GQA, tie_word_embeddings=False)},
    "phi": {
        "default": dict(
            _SIZES, num_attention_heads=3, tie_word_embeddings=False, qk_layernorm=True, rope_parameters=_PARTIAL_ROPE
        ),
    },
    "phi3": {"default": dict(_GQA, tie_word_embeddings=False)},
    "falcon": {
        # Falcon-40B/180B layout: grouped key/values and separate ln_attn / ln_mlp before the parallel branches.
        "new": dict(_FALCON, num_kv_heads=2, new_decoder_architecture=True, num_ln_in_parallel_attn=2, bias=False),
        # Falcon-7B layout: one key/value head, one input_layernorm shared by the parallel branches, biases.
        "old": dict(_FALCON, multi_query=True, new_decoder_architecture=False, parallel_attn=True, bias=True),
        # Sequential Falcon (parallel_attn off): input_layernorm, attention, post_attention_layernorm, MLP.
        "sequential": dict(
            _FALCON,
            multi_query=False,
            new_decoder_architecture=False,
            parallel_attn=False,
            bias=True,
            tie_word_embeddings=False,
        ),
    },
    "mixtral": {
        "default": dict(
            _GQA,
            num_local_experts=4,
            num_experts_per_tok=2,
            router_jitter_noise=0.0,
            tie_word_embeddings=False,
        ),
    },
    "bert": {
        "default": dict(_SIZES, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0),
    },
}

FAMILIES: tuple[str, ...] = tuple(FAMILY_CONFIGS)
ZOO_CASES: tuple[tuple[str, str], ...] = tuple(
    (family, variant) for family, variants in FAMILY_CONFIGS.items() for variant in variants
)
ENCODER_FAMILIES = frozenset(family for family, spec in SPECS.items() if spec.encoder)

_PERTURBATION_STD = 0.2


def tiny_config(family: str, variant: str | None = None):
    """The `PretrainedConfig` of a zoo model (the family's first variant by default)."""
    if family not in FAMILY_CONFIGS:
        raise ImplicitICLError(f"no tiny model for family {family!r}; choose one of {', '.join(FAMILIES)}")
    variants = FAMILY_CONFIGS[family]
    variant = variant or next(iter(variants))
    if variant not in variants:
        raise ImplicitICLError(f"family {family!r} has no variant {variant!r}; choose one of {', '.join(variants)}")
    # No special tokens: the defaults lie outside the tiny vocabulary, and an end-of-sequence id would cut
    # greedy generation short.
    special_tokens = {} if family in ENCODER_FAMILIES else dict(bos_token_id=None, eos_token_id=None, pad_token_id=None)
    return AutoConfig.for_model(family, **special_tokens, **variants[variant])


def tiny_model(
    family: str, *, seed: int = 0, dtype: torch.dtype = torch.float64, variant: str | None = None
) -> PreTrainedModel:
    """A tiny random model of `family` in eval mode, weights drawn from `seed` (see the module docstring).

    Decoders return logits [batch, T, 97] from `model(input_ids)`; BERT returns `last_hidden_state`
    [batch, T, 36]. Input ids must lie in [0, 97) and sequences may be up to 128 tokens long.
    """
    config = tiny_config(family, variant)
    auto = AutoModel if family in ENCODER_FAMILIES else AutoModelForCausalLM
    # Drawn in float32 and then cast, so the float64 and bfloat16 models of a seed hold the same weights
    # up to the rounding of the cast.
    model = auto.from_config(config, attn_implementation="eager", experts_implementation="eager", dtype=torch.float32)
    _draw_weights(model, seed)
    model.config.dtype = dtype
    return model.to(dtype).eval()


@torch.no_grad()
def _draw_weights(model: torch.nn.Module, seed: int) -> None:
    """Overwrite every parameter from one generator, in the model's fixed parameter order."""
    generator = torch.Generator().manual_seed(seed)
    conv1d_weights = {id(m.weight) for m in model.modules() if isinstance(m, Conv1D)}
    for parameter in model.parameters():  # a tied embedding is one parameter, drawn once
        noise = torch.randn(parameter.shape, generator=generator, dtype=torch.float32)
        if parameter.dim() == 1:
            parameter.add_(_PERTURBATION_STD * noise)
        else:
            # nn.Linear and fused experts store [..., out, in]; GPT-2's Conv1D stores [in, out].
            fan_in = parameter.shape[0] if id(parameter) in conv1d_weights else parameter.shape[-1]
            parameter.copy_(noise / fan_in**0.5)
