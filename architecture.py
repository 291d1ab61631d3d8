"""One decoder-only transformer for StarCoder (GPTBigCode), CodeGen, Phi-1.5, Llama-3.2 and the
from-scratch models of the research path.

The families differ only in flags of `ModelConfig`; `Transformer` is the one model class. HF
checkpoints are read and written by `pretrained.py` (imported lazily by `from_pretrained` and
`save_pretrained`, so this module imports nothing of the project but cliconfig).
"""

from __future__ import annotations

if __name__ == "__main__":  # first: the imports below load torch for seconds
    import cliconfig

    cliconfig.quiet_start_up_stops()

import copy
import functools
import math
import numbers
import operator
import sys
import typing
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

import cliconfig

FAMILIES = ("gpt_bigcode", "codegen", "phi", "llama")
NORMS = ("layernorm", "rmsnorm")
MLPS = ("gelu", "gelu_tanh", "swiglu")
POSITIONS = ("learned", "rope")
INITS = ("normal", "xavier")
LLAMA3_SCALING_KEYS = ("factor", "low_freq_factor", "high_freq_factor",
                       "original_max_position_embeddings")


@dataclass
class ModelConfig:
    """Every flag the four families and the from-scratch models need (litgpt style).

    n_kv_head, head_dim and rotary_dim are resolved from the others when left None; a config
    derived with `dataclasses.replace` keeps the resolved values, so set them there too."""

    family: str = "llama"  # HF layout used by save_pretrained: gpt_bigcode, codegen, phi, llama
    vocab_size: int = 8192
    block_size: int = 512  # context length
    n_layer: int = 6
    n_head: int = 6
    n_kv_head: int | None = None  # None: n_head; 1: multi-query; fewer: grouped-query
    n_embd: int = 384
    head_dim: int | None = None  # None: n_embd // n_head
    mlp_hidden: int = 1024  # MLP width (for SwiGLU the width of gate and of up each)
    norm: str = "rmsnorm"  # layernorm | rmsnorm
    norm_eps: float = 1e-5
    mlp: str = "swiglu"  # gelu (exact) | gelu_tanh | swiglu
    positions: str = "rope"  # learned | rope
    rotary_dim: int | None = None  # rotated dims per head; None: all (partial for Phi, CodeGen)
    rope_interleaved: bool = False  # pairs (0,1),(2,3).. as in CodeGen/GPT-J; else half-split
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  # Llama-3: {"factor", "low_freq_factor", ...}
    parallel_residual: bool = False  # x + attn(ln(x)) + mlp(ln(x)) with one shared norm
    qkv_bias: bool = False
    attn_proj_bias: bool = False
    mlp_bias: bool = False
    lm_head_bias: bool = False
    tie_embeddings: bool = False
    dropout: float = 0.0  # residual branches (attention and MLP outputs)
    embd_dropout: float | None = None  # embeddings; None: `dropout`'s value, read live (Phi-2
    #   and CodeGen configs set them apart: embd_pdrop, resid_pdrop)
    attn_dropout: float = 0.0  # attention probabilities
    init: str = "normal"  # normal: GPT-2 N(0, init_std), scaled residual projections; xavier
    init_std: float = 0.02
    bos_id: int | None = None  # written to the exported HF config
    eos_id: int | list[int] | None = None  # a list where the checkpoint has several (chat models)

    def __post_init__(self) -> None:
        def bad(key: str, why: str) -> ValueError:
            return ValueError(f"ModelConfig.{key}={getattr(self, key)!r}: {why}")

        hints = _config_hints()
        for f in fields(self):  # as annotated: "false" or 1 is no bool, True or 2.0 no size
            value = getattr(self, f.name)
            # (eos_id: an id, or a list of ids, which type_error would read as one id)
            hint = list[int] if f.name == "eos_id" and isinstance(value, list) else hints[f.name]
            if problem := cliconfig.type_error(hint, value):
                raise ValueError(f"ModelConfig.{f.name} {problem}")
        for key, allowed in (("family", FAMILIES), ("norm", NORMS), ("mlp", MLPS),
                             ("positions", POSITIONS), ("init", INITS)):
            if getattr(self, key) not in allowed:
                raise bad(key, f"expected one of {allowed}")
        sizes = ("vocab_size", "block_size", "n_layer", "n_head", "n_embd", "mlp_hidden")
        derived = ("n_kv_head", "head_dim", "rotary_dim")  # None: resolved from sizes below
        for key in sizes + tuple(k for k in derived if getattr(self, k) is not None):
            if getattr(self, key) < 1:
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
            missing = [k for k in LLAMA3_SCALING_KEYS if k not in self.rope_scaling]
            if missing:
                raise bad("rope_scaling", f"Llama-3 scaling needs keys {missing}")
            not_numbers = [k for k in LLAMA3_SCALING_KEYS
                           if not cliconfig.is_number(self.rope_scaling[k])]
            if not_numbers:
                raise bad("rope_scaling", f"{not_numbers} must be numbers")
        for key in ("dropout", "embd_dropout", "attn_dropout"):
            if getattr(self, key) is not None and not 0.0 <= getattr(self, key) < 1.0:
                raise bad(key, "must be in [0, 1)")
        for key in ("init_std", "norm_eps", "rope_theta"):  # (rope_theta 0: inf frequencies)
            if not 0 < getattr(self, key) < math.inf:
                raise bad(key, "must be > 0 and finite")

    @property
    def embedding_dropout(self) -> float:
        """The embeddings' dropout p, read live: a model whose embd_dropout is None follows a
        later change of `dropout` (trainingmanager sets a loaded model's `dropout`)."""
        return self.dropout if self.embd_dropout is None else self.embd_dropout

    @property
    def qkv_size(self) -> int:
        return (self.n_head + 2 * self.n_kv_head) * self.head_dim

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> ModelConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"ModelConfig: unknown keys {unknown}")
        return cls(**d)


@functools.cache
def _config_hints() -> dict:
    """ModelConfig's field types, resolved once (typing.get_type_hints takes ~2 ms)."""
    return typing.get_type_hints(ModelConfig)


def _preset(**kw) -> ModelConfig:
    return ModelConfig(**kw)


