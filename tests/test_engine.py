"""The continuous-batching engine: requests that join and leave a running batch get the tokens
generation.generate (and transformers' generate) gives each alone, greedy and sampled, with EOS,
stop ids and stop strings; a request's tokens do not depend on what runs beside it."""

import dataclasses

import pytest
import torch
from test_architecture import SHAPES, _ids, _model, gen
from test_generation import _hf_generate, hf_dirs  # noqa: F401  (a fixture)

from architecture import Transformer
from codelm.models import pretrained
from codelm.models.engine import Engine, generate_all
from codelm.models.generation import GenerationConfig


def _alone(model, prompt, n, **kw):
    """generate's new tokens for one prompt at batch 1, up to and with its EOS."""
    idx = torch.tensor([prompt], device=model.wte.weight.device)
    out = gen(model, idx, n, **kw)[0, len(prompt):].tolist()
    eos = kw.get("eos_id")
    if eos is not None and eos in out:
        out = out[: out.index(eos) + 1]
    return out


def _prompts(count, vocab=96):
    """Prompts of different lengths, each its own."""
    return [_ids(1, 3 + (7 * i) % 19, seed=i, vocab=vocab)[0].tolist() for i in range(count)]


def _with_window(shape):
    model = _model(shape)
    model.cfg.sliding_window = 6  # every layer slides: keys 6 or more slots back are hidden
    return model


@pytest.mark.parametrize("shape", [*SHAPES, "sliding"])
def test_greedy_requests_joining_a_running_batch_get_their_tokens_alone(shape):
    """Ten prompts of different lengths and budgets through three slots: each joins when a slot
    frees, and decodes exactly what generate decodes for it at batch 1."""
    model = _with_window("llama") if shape == "sliding" else _model(shape)
    prompts = _prompts(10)
    budgets = [4 + (5 * i) % 17 for i in range(10)]
    cfgs = [GenerationConfig(n) for n in budgets]
    got = generate_all(model, prompts, cfgs, slots=3)
    for prompt, n, tokens in zip(prompts, budgets, got):
        assert tokens == _alone(model, prompt, n)


def test_greedy_equals_transformers_generate(hf_dirs):  # noqa: F811
    """Six prompts through four slots decode greedily to transformers' generate tokens for each
    prompt alone, with learned positions (gpt_bigcode) and rotary ones (llama)."""
    for family in ("gpt_bigcode", "llama"):
        path, hf = hf_dirs[family]
        model = pretrained.load(path).eval()
        prompts = _prompts(6, vocab=256)
        got = generate_all(model, prompts, GenerationConfig(12), slots=4)
        for prompt, tokens in zip(prompts, got):
            ref = _hf_generate(hf, torch.tensor([prompt]), 12)[0, len(prompt):].tolist()
            assert tokens == ref, family


def test_a_sampled_request_draws_what_generate_draws_with_its_generator():
    """Each request's own generator: its samples equal generate's at batch 1 with a generator
    of the same seed, whether it runs alone or among others with other settings."""
    model = _model("llama")
    prompts = _prompts(6)
    settings = [dict(temperature=0.8), dict(temperature=1.2, top_k=20),
                dict(temperature=0.7, top_p=0.9), dict(), dict(temperature=1.0, top_k=5,
                                                               top_p=0.8), dict(temperature=0.9)]

    def cfg(i):
        g = torch.Generator().manual_seed(100 + i)
        return GenerationConfig(15, generator=g, **settings[i])

    crowd = generate_all(model, prompts, [cfg(i) for i in range(6)], slots=4)
    for i, prompt in enumerate(prompts):
        g = torch.Generator().manual_seed(100 + i)
        assert crowd[i] == _alone(model, prompt, 15, generator=g, **settings[i]), i
        assert generate_all(model, [prompt], cfg(i), slots=1) == [crowd[i]]


