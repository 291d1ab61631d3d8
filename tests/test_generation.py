"""Generation: the KV cache against the full forward, greedy, sampling, beams, stops, streaming,
argument checks, the compiled and CUDA-graph decode step, and parity with transformers'
generate."""

import dataclasses
import re

import numpy as np
import pytest
import torch
from test_architecture import SHAPES, _ids, _model, _spy_sdpa, gen, gen_stream

from architecture import Transformer
from codelm.models import generation, pretrained


@pytest.mark.parametrize("shape", SHAPES)
def test_kv_cache_decode_equals_full_forward(shape):
    """Prefill and then one cached step a token give each position the logits the full forward
    gives it (within 1e-5), for every architecture shape: the KV cache changes speed, not
    output."""
    model = _model(shape)
    idx = _ids(2, 40)
    full = model(idx)
    prompt, total = 24, idx.shape[1]
    caches = generation.new_caches(model, 2, total)
    last, key_valid, pos = generation._prefill(model, idx[:, :prompt], None, caches)
    steps = [last]
    for t in range(prompt, total - 1):
        steps.append(generation._step(model, idx[:, t:t + 1], pos, torch.tensor([t]), key_valid, caches))
        pos = pos + 1
    decoded = torch.stack(steps, dim=1)
    assert (decoded - full[:, prompt - 1:total - 1]).abs().max().item() < 1e-5


@pytest.mark.parametrize("shape", SHAPES)
def test_left_padded_batch_equals_unpadded_runs(shape):
    """Rows of different lengths, left-padded under a mask, get the logits and the greedy
    continuation each row gets alone: batching prompts does not change what is generated."""
    model = _model(shape)
    rows = [_ids(1, n, seed=n)[0] for n in (20, 13, 7)]
    width = max(len(r) for r in rows)
    idx = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.bool)
    for b, r in enumerate(rows):
        idx[b, width - len(r):] = r
        mask[b, width - len(r):] = True
    padded = model(idx, attention_mask=mask)
    out = gen(model, idx, 12, attention_mask=mask)
    for b, r in enumerate(rows):
        alone = model(r[None])
        assert (padded[b, width - len(r):] - alone[0]).abs().max().item() < 1e-5
        assert torch.equal(out[b, width:], gen(model, r[None], 12)[0, len(r):])


def test_prefill_without_padding_attends_causally_to_the_prompt_alone(monkeypatch):
    """A prompt without padding is prefilled with is_causal over its own keys, not a boolean mask
    over the whole cache (which would keep CUDA's prefill off flash); padded prompts keep the
    mask."""
    model = _model("llama")
    idx = _ids(2, 10)
    calls = _spy_sdpa(monkeypatch)
    n = model.cfg.n_layer
    prefill = dict(q_len=10, kv_heads=2, k_len=10, masked=False, is_causal=True, gqa=True)
    step = dict(q_len=1, kv_heads=2, k_len=13, masked=True, is_causal=False, gqa=True)
    for mask in (None, torch.ones_like(idx, dtype=torch.bool)):
        calls.clear()
        gen(model, idx, 3, attention_mask=mask)
        assert calls == [prefill] * n + [step] * 2 * n
    mask = torch.ones_like(idx, dtype=torch.bool)
    mask[0, :2] = False
    calls.clear()
    gen(model, idx, 3, attention_mask=mask)
    assert calls[0] == dict(prefill, k_len=13, masked=True, is_causal=False)


def test_greedy_is_argmax_of_forward():
    """Each greedy token is the argmax of forward's logits on the text before it, and the output is
    an ordinary tensor (not an inference-mode one) that a caller can backpropagate through."""
    model = _model("phi")
    idx = _ids(2, 10)
    out = gen(model, idx, 6)
    logits = model(out[:, :-1])
    assert torch.equal(out[:, 10:], logits[:, 9:].argmax(-1))
    logits.sum().backward()  # the output is an ordinary tensor, not an inference-mode one


def test_generate_under_autocast_decodes_what_forward_computes():
    """Under autocast the cache holds autocast's dtype, so each greedy token is the argmax of
    forward's logits under the same autocast (an fp32 cache would fail in index_copy_)."""
    model = _model("llama")
    idx = _ids(2, 10)
    for dtype in (torch.bfloat16, torch.float16):
        with torch.autocast("cpu", dtype=dtype):
            out = gen(model, idx, 6)
            logits = model(out[:, :-1])
            assert torch.equal(out[:, 10:], logits[:, 9:].argmax(-1))
            assert torch.equal(torch.stack(list(gen_stream(model, idx, 6)), 1), out[:, 10:])
            assert gen(model, idx, 6, num_beams=2).shape == (2, 16)


def test_a_query_key_norm_model_decodes_under_autocast():
    """Qwen3's query/key norms keep fp32 weights, so under autocast they hand back fp32 keys:
    the bf16 cache stores them in its dtype, and each greedy token is forward's argmax."""
    torch.manual_seed(0)
    model = Transformer(dataclasses.replace(SHAPES["llama"], qk_norm=True)).eval()
    idx = _ids(2, 10)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = gen(model, idx, 6)
        logits = model(out[:, :-1])
    assert torch.equal(out[:, 10:], logits[:, 9:].argmax(-1))


def test_sampling_filters_and_seed():
    """top_k samples only among the k likeliest tokens and top_p only within the nucleus; one
    generator seed repeats the same text, and top_k=1 is greedy."""
    model = _model("llama")
    idx = _ids(1, 10).repeat(400, 1)
    last = model(idx[:1])[0, -1]
    top5 = set(last.topk(5).indices.tolist())
    g = torch.Generator().manual_seed(0)
    first = gen(model, idx, 1, temperature=1.0, top_k=5, generator=g)[:, -1]
    assert set(first.tolist()) <= top5 and len(set(first.tolist())) > 1
    probs = last.softmax(-1).sort(descending=True)
    nucleus = int((probs.values.cumsum(0) < 0.5).sum()) + 1
    allowed = set(probs.indices[:nucleus].tolist())
    first = gen(model, idx, 1, temperature=1.0, top_p=0.5, generator=g)[:, -1]
    assert set(first.tolist()) <= allowed
    a = gen(model, idx[:2], 8, temperature=0.8, generator=torch.Generator().manual_seed(1))
    b = gen(model, idx[:2], 8, temperature=0.8, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b)
    greedy = gen(model, idx[:2], 8)
    assert torch.equal(gen(model, idx[:2], 8, temperature=1.0, top_k=1), greedy)


