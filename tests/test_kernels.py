"""Each kernel against the plain PyTorch op it replaces (kernels.py), and the one switch."""


import weakref
from typing import NamedTuple

import pytest
import torch
import torch.nn.functional as F
from test_architecture import SHAPES, _ids, _model, _spy_sdpa, gen
from torch.utils._python_dispatch import TorchDispatchMode

from architecture import Transformer, head_logps, head_loss, split_heads
from codelm import kernels


def _hidden(model: Transformer, idx: torch.Tensor) -> torch.Tensor:
    """The final normed hidden states, which the head turns into logits."""
    return model.norm_f(model.run_blocks(idx, torch.arange(idx.shape[1])[None], None))


@pytest.mark.parametrize("device, dtype, masked, major, grouped", [
    ("cpu", torch.float32, True, None, True),  # CPU: grouped, mask or not
    ("cpu", torch.bfloat16, False, None, True),
    ("cuda", torch.bfloat16, False, 8, True),  # flash takes it
    ("cuda", torch.float16, False, 9, True),
    ("cuda", torch.bfloat16, True, 9, False),  # a mask: flash cannot
    ("cuda", torch.float32, False, 9, False),  # fp32: flash cannot
    ("cuda", torch.bfloat16, False, 7, False),  # pre-Ampere: no flash
])
def test_sdpa_gets_grouped_keys_only_where_a_fused_kernel_takes_them(monkeypatch, device, dtype,
                                                                      masked, major, grouped):
    """On CUDA only the flash kernel takes enable_gqa: any other grouped call would fall silently
    to the math kernel (every score in memory) in generation, masked or fp32 scoring, and all
    pre-Ampere training, so only flash's calls are grouped."""
    from types import SimpleNamespace


    def properties(device):
        assert major is not None, "asked a CUDA question about a CPU tensor"
        return SimpleNamespace(major=major)

    monkeypatch.setattr(torch.cuda, "get_device_properties", properties)
    assert kernels._sdpa_takes_gqa(torch.device(device), dtype, masked) is grouped


@pytest.mark.parametrize("shape", ["llama", "gpt_bigcode"])  # grouped-query; multi-query
def test_keys_repeated_to_the_query_heads_equal_grouped_attention(monkeypatch, shape):
    """The path CUDA takes where flash cannot (keys and values repeated, no enable_gqa) gives what
    grouped attention gives, masked and unmasked, and in the KV-cache decode."""

    model = _model(shape)
    n_head = model.cfg.n_head
    assert model.cfg.n_kv_head < n_head
    idx = _ids(2, 20)
    mask = torch.ones_like(idx, dtype=torch.bool)
    mask[1, :6] = False  # left padding
    with torch.no_grad():
        grouped = [model(idx), model(idx, attention_mask=mask)]
    grouped_out = gen(model, idx, 8, attention_mask=mask)
    calls = _spy_sdpa(monkeypatch)
    monkeypatch.setattr(kernels, "_sdpa_takes_gqa", lambda *args: False)
    with torch.no_grad():
        repeated = [model(idx), model(idx, attention_mask=mask)]
    assert torch.equal(gen(model, idx, 8, attention_mask=mask), grouped_out)
    assert calls and all(c["kv_heads"] == n_head and not c["gqa"] for c in calls)
    for a, b in zip(grouped, repeated):
        assert a.dtype == torch.float32 and (a - b).abs().max().item() < 1e-6


def test_decode_layout_keeps_values_and_training_gets_row_major_back():
    """generate may re-lay out weights column-major for decoding (CPU); values, outputs, saved
    files and training must not notice."""
    model = _model("llama")
    state = {k: v.clone() for k, v in model.state_dict().items()}
    idx = _ids(2, 10)
    logits = model(idx)
    out = gen(model, idx, 8)
    for name, p in model.named_parameters():
        assert torch.equal(p, state[name]), name
    torch.testing.assert_close(model(idx), logits, rtol=0, atol=1e-5)
    assert torch.equal(gen(model, idx, 8), out)  # the layout stays in eval mode
    kernels.decode_layout(model, True)
    forced = [p for p in model.parameters() if p.dim() == 2]
    for p in forced:  # force the column-major case whatever this machine measured
        p.data = p.data.t().contiguous().t()
    assert torch.equal(gen(model, idx, 8), out)
    model.train()
    assert all(p.is_contiguous() for p in model.parameters())
    F.cross_entropy(model(idx).flatten(0, 1), idx.flatten()).backward()
    assert all(p.grad.is_contiguous() for p in model.parameters())
    gen(model, idx, 4)  # in train mode the weights stay row-major
    assert all(p.is_contiguous() for p in model.parameters())


@pytest.mark.parametrize("order", ["step-before-train", "backward-in-eval"])
def test_an_optimizer_step_after_decoding_is_the_step_without_it(order):
    """A sample decoded in eval mode between a backward and the step (or before a backward in
    eval mode) re-lays tall weights out column-major: the fused AdamW step still adds each
    element's own update, equal to the same steps without the sample."""
    from types import SimpleNamespace

    from codelm.training.optim import build_optimizer

    settings = SimpleNamespace(optimizer="adamw", lr=1e-2, weight_decay=0.0, beta1=0.9,
                               beta2=0.95, adam_eps=1e-8)
    idx = _ids(2, 10)
    after = []
    for sample in (True, False):
        model = _model("llama")
        optimizer = build_optimizer(model, list(model.parameters()), settings)
        for _ in range(2):
            if order == "backward-in-eval" and sample:
                gen(model, idx, 2)
            model.train(order == "step-before-train")
            F.cross_entropy(model(idx).flatten(0, 1), idx.flatten()).backward()
            model.eval()
            if order == "step-before-train" and sample:
                gen(model, idx, 2)
            model.train(order == "backward-in-eval")
            optimizer.step()
            optimizer.zero_grad()
        after.append({n: p.detach().clone() for n, p in model.named_parameters()})
    assert [n for n in after[0] if not torch.equal(after[0][n], after[1][n])] == []


