"""The families codelm reads and writes, by name: each one's HF module names and config.json
keys (read by loading, exporting and LoRA targeting), and its llama.cpp architecture (GGUF
export)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path
from typing import NamedTuple

import torch

from architecture import FAMILIES, ROPE_SCALING_KEYS, YARN_DEFAULTS, ModelConfig
from codelm.runs import rundir
from codelm.runtime import settings

# --------------------------------------------------------------------------- tables

# HF module -> (codelm module, part): which rows of the codelm module its output fills
# (None: all; q/k/v: that block of the fused [Q | K | V]; qkv_*: see part_rows).
# Llama's layout, which the later families keep: its ends, its attention, its SwiGLU MLP.
_MODEL_ENDS = {
    "model.embed_tokens": ("wte", None),
    "model.norm": ("norm_f", None),
    "lm_head": ("lm_head", None),
}
_ATTENTION = {
    "model.layers.{i}.input_layernorm": ("blocks.{i}.norm_1", None),
    "model.layers.{i}.self_attn.q_proj": ("blocks.{i}.attn.qkv", "q"),
    "model.layers.{i}.self_attn.k_proj": ("blocks.{i}.attn.qkv", "k"),
    "model.layers.{i}.self_attn.v_proj": ("blocks.{i}.attn.qkv", "v"),
    "model.layers.{i}.self_attn.o_proj": ("blocks.{i}.attn.proj", None),
}
_SWIGLU = {
    "model.layers.{i}.mlp.gate_proj": ("blocks.{i}.mlp.gate", None),
    "model.layers.{i}.mlp.up_proj": ("blocks.{i}.mlp.fc", None),
    "model.layers.{i}.mlp.down_proj": ("blocks.{i}.mlp.proj", None),
}
_NORM_2 = {"model.layers.{i}.post_attention_layernorm": ("blocks.{i}.norm_2", None)}
LLAMA_MODULES = {**_MODEL_ENDS, **_ATTENTION, **_NORM_2, **_SWIGLU}
QWEN3_MODULES = {
    **LLAMA_MODULES,
    "model.layers.{i}.self_attn.q_norm": ("blocks.{i}.attn.q_norm", None),
    "model.layers.{i}.self_attn.k_norm": ("blocks.{i}.attn.k_norm", None),
}
STARCODER2_MODULES = {
    **_MODEL_ENDS, **_ATTENTION, **_NORM_2,
    "model.layers.{i}.mlp.c_fc": ("blocks.{i}.mlp.fc", None),
    "model.layers.{i}.mlp.c_proj": ("blocks.{i}.mlp.proj", None),
}
PHI3_MODULES = {  # qkv_proj holds [Q | K | V] and gate_up_proj [gate | up], as codelm's do
    **_MODEL_ENDS, **_NORM_2,
    "model.layers.{i}.input_layernorm": ("blocks.{i}.norm_1", None),
    "model.layers.{i}.self_attn.qkv_proj": ("blocks.{i}.attn.qkv", None),
    "model.layers.{i}.self_attn.o_proj": ("blocks.{i}.attn.proj", None),
    "model.layers.{i}.mlp.gate_up_proj": ("blocks.{i}.mlp.fc", None),
    "model.layers.{i}.mlp.down_proj": ("blocks.{i}.mlp.proj", None),
}
GEMMA2_MODULES = {  # a norm on each branch's output too: the attention's takes Llama's name
    **_MODEL_ENDS, **_ATTENTION, **_SWIGLU,
    "model.layers.{i}.post_attention_layernorm": ("blocks.{i}.attn_out_norm", None),
    "model.layers.{i}.pre_feedforward_layernorm": ("blocks.{i}.norm_2", None),
    "model.layers.{i}.post_feedforward_layernorm": ("blocks.{i}.mlp_out_norm", None),
}
PHI_MODULES = {
    "model.embed_tokens": ("wte", None),
    "model.layers.{i}.input_layernorm": ("blocks.{i}.norm_1", None),
    "model.layers.{i}.self_attn.q_proj": ("blocks.{i}.attn.qkv", "q"),
    "model.layers.{i}.self_attn.k_proj": ("blocks.{i}.attn.qkv", "k"),
    "model.layers.{i}.self_attn.v_proj": ("blocks.{i}.attn.qkv", "v"),
    "model.layers.{i}.self_attn.dense": ("blocks.{i}.attn.proj", None),
    "model.layers.{i}.mlp.fc1": ("blocks.{i}.mlp.fc", None),
    "model.layers.{i}.mlp.fc2": ("blocks.{i}.mlp.proj", None),
    "model.final_layernorm": ("norm_f", None),
    "lm_head": ("lm_head", None),
}
CODEGEN_MODULES = {
    "transformer.wte": ("wte", None),
    "transformer.h.{i}.ln_1": ("blocks.{i}.norm_1", None),
    "transformer.h.{i}.attn.qkv_proj": ("blocks.{i}.attn.qkv", "qkv_codegen"),
    "transformer.h.{i}.attn.out_proj": ("blocks.{i}.attn.proj", None),
    "transformer.h.{i}.mlp.fc_in": ("blocks.{i}.mlp.fc", None),
    "transformer.h.{i}.mlp.fc_out": ("blocks.{i}.mlp.proj", None),
    "transformer.ln_f": ("norm_f", None),
    "lm_head": ("lm_head", None),
}
GPT_BIGCODE_MODULES = {
    "transformer.wte": ("wte", None),
    "transformer.wpe": ("wpe", None),
    "transformer.h.{i}.ln_1": ("blocks.{i}.norm_1", None),
    "transformer.h.{i}.attn.c_attn": ("blocks.{i}.attn.qkv", "qkv_bigcode"),
    "transformer.h.{i}.attn.c_proj": ("blocks.{i}.attn.proj", None),
    "transformer.h.{i}.ln_2": ("blocks.{i}.norm_2", None),
    "transformer.h.{i}.mlp.c_fc": ("blocks.{i}.mlp.fc", None),
    "transformer.h.{i}.mlp.c_proj": ("blocks.{i}.mlp.proj", None),
    "transformer.ln_f": ("norm_f", None),
    "lm_head": ("lm_head", None),
}

GEMMA_TANH_ACTS = ("gelu_pytorch_tanh", "gelu")
HF_ACT = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh",
          "gelu_fast": "gelu_tanh"}

# Training-only fields that a family's HF config may not carry (inference ignores them).
NOT_IN_HF_CONFIG = ("init", "init_std", "dropout", "embd_dropout", "attn_dropout")

# ModelConfig dropout field -> (HF key, the HF config class's default), per family: where
# transformers applies dropout in training (Llama: attention weights only).
_ATTENTION_DROPOUT = {"attn_dropout": ("attention_dropout", 0.0)}
DROPOUT_KEYS = {
    "llama": _ATTENTION_DROPOUT, "qwen2": _ATTENTION_DROPOUT, "qwen3": _ATTENTION_DROPOUT,
    "mistral": _ATTENTION_DROPOUT, "gemma": _ATTENTION_DROPOUT, "gemma2": _ATTENTION_DROPOUT,
    "starcoder2": {"dropout": ("residual_dropout", 0.0), "embd_dropout": ("embedding_dropout", 0.0),
                   "attn_dropout": ("attention_dropout", 0.0)},
    "phi3": {"dropout": ("resid_pdrop", 0.0), "embd_dropout": ("embd_pdrop", 0.0),
             "attn_dropout": ("attention_dropout", 0.0)},
    "phi": {"dropout": ("resid_pdrop", 0.0), "embd_dropout": ("embd_pdrop", 0.0),
            "attn_dropout": ("attention_dropout", 0.0)},
    "codegen": {"dropout": ("resid_pdrop", 0.0), "embd_dropout": ("embd_pdrop", 0.0),
                "attn_dropout": ("attn_pdrop", 0.0)},
    "stablelm": _ATTENTION_DROPOUT,  # hidden_dropout (the MLP's output only): refused unless 0
    "gpt_bigcode": {"dropout": ("resid_pdrop", 0.1), "embd_dropout": ("embd_pdrop", 0.1),
                    "attn_dropout": ("attn_pdrop", 0.1)},
}

_REQUIRED = object()
_KINDS = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}

# ModelConfig field -> (its HF keys, the first one written; the default of transformers' config
# class: _REQUIRED, or a function of the fields read before it), per family. The default's type
# is the value's (an int without one).
_LLAMA_LIKE = {"block_size": (("max_position_embeddings",), 2048),
               "n_layer": (("num_hidden_layers",), _REQUIRED),
               "n_embd": (("hidden_size",), _REQUIRED),
               "n_head": (("num_attention_heads",), _REQUIRED),
               "n_kv_head": (("num_key_value_heads",), lambda f: f["n_head"]),
               "mlp_hidden": (("intermediate_size",), _REQUIRED)}
_GPT_LIKE = {"n_layer": (("n_layer", "num_hidden_layers"), _REQUIRED),
             "n_embd": (("n_embd", "hidden_size"), _REQUIRED),
             "n_head": (("n_head", "num_attention_heads"), _REQUIRED),
             "mlp_hidden": (("n_inner",), lambda f: 4 * f["n_embd"]),
             "norm_eps": (("layer_norm_epsilon",), 1e-5)}
# num_key_value_heads where config.json leaves it out: the class's own number where it has one
# (Llama's, Phi's: one per query head); a null is one per query head (_fields).
def _kv_heads(default: int) -> dict:
    return {"n_kv_head": (("num_key_value_heads",), default)}


# head_dim where config.json leaves it out: hidden size / heads (transformers' getattr default).
_HEAD_DIM = {"head_dim": (("head_dim",), lambda f: f["n_embd"] // f["n_head"])}
HF_FIELDS = {
    "llama": {**_LLAMA_LIKE, **_HEAD_DIM,
              "norm_eps": (("rms_norm_eps",), 1e-6), "qkv_bias": (("attention_bias",), False),
              "mlp_bias": (("mlp_bias",), False)},
    "qwen2": {**_LLAMA_LIKE, **_kv_heads(32), **_HEAD_DIM,
              "block_size": (("max_position_embeddings",), 32768),
              "norm_eps": (("rms_norm_eps",), 1e-6)},
    "qwen3": {**_LLAMA_LIKE, **_kv_heads(32), "block_size": (("max_position_embeddings",), 32768),
              "head_dim": (("head_dim",), 128), "norm_eps": (("rms_norm_eps",), 1e-6),
              "qkv_bias": (("attention_bias",), False)},
    "mistral": {**_LLAMA_LIKE, **_kv_heads(8), **_HEAD_DIM,
                "block_size": (("max_position_embeddings",), 131072),
                "norm_eps": (("rms_norm_eps",), 1e-6)},
    "starcoder2": {**_LLAMA_LIKE, **_kv_heads(2), **_HEAD_DIM,
                   "block_size": (("max_position_embeddings",), 4096),
                   "norm_eps": (("norm_epsilon",), 1e-5), "qkv_bias": (("use_bias",), True)},
    "phi3": {**_LLAMA_LIKE, **_HEAD_DIM, "block_size": (("max_position_embeddings",), 4096),
             "norm_eps": (("rms_norm_eps",), 1e-5)},
    "gemma": {**_LLAMA_LIKE, **_kv_heads(16), "block_size": (("max_position_embeddings",), 8192),
              "head_dim": (("head_dim",), 256), "norm_eps": (("rms_norm_eps",), 1e-6),
              "qkv_bias": (("attention_bias",), False)},
    "gemma2": {**_LLAMA_LIKE, **_kv_heads(4), "block_size": (("max_position_embeddings",), 8192),
               "head_dim": (("head_dim",), 256), "norm_eps": (("rms_norm_eps",), 1e-6),
               "qkv_bias": (("attention_bias",), False)},
    "phi": {**_LLAMA_LIKE, **_HEAD_DIM, "norm_eps": (("layer_norm_eps",), 1e-5)},
    # StableLM: head_dim is always hidden size / heads (transformers reads no head_dim key)
    "stablelm": {**_LLAMA_LIKE, **_kv_heads(32), "block_size": (("max_position_embeddings",), 4096),
                 "norm_eps": (("layer_norm_eps",), 1e-5), "qkv_bias": (("use_qkv_bias",), False),
                 "parallel_residual": (("use_parallel_residual",), False)},
    "codegen": {"block_size": (("n_positions", "max_position_embeddings"), 2048), **_GPT_LIKE,
                "n_head": (("n_head", "num_attention_heads"), 16),
                "rotary_dim": (("rotary_dim",), 64)},
    "gpt_bigcode": {"block_size": (("n_positions", "max_position_embeddings"), 1024),
                    **_GPT_LIKE},
}


def _typed(key: str, value, kind: type):
    """value checked as a JSON value of kind, as transformers 5 checks it (64.0 reads as 64)."""
    if kind is int and isinstance(value, float) and value.is_integer():
        value = int(value)
    if (isinstance(value, bool) != (kind is bool)  # a JSON true is no number, 1 no boolean
            or not isinstance(value, (int, float) if kind is float else kind)):
        raise ValueError(f"{key}={value!r}: expected {_KINDS[kind]}")
    return kind(value)


def _get(hf: dict, *names: str, kind: type = int, default=_REQUIRED):
    """The first of names that is set (a null counts as absent, except for a boolean)."""
    for n in names:
        if hf.get(n) is not None or (kind is bool and n in hf):
            return _typed(n, hf[n], kind)
    if default is _REQUIRED:
        raise ValueError(f"missing field {' / '.join(names)!r}")
    return default


def _fields(hf: dict, family: str) -> dict:
    """The family's HF_FIELDS as ModelConfig keywords."""
    out = {}
    for field, (keys, default) in HF_FIELDS[family].items():
        default = default(out) if callable(default) else default
        if field == "n_kv_head" and any(k in hf and hf[k] is None for k in keys):
            default = out["n_head"]  # a null: one key/value head per query head
        out[field] = _get(hf, *keys, kind=int if default is _REQUIRED else type(default),
                          default=default)
        if field == "n_head" and out[field] < 1:  # the width is divided by it
            key = next(k for k in keys if hf.get(k) is not None)
            raise ValueError(f"{key}={out[field]}: must be a positive integer")
    return out