def _lively(shape):
    """A random model whose greedy continuations vary (small inits repeat one token)."""
    torch.manual_seed(0)
    return Transformer(dataclasses.replace(SHAPES[shape], init_std=0.5)).eval()


def test_eos_ends_each_row_separately():
    """A row that generates eos is filled with eos from there while the other row runs on
    unchanged, and generation ends once every row has: each row of a batch finishes on its own."""
    model = _lively("codegen")
    idx = _ids(2, 8, seed=5)
    free = gen(model, idx, 10)
    row0, row1 = free[0, 8:].tolist(), free[1, 8:].tolist()
    step = next(i for i, t in enumerate(row0) if t not in row0[:i] and t not in row1)
    eos = row0[step]
    out = gen(model, idx, 10, eos_id=[eos])
    assert torch.equal(out[0, :9 + step], free[0, :9 + step])
    assert (out[0, 9 + step:] == eos).all()
    assert torch.equal(out[1], free[1])
    alone = gen(model, idx[:1], 10, eos_id=eos)
    assert alone.shape[1] == 9 + step  # stops once every row has finished


def test_stop_ids_and_strings():
    """A stop id sequence ends the row right after it is generated, a stop string once the decoded
    text holds it; a stop string without decode= is refused, as nothing could match it."""
    model = _lively("gpt_bigcode")
    idx = _ids(1, 8, seed=6)
    seq = gen(model, idx, 12)[0, 8:].tolist()
    k = next(i for i in range(1, 11) if seq[i:i + 2] not in
             [seq[j:j + 2] for j in range(i)])
    out = gen(model, idx, 12, stop=[seq[k:k + 2]], pad_id=0)
    assert out[0, 8:].tolist() == seq[:k + 2]

    def decode(ids):
        return "".join(chr(65 + i % 26) for i in ids)

    text = decode(seq)
    out = gen(model, idx, 12, stop=[text[k:k + 2]], decode=decode)
    assert text[k:k + 2] in decode(out[0, 8:].tolist())
    assert out.shape[1] == 8 + k + 2
    with pytest.raises(ValueError, match="need decode="):
        gen(model, idx, 4, stop=["x"])


def test_a_stop_id_sequence_ends_a_row_only_where_the_whole_sequence_is_generated():
    """stop=[[a, b]] ends a row only where a then b is generated, not at an earlier b that
    follows another token. Reference: the free greedy continuation, cut by hand after the first [a, b], on a
    prompt whose continuation has such an earlier b."""
    model = _lively("gpt_bigcode")
    for seed in range(6, 40):
        idx = _ids(1, 8, seed=seed)
        seq = gen(model, idx, 24)[0, 8:].tolist()
        # k: the first [a, b] = seq[k:k + 2] generated, with b already generated after another id
        k = next((k for k in range(1, len(seq) - 1)
                  if seq[k:k + 2] not in [seq[j:j + 2] for j in range(k)]
                  and any(seq[j] == seq[k + 1] and seq[j - 1] != seq[k]
                          for j in range(1, k + 1))), None)
        if k is not None:
            break
    else:
        raise AssertionError("no continuation with a repeated second stop id")
    out = gen(model, idx, 24, stop=[seq[k:k + 2]], pad_id=0)
    assert out[0, 8:].tolist() == seq[:k + 2]


def test_stream_yields_what_generate_returns():
    """Streaming yields, step by step, the tokens generate returns for the same prompt: a streamed
    answer equals a batch one."""
    model = _model("llama")
    idx = _ids(2, 8)
    streamed = torch.stack(list(gen_stream(model, idx, 9)), dim=1)
    assert torch.equal(streamed, gen(model, idx, 9)[:, 8:])


def test_generations_running_at_once_do_not_share_a_cache():
    """Each generation has its own KV cache, not the model's: a second stream does not replace the
    first one's (wrong tokens, no error), nor does a generate() inside a stream break it."""
    model = _model("codegen")
    a, b = _ids(1, 6), _ids(2, 5)[1:]
    want_a, want_b = gen(model, a, 8)[0, 6:], gen(model, b, 8)[0, 5:]
    pairs = list(zip(gen_stream(model, a, 8), gen_stream(model, b, 8)))
    assert torch.equal(torch.cat([x for x, _ in pairs]), want_a)
    assert torch.equal(torch.cat([y for _, y in pairs]), want_b)
    got = []
    for tok in gen_stream(model, a, 8):
        got.append(tok)
        gen(model, b, 3, num_beams=2)
    assert torch.equal(torch.cat(got), want_a)


def test_beam_search_scores_at_least_greedy():
    """Beam search's sequences score at least greedy's log-probability under the model (greedy's
    path is among those searched); beams with a temperature are refused, beam search being
    deterministic."""
    model = _model("phi")
    idx = _ids(2, 8)
    greedy = gen(model, idx, 6)
    beams = gen(model, idx, 6, num_beams=4)

    def logprob(seq):
        logp = torch.log_softmax(model(seq[:, :-1]), -1)[:, 7:]
        return logp.gather(-1, seq[:, 8:, None]).sum((1, 2))

    assert (logprob(beams) >= logprob(greedy) - 1e-5).all()
    with pytest.raises(ValueError, match="beam search is deterministic"):
        gen(model, idx, 4, num_beams=2, temperature=0.7)


@pytest.mark.parametrize("ids, message", [
    ([[3, 4]], "idx must be a tensor \\(batch, time\\), got a list"),
    # F.embedding's "Expected tensor for argument #1 'indices' to have ... Long, Int".
    (torch.Tensor([[3, 4]]), "idx must hold integer token ids .*got torch.float32 "
                             "\\(torch.Tensor\\(...\\) makes floats"),
    (torch.tensor([[True, False]]), "idx must hold integer token ids .*got torch.bool"),
    # F.embedding's "index out of range in self" (on CUDA a device-side assert).
    (torch.tensor([[-100, 3]]), re.escape("idx holds token ids outside [0, vocab_size=96):"
                                          " min -100, max 3")),
    (torch.tensor([[3, 96]]), "outside .* max 96"),
])
def test_generation_refuses_what_are_no_token_ids(ids, message):
    """A prompt that is a list, a float or bool tensor, or holds ids outside the vocabulary is
    refused by generate and stream alike, naming the dtype or the ids' range, instead of
    F.embedding's cryptic error (a device-side assert on CUDA)."""
    model = _model("llama")
    with pytest.raises(ValueError, match=message):
        gen(model, ids, 2)
    with pytest.raises(ValueError, match=message):
        next(gen_stream(model, ids, 2))