def test_decode_layout_is_a_fixed_rule_not_a_timing_race(monkeypatch):
    """The layout changes the low bits of batch-1 logits, so a timing race must not choose it
    (which weights are re-laid out would vary with the machine's load). A fixed rule: fp32
    weights with more outputs than inputs go column-major, whatever the clock says."""
    import time

    ticks = iter(range(10**9))  # a clock by which every layout times the same
    monkeypatch.setattr(time, "perf_counter", lambda: next(ticks))
    model = _model("llama")  # qkv (128, 64), fc and gate (96, 64), tied head (96, 64)
    gen(model, _ids(1, 4), 2)
    column_major = {n for n, p in model.named_parameters() if not p.is_contiguous()}
    assert column_major == {"wte.weight"} | {f"blocks.{i}.{name}.weight" for i in range(2)
                                             for name in ("attn.qkv", "mlp.fc", "mlp.gate")}
    model = _model("llama").to(torch.bfloat16)  # bf16 reads row-major as fast
    gen(model, _ids(1, 4), 2)
    assert all(p.is_contiguous() for p in model.parameters())


def test_decode_layout_stays_out_of_state_dict(tmp_path):
    """Tools that save or flatten a state dict (safetensors' save_model, .view(-1)) get
    row-major tensors after generate, without a copy of the model; the next generate lays the
    weights out again."""
    from safetensors.torch import load_file, save_model

    model = _model("llama")
    gen(model, _ids(1, 4), 2)

    def force_column_major():  # whatever this machine measured
        kernels.decode_layout(model, True)
        for p in model.parameters():
            if p.dim() == 2:
                p.data = p.data.t().contiguous().t()

    force_column_major()
    expected = model(_ids(1, 4))
    state = model.state_dict()
    assert all(t.is_contiguous() for t in state.values())
    for name, p in model.named_parameters():  # the parameters themselves, not copies
        assert p.is_contiguous() and state[name].data_ptr() == p.data_ptr()
    assert state["wte.weight"].data_ptr() == state["lm_head.weight"].data_ptr()  # still tied
    # the same function; a layout may change a matmul's low bits (AVX-512 kernels here: 1.2e-7)
    torch.testing.assert_close(model(_ids(1, 4)), expected, rtol=0, atol=1e-6)
    state["wte.weight"].view(-1)
    force_column_major()
    save_model(model, tmp_path / "m.safetensors")
    back = load_file(tmp_path / "m.safetensors")
    assert all(torch.equal(back[k], state[k]) for k in back)
    gen(model, _ids(1, 4), 2)  # lays the weights out again (if faster here)
    assert model._decode_layout


def _linears(model: Transformer) -> list[torch.nn.Linear]:
    return [m for m in model.modules() if type(m) is torch.nn.Linear]


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="needs oneDNN")
def test_packed_linears_equal_linear_and_follow_the_weights(monkeypatch):
    """Several rows multiply by oneDNN's packed copy of a weight (decode_layout on), one row by
    the weight itself; a weight changed in place is never multiplied stale, and the next
    decode_layout packs it afresh. Reference: F.linear on the weight."""
    import copy

    import architecture

    model = _model("llama")
    layers = _linears(model)
    gen(model, _ids(2, 6), 3)  # generate turns the decode layout on: these weights are small
    assert not any(layer in kernels._PACKS for layer in layers)
    monkeypatch.setattr(kernels, "PACK_MIN_NUMEL", 0)
    gen(model, _ids(2, 6), 3)
    assert all(layer in kernels._PACKS for layer in layers)
    rows, row = torch.randn(3, 5, 64), torch.randn(1, 1, 64)
    head = model.lm_head
    with torch.inference_mode():
        out = kernels.linear(head, rows)
        assert out is not kernels.PLAIN
        torch.testing.assert_close(out, F.linear(rows, head.weight), rtol=0, atol=1e-5)
        assert kernels.linear(head, row) is kernels.PLAIN  # one row: the column-major gemv
        with torch.no_grad():
            head.weight.mul_(2)  # (tied: the embedding too)
        assert kernels.linear(head, rows) is kernels.PLAIN  # stale: the layer's own call
        torch.testing.assert_close(architecture.linear(head, rows), F.linear(rows, head.weight))
        kernels.decode_layout(model, True)
        torch.testing.assert_close(kernels.linear(head, rows), F.linear(rows, head.weight),
                                   rtol=0, atol=1e-5)
    assert kernels.linear(head, rows) is kernels.PLAIN  # autograd: the layer's own call
    calls = []
    hook = head.register_forward_hook(lambda *args: calls.append(1))
    with torch.inference_mode():
        architecture.linear(head, rows)
    hook.remove()
    assert calls == [1]  # a hooked layer runs its own call
    copy.deepcopy(model)  # the packs live beside the model, not in it
    model.state_dict()
    assert not any(layer in kernels._PACKS for layer in layers)
    gen(model, _ids(2, 6), 3)
    model.train()
    assert not any(layer in kernels._PACKS for layer in layers)


