"""One decoder-only transformer for every family of FAMILIES (StarCoder's GPTBigCode, CodeGen,
Phi-1.5, Phi-3, Llama, Qwen2 and Qwen3, Mistral, StarCoder2, Gemma and Gemma 2, StableLM) and the
from-scratch models of the research path.

The families differ only in flags of `ModelConfig`; `Transformer` is the one model class. Every op
is plain PyTorch; a function marked `@kernels.faster(...)` runs a faster equivalent from
codelm/kernels.py (on by default). Generation lives in codelm/models/generation.py; HF checkpoints
are read and written by codelm/models/pretrained.py.
"""

from __future__ import annotations

if __name__ == "__main__":  # first: the imports below load torch for seconds
    from codelm.runtime import process

    process.quiet_start_up_stops()

import copy
import math
import sys
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import asdict, dataclass, replace
from functools import partial

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from codelm import kernels
from codelm.kernels import IGNORE_INDEX

FAMILIES = ("gpt_bigcode", "codegen", "phi", "llama", "qwen2", "qwen3", "mistral", "starcoder2",
            "phi3", "gemma", "gemma2", "stablelm")
LLAMA3_SCALING_KEYS = ("factor", "low_freq_factor", "high_freq_factor",
                       "original_max_position_embeddings")
# rope_scaling's "rope_type" -> the keys it needs besides it ("dynamic" keeps the plain
# frequencies inside the context, where transformers' dynamic NTK scaling changes nothing;
# "longrope": Phi-3's, per-frequency divisors, the long ones for a sequence past the original
# context, and "attention_factor" optional).
ROPE_SCALING_KEYS = {"llama3": LLAMA3_SCALING_KEYS, "linear": ("factor",),
                     "dynamic": ("factor",), "yarn": ("factor", "original_max_position_embeddings"),
                     "longrope": ("factor", "original_max_position_embeddings", "short_factor",
                                  "long_factor")}
# yarn's optional keys and their defaults (as transformers reads them).
YARN_DEFAULTS = {"beta_fast": 32.0, "beta_slow": 1.0, "attention_factor": None, "mscale": None,
                 "mscale_all_dim": None, "truncate": True}


@dataclass
class ModelConfig:
    """Every flag the families and the from-scratch models need (litgpt style).

    n_kv_head, head_dim and rotary_dim are resolved from the others when left None; a config
    derived with `dataclasses.replace` keeps the resolved values, so set them there too."""

    family: str = "llama"  # the HF layout pretrained.save writes: one of FAMILIES
    vocab_size: int = 8192
    block_size: int = 512  # context length
    n_layer: int = 6
    n_head: int = 6
    n_kv_head: int | None = None  # None: n_head; 1: multi-query; fewer: grouped-query
    n_embd: int = 384
    head_dim: int | None = None  # None: n_embd // n_head
    mlp_hidden: int = 1024  # MLP width (gated: the width of gate and of up each)
    # -- norms
    norm: str = "rmsnorm"  # layernorm | rmsnorm
    norm_eps: float = 1e-5
    norm_offset: float = 0.0  # RMSNorm scales by offset + weight (Gemma: 1, it stores weight - 1)
    post_norms: bool = False  # norms on the attention's and the MLP's outputs too (Gemma 2)
    qk_norm: bool = False  # RMSNorm over each head's queries and keys, before RoPE (Qwen3)
    # -- MLP
    mlp: str = "swiglu"  # gelu (exact) | gelu_tanh | swiglu | geglu (gated, GELU-tanh: Gemma)
    fused_gate_up: bool = False  # a gated MLP's gate and up as one Linear [gate | up] (Phi-3)
    # -- positions
    positions: str = "rope"  # learned | rope
    rotary_dim: int | None = None  # rotated dims per head; None: all (partial for Phi, CodeGen)
    rope_interleaved: bool = False  # pairs (0,1),(2,3).. as in CodeGen/GPT-J; else half-split
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  # {"rope_type": one of ROPE_SCALING_KEYS, and its keys}
    longrope_reprefill: bool = False  # decoding past the original context recomputes the cache
    # with LongRoPE's long frequencies (transformers' Phi-3; its other families keep the cache)
    # -- attention
    sliding_window: int | None = None  # a query sees this many latest positions, its own included
    sliding_layers: list[bool] | None = None  # which layers slide; None: all (with a window)
    attn_scale: float | None = None  # of the scores; None: 1 / sqrt(head_dim)
    attn_softcap: float | None = None  # scores -> cap * tanh(scores / cap) (Gemma 2)
    logit_softcap: float | None = None  # the same on the final logits (Gemma 2)
    # -- layout
    parallel_residual: bool = False  # x + attn(ln(x)) + mlp(ln(x)) with one shared norm
    scale_embeddings: bool = False  # the embeddings times sqrt(n_embd) (Gemma)
    qkv_bias: bool = False
    attn_proj_bias: bool = False
    mlp_bias: bool = False
    lm_head_bias: bool = False
    tie_embeddings: bool = False
    dropout: float = 0.0  # residual branches (attention and MLP outputs)
    embd_dropout: float | None = None  # embeddings (HF's embd_pdrop); None: `dropout`'s value
    attn_dropout: float = 0.0  # attention probabilities
    init: str = "normal"  # normal: GPT-2 N(0, init_std), scaled residual projections; xavier
    init_std: float = 0.02
    bos_id: int | None = None  # written to the exported HF config
    eos_id: int | list[int] | None = None  # a list where the checkpoint has several (chat models)
    pad_id: int | None = None  # written to the exported HF config
    pad_row_frozen: bool = False  # pad_id's embedding row gets no gradient (HF's padding_idx)

    def __post_init__(self) -> None:
        def bad(key: str, why: str) -> ValueError:
            return ValueError(f"ModelConfig.{key}={getattr(self, key)!r}: {why}")

        for key, allowed in (("family", FAMILIES), ("norm", ("layernorm", "rmsnorm")),
                             ("mlp", ("gelu", "gelu_tanh", "swiglu", "geglu")),
                             ("positions", ("learned", "rope")), ("init", ("normal", "xavier"))):
            if getattr(self, key) not in allowed:
                raise bad(key, f"expected one of {allowed}")
        for key in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd", "mlp_hidden",
                    "n_kv_head", "head_dim", "rotary_dim",  # these three: None is resolved
                    "sliding_window"):
            if getattr(self, key) is not None and getattr(self, key) < 1:
                raise bad(key, "must be a positive integer")
        if self.n_kv_head is None:
            self.n_kv_head = self.n_head
        if self.n_head % self.n_kv_head:
            raise bad("n_kv_head", f"must divide n_head={self.n_head}")
        if self.head_dim is None:
            if self.n_embd % self.n_head:
                raise bad("n_embd", f"not divisible by n_head={self.n_head}; set head_dim")
            self.head_dim = self.n_embd // self.n_head
        rotary_given = self.rotary_dim is not None
        if not rotary_given:
            self.rotary_dim = self.head_dim
        if self.positions == "rope" and self.rotary_dim % 2:
            raise bad("rotary_dim" if rotary_given else "head_dim",
                      "must be even: rotary embeddings rotate pairs of dims")
        if self.rotary_dim > self.head_dim:  # a changed head_dim under a preset's rotary_dim
            raise bad("head_dim", f"smaller than rotary_dim={self.rotary_dim}, the dims per head "
                      "that rotary embeddings rotate; set rotary_dim too (at most head_dim)")
        if self.rope_scaling is not None:
            rope_type = self.rope_scaling.get("rope_type")
            if rope_type not in ROPE_SCALING_KEYS:
                raise bad("rope_scaling", f"rope_type must be one of {sorted(ROPE_SCALING_KEYS)}")
            if missing := [k for k in ROPE_SCALING_KEYS[rope_type] if k not in self.rope_scaling]:
                raise bad("rope_scaling", f"{rope_type} scaling needs keys {missing}")
            for key in ("short_factor", "long_factor"):
                if key in self.rope_scaling and len(self.rope_scaling[key]) != self.rotary_dim // 2:
                    raise bad("rope_scaling", f"{key} needs rotary_dim / 2 = "
                              f"{self.rotary_dim // 2} values")
        if self.sliding_layers is not None and len(self.sliding_layers) != self.n_layer:
            raise bad("sliding_layers", f"needs one true/false for each of the {self.n_layer} "
                      "layers")
        if self.post_norms and self.parallel_residual:
            raise bad("post_norms", "needs sequential residuals (parallel_residual=False)")
        if self.fused_gate_up and self.mlp not in GATED_MLPS:
            raise bad("fused_gate_up", f"needs a gated mlp ({', '.join(GATED_MLPS)})")
        for key in ("dropout", "embd_dropout", "attn_dropout"):
            if getattr(self, key) is not None and not 0.0 <= getattr(self, key) < 1.0:
                raise bad(key, "must be in [0, 1)")
        for key in ("init_std", "norm_eps", "rope_theta"):  # (rope_theta 0: inf frequencies)
            if not 0 < getattr(self, key) < math.inf:
                raise bad(key, "must be > 0 and finite")
        for key in ("attn_scale", "attn_softcap", "logit_softcap"):
            if getattr(self, key) is not None and not 0 < getattr(self, key) < math.inf:
                raise bad(key, "must be > 0 and finite (or None)")

    def slides(self, layer: int) -> bool:
        """Whether layer ``layer``'s attention sees only the last ``sliding_window`` positions."""
        if self.sliding_window is None:
            return False
        return self.sliding_layers is None or self.sliding_layers[layer]

    @property
    def embedding_dropout(self) -> float:
        """Read live: with embd_dropout None, a later change of `dropout` counts here too."""
        return self.dropout if self.embd_dropout is None else self.embd_dropout