def test_attention_mask_must_be_a_tensor():
    """An attention_mask given as a list is refused, naming what it got, greedy and beam alike."""
    model = _model("llama")
    for beams in (1, 2):
        with pytest.raises(ValueError, match="attention_mask must be a tensor .*got a list"):
            gen(model, _ids(1, 3), 2, attention_mask=[[1, 1, 1]], num_beams=beams)


def test_input_errors():
    """Too long for block_size, 1-D, no room for max_new_tokens, empty, ids out of range, a mask of
    another shape, an eos_id that is no id: each is refused naming the numbers, the shapes the
    caller passed (not beam-expanded ones)."""
    model = _model("llama")
    with pytest.raises(AssertionError, match="block_size 64"):
        model(_ids(1, 65))
    with pytest.raises(ValueError, match=r"must be \(batch, time\)"):
        gen(model, _ids(1, 5)[0], 2)
    with pytest.raises(ValueError, match="prompt length 60 \\+ max_new_tokens 10 exceeds"):
        gen(model, _ids(1, 60), 10)
    with pytest.raises(ValueError, match=r"token ids outside \[0, vocab_size=96\): min 3, max 96"):
        gen(model, torch.tensor([[3, 96]]), 2)
    for beams in (1, 2):
        with pytest.raises(ValueError, match="the prompt is empty"):
            gen(model, torch.zeros(1, 0, dtype=torch.long), 3, num_beams=beams)
    for beams in (1, 3):  # the shapes passed, not the beam-expanded ones
        with pytest.raises(ValueError, match=re.escape("shape (2, 4) != idx shape (2, 5)")):
            gen(model, _ids(2, 5), 2, num_beams=beams,
                           attention_mask=torch.ones(2, 4, dtype=torch.bool))
    for bad in ("x", 2.5, [3, None]):
        with pytest.raises(ValueError, match="eos_id must be a token id or a sequence of ids"):
            gen(model, _ids(1, 5), 2, eos_id=bad)


def test_eos_and_stop_ids_as_numpy_or_tensor_values():
    """eos and stop ids given as numpy scalars, arrays or tensors end generation as the same ints
    do, greedy and beam: ids can come straight from a tokenizer's arrays."""

    model = _lively("codegen")
    idx = _ids(2, 8, seed=5)
    eos = int(gen(model, idx, 3)[0, -1])
    want = gen(model, idx, 6, eos_id=eos)
    for alike in (np.int64(eos), torch.tensor(eos), [np.int32(eos)], np.array([eos]),
                  torch.tensor([eos])):
        for beams in (1, 2):
            assert torch.equal(gen(model, idx, 6, eos_id=alike, num_beams=beams),
                               gen(model, idx, 6, eos_id=eos, num_beams=beams))
    assert torch.equal(gen(model, idx, 6, stop=[np.int64(eos)], pad_id=eos), want)


def test_sampling_and_generation_arguments_checked_up_front():
    """Refused before any work, also where they would not be used (greedy, no new tokens)."""

    model = _model("llama")
    idx = _ids(1, 5)
    for kw, message in [
        (dict(top_p=1.5), r"top_p must be in \(0, 1\]"),
        (dict(top_p=0.0, temperature=1.0), r"top_p must be in \(0, 1\]"),
        (dict(top_p=float("nan"), temperature=1.0), r"top_p must be in \(0, 1\]"),
        (dict(temperature=-1.0), r"temperature must be 0 \(greedy\).*>= 1e-10.*got -1\.0"),
        (dict(temperature="0.7"), "temperature must be 0 .* got '0.7'"),
        # logits / temperature would be inf (a NaN softmax, failing deep in multinomial) or 0
        (dict(temperature=1e-300), "temperature must be 0 .* got 1e-300"),
        (dict(temperature=float("inf")), "temperature must be 0 .* got inf"),
        (dict(top_k=0), "top_k must be >= 1"),
        (dict(top_k=2.5, temperature=1.0), "top_k must be an integer"),
        (dict(pad_id="0", eos_id=3), "pad_id must be an integer"),
        # Else ignored without a word: the output would be greedy (transformers warns).
        (dict(top_p=0.9), "temperature=0 is greedy .*: pass temperature > 0 to sample"),
        (dict(top_k=5), "temperature=0 is greedy"),
        # torch's errors after the prefill / at the first step.
        (dict(temperature=1.0, generator=42), "generator must be a torch.Generator or one a row, got 42"),
        (dict(stop="\n", decode="tokenizer"), "decode must be a callable such as tokenizer.decode"),
        # No generated token can equal them: every row would run to max_new_tokens.
        (dict(eos_id=96), re.escape("eos_id 96 is outside the model's vocabulary [0, 96)")),
        (dict(eos_id=[3, -1]), "eos_id -1 is outside"),
        (dict(stop=[[3, 96]], eos_id=3), "stop id 96 is outside"),
        # Else an IndexError from F.embedding once a row finishes, the tokens so far lost.
        (dict(pad_id=-100, eos_id=3), "pad_id -100 is outside the model's vocabulary"),
    ]:
        for n in (0, 2):
            with pytest.raises(ValueError, match=message):
                gen(model, idx, n, **kw)
            with pytest.raises(ValueError, match=message):
                next(gen_stream(model, idx, n, **kw))
    for beams in (1, 2):
        with pytest.raises(ValueError, match="max_new_tokens must be an integer, got 5.0"):
            gen(model, idx, 5.0, num_beams=beams)
    with pytest.raises(ValueError, match="num_beams must be an integer, got 2.0"):
        gen(model, idx, 5, num_beams=2.0)
    with pytest.raises(ValueError, match="beam search is deterministic"):
        gen(model, idx, 5, num_beams=2, stop=0)  # a bare id 0 is a stop too
    for kw, message in [(dict(eos_id=96), "eos_id 96 is outside"),
                        (dict(pad_id=-100), "pad_id -100 is outside"),
                        (dict(length_penalty="1.0"), "length_penalty must be a finite number"),
                        (dict(compile=True), "beam search runs eagerly")]:  # not ignored
        with pytest.raises(ValueError, match=message):
            gen(model, idx, 0, num_beams=2, **kw)
    assert gen(model, idx, np.int64(3), top_k=np.int64(2), temperature=1.0).shape == (1, 8)


def test_a_generator_at_temperature_zero_is_greedy():
    """eval passes its seeded generator whatever the temperature."""
    model = _model("llama")
    idx = _ids(2, 5)
    assert torch.equal(gen(model, idx, 4, generator=torch.Generator().manual_seed(0)),
                       gen(model, idx, 4))


