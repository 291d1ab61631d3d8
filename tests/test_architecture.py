"""The model on its own: config checks, contract module paths, KV cache, padding, decoding
strategies, init, dtype, and that it can learn (transformers parity of the loaded families is
in test_pretrained.py; of generation options such as sampling, stops and the context edge,
here)."""

import dataclasses
import re

import pytest
import torch
import torch.nn.functional as F

from architecture import PRESETS, ModelConfig, Transformer

SMALL = dict(vocab_size=96, block_size=64, n_layer=2, n_embd=64, mlp_hidden=96)
# Small versions of each family's shape, so every flag combination runs here.
SHAPES = {
    "gpt_bigcode": dataclasses.replace(PRESETS["starcoderbase-1b"], n_head=4, head_dim=16,
                                       rotary_dim=16, **SMALL),
    "codegen": dataclasses.replace(PRESETS["codegen-350M-mono"], n_head=4, n_kv_head=4,
                                   head_dim=16, rotary_dim=8, **SMALL),
    "phi": dataclasses.replace(PRESETS["phi-1_5"], n_head=4, n_kv_head=4, head_dim=16,
                               rotary_dim=8, **SMALL),
    "llama": dataclasses.replace(PRESETS["llama-3.2-1b"], n_head=4, n_kv_head=2, head_dim=16,
                                 rotary_dim=16,
                                 rope_scaling={**PRESETS["llama-3.2-1b"].rope_scaling,
                                               "original_max_position_embeddings": 32}, **SMALL),
}


def _model(shape: str, seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    model = Transformer(SHAPES[shape]).eval()
    with torch.no_grad():  # non-trivial biases and norms
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.1)
    return model


def _ids(batch, length, seed=0, vocab=96):
    return torch.randint(3, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------ config

@pytest.mark.parametrize("change, message", [
    (dict(norm="batchnorm"), r"ModelConfig.norm='batchnorm'"),
    (dict(n_head=6, n_kv_head=4), r"n_kv_head=4: must divide n_head=6"),
    (dict(rotary_dim=7), r"rotary_dim=7: must be even"),
    (dict(n_embd=100, n_head=6), r"n_embd=100: not divisible by n_head=6"),
    (dict(rope_scaling={"factor": 8.0}), r"rope_scaling.*needs keys"),
    (dict(init="kaiming"), r"ModelConfig.init='kaiming'"),
    (dict(dropout=1.5), r"dropout=1.5: must be in"),
    (dict(embd_dropout=-0.1), r"embd_dropout=-0.1: must be in"),
    # Sizes that only resolve later failed as a bare TypeError in torch.empty.
    (dict(head_dim=16.0), r"ModelConfig.head_dim must be an integer, got 16.0"),
    (dict(n_kv_head=2.0), r"ModelConfig.n_kv_head must be an integer, got 2.0"),
    (dict(rotary_dim=8.0), r"ModelConfig.rotary_dim must be an integer, got 8.0"),
    (dict(rotary_dim=0), r"ModelConfig.rotary_dim=0: must be a positive integer"),
    # A torch traceback from nn.init.normal_ / a silent division by zero in the norm.
    (dict(init_std=-1.0), r"ModelConfig.init_std=-1.0: must be > 0"),
    (dict(norm_eps=0.0), r"ModelConfig.norm_eps=0.0: must be > 0"),
    # A head_dim changed under a preset's rotary_dim was reported as a rotary_dim error.
    (dict(head_dim=8, rotary_dim=16), r"ModelConfig.head_dim=8: smaller than rotary_dim=16"),
    (dict(n_embd=42, n_head=6), r"ModelConfig.head_dim=7: must be even"),
    # Any truthy string turned a feature on ("false" tied the head); True counted as a size 1.
    (dict(tie_embeddings="false"), r"ModelConfig.tie_embeddings must be true/false, got 'false'"),
    (dict(qkv_bias=1), r"ModelConfig.qkv_bias must be true/false, got 1"),
    (dict(n_head=True), r"ModelConfig.n_head must be an integer, got True"),
    (dict(eos_id=[2, "3"]), r"ModelConfig.eos_id must be a list of integers"),
    # A bare TypeError naming no key, from a comparison or (rope) from torch while building.
    (dict(norm_eps="1e-5"), r"ModelConfig.norm_eps must be a number, got '1e-5'"),
    (dict(dropout="0.1"), r"ModelConfig.dropout must be a number, got '0.1'"),
    (dict(rope_theta="10000"), r"ModelConfig.rope_theta must be a number, got '10000'"),
    (dict(rope_scaling={**PRESETS["llama-3.2-1b"].rope_scaling, "factor": "32"}),
     r"ModelConfig.rope_scaling=.*\['factor'\] must be numbers"),
    # inf frequencies (or NaN) for every rotated pair but the first, and finite logits.
    (dict(rope_theta=0.0), r"ModelConfig.rope_theta=0.0: must be > 0 and finite"),
    (dict(rope_theta=-1e4), r"ModelConfig.rope_theta=-10000.0: must be > 0"),
    (dict(rope_theta=float("nan")), r"ModelConfig.rope_theta=nan: must be > 0"),
    # inf: every rotated pair but the first never turns (positions silently ignored); an inf
    # norm_eps zeroes every normalized activation.
    (dict(rope_theta=float("inf")), r"ModelConfig.rope_theta=inf: must be > 0 and finite"),
    (dict(norm_eps=float("inf")), r"ModelConfig.norm_eps=inf: must be > 0 and finite"),
])
def test_config_rejects_bad_values(change, message):
    with pytest.raises(ValueError, match=message):
        ModelConfig(**change)


def test_config_eos_id_may_be_one_id_or_a_list():
    assert ModelConfig(eos_id=[5, 2]).eos_id == [5, 2] and ModelConfig(eos_id=5).eos_id == 5


def test_model_owns_a_deep_copy_of_its_config():
    """Transformer(PRESETS[...]) held the preset itself: a change to one model's config (its
    live dropout) reached the preset and every model built from it."""
    preset = PRESETS["tiny"]
    a, b = Transformer(preset), Transformer(preset)
    a.cfg.dropout = 0.3
    assert a.blocks[0].cfg is a.cfg and a.rope.cfg is a.cfg  # the modules read it live
    assert b.cfg.dropout == preset.dropout == 0.0 and b.cfg is not preset
    llama = Transformer(SHAPES["llama"])
    llama.cfg.rope_scaling["factor"] = 1.0
    assert SHAPES["llama"].rope_scaling["factor"] == 32.0


def test_odd_head_dim_is_fine_without_rotary_embeddings():
    assert ModelConfig(n_embd=42, n_head=6, positions="learned").head_dim == 7


def test_config_dict_round_trip_and_unknown_keys():
    cfg = PRESETS["llama-3.2-1b"]
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match=r"unknown keys \['n_layers'\]"):
        ModelConfig.from_dict({"n_layers": 3})


def test_contract_module_paths():
    cfg = SHAPES["llama"]
    model = Transformer(cfg)
    hd = cfg.head_dim
    assert model.blocks[1].attn.qkv.weight.shape == ((4 + 2 * 2) * hd, 64)
    assert model.blocks[1].attn.proj.weight.shape == (64, 4 * hd)
    assert model.blocks[1].mlp.fc.weight.shape == (96, 64)
    assert model.blocks[1].mlp.gate.weight.shape == (96, 64)
    assert model.blocks[1].mlp.proj.weight.shape == (64, 96)
    assert model.lm_head.weight is model.wte.weight and model.wpe is None
    assert isinstance(model.norm_f, torch.nn.Module) and model.blocks[0].norm_2 is not None
    phi = Transformer(SHAPES["phi"])
    assert phi.blocks[0].norm_2 is None and phi.lm_head.bias is not None
    assert Transformer(SHAPES["gpt_bigcode"]).wpe.weight.shape == (64, 64)


# ------------------------------------------------------------------------ cache, padding

@pytest.mark.parametrize("shape", SHAPES)
def test_kv_cache_decode_equals_full_forward(shape):
    model = _model(shape)
    idx = _ids(2, 40)
    full = model(idx)
    prompt, total = 24, idx.shape[1]
    caches = model._new_caches(2, total)
    last, key_valid, pos = model._prefill(idx[:, :prompt], None, total, caches)
    steps = [last]
    for t in range(prompt, total - 1):
        steps.append(model._step(idx[:, t:t + 1], pos, torch.tensor([t]), key_valid, caches))
        pos = pos + 1
    decoded = torch.stack(steps, dim=1)
    assert (decoded - full[:, prompt - 1:total - 1]).abs().max().item() < 1e-5


@pytest.mark.parametrize("shape", SHAPES)
def test_left_padded_batch_equals_unpadded_runs(shape):
    model = _model(shape)
    rows = [_ids(1, n, seed=n)[0] for n in (20, 13, 7)]
    width = max(len(r) for r in rows)
    idx = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.bool)
    for b, r in enumerate(rows):
        idx[b, width - len(r):] = r
        mask[b, width - len(r):] = True
    padded = model(idx, attention_mask=mask)
    out = model.generate(idx, 12, attention_mask=mask)
    for b, r in enumerate(rows):
        alone = model(r[None])
        assert (padded[b, width - len(r):] - alone[0]).abs().max().item() < 1e-5
        assert torch.equal(out[b, width:], model.generate(r[None], 12)[0, len(r):])


