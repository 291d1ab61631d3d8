"""The model on its own: config checks, module paths, padding, the loss, init, dtype, and that
it can learn (transformers parity of the loaded families is in test_pretrained.py; generation
in test_generation.py; the kernels against their plain ops in test_kernels.py)."""

import dataclasses
import json

import pytest
import torch
import torch.nn.functional as F

from architecture import IGNORE_INDEX, PRESETS, ModelConfig, Transformer
from codelm.models import pretrained
from codelm.models.generation import GenerationConfig, generate, stream

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


def gen(model, idx, max_new_tokens, attention_mask=None, **kw):
    """generate with GenerationConfig's fields as keywords."""
    return generate(model, idx, GenerationConfig(max_new_tokens, **kw), attention_mask)


def gen_stream(model, idx, max_new_tokens, attention_mask=None, **kw):
    return stream(model, idx, GenerationConfig(max_new_tokens, **kw), attention_mask)



@pytest.mark.parametrize("change, message", [
    (dict(norm="batchnorm"), r"ModelConfig.norm='batchnorm'"),
    (dict(n_head=6, n_kv_head=4), r"n_kv_head=4: must divide n_head=6"),
    (dict(rotary_dim=7), r"rotary_dim=7: must be even"),
    (dict(n_embd=100, n_head=6), r"n_embd=100: not divisible by n_head=6"),
    (dict(rope_scaling={"factor": 8.0}), r"rope_scaling.*rope_type must be one of"),
    (dict(init="kaiming"), r"ModelConfig.init='kaiming'"),
    (dict(dropout=1.5), r"dropout=1.5: must be in"),
    (dict(embd_dropout=-0.1), r"embd_dropout=-0.1: must be in"),
    (dict(rotary_dim=0), r"ModelConfig.rotary_dim=0: must be a positive integer"),
    # A torch traceback from nn.init.normal_ / a silent division by zero in the norm.
    (dict(init_std=-1.0), r"ModelConfig.init_std=-1.0: must be > 0"),
    (dict(norm_eps=0.0), r"ModelConfig.norm_eps=0.0: must be > 0"),
    # A head_dim changed under a preset's rotary_dim is head_dim's error, not rotary_dim's.
    (dict(head_dim=8, rotary_dim=16), r"ModelConfig.head_dim=8: smaller than rotary_dim=16"),
    (dict(n_embd=42, n_head=6), r"ModelConfig.head_dim=7: must be even"),
    # inf frequencies (or NaN) for every rotated pair but the first, and finite logits.
    (dict(rope_theta=0.0), r"ModelConfig.rope_theta=0.0: must be > 0 and finite"),
    (dict(rope_theta=-1e4), r"ModelConfig.rope_theta=-10000.0: must be > 0"),
    (dict(rope_theta=float("nan")), r"ModelConfig.rope_theta=nan: must be > 0"),
    # inf: every rotated pair but the first never turns (positions silently ignored); an inf
    # norm_eps zeroes every normalized activation.
    (dict(rope_theta=float("inf")), r"ModelConfig.rope_theta=inf: must be > 0 and finite"),
    (dict(norm_eps=float("inf")), r"ModelConfig.norm_eps=inf: must be > 0 and finite"),
    # a parallel block has one shared norm and no place for Gemma 2's output norms
    (dict(post_norms=True, parallel_residual=True), r"post_norms=True: needs sequential"),
])
def test_config_rejects_bad_values(change, message):
    """Each impossible ModelConfig value is a ValueError naming the field and the rule it breaks,
    at construction, before a model is built from it."""
    with pytest.raises(ValueError, match=message):
        ModelConfig(**change)


@pytest.mark.parametrize("kernels_on", [True, False])
def test_ids_the_model_cannot_read_are_a_value_error_naming_them(kernels_on, monkeypatch):
    """Float ids, an id past the vocabulary and a negative target other than IGNORE_INDEX are
    refused in one line, the fused loss and torch's alike: the fused head would count a target
    of -5 as a token."""
    from codelm import kernels

    monkeypatch.setattr(kernels, "ENABLED", kernels_on)
    torch.manual_seed(0)
    model = Transformer(dataclasses.replace(PRESETS["tiny"], vocab_size=64))
    ids = torch.randint(64, (2, 8))
    targets = ids.clone()
    targets[0, :3] = IGNORE_INDEX
    assert torch.isfinite(model(ids, targets))  # IGNORE_INDEX counts nothing
    with pytest.raises(ValueError, match=r"^idx: token ids are int64 or int32.*torch.float32"):
        model(ids.float())
    with pytest.raises(ValueError, match=r"^idx: token ids are int64 or int32.*torch.uint8"):
        model(ids.to(torch.uint8))  # the embedding takes int64 and int32 ids only
    with pytest.raises(ValueError, match=r"^targets: token ids are int64 or int32.*torch.int16"):
        model(ids, targets.to(torch.int16))
    with pytest.raises(ValueError, match=r"^idx: ids from \d+ to 70, outside .*\[0, 64\)"):
        model(torch.cat([ids, torch.tensor([[70] * 8])]))
    targets[1, 0] = -5
    with pytest.raises(ValueError, match=r"^targets: ids from -5 to \d+ besides IGNORE_INDEX"):
        model(ids, targets)