# Named configs as data. The four real shapes carry their published hyperparameters.
PRESETS: dict[str, ModelConfig] = {
    "starcoderbase-1b": _preset(
        family="gpt_bigcode", vocab_size=49152, block_size=8192, n_layer=24, n_head=16,
        n_kv_head=1, n_embd=2048, mlp_hidden=8192, norm="layernorm", mlp="gelu_tanh",
        positions="learned", qkv_bias=True, attn_proj_bias=True, mlp_bias=True,
        tie_embeddings=True, bos_id=0, eos_id=0),
    "codegen-350M-mono": _preset(
        family="codegen", vocab_size=51200, block_size=2048, n_layer=20, n_head=16,
        n_embd=1024, mlp_hidden=4096, norm="layernorm", mlp="gelu_tanh", positions="rope",
        rotary_dim=32, rope_interleaved=True, parallel_residual=True, mlp_bias=True,
        lm_head_bias=True, bos_id=1, eos_id=50256),
    "phi-1_5": _preset(
        family="phi", vocab_size=51200, block_size=2048, n_layer=24, n_head=32, n_embd=2048,
        mlp_hidden=8192, norm="layernorm", mlp="gelu_tanh", positions="rope", rotary_dim=32,
        parallel_residual=True, qkv_bias=True, attn_proj_bias=True, mlp_bias=True,
        lm_head_bias=True, bos_id=1, eos_id=2),
    "llama-3.2-1b": _preset(
        family="llama", vocab_size=128256, block_size=131072, n_layer=16, n_head=32,
        n_kv_head=8, n_embd=2048, head_dim=64, mlp_hidden=8192, norm="rmsnorm", mlp="swiglu",
        positions="rope", rope_theta=500000.0,
        rope_scaling={"factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 8192},
        tie_embeddings=True, bos_id=128000, eos_id=128001),
    # From-scratch sizes of the research path (Llama-shaped, so they export as `llama`).
    # Set vocab_size to the tokenizer's on a copy: dataclasses.replace(preset, vocab_size=n).
    "tiny": _preset(vocab_size=512, block_size=128, n_layer=2, n_head=4, n_kv_head=2,
                    n_embd=64, mlp_hidden=176, tie_embeddings=True),
    "llama-14m": _preset(vocab_size=8192, block_size=512, n_layer=6, n_head=6, n_embd=384,
                         mlp_hidden=1024, tie_embeddings=True),
    "llama-60m": _preset(vocab_size=16384, block_size=1024, n_layer=10, n_head=10, n_kv_head=5,
                         n_embd=640, mlp_hidden=1728, tie_embeddings=True),
}


# codelm's short dtype names (flags such as --base-dtype, from_pretrained(dtype="bf16")).
SHORT_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def cuda_half_dtype(device: torch.device) -> torch.dtype:
    """The 16-bit dtype a GPU computes natively: bf16 from compute capability 8 (Ampere) on, and
    on ROCm; fp16 before (T4, V100). torch.cuda.is_bf16_supported() also says yes there, as it
    can emulate bf16, slowly (and seed 000's bf16 runs on a T4 were unstable)."""
    if torch.version.hip or torch.cuda.get_device_capability(device)[0] >= 8:
        return torch.bfloat16
    return torch.float16


def lacks_native_bf16(device: torch.device) -> bool:
    """Whether ``device`` is a GPU that would only emulate bf16 (see cuda_half_dtype)."""
    return device.type == "cuda" and cuda_half_dtype(device) != torch.bfloat16


def _rms_normalize(x: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """x / rms(x) computed in (at least) fp32 and cast back to x's dtype before any weight, as
    Llama does (matters in bf16); also returns 1 / rms."""
    xf = x.to(torch.promote_types(x.dtype, torch.float32))
    rstd = torch.rsqrt(xf.square().mean(-1, keepdim=True) + eps)
    return (xf * rstd).to(x.dtype), rstd


class _RMSNormFunction(torch.autograd.Function):
    """RMSNorm with a hand-written backward: fwd + bwd take ~2.2x less time on CPU than
    autograd through the composite ops (one pass per term instead of one per primitive)."""

    @staticmethod
    def forward(ctx, x, weight, eps):
        xhat, rstd = _rms_normalize(x, eps)
        ctx.save_for_backward(xhat, rstd, weight)
        return weight * xhat

    @staticmethod
    def backward(ctx, grad):
        xhat, rstd, weight = ctx.saved_tensors
        grad_x = grad_w = None
        if ctx.needs_input_grad[1]:
            grad_w = (grad * xhat).flatten(0, -2).sum(0).to(weight.dtype)
        if ctx.needs_input_grad[0]:
            g = (grad * weight).to(rstd.dtype)
            xh = xhat.to(rstd.dtype)
            grad_x = ((g - xh * (g * xh).mean(-1, keepdim=True)) * rstd).to(xhat.dtype)
        return grad_x, grad_w, None


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad):
            if x.is_cuda and x.dtype == self.weight.dtype == torch.float32:
                # The fp32 residual stream of mixed-precision training: torch's fused kernels
                # (one each way) run a 110M model's bf16 step 13% faster on an H100 than the
                # hand-written backward, which is for the CPU (same maths in fp32).
                return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)
            return _RMSNormFunction.apply(x, self.weight, self.eps)
        # Without autograd, plain ops: Function.apply costs ~8 us a call, 1.5% of a decode step.
        return self.weight * _rms_normalize(x, self.eps)[0]