GATED_MLPS = ("swiglu", "geglu")  # act(gate(x)) * up(x)


# Named configs as data. The real shapes carry their published hyperparameters.
PRESETS: dict[str, ModelConfig] = {
    "starcoderbase-1b": ModelConfig(
        family="gpt_bigcode", vocab_size=49152, block_size=8192, n_layer=24, n_head=16,
        n_kv_head=1, n_embd=2048, mlp_hidden=8192, norm="layernorm", mlp="gelu_tanh",
        positions="learned", qkv_bias=True, attn_proj_bias=True, mlp_bias=True,
        tie_embeddings=True, bos_id=0, eos_id=0),
    "codegen-350M-mono": ModelConfig(
        family="codegen", vocab_size=51200, block_size=2048, n_layer=20, n_head=16,
        n_embd=1024, mlp_hidden=4096, norm="layernorm", mlp="gelu_tanh", positions="rope",
        rotary_dim=32, rope_interleaved=True, parallel_residual=True, mlp_bias=True,
        lm_head_bias=True, bos_id=1, eos_id=50256),
    "phi-1_5": ModelConfig(
        family="phi", vocab_size=51200, block_size=2048, n_layer=24, n_head=32, n_embd=2048,
        mlp_hidden=8192, norm="layernorm", mlp="gelu_tanh", positions="rope", rotary_dim=32,
        parallel_residual=True, qkv_bias=True, attn_proj_bias=True, mlp_bias=True,
        lm_head_bias=True, bos_id=1, eos_id=2),
    "llama-3.2-1b": ModelConfig(
        family="llama", vocab_size=128256, block_size=131072, n_layer=16, n_head=32,
        n_kv_head=8, n_embd=2048, head_dim=64, mlp_hidden=8192, norm="rmsnorm", mlp="swiglu",
        positions="rope", rope_theta=500000.0,
        rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                      "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
        tie_embeddings=True, bos_id=128000, eos_id=128001),
    "qwen2.5-coder-1.5b": ModelConfig(
        family="qwen2", vocab_size=151936, block_size=32768, n_layer=28, n_head=12,
        n_kv_head=2, n_embd=1536, mlp_hidden=8960, norm="rmsnorm", norm_eps=1e-6, mlp="swiglu",
        positions="rope", rope_theta=1000000.0, qkv_bias=True, tie_embeddings=True,
        bos_id=151643, eos_id=151643),
    # From-scratch sizes of the research path (Llama-shaped, so they export as `llama`).
    # Set vocab_size to the tokenizer's on a copy: dataclasses.replace(preset, vocab_size=n).
    "tiny": ModelConfig(vocab_size=512, block_size=128, n_layer=2, n_head=4, n_kv_head=2,
                    n_embd=64, mlp_hidden=176, tie_embeddings=True),
    # The small rungs of trainconfig.BUDGET_LADDER, named layers x width.
    "code-3x128": ModelConfig(block_size=256, n_layer=3, n_head=4, n_embd=128, mlp_hidden=352,
                              tie_embeddings=True),
    "code-4x160": ModelConfig(block_size=256, n_layer=4, n_head=5, n_embd=160, mlp_hidden=448,
                              tie_embeddings=True),
    "code-4x192": ModelConfig(block_size=256, n_layer=4, n_head=6, n_embd=192, mlp_hidden=512,
                              tie_embeddings=True),
    "code-6x256": ModelConfig(block_size=512, n_layer=6, n_head=8, n_embd=256, mlp_hidden=704,
                              tie_embeddings=True),
    "llama-14m": ModelConfig(vocab_size=8192, block_size=512, n_layer=6, n_head=6, n_embd=384,
                         mlp_hidden=1024, tie_embeddings=True),
    "llama-60m": ModelConfig(vocab_size=16384, block_size=1024, n_layer=10, n_head=10, n_kv_head=5,
                         n_embd=640, mlp_hidden=1728, tie_embeddings=True),
}