def _require(hf: dict, key: str, want, why: str) -> None:
    """A field codelm honours one way only: absent (or null), or exactly `want`."""
    if hf.get(key) is not None and _typed(key, hf[key], type(want)) != want:
        raise ValueError(f"{key}={hf[key]!r} cannot be honoured: {why}")


def _dropouts(hf: dict, family: str) -> dict:
    """The family's dropout fields as ModelConfig keywords (absent keys: the HF class default;
    ModelConfig checks their range)."""
    return {field: _get(hf, key, kind=float, default=default)
            for field, (key, default) in DROPOUT_KEYS[family].items()}


def _write_dropouts(c: ModelConfig) -> dict:
    """The family's dropout keys with c's values (the embeddings' resolved)."""
    p = {"dropout": c.dropout, "embd_dropout": c.embedding_dropout, "attn_dropout": c.attn_dropout}
    return {key: p[field] for field, (key, _) in DROPOUT_KEYS[c.family].items()}


def _act(hf: dict, key: str, default: str) -> str:
    act = _get(hf, key, kind=str, default=default)
    if act not in HF_ACT:
        raise ValueError(f"{key}={act!r} is not supported (supported: {sorted(HF_ACT)})")
    return HF_ACT[act]


def _rope(hf: dict, default_partial: float = 1.0) -> dict:
    """Rope fields as transformers' `standardize_rope_params` resolves them (`rope_scaling`
    before `rope_parameters`, then the top level)."""
    params = hf.get("rope_scaling") or hf.get("rope_parameters") or {}
    if not isinstance(params, dict) or (params and all(isinstance(v, dict)
                                                       for v in params.values())):
        raise ValueError(f"rope parameters {params!r} are not supported (one dict "
                         "of rope_type and its fields)")
    rope_type = params.get("rope_type") or params.get("type") or "default"

    def field(key: str, kind: type, default):
        return next((_typed(key, d[key], kind) for d in (params, hf)
                     if d.get(key) is not None), default)

    if "rope_theta" in hf and hf["rope_theta"] is None and params.get("rope_theta") is None:
        raise ValueError("rope_theta is null")
    out = {"rope_theta": field("rope_theta", float, 10000.0),
           "partial": field("partial_rotary_factor", float, default_partial),
           "rope_scaling": None}
    if rope_type != "default":
        out["rope_scaling"] = _rope_scaling(hf, params, rope_type)
    return out