def _naive_sdpa(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                enable_gqa=False):
    """Attention as the formula writes it: a fully masked row is softmax of all -inf, NaN (as
    in SDPA's CUDA kernels and older torch; this CPU build returns zeros there)."""
    if enable_gqa:
        k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
        v = v.repeat_interleave(q.shape[1] // v.shape[1], dim=1)
    scores = q @ k.transpose(-2, -1) * (scale or q.shape[-1] ** -0.5)
    if is_causal:
        attn_mask = torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool).tril()
    if attn_mask is not None:
        scores = scores.masked_fill(~attn_mask, float("-inf"))
    return scores.softmax(-1) @ v


@pytest.mark.parametrize("shape", ["llama", "gpt_bigcode"])
def test_left_padding_leaks_no_nan_where_a_masked_row_is_nan(shape, monkeypatch):
    """Padding queries see themselves: with a kernel that gives NaN for a row with no key, their
    NaN would reach real tokens through the next layer's zero weights (0 * NaN)."""
    model = _model(shape)
    rows = [_ids(1, n, seed=n)[0] for n in (12, 5)]
    idx = torch.zeros(2, 12, dtype=torch.long)
    mask = torch.zeros(2, 12, dtype=torch.bool)
    for b, r in enumerate(rows):
        idx[b, 12 - len(r):], mask[b, 12 - len(r):] = r, True
    monkeypatch.setattr(F, "scaled_dot_product_attention", _naive_sdpa)
    padded = model(idx, attention_mask=mask)
    for b, r in enumerate(rows):
        assert (padded[b, 12 - len(r):] - model(r[None])[0]).abs().max().item() < 1e-5


def test_right_padding_needs_no_mask():
    model = _model("llama")
    idx = _ids(1, 20)
    padded = torch.cat((idx, torch.zeros(1, 5, dtype=torch.long)), dim=1)
    assert (model(padded)[:, :20] - model(idx)).abs().max().item() < 1e-5


def _spy_sdpa(monkeypatch) -> list[dict]:
    """Record each SDPA call's key shape, mask and enable_gqa (and still compute it)."""
    import architecture

    calls: list[dict] = []
    sdpa = F.scaled_dot_product_attention

    def spy(q, k, v, attn_mask=None, is_causal=False, enable_gqa=False, **kw):
        calls.append(dict(q_len=q.shape[2], kv_heads=k.shape[1], k_len=k.shape[2],
                          masked=attn_mask is not None, is_causal=is_causal, gqa=enable_gqa))
        return sdpa(q, k, v, attn_mask=attn_mask, is_causal=is_causal, enable_gqa=enable_gqa,
                    **kw)

    monkeypatch.setattr(architecture.F, "scaled_dot_product_attention", spy)
    return calls


@pytest.mark.parametrize("device, dtype, masked, major, grouped", [
    ("cpu", torch.float32, True, None, True),  # CPU: as it always was
    ("cpu", torch.bfloat16, False, None, True),
    ("cuda", torch.bfloat16, False, 8, True),  # flash takes it
    ("cuda", torch.float16, False, 9, True),
    ("cuda", torch.bfloat16, True, 9, False),  # a mask: flash cannot
    ("cuda", torch.float32, False, 9, False),  # fp32: flash cannot
    ("cuda", torch.bfloat16, False, 7, False),  # pre-Ampere: no flash
])
def test_sdpa_gets_grouped_keys_only_where_a_fused_kernel_takes_them(monkeypatch, device, dtype,
                                                                      masked, major, grouped):
    """On CUDA only the flash kernel takes enable_gqa: any other grouped call fell silently to
    the math kernel (every score in memory) in generation, masked or fp32 scoring, and all
    pre-Ampere training."""
    from types import SimpleNamespace

    import architecture

    def properties(device):
        assert major is not None, "asked a CUDA question about a CPU tensor"
        return SimpleNamespace(major=major)

    monkeypatch.setattr(torch.cuda, "get_device_properties", properties)
    assert architecture._sdpa_takes_gqa(torch.device(device), dtype, masked) is grouped


@pytest.mark.parametrize("shape", ["llama", "gpt_bigcode"])  # grouped-query; multi-query
def test_keys_repeated_to_the_query_heads_equal_grouped_attention(monkeypatch, shape):
    """The path CUDA takes where flash cannot (keys and values repeated, no enable_gqa) gives what
    grouped attention gives, masked and unmasked, and in the KV-cache decode."""
    import architecture

    model = _model(shape)
    n_head = model.cfg.n_head
    assert model.cfg.n_kv_head < n_head
    idx = _ids(2, 20)
    mask = torch.ones_like(idx, dtype=torch.bool)
    mask[1, :6] = False  # left padding
    with torch.no_grad():
        grouped = [model(idx), model(idx, attention_mask=mask)]
    grouped_out = model.generate(idx, 8, attention_mask=mask)
    calls = _spy_sdpa(monkeypatch)
    monkeypatch.setattr(architecture, "_sdpa_takes_gqa", lambda *args: False)
    with torch.no_grad():
        repeated = [model(idx), model(idx, attention_mask=mask)]
    assert torch.equal(model.generate(idx, 8, attention_mask=mask), grouped_out)
    assert calls and all(c["kv_heads"] == n_head and not c["gqa"] for c in calls)
    for a, b in zip(grouped, repeated):
        assert a.dtype == torch.float32 and (a - b).abs().max().item() < 1e-6


def test_prefill_without_padding_attends_causally_to_the_prompt_alone(monkeypatch):
    """A prompt without padding is prefilled with is_causal over its own keys, not a boolean mask
    over the whole cache (which kept CUDA's prefill off flash); padded prompts keep the mask."""
    model = _model("llama")
    idx = _ids(2, 10)
    calls = _spy_sdpa(monkeypatch)
    n = model.cfg.n_layer
    prefill = dict(q_len=10, kv_heads=2, k_len=10, masked=False, is_causal=True, gqa=True)
    step = dict(q_len=1, kv_heads=2, k_len=13, masked=True, is_causal=False, gqa=True)
    for mask in (None, torch.ones_like(idx, dtype=torch.bool)):
        calls.clear()
        model.generate(idx, 3, attention_mask=mask)
        assert calls == [prefill] * n + [step] * 2 * n
    mask = torch.ones_like(idx, dtype=torch.bool)
    mask[0, :2] = False
    calls.clear()
    model.generate(idx, 3, attention_mask=mask)
    assert calls[0] == dict(prefill, k_len=13, masked=True, is_causal=False)


# ------------------------------------------------------------------------------ decoding

def test_greedy_is_argmax_of_forward():
    model = _model("phi")
    idx = _ids(2, 10)
    out = model.generate(idx, 6)
    logits = model(out[:, :-1])
    assert torch.equal(out[:, 10:], logits[:, 9:].argmax(-1))
    logits.sum().backward()  # the output is an ordinary tensor, not an inference-mode one


def test_decode_layout_keeps_values_and_training_gets_row_major_back():
    """generate may re-lay out weights column-major for decoding (CPU); values, outputs, saved
    files and training must not notice."""
    model = _model("llama")
    state = {k: v.clone() for k, v in model.state_dict().items()}
    idx = _ids(2, 10)
    logits = model(idx)
    out = model.generate(idx, 8)
    for name, p in model.named_parameters():
        assert torch.equal(p, state[name]), name
    torch.testing.assert_close(model(idx), logits, rtol=0, atol=1e-5)
    assert torch.equal(model.generate(idx, 8), out)  # the layout stays in eval mode
    model._use_decode_layout(True)
    forced = [p for p in model.parameters() if p.dim() == 2]
    for p in forced:  # force the column-major case whatever this machine measured
        p.data = p.data.t().contiguous().t()
    assert torch.equal(model.generate(idx, 8), out)
    model.train()
    assert all(p.is_contiguous() for p in model.parameters())
    F.cross_entropy(model(idx).flatten(0, 1), idx.flatten()).backward()
    assert all(p.grad.is_contiguous() for p in model.parameters())
    model.generate(idx, 4)  # in train mode the weights go back to row-major at the end
    assert all(p.is_contiguous() for p in model.parameters())


def test_decode_layout_is_a_fixed_rule_not_a_timing_race(monkeypatch):
    """The layout changes the low bits of batch-1 logits, and a timing race chose it, so which
    weights were re-laid out varied from run to run with the machine's load. Now a rule: fp32
    weights with more outputs than inputs go column-major, whatever the clock says."""
    import time

    ticks = iter(range(10**9))  # a clock by which every layout times the same
    monkeypatch.setattr(time, "perf_counter", lambda: next(ticks))
    model = _model("llama")  # qkv (128, 64), fc and gate (96, 64), tied head (96, 64)
    model.generate(_ids(1, 4), 2)
    column_major = {n for n, p in model.named_parameters() if not p.is_contiguous()}
    assert column_major == {"wte.weight"} | {f"blocks.{i}.{name}.weight" for i in range(2)
                                             for name in ("attn.qkv", "mlp.fc", "mlp.gate")}
    model = _model("llama").to(torch.bfloat16)  # bf16 reads row-major as fast
    model.generate(_ids(1, 4), 2)
    assert all(p.is_contiguous() for p in model.parameters())


def test_decode_layout_stays_out_of_state_dict(tmp_path):
    """Tools that save or flatten a state dict (safetensors' save_model, .view(-1)) get
    row-major tensors after generate, without a copy of the model; the next generate lays the
    weights out again."""
    from safetensors.torch import load_file, save_model

    model = _model("llama")
    model.generate(_ids(1, 4), 2)

    def force_column_major():  # whatever this machine measured
        model._use_decode_layout(True)
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
    model.generate(_ids(1, 4), 2)  # lays the weights out again (if faster here)
    assert model._decode_layout