def test_packs_stay_within_their_byte_limit(monkeypatch):
    """A model whose Linear weights pass PACK_MAX_BYTES decodes with its weights alone (packs
    would double its memory), with the same tokens."""
    monkeypatch.setattr(kernels, "PACK_MIN_NUMEL", 0)
    model = _model("llama")
    idx = _ids(2, 6)
    out = gen(model, idx, 4)
    assert all(layer in kernels._PACKS for layer in _linears(model))
    model.train()
    model.eval()
    monkeypatch.setattr(kernels, "PACK_MAX_BYTES", 1000)
    assert torch.equal(gen(model, idx, 4), out)
    assert not any(layer in kernels._PACKS for layer in _linears(model))


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="needs oneDNN")
def test_lora_decodes_through_packed_base_weights(monkeypatch):
    """A LoRA model's base layers decode several rows by their packed copies, the adapter's
    update added: the tokens of every layer's own call (kernels off); merging the adapter into
    the base in place leaves no stale pack in use."""
    import lora
    from codelm.models.adapter_config import LoRAConfig

    monkeypatch.setattr(kernels, "PACK_MIN_NUMEL", 0)
    model = _model("llama")
    lora.apply_lora(model, LoRAConfig(r=4, alpha=8, target_modules="all-linear"))
    with torch.no_grad():
        for _, module in lora.lora_modules(model):
            for weight in module.lora_B.values():
                weight.normal_(0, 0.5)
    model.eval()
    idx = _ids(3, 6)
    used = []
    multiply = kernels._packed_linear

    def spy(x, packed, bias):
        used.append(packed)
        return multiply(x, packed, bias)

    monkeypatch.setattr(kernels, "_packed_linear", spy)
    packed = gen(model, idx, 6)
    bases = [module.base for _, module in lora.lora_modules(model)]
    used_ids = {id(p) for p in used}
    assert bases and all(id(kernels._PACKS[base].packed) in used_ids for base in bases)
    monkeypatch.setattr(kernels, "ENABLED", False)
    plain = gen(model, idx, 6)
    assert torch.equal(packed, plain)
    monkeypatch.setattr(kernels, "ENABLED", True)
    lora.merge_lora(model)
    merged = gen(model, idx, 6)
    monkeypatch.setattr(kernels, "ENABLED", False)
    assert torch.equal(merged, gen(model, idx, 6))


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2),
                                        (torch.float64, 1e-12)])
def test_one_row_matmul_rewrite_equals_linear(dtype, tol):
    """The compiled decode step's batch-1 matmul rewrites equal F.linear in fp32, bf16 and fp64,
    and return NotImplemented (inductor's own lowering) for several rows or beta != 1."""
    from codelm.kernels import _addmm_one_row, _mm_one_row

    g = torch.Generator().manual_seed(0)
    x, w, b = (torch.randn(*s, generator=g).to(dtype) for s in ((1, 96), (40, 96), (40,)))
    torch.testing.assert_close(_mm_one_row(x, w.t()), F.linear(x, w), atol=tol, rtol=tol)
    torch.testing.assert_close(_addmm_one_row(b, x, w.t()), F.linear(x, w, b), atol=tol, rtol=tol)
    assert _mm_one_row(torch.cat((x, x)), w.t()) is NotImplemented  # only batch-1 rows
    assert _addmm_one_row(b, x, w.t(), beta=2) is NotImplemented


def _rope_reference(x, cos, sin, interleaved):
    """Rotary embedding as HF writes it: x * cos + rotate_half(x) * sin on the rotated dims."""
    r = 2 * cos.shape[-1]
    rot, rest = x[..., :r], x[..., r:]
    if interleaved:
        x1, x2 = rot[..., 0::2], rot[..., 1::2]
        c, s = cos.repeat_interleave(2, -1), sin.repeat_interleave(2, -1)
        half = torch.stack((-x2, x1), dim=-1).flatten(-2)
    else:
        x1, x2 = rot.chunk(2, dim=-1)
        c, s = torch.cat((cos, cos), -1), torch.cat((sin, sin), -1)
        half = torch.cat((-x2, x1), dim=-1)
    return torch.cat((rot * c + half * s, rest), dim=-1)


@pytest.mark.parametrize("n_head, n_kv, head_dim, rotary, interleaved", [
    (4, 2, 8, 8, False),  # Llama: grouped-query, full half-split rotary
    (4, 4, 8, 4, False),  # Phi: partial rotary
    (4, 4, 8, 4, True),   # CodeGen: partial interleaved rotary
    (4, 1, 8, 8, False),  # multi-query
])
def test_split_rotated_backward_equals_autograd_of_the_composite(n_head, n_kv, head_dim, rotary,
                                                                 interleaved):
    """The qkv split + rotary Function with its hand-written backward, against gradcheck and
    against autograd through HF's formula (rotate_half) with a plain split."""
    from codelm.kernels import _split_rotated, _SplitRotatedFunction

    g = torch.Generator().manual_seed(0)
    B, T = 2, 5
    qkv = torch.randn(B, T, n_head + 2 * n_kv, head_dim, dtype=torch.float64, generator=g)
    angle = torch.randn(B, T, 1, rotary // 2, dtype=torch.float64, generator=g)
    cos, sin = angle.cos(), angle.sin()
    fn = lambda t: _SplitRotatedFunction.apply(t, cos, sin, n_head, n_kv, interleaved)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (qkv.clone().requires_grad_(),))

    ours_in, ref_in = qkv.clone().requires_grad_(), qkv.clone().requires_grad_()
    q, k, v = fn(ours_in)
    rq, rk, rv = ref_in.split((n_head, n_kv, n_kv), dim=2)
    ref = [_rope_reference(rq, cos, sin, interleaved).transpose(1, 2),
           _rope_reference(rk, cos, sin, interleaved).transpose(1, 2), rv.transpose(1, 2)]
    grads = [torch.randn(t.shape, dtype=torch.float64, generator=g) for t in ref]
    for a, b in zip((q, k, v), ref):
        torch.testing.assert_close(a, b)
    torch.autograd.backward((q, k, v), grads)
    torch.autograd.backward(ref, grads)
    torch.testing.assert_close(ours_in.grad, ref_in.grad)
    for a, b in zip(_split_rotated(qkv, (cos, sin), n_head, n_kv, interleaved), ref):
        torch.testing.assert_close(a, b)  # the autograd-free path
    for a, b in zip(split_heads.__wrapped__(qkv, (cos, sin), n_head, n_kv, interleaved), ref):
        torch.testing.assert_close(a, b)  # the plain op the kernel replaces


