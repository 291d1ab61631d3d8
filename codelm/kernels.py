"""The model's speed-ups: faster equivalents of plain PyTorch ops, behind one switch.

architecture.py writes each op in plain PyTorch; a function there marked
``@kernels.faster(kernels.X)`` runs X instead while ``ENABLED`` (the default), and X may answer
``PLAIN`` where it does not apply, which runs the plain op. tests/test_kernels.py checks
each against its plain op. This module imports no project module.
"""

from __future__ import annotations

import functools
import math
import weakref
from collections.abc import Callable, Iterator
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

ENABLED = True  # the one switch: False runs every op as plain PyTorch
IGNORE_INDEX = -100  # the label of positions no loss counts: prompt tokens, padding


class _Plain:
    """What a fast op answers where it does not apply (a shape, a device): run the plain op."""

    def __repr__(self) -> str:
        return "kernels.PLAIN"


PLAIN = _Plain()


def faster(fast: Callable) -> Callable:
    """Decorator: the plain function runs `fast` instead while ENABLED, unless `fast` answers
    PLAIN. The plain one stays reachable as `.__wrapped__`."""
    def wrap(plain: Callable) -> Callable:
        @functools.wraps(plain)
        def run(*args, **kwargs):
            if not ENABLED:
                return plain(*args, **kwargs)
            out = fast(*args, **kwargs)
            if out is PLAIN:
                return plain(*args, **kwargs)
            return out

        return run
    return wrap