def test_a_generator_of_another_device_than_the_models_is_refused_before_generating():
    """torch refuses a CPU generator's draw on a CUDA tensor only at the first sample, after the
    prompt's forward: generate checks each generator's device against the model's first (a
    model on the meta device stands in for an accelerator here), and names the fix."""
    model = _model("llama").to("meta")
    idx = _ids(2, 5)
    for generator in (torch.Generator(), [torch.Generator(), torch.Generator()]):
        with pytest.raises(ValueError, match=r"generator is on cpu and the model on meta"):
            gen(model, idx, 4, temperature=1.0, generator=generator)
    with pytest.raises(ValueError, match=r"torch.Generator\('cuda'\)"):
        generation.check_generator_device(torch.Generator(), torch.device("cuda"))
    generation.check_generator_device(None, torch.device("cuda"))  # its own draws: no check


def test_generation_refuses_right_padded_or_empty_rows():
    """generate continues each row from its last position: a right-padded row (as training
    batches are padded) would continue its pads, and an all-padding row has no prompt."""
    model = _model("llama")
    idx = _ids(3, 6)
    mask = torch.ones(3, 6, dtype=torch.bool)
    mask[0, :2] = False  # left padding is fine
    mask[1, 4:] = False  # right padding is not
    for beams in (1, 2):
        with pytest.raises(ValueError, match="attention_mask row 1 ends with padding.*left-padded"):
            gen(model, idx, 3, attention_mask=mask, num_beams=beams)
    with pytest.raises(ValueError, match="attention_mask row 1 ends with padding"):
        next(gen_stream(model, idx, 3, attention_mask=mask))
    mask[1] = True
    mask[2] = False
    for beams in (1, 2):
        with pytest.raises(ValueError, match="attention_mask row 2 ends with padding.*left-padded"):
            gen(model, idx, 3, attention_mask=mask, num_beams=beams)
    mask[2] = True
    assert gen(model, idx, 3, attention_mask=mask).shape == (3, 9)


def test_stop_without_eos_on_a_batch_needs_pad_id():
    """A row that stops before the others is filled; without eos_id or pad_id there is no id to
    fill it with (any default would be a real token, 0 is "!" in GPT-2's vocabulary)."""
    model = _lively("gpt_bigcode")
    idx = _ids(2, 8, seed=6)
    free = gen(model, idx, 6)[:, 8:].tolist()
    stop = free[0][1]
    assert stop not in free[0][:1] + free[1]  # row 0 stops after 2 tokens, row 1 runs on
    with pytest.raises(ValueError, match="stop without eos_id on a batch needs pad_id"):
        gen(model, idx, 6, stop=[stop])
    with pytest.raises(ValueError, match="stop without eos_id on a batch needs pad_id"):
        next(gen_stream(model, idx, 6, stop=[stop]))
    out = gen(model, idx, 6, stop=[stop], pad_id=95)
    assert out[0, 8:].tolist() == free[0][:2] + [95] * 4 and out[1, 8:].tolist() == free[1]
    out = gen(model, idx, 6, stop=[stop], eos_id=94)  # the EOS id fills, as documented
    assert out[0, 8:].tolist() == free[0][:2] + [94] * 4
    alone = gen(model, idx[:1], 6, stop=[stop])  # a lone row just ends there
    assert alone[0, 8:].tolist() == free[0][:2]


def test_pad_id_fills_finished_rows_also_when_an_eos_id_is_given():
    """pad_id, when given, fills the rows that finished, not the EOS id (which fills only
    without pad_id). Reference: the free greedy continuation, cut by hand after the EOS."""
    model = _lively("codegen")
    idx = _ids(2, 8, seed=5)
    free = gen(model, idx, 10)
    row0, row1 = free[0, 8:].tolist(), free[1, 8:].tolist()
    step = next(i for i, t in enumerate(row0) if t not in row0[:i] and t not in row1)
    eos, pad = row0[step], next(t for t in (95, 94) if t != row0[step])
    out = gen(model, idx, 10, eos_id=eos, pad_id=pad)
    assert out[0, 8:].tolist() == row0[:step + 1] + [pad] * (9 - step)
    assert torch.equal(out[1], free[1])
    assert torch.equal(torch.stack(list(gen_stream(model, idx, 10, eos_id=eos, pad_id=pad)), 1),
                       out[:, 8:])


def test_a_stop_string_ending_inside_the_last_token_ends_the_row():
    """A stop string counts once the text contains it, also where the last token's text runs
    past it (a stop spanning two tokens, as tokenizers cut text), not only where the text ends
    with it. Reference: the free greedy continuation, cut by hand after the stop's token."""
    model = _lively("gpt_bigcode")
    idx = _ids(1, 8, seed=6)
    seq = gen(model, idx, 12)[0, 8:].tolist()

    def decode(ids):  # two characters a token, so a stop can end inside one
        return "".join(chr(65 + i % 26) + chr(97 + i % 26) for i in ids)

    text = decode(seq)
    # a stop from the second character of token k to the first of token k + 1, first seen there
    k = next(k for k in range(1, 10) if text[2 * k + 1:2 * k + 3] not in text[:2 * k + 2])
    stop = text[2 * k + 1:2 * k + 3]
    out = gen(model, idx, 12, stop=stop, decode=decode)
    assert out[0, 8:].tolist() == seq[:k + 2]
    assert not decode(seq[:k + 2]).endswith(stop)


def test_stop_strings_without_eos_on_a_batch_need_pad_id_as_stop_ids_do():
    """A row ended by a stop string is filled like one ended by a stop id: without eos_id or
    pad_id there is no id to fill it with, for strings too."""
    model = _model("llama")
    for stop in (["AB"], "AB", [[5, 6], "AB"]):
        with pytest.raises(ValueError, match="stop without eos_id on a batch needs pad_id"):
            gen(model, _ids(2, 5), 3, stop=stop, decode=lambda ids: "x")
    assert gen(model, _ids(1, 5), 3, stop="AB", decode=lambda ids: "x").shape == (1, 8)