def test_config_eos_id_may_be_one_id_or_a_list():
    """eos_id keeps one id or a list of ids as given (Llama-3 chat models end on several)."""
    assert ModelConfig(eos_id=[5, 2]).eos_id == [5, 2] and ModelConfig(eos_id=5).eos_id == 5


def test_model_owns_a_deep_copy_of_its_config():
    """Transformer(PRESETS[...]) holds a copy of the preset: a change to one model's config (its
    live dropout) reaches neither the preset nor any other model built from it."""
    preset = PRESETS["tiny"]
    a, b = Transformer(preset), Transformer(preset)
    a.cfg.dropout = 0.3
    assert a.blocks[0].cfg is a.cfg and a.rope.cfg is a.cfg  # the modules read it live
    assert b.cfg.dropout == preset.dropout == 0.0 and b.cfg is not preset
    llama = Transformer(SHAPES["llama"])
    llama.cfg.rope_scaling["factor"] = 1.0
    assert SHAPES["llama"].rope_scaling["factor"] == 32.0


def test_odd_head_dim_is_fine_without_rotary_embeddings():
    """An odd head_dim (7) is allowed with learned positions: the even-size rule is rotary's
    alone."""
    assert ModelConfig(n_embd=42, n_head=6, positions="learned").head_dim == 7


def test_contract_module_paths():
    """The module paths and shapes docs/contracts.md lists (blocks[i].attn.qkv rows [Q | K | V],
    attn.proj, mlp.fc/gate/proj, a tied lm_head, wpe where positions are learned) hold: LoRA,
    quantization and optimizers address them."""
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
    """Pad tokens after a sequence change none of its logits without a mask: causal attention keeps
    the real positions from seeing them."""
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


def test_int32_ids_give_the_logits_of_long_ids():
    """int32 token ids give exactly the logits of int64 ones."""
    model, ids = _model("llama"), _ids(2, 5)
    assert torch.equal(model(ids.int()), model(ids))


@pytest.mark.slow  # dynamo's first trace: ~15 s
def test_forward_compiles_as_one_graph():
    """The forward traces with fullgraph=True (no graph break) and gives the eager logits."""
    model, ids = _model("llama"), _ids(2, 5)
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    torch.testing.assert_close(compiled(ids), model(ids))


@pytest.mark.slow
def test_torch_compile_training_step_matches_eager():
    """A torch.compile'd training step gives the eager gradients within 1e-5."""
    model = _model("phi").train()
    compiled = torch.compile(model)
    idx, y = _ids(2, 32), _ids(2, 32, seed=1)
    F.cross_entropy(compiled(idx).flatten(0, 1), y.flatten()).backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    F.cross_entropy(model(idx).flatten(0, 1), y.flatten()).backward()
    for g, p in zip(grads, model.parameters()):
        assert (g - p.grad).abs().max().item() < 1e-5


def test_init_gpt2_style_and_xavier():
    """The default init is GPT-2's: N(0, 0.02), residual projections scaled by 1/sqrt(2 n_layer),
    norm weights 1; init="xavier" is uniform within sqrt(6 / (fan_in + fan_out))."""
    cfg = PRESETS["llama-14m"]
    torch.manual_seed(0)
    model = Transformer(dataclasses.replace(cfg, n_layer=2))
    assert abs(model.blocks[0].attn.qkv.weight.std().item() - 0.02) < 1e-3
    assert abs(model.blocks[0].mlp.proj.weight.std().item() - 0.02 / 2) < 1e-3
    assert model.blocks[0].norm_1.weight.eq(1).all()
    xav = Transformer(dataclasses.replace(cfg, n_layer=2, init="xavier"))
    w = xav.blocks[0].mlp.gate.weight  # (1024, 384): bound sqrt(6 / (1024 + 384))
    assert abs(w.abs().max().item() - (6 / (1024 + 384)) ** 0.5) < 1e-3