def _rope_scaling(hf: dict, params: dict, rope_type: str) -> dict:
    """ModelConfig.rope_scaling of a scaled rope (``params``: the config's rope dict)."""
    if not isinstance(rope_type, str) or rope_type not in ROPE_SCALING_KEYS:
        raise ValueError(f"rope_type {rope_type!r} is not supported (supported: default, "
                         f"{', '.join(ROPE_SCALING_KEYS)})")
    src = dict(params)
    top = "original_max_position_embeddings"
    if rope_type in ("llama3", "yarn", "longrope"):  # transformers prefers the top-level key
        src[top] = hf[top] if top in hf else src.get(top, hf.get("max_position_embeddings"))
    if rope_type in ("yarn", "longrope") and src.get("factor") is None and src.get(top):
        src["factor"] = _get(hf, "max_position_embeddings") / _typed(top, src[top], int)
    if missing := [k for k in ROPE_SCALING_KEYS[rope_type] if src.get(k) is None]:
        raise ValueError(f"{rope_type} rope scaling lacks {missing}")
    scaling = {"rope_type": rope_type}
    for key in ROPE_SCALING_KEYS[rope_type]:
        if key in ("short_factor", "long_factor"):
            if not isinstance(src[key], list):
                raise ValueError(f"{key}={src[key]!r}: expected a list of numbers")
            scaling[key] = [_typed(key, value, float) for value in src[key]]
        else:
            scaling[key] = _typed(key, src[key], int if key == top else float)
    if rope_type == "longrope" and src.get("attention_factor") is not None:
        scaling["attention_factor"] = _typed("attention_factor", src["attention_factor"], float)
    if rope_type == "yarn":
        for key in YARN_DEFAULTS:
            if src.get(key) is not None:
                scaling[key] = _typed(key, src[key], bool if key == "truncate" else float)
    return scaling


def _write_rope(c: ModelConfig, **extra) -> dict:
    """The rope keys of config.json: rope_parameters, and the keys transformers < 5 reads."""
    rope = {"rope_type": "default", **(c.rope_scaling or {}), "rope_theta": c.rope_theta,
            **extra}
    legacy = {k: v for k, v in rope.items() if k != "rope_theta"} if c.rope_scaling else None
    if rope["rope_type"] == "longrope":
        return {"rope_parameters": rope, "rope_theta": c.rope_theta, **_write_longrope(c, rope)}
    return {"rope_parameters": rope, "rope_theta": c.rope_theta, "rope_scaling": legacy}