def test_a_negative_max_new_tokens_or_a_nan_temperature_is_refused():
    """A negative max_new_tokens is refused, not read as no new tokens; a NaN temperature
    (which `temperature < 0` lets through) is no number >= 0."""
    model = _model("llama")
    for beams in (1, 2):
        with pytest.raises(ValueError, match="max_new_tokens must be >= 0, got -1"):
            gen(model, _ids(1, 5), -1, num_beams=beams)
    with pytest.raises(ValueError, match="max_new_tokens must be >= 0, got -1"):
        next(gen_stream(model, _ids(1, 5), -1))
    for bad in (float("nan"), float("-inf")):
        with pytest.raises(ValueError, match="temperature must be 0 "):
            gen(model, _ids(1, 5), 2, temperature=bad)


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
    """The decode-layout measurement of a model's first generate draws nothing from the global
    RNG: the same seed samples the same tokens on that call as on later ones and as HF."""
    path, hf = hf_dirs["llama"]
    idx = _ids(2, 10, vocab=256)
    kw = dict(temperature=0.8, top_k=40, top_p=0.9)
    torch.manual_seed(123)
    ref = _hf_generate(hf, idx, 16, do_sample=True, eos_token_id=2, **kw)
    model = pretrained.load(path).eval()  # fresh: this call measures the layout
    torch.manual_seed(123)
    assert torch.equal(gen(model, idx, 16, eos_id=2, pad_id=0, **kw), ref)
    model = pretrained.load(path).eval()
    torch.manual_seed(123)
    streamed = list(gen_stream(model, idx, 16, eos_id=2, pad_id=0, **kw))
    assert torch.equal(torch.cat((idx, torch.stack(streamed, 1)), 1), ref)
    for train in (False, True):  # train mode measures on every call
        model = pretrained.load(path).train(train)
        state = torch.get_rng_state()
        gen(model, idx, 4)
        gen(model, idx, 4, num_beams=2)
        list(gen_stream(model, idx, 4))
        assert torch.equal(torch.get_rng_state(), state), "greedy decoding drew random numbers"


def test_sampling_without_top_k_is_transformers_top_k_zero_not_its_default(hf_dirs):
    """top_k=None filters nothing: a seed samples what HF's do_sample=True samples with top_k=0,
    not with its generate's default top_k=50 (so "do_sample=True" alone would not pin it)."""
    path, hf = hf_dirs["llama"]
    model = pretrained.load(path).eval()
    idx = _ids(2, 10, vocab=256)
    torch.manual_seed(7)
    got = gen(model, idx, 16, temperature=1.0)
    torch.manual_seed(7)
    assert torch.equal(got, _hf_generate(hf, idx, 16, do_sample=True, temperature=1.0, top_k=0))
    torch.manual_seed(7)
    assert not torch.equal(got, _hf_generate(hf, idx, 16, do_sample=True, temperature=1.0))


def test_any_of_several_eos_ids_ends_a_row_and_the_first_one_fills_as_in_transformers(hf_dirs):
    """eos_id=[a, b]: b ends a row as a does, and a row that finished is filled with the first
    id a (transformers' pad default), whichever id ended it. The row that ends first ends with
    b, so taking only a, or filling with b, shows."""
    path, hf = hf_dirs["llama"]
    model = pretrained.load(path).eval()
    idx = _ids(2, 10, vocab=256)
    free = gen(model, idx, 16)[:, 10:].tolist()

    def first_made(row):  # (step, token): the row makes the token there for the first time
        return [(s, t) for s, t in enumerate(free[row]) if t not in free[row][:s]]

    # t0 ends row 0 at s0 and t1 row 1 at s1: neither row makes the other's id before it ends
    (s0, t0), (s1, t1) = next((a, b) for a in first_made(0) for b in first_made(1)
                              if a[0] != b[0] and a[1] not in free[1][:b[0] + 1]
                              and b[1] not in free[0][:a[0] + 1])
    eos = [t1, t0] if s0 < s1 else [t0, t1]  # the row that ends first ends with eos[1]
    ref = _hf_generate(hf, idx, 16, eos_token_id=eos, pad_token_id=None)
    assert ref.shape[1] == 10 + max(s0, s1) + 1 and (ref[:, 10:] == eos[0]).any()
    assert torch.equal(gen(model, idx, 16, eos_id=eos), ref)


def test_packed_weights_decode_what_transformers_decodes(hf_dirs, monkeypatch):
    """Several rows (a left-padded batch, beam search, a prompt-lookup check, the engine's
    slots) multiply by oneDNN's packed weights, every weight packed here: the greedy tokens
    are transformers'."""
    from codelm import kernels
    from codelm.models.engine import generate_all

    monkeypatch.setattr(kernels, "PACK_MIN_NUMEL", 0)
    packed = []
    multiply = kernels._packed_linear
    monkeypatch.setattr(kernels, "_packed_linear",
                        lambda *args: packed.append(1) or multiply(*args))
    path, hf = hf_dirs["llama"]
    model = pretrained.load(path).eval()
    idx = _ids(3, 12, seed=5, vocab=256)
    mask = torch.ones_like(idx, dtype=torch.bool)
    mask[1, :5] = False
    ref = hf.generate(idx, attention_mask=mask.long(), max_new_tokens=16, do_sample=False,
                      eos_token_id=None, pad_token_id=0)
    assert torch.equal(gen(model, idx, 16, attention_mask=mask), ref)
    rows = [row[m].tolist() for row, m in zip(idx, mask)]
    assert generate_all(model, rows, generation.GenerationConfig(16), slots=3) == ref[:, 12:].tolist()
    beams = hf.generate(idx, attention_mask=mask.long(), max_new_tokens=8, do_sample=False,
                        num_beams=2, eos_token_id=None, pad_token_id=0)
    assert torch.equal(gen(model, idx, 8, num_beams=2, attention_mask=mask), beams)
    repeating = torch.tensor([rows[0] * 3])
    assert torch.equal(gen(model, repeating, 16, prompt_lookup=4),
                       _hf_generate(hf, repeating, 16, prompt_lookup_num_tokens=4))
    assert len(packed) > 100


def test_left_padded_beam_search_matches_transformers_with_an_even_beam_count(hf_dirs):
    """Each row's beams take that row's mask. With 2 rows and 3 beams a mask tiled row after
    row (instead of repeated per row) still gives each row's first beam, the one every beam
    grows from, its own mask; with 2 beams it gives row 1 row 0's mask."""
    path, hf = hf_dirs["llama"]
    model = pretrained.load(path).eval()
    idx = _ids(2, 10, seed=3, vocab=256)
    mask = torch.ones_like(idx, dtype=torch.bool)
    mask[1, :4] = False
    ref = hf.generate(idx, attention_mask=mask.long(), max_new_tokens=8, do_sample=False,
                      num_beams=2, eos_token_id=None, pad_token_id=0)
    assert torch.equal(gen(model, idx, 8, num_beams=2, attention_mask=mask), ref)