def test_rmsnorm_backward_equals_autograd_of_the_composite():
    """The hand-written RMSNorm backward against torch's gradcheck and against autograd through
    F.rms_norm, with and without a trainable weight, and bf16 activations on fp32 weights."""
    from architecture import RMSNorm
    from codelm.kernels import _RMSNormFunction

    x = torch.randn(2, 5, 8, dtype=torch.float64, requires_grad=True)
    w = (1 + 0.1 * torch.randn(8, dtype=torch.float64)).requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b: _RMSNormFunction.apply(a, b, 1e-5), (x, w))
    norm = RMSNorm(8, 1e-5)
    with torch.no_grad():
        norm.weight.copy_(w)
    for dtype, train_weight, tol in ((torch.float32, True, 1e-5), (torch.float32, False, 1e-5),
                                     (torch.bfloat16, True, 2e-2)):
        norm.weight.requires_grad_(train_weight)
        xs = x.detach().to(dtype).requires_grad_()
        g = torch.randn(2, 5, 8)
        norm(xs).backward(g)
        ref_x = xs.detach().float().requires_grad_()
        ref_w = norm.weight.detach().clone().requires_grad_(train_weight)
        (ref_w * F.rms_norm(ref_x, (8,), eps=1e-5).to(dtype)).backward(g)
        assert xs.grad.dtype == dtype
        assert (xs.grad.float() - ref_x.grad).abs().max().item() < tol
        if train_weight:
            assert (norm.weight.grad - ref_w.grad).abs().max().item() < tol * 10
            norm.weight.grad = None
        else:
            assert norm.weight.grad is None
        with torch.no_grad():  # the autograd-free path computes the same forward
            assert torch.equal(norm(xs), _RMSNormFunction.apply(xs, norm.weight, 1e-5))


@pytest.mark.parametrize("x_dtype, w_dtype", [
    (torch.bfloat16, torch.bfloat16), (torch.float16, torch.float16),
    (torch.bfloat16, torch.float32), (torch.float32, torch.float32)])
@pytest.mark.parametrize("kernels_on", [True, False])
def test_rmsnorm_equals_llamas_norm_with_the_kernels_on_and_off(x_dtype, w_dtype, kernels_on,
                                                                  monkeypatch):
    """RMSNorm, fast or plain, is transformers' LlamaRMSNorm bit for bit and in its dtype: x
    normalized in fp32 and cast to x's dtype before the weight multiplies it, so in bf16 and
    fp16 the switch changes no value."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    from architecture import RMSNorm

    monkeypatch.setattr(kernels, "ENABLED", kernels_on)
    torch.manual_seed(0)
    ref = LlamaRMSNorm(256, eps=1e-6)
    with torch.no_grad():
        ref.weight.copy_(1 + 0.3 * torch.randn(256))
    ref = ref.to(w_dtype)
    norm = RMSNorm(256, 1e-6).to(w_dtype)
    norm.load_state_dict(ref.state_dict())
    x = (3 * torch.randn(4, 7, 256)).to(x_dtype)
    with torch.no_grad():
        want, got = ref(x), norm(x)
    assert got.dtype == want.dtype
    assert torch.equal(got, want)


def _unfused(hidden, labels, head, smoothing=0.0):
    logits = head(hidden.flatten(0, -2))
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    labels = labels.flatten()
    loss = F.cross_entropy(logits, labels, ignore_index=-100, label_smoothing=smoothing,
                           reduction="sum")
    return loss, ((logits.argmax(-1) == labels) & (labels != -100)).sum()


class _HeadCase(NamedTuple):
    head: torch.nn.Linear
    hidden: torch.Tensor
    labels: torch.Tensor
    params: list[torch.Tensor]  # what the gradients are compared of: hidden, weight, bias


def _head_case(bias: bool, monkeypatch) -> _HeadCase:
    """A seeded fp64 head (12 -> 50) over 3x10 positions, the first four and the last ignored
    (-100), fused in chunks of 7 rows, which do not divide the 30."""
    monkeypatch.setattr(kernels, "_loss_chunk_rows", lambda vocab, device: 7)
    torch.manual_seed(0)
    head = torch.nn.Linear(12, 50, bias=bias).double()
    hidden = torch.randn(3, 10, 12, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 50, (3, 10))
    labels[0, :4] = -100
    labels[2, 9] = -100
    params = [hidden, head.weight] + ([head.bias] if bias else [])
    return _HeadCase(head, hidden, labels, params)


def _taken_grads(params: list[torch.Tensor]) -> list[torch.Tensor]:
    """The gradients of ``params``, cleared for the reference's backward."""
    grads = [p.grad.clone() for p in params]
    for p in params:
        p.grad = None
    return grads


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_fused_head_loss_equals_cross_entropy_of_the_logits(bias, smoothing, monkeypatch):
    """Loss, correct count and the gradients of hidden, weight and bias against F.cross_entropy
    of the whole logits, in fp64, over chunks that do not divide the rows, with ignored rows."""
    case = _head_case(bias, monkeypatch)
    hidden, head, labels = case.hidden, case.head, case.labels
    loss, correct = head_loss(hidden, head, labels, smoothing, True)
    loss.backward(torch.tensor(0.3, dtype=torch.float64))
    fused = _taken_grads(case.params)
    ref_loss, ref_correct = _unfused(hidden, labels, head, smoothing)
    (0.3 * ref_loss).backward()
    torch.testing.assert_close(loss, ref_loss, rtol=1e-12, atol=0)
    assert int(correct) == int(ref_correct) and not correct.requires_grad
    for got, p in zip(fused, case.params):
        torch.testing.assert_close(got, p.grad, rtol=1e-10, atol=1e-14)
    with torch.no_grad():  # the autograd-free path
        torch.testing.assert_close(head_loss(hidden, head, labels, smoothing)[0],
                                   ref_loss, rtol=1e-12, atol=0)


class LargestOutput(TorchDispatchMode):
    """Records the largest tensor (in elements) any op outputs while it is on."""

    def __init__(self):
        super().__init__()
        self.numel = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.numel = max(self.numel, t.numel())
        return out