def _write_longrope(c: ModelConfig, rope: dict) -> dict:
    """Phi-3's LongRoPE keys as its checkpoints write them: rope_scaling of its type and two
    lists (transformers 4 refuses more; 5 reads it before rope_parameters), the factor and
    attention factor beside them only where they differ from what the context lengths imply,
    the original context at the top level."""
    context = rope["original_max_position_embeddings"]
    legacy = {"type": "longrope", "short_factor": rope["short_factor"],
              "long_factor": rope["long_factor"]}
    implied = {"factor": c.block_size / context, "attention_factor": None}
    for key, value in implied.items():
        if rope.get(key) is not None and rope[key] != value:
            legacy[key] = rope[key]
    return {"rope_scaling": legacy, "original_max_position_embeddings": context}


def _full_rope(hf: dict, family: str) -> dict:
    """The rope fields of a family that rotates every dim of a head."""
    rope = _rope(hf)
    if rope["partial"] != 1.0:
        raise ValueError(f"partial_rotary_factor != 1 cannot be honoured for {family}")
    return {"rope_theta": rope["rope_theta"], "rope_scaling": rope["rope_scaling"]}


def _nullable(hf: dict, key: str, kind: type, default):
    """A field whose null switches it off (None); absent, the class's default."""
    if key not in hf:
        return default
    return None if hf[key] is None else _typed(key, hf[key], kind)


# The family's sliding window when config.json names none (transformers' class default).
_WINDOW_DEFAULTS = {"mistral": 4096, "gemma2": 4096, "qwen2": 4096, "qwen3": 4096}
_LAYER_TYPES = ("sliding_attention", "full_attention")


def _windows(hf: dict, family: str, n_layer: int) -> dict:
    """sliding_window and sliding_layers as transformers derives them for the family: every
    layer slides (Mistral, StarCoder2, Phi-3), or as ``layer_types`` says, else Gemma 2's every
    other layer and Qwen's layers from max_window_layers on (with use_sliding_window)."""
    window = _nullable(hf, "sliding_window", int, _WINDOW_DEFAULTS.get(family))
    if family in ("qwen2", "qwen3") and not _get(hf, "use_sliding_window", kind=bool,
                                                  default=False):
        window = None
    layers = None
    types = hf.get("layer_types") if family in ("qwen2", "qwen3", "gemma2") else None
    if types is not None:
        if not (isinstance(types, list) and len(types) == n_layer
                and all(t in _LAYER_TYPES for t in types)):
            raise ValueError(f"layer_types: expected {n_layer} of {' or '.join(_LAYER_TYPES)}")
        layers = [t == "sliding_attention" for t in types]
    elif family == "gemma2":
        layers = [i % 2 == 0 for i in range(n_layer)]
    elif family in ("qwen2", "qwen3"):
        first = _get(hf, "max_window_layers", default=28)
        layers = [i >= first for i in range(n_layer)]
    if window is None or (layers is not None and not any(layers)):
        return {"sliding_window": None, "sliding_layers": None}
    return {"sliding_window": window, "sliding_layers": None if layers is None or all(layers)
            else layers}


def _write_windows(c: ModelConfig) -> dict:
    """The sliding-window keys of config.json (per-layer only where the family has them)."""
    out = {"sliding_window": c.sliding_window}
    if c.family in ("qwen2", "qwen3"):
        out["use_sliding_window"] = c.sliding_window is not None
    if c.family in ("qwen2", "qwen3", "gemma2"):
        out["layer_types"] = [_LAYER_TYPES[0] if c.slides(i) else _LAYER_TYPES[1]
                              for i in range(c.n_layer)]
    return out


def _eos(hf: dict) -> int | list[int] | None:
    """Kept as written: chat checkpoints list several ids, and the export must stop on each."""
    eos = hf.get("eos_token_id")
    if eos is None:
        return None
    ids = [_typed("eos_token_id", e, int) for e in (eos if isinstance(eos, list) else [eos])]
    return (ids if len(ids) > 1 else ids[0]) if ids else None


# The families whose HF embedding has no padding_idx: their pad_token_id's row trains too.
_PAD_ROW_TRAINS = frozenset({"gpt_bigcode", "codegen"})


def _shared(hf: dict, family: str, tie_default: bool = False) -> dict:
    """The ModelConfig fields every family reads alike."""
    pad_id = _get(hf, "pad_token_id", default=None)
    vocab_size = _get(hf, "vocab_size")
    return dict(family=family, vocab_size=vocab_size, **_dropouts(hf, family),
                tie_embeddings=_get(hf, "tie_word_embeddings", kind=bool, default=tie_default),
                bos_id=_get(hf, "bos_token_id", default=None), eos_id=_eos(hf), pad_id=pad_id,
                pad_row_frozen=(family not in _PAD_ROW_TRAINS and pad_id is not None
                                and 0 <= pad_id < vocab_size))


def _read_llama(hf: dict) -> ModelConfig:
    _require(hf, "hidden_act", "silu", "codelm's SwiGLU uses silu")
    f = _fields(hf, "llama")
    rope = _rope(hf)
    if rope["partial"] != 1.0:
        raise ValueError("partial_rotary_factor != 1 cannot be honoured for llama")
    return ModelConfig(**_shared(hf, "llama"), **f, norm="rmsnorm", mlp="swiglu", positions="rope",
                       rope_theta=rope["rope_theta"], rope_scaling=rope["rope_scaling"],
                       attn_proj_bias=f["qkv_bias"])


def _read_qwen2(hf: dict) -> ModelConfig:
    _require(hf, "hidden_act", "silu", "codelm's SwiGLU uses silu")
    f = _fields(hf, "qwen2")
    return ModelConfig(**_shared(hf, "qwen2"), **f, **_full_rope(hf, "qwen2"),
                       **_windows(hf, "qwen2", f["n_layer"]), norm="rmsnorm", mlp="swiglu",
                       positions="rope", qkv_bias=True)


def _read_qwen3(hf: dict) -> ModelConfig:
    _require(hf, "hidden_act", "silu", "codelm's SwiGLU uses silu")
    f = _fields(hf, "qwen3")
    return ModelConfig(**_shared(hf, "qwen3"), **f, **_full_rope(hf, "qwen3"),
                       **_windows(hf, "qwen3", f["n_layer"]), norm="rmsnorm", mlp="swiglu",
                       positions="rope", qk_norm=True, attn_proj_bias=f["qkv_bias"])