# ------------------------------------------------------------------------------------- RMSNorm
def _rms_normalize(x: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """x / rms(x) computed in (at least) fp32 and cast back to x's dtype before any weight, as
    Llama does (matters in bf16); also returns 1 / rms."""
    xf = x.to(torch.promote_types(x.dtype, torch.float32))
    rstd = torch.rsqrt(xf.square().mean(-1, keepdim=True) + eps)
    return (xf * rstd).to(x.dtype), rstd


class _RMSNormFunction(torch.autograd.Function):
    """RMSNorm with a hand-written backward: one pass per term instead of autograd's one per
    primitive of the composite ops (its speed on CPU: docs/benchmarks.md)."""

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


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
        if x.is_cuda and x.dtype == weight.dtype == torch.float32:
            # The fp32 residual stream of mixed-precision training: torch's fused kernels
            # beat the hand-written backward, which is for the CPU.
            return PLAIN
        return _RMSNormFunction.apply(x, weight, eps)
    if x.dtype == weight.dtype == torch.float32 and not x.is_cuda:
        return PLAIN  # torch's fused CPU kernel: the same values as the plain ops, one call
    # Without autograd, plain ops: Function.apply's cost a call shows in a decode step.
    return weight * _rms_normalize(x, eps)[0]


# ------------------------------------------------------------------------------------- dropout
# Dropout draws 16-bit integers, four from each 64-bit random word, where torch draws a float
# per element (the speed: docs/benchmarks.md). p is rounded to a multiple of 1/65536 (0.1 ->
# 0.100006) and the kept values are scaled by 1 / (1 - that rate), so each value's expectation is
# kept exactly.
DROP_LEVELS = 2**16


def drop_rate(p: float) -> float:
    """The probability dropout drops at: p rounded to a multiple of 1 / DROP_LEVELS."""
    return round(p * DROP_LEVELS) / DROP_LEVELS


def keep_scale(p: float) -> float:
    """What dropout multiplies a kept value by: 1 / (1 - drop_rate(p)); 0 where p rounds to 1
    (every value dropped, zeros as torch's dropout at p = 1 gives)."""
    rate = drop_rate(p)
    return 1.0 / (1.0 - rate) if rate < 1 else 0.0


def dropped(shape: torch.Size, p: float, device: torch.device,
            generator: torch.Generator | None = None) -> torch.Tensor:
    """A boolean mask of ``shape``, True where dropout drops (at ``drop_rate(p)``)."""
    threshold = round(p * DROP_LEVELS) - 2**15
    if threshold >= 2**15:  # p rounds to 1: above every int16 draw (an int16 compare would wrap)
        return torch.ones(shape, dtype=torch.bool, device=device)
    n = math.prod(shape)
    words = torch.empty((n + 3) // 4, dtype=torch.int64, device=device)
    words.random_(-2**63, 2**63 - 1, generator=generator)
    draws = words.view(torch.int16)[:n].view(shape)
    return draws < threshold


def dropout(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """On CPU the 16-bit draws and a masked fill (its backward keeps the boolean mask), ~3x
    faster forward than torch's bernoulli kernel. CUDA keeps torch's fused kernel."""
    if not training or not p:
        return x
    if x.is_cuda:
        return PLAIN
    return torch.where(dropped(x.shape, p, x.device), 0.0, x).mul_(keep_scale(p))


def dropout_seed() -> int:
    """A seed for ``dropout_keep``, drawn from the default CPU generator: a run seeded, resumed
    or recomputed under gradient checkpointing draws the same masks."""
    return int(torch.empty((), dtype=torch.int64).random_())


def _seeded_drops(x: torch.Tensor, p: float, seed: int) -> torch.Tensor:
    """The dropped positions of x that ``seed`` draws: the same mask each time."""
    return dropped(x.shape, p, x.device, torch.Generator(device=x.device).manual_seed(seed))


def dropout_keep(x: torch.Tensor, p: float, seed: int, dtype: torch.dtype) -> torch.Tensor:
    """The scaled keep mask (0 or 1 / (1 - drop_rate(p))) of dropout on ``x`` drawn from
    ``seed``."""
    keep = ~_seeded_drops(x, p, seed)
    return keep.to(dtype).mul_(keep_scale(p))


# Rows of a dropped input formed at a time: ~2 MiB, which stays in cache for its matmul and is
# reused, where a dropped copy of the whole input would be a fresh allocation each call (on CPU,
# page faults over every byte).
DROP_CHUNK_BYTES = 2**21


def _row_chunks(x: torch.Tensor) -> Iterator[slice]:
    """Slices of x's rows (x 2-D) of about DROP_CHUNK_BYTES each; on a GPU all rows at once
    (there a step is bound by kernel launches, and memory is not paged in)."""
    if x.is_cuda:
        yield slice(None)
        return
    step = max(1, DROP_CHUNK_BYTES // (x.shape[1] * x.element_size()))
    for start in range(0, x.shape[0], step):
        yield slice(start, start + step)


class _DroppedLinearFunction(torch.autograd.Function):
    """linear(dropout(x), weight) keeping only ``x`` and the mask's seed for the backward, which
    draws the mask again: neither the dropped copy of x nor its mask stays alive. The dropped
    input is formed a chunk of rows at a time, and the dropout's scale is applied to the
    (narrow) output and its gradient."""

    @staticmethod
    def forward(ctx, x, weight, p, seed):
        dev = x.device.type
        dt = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else weight.dtype
        ctx.save_for_backward(x, weight)
        ctx.p, ctx.seed, ctx.dtype = p, seed, dt
        ctx.scale = keep_scale(p)
        rows = x.reshape(-1, x.shape[-1])
        drops = _seeded_drops(x, p, seed).view(rows.shape)
        w_t = weight.to(dt).t()
        out = torch.empty(rows.shape[0], weight.shape[0], dtype=dt, device=x.device)
        for part in _row_chunks(rows):
            dropped_rows = rows[part].to(dt).masked_fill(drops[part], 0.0)
            torch.mm(dropped_rows, w_t, out=out[part])
        return out.mul_(ctx.scale).view(*x.shape[:-1], weight.shape[0])

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        drops = _seeded_drops(x, ctx.p, ctx.seed)
        grad = grad.to(ctx.dtype) * ctx.scale
        grad_x = grad_weight = None
        if ctx.needs_input_grad[0]:
            grad_x = (grad @ weight.to(ctx.dtype)).masked_fill_(drops, 0.0).to(x.dtype)
        if ctx.needs_input_grad[1]:
            rows = x.reshape(-1, x.shape[-1])
            drops = drops.view(rows.shape)
            grad_rows = grad.reshape(-1, grad.shape[-1])
            grad_weight = torch.zeros_like(weight)
            for part in _row_chunks(rows):
                dropped_rows = rows[part].to(ctx.dtype).masked_fill(drops[part], 0.0)
                grad_weight += (grad_rows[part].t() @ dropped_rows).to(weight.dtype)
        return grad_x, grad_weight, None, None


def dropped_linear(x: torch.Tensor, weight: torch.Tensor, p: float, seed: int) -> torch.Tensor:
    """LoRA's down projection of a dropped-out input, its backward drawing the mask again: on
    the seeds' shapes it keeps 1-4 input-sized tensors per adapted layer fewer alive."""
    return _DroppedLinearFunction.apply(x, weight, p, seed)


# --------------------------------------------------------------------- split heads and rotate
def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool,
            out: torch.Tensor, inverse: bool = False) -> torch.Tensor:
    """Write x (B, T, H, D) into out with its first 2 * cos.shape[-1] dims rotated (by minus the
    angle if inverse: the backward), each half in place: no cat."""
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


def _split_rotated(qkv, rope, n_head: int, n_kv: int, interleaved: bool):
    # split, not slices: without rope autograd runs this, and a slice's backward zero-fills
    # a tensor of the whole qkv
    qk, v = qkv.split((n_head + n_kv, n_kv), dim=2)
    if rope is not None:  # queries and keys rotated in one go
        qk = _rotate(qk, *rope, interleaved, qkv.new_empty(qk.shape))
    q, k = qk.transpose(1, 2).split((n_head, n_kv), dim=1)
    return q, k, v.transpose(1, 2)


class _SplitRotatedFunction(torch.autograd.Function):
    """`_split_rotated` whose backward writes the gradients of q, k and v into one tensor of
    qkv's shape, where autograd would cat them three times a layer."""

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


def split_rotated(qkv: torch.Tensor, rope, n_head: int, n_kv: int, interleaved: bool):
    """Rotary embeddings written in place, without the cats of the plain rotation."""
    if rope is not None and torch.is_grad_enabled() and qkv.requires_grad:
        return _SplitRotatedFunction.apply(qkv, *rope, n_head, n_kv, interleaved)
    return _split_rotated(qkv, rope, n_head, n_kv, interleaved)


# ----------------------------------------------------------------------------------- attention
def _sdpa_takes_gqa(device: torch.device, dtype: torch.dtype, masked: bool) -> bool:
    """Whether SDPA takes the grouped keys and values as they are (enable_gqa). On CUDA only
    flash does (fp16/bf16, no mask, sm80+): other grouped calls fall to the math kernel, which
    holds every score, where repeated k/v run the memory-efficient one."""
    if device.type != "cuda":
        return True
    return (not masked and dtype in (torch.float16, torch.bfloat16)
            # get_device_properties, not get_device_capability: torch.compile folds it
            and torch.cuda.get_device_properties(device).major >= 8)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
              dropout_p: float, grouped: bool, scale: float | None = None,
              cap: float | None = None) -> torch.Tensor:
    """FlexAttention for a ``document_mask`` block mask; else keys and values repeated to the
    query heads where CUDA's fused kernels need it (soft-capped scores: the plain op)."""
    if mask is not None and not isinstance(mask, torch.Tensor):  # document_mask's BlockMask
        return _flex_attention()(q, k, v, block_mask=mask, scale=scale, enable_gqa=grouped)
    if cap is not None or not grouped or _sdpa_takes_gqa(q.device, q.dtype, mask is not None):
        return PLAIN
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None,
                                          dropout_p=dropout_p, scale=scale)


def _flex_device(device: torch.device) -> bool:
    """Where compiled FlexAttention trains: CUDA (on CPU it has no backward)."""
    return device.type == "cuda"


def document_mask(document_ids: torch.Tensor, flex: bool = False):
    """On a GPU (where ``flex``: no soft cap, no attention dropout, no window shorter than the
    row), FlexAttention's block mask of packed rows: the blocks a document's queries cannot see
    are skipped, not computed and masked as SDPA's boolean mask makes them."""
    if not flex or not _flex_device(document_ids.device):
        return PLAIN
    from torch.nn.attention.flex_attention import create_block_mask

    def same_document_causal(b, h, q, kv):
        return (document_ids[b, q] == document_ids[b, kv]) & (q >= kv)

    rows, length = document_ids.shape
    return create_block_mask(same_document_causal, rows, None, length, length,
                             device=document_ids.device)


@functools.cache
def _flex_attention() -> Callable:
    """flex_attention compiled once: eager, it forms every score."""
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention)