def test_generate_under_autocast_decodes_what_forward_computes():
    """Under autocast the cache holds autocast's dtype, so each greedy token is the argmax of
    forward's logits under the same autocast (an fp32 cache failed in index_copy_)."""
    model = _model("llama")
    idx = _ids(2, 10)
    for dtype in (torch.bfloat16, torch.float16):
        with torch.autocast("cpu", dtype=dtype):
            out = model.generate(idx, 6)
            logits = model(out[:, :-1])
            assert torch.equal(out[:, 10:], logits[:, 9:].argmax(-1))
            assert torch.equal(torch.stack(list(model.stream(idx, 6)), 1), out[:, 10:])
            assert model.generate(idx, 6, num_beams=2).shape == (2, 16)


def test_sampling_filters_and_seed():
    model = _model("llama")
    idx = _ids(1, 10).repeat(400, 1)
    last = model(idx[:1])[0, -1]
    top5 = set(last.topk(5).indices.tolist())
    g = torch.Generator().manual_seed(0)
    first = model.generate(idx, 1, temperature=1.0, top_k=5, generator=g)[:, -1]
    assert set(first.tolist()) <= top5 and len(set(first.tolist())) > 1
    probs = last.softmax(-1).sort(descending=True)
    nucleus = int((probs.values.cumsum(0) < 0.5).sum()) + 1
    allowed = set(probs.indices[:nucleus].tolist())
    first = model.generate(idx, 1, temperature=1.0, top_p=0.5, generator=g)[:, -1]
    assert set(first.tolist()) <= allowed
    a = model.generate(idx[:2], 8, temperature=0.8, generator=torch.Generator().manual_seed(1))
    b = model.generate(idx[:2], 8, temperature=0.8, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b)
    greedy = model.generate(idx[:2], 8)
    assert torch.equal(model.generate(idx[:2], 8, temperature=1.0, top_k=1), greedy)


def _lively(shape):
    """A random model whose greedy continuations vary (small inits repeat one token)."""
    torch.manual_seed(0)
    return Transformer(dataclasses.replace(SHAPES[shape], init_std=0.5)).eval()


def test_eos_ends_each_row_separately():
    model = _lively("codegen")
    idx = _ids(2, 8, seed=5)
    free = model.generate(idx, 10)
    row0, row1 = free[0, 8:].tolist(), free[1, 8:].tolist()
    step = next(i for i, t in enumerate(row0) if t not in row0[:i] and t not in row1)
    eos = row0[step]
    out = model.generate(idx, 10, eos_id=[eos])
    assert torch.equal(out[0, :9 + step], free[0, :9 + step])
    assert (out[0, 9 + step:] == eos).all()
    assert torch.equal(out[1], free[1])
    alone = model.generate(idx[:1], 10, eos_id=eos)
    assert alone.shape[1] == 9 + step  # stops once every row has finished


def test_stop_ids_and_strings():
    model = _lively("gpt_bigcode")
    idx = _ids(1, 8, seed=6)
    gen = model.generate(idx, 12)[0, 8:].tolist()
    k = next(i for i in range(1, 11) if gen[i:i + 2] not in
             [gen[j:j + 2] for j in range(i)])
    out = model.generate(idx, 12, stop=[gen[k:k + 2]], pad_id=0)
    assert out[0, 8:].tolist() == gen[:k + 2]

    def decode(ids):
        return "".join(chr(65 + i % 26) for i in ids)

    text = decode(gen)
    out = model.generate(idx, 12, stop=[text[k:k + 2]], decode=decode)
    assert text[k:k + 2] in decode(out[0, 8:].tolist())
    assert out.shape[1] == 8 + k + 2
    with pytest.raises(ValueError, match="need decode="):
        model.generate(idx, 4, stop=["x"])


def test_a_stop_id_sequence_ends_a_row_only_where_the_whole_sequence_is_generated():
    """stop=[[a, b]] matched on b alone ended the row at an earlier b that followed another
    token. Reference: the free greedy continuation, cut by hand after the first [a, b], on a
    prompt whose continuation has such an earlier b."""
    model = _lively("gpt_bigcode")
    for seed in range(6, 40):
        idx = _ids(1, 8, seed=seed)
        gen = model.generate(idx, 24)[0, 8:].tolist()
        # k: the first [a, b] = gen[k:k + 2] generated, with b already generated after another id
        k = next((k for k in range(1, len(gen) - 1)
                  if gen[k:k + 2] not in [gen[j:j + 2] for j in range(k)]
                  and any(gen[j] == gen[k + 1] and gen[j - 1] != gen[k]
                          for j in range(1, k + 1))), None)
        if k is not None:
            break
    else:
        raise AssertionError("no continuation with a repeated second stop id")
    out = model.generate(idx, 24, stop=[gen[k:k + 2]], pad_id=0)
    assert out[0, 8:].tolist() == gen[:k + 2]


def test_stream_yields_what_generate_returns():
    model = _model("llama")
    idx = _ids(2, 8)
    streamed = torch.stack(list(model.stream(idx, 9)), dim=1)
    assert torch.equal(streamed, model.generate(idx, 9)[:, 8:])


def test_generations_running_at_once_do_not_share_a_cache():
    # The KV cache lived on the model: a second stream replaced the first one's (wrong tokens,
    # no error), and a generate() inside a stream crashed it.
    model = _model("codegen")
    a, b = _ids(1, 6), _ids(2, 5)[1:]
    want_a, want_b = model.generate(a, 8)[0, 6:], model.generate(b, 8)[0, 5:]
    pairs = list(zip(model.stream(a, 8), model.stream(b, 8)))
    assert torch.equal(torch.cat([x for x, _ in pairs]), want_a)
    assert torch.equal(torch.cat([y for _, y in pairs]), want_b)
    got = []
    for tok in model.stream(a, 8):
        got.append(tok)
        model.generate(b, 3, num_beams=2)
    assert torch.equal(torch.cat(got), want_a)


def test_beam_search_scores_at_least_greedy():
    model = _model("phi")
    idx = _ids(2, 8)
    greedy = model.generate(idx, 6)
    beams = model.generate(idx, 6, num_beams=4)

    def logprob(seq):
        logp = torch.log_softmax(model(seq[:, :-1]), -1)[:, 7:]
        return logp.gather(-1, seq[:, 8:, None]).sum((1, 2))

    assert (logprob(beams) >= logprob(greedy) - 1e-5).all()
    with pytest.raises(ValueError, match="beam search is deterministic"):
        model.generate(idx, 4, num_beams=2, temperature=0.7)


def test_input_errors():
    model = _model("llama")
    with pytest.raises(ValueError, match="exceeds the context length block_size=64"):
        model(_ids(1, 65))
    with pytest.raises(ValueError, match=r"must be \(batch, time\)"):
        model(_ids(1, 5)[0])
    with pytest.raises(ValueError, match="prompt length 60 \\+ max_new_tokens 10 exceeds"):
        model.generate(_ids(1, 60), 10)
    with pytest.raises(ValueError, match=r"token ids outside \[0, vocab_size=96\): min 3, max 96"):
        model.generate(torch.tensor([[3, 96]]), 2)
    for beams in (1, 2):
        with pytest.raises(ValueError, match="the prompt is empty"):
            model.generate(torch.zeros(1, 0, dtype=torch.long), 3, num_beams=beams)
    for beams in (1, 3):  # the shapes passed, not the beam-expanded ones
        with pytest.raises(ValueError, match=re.escape("shape (2, 4) != idx shape (2, 5)")):
            model.generate(_ids(2, 5), 2, num_beams=beams,
                           attention_mask=torch.ones(2, 4, dtype=torch.bool))
    for bad in ("x", 2.5, [3, None]):
        with pytest.raises(ValueError, match="eos_id must be a token id or a sequence of ids"):
            model.generate(_ids(1, 5), 2, eos_id=bad)


def test_eos_and_stop_ids_as_numpy_or_tensor_values():
    import numpy as np

    model = _lively("codegen")
    idx = _ids(2, 8, seed=5)
    eos = int(model.generate(idx, 3)[0, -1])
    want = model.generate(idx, 6, eos_id=eos)
    for alike in (np.int64(eos), torch.tensor(eos), [np.int32(eos)], np.array([eos]),
                  torch.tensor([eos])):
        for beams in (1, 2):
            assert torch.equal(model.generate(idx, 6, eos_id=alike, num_beams=beams),
                               model.generate(idx, 6, eos_id=eos, num_beams=beams))
    assert torch.equal(model.generate(idx, 6, stop=[np.int64(eos)], pad_id=eos), want)