class LargeLiveBytes(TorchDispatchMode):
    """The most bytes that tensors of at least ``numel`` elements output by ops while it is on
    held at once (each storage once)."""

    def __init__(self, numel: int):
        super().__init__()
        self.numel = numel
        self.alive: list[weakref.ref] = []
        self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t.numel() >= self.numel:
                self.alive.append(weakref.ref(t))
        self.alive = [ref for ref in self.alive if ref() is not None]
        storages = {}
        for ref in self.alive:
            storage = ref().untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes()
        self.peak = max(self.peak, sum(storages.values()))
        return out


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_fused_head_loss_under_bf16_holds_one_chunks_softmax_and_gradient(smoothing, monkeypatch):
    """Under bf16 autocast a chunk's bf16 logits go once copied to fp32: at most the fp32
    softmax and its bf16 gradient of one chunk are alive at once, 6 bytes an element."""
    monkeypatch.setattr(kernels, "_loss_chunk_rows", lambda vocab, device: 256)
    torch.manual_seed(0)
    hidden, head = torch.randn(512, 16), torch.nn.Linear(16, 4096, bias=False)
    labels = torch.randint(0, 4096, (512,))
    with torch.no_grad(), LargeLiveBytes(256 * 4096) as live, torch.autocast("cpu", torch.bfloat16):
        kernels._head_cross_entropy(hidden, head.weight, None, labels, smoothing,
                                    (True, True, False), False)
    assert live.peak == 6 * 256 * 4096


def test_fused_head_loss_never_forms_the_whole_logits():
    """The point of fusing: no op in the training step's loss outputs an (N, V) tensor."""
    head = torch.nn.Linear(16, 8192)
    hidden = torch.randn(4, 512, 16, requires_grad=True)  # 2048 rows: 4 chunks of 512
    labels = torch.randint(0, 8192, (4, 512))
    with LargestOutput() as largest:
        head_loss(hidden, head, labels)[0].backward()
    assert 0 < largest.numel <= 2048 * 8192 // 4
    assert hidden.grad is not None and head.weight.grad is not None


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("temperature, with_entropy", [(1.0, False), (0.7, True), (1.3, True)])
def test_fused_head_logps_equal_log_softmax_of_the_logits(bias, temperature, with_entropy,
                                                          monkeypatch):
    """Each position's log-prob of its label under the logits over ``temperature`` (and the
    entropy of that distribution), and the gradients of hidden, weight and bias under a
    weighting of every position, against log_softmax of the whole logits in fp64, over chunks
    that do not divide the rows, with ignored positions (0, no gradient)."""
    case = _head_case(bias, monkeypatch)
    hidden, head, labels = case.hidden, case.head, case.labels
    ignored = labels == -100
    weights = torch.randn(3, 10, dtype=torch.float64)
    out = kernels.head_token_logps(hidden, head, labels, temperature=temperature,
                                   with_entropy=with_entropy)
    logps, entropy = out if with_entropy else (out, None)
    (logps * weights).sum().backward()
    fused = _taken_grads(case.params)
    logprobs = (head(hidden) / temperature).log_softmax(-1)
    plain = logprobs.gather(-1, labels.clamp(min=0)[..., None])[..., 0].masked_fill(ignored, 0.0)
    (plain * weights).sum().backward()
    torch.testing.assert_close(logps, plain, rtol=1e-12, atol=1e-14)
    assert logps[0, :4].eq(0).all()
    for got, p in zip(fused, case.params):
        torch.testing.assert_close(got, p.grad, rtol=1e-10, atol=1e-14)
    if with_entropy:
        expected = -(logprobs.exp() * logprobs).sum(-1).masked_fill(ignored, 0.0)
        torch.testing.assert_close(entropy, expected.detach(), rtol=1e-12, atol=1e-14)
        assert not entropy.requires_grad


@pytest.mark.parametrize("with_entropy", [False, True])
def test_fused_head_logps_never_form_the_whole_logits(with_entropy):
    """Forward and backward form the logits a chunk at a time, the entropies' too."""

    head = torch.nn.Linear(16, 8192)
    hidden = torch.randn(4, 512, 16, requires_grad=True)  # 2048 rows: 4 chunks of 512
    labels = torch.randint(0, 8192, (4, 512))
    with LargestOutput() as largest:
        out = kernels.head_token_logps(hidden, head, labels, temperature=0.8,
                                       with_entropy=with_entropy)
        (out[0] if with_entropy else out).sum().backward()
    assert 0 < largest.numel <= 2048 * 8192 // 4
    assert hidden.grad is not None and head.weight.grad is not None


def test_fused_head_logps_under_bf16_autocast_match_the_plain_head():
    """Under bf16 autocast the head's matmul runs in bf16 as the plain head's does, the
    log-softmax in fp32; a LoRA or soft-capped head is left to the plain op (PLAIN)."""
    torch.manual_seed(0)
    head = torch.nn.Linear(16, 64)
    hidden = torch.randn(2, 8, 16)
    labels = torch.randint(0, 64, (2, 8))
    with torch.autocast("cpu", torch.bfloat16):
        fused = kernels.head_token_logps(hidden, head, labels)
        logits = head(hidden).float()
    plain = logits.log_softmax(-1).gather(-1, labels[..., None])[..., 0]
    torch.testing.assert_close(fused, plain, rtol=1e-5, atol=1e-5)
    assert fused.dtype == torch.float32
    assert kernels.head_token_logps(hidden, head, labels, cap=30.0) is kernels.PLAIN
    assert kernels.head_token_logps(hidden, torch.nn.Sequential(head), labels) is kernels.PLAIN


def test_fused_head_loss_trains_a_tied_model_like_the_logits_loss():
    """Whole-model gradients (tied embedding + head, bias-free and biased heads) equal those of
    F.cross_entropy on the logits; a frozen head gets no gradient and costs no weight matmul."""

    for shape in ("llama", "phi"):
        model = _model(shape).train()
        idx, labels = _ids(2, 24), _ids(2, 24, seed=1)
        labels[:, :5] = -100
        head_loss(_hidden(model, idx), model.lm_head, labels)[0].backward()
        fused = {n: p.grad.clone() for n, p in model.named_parameters()}
        model.zero_grad()
        _unfused(_hidden(model, idx), labels, model.lm_head)[0].backward()
        for n, p in model.named_parameters():
            torch.testing.assert_close(fused[n], p.grad, rtol=1e-4, atol=1e-6, msg=n)
    model.zero_grad()
    model.lm_head.requires_grad_(False)
    head_loss(_hidden(model, idx), model.lm_head, labels)[0].backward()
    assert model.lm_head.weight.grad is None and model.norm_f.weight.grad is not None