def test_beam_search_fills_with_the_first_of_several_eos_ids_as_transformers_pads(hf_dirs):
    """Without pad_id a row whose best hypothesis ended early is filled with the first EOS id,
    transformers' pad default, also when another EOS id ended it."""
    path, hf = hf_dirs["llama"]
    model = pretrained.load(path).eval()
    for seed in range(20):
        idx = _ids(2, 10, seed=seed, vocab=256)
        free = gen(model, idx, 8, num_beams=2)[:, 10:]
        first = next(t for t in range(3, 256) if t not in free)  # an id no row makes freely
        eos = [first, int(free[0, 1])]  # row 0's second token ends it
        ref = hf.generate(idx, attention_mask=torch.ones_like(idx), max_new_tokens=8,
                          do_sample=False, num_beams=2, eos_token_id=eos, pad_token_id=eos[0])
        if (ref[:, -1] == eos[0]).any():  # a row was filled
            break
    else:
        raise AssertionError("no prompt whose beam search fills a row")
    assert torch.equal(gen(model, idx, 8, num_beams=2, eos_id=eos), ref)


@pytest.mark.parametrize("family", ["gpt_bigcode", "llama"])
def test_full_context_prompt_continues_as_in_transformers(hf_dirs, family):
    """The last new token is never fed back, so T + max_new_tokens may be block_size + 1: a
    full-context prompt gets its next token, as transformers gives it."""
    path, hf = hf_dirs[family]
    model = pretrained.load(path).eval()
    block = model.cfg.block_size
    for T, n in ((block, 1), (block - 10, 11)):
        idx = _ids(2, T, vocab=256)
        ref = _hf_generate(hf, idx, n)
        assert ref.shape == (2, block + 1)
        assert torch.equal(gen(model, idx, n), ref)
        assert torch.equal(gen(model, idx, n, num_beams=2),
                           _hf_generate(hf, idx, n, num_beams=2))
    with pytest.raises(ValueError, match=rf"prompt length {block + 1} exceeds the context"):
        gen(model, _ids(1, block + 1, vocab=256), 0)
    with pytest.raises(ValueError, match=rf"max_new_tokens 12 .*block_size={block} \+ 1"):
        gen(model, _ids(1, block - 10, vocab=256), 12)