def test_a_model_built_on_meta_and_materialized_has_its_rope_tables():
    """Built on the meta device (shapes only) and moved by `to_empty`, the model computes its
    rope frequencies and tables where it lands: its logits are those of the model built there."""
    ref = _model("llama")
    with torch.device("meta"):
        model = Transformer(ref.cfg)
    model = model.to_empty(device="cpu")
    model.load_state_dict(ref.state_dict())
    assert torch.equal(model.rope.tables, ref.rope.tables)
    idx = _ids(2, 16)
    torch.testing.assert_close(model(idx), ref(idx), rtol=0, atol=0)


def test_bf16_keeps_rope_frequencies_fp32():
    """The inverse frequencies and the cos/sin tables stay fp32 through `.to(bfloat16)`, and the
    tables are the cos and sin of each position's angles, one row per position of the context."""
    model = _model("llama").to(torch.bfloat16)
    assert model.rope.inv_freq.dtype == model.rope.tables.dtype == torch.float32
    angles = torch.arange(model.cfg.block_size)[:, None].double() * model.rope.inv_freq.double()
    torch.testing.assert_close(model.rope.tables.double(),
                               torch.stack((angles.cos(), angles.sin())), atol=1e-6, rtol=0)
    ref = _model("llama")
    idx = _ids(2, 32)
    assert (model(idx).float() - ref(idx)).abs().max().item() < 0.02  # bf16 rounding: ~0.004


# ------------------------------------------------------------------------------- the loss

def test_loss_is_cross_entropy_of_the_logits_with_smoothing_and_masks():
    """forward(idx, targets): the mean (or sum) over counted tokens of F.cross_entropy of the
    logits, label smoothing spread over counted tokens only; count_correct counts the top-1."""
    model = _model("phi")
    idx, labels = _ids(2, 12), _ids(2, 12, seed=1)
    labels[0, :3] = IGNORE_INDEX
    labels[1, 11] = IGNORE_INDEX
    logits = model(idx).detach()
    keep = labels != IGNORE_INDEX
    for eps in (0.0, 0.1):
        ref = F.cross_entropy(logits[keep], labels[keep], label_smoothing=eps, reduction="sum")
        torch.testing.assert_close(model(idx, labels, reduction="sum", label_smoothing=eps), ref)
        torch.testing.assert_close(model(idx, labels, label_smoothing=eps),
                                   ref / int(keep.sum()))
    loss, correct = model(idx, labels, reduction="sum", count_correct=True)
    torch.testing.assert_close(loss, model(idx, labels, reduction="sum"))
    assert int(correct) == int((logits.argmax(-1)[keep] == labels[keep]).sum())


@pytest.mark.parametrize("cap", [None, 30.0])  # the fused head loss; the plain one (soft cap)
def test_int32_targets_give_the_loss_of_long_targets(cap):
    """int32 targets are token ids as int32 idx are: the loss, smoothed or not, and the correct
    count are those of int64 targets, on the fused head loss and on the plain one that a soft
    cap (Gemma 2) runs."""
    model = Transformer(dataclasses.replace(PRESETS["tiny"], logit_softcap=cap)).eval()
    idx, labels = _ids(2, 12), _ids(2, 12, seed=1)
    labels[0, :3] = IGNORE_INDEX
    for eps in (0.0, 0.1):
        loss, correct = model(idx, labels, label_smoothing=eps, count_correct=True)
        loss32, correct32 = model(idx.int(), labels.int(), label_smoothing=eps,
                                  count_correct=True)
        torch.testing.assert_close(loss32, loss)
        assert int(correct32) == int(correct)



def test_a_soft_capped_models_loss_and_token_log_probs_are_those_of_its_capped_logits():
    """With logit_softcap (Gemma 2's final cap, its logits checked against transformers in
    test_families.py) the loss is F.cross_entropy of the capped logits and token_logps their
    log_softmax: a cap of 0.1 moves both away from those of the uncapped logits."""
    cfg = dataclasses.replace(PRESETS["tiny"], logit_softcap=0.1)
    torch.manual_seed(0)
    model = Transformer(cfg).eval()
    uncapped = Transformer(dataclasses.replace(cfg, logit_softcap=None)).eval()
    uncapped.load_state_dict(model.state_dict())
    idx, labels = _ids(2, 12), _ids(2, 12, seed=1)
    labels[0, :3] = IGNORE_INDEX
    keep = labels != IGNORE_INDEX
    with torch.no_grad():
        logits = model(idx)
        loss = model(idx, labels, reduction="sum")
        logps = model(idx, labels, token_logps=True)
    assert logits.abs().max() <= 0.1
    ref = F.cross_entropy(logits[keep], labels[keep], reduction="sum")
    torch.testing.assert_close(loss, ref)
    picked = logits.log_softmax(-1).gather(-1, labels.clamp(min=0)[..., None])[..., 0]
    torch.testing.assert_close(logps, picked * keep)
    with torch.no_grad():
        assert abs(float(uncapped(idx, labels, reduction="sum") - loss)) > 0.1
        assert (uncapped(idx, labels, token_logps=True) - logps).abs().max() > 0.1