# ----------------------------------------------------------------------- fused LM-head loss
def _loss_chunk_rows(vocab: int, device: torch.device) -> int:
    """Rows of logits formed at a time: on CPU ~16 MiB of fp32 (at least 512 rows), so a chunk
    stays in cache and its buffers are reused, not page-faulted afresh each step; ~1 GiB on GPUs."""
    return max(512, (2**28 if device.type == "cuda" else 2**22) // vocab)


def _matmul_dtype(hidden: torch.Tensor) -> torch.dtype:
    """The head's matmul dtype: autocast's when it is on, as the unfused head's would be."""
    dev = hidden.device.type
    return torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else hidden.dtype


def _add_chunk_grads(g: torch.Tensor, w: torch.Tensor, hc: torch.Tensor, rows: slice,
                     grads: tuple, grad_bias_part: torch.Tensor | None) -> None:
    """One chunk's share of an LM head's gradients, from ``g`` (d loss / d logits of the chunk's
    ``rows``, in the matmul dtype): ``grads`` (hidden, weight, bias; None where not wanted) get
    the rows' hidden gradient written, the weight's added, and the bias' ``grad_bias_part``."""
    grad_hidden, grad_weight, grad_bias = grads
    if grad_hidden is not None:
        torch.mm(g, w, out=grad_hidden[rows])
    if grad_weight is not None:
        grad_weight.addmm_(g.t(), hc)
    if grad_bias is not None:
        grad_bias += grad_bias_part


class ChunkLoss(NamedTuple):
    """What _chunk_loss gives of one chunk of an LM head's logits."""

    total: torch.Tensor  # the chunk's summed loss (fp32)
    correct: torch.Tensor | None  # its counted rows whose top-1 logit is the label
    grad: torch.Tensor | None  # d(sum) / d logits times grad_scale, in the matmul dtype
    grad_bias: torch.Tensor | None  # grad summed over rows, in fp32 (for a head's bias)


def _chunk_loss(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                labels: torch.Tensor, smoothing: float, grad_scale: torch.Tensor | float,
                count_correct: bool, want_grad: bool, want_bias: bool) -> ChunkLoss:
    """The cross-entropy of one chunk of rows of an LM head (``hidden`` and ``weight`` in the
    matmul dtype), the softmax in fp32 and in place, and with ``want_grad`` its gradient in the
    same pass. On CUDA it runs compiled (_chunk_loss_on): a few fused kernels in place of a
    dozen passes over the chunk, and no fp32 copy of its logits held whole."""
    logits = hidden @ weight.t() if bias is None else torch.addmm(bias, hidden, weight.t())
    z = logits.to(torch.promote_types(logits.dtype, torch.float32))
    del logits  # under autocast the matmul's output, freed once copied to fp32
    keep = labels != IGNORE_INDEX
    rows, target = torch.arange(len(labels), device=z.device), labels.masked_fill(~keep, 0)
    # The labels' logits, read before z changes in place. gather refuses a negative label as
    # F.cross_entropy does (an error on the CPU, a device assert on CUDA, compiled or not).
    picked = z.gather(-1, target[:, None])[:, 0]
    correct = ((z.argmax(-1) == labels) & keep).sum() if count_correct else None
    top = z.amax(-1)
    z.sub_(top[:, None])  # logits shifted by their max: exp cannot overflow
    nll = top - picked
    smooth = -z.mean(-1) if smoothing else None
    z.exp_()
    sumexp = z.sum(-1)
    log_sum = sumexp.log()
    per_row = (1 - smoothing) * (log_sum + nll)
    if smoothing:
        per_row += smoothing * (log_sum + smooth)
    total = torch.where(keep, per_row, 0).sum()
    if not want_grad:
        return ChunkLoss(total, correct, None, None)
    # d(sum)/dz = softmax - (1 - eps) onehot - eps / V on counted rows, 0 on the rest
    counted = keep.to(z.dtype) * grad_scale
    scale = counted / sumexp
    z.mul_(scale[:, None])
    at_label = (picked - top).exp() * scale - (1 - smoothing) * counted
    if smoothing:
        spread = (smoothing / z.shape[-1]) * counted
        z.sub_(spread[:, None])
        at_label -= spread
    if want_bias:  # the whole fp32 gradient, whose column sums are the bias'
        z[rows, target] = at_label
        return ChunkLoss(total, correct, z.to(hidden.dtype), z.sum(0))
    # The labels' entries written into the rounded gradient: compiled, z is never a whole buffer
    grad = z.to(hidden.dtype)
    grad[rows, target] = at_label.to(grad.dtype)
    return ChunkLoss(total, correct, grad, None)


@functools.cache
def _compiled_chunk_loss() -> Callable:
    return torch.compile(_chunk_loss)


def _chunk_loss_on(device: torch.device) -> Callable:
    """_chunk_loss compiled on CUDA where Triton is installed (memory-bound passes over a chunk as
    large as the head's matmul: fused, they are a few reads of it); eager elsewhere, as on the
    CPU, whose chunks stay in cache."""
    from torch.utils._triton import has_triton

    return _compiled_chunk_loss() if device.type == "cuda" and has_triton() else _chunk_loss


def _head_cross_entropy(hidden, weight, bias, labels, smoothing: float, want: tuple,
                        count_correct: bool, grad_scale: torch.Tensor | float = 1.0):
    """Summed cross-entropy of hidden @ weight.T + bias, chunk by chunk, and in the same pass the
    gradients (times grad_scale) of that sum for the inputs `want` flags (hidden, weight, bias).
    Returns (loss sum, correct top-1 count or None, (grad_hidden, grad_weight, grad_bias))."""
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
    chunk_loss = _chunk_loss_on(dev)
    with torch.autocast(dev.type, enabled=False):
        for s in range(0, h.shape[0], step):
            chunk = None  # the previous chunk goes before the next is formed: one chunk alive
            hc = h[s:s + step]
            chunk = chunk_loss(hc, w, b, labels[s:s + step], smoothing, grad_scale,
                               count_correct, any(want), want[2])
            total += chunk.total
            if count_correct:
                correct += chunk.correct
            if chunk.grad is not None:
                _add_chunk_grads(chunk.grad, w, hc, slice(s, s + step), (gh, gw, gb),
                                 chunk.grad_bias)
    return total, correct, (gh, gw, gb)


class _HeadCrossEntropyFunction(torch.autograd.Function):
    """The LM head and its cross-entropy as one op: each chunk's gradient is finished in the
    forward while the chunk is in cache, so the (N, V) logits are never held whole (1 GiB per 2048
    tokens of Llama-3's vocabulary) and the backward only scales."""

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
        grads, ctx.grads = ctx.grads, None
        assert grads is not None, "the fused LM-head loss takes one backward per forward"
        factor = grad / ctx.grad_scale  # 1 when the forward guessed the incoming gradient
        out = [None if g is None else g.mul_(factor).to(d) for g, d in zip(grads, ctx.dtypes)]
        return *out, None, None, None, None


def head_cross_entropy(hidden: torch.Tensor, head: nn.Module, labels: torch.Tensor,
                       label_smoothing: float = 0.0, count_correct: bool = False,
                       grad_scale: torch.Tensor | float | None = None, cap: float | None = None):
    """The LM head fused with its loss. Only for a plain nn.Linear head (a LoRA or quantized head
    runs the plain op) and logits without a soft cap, and in fp16 training only with grad_scale:
    the gradients are formed in the forward, at the magnitude the fp16 loss scaler chose."""
    if cap is not None:
        return PLAIN
    if torch.compiler.is_compiling():  # a compiled model's loss runs eagerly, outside the graph
        return torch.compiler.disable(head_cross_entropy)(
            hidden, head, labels, label_smoothing, count_correct, grad_scale)
    fp16 = _matmul_dtype(hidden) == torch.float16
    wants_grad = torch.is_grad_enabled() and any(
        t.requires_grad for t in (hidden, *head.parameters()))
    if type(head) is not nn.Linear or (fp16 and wants_grad and grad_scale is None):
        return PLAIN
    hidden, labels = hidden.flatten(0, -2), labels.flatten()
    args = (hidden, head.weight, head.bias, labels, label_smoothing, count_correct)
    if wants_grad:
        out = _HeadCrossEntropyFunction.apply(*args, grad_scale if fp16 else 1.0)
        return out if count_correct else (out, None)
    with torch.no_grad():
        return _head_cross_entropy(*args[:5], (False,) * 3, count_correct)[:2]


class _HeadLogprobsFunction(torch.autograd.Function):
    """The LM head and each row's log-prob of its label as one op, chunk by chunk: the (N, V)
    logits are never held whole; the backward forms each chunk's logits again (the gradient of a
    log-prob is only known once the loss of whole sequences is: DPO's, KTO's, GRPO's). The
    distribution is the softmax of the logits divided by ``temperature``; with ``with_entropy``
    each row's entropy of it too, formed from the same chunk (no gradient)."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, temperature, with_entropy):
        dt = _matmul_dtype(hidden)
        acc = torch.promote_types(dt, torch.float32)
        h, w = hidden.to(dt), weight.to(dt)
        b = bias.to(dt) if bias is not None else None
        logps = torch.zeros(h.shape[0], dtype=acc, device=h.device)
        normalizers = torch.zeros(h.shape[0], dtype=acc, device=h.device)
        entropy = torch.zeros(h.shape[0], dtype=acc, device=h.device) if with_entropy else None
        step = _loss_chunk_rows(w.shape[0], h.device)
        with torch.autocast(h.device.type, enabled=False):
            for s in range(0, h.shape[0], step):
                z = None  # the previous chunk goes before the next is formed
                z = _chunk_logits(h[s:s + step], w, b, acc, temperature)
                top = z.amax(-1, keepdim=True)
                z.sub_(top)  # in place, as the loss's chunks: no second (rows, V) temporary
                target = labels[s:s + step].masked_fill(labels[s:s + step] == IGNORE_INDEX, 0)
                picked = z.gather(-1, target[:, None])[:, 0]  # refuses a negative label
                sumexp = z.exp_().sum(-1)
                log_sum = sumexp.log()
                logps[s:s + step] = picked - log_sum
                normalizers[s:s + step] = log_sum + top[:, 0]
                if with_entropy:  # H = log S - sum(e log e) / S, e = exp(z - top), S = sum(e)
                    entropy[s:s + step] = log_sum - z.xlogy_(z).sum(-1) / sumexp
        kept = labels != IGNORE_INDEX
        logps = torch.where(kept, logps, 0.0)
        ctx.save_for_backward(hidden, weight, bias, labels, normalizers)
        ctx.dtypes, ctx.temperature = (dt, acc), temperature
        if not with_entropy:
            return logps
        entropy = torch.where(kept, entropy, 0.0)
        ctx.mark_non_differentiable(entropy)
        return logps, entropy

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad, *_):
        hidden, weight, bias, labels, normalizers = ctx.saved_tensors
        dt, acc = ctx.dtypes
        temperature = ctx.temperature
        want = ctx.needs_input_grad[:3]
        h, w = hidden.to(dt), weight.to(dt)
        b = bias.to(dt) if bias is not None else None
        weights = torch.where(labels != IGNORE_INDEX, grad.to(acc), 0.0)
        if temperature != 1.0:  # the logits' gradient is the scaled logits' over temperature
            weights = weights / temperature
        gh = torch.empty(h.shape, dtype=dt, device=h.device) if want[0] else None
        gw = torch.zeros(w.shape, dtype=dt, device=h.device) if want[1] else None
        gb = torch.zeros(w.shape[0], dtype=acc, device=h.device) if want[2] else None
        step = _loss_chunk_rows(w.shape[0], h.device)
        with torch.autocast(h.device.type, enabled=False):
            for s in range(0, h.shape[0], step):
                z = None  # the previous chunk goes first: one chunk alive
                hc, gc = h[s:s + step], weights[s:s + step]
                z = _chunk_logits(hc, w, b, acc, temperature)
                # d logp / dz = onehot - softmax, times the incoming gradient of each row
                z.sub_(normalizers[s:s + step, None]).exp_().mul_(-gc[:, None])
                rows = torch.arange(len(gc), device=h.device)
                z[rows, labels[s:s + step].clamp(min=0)] += gc
                _add_chunk_grads(z.to(dt), w, hc, slice(s, s + step), (gh, gw, gb),
                                 z.sum(0) if want[2] else None)
        out = [None if t is None else t.to(like.dtype)
               for t, like in zip((gh, gw, gb), (hidden, weight, bias))]
        return *out, None, None, None


def _chunk_logits(hc: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None,
                  acc: torch.dtype, temperature: float = 1.0) -> torch.Tensor:
    """One chunk's logits in the accumulation dtype, divided by ``temperature`` (in place)."""
    z = (hc @ w.t() if b is None else torch.addmm(b, hc, w.t())).to(acc)
    return z if temperature == 1.0 else z.div_(temperature)


def head_token_logps(hidden: torch.Tensor, head: nn.Module, labels: torch.Tensor,
                     cap: float | None = None, temperature: float = 1.0,
                     with_entropy: bool = False):
    """log_softmax(head(hidden) / temperature)[label] (fp32) of each position of ``hidden``
    (..., D), 0 where ``labels`` (...) is IGNORE_INDEX, never forming the whole logits
    (``_HeadLogprobsFunction``); with ``with_entropy``, (log-probs, entropies), the entropies
    of the same distributions (no gradient, 0 where ignored). Only the positions with a label
    go through the head. For a plain nn.Linear head without a soft cap, else PLAIN."""
    if cap is not None or type(head) is not nn.Linear:
        return PLAIN
    if torch.compiler.is_compiling():  # a compiled model's head runs eagerly, outside the graph
        return torch.compiler.disable(head_token_logps)(hidden, head, labels, cap, temperature,
                                                        with_entropy)
    shape = labels.shape
    hidden, labels = hidden.flatten(0, -2), labels.flatten()
    rows = (labels != IGNORE_INDEX).nonzero()[:, 0]
    every = len(rows) == len(labels)  # no copy of the hidden states where every row counts
    out = _HeadLogprobsFunction.apply(hidden if every else hidden[rows], head.weight, head.bias,
                                      labels if every else labels[rows], temperature,
                                      with_entropy)
    outputs = out if with_entropy else (out,)
    if not every:
        outputs = [t.new_zeros(labels.shape).index_copy(0, rows, t) for t in outputs]
    outputs = [t.view(shape) for t in outputs]
    return tuple(outputs) if with_entropy else outputs[0]


# ---------------------------------------------------------------------- CPU decode layout
# A model's packed fp32 Linear weights, held at most this many bytes (beside the weights
# themselves: a model above it decodes several rows with its plain weights).
PACK_MAX_BYTES = 2**30
# Weights of fewer elements stay unpacked: oneDNN's ~13 us a call costs them what it saves
# (at 11 rows, one thread: (448, 160) even, (384, 384) 1.3x faster packed, (1152, 384) 1.7x).
PACK_MIN_NUMEL = 2**17


class _Pack(NamedTuple):
    """A Linear weight reordered for oneDNN, and the weight it was made from: its storage,
    strides and version, so a weight changed by a torch op (in place or replaced) or moved
    since is never multiplied stale. A write through ``weight.data`` bumps no version: turn
    ``decode_layout`` off and on again after one."""

    packed: torch.Tensor
    key: tuple


def _weight_key(w: torch.Tensor) -> tuple:
    return w.data_ptr(), w.stride(), w._version


# Linear -> its _Pack while its model's decode layout is on (weakly: a dropped model frees them).
_PACKS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _packable(module: nn.Module) -> bool:
    w = module.weight if type(module) is nn.Linear else None
    return w is not None and w.dtype == torch.float32 and w.device.type == "cpu"


@torch.inference_mode(False)  # generation calls this in inference mode; training needs
@torch.no_grad()                # ordinary weight tensors afterwards
def decode_layout(model: nn.Module, on: bool) -> None:
    """On CPU, decoding streams fp32 weights faster in other layouts, the same values: one row
    (a batch-1 step) reads tall weights column-major, several rows (a batch, a prefill, a
    draft's check) multiply by oneDNN's packed copy of each Linear weight (`linear`, about
    twice MKL's speed at 8 rows). On: tall Linear weights are re-laid out in place (same
    shape, swapped strides) and packed copies are made (up to PACK_MAX_BYTES, kept fresh on
    each call), until training resumes or `state_dict()` is read. CUDA: left as is."""
    if on and (not ENABLED or next(model.parameters()).device.type != "cpu"):
        return
    linears = [m for m in model.modules() if _packable(m)]
    if not on:
        for m in linears:
            _PACKS.pop(m, None)
        if model.__dict__.get("_decode_layout", False):
            for p in model.parameters():
                if not p.is_contiguous():
                    p.data = p.data.contiguous()
                if p.grad is not None and not p.grad.is_contiguous():  # a backward in between
                    p.grad = p.grad.contiguous()
        model._decode_layout = False
        return
    if not model.__dict__.get("_decode_layout", False):
        # A fixed rule, not a timing race (the layout changes the low bits of batch-1 logits):
        # fp32 with more outputs than inputs, whose row-major rows are short dot products.
        for m in linears:
            w = m.weight
            # (a weight with a gradient is mid-step: its grad and optimizer state keep its layout)
            if w.shape[0] > w.shape[1] and w.is_contiguous() and w.grad is None:
                w.data = w.data.t().contiguous().t()  # (a tied weight: once, then strided)
        model._decode_layout = True
    _pack(linears)


def _pack(linears: list[nn.Module]) -> None:
    """Packed copies of these Linear weights, made afresh where a weight changed since."""
    linears = [m for m in linears if m.weight.numel() >= PACK_MIN_NUMEL]
    if not torch.backends.mkldnn.is_available():
        return
    if sum(m.weight.numel() * 4 for m in linears) > PACK_MAX_BYTES:
        return
    for m in linears:
        pack = _PACKS.get(m)
        if pack is None or pack.key != _weight_key(m.weight):
            packed = torch.ops.mkldnn._reorder_linear_weight(m.weight.contiguous(), None)
            _PACKS[m] = _Pack(packed, _weight_key(m.weight))


def linear(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``layer(x)`` by oneDNN's packed weight (see decode_layout) where ``x`` has several rows,
    the pack is fresh and nothing else asks for the module's own call (grad, autocast, hooks,
    compiling)."""
    if torch.compiler.is_compiling() or not _PACKS:
        return PLAIN
    pack = _PACKS.get(layer)
    if (pack is None or x.numel() == x.shape[-1] or torch.is_grad_enabled()
            or pack.key != _weight_key(layer.weight) or x.dtype != torch.float32
            or layer._forward_hooks or layer._forward_pre_hooks
            or torch.is_autocast_enabled("cpu")):
        return PLAIN
    return _packed_linear(x, pack.packed, layer.bias)


def _packed_linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None):
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


# ------------------------------------------------------------------ compiled decode step
def _one_row(a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None = None):
    """(1, K) @ (K, N) (+ bias) on CPU as a multiply and a sum over K, accumulated in fp32 (as a
    matmul is). For other shapes or devices NotImplemented: a decomposition's answer, in
    torch's protocol, that leaves the op to inductor's own lowering."""
    from torch.fx.experimental.symbolic_shapes import statically_known_true

    if a.device.type != "cpu" or not statically_known_true(a.shape[0] == 1):
        return NotImplemented
    acc = torch.promote_types(a.dtype, torch.float32)
    out = (a.to(acc).unsqueeze(2) * b.to(acc).unsqueeze(0)).sum(1)
    return (out if bias is None else out + bias).to(a.dtype)


def _mm_one_row(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return _one_row(a, b)


def _addmm_one_row(bias: torch.Tensor, a: torch.Tensor, b: torch.Tensor, *, beta=1,
                   alpha=1) -> torch.Tensor:
    if beta == alpha == 1:
        return _one_row(a, b, bias)
    return NotImplemented


def _decode_backend(gm: torch.fx.GraphModule, example_inputs: list) -> Callable:
    """Inductor, with batch-1 CPU matmuls as multiply-and-sum: one fused reduction kernel per
    Linear, which reads row-major weights faster than aten's gemv."""
    from torch._functorch import config as functorch_config
    from torch._inductor.compile_fx import compile_fx
    from torch._inductor.decomposition import select_decomp_table

    table = {**select_decomp_table(), torch.ops.aten.mm.default: _mm_one_row,
             torch.ops.aten.addmm.default: _addmm_one_row}
    # AOTAutograd's cache key leaves the decompositions out, so it could hand back a step
    # compiled without ours; inductor's own cache (keyed on the decomposed graph) stays on.
    with functorch_config.patch(enable_autograd_cache=False):
        return compile_fx(gm, example_inputs, decompositions=table)


# Each model shape, dtype and pool shape is a version of a process's one compiled decode step:
# past dynamo's default of 8 (eval --compile over many checkpoints) a fullgraph compile stops.
DECODE_RECOMPILE_LIMIT = 64


@functools.cache
def compile_decode_step(step: Callable, device_type: str, enabled: bool) -> Callable:
    """torch.compile of a decode step, once per device type and value of ENABLED (`enabled`): on
    CUDA a CUDA graph (one replay, not ~15 launches a layer); on CPU inductor, with the one-row
    matmul rewrite when enabled. Up to DECODE_RECOMPILE_LIMIT versions of it."""
    if device_type == "cuda":
        compiled = torch.compile(step, fullgraph=True, mode="reduce-overhead")
    else:
        compiled = torch.compile(step, fullgraph=True,
                                 backend=_decode_backend if enabled else "inductor")
    return torch._dynamo.config.patch(recompile_limit=DECODE_RECOMPILE_LIMIT)(compiled)