def _joining_requests(device: str = "cpu") -> tuple[list[list[int]], list[GenerationConfig]]:
    """Ten prompts of different lengths and budgets, greedy and sampled (each its own seeded
    generator on ``device``), an EOS id among them: more requests than slots, so they join."""
    prompts = _prompts(10)
    cfgs = []
    for i in range(10):
        sampled = dict(temperature=0.9, top_p=0.95) if i % 2 else {}
        generator = torch.Generator(device).manual_seed(300 + i)
        cfgs.append(GenerationConfig(4 + (5 * i) % 17, eos_id=7 if i % 3 == 0 else None,
                                     generator=generator, **sampled))
    return prompts, cfgs


def test_the_compiled_engine_decodes_what_the_eager_one_decodes():
    """The decode step compiled over the whole pool (every slot, the whole cache) gives the
    eager engine's tokens, greedy and sampled, as requests join and leave three slots; after
    the weights change in place (as an optimizer step changes them) the compiled step reads
    the new ones."""
    model = _model("llama")
    prompts, cfgs = _joining_requests()
    eager = generate_all(model, prompts, cfgs, slots=3)
    prompts, cfgs = _joining_requests()  # the generators afresh
    assert generate_all(model, prompts, cfgs, slots=3, compile=True) == eager
    for prompt, cfg, tokens in zip(prompts[::2], cfgs[::2], eager[::2]):  # the greedy ones
        assert tokens == _alone(model, prompt, cfg.max_new_tokens, eos_id=cfg.eos_id[0]
                                if cfg.eos_id else None)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.mul_(1.5)
    prompts, cfgs = _joining_requests()
    changed = generate_all(model, prompts, cfgs, slots=3)
    assert changed != eager
    prompts, cfgs = _joining_requests()
    assert generate_all(model, prompts, cfgs, slots=3, compile=True) == changed


@pytest.mark.slow  # ten compilations
def test_ten_model_shapes_compile_in_one_process():
    """Each model shape is a version of the process's one compiled decode step: ten of them (eval
    --compile over ten checkpoints) compile past dynamo's default limit of eight, and each
    decodes what the eager engine does."""
    import dataclasses

    from test_architecture import SHAPES

    for n_layer in range(1, 11):
        torch.manual_seed(n_layer)
        model = Transformer(dataclasses.replace(SHAPES["llama"], n_layer=n_layer)).eval()
        eager = generate_all(model, [[5, 6, 7]], GenerationConfig(4), slots=2)
        assert generate_all(model, [[5, 6, 7]], GenerationConfig(4), slots=2,
                            compile=True) == eager, n_layer


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("shape", ["llama", "gpt_bigcode"])
def test_cuda_graph_engine_decodes_what_the_eager_one_decodes(shape):
    """On CUDA the compiled engine's step is one CUDA graph replay: its tokens equal the eager
    engine's, greedy and sampled, as requests join and leave; a second engine of the same
    model decodes the same."""
    model = _model(shape).cuda()
    prompts, cfgs = _joining_requests("cuda")
    eager = generate_all(model, prompts, cfgs, slots=3)
    for _ in range(2):
        prompts, cfgs = _joining_requests("cuda")
        assert generate_all(model, prompts, cfgs, slots=3, compile=True) == eager


def _fed_shapes(monkeypatch) -> list[torch.Size]:
    """The shape of every chunk of ids fed to a model's blocks, in order."""
    runs = []
    real = Transformer.run_blocks

    def counting(self, idx, *args, **kwargs):
        runs.append(idx.shape)
        return real(self, idx, *args, **kwargs)

    monkeypatch.setattr(Transformer, "run_blocks", counting)
    return runs


def test_samples_of_one_prompt_share_its_prefill_and_differ_by_seed(monkeypatch):
    """Four samples of one prompt run one prefill between them, and each draws, by its own seed,
    generate's tokens at batch 1: the samples differ."""
    model = _model("llama")
    prompt = _prompts(1)[0]
    runs = _fed_shapes(monkeypatch)
    cfgs = [GenerationConfig(10, temperature=1.0, generator=torch.Generator().manual_seed(s))
            for s in range(4)]
    got = generate_all(model, [prompt] * 4, cfgs, slots=4)
    prefills = [shape for shape in runs if shape[1] > 1]
    assert prefills == [torch.Size([1, len(prompt)])]  # one prefill for the four samples
    assert len({tuple(t) for t in got}) > 1
    for seed, tokens in enumerate(got):
        g = torch.Generator().manual_seed(seed)
        assert tokens == _alone(model, prompt, 10, temperature=1.0, generator=g)