def _read_mistral(hf: dict) -> ModelConfig:
    _require(hf, "hidden_act", "silu", "codelm's SwiGLU uses silu")
    f = _fields(hf, "mistral")
    return ModelConfig(**_shared(hf, "mistral"), **f, **_full_rope(hf, "mistral"),
                       **_windows(hf, "mistral", f["n_layer"]), norm="rmsnorm", mlp="swiglu",
                       positions="rope")


def _read_starcoder2(hf: dict) -> ModelConfig:
    f = _fields(hf, "starcoder2")  # use_bias (qkv_bias): every linear's bias
    return ModelConfig(**_shared(hf, "starcoder2", tie_default=True), **f,
                       **_full_rope(hf, "starcoder2"), **_windows(hf, "starcoder2", f["n_layer"]),
                       norm="layernorm", mlp=_act(hf, "hidden_act", "gelu_pytorch_tanh"),
                       positions="rope", attn_proj_bias=f["qkv_bias"], mlp_bias=f["qkv_bias"])


# Phi3Config's original_max_position_embeddings where config.json leaves it out.
PHI3_ORIGINAL_CONTEXT = 4096


def _phi3_rope_names(hf: dict) -> dict:
    """``hf`` with a rope dict of type "su" or "yarn" (Phi-3's first configs) named longrope,
    as Phi3Config renames it."""
    out = dict(hf)
    for key in ("rope_scaling", "rope_parameters"):
        params = hf.get(key)
        if isinstance(params, dict) and (params.get("rope_type") or params.get("type")) in (
                "su", "yarn"):
            out[key] = {**params, "rope_type": "longrope", "type": "longrope"}
    return out


def _read_phi3(hf: dict) -> ModelConfig:
    _require(hf, "hidden_act", "silu", "codelm's SwiGLU uses silu")
    hf = _phi3_rope_names(hf)
    f = _fields(hf, "phi3")
    # Phi3Config always has a top-level original context (4096 where config.json names none),
    # and transformers takes it over the rope dict's
    rope = _rope({"original_max_position_embeddings": PHI3_ORIGINAL_CONTEXT, **hf})
    scaling = rope["rope_scaling"]
    if scaling is not None and scaling["rope_type"] != "longrope":
        raise ValueError(f"rope scaling {scaling['rope_type']!r} cannot be honoured for phi3: "
                         "transformers' Phi-3 takes longrope alone")
    return ModelConfig(**_shared(hf, "phi3"), **f, **_windows(hf, "phi3", f["n_layer"]),
                       norm="rmsnorm", mlp="swiglu", fused_gate_up=True, positions="rope",
                       rotary_dim=int(f["head_dim"] * rope["partial"]),
                       rope_theta=rope["rope_theta"], rope_scaling=rope["rope_scaling"],
                       longrope_reprefill=True)


def _read_gemma(hf: dict) -> ModelConfig:
    """Gemma (CodeGemma): Llama's layout with GeGLU, scaled embeddings and weights + 1 norms."""
    act = _get(hf, "hidden_act", kind=str, default="gelu_pytorch_tanh")
    if act not in GEMMA_TANH_ACTS:  # GemmaConfig reads the released "gelu" as GELU-tanh
        raise ValueError(f"hidden_act={act!r} cannot be honoured: codelm's GeGLU uses GELU-tanh "
                         f"(Gemma reads {' or '.join(GEMMA_TANH_ACTS)})")
    _require(hf, "use_bidirectional_attention", False, "attention is causal")
    f = _fields(hf, "gemma")
    return ModelConfig(**_shared(hf, "gemma", tie_default=True), **f, **_full_rope(hf, "gemma"),
                       norm="rmsnorm", norm_offset=1.0, mlp="geglu", positions="rope",
                       attn_proj_bias=f["qkv_bias"], scale_embeddings=True)


def _read_gemma2(hf: dict) -> ModelConfig:
    _require(hf, "hidden_activation", "gelu_pytorch_tanh", "codelm's GeGLU uses GELU-tanh")
    _require(hf, "use_bidirectional_attention", False, "attention is causal")
    f = _fields(hf, "gemma2")
    scalar = _get(hf, "query_pre_attn_scalar", kind=float, default=256.0)
    if not scalar > 0:  # its inverse square root scales the scores
        raise ValueError(f"query_pre_attn_scalar={hf['query_pre_attn_scalar']!r}: must be a "
                         "positive number")
    return ModelConfig(
        **_shared(hf, "gemma2", tie_default=True), **f, **_full_rope(hf, "gemma2"),
        **_windows(hf, "gemma2", f["n_layer"]), norm="rmsnorm", norm_offset=1.0, post_norms=True,
        mlp="geglu", positions="rope", attn_proj_bias=f["qkv_bias"], scale_embeddings=True,
        attn_scale=None if scalar == f["head_dim"] else scalar ** -0.5,  # None: SDPA's own
        attn_softcap=_nullable(hf, "attn_logit_softcapping", float, 50.0),
        logit_softcap=_nullable(hf, "final_logit_softcapping", float, 30.0))


def _read_phi(hf: dict) -> ModelConfig:
    _require(hf, "qk_layernorm", False, "query/key LayerNorm is not implemented")
    f = _fields(hf, "phi")
    rope = _rope(hf, default_partial=0.5)
    if rope["rope_scaling"] is not None:
        raise ValueError("rope scaling cannot be honoured for phi")
    return ModelConfig(
        **_shared(hf, "phi"), **f, norm="layernorm", mlp=_act(hf, "hidden_act", "gelu_new"),
        positions="rope", rotary_dim=int(f["head_dim"] * rope["partial"]),
        rope_theta=rope["rope_theta"], parallel_residual=True, qkv_bias=True,
        attn_proj_bias=True, mlp_bias=True, lm_head_bias=True)


def _read_stablelm(hf: dict) -> ModelConfig:
    """StableLM (2): Llama's layout with LayerNorm (biased), partial rotary (a quarter) and
    optional q/k/v biases and parallel residual."""
    _require(hf, "hidden_act", "silu", "codelm's SwiGLU uses silu")
    _require(hf, "qk_layernorm", False, "per-head query/key LayerNorm is not implemented")
    _require(hf, "hidden_dropout", 0.0, "codelm's residual dropout is on both branches, "
             "StableLM's on the MLP's output only")
    f = _fields(hf, "stablelm")
    rope = _rope(hf, default_partial=0.25)
    if rope["rope_scaling"] is not None:
        raise ValueError("rope scaling cannot be honoured for stablelm")
    head_dim = f["n_embd"] // f["n_head"]
    return ModelConfig(
        **_shared(hf, "stablelm"), **f, norm="layernorm", mlp="swiglu", positions="rope",
        rotary_dim=int(head_dim * rope["partial"]), rope_theta=rope["rope_theta"])