def test_head_loss_under_bf16_autocast_and_other_heads(monkeypatch):
    """bf16 autocast runs the matmuls in bf16 with fp32 gradients out, as accurate as the
    unfused head's over four chunks; a head that is not a plain nn.Linear (a LoRA-wrapped one)
    is called as a module, unfused."""

    monkeypatch.setattr(kernels, "_loss_chunk_rows", lambda vocab, device: 16)
    torch.manual_seed(0)
    head = torch.nn.Linear(32, 300)
    hidden = torch.randn(64, 32, requires_grad=True)
    labels = torch.randint(0, 300, (64,))
    with torch.autocast("cpu", torch.bfloat16):
        loss = head_loss(hidden, head, labels)[0]
        ref = _unfused(hidden, labels, head)[0]
    torch.testing.assert_close(loss, ref, rtol=2e-3, atol=0)
    loss.backward()
    assert hidden.grad.dtype == head.weight.grad.dtype == torch.float32
    exact = torch.nn.Linear(32, 300).double()
    exact.load_state_dict(head.state_dict())
    hidden64 = hidden.detach().double().requires_grad_()
    _unfused(hidden64, labels, exact)[0].backward()
    for got, want in ((hidden.grad, hidden64.grad), (head.weight.grad, exact.weight.grad),
                      (head.bias.grad, exact.bias.grad)):
        assert float((got.double() - want).norm() / want.norm()) < 5e-3  # bf16's eps: 3.9e-3

    class Doubled(torch.nn.Linear):
        def forward(self, x):
            return 2 * super().forward(x)

    doubled = Doubled(32, 300)
    doubled.load_state_dict(head.state_dict())
    torch.testing.assert_close(head_loss(hidden, doubled, labels)[0],
                               _unfused(hidden, labels, lambda h: 2 * head(h))[0])


def test_head_loss_under_fp16_autocast_forms_gradients_at_the_loss_scale():
    """fp16 autocast: given the scale its backward will see (the loss scaler's), the fused head
    forms the gradients the unfused fp16 head forms, overflows where that overflows (so the
    scaler's backoff works the same), and without the scale runs unfused."""

    torch.manual_seed(0)
    head = torch.nn.Linear(32, 300)
    hidden = torch.randn(64, 32, requires_grad=True)
    labels = torch.randint(0, 300, (64,))
    labels[:5] = -100
    params = (hidden, head.weight, head.bias)

    def run(fused: bool, scale: float):
        for t in params:
            t.grad = None
        with torch.autocast("cpu", torch.float16):
            if fused:
                loss = head_loss(hidden, head, labels, grad_scale=torch.tensor(scale))[0]
                assert type(loss.grad_fn).__name__ == "_HeadCrossEntropyFunctionBackward"
            else:
                loss = _unfused(hidden, labels, head)[0]
        (loss * scale).backward()
        return loss.detach(), [t.grad / scale for t in params]

    for scale in (1.0, 2.0**12):
        (loss, got), (ref_loss, ref) = run(True, scale), run(False, scale)
        torch.testing.assert_close(loss, ref_loss, rtol=1e-4, atol=0)
        for name, a, b in zip(("hidden", "weight", "bias"), got, ref):
            torch.testing.assert_close(a, b, rtol=2e-3, atol=1e-3, msg=f"{name} at {scale}")
    for fused in (True, False):
        assert not all(bool(g.isfinite().all()) for g in run(fused, 2.0**40)[1])
    with torch.autocast("cpu", torch.float16):
        loss = head_loss(hidden, head, labels)[0]
        assert type(loss.grad_fn).__name__ != "_HeadCrossEntropyFunctionBackward"
        with torch.no_grad():  # no gradients, no scale needed: fused
            torch.testing.assert_close(head_loss(hidden, head, labels)[0], loss)
    fused = "_HeadCrossEntropyFunctionBackward"  # fp16 tensors without autocast: the same rule
    half, hidden16 = head.half(), hidden.detach().half().requires_grad_()
    assert type(head_loss(hidden16, half, labels)[0].grad_fn).__name__ != fused
    assert type(head_loss(hidden16, half, labels, grad_scale=8.0)[0].grad_fn).__name__ \
        == fused


def test_the_fused_head_loss_takes_one_backward_per_forward():
    """The fused head loss scales its saved gradients in place in backward: a second backward
    through the same graph is an assertion, not gradients scaled twice."""
    head = torch.nn.Linear(8, 20)
    loss = head_loss(torch.randn(3, 8, requires_grad=True), head, torch.tensor([1, 2, 3]))[0]
    loss.backward(retain_graph=True)
    with pytest.raises(AssertionError, match="one backward per forward"):
        loss.backward()


def test_head_loss_takes_full_label_smoothing_as_torch():
    """label_smoothing is in [0, 1] as F.cross_entropy takes it (1.0 included)."""
    head = torch.nn.Linear(8, 20)
    hidden, labels = torch.randn(2, 4, 8), torch.randint(0, 20, (2, 4))
    labels[0, 1] = -100
    loss = head_loss(hidden, head, labels, label_smoothing=1.0)[0]
    ref = F.cross_entropy(head(hidden).flatten(0, 1), labels.flatten(), label_smoothing=1.0,
                          reduction="sum")  # (the head's loss is the sum)
    torch.testing.assert_close(loss, ref)