# The from-scratch presets: a run gives them its tokenizer's vocabulary (their vocab_size stands
# in for it); the published shapes keep their checkpoints'.
FROM_SCRATCH = ("tiny", "code-3x128", "code-4x160", "code-4x192", "code-6x256", "llama-14m",
                "llama-60m")
# The default from-scratch run's vocabulary: a CodeTokenizer's 6 special tokens and 256 bytes,
# and tokenizer_max_vocab's 4,000 pieces (tests/test_architecture.py holds them equal).
DEFAULT_RUN_VOCAB = 4262


# codelm's short dtype names (flags such as --base-dtype, pretrained.load(dtype="bf16")).
SHORT_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def cuda_half_dtype(device: torch.device) -> torch.dtype:
    """The 16-bit dtype a GPU computes natively: bf16 from Ampere (sm80) on and on ROCm, else fp16
    (torch.cuda.is_bf16_supported() says yes there too: it emulates bf16, slowly)."""
    if torch.version.hip or torch.cuda.get_device_capability(device)[0] >= 8:
        return torch.bfloat16
    return torch.float16


def lacks_native_bf16(device: torch.device) -> bool:
    """Whether ``device`` is a GPU that would only emulate bf16 (see cuda_half_dtype)."""
    return device.type == "cuda" and cuda_half_dtype(device) != torch.bfloat16


# ------------------------------------------------------------------------- the ops of the model
@kernels.faster(kernels.rms_norm)
def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x / rms(x) in (at least) fp32, cast back to x's dtype, then times weight: Llama's order
    (HF's LlamaRMSNorm), where in bf16 or fp16 the weight multiplies the rounded normalized x."""
    if x.dtype == torch.promote_types(x.dtype, torch.float32):  # one fused call, the same values
        return F.rms_norm(x, (x.shape[-1],), weight, eps)
    return weight * F.rms_norm(x, (x.shape[-1],), eps=eps)


@kernels.faster(kernels.linear)
def linear(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A Linear layer (or what stands in for one: LoRA, a quantized layer) applied to x."""
    return layer(x)


@kernels.faster(kernels.dropout)
def dropout(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    return F.dropout(x, p, training)


class RMSNorm(nn.Module):
    """x / rms(x) times (offset + weight): Gemma's weights are stored as weight - 1 (offset 1)."""

    def __init__(self, dim: int, eps: float, offset: float = 0.0) -> None:
        super().__init__()
        self.eps = eps
        self.offset = offset
        self.weight = nn.Parameter(torch.full((dim,), 1.0 - offset))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.offset:
            return rms_norm(x, self.weight, self.eps)
        # Gemma's order: normalized and scaled in fp32, then cast (bf16 weight + 1 rounds).
        return rms_norm(x.float(), self.weight.float() + self.offset, self.eps).to(x.dtype)


def make_norm(cfg: ModelConfig) -> nn.Module:
    if cfg.norm == "rmsnorm":
        return RMSNorm(cfg.n_embd, cfg.norm_eps, cfg.norm_offset)
    return nn.LayerNorm(cfg.n_embd, eps=cfg.norm_eps)


def rope_inv_freq(cfg: ModelConfig, device: torch.device | str | None = None) -> torch.Tensor:
    """Inverse frequencies (fp32) of the rotated dims, scaled as ``cfg.rope_scaling`` says."""
    dim = cfg.rotary_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float32,
                                                      device=device) / dim))
    scaling = cfg.rope_scaling or {"rope_type": "default"}
    if scaling["rope_type"] == "linear":
        return inv_freq / scaling["factor"]
    if scaling["rope_type"] == "longrope":  # the short divisors; rope_long_inv_freq the long
        return _longrope_inv_freq(cfg, scaling["short_factor"], device)
    if scaling["rope_type"] == "llama3":
        return _llama3_inv_freq(inv_freq, scaling)
    if scaling["rope_type"] == "yarn":
        return _yarn_inv_freq(inv_freq, cfg.rope_theta, scaling)
    return inv_freq  # default; dynamic inside the context


def rope_long_inv_freq(cfg: ModelConfig, device: torch.device | str | None = None
                       ) -> torch.Tensor | None:
    """LongRoPE's inverse frequencies for a sequence past the original context (None for the
    other scalings)."""
    scaling = cfg.rope_scaling or {}
    if scaling.get("rope_type") != "longrope":
        return None
    return _longrope_inv_freq(cfg, scaling["long_factor"], device)


def _longrope_inv_freq(cfg: ModelConfig, divisors: Sequence[float],
                       device: torch.device | str | None) -> torch.Tensor:
    """1 / (divisor * theta ** (2i / dim)), as transformers computes LongRoPE's (bit for bit)."""
    dim = cfg.rotary_dim
    exponents = torch.arange(0, dim, 2, dtype=torch.int64, device=device).float() / dim
    return 1.0 / (torch.tensor(divisors, dtype=torch.float32, device=device)
                  * cfg.rope_theta ** exponents)


def _llama3_inv_freq(inv_freq: torch.Tensor, scaling: dict) -> torch.Tensor:
    """Llama-3's: long wavelengths divided by the factor, short ones kept, a blend between."""
    factor, low, high, old_len = (scaling[k] for k in LLAMA3_SCALING_KEYS)
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
    return torch.where(medium, smoothed, scaled)