def test_sampling_and_generation_arguments_checked_up_front():
    """Refused before any work, also where they would not be used (greedy, no new tokens)."""
    import numpy as np

    model = _model("llama")
    idx = _ids(1, 5)
    for kw, message in [
        (dict(top_p=1.5), r"top_p must be in \(0, 1\]"),
        (dict(top_p=0.0, temperature=1.0), r"top_p must be in \(0, 1\]"),
        (dict(top_p=float("nan"), temperature=1.0), r"top_p must be in \(0, 1\]"),
        (dict(temperature=-1.0), r"temperature must be 0 \(greedy\) or a finite number >= "
                                 r"1e-10 \(smaller ones overflow the logits\), got -1.0"),
        (dict(temperature="0.7"), "temperature must be 0 .* got '0.7'"),
        # logits / temperature would be inf (a NaN softmax, failing deep in multinomial) or 0
        (dict(temperature=1e-300), "temperature must be 0 .* got 1e-300"),
        (dict(temperature=float("inf")), "temperature must be 0 .* got inf"),
        (dict(top_k=0), "top_k must be >= 1"),
        (dict(top_k=2.5, temperature=1.0), "top_k must be an integer"),
        (dict(pad_id="0", eos_id=3), "pad_id must be an integer"),
        # Ignored without a word: the output was greedy (transformers warns).
        (dict(top_p=0.9), "temperature=0 is greedy .*: pass temperature > 0 to sample"),
        (dict(top_k=5), "temperature=0 is greedy"),
        # torch's errors after the prefill / at the first step.
        (dict(temperature=1.0, generator=42), "generator must be a torch.Generator, got 42"),
        (dict(stop="\n", decode="tokenizer"), "decode must be a callable such as tokenizer.decode"),
        # No generated token can equal them: every row ran to max_new_tokens.
        (dict(eos_id=96), re.escape("eos_id 96 is outside the model's vocabulary [0, 96): it "
                                    "can never be generated")),
        (dict(eos_id=[3, -1]), "eos_id -1 is outside"),
        (dict(stop=[[3, 96]], eos_id=3), "stop id 96 is outside"),
        # An IndexError from F.embedding once a row finished, the tokens so far lost.
        (dict(pad_id=-100, eos_id=3), "pad_id -100 is outside the model's vocabulary"),
    ]:
        for n in (0, 2):
            with pytest.raises(ValueError, match=message):
                model.generate(idx, n, **kw)
            with pytest.raises(ValueError, match=message):
                next(model.stream(idx, n, **kw))
    for beams in (1, 2):
        with pytest.raises(ValueError, match="max_new_tokens must be an integer, got 5.0"):
            model.generate(idx, 5.0, num_beams=beams)
    with pytest.raises(ValueError, match="num_beams must be an integer, got 2.0"):
        model.generate(idx, 5, num_beams=2.0)
    with pytest.raises(ValueError, match="beam search is deterministic"):
        model.generate(idx, 5, num_beams=2, stop=0)  # a bare id 0 is a stop too
    for kw, message in [(dict(eos_id=96), "eos_id 96 is outside"),
                        (dict(pad_id=-100), "pad_id -100 is outside"),
                        (dict(length_penalty="1.0"), "length_penalty must be a finite number"),
                        (dict(compile=True), "beam search runs eagerly")]:  # was ignored
        with pytest.raises(ValueError, match=message):
            model.generate(idx, 0, num_beams=2, **kw)
    assert model.generate(idx, np.int64(3), top_k=np.int64(2), temperature=1.0).shape == (1, 8)


def test_a_generator_at_temperature_zero_is_greedy():
    """eval passes its seeded generator whatever the temperature."""
    model = _model("llama")
    idx = _ids(2, 5)
    assert torch.equal(model.generate(idx, 4, generator=torch.Generator().manual_seed(0)),
                       model.generate(idx, 4))


@pytest.mark.parametrize("ids, message", [
    ([[3, 4]], "input_ids must be a tensor \\(batch, time\\), got a list"),
    # F.embedding's "Expected tensor for argument #1 'indices' to have ... Long, Int".
    (torch.Tensor([[3, 4]]), "input_ids must hold integer token ids .*got torch.float32 "
                             "\\(torch.Tensor\\(...\\) makes floats"),
    (torch.tensor([[True, False]]), "input_ids must hold integer token ids .*got torch.bool"),
    # F.embedding's "index out of range in self" (on CUDA a device-side assert).
    (torch.tensor([[-100, 3]]), re.escape("input_ids holds token ids outside [0, vocab_size=96):"
                                          " min -100, max 3")),
    (torch.tensor([[3, 96]]), "outside .* max 96"),
])
def test_forward_refuses_what_are_no_token_ids(ids, message):
    model = _model("llama")
    with pytest.raises(ValueError, match=message):
        model(ids)
    with pytest.raises(ValueError, match=message.replace("input_ids", "idx")):
        model.generate(ids, 2)
    with pytest.raises(ValueError, match=message.replace("input_ids", "idx")):
        next(model.stream(ids, 2))


def test_attention_mask_must_be_a_tensor():
    model = _model("llama")
    for beams in (1, 2):
        with pytest.raises(ValueError, match="attention_mask must be a tensor .*got a list"):
            model.generate(_ids(1, 3), 2, attention_mask=[[1, 1, 1]], num_beams=beams)
    with pytest.raises(ValueError, match="attention_mask must be a tensor .*got a list"):
        model(_ids(1, 3), attention_mask=[[1, 1, 1]])


def test_int32_ids_give_the_logits_of_long_ids():
    model, ids = _model("llama"), _ids(2, 5)
    assert torch.equal(model(ids.int()), model(ids))


@pytest.mark.slow  # dynamo's first trace: ~15 s
def test_forward_id_range_check_stays_out_of_a_compiled_graph():
    """Checked in eager mode only: a data-dependent min/max would break a fullgraph compile."""
    model, ids = _model("llama"), _ids(2, 5)
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    torch.testing.assert_close(compiled(ids), model(ids))


def test_generation_refuses_right_padded_or_empty_rows():
    """generate continues each row from its last position: a right-padded row (as training
    batches are padded) would continue its pads, and an all-padding row has no prompt."""
    model = _model("llama")
    idx = _ids(3, 6)
    mask = torch.ones(3, 6, dtype=torch.bool)
    mask[0, :2] = False  # left padding is fine
    mask[1, 4:] = False  # right padding is not
    for beams in (1, 2):
        with pytest.raises(ValueError, match="attention_mask row 1 ends with padding: "
                                             "generation needs left-padded prompts"):
            model.generate(idx, 3, attention_mask=mask, num_beams=beams)
    with pytest.raises(ValueError, match="attention_mask row 1 ends with padding"):
        next(model.stream(idx, 3, attention_mask=mask))
    mask[1] = True
    mask[2] = False
    for beams in (1, 2):
        with pytest.raises(ValueError, match="attention_mask row 2 is all padding: generation "
                                             "needs left-padded prompts"):
            model.generate(idx, 3, attention_mask=mask, num_beams=beams)
    mask[2] = True
    assert model.generate(idx, 3, attention_mask=mask).shape == (3, 9)


def test_stop_without_eos_on_a_batch_needs_pad_id():
    """A row that stops before the others is filled; without eos_id or pad_id there is no id to
    fill it with (any default would be a real token, 0 is "!" in GPT-2's vocabulary)."""
    model = _lively("gpt_bigcode")
    idx = _ids(2, 8, seed=6)
    free = model.generate(idx, 6)[:, 8:].tolist()
    stop = free[0][1]
    assert stop not in free[0][:1] + free[1]  # row 0 stops after 2 tokens, row 1 runs on
    with pytest.raises(ValueError, match="stop without eos_id on a batch needs pad_id"):
        model.generate(idx, 6, stop=[stop])
    with pytest.raises(ValueError, match="stop without eos_id on a batch needs pad_id"):
        next(model.stream(idx, 6, stop=[stop]))
    out = model.generate(idx, 6, stop=[stop], pad_id=95)
    assert out[0, 8:].tolist() == free[0][:2] + [95] * 4 and out[1, 8:].tolist() == free[1]
    out = model.generate(idx, 6, stop=[stop], eos_id=94)  # the EOS id fills, as documented
    assert out[0, 8:].tolist() == free[0][:2] + [94] * 4
    alone = model.generate(idx[:1], 6, stop=[stop])  # a lone row just ends there
    assert alone[0, 8:].tolist() == free[0][:2]


def test_pad_id_fills_finished_rows_also_when_an_eos_id_is_given():
    """pad_id, when given, fills the rows that finished, not the EOS id (which fills only
    without pad_id). Reference: the free greedy continuation, cut by hand after the EOS."""
    model = _lively("codegen")
    idx = _ids(2, 8, seed=5)
    free = model.generate(idx, 10)
    row0, row1 = free[0, 8:].tolist(), free[1, 8:].tolist()
    step = next(i for i, t in enumerate(row0) if t not in row0[:i] and t not in row1)
    eos, pad = row0[step], next(t for t in (95, 94) if t != row0[step])
    out = model.generate(idx, 10, eos_id=eos, pad_id=pad)
    assert out[0, 8:].tolist() == row0[:step + 1] + [pad] * (9 - step)
    assert torch.equal(out[1], free[1])
    assert torch.equal(torch.stack(list(model.stream(idx, 10, eos_id=eos, pad_id=pad)), 1),
                       out[:, 8:])


def test_a_stop_string_ending_inside_the_last_token_ends_the_row():
    """A stop string counts once the text contains it, also where the last token's text runs
    past it (a stop spanning two tokens, as tokenizers cut text), not only where the text ends
    with it. Reference: the free greedy continuation, cut by hand after the stop's token."""
    model = _lively("gpt_bigcode")
    idx = _ids(1, 8, seed=6)
    gen = model.generate(idx, 12)[0, 8:].tolist()

    def decode(ids):  # two characters a token, so a stop can end inside one
        return "".join(chr(65 + i % 26) + chr(97 + i % 26) for i in ids)

    text = decode(gen)
    # a stop from the second character of token k to the first of token k + 1, first seen there
    k = next(k for k in range(1, 10) if text[2 * k + 1:2 * k + 3] not in text[:2 * k + 2])
    stop = text[2 * k + 1:2 * k + 3]
    out = model.generate(idx, 12, stop=stop, decode=decode)
    assert out[0, 8:].tolist() == gen[:k + 2]
    assert not decode(gen[:k + 2]).endswith(stop)