def test_the_head_loss_ignores_masked_positions():
    """Masked (prompt) positions cannot move the loss or receive gradient, smoothing included."""
    from architecture import head_loss

    torch.manual_seed(0)
    head = torch.nn.Linear(8, 64)
    labels = torch.randint(0, 64, (1, 18))
    labels[:, :12] = IGNORE_INDEX
    hidden = torch.randn(1, 18, 8, requires_grad=True)
    changed = hidden.detach().clone()
    changed[labels == IGNORE_INDEX] += 5 * torch.randn_like(changed[labels == IGNORE_INDEX])
    for eps in (0.0, 0.1):
        assert torch.equal(head_loss(hidden, head, labels, eps)[0],
                           head_loss(changed, head, labels, eps)[0])
    head_loss(hidden, head, labels, 0.1)[0].backward()
    assert hidden.grad[labels == IGNORE_INDEX].abs().max() == 0
    assert hidden.grad[labels != IGNORE_INDEX].abs().max() > 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_offloaded_activations_leave_the_gpu_and_give_the_same_gradients():
    """With gradient checkpointing and offload_activations the blocks' saved inputs wait in host
    memory: the GPU holds less between forward and backward, the gradients are the same."""
    cfg = dataclasses.replace(SHAPES["llama"], n_layer=4, dropout=0.1, block_size=256)
    torch.manual_seed(0)
    model = Transformer(cfg).cuda().train()
    model.gradient_checkpointing = True
    idx, labels = _ids(2, 256).cuda(), _ids(2, 256, seed=1).cuda()
    grads, held = [], []
    for offload in (False, True):
        model.offload_activations = offload
        model.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.manual_seed(1)
        loss = model(idx, labels, reduction="sum")
        torch.cuda.synchronize()
        held.append(torch.cuda.memory_allocated() - before)
        loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], rtol=1e-5, atol=1e-6, msg=n)
    block_input = idx.numel() * cfg.n_embd * 4
    assert held[0] - held[1] >= (cfg.n_layer - 1) * block_input, held


def test_loss_refuses_targets_that_do_not_fit_idx():
    """A transposed (time, batch) batch of the same size is a ValueError naming both shapes,
    never a wrong loss or wrong log-probs (the GRPO and preference losses read token_logps);
    so are ids that are not (batch, time) and a reduction the loss does not compute."""
    model, idx = _model("llama"), _ids(2, 7)
    for options in ({}, {"reduction": "sum"}, {"token_logps": True}):
        with pytest.raises(ValueError, match=r"targets: shape \(7, 2\), not idx's .* \(2, 7\)"):
            model(idx, idx.t(), **options)
    with pytest.raises(ValueError, match=r"idx: .*\(batch, time\), got shape \(7,\)"):
        model(idx[0])
    with pytest.raises(ValueError, match="reduction 'none'"):
        model(idx, idx, reduction="none")


def test_gradient_checkpointing_same_gradients_fraction_of_the_saved_activations():
    """Checkpointed blocks give the same gradients (dropout masks replayed on recompute) while
    autograd stores only what lies outside the blocks."""
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
            loss = model(idx, labels, reduction="sum")
        loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
        saved.append(nbytes[0])
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], rtol=1e-5, atol=1e-7, msg=n)
    assert saved[1] < saved[0] / 10, saved


def test_dropout_only_in_training():
    """Dropout (residual and attention) makes two training forwards differ and leaves eval forwards
    identical."""
    cfg = dataclasses.replace(SHAPES["gpt_bigcode"], dropout=0.2, attn_dropout=0.2)
    model = Transformer(cfg)
    idx = _ids(2, 16)
    model.train()
    assert not torch.equal(model(idx), model(idx))
    model.eval()
    assert torch.equal(model(idx), model(idx))