@pytest.mark.parametrize("kernels_on", [True, False])
def test_a_negative_label_besides_ignore_index_is_refused_as_cross_entropy_refuses_it(
        kernels_on, monkeypatch):
    """A label of -1 is no token: the head's loss and log-probs, fused or plain, refuse it where
    F.cross_entropy does (an IndexError or RuntimeError naming the bound), and never read it as
    token 0 or the last token; IGNORE_INDEX beside it still counts nothing."""
    monkeypatch.setattr(kernels, "ENABLED", kernels_on)
    torch.manual_seed(0)
    head = torch.nn.Linear(8, 20)
    hidden = torch.randn(5, 8)
    labels = torch.tensor([3, kernels.IGNORE_INDEX, 7, -1, 0])
    with pytest.raises(IndexError, match="out of bounds"):  # the reference
        F.cross_entropy(head(hidden), labels, ignore_index=kernels.IGNORE_INDEX)
    with pytest.raises((IndexError, RuntimeError), match="out of bounds"):
        head_loss(hidden, head, labels)
    with pytest.raises((IndexError, RuntimeError), match="out of bounds"):
        head_logps(hidden, head, labels)
    labels[3] = 1
    ref = F.cross_entropy(head(hidden), labels, ignore_index=kernels.IGNORE_INDEX,
                          reduction="sum")
    torch.testing.assert_close(head_loss(hidden, head, labels)[0], ref)


def test_a_head_that_is_no_plain_linear_counts_correct_tokens_as_the_logits_say():
    """A LoRA or quantized lm_head takes the unfused path: its loss and correct count are the
    whole logits' (count_correct included, on the unfused path too)."""

    class Wrapped(torch.nn.Linear):  # not type nn.Linear: unfused, as lora's LoRALinear
        pass

    torch.manual_seed(0)
    linear = torch.nn.Linear(12, 50).double()
    head = Wrapped(12, 50).double()
    head.load_state_dict(linear.state_dict())
    hidden = torch.randn(3, 10, 12, dtype=torch.float64)
    labels = torch.randint(0, 50, (3, 10))
    labels[0, :4] = -100
    labels[1] = linear(hidden[1]).argmax(-1)  # some rows right, so the count is not 0
    loss, correct = head_loss(hidden, head, labels, 0.0, True)
    ref_loss, ref_correct = _unfused(hidden, labels, linear, 0.0)
    torch.testing.assert_close(loss.double(), ref_loss, rtol=1e-6, atol=0)  # fp32 logits
    assert int(correct) == int(ref_correct) >= 10
    assert head_loss(hidden, head, labels)[1] is None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_training_rmsnorm_is_the_hand_written_one_in_torchs_kernels():
    """On CUDA an fp32 RMSNorm under autograd runs torch's fused F.rms_norm (13% faster a bf16
    training step): its output and gradients are the CPU path's hand-written function's."""
    from architecture import RMSNorm
    from codelm.kernels import _RMSNormFunction

    torch.manual_seed(0)
    norm = RMSNorm(96, 1e-5).cuda()
    with torch.no_grad():
        norm.weight.normal_()
    x = torch.randn(3, 17, 96, device="cuda", requires_grad=True)
    for autocast in (False, True):
        with torch.autocast("cuda", torch.bfloat16, enabled=autocast):
            got, want = norm(x), _RMSNormFunction.apply(x, norm.weight, norm.eps)
        assert got.dtype == want.dtype == torch.float32
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        g = torch.randn_like(got)
        for a, b in zip(torch.autograd.grad(got, (x, norm.weight), g),
                        torch.autograd.grad(want, (x, norm.weight), g)):
            torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_cuda_fused_head_loss_runs_its_softmax_compiled_and_equals_cross_entropy(
        bias, smoothing, monkeypatch):
    """On CUDA each chunk's softmax and gradient run as one compiled function: in fp64 the loss,
    correct count and gradients equal F.cross_entropy of the whole logits; under bf16 autocast
    the loss is the unfused head's within bf16 rounding."""
    case = _head_case(bias, monkeypatch)
    head = case.head.cuda()
    hidden = case.hidden.detach().cuda().requires_grad_()
    labels = case.labels.cuda()
    params = [hidden, head.weight] + ([head.bias] if bias else [])
    loss, correct = head_loss(hidden, head, labels, smoothing, True)
    assert kernels._compiled_chunk_loss.cache_info().currsize == 1
    loss.backward()
    fused = _taken_grads(params)
    ref_loss, ref_correct = _unfused(hidden, labels, head, smoothing)
    ref_loss.backward()
    torch.testing.assert_close(loss, ref_loss, rtol=1e-12, atol=0)
    assert int(correct) == int(ref_correct)
    for got, p in zip(fused, params):
        torch.testing.assert_close(got, p.grad, rtol=1e-10, atol=1e-14)
    head32 = head.float()
    with torch.autocast("cuda", torch.bfloat16):
        loss = head_loss(hidden.detach().float(), head32, labels, smoothing)[0]
        ref = _unfused(hidden.detach().float(), labels, head32, smoothing)[0]
    torch.testing.assert_close(loss, ref, rtol=2e-3, atol=0)