def test_stop_strings_without_eos_on_a_batch_need_pad_id_as_stop_ids_do():
    """A row ended by a stop string is filled like one ended by a stop id: without eos_id or
    pad_id there is no id to fill it with, for strings too."""
    model = _model("llama")
    for stop in (["AB"], "AB", [[5, 6], "AB"]):
        with pytest.raises(ValueError, match="stop without eos_id on a batch needs pad_id"):
            model.generate(_ids(2, 5), 3, stop=stop, decode=lambda ids: "x")
    assert model.generate(_ids(1, 5), 3, stop="AB", decode=lambda ids: "x").shape == (1, 8)


def test_a_negative_max_new_tokens_or_a_nan_temperature_is_refused():
    """A negative max_new_tokens is refused, not read as no new tokens; a NaN temperature
    (which `temperature < 0` lets through) is no number >= 0."""
    model = _model("llama")
    for beams in (1, 2):
        with pytest.raises(ValueError, match="max_new_tokens must be >= 0, got -1"):
            model.generate(_ids(1, 5), -1, num_beams=beams)
    with pytest.raises(ValueError, match="max_new_tokens must be >= 0, got -1"):
        next(model.stream(_ids(1, 5), -1))
    for bad in (float("nan"), float("-inf")):
        with pytest.raises(ValueError, match="temperature must be 0 "):
            model.generate(_ids(1, 5), 2, temperature=bad)


# ------------------------------------------------------- generation options vs transformers

@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    """family -> (directory, transformers model) of tiny random checkpoints whose greedy
    continuations vary; codelm models are loaded fresh from the directory by each test."""
    from tiny_hf import save_tiny_hf

    out = {}
    for family in ("gpt_bigcode", "llama"):  # learned positions; rope
        path = tmp_path_factory.mktemp(family)
        out[family] = path, save_tiny_hf(family, path, initializer_range=0.2)
    return out


def _hf_generate(hf, idx, n, **kw):
    kw = {"do_sample": False, "eos_token_id": None, "pad_token_id": 0, **kw}
    return hf.generate(idx, attention_mask=torch.ones_like(idx), max_new_tokens=n, **kw)


def test_seeded_sampling_matches_transformers_from_the_first_call(hf_dirs):
    """The decode-layout measurement of a model's first generate drew from the global RNG:
    the same seed sampled other tokens on that call than on later ones and than HF."""
    path, hf = hf_dirs["llama"]
    idx = _ids(2, 10, vocab=256)
    kw = dict(temperature=0.8, top_k=40, top_p=0.9)
    torch.manual_seed(123)
    ref = _hf_generate(hf, idx, 16, do_sample=True, eos_token_id=2, **kw)
    model = Transformer.from_pretrained(path).eval()  # fresh: this call measures the layout
    torch.manual_seed(123)
    assert torch.equal(model.generate(idx, 16, eos_id=2, pad_id=0, **kw), ref)
    model = Transformer.from_pretrained(path).eval()
    torch.manual_seed(123)
    streamed = list(model.stream(idx, 16, eos_id=2, pad_id=0, **kw))
    assert torch.equal(torch.cat((idx, torch.stack(streamed, 1)), 1), ref)
    for train in (False, True):  # train mode measures on every call
        model = Transformer.from_pretrained(path).train(train)
        state = torch.get_rng_state()
        model.generate(idx, 4)
        model.generate(idx, 4, num_beams=2)
        list(model.stream(idx, 4))
        assert torch.equal(torch.get_rng_state(), state), "greedy decoding drew random numbers"


def test_sampling_without_top_k_is_transformers_top_k_zero_not_its_default(hf_dirs):
    """top_k=None filters nothing: a seed samples what HF's do_sample=True samples with top_k=0,
    not with its generate's default top_k=50 (the contract said only "do_sample=True")."""
    path, hf = hf_dirs["llama"]
    model = Transformer.from_pretrained(path).eval()
    idx = _ids(2, 10, vocab=256)
    torch.manual_seed(7)
    got = model.generate(idx, 16, temperature=1.0)
    torch.manual_seed(7)
    assert torch.equal(got, _hf_generate(hf, idx, 16, do_sample=True, temperature=1.0, top_k=0))
    torch.manual_seed(7)
    assert not torch.equal(got, _hf_generate(hf, idx, 16, do_sample=True, temperature=1.0))


def test_any_of_several_eos_ids_ends_a_row_and_the_first_one_fills_as_in_transformers(hf_dirs):
    """eos_id=[a, b]: b ends a row as a does, and a row that finished is filled with the first
    id a (transformers' pad default), whichever id ended it. The row that ends first ends with
    b, so taking only a, or filling with b, shows."""
    path, hf = hf_dirs["llama"]
    model = Transformer.from_pretrained(path).eval()
    idx = _ids(2, 10, vocab=256)
    free = model.generate(idx, 16)[:, 10:].tolist()

    def first_made(row):  # (step, token): the row makes the token there for the first time
        return [(s, t) for s, t in enumerate(free[row]) if t not in free[row][:s]]

    # t0 ends row 0 at s0 and t1 row 1 at s1: neither row makes the other's id before it ends
    (s0, t0), (s1, t1) = next((a, b) for a in first_made(0) for b in first_made(1)
                              if a[0] != b[0] and a[1] not in free[1][:b[0] + 1]
                              and b[1] not in free[0][:a[0] + 1])
    eos = [t1, t0] if s0 < s1 else [t0, t1]  # the row that ends first ends with eos[1]
    ref = _hf_generate(hf, idx, 16, eos_token_id=eos, pad_token_id=None)
    assert ref.shape[1] == 10 + max(s0, s1) + 1 and (ref[:, 10:] == eos[0]).any()
    assert torch.equal(model.generate(idx, 16, eos_id=eos), ref)


def test_left_padded_beam_search_matches_transformers_with_an_even_beam_count(hf_dirs):
    """Each row's beams take that row's mask. With 2 rows and 3 beams a mask tiled row after
    row (instead of repeated per row) still gives each row's first beam, the one every beam
    grows from, its own mask; with 2 beams it gives row 1 row 0's mask."""
    path, hf = hf_dirs["llama"]
    model = Transformer.from_pretrained(path).eval()
    idx = _ids(2, 10, seed=3, vocab=256)
    mask = torch.ones_like(idx, dtype=torch.bool)
    mask[1, :4] = False
    ref = hf.generate(idx, attention_mask=mask.long(), max_new_tokens=8, do_sample=False,
                      num_beams=2, eos_token_id=None, pad_token_id=0)
    assert torch.equal(model.generate(idx, 8, num_beams=2, attention_mask=mask), ref)


def test_beam_search_fills_with_the_first_of_several_eos_ids_as_transformers_pads(hf_dirs):
    """Without pad_id a row whose best hypothesis ended early is filled with the first EOS id,
    transformers' pad default, also when another EOS id ended it."""
    path, hf = hf_dirs["llama"]
    model = Transformer.from_pretrained(path).eval()
    for seed in range(20):
        idx = _ids(2, 10, seed=seed, vocab=256)
        free = model.generate(idx, 8, num_beams=2)[:, 10:]
        first = next(t for t in range(3, 256) if t not in free)  # an id no row makes freely
        eos = [first, int(free[0, 1])]  # row 0's second token ends it
        ref = hf.generate(idx, attention_mask=torch.ones_like(idx), max_new_tokens=8,
                          do_sample=False, num_beams=2, eos_token_id=eos, pad_token_id=eos[0])
        if (ref[:, -1] == eos[0]).any():  # a row was filled
            break
    else:
        raise AssertionError("no prompt whose beam search fills a row")
    assert torch.equal(model.generate(idx, 8, num_beams=2, eos_id=eos), ref)


@pytest.mark.parametrize("family", ["gpt_bigcode", "llama"])
def test_full_context_prompt_continues_as_in_transformers(hf_dirs, family):
    """The last new token is never fed back, so T + max_new_tokens may be block_size + 1: a
    full-context prompt gets its next token, as transformers gives it."""
    path, hf = hf_dirs[family]
    model = Transformer.from_pretrained(path).eval()
    block = model.cfg.block_size
    for T, n in ((block, 1), (block - 10, 11)):
        idx = _ids(2, T, vocab=256)
        ref = _hf_generate(hf, idx, n)
        assert ref.shape == (2, block + 1)
        assert torch.equal(model.generate(idx, n), ref)
        assert torch.equal(model.generate(idx, n, num_beams=2),
                           _hf_generate(hf, idx, n, num_beams=2))
    with pytest.raises(ValueError, match=rf"prompt length {block + 1} exceeds the context"):
        model.generate(_ids(1, block + 1, vocab=256), 0)
    with pytest.raises(ValueError, match=rf"max_new_tokens 12 exceeds the context length "
                                         rf"block_size={block} \+ 1"):
        model.generate(_ids(1, block - 10, vocab=256), 12)