def test_embeddings_take_their_own_dropout_else_the_residual_one(monkeypatch):
    """embd_dropout (Phi-2: embd_pdrop 0.0 beside resid_pdrop 0.1) drops the embeddings, dropout
    the residual branches; embd_dropout None follows dropout, read live (a set embd_dropout is
    never overridden by dropout's p)."""
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
    assert torch.equal(gen(model, x[:, :1], 32), data[:, :33])


def test_presets_table_rows_show_each_presets_sizes(capsys):
    """`python architecture.py`: each row's columns are its preset's fields, heads beside KV
    heads and the MLP width beside its kind; an unknown preset name is argparse's one-line error."""
    import architecture

    assert architecture.main([]) == 0
    header, _, *rows = capsys.readouterr().out.splitlines()
    assert [c.strip() for c in header.strip("|").split("|")] == [
        "preset", "family", "layers", "width", "heads (kv)", "MLP", "context", "vocab",
        "parameters"]
    for row, (name, c) in zip(rows[:len(PRESETS)], PRESETS.items(), strict=True):
        cells = [cell.strip() for cell in row.strip("|").split("|")]
        vocab = architecture.DEFAULT_RUN_VOCAB if name in architecture.FROM_SCRATCH else c.vocab_size
        assert cells[:-1] == [name, c.family, str(c.n_layer), str(c.n_embd),
                              f"{c.n_head} ({c.n_kv_head})", f"{c.mlp_hidden} ({c.mlp})",
                              str(c.block_size), str(vocab)]
    with pytest.raises(SystemExit) as e:
        architecture.main(["llama-3.2-1B"])
    assert e.value.code == 2 and "invalid choice: 'llama-3.2-1B'" in capsys.readouterr().err


def test_the_presets_table_counts_from_scratch_presets_at_the_default_runs_vocabulary(capsys):
    """A from-scratch preset takes its run's tokenizer's vocabulary: the table counts it at the
    default run's (a CodeTokenizer's specials and bytes, and tokenizer_max_vocab pieces), which
    the run's own announcement reaches, or at --vocab-size; it says which vocabulary it used."""
    import architecture
    from codelm.trainconfig import TrainConfig
    from tokenizer import CODE_SPECIAL_TOKENS

    assert architecture.DEFAULT_RUN_VOCAB == (len(CODE_SPECIAL_TOKENS) + 256
                                              + TrainConfig().tokenizer_max_vocab)
    assert architecture.main([]) == 0
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines() if line.startswith("| code-3x128 |"))
    assert row.endswith("| 4262 | 1,148,544 |")  # 1.15M, as a default run announces it
    assert "4262" in out.split("| llama-60m |")[1] and "tied" in out  # the count's definition
    assert architecture.main(["--vocab-size", "8192"]) == 0
    out = capsys.readouterr().out
    assert "| code-3x128 |" in out and out.count("| 8192 | 1,651,584 |") == 1
    published = next(row for row in out.splitlines() if row.startswith("| starcoderbase-1b |"))
    assert "| 49152 | 1,137,207,296 |" in published  # a checkpoint's own vocabulary
    for name, vocab in (("code-3x128", 8192), ("starcoderbase-1b", 49152)):  # one preset: alike
        assert architecture.main([name, "--vocab-size", "8192"]) == 0
        assert json.loads(capsys.readouterr().out)["vocab_size"] == vocab


def test_a_ctrl_c_while_the_presets_table_is_built_is_one_line(capsys, monkeypatch):
    """`python architecture.py` builds every preset for its count: a Ctrl-C there is run_tool's
    line and 130 (contracts), not a KeyboardInterrupt traceback from inside torch."""
    import architecture

    def interrupted(scratch_vocab):
        raise KeyboardInterrupt

    monkeypatch.setattr(architecture, "presets_table", interrupted)
    assert architecture.main([]) == 130
    assert capsys.readouterr() == ("", "interrupted\n")


@pytest.mark.parametrize("family", ["gpt_bigcode", "phi", "llama"])  # wpe + tied; untied; tied
def test_num_parameters_counts_as_transformers_does(tmp_path, family):
    """num_parameters(exclude_embeddings=True) leaves out wte (a tied head with it) and wpe, as
    transformers' num_parameters leaves out its embedding modules."""
    from tiny_hf import save_tiny_hf

    hf = save_tiny_hf(family, tmp_path)
    model = pretrained.load(tmp_path)
    for exclude in (False, True):
        assert model.num_parameters(exclude) == hf.num_parameters(exclude_embeddings=exclude)