def _read_codegen(hf: dict) -> ModelConfig:
    f = _fields(hf, "codegen")
    if f["n_head"] % 4:
        raise ValueError(f"n_head={f['n_head']} cannot be honoured: CodeGen's qkv_proj "
                         "is laid out in 4 chunks, so n_head must be a multiple of 4")
    return ModelConfig(
        **_shared(hf, "codegen"), **f, norm="layernorm",
        mlp=_act(hf, "activation_function", "gelu_new"), positions="rope",
        rope_interleaved=True, parallel_residual=True, mlp_bias=True, lm_head_bias=True)


def _read_gpt_bigcode(hf: dict) -> ModelConfig:
    _require(hf, "scale_attn_weights", True, "attention is always scaled by 1/sqrt(head_dim)")
    _require(hf, "add_cross_attention", False, "cross-attention is not implemented")
    f = _fields(hf, "gpt_bigcode")
    return ModelConfig(
        **_shared(hf, "gpt_bigcode", tie_default=True), **f,
        n_kv_head=1 if _get(hf, "multi_query", kind=bool, default=True) else f["n_head"],
        norm="layernorm", mlp=_act(hf, "activation_function", "gelu_pytorch_tanh"),
        positions="learned", qkv_bias=True, attn_proj_bias=True, mlp_bias=True)


# What a family's config.json holds besides HF_FIELDS and the shared keys. (No SwiGLU but
# Llama's: hf_config's round-trip check names the mlp a family cannot express.)
_HF_ACT_NAME = {"gpt_bigcode": {"gelu": "gelu", "gelu_tanh": "gelu_pytorch_tanh"},
                "codegen": {"gelu": "gelu", "gelu_tanh": "gelu_new"},
                "phi": {"gelu": "gelu", "gelu_tanh": "gelu_new"}}


def _write_llama(c: ModelConfig) -> dict:
    return {"hidden_act": "silu", **_write_rope(c)}


def _write_llama_like(c: ModelConfig) -> dict:
    """Qwen2, Qwen3, Mistral: Llama's keys and the sliding window's."""
    return {"hidden_act": "silu", **_write_rope(c), **_write_windows(c)}


def _write_starcoder2(c: ModelConfig) -> dict:
    return {"hidden_act": _HF_ACT_NAME["gpt_bigcode"].get(c.mlp), **_write_rope(c),
            **_write_windows(c)}


def _write_phi3(c: ModelConfig) -> dict:
    return {"hidden_act": "silu", **_write_rope(c, partial_rotary_factor=c.rotary_dim / c.head_dim),
            "partial_rotary_factor": c.rotary_dim / c.head_dim, **_write_windows(c)}


def _write_gemma(c: ModelConfig) -> dict:
    return {"hidden_act": "gelu_pytorch_tanh", **_write_rope(c)}


def _write_gemma2(c: ModelConfig) -> dict:
    # an integer in transformers' config; a scale it cannot give fails hf_config's round trip
    scalar = round(c.attn_scale ** -2) if c.attn_scale is not None else c.head_dim
    return {"hidden_activation": "gelu_pytorch_tanh", **_write_rope(c), **_write_windows(c),
            "query_pre_attn_scalar": scalar, "attn_logit_softcapping": c.attn_softcap,
            "final_logit_softcapping": c.logit_softcap}


def _write_phi(c: ModelConfig) -> dict:
    rope = {"rope_theta": c.rope_theta, "partial_rotary_factor": c.rotary_dim / c.head_dim}
    return {"hidden_act": _HF_ACT_NAME["phi"].get(c.mlp),
            "rope_parameters": {"rope_type": "default", **rope}, **rope, "qk_layernorm": False}


def _write_stablelm(c: ModelConfig) -> dict:
    rope = {"rope_theta": c.rope_theta, "partial_rotary_factor": c.rotary_dim / c.head_dim}
    return {"hidden_act": "silu", "rope_parameters": {"rope_type": "default", **rope}, **rope,
            "qk_layernorm": False, "hidden_dropout": 0.0}


def _write_codegen(c: ModelConfig) -> dict:
    return {"n_ctx": c.block_size, "activation_function": _HF_ACT_NAME["codegen"].get(c.mlp)}


def _write_gpt_bigcode(c: ModelConfig) -> dict:
    return {"multi_query": c.n_kv_head == 1, "scale_attn_weights": True,
            "activation_function": _HF_ACT_NAME["gpt_bigcode"].get(c.mlp)}


@dataclass(frozen=True)
class FamilyTable:
    modules: dict[str, tuple[str, str | None]]
    ignored_suffixes: tuple[str, ...]  # buffers some checkpoints carry (masks, rotary caches)
    architecture: str
    read_config: Callable[[dict], ModelConfig]
    write_config: Callable[[ModelConfig], dict]


TABLES: dict[str, FamilyTable] = {
    "llama": FamilyTable(LLAMA_MODULES, (".rotary_emb.inv_freq",), "LlamaForCausalLM",
                         _read_llama, _write_llama),
    "qwen2": FamilyTable(LLAMA_MODULES, (".rotary_emb.inv_freq",), "Qwen2ForCausalLM",
                         _read_qwen2, _write_llama_like),
    "qwen3": FamilyTable(QWEN3_MODULES, (".rotary_emb.inv_freq",), "Qwen3ForCausalLM",
                         _read_qwen3, _write_llama_like),
    "mistral": FamilyTable(LLAMA_MODULES, (".rotary_emb.inv_freq",), "MistralForCausalLM",
                           _read_mistral, _write_llama_like),
    "starcoder2": FamilyTable(STARCODER2_MODULES, (".rotary_emb.inv_freq",),
                              "Starcoder2ForCausalLM", _read_starcoder2, _write_starcoder2),
    "phi3": FamilyTable(PHI3_MODULES, (".rotary_emb.inv_freq",), "Phi3ForCausalLM",
                        _read_phi3, _write_phi3),
    "gemma": FamilyTable(LLAMA_MODULES, (".rotary_emb.inv_freq",), "GemmaForCausalLM",
                         _read_gemma, _write_gemma),
    "gemma2": FamilyTable(GEMMA2_MODULES, (".rotary_emb.inv_freq",), "Gemma2ForCausalLM",
                          _read_gemma2, _write_gemma2),
    "phi": FamilyTable(PHI_MODULES, (".rotary_emb.inv_freq",), "PhiForCausalLM",
                       _read_phi, _write_phi),
    "stablelm": FamilyTable(LLAMA_MODULES, (".rotary_emb.inv_freq",), "StableLmForCausalLM",
                            _read_stablelm, _write_stablelm),
    "codegen": FamilyTable(CODEGEN_MODULES, (".attn.causal_mask", ".attn.masked_bias",
                           ".attn.bias"), "CodeGenForCausalLM", _read_codegen, _write_codegen),
    "gpt_bigcode": FamilyTable(GPT_BIGCODE_MODULES, (".attn.masked_bias", ".attn.bias",
                               "transformer.bias"), "GPTBigCodeForCausalLM",
                               _read_gpt_bigcode, _write_gpt_bigcode),
}