def test_sampling_filter_equals_transformers_warpers_with_ties():
    """top_p broke ties at the nucleus boundary the other way than transformers (which keeps the
    later ones): different kept sets for bf16 logits at nearly every step."""
    from transformers.generation.logits_process import (
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    from architecture import _sampling_logits

    g = torch.Generator().manual_seed(0)
    cases = [torch.ones(1, 4),  # all tied: top_p 0.5 keeps two of them
             torch.randint(0, 4, (64, 12), generator=g).float(),  # few values, many ties
             (3 * torch.randn(32, 4096, generator=g)).bfloat16(),  # bf16: ties in the tail
             torch.randn(32, 300, generator=g)]
    settings = [(1.0, None, 0.5), (0.7, None, 0.9), (1.3, 50, 0.8), (1.0, 3, 0.6),
                (1.0, None, 1.0), (0.5, 10, None), (2.0, None, 0.3)]
    for logits in cases:
        for temperature, top_k, top_p in settings:
            ref = TemperatureLogitsWarper(temperature)(None, logits.float())
            if top_k is not None:
                ref = TopKLogitsWarper(top_k)(None, ref)
            if top_p is not None and top_p < 1.0:
                ref = TopPLogitsWarper(top_p)(None, ref)
            got = _sampling_logits(logits, temperature, top_k, top_p)
            assert torch.equal(got, ref), (logits.shape, temperature, top_k, top_p)
    kept = _sampling_logits(torch.ones(1, 4), 1.0, None, 0.5).isfinite()
    assert kept.tolist() == [[False, False, True, True]]
    logits = 3 * torch.randn(4, 256, generator=g)
    for top_p in (1e-9, 1e-7):  # below every probability: the likeliest token is still kept
        kept = _sampling_logits(logits, 1.0, None, top_p).isfinite()
        assert torch.equal(kept, TopPLogitsWarper(top_p)(None, logits.clone()).isfinite())
        assert kept.sum(-1).tolist() == [1, 1, 1, 1]


@pytest.fixture(scope="module")
def hf_tokenizer(tmp_path_factory):
    """A GPT-2-style tokenizer (transformers' fast tokenizer) trained on a little code."""
    from tiny_hf import train_hf_tokenizer
    from transformers import PreTrainedTokenizerFast

    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    texts = [f"def f{i}(x, y):\n    return x * {i} + y - {i * i}  # ok\n" for i in range(300)]
    train_hf_tokenizer("gpt2", texts, path)
    return PreTrainedTokenizerFast(tokenizer_file=str(path))


def test_stop_given_alone_is_one_stop_as_in_transformers(hf_tokenizer, tmp_path):
    """A bare string was split into one stop per character; a bare id raised TypeError."""
    from tiny_hf import save_tiny_hf

    hft = hf_tokenizer
    hf = save_tiny_hf("llama", tmp_path, vocab_size=len(hft), initializer_range=0.2)
    model = Transformer.from_pretrained(tmp_path).eval()
    idx = _ids(1, 8, seed=1, vocab=len(hft))
    free = model.generate(idx, 30)[0, 8:].tolist()
    text = hft.decode(free)
    # a 3-character stop first seen late in the text, whose characters all occur before it
    # (and are whole characters: HF matches tokens, not a partial UTF-8 sequence's U+FFFD)
    at = next(i for i in range(len(text) // 2, len(text) - 3)
              if text[i:i + 3] not in text[:i + 2] and "\ufffd" not in text[i:i + 3]
              and all(c in text[:i] for c in text[i:i + 3]))
    stop = text[at:at + 3]
    ref = _hf_generate(hf, idx, 30, stop_strings=stop, tokenizer=hft)
    assert 8 < ref.shape[1] - 8 < 30
    assert torch.equal(model.generate(idx, 30, stop=stop, decode=hft.decode), ref)
    assert torch.equal(model.generate(idx, 30, stop=[stop], decode=hft.decode), ref)
    tok = free[10]  # a bare id is one stop id: for one row, what an EOS id does
    ref = _hf_generate(hf, idx, 30, eos_token_id=tok)
    assert torch.equal(model.generate(idx, 30, stop=tok), ref)
    assert torch.equal(model.generate(idx, 30, stop=torch.tensor(tok)), ref)
    for bad, message in [("", "stop: empty string"), ([""], "stop: empty string"),
                         ([[]], "stop: empty id sequence"), ([None], "stop: None is no stop"),
                         (2.5, "stop must be a string, an id, or a list"),
                         (b"ab", "stop must be a string, an id, or a list"),
                         ([2.5], "stop must be a token id or a sequence of ids")]:
        with pytest.raises(ValueError, match=message):
            model.generate(idx, 4, stop=bad, decode=hft.decode)


def test_a_stop_string_is_matched_in_the_generated_text_only(hf_tokenizer, tmp_path):
    """A stop made of the prompt's last character and the first new one ends no row (HF's
    stop_strings end it after one token): the documented difference, pinned."""
    from tiny_hf import save_tiny_hf

    hft = hf_tokenizer
    hf = save_tiny_hf("llama", tmp_path, vocab_size=len(hft), initializer_range=0.2)
    model = Transformer.from_pretrained(tmp_path).eval()
    for seed in range(40):
        idx = _ids(1, 8, seed=seed, vocab=len(hft))
        text = hft.decode(model.generate(idx, 12)[0, 8:].tolist())
        stop = hft.decode(idx[0].tolist())[-1:] + text[:1]
        if stop not in text and "\ufffd" not in stop:
            break
    else:
        raise AssertionError("no prompt whose end and continuation spell a new stop")
    ref = _hf_generate(hf, idx, 12, stop_strings=stop, tokenizer=hft)
    assert ref.shape[1] == 9
    assert model.generate(idx, 12, stop=stop, decode=hft.decode).shape[1] == 20


@pytest.mark.slow
def test_compiled_decode_matches_eager():
    model = _model("llama")
    for batch, length in ((2, 8), (3, 11)):  # a second shape must work too
        idx = _ids(batch, length)
        mask = torch.ones_like(idx, dtype=torch.bool)
        mask[0, :3] = False
        assert torch.equal(model.generate(idx, 10, attention_mask=mask, compile=True),
                           model.generate(idx, 10, attention_mask=mask))


def _compiled_batch1_decode(shape: str) -> None:
    from torch._inductor.utils import run_and_get_code

    model, idx = _model(shape), _ids(1, 7)
    out, code = run_and_get_code(model.generate, idx, 12, compile=True)
    assert torch.equal(out, model.generate(idx, 12))
    step_code = "\n".join(code)
    assert "def call(" in step_code  # the compiled step's code was captured
    # every Linear became a fused multiply-reduce: no call of a matmul kernel is left
    assert not re.search(r"(extern_kernels|aten)\.(add)?mm(\.default)?\(", step_code)


def test_compiled_batch1_decode_fuses_the_matmuls_and_matches_eager():
    _compiled_batch1_decode("phi")  # biases: the addmm path


def test_copies_and_pickles_leave_the_compiled_decode_step_behind():
    """The compiled step was kept on the instance: a deep copy decoded with the original's
    weights, and pickling failed after a compiled generate."""
    import copy
    import io
    import pickle

    model, idx = _model("phi"), _ids(1, 7)
    want = model.generate(idx, 12, compile=True)
    twin = copy.deepcopy(model)
    with torch.no_grad():  # the original now always picks token 5
        model.lm_head.bias[5] = 1e4
    assert torch.equal(twin.generate(idx, 12, compile=True), want)
    assert (model.generate(idx, 12, compile=True)[0, 7:] == 5).all()
    buf = io.BytesIO()
    torch.save(twin, buf)
    assert torch.equal(pickle.loads(pickle.dumps(twin)).generate(idx, 12), want)
    buf.seek(0)
    assert torch.equal(torch.load(buf, weights_only=False).generate(idx, 12), want)


@pytest.mark.slow
@pytest.mark.parametrize("shape", ["gpt_bigcode", "codegen", "llama"])
def test_compiled_batch1_decode_every_family(shape):
    _compiled_batch1_decode(shape)


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2),
                                        (torch.float64, 1e-12)])
def test_one_row_matmul_rewrite_equals_linear(dtype, tol):
    from architecture import _addmm_one_row, _mm_one_row

    g = torch.Generator().manual_seed(0)
    x, w, b = (torch.randn(*s, generator=g).to(dtype) for s in ((1, 96), (40, 96), (40,)))
    torch.testing.assert_close(_mm_one_row(x, w.t()), F.linear(x, w), atol=tol, rtol=tol)
    torch.testing.assert_close(_addmm_one_row(b, x, w.t()), F.linear(x, w, b), atol=tol, rtol=tol)
    assert _mm_one_row(torch.cat((x, x)), w.t()) is NotImplemented  # only batch-1 rows
    assert _addmm_one_row(b, x, w.t(), beta=2) is NotImplemented


@pytest.mark.slow
def test_torch_compile_training_step_matches_eager():
    model = _model("phi").train()
    compiled = torch.compile(model)
    idx, y = _ids(2, 32), _ids(2, 32, seed=1)
    F.cross_entropy(compiled(idx).flatten(0, 1), y.flatten()).backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    F.cross_entropy(model(idx).flatten(0, 1), y.flatten()).backward()
    for g, p in zip(grads, model.parameters()):
        assert (g - p.grad).abs().max().item() < 1e-5


# -------------------------------------------------------------------- init, dtype, training

def test_init_gpt2_style_and_xavier():
    cfg = PRESETS["llama-14m"]
    torch.manual_seed(0)
    model = Transformer(dataclasses.replace(cfg, n_layer=2))
    assert abs(model.blocks[0].attn.qkv.weight.std().item() - 0.02) < 1e-3
    assert abs(model.blocks[0].mlp.proj.weight.std().item() - 0.02 / 2) < 1e-3
    assert model.blocks[0].norm_1.weight.eq(1).all()
    xav = Transformer(dataclasses.replace(cfg, n_layer=2, init="xavier"))
    w = xav.blocks[0].mlp.gate.weight  # (1024, 384): bound sqrt(6 / (1024 + 384))
    assert abs(w.abs().max().item() - (6 / (1024 + 384)) ** 0.5) < 1e-3