def _yarn_inv_freq(inv_freq: torch.Tensor, theta: float, scaling: dict) -> torch.Tensor:
    """YaRN's: dims that turn fewer than beta_slow times over the original context divided by
    the factor, those that turn more than beta_fast times kept, a linear ramp between."""
    options = {**YARN_DEFAULTS, **scaling}
    dim = 2 * inv_freq.numel()
    old_len = scaling["original_max_position_embeddings"]

    def dim_of(turns: float) -> float:  # the dim that turns `turns` times over old_len
        return dim * math.log(old_len / (turns * 2 * math.pi)) / (2 * math.log(theta))

    low, high = dim_of(options["beta_fast"]), dim_of(options["beta_slow"])
    if options["truncate"]:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float32, device=inv_freq.device) - low)
            / (high - low)).clamp(0, 1)
    return inv_freq / scaling["factor"] * ramp + inv_freq * (1 - ramp)


def rope_attention_factor(cfg: ModelConfig) -> float:
    """What YaRN and LongRoPE multiply cos and sin by (so the scores by its square); 1
    otherwise."""
    scaling = cfg.rope_scaling
    if scaling is not None and scaling["rope_type"] == "longrope":
        if scaling.get("attention_factor") is not None:
            return float(scaling["attention_factor"])
        factor, context = scaling["factor"], scaling["original_max_position_embeddings"]
        return 1.0 if factor <= 1 else math.sqrt(1 + math.log(factor) / math.log(context))
    if scaling is None or scaling["rope_type"] != "yarn":
        return 1.0
    options = {**YARN_DEFAULTS, **scaling}
    if options["attention_factor"] is not None:
        return float(options["attention_factor"])

    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    factor = scaling["factor"]
    if options["mscale"] and options["mscale_all_dim"]:
        return mscale(factor, options["mscale"]) / mscale(factor, options["mscale_all_dim"])
    return mscale(factor)


class RotaryEmbedding(nn.Module):
    """cos and sin of every position of the context, tabled once in fp32 (32 MiB for Llama-3's
    131,072 positions) and gathered by each forward's positions, so left padding shifts them per
    row (and a compiled step loads them, not computing them again in each layer's kernels).
    LongRoPE takes its long frequencies for a row whose positions pass the original context (as
    transformers does for a batch's longest: per row, a row's do not depend on the others')."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.long_from = (cfg.rope_scaling or {}).get("original_max_position_embeddings")
        self.attention_factor = rope_attention_factor(cfg)
        for name in ("long_inv_freq", "tables", "long_tables"):
            self.register_buffer(name, None, persistent=False)
        # On meta a shape only (there arange would import sympy: pretrained.load sets them on
        # its device); `to_empty` moves it, and _apply computes the rest where it lands.
        inv_freq = torch.empty(cfg.rotary_dim // 2)  # on the default device
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        if not inv_freq.is_meta:
            self.set_frequencies(inv_freq.device)

    def _apply(self, fn, recurse=True):
        # Keep the frequencies exact in fp32 whatever `.to(dtype)`/`to_empty` does to buffers:
        # bf16 frequencies put the angle of position 1000 off by radians.
        super()._apply(fn, recurse)
        self.set_frequencies(self.inv_freq.device)
        return self

    def set_frequencies(self, device: torch.device | str) -> None:
        """The inverse frequencies and the cos/sin tables computed on ``device`` (fp32)."""
        self.inv_freq = rope_inv_freq(self.cfg, device=device)
        self.long_inv_freq = rope_long_inv_freq(self.cfg, device=device)
        self.tables = self._tables(self.inv_freq)
        self.long_tables = None if self.long_inv_freq is None else self._tables(self.long_inv_freq)

    def _tables(self, inv_freq: torch.Tensor) -> torch.Tensor:
        """(2, block_size, rotary_dim / 2): cos and sin of each position's angles."""
        positions = torch.arange(self.cfg.block_size, device=inv_freq.device)
        freqs = positions[:, None].float() * inv_freq
        return torch.stack((freqs.cos(), freqs.sin())) * self.attention_factor

    def forward(self, pos: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin (B, T, 1, rotary_dim / 2) in ``dtype`` for positions ``pos`` (B, T)."""
        tables = self.tables[:, pos]
        if self.long_tables is not None:  # (B, 1, 1) per row: no host sync
            past = pos.amax(dim=-1, keepdim=True)[..., None] >= self.long_from
            tables = torch.where(past, self.long_tables[:, pos], tables)
        cos, sin = tables.to(dtype)[..., None, :].unbind(0)
        return cos, sin


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
               interleaved: bool) -> torch.Tensor:
    """x (B, T, H, D) with its first 2 * cos.shape[-1] dims rotated; cos, sin (B, T, 1, r / 2).
    Pairs (0, 1), (2, 3), ... when interleaved (CodeGen, GPT-J), else the two halves (Llama)."""
    r = 2 * cos.shape[-1]
    rot, rest = x[..., :r], x[..., r:]
    if interleaved:
        x1, x2 = rot[..., 0::2], rot[..., 1::2]
        rot = torch.stack((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).flatten(-2)
    else:
        x1, x2 = rot.chunk(2, dim=-1)
        rot = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
    return torch.cat((rot, rest), dim=-1)


@kernels.faster(kernels.split_rotated)
def split_heads(qkv: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None, n_head: int,
                n_kv: int, interleaved: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fused-projection rows (B, T, n_head + 2 n_kv, D) -> q, k, v (B, heads, T, D), q and k
    rotated when rope (cos, sin) is given."""
    q, k, v = qkv.split((n_head, n_kv, n_kv), dim=2)
    if rope is not None:
        q, k = apply_rope(q, *rope, interleaved), apply_rope(k, *rope, interleaved)
    return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)


def softcap(x: torch.Tensor, cap: float) -> torch.Tensor:
    """cap * tanh(x / cap): x's values squashed smoothly into (-cap, cap) (Gemma 2)."""
    return torch.tanh(x / cap) * cap