def _check_every_family_is_in_every_table() -> None:
    """A family is architecture.FAMILIES' name and an entry of each table here (a new family:
    docs/contracts.md, "Adding a model family")."""
    for table_name, table in (("TABLES", TABLES), ("HF_FIELDS", HF_FIELDS),
                              ("DROPOUT_KEYS", DROPOUT_KEYS)):
        if set(table) != set(FAMILIES):
            raise ImportError(f"codelm/models/families.py: {table_name} lacks "
                              f"{sorted(set(FAMILIES) - set(table))} and has "
                              f"{sorted(set(table) - set(FAMILIES))} beyond architecture.FAMILIES")


_check_every_family_is_in_every_table()


# ------------------------------------------------------------------------- row maps

def part_rows(cfg: ModelConfig, part: str | None) -> torch.Tensor | None:
    """rows[j] = row of the codelm module's output that is row j of the HF module's output."""
    if part is None:
        return None
    hd, nh, nkv = cfg.head_dim, cfg.n_head, cfg.n_kv_head
    q, kv = nh * hd, nkv * hd
    if part in ("q", "k", "v"):
        start = {"q": 0, "k": q, "v": q + kv}[part]
        return torch.arange(start, start + (q if part == "q" else kv))
    heads = torch.arange(nh)[:, None] * hd + torch.arange(hd)  # (nh, hd) offsets inside Q
    if part == "qkv_codegen":
        # 4 chunks (CodeGen's TPU shards), each [q | v | k] for nh / 4 heads.
        chunk = heads.view(4, nh // 4 * hd)
        return torch.cat([torch.cat((chunk[c], chunk[c] + 2 * q, chunk[c] + q)) for c in range(4)])
    assert part == "qkv_bigcode", part
    if nkv == 1:  # multi-query: already [Q all heads | K | V]
        return None
    return torch.stack((heads, heads + q, heads + 2 * q), dim=1).reshape(-1)


class ModuleSlot(NamedTuple):  # unpacks as (path, rows)
    path: str
    rows: torch.Tensor | None


def expand(table: FamilyTable, cfg: ModelConfig) -> dict[str, tuple[str, str | None]]:
    """HF module name -> (codelm module path, part), with layer templates expanded."""
    expanded = {}
    for hf, (path, part) in table.modules.items():
        layers = range(cfg.n_layer) if "{i}" in hf else (None,)
        for i in layers:
            expanded[hf.format(i=i)] = (path.format(i=i), part)
    return expanded


def hf_module_slots(cfg: ModelConfig) -> dict[str, ModuleSlot]:
    """Every HF module name of cfg.family -> the codelm module and rows it corresponds to."""
    slots = {}
    for hf, (path, part) in expand(TABLES[cfg.family], cfg).items():
        if cfg.parallel_residual and path.endswith("norm_2"):  # one norm feeds both branches
            continue
        slots[hf] = ModuleSlot(path, part_rows(cfg, part))
    return slots


# ------------------------------------------------------------------------- config.json

class CheckpointConfig(NamedTuple):
    """A checkpoint directory's config.json: the model it describes, and the file's keys."""

    model: ModelConfig
    hf: dict


def read_config(directory: str | Path) -> CheckpointConfig:
    """The ModelConfig and raw HF config of a checkpoint directory's config.json."""
    path = Path(directory) / "config.json"
    if not path.exists():
        raise ValueError(f"{path}: not found (is {directory} an HF checkpoint directory?)")
    hf = settings.read_json_object(path, "model config")
    model_type = hf.get("model_type")
    if rundir.is_run_config(hf):
        run = Path(directory)  # or its best/ or one of its checkpoints: the run's weight files
        if any((run / f).is_file() for f in (rundir.MODEL_FILE, rundir.ADAPTER_FILE)):
            run = run.parent.parent if run.parent.name == rundir.CHECKPOINTS_DIR else run.parent
        what = "a codelm run directory" if run == Path(directory) else f"weights of run {run}"
        export = run / rundir.EXPORT_DIR
        if hf.get("lora_r"):  # its export is an adapter
            raise ValueError(f"{directory}: {what}, not an HF checkpoint: a LoRA run, whose "
                             f"export {export} is an adapter: train it on with --init-adapter "
                             f"{export}, or start from its merged model {export / rundir.MERGED_DIR}"
                             f" (--export-merged writes it); or continue the run with --resume "
                             f"{run}")
        raise ValueError(f"{directory}: {what}, not an HF checkpoint; load its export {export}, "
                         f"or continue it with --resume {run}")
    if not isinstance(model_type, str) or model_type not in TABLES:
        raise ValueError(f"{path}: unknown model_type {model_type!r}; supported: "
                         f"{', '.join(FAMILIES)}")
    if qc := hf.get("quantization_config"):
        method = qc.get("quant_method", "unknown") if isinstance(qc, dict) else qc
        raise ValueError(f"{path}: a quantized checkpoint (quant_method {method!r}) cannot be "
                         "loaded; use the full-precision one")
    try:
        return CheckpointConfig(TABLES[model_type].read_config(hf), hf)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None


def hf_config(cfg: ModelConfig, dtype: torch.dtype) -> dict:
    """The HF config.json of cfg; refuses a config the family cannot express."""
    table = TABLES[cfg.family]
    out = {"architectures": [table.architecture], "model_type": cfg.family,
           "vocab_size": cfg.vocab_size, **table.write_config(cfg), **_write_dropouts(cfg),
           **{keys[0]: getattr(cfg, f) for f, (keys, _) in HF_FIELDS[cfg.family].items()},
           "tie_word_embeddings": cfg.tie_embeddings,
           "bos_token_id": cfg.bos_id, "eos_token_id": cfg.eos_id, "pad_token_id": cfg.pad_id,
           "dtype": str(dtype).removeprefix("torch."),
           "torch_dtype": str(dtype).removeprefix("torch.")}  # the name transformers < 5 reads
    back = table.read_config(out)
    differ = [f.name for f in fields(ModelConfig)
              if f.name not in NOT_IN_HF_CONFIG and getattr(back, f.name) != getattr(cfg, f.name)]
    if differ:
        raise ValueError(f"cannot export as {cfg.family!r}: the HF layout cannot express "
                         f"ModelConfig fields {differ}")
    return out


# ------------------------------------------------------------------------- llama.cpp

# The tensor types a GGUF export writes the matrices in (--outtype, --export-gguf).
OUTTYPES = ("f32", "f16", "bf16", "q8_0")


@dataclass(frozen=True)
class GgufFamily:
    arch: str  # llama.cpp's architecture name
    permute_qk: bool = False  # llama.cpp rotates pairs (0,1),(2,3): HF's half-split q/k rows move
    sliding: bool = False  # llama.cpp honours a sliding window (else every layer sees it all)
    parallel_key: bool = False  # its converter writes use_parallel_residual
    tied_head: bool = False  # llama.cpp computes the logits with the token embedding
    head_required: bool = False  # llama.cpp loads output.weight, a tied head's too


# codelm family -> llama.cpp architecture (CodeGen has none).
GGUF_FAMILIES = {
    "llama": GgufFamily("llama", permute_qk=True),
    "mistral": GgufFamily("llama", permute_qk=True),
    "qwen2": GgufFamily("qwen2"),
    "qwen3": GgufFamily("qwen3"),
    "starcoder2": GgufFamily("starcoder2"),
    "gpt_bigcode": GgufFamily("starcoder"),
    "phi": GgufFamily("phi2", head_required=True),
    "phi3": GgufFamily("phi3"),
    "gemma": GgufFamily("gemma", tied_head=True),
    "gemma2": GgufFamily("gemma2", sliding=True, tied_head=True),
    "stablelm": GgufFamily("stablelm", parallel_key=True, head_required=True),
}


def check_architecture(cfg: ModelConfig) -> None:
    """Refuse, naming the reason, an architecture llama.cpp lacks or computes differently: known
    from the model's config alone, before its weights or tokenizer are read."""
    if cfg.family not in GGUF_FAMILIES:
        raise ValueError(f"family {cfg.family!r}: llama.cpp has no architecture for it; GGUF "
                         f"export covers {', '.join(sorted(GGUF_FAMILIES))} (use the HF export "
                         "with transformers, or vLLM)")
    scaling = (cfg.rope_scaling or {}).get("rope_type")
    if scaling not in (None, "linear", "llama3", "yarn", "longrope") or (
            scaling == "llama3" and not GGUF_FAMILIES[cfg.family].permute_qk) or (
            scaling == "longrope" and cfg.family != "phi3"):
        raise ValueError(f"rope_scaling {scaling!r}: llama.cpp's {GGUF_FAMILIES[cfg.family].arch}"
                         " has no such scaling")
    if cfg.attn_scale is not None and abs(cfg.attn_scale - cfg.head_dim ** -0.5) > 1e-9:
        raise ValueError(f"attention scale {cfg.attn_scale:g} (not 1/sqrt(head_dim)): llama.cpp "
                         "derives the scale from head_dim")
    if scaling == "yarn" and (changed := _yarn_options_changed(cfg.rope_scaling)):
        raise ValueError(f"rope_scaling yarn with {changed}: llama.cpp's GGUF reads YaRN's "
                         "factor and original context only")
    if cfg.family == "gpt_bigcode" and cfg.n_kv_head != 1:
        raise ValueError(f"GPTBigCode with {cfg.n_kv_head} key/value heads (multi_query false): "
                         "llama.cpp's starcoder reads a multi-query model's fused qkv only")
    if GGUF_FAMILIES[cfg.family].tied_head and not cfg.tie_embeddings:
        raise ValueError(f"{cfg.family} with an lm_head apart from its embedding "
                         f"(tie_word_embeddings false): llama.cpp's {GGUF_FAMILIES[cfg.family].arch}"
                         " computes logits with the token embedding")
    if GGUF_FAMILIES[cfg.family].sliding:
        _check_gemma2(cfg)


# YaRN's options that llama.cpp's GGUF does not carry, at the values it assumes (transformers').
_YARN_DEFAULTS = {"beta_fast": 32, "beta_slow": 1, "attention_factor": None, "mscale": None,
                  "mscale_all_dim": None, "truncate": True}


def _yarn_options_changed(scaling: dict) -> str:
    """The YaRN options of ``scaling`` set away from what llama.cpp assumes, as key=value."""
    changed = [f"{key}={scaling[key]}" for key, default in _YARN_DEFAULTS.items()
               if scaling.get(key, default) != default]
    return ", ".join(changed)


def _check_gemma2(cfg: ModelConfig) -> None:
    """Refuse what llama.cpp's gemma2 computes otherwise: it always soft-caps (50 and 30 where
    the file names no cap) and slides every other layer's attention, from the first."""
    if cfg.attn_softcap is None or cfg.logit_softcap is None:
        raise ValueError("Gemma 2 without attention or final logit soft-capping: llama.cpp's "
                         "gemma2 always soft-caps")
    alternating = [layer % 2 == 0 for layer in range(cfg.n_layer)]
    if cfg.sliding_window is None or [cfg.slides(layer) for layer in range(cfg.n_layer)] != (
            alternating):
        raise ValueError("Gemma 2 whose sliding window is not on every other layer from the "
                         "first: llama.cpp's gemma2 slides exactly those")


def context_length(cfg: ModelConfig, family: GgufFamily) -> int:
    """The context over which llama.cpp computes what codelm does: an architecture that ignores
    a sliding window agrees with it only up to the window's length."""
    windowed = any(cfg.slides(layer) for layer in range(cfg.n_layer))
    if windowed and not family.sliding:
        return min(cfg.block_size, cfg.sliding_window)
    return cfg.block_size
