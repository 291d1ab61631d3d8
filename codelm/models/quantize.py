"""A quantized base for QLoRA: frozen Linears stored as int8 (absmax per output row) or NF4
(absmax per block of 64) and dequantized on each call, with the model surgery it needs (a
submodule replaced by path, tied weights found)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint


def nf4_levels() -> torch.Tensor:
    """The 16 NormalFloat4 levels of QLoRA, built by the paper's recipe: 8 positive and 7
    negative quantiles of N(0, 1), and zero, scaled to [-1, 1]."""
    offset, ndtri = 0.9677083, torch.special.ndtri  # ndtri: N(0, 1)'s quantile function
    positive = ndtri(torch.linspace(offset, 0.5, 9, dtype=torch.float64)[:-1])
    negative = -ndtri(torch.linspace(offset, 0.5, 8, dtype=torch.float64)[:-1])
    levels = torch.cat([negative, torch.zeros(1, dtype=torch.float64), positive]).sort().values
    return (levels / levels.abs().max()).float()


NF4_BLOCK = 64


def base_form(quantize_bits: int, base_dtype: str) -> str:
    """A LoRA run's frozen base as its log and notes name it, with its article: "an NF4 base",
    "an int8 base", "a bf16 base", "an fp32 base"; a quantized base loaded in another dtype than
    fp32 names it too ("an NF4 base (the rest bf16)"): its embeddings, norms and head are held
    in it, and its quantized Linears are rounded from it."""
    if quantize_bits:
        form = "an NF4 base" if quantize_bits == 4 else "an int8 base"
        return form if base_dtype in ("fp32", "") else f"{form} (the rest {base_dtype})"
    return f"{'a' if base_dtype == 'bf16' else 'an'} {base_dtype} base"


def _frozen(t: torch.Tensor) -> nn.Parameter:
    return nn.Parameter(t, requires_grad=False)


class _DequantLinear(torch.autograd.Function):
    """x @ W.T with W dequantized in forward and again in backward: no full-precision W is kept."""

    @staticmethod
    def forward(ctx, x, module):
        ctx.module = module
        return F.linear(x, module.dequantize(x.dtype))

    @staticmethod
    def backward(ctx, grad_out):
        return grad_out @ ctx.module.dequantize(grad_out.dtype), None


class QuantLinear(nn.Module):
    """A frozen Linear whose weight is stored as int8 (per output row absmax) or NF4 (absmax per
    block of 64 consecutive weights, two 4-bit codes per byte) and dequantized on each call.
    The codes (``qweight``) and scales are frozen parameters, one row per output row (int8) or
    block (NF4): FSDP shards parameters along their rows, so each rank holds 1/N of them."""

    def __init__(self, linear: nn.Linear, bits: int):
        super().__init__()
        assert bits in (4, 8) and not linear.weight.is_meta, (bits, linear.weight.device)
        self.bits, self.in_features, self.out_features = bits, linear.in_features, linear.out_features
        self.weight_dtype = linear.weight.dtype
        w = linear.weight.detach().float()
        if bits == 8:
            scale = w.abs().amax(dim=1).clamp_min(1e-12) / 127.0
            self.qweight = _frozen(torch.round(w / scale[:, None]).to(torch.int8))
            self.scale = _frozen(scale)
        else:
            flat = w.flatten()
            flat = F.pad(flat, (0, (-flat.numel()) % NF4_BLOCK)).view(-1, NF4_BLOCK)
            absmax = flat.abs().amax(dim=1).clamp_min(1e-12)
            levels = nf4_levels().to(w.device)
            codes = torch.bucketize(flat / absmax[:, None], (levels[1:] + levels[:-1]) / 2)
            packed = (codes[:, 0::2] << 4) | codes[:, 1::2]
            self.qweight = _frozen(packed.to(torch.uint8))
            self.scale = _frozen(absmax)
            # Byte -> its two levels, so dequantizing is one gather.
            byte = torch.arange(256, device=w.device)
            self.register_buffer("pairs", torch.stack((levels[byte >> 4], levels[byte & 15]), -1),
                                 persistent=False)
        self.bias = linear.bias  # the Linear's own: trained still where LoRA's bias setting says

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The full weight (out, in) in ``dtype`` (default: the dtype it was quantized from)."""
        if self.bits == 8:
            w = self.qweight.float() * self.scale[:, None]
        else:
            w = self.pairs[self.qweight.int()].flatten(1) * self.scale[:, None]
            w = w.flatten()[: self.out_features * self.in_features]
        return w.view(self.out_features, self.in_features).to(dtype or self.weight_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_autocast_enabled(x.device.type):
            x = x.to(torch.get_autocast_dtype(x.device.type))
        if torch.compiler.is_compiling():
            # Traced, the forward's dequantization and the backward's merge into one, and the
            # partitioner would keep that full weight for the backward. Checkpointed (the
            # dequantization alone: the product is saved or recomputed as for any Linear), it is
            # computed again in the backward instead.
            out = F.linear(x, checkpoint(self.dequantize, x.dtype, use_reentrant=False))
        else:
            out = _DequantLinear.apply(x, self)
        return out if self.bias is None else out + self.bias.to(out.dtype)

    def extra_repr(self) -> str:
        kind = "int8" if self.bits == 8 else "nf4"
        return f"in_features={self.in_features}, out_features={self.out_features}, {kind}"


@dataclass
class QuantReport:
    """Bytes of the quantized Linear weights, of the same weights in bf16, and of the model."""

    bits: int
    modules: list[str]
    quantized_bytes: int
    bf16_bytes: int
    model_bytes: int

    @property
    def ratio_to_bf16(self) -> float:
        """The quantized Linear weights' bytes over the same weights' in bf16 (not the model's)."""
        return self.quantized_bytes / max(self.bf16_bytes, 1)


def _quantized(model: nn.Module) -> list[QuantLinear]:
    return [q for q in model.modules() if isinstance(q, QuantLinear)]


def quantized_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The codes and scales of every quantized Linear (not its bias)."""
    return [p for q in _quantized(model) for p in (q.qweight, q.scale)]


def parameter_count(model: nn.Module) -> int:
    """The model's parameters as PEFT counts them: a quantized Linear's as the weights it holds."""
    quantized = {id(p) for p in quantized_parameters(model)}
    return (sum(p.numel() for p in model.parameters() if id(p) not in quantized)
            + sum(q.in_features * q.out_features for q in _quantized(model)))


def cast_model(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """``model.to(dtype)`` for its base weights only: adapters stay fp32, and a quantized base
    keeps its scales and levels (cast, they would change the weights) and dequantizes to dtype."""
    kept = [(p, p.data) for name, p in model.named_parameters()
            if ".lora_" in name or ".magnitude." in name]  # LoRA's matrices, DoRA's magnitudes
    kept += [(p, p.data) for p in quantized_parameters(model)]
    levels = [(q, q.pairs) for q in _quantized(model) if q.bits == 4]
    model.to(dtype)
    for p, data in kept:
        p.data = data
    for q, pairs in levels:
        q.pairs = pairs
    for q in _quantized(model):
        q.weight_dtype = dtype
    return model


def quantize_base(model: nn.Module, bits: int = 4, skip: tuple[str, ...] = ("lm_head",)) -> QuantReport:
    """Replace every frozen-base ``nn.Linear`` (also those under LoRA) by a ``QuantLinear``,
    except ``skip`` (as bitsandbytes, the head) and weights tied to another module. ``bits``:
    8 (int8) or 4 (NF4), else a ValueError before anything changes."""
    if isinstance(bits, bool) or bits not in (4, 8):
        raise ValueError(f"quantize_base: bits {bits!r}: must be 8 (int8) or 4 (NF4)")
    tied = shared_parameters(model)
    names, quant_bytes, bf16_bytes = [], 0, 0
    for path, module in list(model.named_modules()):
        if type(module) is not nn.Linear or id(module.weight) in tied:
            continue
        name = path.removesuffix(".base")
        if any(name == s or name.endswith("." + s) for s in skip):
            continue
        quantized = QuantLinear(module, bits)
        set_submodule(model, path, quantized)
        names.append(name)
        quant_bytes += quantized.qweight.nbytes + quantized.scale.nbytes
        bf16_bytes += 2 * module.weight.numel()
    if not names:
        raise ValueError("quantize_base: the model has no nn.Linear to quantize (already quantized?)")
    quantized_params = {id(p) for p in quantized_parameters(model)}
    rest = 2 * sum(p.numel() for p in model.parameters() if id(p) not in quantized_params)
    return QuantReport(bits, names, quant_bytes, bf16_bytes, quant_bytes + rest)


# ----------------------------------------------------------------------------- model surgery

def set_submodule(model: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, leaf = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, module)


def shared_parameters(model: nn.Module) -> dict[int, list[str]]:
    """id -> names of every parameter that more than one module holds (tied weights)."""
    uses: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        uses.setdefault(id(p), []).append(name)
    return {key: names for key, names in uses.items() if len(names) > 1}