def test_bf16_keeps_rope_frequencies_fp32():
    model = _model("llama").to(torch.bfloat16)
    assert model.rope.inv_freq.dtype == torch.float32
    ref = _model("llama")
    idx = _ids(2, 32)
    assert (model(idx).float() - ref(idx)).abs().max().item() < 0.02  # bf16 rounding: ~0.004


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
    from architecture import _split_rotated, _SplitRotatedFunction

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


def test_rmsnorm_backward_equals_autograd_of_the_composite():
    """The hand-written RMSNorm backward against torch's gradcheck and against autograd through
    F.rms_norm, with and without a trainable weight, and bf16 activations on fp32 weights."""
    from architecture import RMSNorm, _RMSNormFunction

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


def _unfused(hidden, labels, head, smoothing=0.0):
    logits = head(hidden.flatten(0, -2))
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    labels = labels.flatten()
    loss = F.cross_entropy(logits, labels, ignore_index=-100, label_smoothing=smoothing,
                           reduction="sum")
    return loss, ((logits.argmax(-1) == labels) & (labels != -100)).sum()


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_fused_head_loss_equals_cross_entropy_of_the_logits(bias, smoothing, monkeypatch):
    """Loss, correct count and the gradients of hidden, weight and bias against F.cross_entropy
    of the whole logits, in fp64, over chunks that do not divide the rows, with ignored rows."""
    import architecture

    monkeypatch.setattr(architecture, "_loss_chunk_rows", lambda vocab, device: 7)
    torch.manual_seed(0)
    head = torch.nn.Linear(12, 50, bias=bias).double()
    hidden = torch.randn(3, 10, 12, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 50, (3, 10))
    labels[0, :4] = -100
    labels[2, 9] = -100
    loss, correct = architecture.head_cross_entropy(hidden, labels, head, smoothing, True)
    loss.backward(torch.tensor(0.3, dtype=torch.float64))
    params = [hidden, head.weight] + ([head.bias] if bias else [])
    fused = [p.grad.clone() for p in params]
    for p in params:
        p.grad = None
    ref_loss, ref_correct = _unfused(hidden, labels, head, smoothing)
    (0.3 * ref_loss).backward()
    torch.testing.assert_close(loss, ref_loss, rtol=1e-12, atol=0)
    assert int(correct) == int(ref_correct) and not correct.requires_grad
    for got, p in zip(fused, params):
        torch.testing.assert_close(got, p.grad, rtol=1e-10, atol=1e-14)
    with torch.no_grad():  # the autograd-free path
        torch.testing.assert_close(architecture.head_cross_entropy(hidden, labels, head,
                                                                   smoothing)[0],
                                   ref_loss, rtol=1e-12, atol=0)


def test_fused_head_loss_never_forms_the_whole_logits():
    """The point of fusing: no op in the training step's loss outputs an (N, V) tensor."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from architecture import head_cross_entropy

    class Largest(TorchDispatchMode):
        numel = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(t, torch.Tensor):
                    Largest.numel = max(Largest.numel, t.numel())
            return out

    head = torch.nn.Linear(16, 8192)
    hidden = torch.randn(4, 512, 16, requires_grad=True)  # 2048 rows: 4 chunks of 512
    labels = torch.randint(0, 8192, (4, 512))
    with Largest():
        head_cross_entropy(hidden, labels, head)[0].backward()
    assert 0 < Largest.numel <= 2048 * 8192 // 4
    assert hidden.grad is not None and head.weight.grad is not None


def test_fused_head_loss_trains_a_tied_model_like_the_logits_loss():
    """Whole-model gradients (tied embedding + head, bias-free and biased heads) equal those of
    F.cross_entropy on the logits; a frozen head gets no gradient and costs no weight matmul."""
    from architecture import head_cross_entropy

    for shape in ("llama", "phi"):
        model = _model(shape).train()
        idx, labels = _ids(2, 24), _ids(2, 24, seed=1)
        labels[:, :5] = -100
        head_cross_entropy(model(idx, return_hidden=True), labels, model.lm_head)[0].backward()
        fused = {n: p.grad.clone() for n, p in model.named_parameters()}
        model.zero_grad()
        _unfused(model(idx, return_hidden=True), labels, model.lm_head)[0].backward()
        for n, p in model.named_parameters():
            torch.testing.assert_close(fused[n], p.grad, rtol=1e-4, atol=1e-6, msg=n)
    model.zero_grad()
    model.lm_head.requires_grad_(False)
    head_cross_entropy(model(idx, return_hidden=True), labels, model.lm_head)[0].backward()
    assert model.lm_head.weight.grad is None and model.norm_f.weight.grad is not None


def test_head_loss_under_bf16_autocast_and_other_heads(monkeypatch):
    """bf16 autocast runs the matmuls in bf16 with fp32 gradients out, as accurate as the
    unfused head's over four chunks; a head that is not a plain nn.Linear (a LoRA-wrapped one)
    is called as a module, unfused."""
    import architecture
    from architecture import head_cross_entropy

    monkeypatch.setattr(architecture, "_loss_chunk_rows", lambda vocab, device: 16)
    torch.manual_seed(0)
    head = torch.nn.Linear(32, 300)
    hidden = torch.randn(64, 32, requires_grad=True)
    labels = torch.randint(0, 300, (64,))
    with torch.autocast("cpu", torch.bfloat16):
        loss = head_cross_entropy(hidden, labels, head)[0]
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
    torch.testing.assert_close(head_cross_entropy(hidden, labels, doubled)[0],
                               _unfused(hidden, labels, lambda h: 2 * head(h))[0])


def test_head_loss_under_fp16_autocast_forms_gradients_at_the_loss_scale():
    """fp16 autocast: given the scale its backward will see (the loss scaler's), the fused head
    forms the gradients the unfused fp16 head forms, overflows where that overflows (so the
    scaler's backoff works the same), and without the scale runs unfused."""
    from architecture import head_cross_entropy

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
                loss = head_cross_entropy(hidden, labels, head, grad_scale=torch.tensor(scale))[0]
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
        loss = head_cross_entropy(hidden, labels, head)[0]
        assert type(loss.grad_fn).__name__ != "_HeadCrossEntropyFunctionBackward"
        with torch.no_grad():  # no gradients, no scale needed: fused
            torch.testing.assert_close(head_cross_entropy(hidden, labels, head)[0], loss)
    fused = "_HeadCrossEntropyFunctionBackward"  # fp16 tensors without autocast: the same rule
    half, hidden16 = head.half(), hidden.detach().half().requires_grad_()
    assert type(head_cross_entropy(hidden16, labels, half)[0].grad_fn).__name__ != fused
    assert type(head_cross_entropy(hidden16, labels, half, grad_scale=8.0)[0].grad_fn).__name__ \
        == fused


def test_head_loss_errors():
    from architecture import head_cross_entropy

    head = torch.nn.Linear(8, 20)
    with pytest.raises(ValueError, match="label 20 is outside the vocabulary"):
        head_cross_entropy(torch.randn(3, 8), torch.tensor([1, 20, -100]), head)
    with pytest.raises(ValueError, match="label -5 is outside"):
        head_cross_entropy(torch.randn(3, 8), torch.tensor([1, -5, -100]), head)
    hidden, labels = torch.randn(2, 4, 8), torch.randint(0, 20, (2, 4))
    for smoothing in (2.0, -1.0):  # the fused head returned a loss; F.cross_entropy refuses 2.0
        with pytest.raises(ValueError, match=rf"label_smoothing must be in \[0, 1\], got "
                                             rf"{smoothing}"):
            head_cross_entropy(hidden, labels, head, label_smoothing=smoothing)
    # Transposed labels of the same size were flattened into mismatched pairs, silently.
    with pytest.raises(ValueError, match=re.escape("labels shape (4, 2) must equal hidden's "
                                                   "leading shape (2, 4)")):
        head_cross_entropy(hidden, labels.t(), head)
    with pytest.raises(ValueError, match="labels shape \\(2, 3\\) must equal"):
        head_cross_entropy(hidden, labels[:, :3], head)
    with pytest.raises(ValueError, match="labels must be token ids in a torch.long tensor, got "
                                         "torch.float32"):
        head_cross_entropy(hidden, labels.float(), head)
    with pytest.raises(ValueError, match="hidden has 20 features, the head takes 8 \\(logits "
                                         "passed as hidden\\?\\)"):
        head_cross_entropy(head(hidden), labels, head)
    loss = head_cross_entropy(torch.randn(3, 8, requires_grad=True), torch.tensor([1, 2, 3]),
                              head)[0]
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="one backward per forward"):
        loss.backward()


def test_gradient_checkpointing_same_gradients_fraction_of_the_saved_activations():
    """Checkpointed blocks give the same gradients (dropout masks replayed on recompute) while
    autograd stores only what lies outside the blocks."""
    from architecture import head_cross_entropy

    cfg = dataclasses.replace(SHAPES["llama"], n_layer=4, dropout=0.1)
    torch.manual_seed(0)
    model = Transformer(cfg).train()
    idx, labels = _ids(2, 32), _ids(2, 32, seed=1)
    grads, saved = [], []
    for on in (False, True):
        model.gradient_checkpointing = on
        model.zero_grad()
        nbytes = [0]

        def pack(t, nbytes=nbytes):
            nbytes[0] += t.numel() * t.element_size()
            return t

        torch.manual_seed(1)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = head_cross_entropy(model(idx, return_hidden=True), labels, model.lm_head)[0]
        loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
        saved.append(nbytes[0])
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], rtol=1e-5, atol=1e-7, msg=n)
    assert saved[1] < saved[0] / 10, saved