def test_a_sample_admitted_beside_a_running_one_of_its_prompt_copies_its_keys(monkeypatch):
    """Two slots, five samples of one prompt of different lengths: the later ones join as
    slots free, beside a running sample of the same prompt whose keys they copy. One prefill
    in all, and each sample's tokens are generate's with its generator."""
    model = _model("llama")
    prompt = _prompts(2)[1]
    runs = _fed_shapes(monkeypatch)
    budgets = [3, 9, 5, 7, 4]
    cfgs = [GenerationConfig(n, temperature=0.9, generator=torch.Generator().manual_seed(s))
            for s, n in enumerate(budgets)]
    got = generate_all(model, [prompt] * 5, cfgs, slots=2)
    assert [shape for shape in runs if shape[1] > 1] == [torch.Size([1, len(prompt)])]
    monkeypatch.undo()
    for seed, (n, tokens) in enumerate(zip(budgets, got)):
        g = torch.Generator().manual_seed(seed)
        assert tokens == _alone(model, prompt, n, temperature=0.9, generator=g)


def test_eos_stop_ids_and_stop_strings_end_a_request_as_generate_ends_it():
    """An EOS, a stop id sequence and a stop string end a request where generate ends it, finished
    "stop"; a request that runs out of budget is finished "length"."""
    model = _model("codegen")
    prompts = _prompts(5)
    free = [_alone(model, p, 20) for p in prompts]
    eos = free[0][6]  # a token the first prompt emits, so at least one row ends on it
    stop_ids = free[1][3:5]
    decode = " ".join
    words = [str(t) for t in free[2]]
    stop_text = f"{words[4]} {words[5]}"
    decode_ids = lambda ids: decode(str(t) for t in ids)  # noqa: E731
    cfgs = [GenerationConfig(20, eos_id=eos), GenerationConfig(20, stop=[stop_ids]),
            GenerationConfig(20, stop=stop_text, decode=decode_ids), GenerationConfig(20),
            GenerationConfig(20, eos_id=eos)]
    engine = Engine(model, slots=2)
    ids = [engine.add(p, c) for p, c in zip(prompts, cfgs)]
    tokens: dict[int, list[int]] = {i: [] for i in ids}
    reasons = {}
    for event in engine.run():
        tokens[event.request].append(event.token)
        if event.finished:
            reasons[event.request] = event.finished
    assert tokens[ids[0]] == free[0][: free[0].index(eos) + 1] and reasons[ids[0]] == "stop"
    ends = next(n for n in range(2, 21) if free[1][n - 2 : n] == stop_ids)
    assert tokens[ids[1]] == free[1][:ends] and reasons[ids[1]] == "stop"
    cut = next(n for n in range(1, 21) if stop_text in decode_ids(free[2][:n]))
    assert tokens[ids[2]] == free[2][:cut] and reasons[ids[2]] == "stop"
    assert tokens[ids[3]] == free[3] and reasons[ids[3]] == "length"
    for i in range(3):
        ref = _alone(model, prompts[i], 20, **{k: v for k, v in dataclasses.asdict(
            cfgs[i]).items() if k in ("eos_id", "stop", "decode") and v})
        assert tokens[ids[i]][: len(ref)] == ref[: len(tokens[ids[i]])]


def test_an_eos_drawn_as_the_last_token_max_new_tokens_allows_finishes_stop():
    """An EOS that is also the max_new_tokens-th token ends its request "stop", as OpenAI's API
    and vLLM report an answer the model ended; the same tokens without that EOS end "length"."""
    model = _model("codegen")
    prompt = _prompts(1)[0]
    free = _alone(model, prompt, 8)
    eos = free[5]
    last = free.index(eos) + 1  # the EOS's first place: the budget ends there too
    engine = Engine(model, slots=2)
    ended = engine.add(prompt, GenerationConfig(last, eos_id=eos))
    ran_out = engine.add(prompt, GenerationConfig(last))
    tokens: dict[int, list[int]] = {ended: [], ran_out: []}
    reasons = {}
    for event in engine.run():
        tokens[event.request].append(event.token)
        if event.finished:
            reasons[event.request] = event.finished
    assert tokens[ended] == tokens[ran_out] == free[:last]
    assert reasons == {ended: "stop", ran_out: "length"}