def test_sampling_filter_equals_transformers_warpers_with_ties():
    """top_p breaks ties at the nucleus boundary as transformers does (keeping the later ones):
    the other way would keep different sets for bf16 logits at nearly every step."""
    from transformers.generation.logits_process import (
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    from codelm.models.generation import sampling_logits

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
            got = sampling_logits(logits, temperature, top_k, top_p)
            assert torch.equal(got, ref), (logits.shape, temperature, top_k, top_p)
    kept = sampling_logits(torch.ones(1, 4), 1.0, None, 0.5).isfinite()
    assert kept.tolist() == [[False, False, True, True]]
    logits = 3 * torch.randn(4, 256, generator=g)
    for top_p in (1e-9, 1e-7):  # below every probability: the likeliest token is still kept
        kept = sampling_logits(logits, 1.0, None, top_p).isfinite()
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
    """A bare string is one stop string, not one stop per character; a bare id is one stop id,
    not a TypeError."""
    from tiny_hf import save_tiny_hf

    hft = hf_tokenizer
    hf = save_tiny_hf("llama", tmp_path, vocab_size=len(hft), initializer_range=0.2)
    model = pretrained.load(tmp_path).eval()
    idx = _ids(1, 8, seed=1, vocab=len(hft))
    free = gen(model, idx, 30)[0, 8:].tolist()
    text = hft.decode(free)
    # a 3-character stop first seen late in the text, whose characters all occur before it
    # (and are whole characters: HF matches tokens, not a partial UTF-8 sequence's U+FFFD)
    at = next(i for i in range(len(text) // 2, len(text) - 3)
              if text[i:i + 3] not in text[:i + 2] and "\ufffd" not in text[i:i + 3]
              and all(c in text[:i] for c in text[i:i + 3]))
    stop = text[at:at + 3]
    ref = _hf_generate(hf, idx, 30, stop_strings=stop, tokenizer=hft)
    assert 8 < ref.shape[1] - 8 < 30
    assert torch.equal(gen(model, idx, 30, stop=stop, decode=hft.decode), ref)
    assert torch.equal(gen(model, idx, 30, stop=[stop], decode=hft.decode), ref)
    tok = free[10]  # a bare id is one stop id: for one row, what an EOS id does
    ref = _hf_generate(hf, idx, 30, eos_token_id=tok)
    assert torch.equal(gen(model, idx, 30, stop=tok), ref)
    assert torch.equal(gen(model, idx, 30, stop=torch.tensor(tok)), ref)
    for bad, message in [("", "stop: an empty string"), ([""], "stop: an empty string"),
                         ([[]], "stop: an empty .* id sequence"),
                         ([None], "stop must be a token id or a sequence of ids, got None"),
                         (2.5, "stop must be a string, an id, or a list"),
                         (b"ab", "stop must be a string, an id, or a list"),
                         ([2.5], "stop must be a token id or a sequence of ids")]:
        with pytest.raises(ValueError, match=message):
            gen(model, idx, 4, stop=bad, decode=hft.decode)


def test_a_stop_string_is_matched_in_the_generated_text_only(hf_tokenizer, tmp_path):
    """A stop made of the prompt's last character and the first new one ends no row (HF's
    stop_strings end it after one token): the documented difference, pinned."""
    from tiny_hf import save_tiny_hf

    hft = hf_tokenizer
    hf = save_tiny_hf("llama", tmp_path, vocab_size=len(hft), initializer_range=0.2)
    model = pretrained.load(tmp_path).eval()
    for seed in range(40):
        idx = _ids(1, 8, seed=seed, vocab=len(hft))
        text = hft.decode(gen(model, idx, 12)[0, 8:].tolist())
        stop = hft.decode(idx[0].tolist())[-1:] + text[:1]
        if stop not in text and "\ufffd" not in stop:
            break
    else:
        raise AssertionError("no prompt whose end and continuation spell a new stop")
    ref = _hf_generate(hf, idx, 12, stop_strings=stop, tokenizer=hft)
    assert ref.shape[1] == 9
    assert gen(model, idx, 12, stop=stop, decode=hft.decode).shape[1] == 20


@pytest.mark.slow
def test_compiled_decode_matches_eager():
    """torch.compile's decode step gives eager decoding's tokens exactly, on a left-padded batch
    and on a second shape (a recompile): compile=True changes speed only."""
    model = _model("llama")
    for batch, length in ((2, 8), (3, 11)):  # a second shape must work too
        idx = _ids(batch, length)
        mask = torch.ones_like(idx, dtype=torch.bool)
        mask[0, :3] = False
        assert torch.equal(gen(model, idx, 10, attention_mask=mask, compile=True),
                           gen(model, idx, 10, attention_mask=mask))


def _compiled_batch1_decode(shape: str) -> None:
    from torch._inductor.utils import run_and_get_code

    model, idx = _model(shape), _ids(1, 7)
    out, code = run_and_get_code(gen, model, idx, 12, compile=True)
    assert torch.equal(out, gen(model, idx, 12))
    step_code = "\n".join(code)
    assert "def call(" in step_code  # the compiled step's code was captured
    # every Linear became a fused multiply-reduce: no call of a matmul kernel is left
    assert not re.search(r"(extern_kernels|aten)\.(add)?mm(\.default)?\(", step_code)


# slow; quick cover: test_copies_and_pickles_leave_the_compiled_decode_step_behind (a compiled
# batch-1 generate decodes eager's tokens; not the fusion) and test_engine's
# test_the_compiled_engine_decodes_what_the_eager_one_decodes
@pytest.mark.slow
def test_compiled_batch1_decode_fuses_the_matmuls_and_matches_eager():
    """At batch 1 the compiled step turns every Linear (here with biases: addmm) into a fused
    multiply-reduce, no matmul kernel call left in inductor's code, and decodes eager's tokens."""
    _compiled_batch1_decode("phi")  # biases: the addmm path


def test_copies_and_pickles_leave_the_compiled_decode_step_behind():
    """The compiled step decodes eager's tokens and is not kept on the instance: a deep copy
    decodes with its own weights, not the original's, and the model pickles after a compiled
    generate."""
    import copy
    import io
    import pickle

    model, idx = _model("phi"), _ids(1, 7)
    want = gen(model, idx, 12, compile=True)
    assert torch.equal(want, gen(model, idx, 12))
    twin = copy.deepcopy(model)
    with torch.no_grad():  # the original now always picks token 5
        model.lm_head.bias[5] = 1e4
    assert torch.equal(gen(twin, idx, 12, compile=True), want)
    assert (gen(model, idx, 12, compile=True)[0, 7:] == 5).all()
    buf = io.BytesIO()
    torch.save(twin, buf)
    assert torch.equal(gen(pickle.loads(pickle.dumps(twin)), idx, 12), want)
    buf.seek(0)
    assert torch.equal(gen(torch.load(buf, weights_only=False), idx, 12), want)


@pytest.mark.slow
@pytest.mark.parametrize("shape", ["gpt_bigcode", "codegen", "llama"])
def test_compiled_batch1_decode_every_family(shape):
    """The fused batch-1 decode holds for the multi-query, CodeGen and Llama shapes too: no matmul
    call left, eager's tokens."""
    _compiled_batch1_decode(shape)


def test_zero_new_tokens_return_the_prompt_and_bad_beams_are_refused():
    """max_new_tokens=0 returns the prompt as it is, greedy or beam, with or without an eos;
    num_beams below 1 is refused naming the value."""
    model = _model("llama")
    idx = _ids(2, 5)
    for beams in (1, 3):
        assert torch.equal(gen(model, idx, 0, num_beams=beams), idx)
        assert torch.equal(gen(model, idx, 0, num_beams=beams, eos_id=4), idx)
    for beams in (0, -1):
        with pytest.raises(ValueError, match=f"num_beams must be >= 1, got {beams}"):
            gen(model, idx, 3, num_beams=beams)


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
        eager = gen(model, idx, new, attention_mask=mask, eos_id=5)
        graphed = gen(model, idx, new, attention_mask=mask, eos_id=5, compile=True)
        assert torch.equal(graphed, eager), (batch, length)
        held = generation._HELD[model]
        assert held[0][0].shape[2] % 256 == 0
        assert torch.equal(gen(model, idx, new, attention_mask=mask, eos_id=5, compile=True),
                           eager)
        assert generation._HELD[model] is held
    import copy

    assert copy.deepcopy(model) not in generation._HELD  # a copy decodes with its own
    idx = _ids(1, 9).cuda()
    stream = gen_stream(model, idx, 8, compile=True)
    next(stream)  # an unfinished stream holds the caches: a second generation is refused
    with pytest.raises(RuntimeError, match="already running on this model"):
        gen(model, idx, 8, compile=True)
    stream.close()
    assert torch.equal(gen(model, idx, 8, compile=True), gen(model, idx, 8))


def test_a_second_graph_decode_on_one_model_is_refused_until_the_first_ends():
    """The CUDA-graph caches are the model's, one set: while a compiled generation holds them a
    second one is refused (it would overwrite the first's keys and values); a copy is free."""
    import copy

    model = _model("llama")
    generation._graph_caches(model, 1, 256)
    with pytest.raises(RuntimeError, match=r"already running.*unfinished stream.*close it"):
        generation._graph_caches(model, 1, 256)
    generation._graph_caches(copy.deepcopy(model), 1, 256)


# ---------------------------------------------------------------------- drafted decoding
def _forwards(monkeypatch, of=None):
    """The lengths of the chunks fed to the blocks of model ``of`` (None: any), in order."""
    fed = []
    real = Transformer.run_blocks

    def counting(self, idx, *args, **kwargs):
        if of is None or self is of:
            fed.append(idx.shape[1])
        return real(self, idx, *args, **kwargs)

    monkeypatch.setattr(Transformer, "run_blocks", counting)
    return fed


@pytest.mark.parametrize("family", ["llama", "gpt_bigcode"])
def test_prompt_lookup_gives_greedys_tokens_and_transformers_in_fewer_forwards(
        hf_dirs, family, monkeypatch):
    """Prompts that repeat themselves: drafts copied from the text are checked in one forward
    each, the tokens those of plain greedy decoding and of transformers'
    generate(prompt_lookup_num_tokens=...)."""
    path, hf = hf_dirs[family]
    model = pretrained.load(path).eval()
    forwards = 0
    for seed in range(3):
        unit = _ids(1, 6, seed=seed, vocab=256)
        idx = unit.repeat(1, 4)
        plain = gen(model, idx, 30)
        ref = _hf_generate(hf, idx, 30, prompt_lookup_num_tokens=5)
        fed = _forwards(monkeypatch)
        looked = gen(model, idx, 30, prompt_lookup=5)
        monkeypatch.undo()
        assert torch.equal(looked, plain) and torch.equal(looked, ref)
        forwards += len(fed)
    assert forwards < 3 * 30  # some drafts held: fewer forwards than tokens
    narrow = idx.int()  # int32 ids give the int64 tokens plain decoding gives them
    assert gen(model, narrow, 4, prompt_lookup=5).dtype == gen(model, narrow, 4).dtype


def test_prompt_lookup_drafts_what_transformers_drafts():
    """The n-gram index drafts, text by text as it grows, what transformers' prompt lookup
    candidate generator finds by scanning the text: the first earlier match, cut at EOS."""
    from transformers.generation.candidate_generator import PromptLookupCandidateGenerator

    g = torch.Generator().manual_seed(0)
    eos = 3
    for k in (1, 4, 10):
        hf = PromptLookupCandidateGenerator(torch.tensor([eos]), num_output_tokens=k,
                                            max_length=10**6)
        text = torch.randint(0, 12, (60,), generator=g).tolist()
        lookup = generation._PromptLookup(text[:2])
        for end in range(2, len(text) + 1):
            ref = hf.get_candidates(torch.tensor([text[:end]]))[0][0, end:].tolist()
            assert lookup.draft(k, [eos]) == ref, (k, end)
            lookup.extend(text[end : end + 1])


def test_prompt_lookup_drafts_during_decoding_what_transformers_drafts(hf_dirs, monkeypatch):
    """Every draft checked while decoding is the one transformers' candidate generator finds in
    the prompt plus every token kept so far (accepted draft tokens included), capped by the
    room left: the lookup's text grows with the decoded text, token for token."""
    from transformers.generation.candidate_generator import PromptLookupCandidateGenerator

    path, _ = hf_dirs["llama"]
    model = pretrained.load(path).eval()
    n = 30
    real = generation._check_draft
    checked = []

    def recording(model, last, proposed, at, caches):
        checked.append((at, list(proposed)))
        return real(model, last, proposed, at, caches)

    for seed in range(3):
        idx = _ids(1, 6, seed=seed, vocab=256).repeat(1, 4)
        checked.clear()
        monkeypatch.setattr(generation, "_check_draft", recording)
        out = gen(model, idx, n, prompt_lookup=5)
        monkeypatch.undo()
        hf = PromptLookupCandidateGenerator(torch.tensor([-1]), num_output_tokens=5,
                                            max_length=idx.shape[1] + n)
        assert checked
        for at, proposed in checked:
            room = idx.shape[1] + n - (at + 1) - 1  # the model's own token follows the draft
            ref = hf.get_candidates(out[:, : at + 1])[0][0, at + 1 :].tolist()
            assert proposed == ref[:room], (seed, at)


def test_a_draft_model_gives_greedys_tokens_and_transformers(hf_dirs, tmp_path, monkeypatch):
    """Decoding with a draft model gives plain greedy's tokens, which are transformers'
    generate(assistant_model=...)'s; with the model as its own draft every draft holds, so the
    model runs the prompt and then one forward per 4 drafted tokens."""
    from tiny_hf import save_tiny_hf

    path, hf = hf_dirs["llama"]
    model = pretrained.load(path).eval()
    small = save_tiny_hf("llama", tmp_path, seed=1, initializer_range=0.2, num_hidden_layers=1)
    draft = pretrained.load(tmp_path).eval()
    idx = _ids(1, 12, seed=4, vocab=256)
    plain = gen(model, idx, 25)
    ref = _hf_generate(hf, idx, 25, assistant_model=small)
    assert torch.equal(gen(model, idx, 25, draft_model=draft, draft_tokens=4), plain)
    assert torch.equal(plain, ref)
    itself = pretrained.load(path).eval()
    fed = _forwards(monkeypatch, of=model)
    assert torch.equal(gen(model, idx, 25, draft_model=itself, draft_tokens=4), plain)
    assert fed == [12, 5, 5, 5, 5, 4]  # the prompt, then drafts of 4 (3 at the end), all held


def test_drafted_decoding_stops_where_greedy_stops(hf_dirs):
    """With prompt lookup, an eos or a stop sequence inside an accepted draft ends the row where
    greedy ends it: no drafted tokens after the stop slip in."""
    path, _ = hf_dirs["llama"]
    model = pretrained.load(path).eval()
    idx = _ids(1, 6, seed=0, vocab=256).repeat(1, 3)
    free = gen(model, idx, 20)[0, 18:].tolist()
    eos = free[7]
    want = gen(model, idx, 20, eos_id=eos)
    assert torch.equal(gen(model, idx, 20, eos_id=eos, prompt_lookup=4), want)
    stop = free[3:5]
    want = gen(model, idx, 20, stop=[stop])
    assert torch.equal(gen(model, idx, 20, stop=[stop], prompt_lookup=4), want)


@pytest.mark.parametrize("kw, message", [
    (dict(prompt_lookup=3, temperature=0.7), "drafted decoding .* is greedy"),
    (dict(prompt_lookup=3, num_beams=2), "drafted decoding .* is greedy"),
    (dict(prompt_lookup=-1), "prompt_lookup must be >= 0"),
    (dict(draft_tokens=0), "draft_tokens must be >= 1"),
])
def test_drafted_decoding_arguments_are_checked(kw, message):
    """Drafted decoding with sampling or beams is refused (it is greedy), as are a negative
    prompt_lookup and draft_tokens below 1, when the GenerationConfig is made."""
    with pytest.raises(ValueError, match=message):
        generation.GenerationConfig(8, **kw)


def test_drafted_decoding_takes_one_unpadded_row():
    """A batch of two with prompt lookup is refused, naming the one unpadded prompt drafted
    decoding takes."""
    model = _model("llama")
    with pytest.raises(ValueError, match="one unpadded prompt"):
        gen(model, _ids(2, 5), 4, prompt_lookup=3)


def test_a_draft_model_with_a_shorter_context_is_refused_before_decoding():
    """A draft model reads the whole text: a prompt and new tokens past its context are refused
    naming both lengths and the fix, not an index error deep in its rotary tables."""
    model = _model("llama")
    draft = _model("llama")
    draft.cfg.block_size = 16
    with pytest.raises(ValueError, match=r"20 \+ max_new_tokens 8 exceeds the draft model's "
                                         r"context length block_size=16 .*longer context"):
        gen(model, _ids(1, 20), 8, draft_model=draft)