@pytest.mark.parametrize("shape", SHAPES)
def test_with_the_kernels_off_the_plain_ops_compute_the_same(shape, monkeypatch):
    """kernels.ENABLED = False: the model's plain PyTorch path gives the logits, loss, gradients and
    greedy tokens of the kernels (on by default)."""
    model = _model(shape)
    idx, labels = _ids(2, 16), _ids(2, 16, seed=1)
    labels[:, :4] = -100

    def run():
        model.train().zero_grad()
        loss = model(idx, labels, label_smoothing=0.1)
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        model.eval()
        return model(idx).detach(), loss.detach(), grads, gen(model, idx[:, :6], 6)

    fast = run()
    monkeypatch.setattr(kernels, "ENABLED", False)
    plain = run()
    torch.testing.assert_close(plain[0], fast[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(plain[1], fast[1], rtol=1e-5, atol=1e-6)
    for n, g in fast[2].items():
        torch.testing.assert_close(plain[2][n], g, rtol=1e-4, atol=1e-6, msg=n)
    assert torch.equal(plain[3], fast[3])


def test_cpu_dropout_drops_p_and_scales_the_rest_as_torch():
    """The CPU dropout drops a fraction p (within 1%) and scales the rest by 1/(1-p), as torch's
    does, the gradient with the same mask; in eval or at p 0 the input passes through."""
    x = torch.ones(200_000, requires_grad=True)
    out = kernels.dropout(x, 0.25, True)
    kept = out != 0
    assert abs(1 - float(kept.float().mean()) - 0.25) < 0.01
    torch.testing.assert_close(out[kept], torch.full_like(out[kept], 1 / 0.75))
    out.sum().backward()
    assert torch.equal(x.grad, out.detach())  # the gradient takes the same mask and scale
    assert kernels.dropout(x, 0.25, False) is x and kernels.dropout(x, 0.0, True) is x


@pytest.mark.parametrize("p", [1.0, 1 - 2**-18])
def test_dropout_at_a_rate_that_rounds_to_one_drops_everything_as_torch(p):
    """A rate that rounds to 1 (the draws' resolution is 2**-16) drops every value: zeros, as
    torch's dropout at p = 1 gives, from each fast dropout; never a division by zero."""
    from lora import dropped_linear

    x = torch.randn(8, 16, requires_grad=True)
    weight = torch.randn(4, 16)
    seed = kernels.dropout_seed()
    assert bool(kernels.dropped(x.shape, p, x.device).all())  # the mask too, not the scale alone
    assert torch.equal(kernels.dropout(x, p, True), F.dropout(x, 1.0, True))
    assert torch.equal(x * kernels.dropout_keep(x, p, seed, x.dtype), torch.zeros_like(x))
    for op in (kernels.dropped_linear, dropped_linear.__wrapped__):
        out = op(x, weight, p, seed)
        out.sum().backward()
        assert torch.equal(out, torch.zeros(8, 4)) and torch.equal(x.grad, torch.zeros_like(x))
        x.grad = None


def test_document_mask_takes_the_plain_functions_arguments(monkeypatch):
    """The fast document mask is called with what the model's plain one takes (flex has its
    default there too): the same mask, on or off."""
    from architecture import document_mask

    ids = torch.tensor([[0, 0, 1, 1, 1, 2]])
    plain = document_mask.__wrapped__(ids)
    assert torch.equal(document_mask(ids), plain)
    monkeypatch.setattr(kernels, "ENABLED", False)
    assert torch.equal(document_mask(ids), plain)


@pytest.mark.parametrize("autocast", [False, True])
def test_dropped_linear_equals_autograd_through_the_materialized_mask(autocast):
    """The forward and both gradients equal autograd through x * mask @ A.T with the mask drawn
    from the same seed, fp32 and under bf16 autocast (the plain op lora.dropped_linear runs)."""
    from lora import dropped_linear

    torch.manual_seed(0)
    x = torch.randn(3, 7, 32, requires_grad=True)
    a = torch.randn(4, 32, requires_grad=True)
    g = torch.randn(3, 7, 4)
    seed = kernels.dropout_seed()
    results = []
    for op in (kernels.dropped_linear, dropped_linear.__wrapped__):
        x.grad = a.grad = None
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = op(x, a, 0.3, seed)
        out.backward(g.to(out.dtype))
        results.append((out, x.grad, a.grad))
    (fast, fast_gx, fast_ga), (plain, plain_gx, plain_ga) = results
    assert fast.dtype == plain.dtype == (torch.bfloat16 if autocast else torch.float32)
    assert fast_gx.dtype == fast_ga.dtype == torch.float32
    tol = 2e-2 if autocast else 1e-5  # of the largest value: bf16 rounds at other places
    for got, want in ((fast, plain), (fast_gx, plain_gx), (fast_ga, plain_ga)):
        assert (got.float() - want.float()).abs().max() <= tol * want.float().abs().max()
    mask = kernels.dropout_keep(x, 0.3, seed, torch.float32)
    assert torch.equal(fast_gx == 0, mask == 0)  # dropped inputs get no gradient
    assert abs(float((mask == 0).float().mean()) - 0.3) < 0.05


def test_dropped_linear_keeps_only_its_input_for_the_backward():
    """Autograd holds x (whoever else saves it, no new memory) and the weight: no dropped copy
    and no mask of the input's size, which the plain op keeps."""
    x = torch.randn(64, 32, requires_grad=True)
    a = torch.randn(4, 32, requires_grad=True)

    def saved_by(op) -> list[torch.Tensor]:
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
            op(x, a, 0.1, 7)
        return saved

    from lora import dropped_linear

    def new_storages(tensors):
        return {t.untyped_storage().data_ptr() for t in tensors} - {
            x.untyped_storage().data_ptr(), a.untyped_storage().data_ptr()}

    assert not new_storages(saved_by(kernels.dropped_linear))
    assert len(new_storages(saved_by(dropped_linear.__wrapped__))) == 2  # the mask, the copy


def test_dropout_draws_drop_every_position_at_the_rate():
    """Four 16-bit draws come from each random word: each of the four drops at drop_rate(p) (a
    lane whose bits were not uniform would show), which is p to within 1/65536."""
    drops = kernels.dropped(torch.Size([400_000, 4]), 0.3, torch.device("cpu"))
    assert (drops.float().mean(0) - kernels.drop_rate(0.3)).abs().max() < 0.005
    assert abs(kernels.drop_rate(0.1) - 0.1) <= 1 / 2**17


def test_dropout_scales_kept_values_by_the_rounded_rate_and_draws_at_its_ends():
    """At p 0.1 dropout drops at drop_rate(0.1) = 6554/65536 and multiplies a kept value by
    65536/58982, 1 / (1 - that rate), so each value's expectation is kept exactly. The drawn
    rate holds at the ends of the 16-bit draws too: at p 0 no value of 2**22 drops, and at
    p 1 - 2**-16 about one in 65536 is kept (64 expected)."""
    assert kernels.drop_rate(0.1) == 6554 / 65536
    assert kernels.keep_scale(0.1) == 65536 / 58982
    x = torch.ones(1000)
    out = kernels.dropout(x, 0.1, True)
    assert set(out.unique().tolist()) == {0.0, torch.tensor(65536 / 58982).item()}
    generator = torch.Generator().manual_seed(0)
    n = torch.Size([2**22])
    assert not kernels.dropped(n, 0.0, torch.device("cpu"), generator).any()
    kept = int((~kernels.dropped(n, 1 - 2**-16, torch.device("cpu"), generator)).sum())
    assert 32 <= kept <= 110