@kernels.faster(kernels.attention)
def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
              dropout_p: float, grouped: bool, scale: float | None = None,
              cap: float | None = None) -> torch.Tensor:
    """Causal attention (mask None), or with SDPA's boolean mask; grouped: k and v have fewer
    heads than q; scale: of the scores (None: 1 / sqrt(head_dim)); cap: the scores soft-capped
    (`softcap`), which SDPA's kernels cannot do: the scores are formed here then."""
    if cap is None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None,
                                              dropout_p=dropout_p, enable_gqa=grouped,
                                              scale=scale)
    if grouped:
        k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
        v = v.repeat_interleave(q.shape[1] // v.shape[1], dim=1)
    scores = softcap(q @ k.transpose(-2, -1) * (scale or q.shape[-1] ** -0.5), cap)
    if mask is None:
        mask = torch.ones(scores.shape[-2:], dtype=torch.bool, device=q.device).tril()
    scores = scores.masked_fill(~mask, float("-inf"))
    probs = F.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    return F.dropout(probs, dropout_p) @ v


# One layer's preallocated (keys, values), each (B, n_kv_head, length, head_dim), written in place
# at the decode step's slots (codelm/models/generation.py, codelm/models/engine.py).
LayerCache = tuple[torch.Tensor, torch.Tensor]


def write_cache(cache: LayerCache, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    """Write this step's keys and values k, v (B, n_kv_head, T, head_dim) into ``cache`` at
    ``slots``: (T,) the same slots in every row; (B, T) each row its own (a continuous batch,
    whose rows are at different lengths). They are stored in the cache's dtype (under autocast
    a query/key norm with fp32 weights hands back fp32 keys for a bf16 cache)."""
    cached_k, cached_v = cache
    k = k.to(cached_k.dtype)
    v = v.to(cached_v.dtype)
    if slots.dim() == 1:
        cached_k.index_copy_(2, slots, k)
        cached_v.index_copy_(2, slots, v)
        return
    rows = torch.arange(k.shape[0], device=k.device)[:, None]
    cached_k[rows, :, slots] = k.transpose(1, 2)  # (B, T, n_kv_head, head_dim) at [row, :, slot]
    cached_v[rows, :, slots] = v.transpose(1, 2)


def cache_length(caches: Sequence[LayerCache]) -> int:
    """The key slots each layer's cache holds."""
    first_layer_keys, _ = caches[0]
    return first_layer_keys.shape[2]


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.qkv = nn.Linear(cfg.n_embd, (cfg.n_head + 2 * cfg.n_kv_head) * cfg.head_dim,
                             bias=cfg.qkv_bias)
        self.proj = nn.Linear(cfg.n_head * cfg.head_dim, cfg.n_embd, bias=cfg.attn_proj_bias)
        self.q_norm = RMSNorm(cfg.head_dim, cfg.norm_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(cfg.head_dim, cfg.norm_eps) if cfg.qk_norm else None

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None,
                mask: torch.Tensor | None, slots: torch.Tensor | None = None,
                cache: LayerCache | None = None) -> torch.Tensor:
        """``rope``: (cos, sin), None without rotary positions; ``mask``: SDPA's boolean mask,
        None for plain causal attention; ``slots``: where ``cache`` takes this step's keys."""
        cfg = self.cfg
        B, T, _ = x.shape
        qkv = linear(self.qkv, x).view(B, T, cfg.n_head + 2 * cfg.n_kv_head, cfg.head_dim)
        if self.q_norm is not None:
            q, k, v = qkv.split((cfg.n_head, cfg.n_kv_head, cfg.n_kv_head), dim=2)
            qkv = torch.cat((self.q_norm(q), self.k_norm(k), v), dim=2)
        q, k, v = split_heads(qkv, rope, cfg.n_head, cfg.n_kv_head, cfg.rope_interleaved)
        if cache is not None:
            write_cache(cache, slots, k, v)
            if mask is not None:  # no mask: a prompt without padding, which needs only its
                k, v = cache      # own keys, causally
        y = attention(q, k, v, mask, cfg.attn_dropout if self.training else 0.0,
                      cfg.n_kv_head != cfg.n_head, cfg.attn_scale, cfg.attn_softcap)
        return linear(self.proj, y.transpose(1, 2).reshape(B, T, cfg.n_head * cfg.head_dim))


class MLP(nn.Module):
    """fc: the up projection; a gated MLP (SwiGLU, GeGLU) adds `gate`. Gate and up stay two
    Linears, which train faster on CPU than one (n_embd, 2 * hidden), except where a family's
    files hold them fused (fused_gate_up: fc is [gate | up])."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        gated = cfg.mlp in GATED_MLPS
        self.fused = cfg.fused_gate_up
        width = 2 * cfg.mlp_hidden if self.fused else cfg.mlp_hidden
        self.fc = nn.Linear(cfg.n_embd, width, bias=cfg.mlp_bias)
        self.gate = (nn.Linear(cfg.n_embd, cfg.mlp_hidden, bias=cfg.mlp_bias)
                     if gated and not self.fused else None)
        self.proj = nn.Linear(cfg.mlp_hidden, cfg.n_embd, bias=cfg.mlp_bias)
        self.gated = gated
        if cfg.mlp == "swiglu":
            self.act = F.silu
        elif cfg.mlp in ("gelu_tanh", "geglu"):
            self.act = partial(F.gelu, approximate="tanh")
        else:  # gelu (exact)
            self.act = partial(F.gelu, approximate="none")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.gated:
            return linear(self.proj, self.act(linear(self.fc, x)))
        if self.fused:
            gate, up = linear(self.fc, x).chunk(2, dim=-1)
        else:
            gate, up = linear(self.gate, x), linear(self.fc, x)
        return linear(self.proj, self.act(gate) * up)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.norm_1 = make_norm(cfg)
        self.attn = Attention(cfg)
        self.norm_2 = None if cfg.parallel_residual else make_norm(cfg)
        self.mlp = MLP(cfg)
        self.attn_out_norm = make_norm(cfg) if cfg.post_norms else None
        self.mlp_out_norm = make_norm(cfg) if cfg.post_norms else None
        self.cfg = cfg

    def drop(self, x: torch.Tensor) -> torch.Tensor:
        # p read live from the shared cfg, so `model.cfg.dropout = p` retunes a loaded model.
        return dropout(x, self.cfg.dropout, self.training)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None,
                mask: torch.Tensor | None, slots: torch.Tensor | None = None,
                cache: LayerCache | None = None) -> torch.Tensor:
        h = self.norm_1(x)
        a = self.attn(h, rope, mask, slots, cache)
        if self.attn_out_norm is not None:
            a = self.attn_out_norm(a)
        if self.norm_2 is None:
            return x + self.drop(a) + self.drop(self.mlp(h))
        x = x + self.drop(a)
        m = self.mlp(self.norm_2(x))
        if self.mlp_out_norm is not None:
            m = self.mlp_out_norm(m)
        return x + self.drop(m)


def padded_mask(attention_mask: torch.Tensor, q_slots: torch.Tensor, length: int) -> torch.Tensor:
    """Boolean SDPA mask (B, 1, Tq, length): causal, padding keys hidden. Each query also sees
    itself, so rows of padding queries are never empty (an empty row gives NaN, and NaN values
    leak into real rows through the zero weights of the next layer)."""
    k_slots = torch.arange(length, device=q_slots.device)
    causal = k_slots <= q_slots[:, None]
    return ((causal & attention_mask[:, None, :length]) | (k_slots == q_slots[:, None]))[:, None]


def window_mask(mask: torch.Tensor | None, q_slots: torch.Tensor, length: int,
                window: int) -> torch.Tensor:
    """``mask`` (None: causal over ``length`` keys) with keys ``window`` or more slots before
    each query hidden: a sliding layer's mask, as transformers slides it (over cache slots).
    q_slots: (Tq,) the queries' slots, or (B, Tq) each row's own."""
    k_slots = torch.arange(length, device=q_slots.device)
    near = (k_slots <= q_slots[..., None]) & (k_slots > q_slots[..., None] - window)
    near = near[None, None] if q_slots.dim() == 1 else near[:, None]  # (B or 1, 1, Tq, length)
    return near if mask is None else mask & near


def positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position of each token counting real tokens only (left padding shifts nothing)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


@kernels.faster(kernels.document_mask)
def document_mask(document_ids: torch.Tensor, flex: bool = False) -> torch.Tensor:
    """Boolean SDPA mask (B, 1, T, T) of packed rows: causal, each token seeing only the tokens
    of its own document (``document_ids`` (B, T): a run of equal ids is one document). ``flex``:
    the attention could take FlexAttention's block mask instead (kernels.document_mask)."""
    T = document_ids.shape[1]
    causal = torch.ones(T, T, dtype=torch.bool, device=document_ids.device).tril()
    return (causal & (document_ids[:, :, None] == document_ids[:, None, :]))[:, None]


def document_positions(document_ids: torch.Tensor) -> torch.Tensor:
    """Each token's position in its own document: 0 at every document's first token."""
    index = torch.arange(document_ids.shape[1], device=document_ids.device).expand_as(
        document_ids)
    first = torch.ones_like(document_ids, dtype=torch.bool)
    first[:, 1:] = document_ids[:, 1:] != document_ids[:, :-1]
    starts = torch.where(first, index, torch.zeros_like(index)).cummax(dim=1).values
    return index - starts


@kernels.faster(kernels.head_cross_entropy)
def head_loss(hidden: torch.Tensor, head: nn.Module, labels: torch.Tensor,
              label_smoothing: float = 0.0, count_correct: bool = False,
              grad_scale: torch.Tensor | float | None = None, cap: float | None = None,
              ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Summed fp32 cross-entropy of head(hidden) over the labels that are not IGNORE_INDEX, and
    with count_correct how many of them are the top logit. grad_scale: what the caller's backward
    multiplies this sum's gradient by (the fp16 loss scale times any weighting); the fused kernel
    forms its gradients in the forward and needs it in fp16. cap: the logits soft-capped first."""
    logits = head(hidden).float()
    if cap is not None:
        logits = softcap(logits, cap)
    # long ids: cross_entropy refuses int32 labels, which the fused op and head_logps take
    loss = F.cross_entropy(logits.flatten(0, -2), labels.flatten().long(),
                           ignore_index=IGNORE_INDEX, label_smoothing=label_smoothing,
                           reduction="sum")
    if not count_correct:
        return loss, None
    return loss, ((logits.argmax(-1) == labels) & (labels != IGNORE_INDEX)).sum()


@kernels.faster(kernels.head_token_logps)
def head_logps(hidden: torch.Tensor, head: nn.Module, labels: torch.Tensor,
               cap: float | None = None, temperature: float = 1.0, with_entropy: bool = False):
    """log_softmax(head(hidden) / temperature)[label] in fp32 at each position of ``hidden``
    (..., C) (the logit less its row's logsumexp, as TRL's selective_log_softmax), 0 where
    ``labels`` is IGNORE_INDEX; ``cap``: the logits soft-capped first. With ``with_entropy``,
    (log-probs, entropies): each position's entropy of the same distribution too (no gradient,
    0 where ignored). The fused op never forms the whole logits (kernels.head_token_logps)."""
    logits = head(hidden).float()
    if cap is not None:
        logits = softcap(logits, cap)
    if temperature != 1.0:
        logits = logits / temperature
    ignored = labels == IGNORE_INDEX
    normalizer = logits.logsumexp(-1)
    picked = logits.gather(-1, labels.masked_fill(ignored, 0)[..., None])[..., 0]
    logps = (picked - normalizer).masked_fill(ignored, 0.0)
    if not with_entropy:
        return logps
    with torch.no_grad():
        logprobs = logits - normalizer[..., None]
        entropy = -(logprobs.exp() * logprobs).sum(-1)
    return logps, entropy.masked_fill(ignored, 0.0)


class Transformer(nn.Module):
    """The decoder-only model of every family (its ``ModelConfig``'s flags): ``model(idx)`` gives
    the logits, ``model(idx, targets)`` the next-token loss with the head fused (``forward``);
    ``pretrained.load(dir)`` loads an HF checkpoint as one."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        # The model's own copy (rope_scaling too), shared by its modules: `model.cfg.dropout = p`
        # retunes this model, never the preset or the other models built from the same config.
        self.cfg = cfg = copy.deepcopy(cfg)
        # The directory pretrained.load read: lora.save_adapter records it as the adapter's base.
        self.name_or_path: str | None = None
        # _weight: nn.Embedding draws nothing (on meta, normal_ would import sympy, a large import).
        frozen_row = cfg.pad_id if cfg.pad_row_frozen and cfg.pad_id is not None else None
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd, padding_idx=frozen_row,
                                _weight=torch.empty(cfg.vocab_size, cfg.n_embd))
        self.wpe = (nn.Embedding(cfg.block_size, cfg.n_embd,
                                 _weight=torch.empty(cfg.block_size, cfg.n_embd))
                    if cfg.positions == "learned" else None)
        self.rope = RotaryEmbedding(cfg) if cfg.positions == "rope" else None
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.norm_f = make_norm(cfg)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=cfg.lm_head_bias)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.wte.weight
        # Recompute each block's activations in the backward: ~n_layer times less activation
        # memory for a slower step. A run setting, not in ModelConfig.
        self.gradient_checkpointing = False
        # With it, on a GPU: those saved block inputs held in pinned host memory (a copy each way).
        self.offload_activations = False
        if not self.wte.weight.is_meta:
            self.reset_parameters()

    def reset_parameters(self) -> None:
        """From-scratch init. normal: GPT-2's, residual projections scaled by 1/sqrt(2 n_layer) so
        the residual stream does not grow with depth; xavier: uniform Xavier on every matrix."""
        cfg = self.cfg
        for name, p in self.named_parameters():
            if p.dim() < 2:  # biases 0, norm weights 1
                nn.init.constant_(p, 0.0 if name.endswith("bias") else 1.0)
            elif cfg.init == "xavier":
                nn.init.xavier_uniform_(p)
            elif name.endswith(("attn.proj.weight", "mlp.proj.weight")):
                nn.init.normal_(p, 0.0, cfg.init_std / math.sqrt(2 * cfg.n_layer))
            else:
                nn.init.normal_(p, 0.0, cfg.init_std)
        for module in self.modules():  # an RMSNorm scales by offset + weight: 1 at the start
            if isinstance(module, RMSNorm):
                nn.init.constant_(module.weight, 1.0 - module.offset)

    def num_parameters(self, exclude_embeddings: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())
        if exclude_embeddings:
            n -= self.wte.weight.numel() + (self.wpe.weight.numel() if self.wpe is not None else 0)
        return n

    def train(self, mode: bool = True) -> Transformer:
        if mode:  # training wants ordinary row-major weights back (see kernels.decode_layout)
            kernels.decode_layout(self, False)
        return super().train(mode)

    def state_dict(self, *args, **kwargs):
        kernels.decode_layout(self, False)  # tools get ordinary tensors (`.view(-1)`), no copies
        return super().state_dict(*args, **kwargs)

    def run_blocks(self, idx: torch.Tensor, pos: torch.Tensor, mask: torch.Tensor | None,
                   slots: torch.Tensor | None = None,
                   caches: list[LayerCache] | None = None) -> torch.Tensor:
        """The residual stream (B, T, C) after the last block, before the final norm. pos (B, T)
        or (1, T): positions; mask, slots, caches: as `Attention.forward` takes them."""
        cfg = self.cfg
        x = self.wte(idx)
        if cfg.scale_embeddings:
            x = x * torch.tensor(cfg.n_embd ** 0.5, dtype=x.dtype)
        if self.wpe is not None:
            x = x + self.wpe(pos)
        x = dropout(x, cfg.embedding_dropout, self.training)
        rope = self.rope(pos, x.dtype) if self.rope is not None else None
        sliding = mask  # the sliding layers' mask: the causal one while the window covers all
        n_keys = cache_length(caches) if caches is not None else idx.shape[1]
        if cfg.sliding_window is not None and cfg.sliding_window < n_keys:
            q_slots = slots if slots is not None else torch.arange(idx.shape[1], device=x.device)
            sliding = window_mask(mask, q_slots, n_keys, cfg.sliding_window)
        recompute = self.gradient_checkpointing and self.training and torch.is_grad_enabled()
        held = (torch.autograd.graph.save_on_cpu(pin_memory=True)
                if recompute and self.offload_activations and x.is_cuda else nullcontext())
        for i, block in enumerate(self.blocks):
            layer_mask = sliding if cfg.slides(i) else mask
            if recompute:  # keep only each block's input; its activations are redone in backward
                with held:  # what checkpoint saves (the block's input) goes where `held` says
                    x = checkpoint(block, x, rope, layer_mask, use_reentrant=False)
            else:
                x = block(x, rope, layer_mask, slots, caches[i] if caches is not None else None)
        return x

    def _flex_attends(self, length: int) -> bool:
        """Whether FlexAttention computes these rows' attention exactly: no soft-capped scores,
        no attention dropout, no sliding window shorter than the rows."""
        cfg = self.cfg
        window = cfg.sliding_window is not None and cfg.sliding_window < length
        return cfg.attn_softcap is None and not (cfg.attn_dropout and self.training) and not window

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """The next-token logits of the residual stream x after the last block."""
        logits = linear(self.lm_head, self.norm_f(x))
        if self.cfg.logit_softcap is not None:
            logits = softcap(logits, self.cfg.logit_softcap)
        return logits

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, *, reduction: str = "mean",
                label_smoothing: float = 0.0, grad_scale: torch.Tensor | float | None = None,
                count_correct: bool = False, document_ids: torch.Tensor | None = None,
                token_logps: bool = False, temperature: float = 1.0, with_entropy: bool = False
                ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """The model on the token ids idx (B, T).

        attention_mask (B, T): True = real token, for left-padded batches (right padding needs
        none: attention is causal). document_ids (B, T): packed rows, each run of equal ids a
        document of its own, its positions from 0 and its tokens seeing only each other.
        grad_scale: what the caller's backward multiplies the loss's gradient by (head_loss:
        the fused head forms its gradient in the forward).

        Returns, by the arguments given:
          no targets                -> the logits (B, T, V)
          targets (B, T)            -> the next-token cross-entropy (IGNORE_INDEX: not
                                       counted), never forming the whole logits: the mean over
                                       counted tokens, or their sum (reduction="sum"; head_loss)
          ... and count_correct     -> (loss, how many counted tokens are the top logit)
          targets and token_logps   -> each target's log-prob (B, T) under the logits divided
                                       by temperature, 0 where not counted (head_logps)
          ... and with_entropy      -> (log-probs, entropies)"""
        check_batch_shapes(idx, targets, reduction)
        if not torch.compiler.is_compiling():
            check_token_ids(idx, targets, self.cfg.vocab_size)
        B, T = idx.shape
        assert T <= self.cfg.block_size, f"sequence length {T} > block_size {self.cfg.block_size}"
        assert attention_mask is None or document_ids is None, "padding or packing, not both"
        if document_ids is not None:
            mask = document_mask(document_ids, self._flex_attends(T))
            x = self.run_blocks(idx, document_positions(document_ids), mask)
        elif attention_mask is None:
            x = self.run_blocks(idx, torch.arange(T, device=idx.device)[None], None)
        else:
            attention_mask = attention_mask.bool()
            mask = padded_mask(attention_mask, torch.arange(T, device=idx.device), T)
            x = self.run_blocks(idx, positions(attention_mask), mask)
        if targets is None:
            return self.logits(x)
        x = self.norm_f(x)
        if token_logps:
            return head_logps(x, self.lm_head, targets, self.cfg.logit_softcap, temperature,
                              with_entropy)
        count = (targets != IGNORE_INDEX).sum() if reduction == "mean" else None
        if count is not None and grad_scale is not None:  # the mean's gradient: the sum's / count
            grad_scale = grad_scale / count.clamp(min=1)
        loss, correct = head_loss(x, self.lm_head, targets, label_smoothing, count_correct,
                                  grad_scale, self.cfg.logit_softcap)
        if count is not None:
            loss = loss / count
        return (loss, correct) if count_correct else loss


def check_batch_shapes(idx: torch.Tensor, targets: torch.Tensor | None, reduction: str) -> None:
    """A ValueError for a batch the model would misread: idx not (batch, time), targets of
    another shape (a (time, batch) batch of the same size would be a silently wrong loss or
    log-prob), or a reduction other than mean and sum. Shapes only: nothing waits for the
    device."""
    if idx.dim() != 2:
        raise ValueError(f"idx: token ids of shape (batch, time), got shape {tuple(idx.shape)}")
    if targets is not None and targets.shape != idx.shape:
        raise ValueError(f"targets: shape {tuple(targets.shape)}, not idx's (batch, time) "
                         f"{tuple(idx.shape)}: labels are one (batch, time) row per input row")
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction {reduction!r}: must be 'mean' or 'sum'")


def check_token_ids(idx: torch.Tensor, targets: torch.Tensor | None, vocab_size: int) -> None:
    """A ValueError for ids a model cannot read: idx or targets of a dtype other than int64 or
    int32 (the embedding's), and, on the CPU, an id of idx or targets outside [0, vocab_size) (a
    target may be IGNORE_INDEX). On an accelerator the range is left to the embedding's own
    check: reading it here would wait for the device at every step."""
    for name, ids in (("idx", idx), ("targets", targets)):
        if ids is not None and ids.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"{name}: token ids are int64 or int32 tensors, got a {ids.dtype} "
                             "tensor")
    if idx.device.type != "cpu" or idx.numel() == 0:
        return
    low, high = torch.aminmax(idx)
    if low < 0 or high >= vocab_size:
        raise ValueError(f"idx: ids from {low.item()} to {high.item()}, outside the "
                         f"model's vocabulary [0, {vocab_size}): a tokenizer with more tokens "
                         "than the model has embeddings?")
    if targets is None:
        return
    outside = (targets != IGNORE_INDEX) & ((targets < 0) | (targets >= vocab_size))
    if outside.any():  # (the counted targets gathered on this path alone)
        counted = targets[targets != IGNORE_INDEX]
        raise ValueError(f"targets: ids from {counted.min().item()} to {counted.max().item()} "
                         f"besides IGNORE_INDEX ({IGNORE_INDEX}), outside the model's "
                         f"vocabulary [0, {vocab_size})")