def dropout(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """F.dropout; on CPU one uniform draw and a multiply, ~1.4x faster forward + backward there
    than torch's bernoulli kernel. CUDA keeps torch's fused kernel."""
    if not training or not p:
        return x
    if x.is_cuda:
        return F.dropout(x, p, True)
    keep = torch.rand(x.shape, device=x.device) >= p  # fp32 draws: exact p for a bf16 x too
    return x * keep.to(x.dtype).mul_(1.0 / (1.0 - p))


def make_norm(cfg: ModelConfig) -> nn.Module:
    if cfg.norm == "rmsnorm":
        return RMSNorm(cfg.n_embd, cfg.norm_eps)
    return nn.LayerNorm(cfg.n_embd, eps=cfg.norm_eps)


def rope_inv_freq(cfg: ModelConfig, device: torch.device | str | None = None) -> torch.Tensor:
    """Inverse frequencies (fp32) of the rotated dims, with Llama-3 scaling when configured."""
    dim = cfg.rotary_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float32,
                                                      device=device) / dim))
    if cfg.rope_scaling is None:
        return inv_freq
    s = cfg.rope_scaling
    factor, low, high = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
    old_len = s["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
    return torch.where(medium, smoothed, scaled)


class RotaryEmbedding(nn.Module):
    """cos/sin tables computed per forward from positions, so left padding shifts them per row."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        inv_freq = torch.empty(cfg.rotary_dim // 2)  # on the default device; values below
        if not inv_freq.is_meta:  # (on meta, pretrained.load: arange would import sympy)
            inv_freq = rope_inv_freq(cfg, device=inv_freq.device)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def _apply(self, fn, recurse=True):
        # Keep the frequencies exact in fp32 whatever `.to(dtype)`/`to_empty` does to buffers:
        # bf16 frequencies put the angle of position 1000 off by radians.
        super()._apply(fn, recurse)
        self.inv_freq = rope_inv_freq(self.cfg, device=self.inv_freq.device)
        return self

    def forward(self, pos: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = (pos[..., None].float() * self.inv_freq)[:, :, None]  # (B, T, 1, rotary_dim / 2)
        return freqs.cos().to(dtype), freqs.sin().to(dtype)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool,
            out: torch.Tensor, inverse: bool = False) -> torch.Tensor:
    """Write x (B, T, H, D) into out with its first 2 * cos.shape[-1] dims rotated (by minus the
    angle if inverse: the backward); cos, sin (B, T, 1, r / 2). Each half is written in place
    (a mul and an addcmul), so no cat, and the backward has no cat either."""
    r = 2 * cos.shape[-1]
    if interleaved:  # pairs (0, 1), (2, 3), ... as in CodeGen / GPT-J
        x1, x2, o1, o2 = x[..., 0:r:2], x[..., 1:r:2], out[..., 0:r:2], out[..., 1:r:2]
    else:  # halves, as in Llama / NeoX
        h = r // 2
        x1, x2, o1, o2 = x[..., :h], x[..., h:r], out[..., :h], out[..., h:r]
    sign = -1 if inverse else 1
    if torch.compiler.is_compiling():  # dynamo refuses out= into a strided view; inductor
        o1.copy_((x1 * cos).addcmul_(x2, sin, value=-sign))  # fuses this into one kernel
        o2.copy_((x2 * cos).addcmul_(x1, sin, value=sign))
    else:
        torch.mul(x1, cos, out=o1).addcmul_(x2, sin, value=-sign)
        torch.mul(x2, cos, out=o2).addcmul_(x1, sin, value=sign)
    if r < x.shape[-1]:  # partial rotary: the rest passes through
        out[..., r:] = x[..., r:]
    return out


def _split_rotated(qkv: torch.Tensor, rope, n_head: int, n_kv: int, interleaved: bool):
    """Fused-projection rows (B, T, n_head + 2 n_kv, D) -> q, k, v (B, heads, T, D), q and k
    rotated when rope (cos, sin) is given."""
    # split, not slices: without rope autograd runs this, and a slice's backward zero-fills
    # a tensor of the whole qkv
    qk, v = qkv.split((n_head + n_kv, n_kv), dim=2)
    if rope is not None:  # queries and keys rotated in one go
        qk = _rotate(qk, *rope, interleaved, qkv.new_empty(qk.shape))
    q, k = qk.transpose(1, 2).split((n_head, n_kv), dim=1)
    return q, k, v.transpose(1, 2)


class _SplitRotatedFunction(torch.autograd.Function):
    """`_split_rotated` whose backward writes the gradients of q, k and v straight into one
    tensor of qkv's shape: autograd through the split and the rotation would cat them three
    times a layer (and zero-fill for the slices)."""

    @staticmethod
    def forward(ctx, qkv, cos, sin, n_head, n_kv, interleaved):
        ctx.save_for_backward(cos, sin)
        ctx.layout = (n_head, n_kv, interleaved)
        return _split_rotated(qkv, (cos, sin), n_head, n_kv, interleaved)

    @staticmethod
    def backward(ctx, grad_q, grad_k, grad_v):
        cos, sin = ctx.saved_tensors
        n_head, n_kv, interleaved = ctx.layout
        B, _, T, D = grad_q.shape
        grad = grad_q.new_empty(B, T, n_head + 2 * n_kv, D)
        _rotate(grad_q.transpose(1, 2), cos, sin, interleaved, grad[:, :, :n_head], inverse=True)
        _rotate(grad_k.transpose(1, 2), cos, sin, interleaved, grad[:, :, n_head:n_head + n_kv],
                inverse=True)
        grad[:, :, n_head + n_kv:] = grad_v.transpose(1, 2)
        return grad, None, None, None, None, None


def _sdpa_takes_gqa(device: torch.device, dtype: torch.dtype, masked: bool) -> bool:
    """Whether SDPA should get the grouped keys and values as they are (enable_gqa) rather than
    repeated to the query heads. On CUDA only the flash kernel takes enable_gqa (fp16/bf16, no
    mask, sm80+); any other grouped call falls silently to the math kernel, which materialises
    every score (and repeats k/v itself), while repeated k/v let the memory-efficient kernel run.
    Other devices' kernels take the groups as they are, and repeating would only cost memory."""
    if device.type != "cuda":
        return True
    return (not masked and dtype in (torch.float16, torch.bfloat16)
            # get_device_properties, not get_device_capability: torch.compile folds it
            and torch.cuda.get_device_properties(device).major >= 8)


# One layer's preallocated (keys, values), each (B, n_kv_head, length, head_dim), written in place
# at the decode step's slots (static shapes). A generation owns its caches: they are created per
# call and passed down, never stored on the model, so generations running at once do not mix.
LayerCache = tuple[torch.Tensor, torch.Tensor]


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.qkv = nn.Linear(cfg.n_embd, cfg.qkv_size, bias=cfg.qkv_bias)
        self.proj = nn.Linear(cfg.n_head * cfg.head_dim, cfg.n_embd, bias=cfg.attn_proj_bias)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None,
                mask: torch.Tensor | None, slots: torch.Tensor | None,
                cache: LayerCache | None = None) -> torch.Tensor:
        """``rope``: (cos, sin), None without rotary positions; ``mask``: SDPA's boolean mask,
        None for plain causal attention; ``slots``: where ``cache`` takes this step's keys."""
        cfg = self.cfg
        B, T, _ = x.shape
        qkv = self.qkv(x).view(B, T, cfg.n_head + 2 * cfg.n_kv_head, cfg.head_dim)
        layout = (cfg.n_head, cfg.n_kv_head, cfg.rope_interleaved)
        if rope is not None and torch.is_grad_enabled() and qkv.requires_grad:
            q, k, v = _SplitRotatedFunction.apply(qkv, *rope, *layout)
        else:
            q, k, v = _split_rotated(qkv, rope, *layout)
        if cache is not None:
            cache[0].index_copy_(2, slots, k)
            cache[1].index_copy_(2, slots, v)
            if mask is not None:  # no mask: a prompt without padding (`_prefill`), which
                k, v = cache      # needs only its own keys, causally
        gqa = cfg.n_kv_head != cfg.n_head
        if gqa and not _sdpa_takes_gqa(q.device, q.dtype, mask is not None):
            k = k.repeat_interleave(cfg.n_head // cfg.n_kv_head, dim=1)
            v = v.repeat_interleave(cfg.n_head // cfg.n_kv_head, dim=1)
            gqa = False
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=mask is None,
            dropout_p=cfg.attn_dropout if self.training else 0.0, enable_gqa=gqa)
        return self.proj(y.transpose(1, 2).reshape(B, T, cfg.n_head * cfg.head_dim))


class MLP(nn.Module):
    """fc: the up projection; SwiGLU adds `gate`. Gate and up stay two Linears, not one fused
    (n_embd, 2 * hidden): the fused one measured ~4% slower per training step on CPU (a slower
    wide matmul, SiLU on a strided half, and a cat in the backward of the split)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.fc = nn.Linear(cfg.n_embd, cfg.mlp_hidden, bias=cfg.mlp_bias)
        self.gate = (nn.Linear(cfg.n_embd, cfg.mlp_hidden, bias=cfg.mlp_bias)
                     if cfg.mlp == "swiglu" else None)
        self.proj = nn.Linear(cfg.mlp_hidden, cfg.n_embd, bias=cfg.mlp_bias)
        self.approximate = "tanh" if cfg.mlp == "gelu_tanh" else "none"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gate is not None:
            return self.proj(F.silu(self.gate(x)) * self.fc(x))
        return self.proj(F.gelu(self.fc(x), approximate=self.approximate))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.norm_1 = make_norm(cfg)
        self.attn = Attention(cfg)
        self.norm_2 = None if cfg.parallel_residual else make_norm(cfg)
        self.mlp = MLP(cfg)
        self.cfg = cfg

    def drop(self, x: torch.Tensor) -> torch.Tensor:
        # p read live from the shared cfg, so `model.cfg.dropout = p` retunes a loaded model.
        return dropout(x, self.cfg.dropout, self.training)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None,
                mask: torch.Tensor | None, slots: torch.Tensor | None,
                cache: LayerCache | None = None) -> torch.Tensor:
        """The arguments are ``Attention.forward``'s."""
        h = self.norm_1(x)
        a = self.drop(self.attn(h, rope, mask, slots, cache))
        if self.norm_2 is None:
            return x + a + self.drop(self.mlp(h))
        x = x + a
        return x + self.drop(self.mlp(self.norm_2(x)))


def _padded_mask(attention_mask: torch.Tensor, q_slots: torch.Tensor, length: int) -> torch.Tensor:
    """Boolean SDPA mask (B, 1, Tq, length): causal, padding keys hidden. Each query also sees
    itself, so rows of padding queries are never empty (an empty row gives NaN, and NaN values
    leak into real rows through the zero weights of the next layer)."""
    k_slots = torch.arange(length, device=q_slots.device)
    causal = k_slots[None, :] <= q_slots[:, None]
    mask = causal[None] & attention_mask[:, None, :length]
    mask = mask | (k_slots[None, :] == q_slots[:, None])[None]
    return mask[:, None]


def _positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position of each token counting real tokens only (left padding shifts nothing)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


# The CUDA-graph decode step's cache lengths are multiples of this (masked beyond the prompt
# and its new tokens): one graph serves prompts of many lengths.
GRAPH_CACHE_STEP = 256
# Below it, fp32 logits / temperature overflow to inf and the softmax is NaN (transformers fails
# there too, inside multinomial); above, such a temperature samples the argmax anyway.
MIN_TEMPERATURE = 1e-10
IGNORE_INDEX = -100  # the label of positions no loss counts: prompt tokens, padding


def _loss_chunk_rows(vocab: int, device: torch.device) -> int:
    """Rows of logits formed at a time. On CPU ~16 MiB of fp32 (at least 512 rows, so the
    matmuls stay efficient): a chunk's softmax passes run in cache and its buffers come back from
    the heap each step, where a whole (N, V) tensor is mapped and page-faulted afresh every step
    (512 rows measured 4% faster a training step than 256 at vocab 8192). ~1 GiB on GPUs."""
    budget = 2**28 if device.type == "cuda" else 2**22
    return max(512, budget // vocab)


def _matmul_dtype(hidden: torch.Tensor) -> torch.dtype:
    """The head's matmul dtype: autocast's when it is on, as the unfused head's would be."""
    dev = hidden.device.type
    return torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else hidden.dtype


def _head_cross_entropy(hidden, weight, bias, labels, smoothing: float, want: tuple,
                        count_correct: bool, grad_scale: torch.Tensor | float = 1.0):
    """Summed cross-entropy of hidden @ weight.T + bias, chunk by chunk, with the gradients of
    that sum for the inputs flagged in `want` (hidden, weight, bias) computed in the same pass,
    times grad_scale. Returns (loss sum, correct top-1 count or None, (grad_hidden, grad_weight,
    grad_bias))."""
    dev = hidden.device
    dt = _matmul_dtype(hidden)  # the softmax runs in fp32
    acc = torch.promote_types(dt, torch.float32)
    h, w = hidden.to(dt), weight.to(dt)
    b = bias.to(dt) if bias is not None else None
    vocab = w.shape[0]
    gh = torch.empty(h.shape, dtype=dt, device=dev) if want[0] else None
    # In the matmul dtype, accumulated in place: under autocast an fp32 gradient would take a
    # (V, C) temporary per chunk (and on CPU a second one to add it). One rounding per chunk,
    # where the unfused head rounds its one product once; converted to the weight's dtype last.
    gw = torch.zeros(w.shape, dtype=dt, device=dev) if want[1] else None
    gb = torch.zeros(vocab, dtype=acc, device=dev) if want[2] else None
    total = torch.zeros((), dtype=acc, device=dev)
    correct = torch.zeros((), dtype=torch.long, device=dev) if count_correct else None
    step = _loss_chunk_rows(vocab, dev)
    with torch.autocast(dev.type, enabled=False):
        for s in range(0, h.shape[0], step):
            z = g = None  # the previous chunk goes before the next is formed: one chunk alive
            hc, yc = h[s:s + step], labels[s:s + step]
            z = (hc @ w.t() if b is None else torch.addmm(b, hc, w.t())).to(acc)
            keep = yc != IGNORE_INDEX
            rows, target = torch.arange(len(yc), device=dev), yc.clamp(min=0)
            if count_correct:
                correct += ((z.argmax(-1) == yc) & keep).sum()
            z.sub_(z.amax(-1, keepdim=True))  # logits shifted by their max: exp cannot overflow
            nll = -z[rows, target]
            smooth = -z.mean(-1) if smoothing else None
            z.exp_()
            sumexp = z.sum(-1)
            log_sum = sumexp.log()
            per_row = (1 - smoothing) * (log_sum + nll)
            if smoothing:
                per_row += smoothing * (log_sum + smooth)
            total += torch.where(keep, per_row, 0).sum()
            if not any(want):
                continue
            # d(sum)/dz = softmax - (1 - eps) onehot - eps / V on counted rows, 0 on the rest
            counted = keep.to(acc) * grad_scale
            z.mul_((counted / sumexp)[:, None])
            z[rows, target] -= (1 - smoothing) * counted
            if smoothing:
                z.sub_((smoothing / vocab) * counted[:, None])
            g = z.to(dt)
            if gh is not None:
                torch.mm(g, w, out=gh[s:s + step])
            if gw is not None:
                gw.addmm_(g.t(), hc)
            if gb is not None:
                gb += z.sum(0)
    return total, correct, (gh, gw, gb)


class _HeadCrossEntropyFunction(torch.autograd.Function):
    """The LM head and its cross-entropy as one op. The (N, V) logits are never held whole: each
    chunk's gradient is finished, through both matmuls, while the chunk is in cache, so the
    backward only scales. Saves the logits' memory (N * V * 4 bytes: 1 GiB per 2048 tokens of
    Llama-3's vocabulary) and, on CPU, ~5% of a small model's training step."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, smoothing, count_correct, grad_scale):
        total, correct, grads = _head_cross_entropy(
            hidden, weight, bias, labels, smoothing, ctx.needs_input_grad[:3], count_correct,
            grad_scale)
        # Kept off save_for_backward: the backward scales them in place (grad_weight can be
        # as large as the weight), so a second backward through this graph is refused.
        ctx.grads, ctx.grad_scale = grads, grad_scale
        ctx.dtypes = (hidden.dtype, weight.dtype, None if bias is None else bias.dtype)
        if correct is None:
            return total
        ctx.mark_non_differentiable(correct)
        return total, correct

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad, *_):
        if ctx.grads is None:
            raise RuntimeError("the fused LM-head loss supports one backward per forward "
                               "(retain_graph=True with a second backward is not supported)")
        grads, ctx.grads = ctx.grads, None
        factor = grad / ctx.grad_scale  # 1 when the forward guessed the incoming gradient
        out = [None if g is None else g.mul_(factor).to(d) for g, d in zip(grads, ctx.dtypes)]
        return *out, None, None, None, None


def head_cross_entropy(hidden: torch.Tensor, labels: torch.Tensor, head: nn.Module,
                       label_smoothing: float = 0.0, count_correct: bool = False,
                       grad_scale: torch.Tensor | float | None = None,
                       ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Summed next-token cross-entropy of head(hidden) (hidden (..., C), labels (...)) over the
    positions whose label is not IGNORE_INDEX, in fp32; with count_correct, also how many of
    them have the label as top logit. An nn.Linear head runs fused with the loss (the logits are
    never materialized, see _HeadCrossEntropyFunction); any other head (a LoRA-wrapped one) runs
    unfused.

    grad_scale: the factor the caller's backward will multiply this sum's gradient by (the fp16
    loss scale times any weighting). The fused loss forms its gradients in the forward, so in
    fp16 (autocast or fp16 tensors) it needs this to form them at the magnitude the loss scaler
    chose, as the unfused head would in its backward (fp16's range is narrow); without it, fp16
    runs unfused. Other dtypes ignore it."""
    if not isinstance(label_smoothing, numbers.Real) or not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1], got {label_smoothing!r}")
    if hidden.shape[-1] != head.in_features:
        raise ValueError(f"hidden has {hidden.shape[-1]} features, the head takes "
                         f"{head.in_features} (logits passed as hidden?)")
    if labels.shape != hidden.shape[:-1]:
        raise ValueError(f"labels shape {tuple(labels.shape)} must equal hidden's leading shape "
                         f"{tuple(hidden.shape[:-1])}")
    if labels.dtype != torch.long:  # (the unfused head's F.cross_entropy takes no other)
        raise ValueError(f"labels must be token ids in a torch.long tensor, got {labels.dtype}")
    hidden, labels = hidden.flatten(0, -2), labels.flatten()
    vocab = head.out_features
    bad = ((labels < 0) & (labels != IGNORE_INDEX)) | (labels >= vocab)
    if bool(bad.any()):
        raise ValueError(f"label {int(labels[bad][0])} is outside the vocabulary (size "
                         f"{vocab}); labels must be token ids or {IGNORE_INDEX} (ignored)")
    fp16 = _matmul_dtype(hidden) == torch.float16
    fused = type(head) is nn.Linear  # a quantized or LoRA head may have no plain .weight
    wants_grad = torch.is_grad_enabled() and any(
        t.requires_grad for t in (hidden, *head.parameters()))
    if fused and not (fp16 and wants_grad and grad_scale is None):
        args = (hidden, head.weight, head.bias, labels, label_smoothing, count_correct)
        if wants_grad:
            out = _HeadCrossEntropyFunction.apply(*args, grad_scale if fp16 else 1.0)
            return out if count_correct else (out, None)
        with torch.no_grad():
            total, correct, _ = _head_cross_entropy(*args[:5], (False,) * 3, count_correct)
        return total, correct
    logits = head(hidden).float()
    total = F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX,
                            label_smoothing=label_smoothing, reduction="sum")
    if not count_correct:
        return total, None
    return total, ((logits.argmax(-1) == labels) & (labels != IGNORE_INDEX)).sum()


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        # The model's own copy (rope_scaling too), shared by its modules: `model.cfg.dropout = p`
        # retunes this model, never the preset or the other models built from the same config.
        self.cfg = cfg = copy.deepcopy(cfg)
        # The checkpoint directory from_pretrained read (as transformers' name_or_path):
        # lora.save_adapter records it as the adapter's base unless told another.
        self.name_or_path: str | None = None
        # _weight: reset_parameters below draws the values (so nn.Embedding's own normal_ is
        # skipped), and on the meta device (pretrained.load) nothing is drawn at all: normal_ on
        # meta imports sympy, 65 MiB of RSS for nothing.
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd,
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
        # Activation (gradient) checkpointing in training: a block's activations are recomputed
        # in the backward instead of stored: ~n_layer times less activation memory for a 1.24x
        # slower step (bench_model.py --checkpointing, CPU). A run setting, not in ModelConfig.
        self.gradient_checkpointing = False
        self.register_state_dict_pre_hook(_row_major_state)  # see _use_decode_layout
        if not self.wte.weight.is_meta:
            self.reset_parameters()

    # ------------------------------------------------------------------ init
    def reset_parameters(self) -> None:
        """From-scratch init. normal: GPT-2 (N(0, 0.02), residual projections scaled by
        1/sqrt(2 n_layer) so the residual stream does not grow with depth); xavier: uniform
        Xavier on every matrix."""
        cfg = self.cfg
        for name, p in self.named_parameters():
            if p.dim() < 2:
                if name.endswith("bias"):
                    nn.init.zeros_(p)
                else:  # norm weights
                    nn.init.ones_(p)
            elif cfg.init == "xavier":
                nn.init.xavier_uniform_(p)
            elif name.endswith(("attn.proj.weight", "mlp.proj.weight")):
                nn.init.normal_(p, 0.0, cfg.init_std / math.sqrt(2 * cfg.n_layer))
            else:
                nn.init.normal_(p, 0.0, cfg.init_std)

    def num_parameters(self, exclude_embeddings: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())
        if exclude_embeddings:
            n -= self.wte.weight.numel() + (self.wpe.weight.numel() if self.wpe is not None else 0)
        return n

    # --------------------------------------------------------------- forward
    def _run(self, idx, pos, mask, slots, caches=None, last_only=False, head=True):
        x = self.wte(idx)
        if self.wpe is not None:
            x = x + self.wpe(pos)
        x = dropout(x, self.cfg.embedding_dropout, self.training)
        rope = self.rope(pos, x.dtype) if self.rope is not None else None
        recompute = self.gradient_checkpointing and self.training and torch.is_grad_enabled()
        for i, block in enumerate(self.blocks):
            if recompute:  # keep only each block's input; its activations are redone in backward
                x = checkpoint(block, x, rope, mask, slots, use_reentrant=False)
            else:
                x = block(x, rope, mask, slots, caches[i] if caches is not None else None)
        if last_only:
            x = x[:, -1:]
        x = self.norm_f(x)
        return self.lm_head(x) if head else x

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                return_hidden: bool = False) -> torch.Tensor:
        """Logits (B, T, V); with return_hidden, the final normed hidden states (B, T, C), which
        `head_cross_entropy` turns into the loss without forming the logits. attention_mask
        (B, T), True = real token, for left-padded batches (right padding needs none: causal
        attention never looks ahead)."""
        _check_ids(input_ids, "input_ids", self.cfg.vocab_size)
        B, T = input_ids.shape
        if T > self.cfg.block_size:
            raise ValueError(f"sequence length {T} exceeds the context length "
                             f"block_size={self.cfg.block_size}")
        if attention_mask is None:
            pos = torch.arange(T, device=input_ids.device)[None]
            return self._run(input_ids, pos, None, None, head=not return_hidden)
        _check_tensor(attention_mask, "attention_mask")
        if attention_mask.shape != input_ids.shape:
            raise ValueError(f"attention_mask shape {tuple(attention_mask.shape)} != input_ids "
                             f"shape {tuple(input_ids.shape)}")
        attention_mask = attention_mask.bool()
        slots = torch.arange(T, device=input_ids.device)
        mask = _padded_mask(attention_mask, slots, T)
        return self._run(input_ids, _positions(attention_mask), mask, None,
                         head=not return_hidden)

    # ------------------------------------------------------------- KV cache
    def _cache_dtype(self) -> torch.dtype:
        """The dtype the qkv projection returns: autocast's when it is on for the device (so
        decoding sees the keys and values forward computes), else the weights'."""
        p = self.wte.weight
        if torch.is_autocast_enabled(p.device.type) and p.dtype != torch.float64:
            return torch.get_autocast_dtype(p.device.type)  # autocast leaves fp64 alone
        return p.dtype

    def _new_caches(self, batch: int, length: int) -> list[LayerCache]:
        """Zeroed caches in `_cache_dtype`."""
        shape = (batch, self.cfg.n_kv_head, length, self.cfg.head_dim)
        p, dtype = self.wte.weight, self._cache_dtype()
        return [(p.new_zeros(shape, dtype=dtype), p.new_zeros(shape, dtype=dtype))
                for _ in self.blocks]

    def _graph_caches(self, batch: int, length: int) -> list[LayerCache]:
        """The caches of the CUDA-graph decode step. A graph replays fixed addresses: the last
        call's caches are kept (zeroed) for the next call of the same shape, where new ones would
        make each call record its graphs anew, and marked static for torch.compile. So one
        such generation runs at a time: a second would overwrite the first one's caches."""
        if self.__dict__.get("_graph_caches_busy"):
            raise RuntimeError("a compiled CUDA generation is already running on this model (an "
                               "unfinished stream?): exhaust or close it first, or pass "
                               "compile=False")
        held = self.__dict__.get("_held_caches")
        k = held[0][0] if held is not None else None
        if k is not None and (k.shape[0], k.shape[2], k.dtype, k.device) == (
                batch, length, self._cache_dtype(), self.wte.weight.device):
            for pair in held:
                for t in pair:
                    t.zero_()
        else:
            held = self._new_caches(batch, length)
            for pair in held:
                for t in pair:
                    torch._dynamo.mark_static_address(t)
            self._held_caches = held
        self._graph_caches_busy = True  # (cleared by _steps when the generation ends)
        return held

    def _end_decode(self) -> None:
        if self.training:  # training wants row-major weights back (see _use_decode_layout)
            self._use_decode_layout(False)

    def train(self, mode: bool = True) -> Transformer:
        if mode:
            self._use_decode_layout(False)
        return super().train(mode)

    @torch.inference_mode(False)  # generate calls this in inference mode; training needs
    @torch.no_grad()                # ordinary weight tensors afterwards
    def _use_decode_layout(self, on: bool) -> None:
        """Decoding multiplies one row by every weight matrix: memory-bound, and on CPU some
        shapes stream at half the bandwidth in the (out, in) row-major layout, e.g. (1024, 384)
        at 9 GB/s against 20 GB/s column-major here. On: the Linear weights that
        `_reads_faster_column_major` are re-laid out in place (same values and shape, swapped
        strides); they stay so in eval mode (re-laying out per call would copy every such
        weight twice a call) and return to row-major when training resumes, or `state_dict()`
        is read (`_row_major_state`), so saving tools see ordinary tensors. CUDA reads both
        layouts well: left as is."""
        if on == getattr(self, "_decode_layout", False):
            return
        if on and self.wte.weight.device.type != "cpu":  # (off: also after a move to CUDA)
            return
        self._decode_layout = on
        if not on:
            for p in self.parameters():
                if not p.is_contiguous():
                    p.data = p.data.contiguous()
            return
        for module in self.modules():
            w = module.weight if isinstance(module, nn.Linear) else None
            if w is not None and w.is_contiguous() and _reads_faster_column_major(w):
                w.data = w.data.t().contiguous().t()  # (a tied weight: once, then strided)

    @staticmethod
    def _reorder_caches(caches: list[LayerCache], rows: torch.Tensor) -> None:
        for k, v in caches:
            k.copy_(k.index_select(0, rows))
            v.copy_(v.index_select(0, rows))

    def _step(self, tok, pos, slot, key_valid, caches):
        """One decode step: tok, pos (B, 1); slot (1,) cache slot; key_valid (B, L)."""
        k_slots = torch.arange(key_valid.shape[1], device=tok.device)
        mask = ((k_slots <= slot) & key_valid)[:, None, None, :]
        return self._run(tok, pos, mask, slot, caches)[:, -1]

    def _decoder(self, compile: bool, device: torch.device) -> Callable:
        if not compile:
            return self._step
        steps = self.__dict__.setdefault("_compiled_steps", {})  # (left out of copies)
        if device.type not in steps:
            # Default dynamic: a second batch or cache length recompiles once with symbolic
            # sizes instead of once per shape. On CUDA the step is a CUDA graph: one replay
            # instead of ~15 kernel launches a layer, which bound a small model's decoding.
            steps[device.type] = (
                torch.compile(self._step, fullgraph=True, mode="reduce-overhead")
                if device.type == "cuda" else
                torch.compile(self._step, fullgraph=True, backend=_decode_backend))
        return steps[device.type]

    def _prefill(self, idx, attention_mask, length, caches):
        """Fill the cache with the prompt; return (last logits (B, V), key_valid (B, L), next pos)."""
        B, T = idx.shape
        key_valid = torch.ones(B, length, dtype=torch.bool, device=idx.device)
        if attention_mask is not None:  # (checked by the callers: _check_mask)
            key_valid[:, :T] = attention_mask.bool()
        slots = torch.arange(T, device=idx.device)
        pos = _positions(key_valid[:, :T])
        mask = None  # no padding: causal attention over the prompt's own keys (flash on CUDA)
        if attention_mask is not None and not bool(attention_mask.all()):
            mask = _padded_mask(key_valid, slots, length)
        logits = self._run(idx, pos, mask, slots, caches, last_only=True)[:, -1]
        return logits, key_valid, pos[:, -1:] + 1

    def __getstate__(self) -> dict:
        """Copies and pickles leave the compiled decode steps and their held caches behind (each
        compiles its own): a step is bound to this instance, so a deep copy sharing it would
        decode with the original's weights, and a compiled function cannot be pickled."""
        state = super().__getstate__()
        state.pop("_compiled_steps", None)
        state.pop("_held_caches", None)
        state.pop("_graph_caches_busy", None)
        return state

    # ------------------------------------------------------------- generate
    @torch.no_grad()
    def stream(self, idx: torch.Tensor, max_new_tokens: int, temperature: float = 0.0,
               top_k: int | None = None, top_p: float | None = None,
               eos_id: int | Sequence[int] | None = None,
               stop: str | int | Sequence[str | int | Sequence[int]] | None = None,
               attention_mask: torch.Tensor | None = None, pad_id: int | None = None,
               decode: Callable[[list[int]], str] | None = None,
               generator: torch.Generator | None = None,
               compile: bool = False) -> Iterator[torch.Tensor]:
        """Yield the next token of every row (LongTensor (B,)) as it is chosen, for interactive
        use. Rows that have finished (EOS or a stop) yield `pad_id` (default: the EOS id).
        Stops early once every row has finished. Arguments as in `generate`."""
        yield from self._steps(idx, max_new_tokens, temperature, top_k, top_p, eos_id, stop,
                               attention_mask, pad_id, decode, generator, compile)

    def _steps(self, idx, max_new_tokens, temperature, top_k, top_p, eos_id, stop,
               attention_mask, pad_id, decode, generator, compile):
        B, T, max_new_tokens = self._check_prompt(idx, max_new_tokens)
        _check_sampling(temperature, top_k, top_p, generator)
        _check_mask(attention_mask, idx)
        vocab = self.cfg.vocab_size
        eos_ids, stop_seqs, stop_strs = _parse_stops(eos_id, stop, decode, vocab)
        if pad_id is not None:
            fill = _pad_id(pad_id, vocab)
        elif eos_ids:
            fill = eos_ids[0]
        elif (stop_seqs or stop_strs) and B > 1:
            # Any filler would be a real token id (0 is "!" in GPT-2's vocabulary).
            raise ValueError("stop without eos_id on a batch needs pad_id: the id that fills "
                             "the rows that stop first")
        else:
            fill = 0  # never emitted: a lone row ends generation when it stops
        length = T + max_new_tokens
        eos_t = torch.tensor(eos_ids, device=idx.device, dtype=torch.long)
        step_fn = self._decoder(compile, idx.device)
        generated: list[torch.Tensor] = []
        finished = torch.zeros(B, dtype=torch.bool, device=idx.device)
        track = bool(eos_ids or stop_seqs or stop_strs)
        self._use_decode_layout(not compile)  # the compiled step reads row-major best
        graphs = compile and idx.device.type == "cuda"
        if graphs:  # few cache lengths, so few graphs for prompts of many lengths
            length = -(-length // GRAPH_CACHE_STEP) * GRAPH_CACHE_STEP
        slot = torch.tensor([T], device=idx.device)  # advanced on the device: no copy a step
        caches = self._graph_caches(B, length) if graphs else self._new_caches(B, length)
        try:
            logits, key_valid, pos = self._prefill(idx, attention_mask, length, caches)
            for i in range(max_new_tokens):
                tok = _pick(logits, temperature, top_k, top_p, generator)
                if track:
                    tok = torch.where(finished, torch.full_like(tok, fill), tok)
                    generated.append(tok)
                yield tok
                if track:
                    finished |= torch.isin(tok, eos_t)
                    finished |= _hit_stop(generated, stop_seqs, stop_strs, decode, finished)
                    if bool(finished.all()):
                        return
                if i == max_new_tokens - 1:
                    return
                if graphs:  # a new graph iteration: the last one's logits have been read
                    torch.compiler.cudagraph_mark_step_begin()
                logits = step_fn(tok[:, None], pos, slot, key_valid, caches)
                pos, slot = pos + 1, slot + 1
        finally:
            if graphs:
                self._graph_caches_busy = False
            self._end_decode()

    def generate(self, idx: torch.Tensor, max_new_tokens: int, temperature: float = 0.0,
                 top_k: int | None = None, top_p: float | None = None,
                 eos_id: int | Sequence[int] | None = None,
                 stop: str | int | Sequence[str | int | Sequence[int]] | None = None,
                 num_beams: int = 1,
                 attention_mask: torch.Tensor | None = None, pad_id: int | None = None,
                 decode: Callable[[list[int]], str] | None = None,
                 generator: torch.Generator | None = None, length_penalty: float = 1.0,
                 compile: bool = False) -> torch.Tensor:
        """Continue the prompts idx (B, T) (left-padded, with attention_mask, for a batch of
        different lengths). Returns (B, T + n): the prompt then n <= max_new_tokens new tokens;
        a row that finished early is filled with `pad_id` (default: the first EOS id; a batch
        with stops but no eos_id needs pad_id). T + max_new_tokens may reach block_size + 1
        (the last new token is never fed back).

        temperature 0: greedy; > 0: sampling, optionally restricted by top_k / top_p (filtered
        as transformers filters, so a seed samples what its do_sample=True would with the same
        filters; top_k=None is no filter, transformers' top_k=0, where its generate defaults to
        top_k=50).
        num_beams > 1: beam search (scores are summed log-probs / length ** length_penalty).
        eos_id: an id or ids ending a row. stop: a string, an id, or a list of strings, ids and
        id sequences (strings need `decode`, e.g. tokenizer.decode) that end a row; the stop
        itself is kept in the output. Stops are matched in the generated tokens only, never
        across the prompt's end (transformers' stop_strings match there too).
        compile: torch.compile the decode step (static shapes: the cache is preallocated); not
        with num_beams > 1. On CUDA the step runs as a CUDA graph (~12x the eager step for a
        124M model on an H100); its caches (cache lengths rounded up to GRAPH_CACHE_STEP) stay
        allocated on the model between calls, so same-shaped calls replay the recorded graphs,
        and one such generation (or `stream`) runs at a time per model (a second raises
        RuntimeError until the first ends: exhaust or close a stream). Under torch.autocast
        the caches hold autocast's dtype, as forward's keys and values. In train mode dropout
        is on, as in transformers: call `model.eval()` first for deterministic output.

        On CPU in eval mode, the eager path may leave Linear weights column-major (same values
        and shapes, non-contiguous strides: they stream faster; see `_use_decode_layout`) until
        `model.train()` or `state_dict()` (so `save_pretrained` and safetensors' save_model
        see row-major tensors); code that views a parameter's memory directly (`p.view(-1)`)
        should use `p.contiguous()` or call `model.train()` first.
        """
        num_beams = _index(num_beams, "num_beams")
        if num_beams < 1:
            raise ValueError(f"num_beams must be >= 1, got {num_beams}")
        if num_beams > 1:
            if (temperature != 0.0 or top_k is not None or top_p is not None
                    or _stop_entries(stop)):
                raise ValueError("beam search is deterministic: leave temperature, top_k, top_p "
                                 "and stop unset with num_beams > 1")
            if compile:
                raise ValueError("compile=True compiles the greedy and sampling decode step; "
                                 "beam search runs eagerly: leave compile unset with "
                                 "num_beams > 1")
            if not isinstance(length_penalty, numbers.Real) or not math.isfinite(length_penalty):
                raise ValueError(f"length_penalty must be a finite number, got "
                                 f"{length_penalty!r}")
            with torch.inference_mode():
                out = self._beam_search(idx, max_new_tokens, num_beams, eos_id,
                                        attention_mask, pad_id, length_penalty)
            return out.clone()  # a normal tensor again, usable by autograd
        # inference_mode (not no_grad) drops view and version tracking: ~5% per decode step.
        with torch.inference_mode():
            steps = list(self._steps(idx, max_new_tokens, temperature, top_k, top_p, eos_id,
                                     stop, attention_mask, pad_id, decode, generator, compile))
            new = torch.stack(steps, dim=1) if steps else idx[:, :0]
        return torch.cat((idx, new.clone()), dim=1)

    def _check_prompt(self, idx: torch.Tensor, max_new_tokens: int) -> tuple[int, int, int]:
        """(B, T, max_new_tokens as an int), once the prompt and the length are checked."""
        _check_ids(idx, "idx", self.cfg.vocab_size)
        max_new_tokens = _index(max_new_tokens, "max_new_tokens")
        if max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
        B, T = idx.shape
        if T == 0:
            raise ValueError("the prompt is empty: generation continues at least one token (for "
                             "an unconditional sample, start from the BOS id)")
        # The last new token is never fed back: n new tokens take positions up to T + n - 2, so
        # T + n may reach block_size + 1 (as in transformers).
        block = self.cfg.block_size
        if T > block:
            raise ValueError(f"prompt length {T} exceeds the context length block_size={block}")
        if T + max_new_tokens > block + 1:
            raise ValueError(f"prompt length {T} + max_new_tokens {max_new_tokens} exceeds the "
                             f"context length block_size={block} + 1 (the last new token is "
                             "never fed back)")
        return B, T, max_new_tokens

    def _beam_search(self, idx, max_new_tokens, num_beams, eos_id, attention_mask, pad_id,
                     length_penalty):
        B, T, max_new_tokens = self._check_prompt(idx, max_new_tokens)
        _check_mask(attention_mask, idx)  # before the beams expand the shapes it names
        eos_ids, _, _ = _parse_stops(eos_id, None, None, self.cfg.vocab_size)
        if pad_id is not None:
            fill = _pad_id(pad_id, self.cfg.vocab_size)
        else:  # without EOS no hypothesis ends early, so no fill is ever returned
            fill = eos_ids[0] if eos_ids else 0
        K, dev = num_beams, idx.device
        # As HF: (1 + #EOS) * K candidates a step, so K live beams remain whichever EOS ids
        # the top ones end with (each beam contributes at most #EOS finished candidates).
        pool = max(2, 1 + len(eos_ids)) * K
        flat = idx.repeat_interleave(K, dim=0)
        mask = None if attention_mask is None else attention_mask.repeat_interleave(K, dim=0)
        length = T + max_new_tokens
        # Every beam starts as beam 0, so the first step draws K distinct tokens from it.
        scores = torch.full((B, K), -1e9, device=dev)
        scores[:, 0] = 0.0
        seqs = torch.empty(B * K, 0, dtype=torch.long, device=dev)
        done: list[list[tuple[float, torch.Tensor]]] = [[] for _ in range(B)]
        closed = [False] * B
        base = (torch.arange(B, device=dev) * K)[:, None]
        self._use_decode_layout(True)
        caches = self._new_caches(B * K, length)
        try:
            logits, key_valid, pos = self._prefill(flat, mask, length, caches)
            for i in range(max_new_tokens):
                logp = torch.log_softmax(logits.float(), dim=-1)
                V = logp.shape[-1]
                cand = (scores[..., None] + logp.view(B, K, V)).view(B, K * V)
                top, ids = cand.topk(min(pool, K * V), dim=1)
                beams_l, toks_l, top_l = (ids // V).tolist(), (ids % V).tolist(), top.tolist()
                new_scores = [[-1e9] * K for _ in range(B)]
                new_beam = [[0] * K for _ in range(B)]
                new_tok = [[fill] * K for _ in range(B)]
                for b in range(B):
                    if closed[b]:
                        continue
                    n = 0
                    for r in range(ids.shape[1]):
                        t, src, s = toks_l[b][r], beams_l[b][r], top_l[b][r]
                        if t in eos_ids:
                            if r < K:
                                hyp = torch.cat((seqs[b * K + src], seqs.new_tensor([t])))
                                done[b].append((s / (i + 1) ** length_penalty, hyp))
                            continue
                        new_scores[b][n], new_beam[b][n], new_tok[b][n] = s, src, t
                        n += 1
                        if n == K:
                            break
                    done[b].sort(key=lambda h: -h[0])
                    del done[b][K:]
                    best_running = max(new_scores[b]) / (i + 1) ** length_penalty
                    if len(done[b]) == K and done[b][-1][0] >= best_running:
                        closed[b] = True
                new_scores = torch.tensor(new_scores, device=dev)
                new_beam = torch.tensor(new_beam, device=dev)
                new_tok = torch.tensor(new_tok, device=dev)
                rows = (base + new_beam).view(-1)
                seqs = torch.cat((seqs[rows], new_tok.view(-1, 1)), dim=1)
                scores = new_scores
                if all(closed) or i == max_new_tokens - 1:
                    break
                self._reorder_caches(caches, rows)
                key_valid, pos = key_valid[rows], pos[rows]
                slot = torch.tensor([T + i], device=dev)
                logits = self._step(new_tok.view(-1, 1), pos, slot, key_valid, caches)
                pos = pos + 1
        finally:
            self._end_decode()
        n_gen = seqs.shape[1]
        best = []
        for b in range(B):
            if not closed[b]:
                for k in range(K):
                    s = float(scores[b, k]) / max(n_gen, 1) ** length_penalty
                    done[b].append((s, seqs[b * K + k]))
            best.append(max(done[b], key=lambda h: h[0])[1])
        # As HF and the greedy path: as wide as the longest returned hypothesis
        out = torch.full((B, T + max(h.numel() for h in best)), fill, dtype=torch.long,
                         device=dev)
        out[:, :T] = idx
        for b, hyp in enumerate(best):
            out[b, T:T + hyp.numel()] = hyp
        return out

    # ------------------------------------------------------- HF interchange
    @classmethod
    def from_pretrained(cls, path: str | Path, dtype: torch.dtype | str | None = None,
                        device: torch.device | str | None = None) -> Transformer:
        """Load a local HF checkpoint directory (gpt_bigcode, codegen, phi, llama).
        dtype None: bf16 (fp16 without bf16 support) on CUDA; on CPU the checkpoint's dtype
        (config.json `dtype`/`torch_dtype`), float32 for float16 and float64 checkpoints. Names
        are read as transformers reads them ("bfloat16", "float32", ...; also "bf16", "fp16",
        "fp32"), and "auto" is the checkpoint's dtype exactly (float16 too)."""
        import pretrained

        return pretrained.load(path, dtype=dtype, device=device)

    def save_pretrained(self, path: str | Path, max_shard_bytes: int = 5 * 2**30) -> None:
        """Write config.json + safetensors in the HF layout of cfg.family."""
        import pretrained

        pretrained.save(self, path, max_shard_bytes=max_shard_bytes)


def _row_major_state(module: Transformer, prefix: str, keep_vars: bool) -> None:
    """State-dict pre-hook: weights in the decode layout go back to row-major, in place, before
    they are read, so tools get ordinary tensors (safetensors' save_model, `.view(-1)`) without
    a copy of the model; the next `generate` lays them out again."""
    module._use_decode_layout(False)


def _reads_faster_column_major(w: torch.Tensor) -> bool:
    """Whether a batch-1 CPU matmul reads the (out, in) weight w faster column-major: fp32 with
    more outputs than inputs. Row-major, the product is `out` dot products of length `in`, and
    short ones pay a reduction each; column-major, `in` multiply-adds of length-`out` columns.
    Measured here (2 threads, row-major time / column-major time): tall (1024, 384) 1.8-2.4,
    (8192, 384) 2.4-4, (3072, 2048) 1.2, (128256, 2048) 1.25; wide (384, 1024) 0.6-0.9,
    (2048, 8192) 0.9-1.1; square (384, 384) 0.95, (2048, 2048) 1.1; bf16: no consistent gain.
    A fixed rule, not a timing race: the layout changes the low bits of batch-1 logits, and a
    race's outcome varied from run to run with the machine's load."""
    return w.dtype == torch.float32 and w.shape[0] > w.shape[1]


def _one_row_product(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(1, K) @ (K, N) as a multiply and a sum over K, accumulated in fp32 (as a matmul is)."""
    acc = torch.promote_types(a.dtype, torch.float32)
    return (a.to(acc).unsqueeze(2) * b.to(acc).unsqueeze(0)).sum(1)


def _is_one_row_on_cpu(a: torch.Tensor) -> bool:
    from torch.fx.experimental.symbolic_shapes import statically_known_true

    return a.device.type == "cpu" and statically_known_true(a.shape[0] == 1)


def _mm_one_row(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    if not _is_one_row_on_cpu(a):
        return NotImplemented
    return _one_row_product(a, b).to(a.dtype)


def _addmm_one_row(bias: torch.Tensor, a: torch.Tensor, b: torch.Tensor, *, beta=1,
                   alpha=1) -> torch.Tensor:
    if not _is_one_row_on_cpu(a) or beta != 1 or alpha != 1:
        return NotImplemented
    return (_one_row_product(a, b) + bias).to(a.dtype)


def _decode_backend(gm: torch.fx.GraphModule, example_inputs: list) -> Callable:
    """Inductor, with batch-1 matmuls on CPU written as multiply-and-sum. A decode step streams
    every weight once, and inductor fuses that into one reduction kernel per Linear that reads
    row-major weights at 25-30 GB/s here, where aten's gemv reaches 8-20 (and the kernels fuse
    with their neighbours). The step runs 2x faster on the benchmark's model."""
    from torch._functorch import config as functorch_config
    from torch._inductor.compile_fx import compile_fx
    from torch._inductor.decomposition import select_decomp_table

    table = {**select_decomp_table(), torch.ops.aten.mm.default: _mm_one_row,
             torch.ops.aten.addmm.default: _addmm_one_row}
    # AOTAutograd's cache key leaves the decompositions out, so it could hand back a step
    # compiled without ours; inductor's own cache (keyed on the decomposed graph) stays on.
    with functorch_config.patch(enable_autograd_cache=False):
        return compile_fx(gm, example_inputs, decompositions=table)


def _check_tensor(value, name: str) -> None:
    if not isinstance(value, torch.Tensor):
        raise ValueError(f"{name} must be a tensor (batch, time), got a "
                         f"{type(value).__name__}; use torch.tensor({name})")


def _check_ids(ids, name: str, vocab: int) -> None:
    """ids (batch, time) of integer token ids in [0, vocab): torch's own errors for these name
    neither the argument nor the cause, and on CUDA an id out of range is a device-side assert
    that breaks the process's CUDA context. The range costs a min and a max (and on CUDA a
    sync); torch.compile's graph leaves it out."""
    _check_tensor(ids, name)
    if ids.dtype not in (torch.long, torch.int32):
        raise ValueError(f"{name} must hold integer token ids (torch.long), got {ids.dtype} "
                         "(torch.Tensor(...) makes floats; torch.tensor(...) keeps ints)")
    if ids.dim() != 2:
        raise ValueError(f"{name} must be (batch, time), got shape {tuple(ids.shape)}")
    if ids.numel() and not torch.compiler.is_compiling():
        lo, hi = torch.stack(ids.aminmax()).tolist()
        if not 0 <= lo <= hi < vocab:
            raise ValueError(f"{name} holds token ids outside [0, vocab_size={vocab}): min {lo}, "
                             f"max {hi} (wrong tokenizer? -100 labels passed as ids?)")


def _in_vocab(ids: list[int], name: str, vocab: int, why: str) -> None:
    bad = [i for i in ids if not 0 <= i < vocab]
    if bad:
        raise ValueError(f"{name} {bad[0]} is outside the model's vocabulary [0, {vocab}): {why}")


def _pad_id(pad_id, vocab: int) -> int:
    """pad_id, checked before any step: finished rows feed it back to the model."""
    fill = _index(pad_id, "pad_id")
    _in_vocab([fill], "pad_id", vocab, "rows that finish are filled with it and fed it; "
              "pass a token id (e.g. the EOS id)")
    return fill


def _check_mask(attention_mask: torch.Tensor | None, idx: torch.Tensor) -> None:
    """Generation continues every row from its last position, so each row must end with a real
    token: left padding (right padding, as training batches have, would continue the pads)."""
    if attention_mask is None:
        return
    _check_tensor(attention_mask, "attention_mask")
    if attention_mask.shape != idx.shape:
        raise ValueError(f"attention_mask shape {tuple(attention_mask.shape)} != idx shape "
                         f"{tuple(idx.shape)}")
    last = attention_mask[:, -1].bool()
    if not bool(last.all()):
        b = int((~last).nonzero()[0, 0])
        what = "is all padding" if not bool(attention_mask[b].any()) else "ends with padding"
        raise ValueError(f"attention_mask row {b} {what}: generation needs left-padded "
                         "prompts, each ending with a real token")


def _index(value, name: str) -> int:
    """value as an int: ints and int-likes (numpy integers, 0-d integer tensors)."""
    try:
        return operator.index(value)
    except TypeError:
        raise ValueError(f"{name} must be an integer, got {value!r}") from None


def _check_sampling(temperature, top_k, top_p, generator) -> None:
    """Checked before any work, also where nothing is sampled (greedy, max_new_tokens=0). A
    generator is fine at temperature 0 (eval passes one whatever the temperature)."""
    if (not isinstance(temperature, numbers.Real) or not math.isfinite(temperature)
            or not (temperature == 0 or temperature >= MIN_TEMPERATURE)):
        raise ValueError(f"temperature must be 0 (greedy) or a finite number >= "
                         f"{MIN_TEMPERATURE:g} (smaller ones overflow the logits), got "
                         f"{temperature!r}")
    if top_k is not None and _index(top_k, "top_k") < 1:
        raise ValueError(f"top_k must be >= 1 (or None: no top-k filter), got {top_k!r}")
    if top_p is not None and (not isinstance(top_p, numbers.Real) or not 0 < top_p <= 1):
        raise ValueError(f"top_p must be in (0, 1] (or None: no nucleus filter), got {top_p!r}")
    if temperature == 0 and (top_k is not None or top_p is not None):
        raise ValueError("top_k and top_p filter what is sampled; temperature=0 is greedy (the "
                         "argmax): pass temperature > 0 to sample")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise ValueError(f"generator must be a torch.Generator, got {generator!r} (for a seed: "
                         "torch.Generator().manual_seed(seed))")


def _token_ids(ids, name: str) -> list[int]:
    """ids as a list of ints: one int-like (numpy integer, 0-d tensor) or a sequence of them
    (list, 1-d array or tensor)."""
    if ids is None:
        return []
    try:
        return [operator.index(ids)]
    except TypeError:
        pass
    try:
        return [operator.index(i) for i in ids]
    except TypeError:
        raise ValueError(f"{name} must be a token id or a sequence of ids, got {ids!r}") from None


def _stop_entries(stop) -> list:
    """stop as a list of stops: a bare string or id is one stop (not one per character)."""
    if stop is None:
        return []
    if isinstance(stop, str):
        return [stop]
    try:
        return [operator.index(stop)]
    except TypeError:
        pass
    if not isinstance(stop, (bytes, bytearray, dict)):  # (bytes would iterate as ids)
        try:
            return list(stop)
        except TypeError:
            pass
    raise ValueError(f"stop must be a string, an id, or a list of strings, ids and id "
                     f"sequences, got {stop!r}")


def _parse_stops(eos_id, stop, decode, vocab: int):
    """(eos ids, stop id sequences, stop strings); ids outside the vocabulary are refused, as
    no generated token could ever match them."""
    never = "it can never be generated (another tokenizer's id?)"
    eos_ids = _token_ids(eos_id, "eos_id")
    _in_vocab(eos_ids, "eos_id", vocab, never)
    stop_seqs: list[list[int]] = []
    stop_strs: list[str] = []
    for s in _stop_entries(stop):
        if isinstance(s, str):
            if not s:
                raise ValueError("stop: empty string (it would end every row at once)")
            stop_strs.append(s)
        elif s is None:
            raise ValueError(f"stop: None is no stop, in {stop!r}")
        else:
            stop_seqs.append(_token_ids(s, "stop"))
            _in_vocab(stop_seqs[-1], "stop id", vocab, never)
    if stop_strs and decode is None:
        raise ValueError(f"stop strings {stop_strs} need decode= (e.g. tokenizer.decode)")
    if decode is not None and not callable(decode):
        raise ValueError(f"decode must be a callable such as tokenizer.decode, got {decode!r}")
    if any(not seq for seq in stop_seqs):
        raise ValueError("stop: empty id sequence")
    return eos_ids, stop_seqs, stop_strs


def _hit_stop(generated, stop_seqs, stop_strs, decode, finished) -> torch.Tensor:
    """Rows whose generated text now ends with a stop id sequence or contains a stop string."""
    hit = torch.zeros_like(finished)
    if not (stop_seqs or stop_strs):
        return hit
    seq = torch.stack(generated, dim=1).tolist()
    for b, row in enumerate(seq):
        if finished[b]:
            continue
        if any(row[-len(s):] == s for s in stop_seqs if len(row) >= len(s)):
            hit[b] = True
        elif stop_strs:
            text = decode(row)
            hit[b] = any(s in text for s in stop_strs)
    return hit


def _sampling_logits(logits: torch.Tensor, temperature: float, top_k: int | None,
                     top_p: float | None) -> torch.Tensor:
    """fp32 logits / temperature with the tokens top_k and top_p leave out at -inf. The ops of
    transformers' Temperature, TopK and TopP warpers, in their order, so that tokens tied at a
    boundary fall the same way and the same seed samples the same tokens."""
    logits = logits.float() / temperature
    if top_k is not None:
        kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        # Ascending: drop the least likely tokens while their mass stays <= 1 - top_p; the
        # likeliest one always stays.
        sorted_logits, order = torch.sort(logits, descending=False)
        drop = sorted_logits.softmax(dim=-1).cumsum(dim=-1) <= 1 - top_p
        drop[..., -1] = False
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return logits


def _pick(logits: torch.Tensor, temperature: float, top_k: int | None, top_p: float | None,
          generator: torch.Generator | None) -> torch.Tensor:
    """Next token per row: argmax at temperature 0, else a sample from the filtered softmax
    (arguments checked by _check_sampling)."""
    if temperature == 0.0:
        return logits.argmax(dim=-1)
    probs = _sampling_logits(logits, temperature, top_k, top_p).softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


__all__ = ["FAMILIES", "ModelConfig", "PRESETS", "Transformer"]


def presets_table() -> str:
    """The named configurations side by side, parameters counted on the meta device."""
    rows = ["| preset | family | layers | width | heads (kv) | MLP | context | vocab | parameters |",
            "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for name, c in PRESETS.items():
        with torch.device("meta"):
            n = Transformer(c).num_parameters()
        rows.append(f"| {name} | {c.family} | {c.n_layer} | {c.n_embd} | {c.n_head} "
                    f"({c.n_kv_head}) | {c.mlp_hidden} ({c.mlp}) | {c.block_size} | "
                    f"{c.vocab_size} | {n:,} |")
    return "\n".join(rows)


def main(argv: Sequence[str] | None = None) -> int:
    import argparse
    import json

    parser = argparse.ArgumentParser(
        description="codelm's named model configurations (architecture.PRESETS): a table of "
        "them with their parameter counts, or one preset's every ModelConfig field as JSON "
        "(what trainingmanager.py's --preset and --model-options start from).")
    parser.add_argument("preset", nargs="?", choices=list(PRESETS),
                        help="print this preset's fields as JSON")
    args = parser.parse_args(argv)
    return cliconfig.run_tool(lambda: print(
        json.dumps(asdict(PRESETS[args.preset]), indent=2) if args.preset else presets_table()))


if __name__ == "__main__":
    sys.exit(cliconfig.run_main(main))