def test_logprobs_are_the_models_own_distribution():
    """Each token's logprob and top_logprobs are the log-softmax of the model's logits at its
    position (1e-4), the top k in order, the greedy token first; a sampled token's logprob is
    its own, below the likeliest's where the draw took another."""
    model = _model("llama")
    prompt = _prompts(1)[0]
    engine = Engine(model, slots=2)
    greedy = engine.add(prompt, GenerationConfig(3), logprobs=4)
    sampled = engine.add(prompt, GenerationConfig(
        12, temperature=3.0, generator=torch.Generator().manual_seed(0)), logprobs=1)
    events = list(engine.run())
    unlikeliest = 0.0
    for request in (greedy, sampled):
        mine = [e for e in events if e.request == request]
        idx = torch.tensor([prompt + [e.token for e in mine]])
        with torch.no_grad():
            logp = torch.log_softmax(model(idx)[0].float(), dim=-1)
        for i, event in enumerate(mine):
            row = logp[len(prompt) - 1 + i]
            assert abs(event.logprob - float(row[event.token])) < 1e-4
            top = row.topk(4 if request == greedy else 1)
            assert [t for t, _ in event.top_logprobs] == top.indices.tolist()
            unlikeliest = min(unlikeliest, event.logprob - float(top.values[0]))
            if request == greedy:
                assert event.top_logprobs[0][0] == event.token  # the likeliest
    assert unlikeliest < -0.1  # a sampled token other than the likeliest was drawn


def test_a_cancelled_request_frees_its_slot_for_the_next():
    """A cancelled request yields nothing more and its slot takes the waiting request, which
    decodes the tokens it decodes alone."""
    model = _model("llama")
    prompts = _prompts(2)
    engine = Engine(model, slots=1)
    first = engine.add(prompts[0], GenerationConfig(30))
    second = engine.add(prompts[1], GenerationConfig(5))
    assert [e.request for e in engine.step()] == [first]
    engine.cancel(first)
    rest = list(engine.run())
    assert {e.request for e in rest} == {second}
    assert [e.token for e in rest] == _alone(model, prompts[1], 5)


@pytest.mark.parametrize("prompt, cfg, message", [
    ([], GenerationConfig(4), "prompt is empty"),
    ([1] * 60, GenerationConfig(8), "exceeds the context length 64"),
    ([1, 200], GenerationConfig(4), "outside"),
    ([1, 2], GenerationConfig(4, num_beams=2), "beam search"),
    ([1, 2], GenerationConfig(4, compile=True), r"Engine\(\.\.\., compile=True\)"),
    ([1, 2], GenerationConfig(0), "max_new_tokens must be >= 1"),
    ([1, 2], GenerationConfig(4, eos_id=500), "outside the vocabulary"),
])
def test_a_request_the_engine_cannot_run_is_refused_when_added(prompt, cfg, message):
    """A request the engine cannot run (an empty or too long prompt, ids or an EOS outside the
    vocabulary, beam search, compile per request, no new tokens) is refused at add, and the engine
    stays idle."""
    engine = Engine(_model("llama"), slots=1)
    with pytest.raises(ValueError, match=message):
        engine.add(prompt, cfg)
    assert not engine.busy