def parameter_count(cfg: ModelConfig) -> int:
    """codelm's one count of a model's parameters (the tables, a run's announcement, README):
    every weight once, a tied embedding and LM head once, counted on the meta device."""
    with torch.device("meta"):
        return Transformer(cfg).num_parameters()


def presets_table(scratch_vocab: int = DEFAULT_RUN_VOCAB) -> str:
    """The named configurations side by side, each counted at the vocabulary it shows: the
    from-scratch presets at ``scratch_vocab``, the published shapes at their own."""
    rows = ["| preset | family | layers | width | heads (kv) | MLP | context | vocab | parameters |",
            "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for name, c in PRESETS.items():
        vocab = scratch_vocab if name in FROM_SCRATCH else c.vocab_size
        n = parameter_count(replace(c, vocab_size=vocab))
        rows.append(f"| {name} | {c.family} | {c.n_layer} | {c.n_embd} | {c.n_head} "
                    f"({c.n_kv_head}) | {c.mlp_hidden} ({c.mlp}) | {c.block_size} | "
                    f"{vocab} | {n:,} |")
    rows.append("")
    rows.append(f"parameters: every weight once (a tied embedding and LM head once) at the vocab "
                f"shown; {', '.join(FROM_SCRATCH)} take their run's tokenizer's vocabulary, "
                f"counted here at {scratch_vocab:,}" + (
                    " (the default run's; --vocab-size N counts them at N)"
                    if scratch_vocab == DEFAULT_RUN_VOCAB else " (--vocab-size)")
                + "; the others keep their checkpoints'.")
    return "\n".join(rows)


def preset_fields(name: str, scratch_vocab: int | None = None) -> dict:
    """A preset's every ModelConfig field, as PRESETS holds it; a from-scratch one at
    ``scratch_vocab`` where given (a run takes its tokenizer's)."""
    cfg = PRESETS[name]
    if name in FROM_SCRATCH and scratch_vocab is not None:
        cfg = replace(cfg, vocab_size=scratch_vocab)
    return asdict(cfg)


def main(argv: Sequence[str] | None = None) -> int:
    import json

    from codelm.runtime import process, settings

    parser = settings.ArgumentParser(
        description="codelm's named model configurations (architecture.PRESETS): a table with "
        "parameter counts, or one preset's every ModelConfig field as JSON.")
    parser.add_argument("preset", nargs="?", choices=list(PRESETS),
                        help="print this preset's fields as JSON")
    parser.add_argument("--vocab-size", type=int,
                        help="the vocabulary the from-scratch presets are counted at in the "
                        f"table (default: {DEFAULT_RUN_VOCAB}, the default run's tokenizer's) "
                        "and shown at with PRESET (default: the preset's own)")
    args = parser.parse_args(argv)
    if args.vocab_size is not None and args.vocab_size < 1:
        parser.error(f"--vocab-size {args.vocab_size}: must be >= 1")
    return process.run_tool(lambda: print(
        json.dumps(preset_fields(args.preset, args.vocab_size), indent=2) if args.preset
        else presets_table(args.vocab_size or DEFAULT_RUN_VOCAB)))


if __name__ == "__main__":
    sys.exit(process.run_main(main))