def test_dropout_only_in_training():
    cfg = dataclasses.replace(SHAPES["gpt_bigcode"], dropout=0.2, attn_dropout=0.2)
    model = Transformer(cfg)
    idx = _ids(2, 16)
    model.train()
    assert not torch.equal(model(idx), model(idx))
    model.eval()
    assert torch.equal(model(idx), model(idx))


def test_embeddings_take_their_own_dropout_else_the_residual_one(monkeypatch):
    """embd_dropout (Phi-2: embd_pdrop 0.0 beside resid_pdrop 0.1) drops the embeddings, dropout
    the residual branches; embd_dropout None follows dropout, read live (the embeddings took
    dropout's p whatever the config said)."""
    import architecture

    calls = []
    monkeypatch.setattr(architecture, "dropout", lambda x, p, training: calls.append(p) or x)
    model = Transformer(dataclasses.replace(SHAPES["phi"], dropout=0.1, embd_dropout=0.0)).train()
    model(_ids(1, 8))
    assert calls == [0.0] + [0.1] * 2 * model.cfg.n_layer
    calls.clear()
    model.cfg.embd_dropout = None
    model.cfg.dropout = 0.2
    model(_ids(1, 8))
    assert calls == [0.2] * (1 + 2 * model.cfg.n_layer)


@pytest.mark.parametrize("preset", ["tiny"])
def test_overfits_one_batch(preset):
    """Shapes (batch, time) all the way through: a tiny model memorises two sequences."""
    torch.manual_seed(0)
    model = Transformer(dataclasses.replace(PRESETS[preset], vocab_size=64)).train()
    data = torch.randint(0, 64, (2, 33))
    x, y = data[:, :-1], data[:, 1:]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(80):
        loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.05
    model.eval()
    assert torch.equal(model.generate(x[:, :1], 32), data[:, :33])


def test_head_loss_takes_full_label_smoothing_as_torch_and_refuses_a_string():
    """label_smoothing is in [0, 1] as F.cross_entropy takes it (1.0 included); a string is the
    ValueError naming it, not a TypeError from the comparison."""
    from architecture import head_cross_entropy

    head = torch.nn.Linear(8, 20)
    hidden, labels = torch.randn(2, 4, 8), torch.randint(0, 20, (2, 4))
    labels[0, 1] = -100
    loss = head_cross_entropy(hidden, labels, head, label_smoothing=1.0)[0]
    ref = F.cross_entropy(head(hidden).flatten(0, 1), labels.flatten(), label_smoothing=1.0,
                          reduction="sum")  # (the head's loss is the sum)
    torch.testing.assert_close(loss, ref)
    with pytest.raises(ValueError, match=r"label_smoothing must be in \[0, 1\], got '0.1'"):
        head_cross_entropy(hidden, labels, head, label_smoothing="0.1")


def test_presets_table_rows_show_each_presets_sizes(capsys):
    """`python architecture.py`: each row's columns are its preset's fields, heads beside KV
    heads and the MLP width beside its kind; an unknown preset name is argparse's usage error."""
    import architecture

    assert architecture.main([]) == 0
    header, _, *rows = capsys.readouterr().out.splitlines()
    assert [c.strip() for c in header.strip("|").split("|")] == [
        "preset", "family", "layers", "width", "heads (kv)", "MLP", "context", "vocab",
        "parameters"]
    for row, (name, c) in zip(rows, PRESETS.items(), strict=True):
        cells = [cell.strip() for cell in row.strip("|").split("|")]
        assert cells[:-1] == [name, c.family, str(c.n_layer), str(c.n_embd),
                              f"{c.n_head} ({c.n_kv_head})", f"{c.mlp_hidden} ({c.mlp})",
                              str(c.block_size), str(c.vocab_size)]
    with pytest.raises(SystemExit) as e:
        architecture.main(["llama-3.2-1B"])
    assert e.value.code == 2 and "invalid choice: 'llama-3.2-1B'" in capsys.readouterr().err


def test_a_ctrl_c_while_the_presets_table_is_built_is_one_line(capsys, monkeypatch):
    """`python architecture.py` builds every preset for its count: a Ctrl-C there was a
    KeyboardInterrupt traceback from inside torch, not run_tool's line and 130 (contracts)."""
    import architecture

    def interrupted():
        raise KeyboardInterrupt

    monkeypatch.setattr(architecture, "presets_table", interrupted)
    assert architecture.main([]) == 130
    assert capsys.readouterr() == ("", "interrupted\n")


# ------------------------------------------------------- paths the tests above left unrun

@pytest.mark.parametrize("family", ["gpt_bigcode", "phi", "llama"])  # wpe + tied; untied; tied
def test_num_parameters_counts_as_transformers_does(tmp_path, family):
    """num_parameters(exclude_embeddings=True) leaves out wte (a tied head with it) and wpe, as
    transformers' num_parameters leaves out its embedding modules."""
    from tiny_hf import save_tiny_hf

    hf = save_tiny_hf(family, tmp_path)
    model = Transformer.from_pretrained(tmp_path)
    for exclude in (False, True):
        assert model.num_parameters(exclude) == hf.num_parameters(exclude_embeddings=exclude)


def test_a_head_that_is_no_plain_linear_counts_correct_tokens_as_the_logits_say():
    """A LoRA or quantized lm_head takes the unfused path: its loss and correct count are the
    whole logits' (count_correct there was never run)."""
    import architecture

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
    loss, correct = architecture.head_cross_entropy(hidden, labels, head, 0.0, True)
    ref_loss, ref_correct = _unfused(hidden, labels, linear, 0.0)
    torch.testing.assert_close(loss.double(), ref_loss, rtol=1e-6, atol=0)  # fp32 logits
    assert int(correct) == int(ref_correct) >= 10
    assert architecture.head_cross_entropy(hidden, labels, head)[1] is None


def test_zero_new_tokens_return_the_prompt_and_bad_beams_or_masks_are_refused():
    model = _model("llama")
    idx = _ids(2, 5)
    for beams in (1, 3):
        assert torch.equal(model.generate(idx, 0, num_beams=beams), idx)
        assert torch.equal(model.generate(idx, 0, num_beams=beams, eos_id=4), idx)
    for beams in (0, -1):
        with pytest.raises(ValueError, match=f"num_beams must be >= 1, got {beams}"):
            model.generate(idx, 3, num_beams=beams)
    with pytest.raises(ValueError, match=r"attention_mask shape \(2, 4\) != input_ids shape "
                                         r"\(2, 5\)"):
        model(idx, attention_mask=torch.ones(2, 4, dtype=torch.bool))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("shape", ["llama", "gpt_bigcode"])
def test_cuda_graph_decode_equals_eager_and_keeps_its_caches(shape):
    """On CUDA the compiled decode step is a CUDA graph over caches kept between calls: its
    tokens equal eager decoding for prompts of several lengths, a left-padded batch and EOS
    stops, and a second call of the same cache length reuses the caches (no new recording)."""
    model = _model(shape).cuda()
    for batch, length, new in ((1, 9, 20), (1, 30, 12), (2, 17, 24)):
        idx = _ids(batch, length, seed=length).cuda()
        mask = torch.ones_like(idx)
        mask[0, :batch * 3] = 0  # row 0 left-padded in the batch of two
        eager = model.generate(idx, new, attention_mask=mask, eos_id=5)
        graphed = model.generate(idx, new, attention_mask=mask, eos_id=5, compile=True)
        assert torch.equal(graphed, eager), (batch, length)
        held = model._held_caches
        assert held[0][0].shape[2] % 256 == 0
        assert torch.equal(model.generate(idx, new, attention_mask=mask, eos_id=5,
                                          compile=True), eager)
        assert model._held_caches is held
    import copy

    assert "_held_caches" not in copy.deepcopy(model).__dict__  # a copy decodes with its own
    idx = _ids(1, 9).cuda()
    stream = model.stream(idx, 8, compile=True)
    next(stream)  # an unfinished stream holds the caches: a second generation is refused
    with pytest.raises(RuntimeError, match="already running on this model"):
        model.generate(idx, 8, compile=True)
    stream.close()
    assert torch.equal(model.generate(idx, 8, compile=True), model.generate(idx, 8))


def test_a_second_graph_decode_on_one_model_is_refused_until_the_first_ends():
    """The CUDA-graph caches are the model's, one set: while a compiled generation holds them a
    second one is refused (it would overwrite the first's keys and values); a copy is free."""
    import copy

    model = _model("llama")
    model._graph_caches(1, 256)
    with pytest.raises(RuntimeError, match=r"already running on this model \(an unfinished "
                                           r"stream\?\): exhaust or close it first"):
        model._graph_caches(1, 256)
    copy.deepcopy(model)._graph_caches(1, 256)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_training_rmsnorm_is_the_hand_written_one_in_torchs_kernels():
    """On CUDA an fp32 RMSNorm under autograd runs torch's fused F.rms_norm (13% faster a bf16
    training step): its output and gradients are the CPU path's hand-written function's."""
    from architecture import RMSNorm, _RMSNormFunction

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