@pytest.mark.parametrize("logprobs", [-1, 97, 2.5])
def test_a_logprobs_count_outside_the_vocabulary_is_refused_when_added(logprobs):
    """A request's logprobs (the likeliest ids given beside each token) is a count in
    [0, vocab_size]: another is refused at add, and the requests already queued run on to the
    tokens they decode alone; the whole vocabulary is a count the engine gives."""
    model = _model("llama")
    prompt = _prompts(1)[0]
    engine = Engine(model, slots=2)
    engine.add(prompt, GenerationConfig(4))
    with pytest.raises(ValueError, match=r"logprobs must be an integer in \[0, vocab_size=96\]"):
        engine.add(prompt, GenerationConfig(4), logprobs=logprobs)
    assert [e.token for e in engine.run()] == _alone(model, prompt, 4)
    engine.add(prompt, GenerationConfig(1), logprobs=96)
    (event,) = engine.run()
    assert len(event.top_logprobs) == 96


def test_generate_all_refuses_a_config_count_other_than_the_prompts():
    """generate_all takes one config for all prompts or one for each: a list of another length
    is refused naming both counts (a shorter one would leave prompts without an answer)."""
    model = _model("llama")
    prompts = _prompts(3)
    with pytest.raises(ValueError, match=r"each of the 3 prompts, got 2"):
        generate_all(model, prompts, [GenerationConfig(2)] * 2)
    assert len(generate_all(model, prompts, [GenerationConfig(2)] * 3)) == 3


def test_a_generator_another_request_holds_is_refused():
    """Two sampled requests given one generator would draw their noise from it in row order,
    so each one's tokens would depend on the other: the second is refused naming the fix, and
    it can be added once the first has finished or was cancelled; greedy requests, which draw
    nothing, may share one."""
    engine = Engine(_model("llama"), slots=2)
    shared = torch.Generator().manual_seed(0)
    cfg = GenerationConfig(4, temperature=1.0, generator=shared)
    first = engine.add([5, 6, 7], cfg)
    with pytest.raises(ValueError, match="another queued or running request's: give each"):
        engine.add([8, 9], cfg)
    engine.cancel(first)
    engine.add([8, 9], cfg)
    assert len(list(engine.run())) == 4
    engine.add([8, 9], cfg)
    assert len(list(engine.run())) == 4
    greedy = GenerationConfig(4, generator=shared)
    engine.add([5, 6, 7], greedy)
    engine.add([8, 9], greedy)
    assert len(list(engine.run())) == 8
    engine.add([5, 6, 7], cfg)  # a greedy request that ends frees no sampled one's generator
    engine.add([8], GenerationConfig(1, generator=shared))
    list(engine.step())
    with pytest.raises(ValueError, match="another queued or running request's"):
        engine.add([8, 9], cfg)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_a_cpu_generator_for_a_cuda_engine_is_refused_when_added():
    """A request's noise is drawn on the engine's device: a CPU generator there would fail at
    its first draw, in the middle of other requests' steps, so add refuses it naming the fix."""
    engine = Engine(_model("llama").cuda(), slots=2)
    cfg = GenerationConfig(4, temperature=1.0, generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match=r"generator is on cpu and the model on cuda"):
        engine.add([5, 6, 7], cfg)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_samples_equal_generates_and_a_decode_step_waits_on_the_device_once():
    """On CUDA, each request's noise from its own CUDA generator gives generate's samples at
    batch 1; a decode step of eight sampled rows reads the device back once (the tokens)."""
    import warnings

    model = _model("llama").cuda()
    prompts = _prompts(8)

    def cfg(i):
        g = torch.Generator("cuda").manual_seed(200 + i)
        return GenerationConfig(12, temperature=0.8, top_p=0.95, generator=g)

    got = generate_all(model, prompts, [cfg(i) for i in range(8)], slots=8)
    for i, prompt in enumerate(prompts):
        g = torch.Generator("cuda").manual_seed(200 + i)
        assert got[i] == _alone(model, prompt, 12, temperature=0.8, top_p=0.95, generator=g), i
    engine = Engine(model, slots=8)
    for i, prompt in enumerate(prompts):
        engine.add(prompt, cfg(i))
    engine.step()  # the prefills and first tokens apart
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            events = engine.step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    assert len(events) == 8
    waits = [w for w in caught if "called a synchronizing" in str(w.message)]
    assert len(waits) == 1, [str(w.message) for w in waits]
