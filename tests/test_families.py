"""codelm against transformers on tiny random checkpoints of today's code-model families (Qwen2
as in Qwen2.5-Coder, Qwen3, Mistral, StarCoder2, Phi-3 as in Phi-4-mini, Gemma 2, StableLM) and of Llama's
linear, dynamic and YaRN rope scalings: logits over inputs longer than the sliding window,
greedy generation past it, export back into transformers, bf16."""

import json
import math

import pytest
import torch
from test_architecture import gen
from test_pretrained import _ids
from tiny_hf import MODERN, WINDOW, save_tiny_hf, tiny_checkpoints

from codelm.models import families, pretrained

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    return tiny_checkpoints(MODERN, tmp_path_factory)


def _hf_greedy(hf, idx, new_tokens, attention_mask=None):
    """transformers' greedy continuation, EOS switched off so that it runs past the window."""
    mask = torch.ones_like(idx) if attention_mask is None else attention_mask.long()
    return hf.generate(idx, attention_mask=mask, max_new_tokens=new_tokens, do_sample=False,
                       eos_token_id=None, pad_token_id=0)


@pytest.mark.parametrize("name", MODERN)
def test_logits_match_transformers_on_inputs_longer_than_the_window(checkpoints, name):
    """Over 200 positions, past the sliding window (48), each modern family's logits are within
    1e-5 of transformers': sliding layers see only their window, the others everything before."""
    _, hf, model = checkpoints[name]
    idx = _ids(2, 200)  # 200 > WINDOW: the sliding layers see only their last 48 positions
    with torch.no_grad():
        ref = hf(idx).logits
    got = model(idx)
    assert got.shape == ref.shape == (2, 200, 256)
    # 1e-5 (codelm is within 4e-7): the smallest trait tested, the scaling of dynamic aside,
    # moves these logits by more than 1e-4
    assert (got - ref).abs().max().item() <= 1e-5



@pytest.mark.parametrize("name", ["gemma2", "qwen2-window"])
def test_a_config_without_layer_types_slides_the_layers_transformers_derives(name, tmp_path):
    """A config.json without layer_types (an older transformers writes none) slides the layers
    transformers derives: Gemma 2's every other one from the first, Qwen2's from
    max_window_layers on. Over 200 positions, past the window, the logits are transformers'."""
    import transformers

    save_tiny_hf(name, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    del config["layer_types"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    model = pretrained.load(tmp_path)
    idx = _ids(1, 200, seed=5)
    with torch.no_grad():
        ref = hf(idx).logits
    assert (model(idx) - ref).abs().max().item() <= 1e-5

# No family's class default: each family's reader must take it from config.json.
ROPE_THETA = 123456.0


@pytest.mark.parametrize("name", MODERN)
def test_each_family_rotates_by_the_rope_theta_its_config_names(name, tmp_path):
    """A rope_theta that no config class defaults to reaches every modern family's rotation: over
    100 positions the logits are within 1e-5 of transformers', which a rotation by the class
    default (10000) would move by more than that."""
    hf = save_tiny_hf(name, tmp_path, rope_theta=ROPE_THETA)
    model = pretrained.load(tmp_path)
    assert model.cfg.rope_theta == ROPE_THETA
    idx = _ids(1, 100, seed=4)
    with torch.no_grad():
        ref = hf(idx).logits
    assert (model(idx) - ref).abs().max().item() <= 1e-5


@pytest.mark.parametrize("name", MODERN)
def test_greedy_generation_matches_transformers_past_the_window(checkpoints, name):
    """64 greedy tokens after a 16-token prompt, past the 48-position window, are transformers':
    the cached decode hides what the window hides."""
    _, hf, model = checkpoints[name]
    idx = _ids(2, 16, seed=1)
    ref = _hf_greedy(hf, idx, 64)  # 16 + 64 positions, past the 48 of the window
    got = gen(model, idx, 64)
    assert ref.shape == (2, 80)
    assert torch.equal(got, ref)


def test_longrope_decoding_switches_where_transformers_recomputes_its_cache(checkpoints):
    """Phi-4-mini's LongRoPE: a sequence past the original context (64 here) takes the long
    frequencies; transformers recomputes the cache when decoding reaches it. Prompts of 20 to 70
    tokens decoded through the engine (4 slots, prompts joining as others finish) and one at a
    time equal transformers' greedy tokens, before, across and after the switch; beam search,
    which does not recompute, refuses to cross it."""
    from codelm.models.engine import generate_all
    from codelm.models.generation import GenerationConfig, longrope_switch

    _, hf, model = checkpoints["phi3"]
    assert longrope_switch(model) == 64
    prompts = [_ids(1, n, seed=n)[0].tolist() for n in (20, 50, 63, 64, 70)]
    want = [_hf_greedy(hf, torch.tensor([p]), 30)[0, len(p):].tolist() for p in prompts]
    assert generate_all(model, prompts, GenerationConfig(30), slots=4) == want
    for prompt, new in zip(prompts, want):
        assert gen(model, torch.tensor([prompt]), 30)[0, len(prompt):].tolist() == new
    with pytest.raises(ValueError, match="LongRoPE frequencies switch at position 64"):
        gen(model, torch.tensor([prompts[1]]), 30, num_beams=2, eos_id=[2])
    assert gen(model, torch.tensor([prompts[0]]), 30, num_beams=2, eos_id=[2]).shape[1] <= 50
    padded = torch.tensor([prompts[4], [0] * 20 + prompts[1]])  # the 50-token row crosses
    mask = torch.ones_like(padded, dtype=torch.bool)
    mask[1, :20] = False
    with pytest.raises(ValueError, match="LongRoPE frequencies switch at position 64"):
        gen(model, padded, 30, attention_mask=mask, num_beams=2, eos_id=[2])


def test_a_sample_joining_after_its_twin_passed_longrope_switch_is_prefilled_anew(checkpoints):
    """Samples of one prompt share its prefill, unless the running one has passed the switch
    (its row recomputed the long way, prompt keys too): a sample admitted then is the same,
    log-prob for log-prob, as one admitted with it."""
    from codelm.models.engine import Engine
    from codelm.models.generation import GenerationConfig

    model = checkpoints["phi3"][2]
    prompt = _ids(1, 60, seed=9)[0].tolist()

    def logprobs(late: bool) -> list[float]:
        engine = Engine(model, slots=2)
        engine.add(prompt, GenerationConfig(30), logprobs=1)
        steps = 10 if late else 0  # 10 steps: the first request is past position 64
        events = [event for _ in range(steps) for event in engine.step()]
        second = engine.add(prompt, GenerationConfig(8), logprobs=1)
        events += list(engine.run())
        return [event.logprob for event in events if event.request == second]

    assert logprobs(late=True) == pytest.approx(logprobs(late=False), abs=1e-5)


@pytest.mark.parametrize("name", ["qwen2-window", "mistral", "gemma2"])
def test_left_padded_generation_matches_transformers(checkpoints, name):
    """Padding counts toward the window as transformers counts it: in cache slots."""
    _, hf, model = checkpoints[name]
    idx = _ids(2, 40, seed=2)
    mask = torch.ones_like(idx, dtype=torch.bool)
    mask[1, :7] = False
    idx[1, :7] = 0
    ref = _hf_greedy(hf, idx, 24, mask)
    got = gen(model, idx, 24, attention_mask=mask)
    assert torch.equal(got, ref)


@pytest.mark.parametrize("name", MODERN)
def test_export_loads_in_transformers_with_the_same_logits(checkpoints, name, tmp_path):
    """Each modern family exports to a checkpoint transformers loads as the same model class, with
    the original's logits, and codelm reads back the same config."""
    import transformers

    _, hf, model = checkpoints[name]
    pretrained.save(model, tmp_path)
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(back) is type(hf)
    idx = _ids(1, 100, seed=3)
    with torch.no_grad():
        assert (back(idx).logits - hf(idx).logits).abs().max().item() <= 1e-5
    assert pretrained.load(tmp_path).cfg == model.cfg


@pytest.mark.parametrize("name", ["qwen2", "qwen3", "starcoder2", "phi3", "gemma", "gemma2"])
def test_bf16_logits_are_as_close_as_transformers_own_bf16(checkpoints, name):
    """Against the fp32 logits, codelm in bf16 errs no more than transformers in bf16 does
    (times 1.5: the two round at different places)."""
    path, hf, _ = checkpoints[name]
    idx = _ids(2, 100, seed=4)
    with torch.no_grad():
        ref = hf(idx).logits
        theirs = hf.to(torch.bfloat16)(idx).logits.float()
    hf.float()
    ours = pretrained.load(path, dtype=torch.bfloat16)(idx).float()
    their_error = (theirs - ref).abs().max().item()
    assert their_error > 0
    assert (ours - ref).abs().max().item() <= 1.5 * their_error


def _edit_config(path, **values) -> None:
    config = path / "config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), **values}))


def test_released_gemma_gelu_reads_as_gelu_tanh_as_transformers_reads_it(tmp_path):
    """Gemma's and CodeGemma's released configs say hidden_act "gelu"; GemmaConfig reads it as
    GELU-tanh, and so does codelm (geglu: gated GELU-tanh)."""
    import transformers

    save_tiny_hf("gemma", tmp_path)
    _edit_config(tmp_path, hidden_act="gelu")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert hf.config.hidden_act == "gelu_pytorch_tanh"
    model = pretrained.load(tmp_path)
    assert model.cfg.mlp == "geglu"
    idx = _ids(1, 60, seed=5)
    with torch.no_grad():
        assert (model(idx) - hf(idx).logits).abs().max().item() <= 1e-5


def test_gemma2_scalar_equal_to_head_dim_is_the_default_scale_and_written_back(tmp_path):
    """Gemma 2's query_pre_attn_scalar equal to head_dim is the default 1/sqrt(head_dim) scale
    (attn_scale None); the export writes it back (Gemma2Config's default is 256), so transformers
    computes the same logits."""
    import transformers

    save_tiny_hf("gemma2", tmp_path)
    _edit_config(tmp_path, query_pre_attn_scalar=32)  # the tiny checkpoint's head_dim
    model = pretrained.load(tmp_path)
    assert model.cfg.attn_scale is None
    pretrained.save(model, tmp_path / "out")
    assert json.loads((tmp_path / "out" / "config.json").read_text())[
        "query_pre_attn_scalar"] == 32
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    idx = _ids(1, 60, seed=6)
    with torch.no_grad():
        assert (model(idx) - hf(idx).logits).abs().max().item() <= 1e-5


@pytest.mark.parametrize("scalar", [0, -1, -64.0])
def test_gemma2_scalar_that_is_not_positive_is_one_line_naming_the_file(tmp_path, scalar):
    """Gemma 2's query_pre_attn_scalar scales the scores by its inverse square root, which only a
    positive number has: another is a ValueError naming config.json and the key."""
    save_tiny_hf("gemma2", tmp_path)
    _edit_config(tmp_path, query_pre_attn_scalar=scalar)
    with pytest.raises(ValueError, match=rf"config\.json: query_pre_attn_scalar={scalar!r}: "
                                         "must be a positive number"):
        families.read_config(tmp_path)


def test_sliding_layers_are_read_as_transformers_lays_them_out(checkpoints):
    """Which layers slide is read as transformers lays them out: Gemma 2 every other layer from the
    first, Qwen2 from max_window_layers on, Mistral every layer, Qwen2 without use_sliding_window
    none."""
    assert checkpoints["gemma2"][2].cfg.sliding_layers == [True, False, True]
    assert checkpoints["qwen2-window"][2].cfg.sliding_layers == [False, True, True]
    assert checkpoints["mistral"][2].cfg.sliding_window == WINDOW
    assert checkpoints["mistral"][2].cfg.sliding_layers is None  # every layer
    assert checkpoints["qwen2"][2].cfg.sliding_window is None


@pytest.mark.parametrize("rope, message", [
    ({"rope_type": "mrope", "mrope_section": [4, 2, 2]},
     r"rope_type 'mrope' is not supported \(supported: default, llama3, linear"),
    ({"rope_type": ["yarn"], "factor": 2.0},
     r"rope_type \['yarn'\] is not supported \(supported: default, llama3, linear"),
    ({"rope_type": "longrope", "short_factor": [1.0], "long_factor": [1.0]},
     r"ModelConfig.rope_scaling=.*: short_factor needs rotary_dim / 2 = 8 values"),
    ({"rope_type": "linear"}, r"linear rope scaling lacks \['factor'\]"),
    ({"rope_type": "yarn", "original_max_position_embeddings": "64"},
     r"original_max_position_embeddings='64': expected an integer"),
])
def test_unsupported_rope_scaling_is_one_line_naming_the_file(tmp_path, rope, message):
    """A rope scaling codelm cannot compute (mrope, a rope_type that is no name), LongRoPE
    factors of the wrong length, a scaling without its factor, or a context length that is no
    integer is a ValueError naming config.json and what is wrong."""
    save_tiny_hf("mistral", tmp_path)
    config = tmp_path / "config.json"
    values = json.loads(config.read_text())
    values.pop("rope_parameters", None)
    values["rope_scaling"] = rope
    config.write_text(json.dumps(values))
    with pytest.raises(ValueError, match=rf"config\.json: {message}"):
        families.read_config(tmp_path)


@pytest.mark.parametrize("family", ["qwen2", "starcoder2", "phi3", "phi"])
def test_an_explicit_head_dim_is_read_as_transformers_reads_it_and_written_back(tmp_path,
                                                                                 family):
    """head_dim 32 with 64 wide and 4 heads (q/k/v rows 128): transformers' attention reads it
    (and Phi's rotary its share of it); codelm's logits equal transformers', and its export
    loads there with the same logits."""
    import transformers

    # (Phi3Config checks LongRoPE's factors against hidden_size / heads, its rotary against
    # head_dim: no LongRoPE config has both; Phi-4-mini's head_dim is hidden_size / heads)
    plain = {"rope_scaling": None} if family == "phi3" else {}
    save_tiny_hf(family, tmp_path, head_dim=32, **plain)
    model = pretrained.load(tmp_path)
    assert model.cfg.head_dim == 32 and model.cfg.n_embd // model.cfg.n_head != 32
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    idx = _ids(1, 40, seed=7)
    with torch.no_grad():
        assert (model(idx) - hf(idx).logits).abs().max().item() <= 1e-5
        pretrained.save(model, tmp_path / "out")
        back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
        assert (model(idx) - back(idx).logits).abs().max().item() <= 1e-5


def test_a_phi3_rope_scaling_transformers_refuses_is_refused(tmp_path):
    """Phi3Config takes longrope alone: linear on a Phi-3 is refused in one line, never loaded
    and exported as a checkpoint transformers cannot open."""
    save_tiny_hf("phi3", tmp_path)
    _edit_config(tmp_path, rope_parameters=None, rope_scaling={"type": "linear", "factor": 4.0})
    with pytest.raises(ValueError, match=r"config\.json: rope scaling 'linear' .* phi3"):
        families.read_config(tmp_path)


def test_phi3_longrope_without_a_top_level_original_context_takes_phi3_config_default(tmp_path):
    """A Phi-3 config.json naming LongRoPE's original context only inside rope_scaling: Phi3Config
    takes its own top-level default (4096) over the rope dict's, so transformers keeps the short
    factors over 100 positions; codelm's logits are transformers'."""
    import transformers

    save_tiny_hf("phi3", tmp_path)
    config = tmp_path / "config.json"
    values = json.loads(config.read_text())
    rope = values.pop("rope_parameters")
    del values["original_max_position_embeddings"]
    values["rope_scaling"] = {"type": "longrope", "short_factor": rope["short_factor"],
                              "long_factor": rope["long_factor"],
                              "original_max_position_embeddings": 64}
    config.write_text(json.dumps(values))
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    model = pretrained.load(tmp_path)
    assert model.cfg.rope_scaling["original_max_position_embeddings"] == 4096
    idx = _ids(1, 100, seed=8)  # past the rope dict's 64
    with torch.no_grad():
        assert (model(idx) - hf(idx).logits).abs().max().item() <= 1e-5


@pytest.mark.parametrize("name", ["su", "yarn"])
def test_a_phi3_rope_dict_of_type_su_or_yarn_is_longrope(name, tmp_path):
    """Phi-3's first config.json files name LongRoPE "su" (or "yarn"), which Phi3Config reads as
    longrope: codelm loads them as LongRoPE too, and its logits past the original context are
    transformers'."""
    import transformers

    save_tiny_hf("phi3", tmp_path)
    config = tmp_path / "config.json"
    values = json.loads(config.read_text())
    rope = values.pop("rope_parameters")
    values["rope_scaling"] = {"type": name, "short_factor": rope["short_factor"],
                              "long_factor": rope["long_factor"],
                              "original_max_position_embeddings": 64}
    config.write_text(json.dumps(values))
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    model = pretrained.load(tmp_path)
    assert model.cfg.rope_scaling["rope_type"] == "longrope"
    idx = _ids(1, 100, seed=8)  # past the original context, on the long factors
    with torch.no_grad():
        assert (model(idx) - hf(idx).logits).abs().max().item() <= 1e-5


def test_key_value_heads_left_out_of_config_json_are_the_config_class_default(tmp_path):
    """A StarCoder2 config.json without num_key_value_heads: Starcoder2Config's default is 2
    key/value heads (not one per query head), so transformers loads the 2-head checkpoint; codelm
    reads the same number and its logits are transformers'."""
    import transformers

    save_tiny_hf("starcoder2", tmp_path)  # 4 query heads, 2 key/value heads
    config = tmp_path / "config.json"
    values = json.loads(config.read_text())
    del values["num_key_value_heads"]
    config.write_text(json.dumps(values))
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert hf.config.num_key_value_heads == 2
    model = pretrained.load(tmp_path)
    assert model.cfg.n_kv_head == 2
    idx = _ids(1, 60, seed=9)
    with torch.no_grad():
        assert (model(idx) - hf(idx).logits).abs().max().item() <= 1e-5


def test_a_null_key_value_heads_is_one_per_query_head_as_qwen2_config_reads_it(tmp_path):
    """num_key_value_heads null in a Qwen2 config.json: Qwen2Config's __post_init__ gives one
    key/value head per query head (not its default 32), and so does codelm."""
    import transformers

    save_tiny_hf("qwen2", tmp_path, num_key_value_heads=4)
    _edit_config(tmp_path, num_key_value_heads=None)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert hf.config.num_key_value_heads == 4
    assert pretrained.load(tmp_path).cfg.n_kv_head == 4


def test_llama_longrope_decoding_past_the_switch_keeps_its_cache_as_transformers_does(tmp_path):
    """A Llama with LongRoPE (original context 64): transformers' Llama keeps the cache when
    decoding passes the original context (earlier keys rotated the short way, later ones the
    long way; only its Phi-3 recomputes the cache there); greedy decoding from 16 to 86
    positions gives transformers' tokens."""
    longrope = {"rope_type": "longrope", "original_max_position_embeddings": 64,
                "short_factor": [1.0 + 0.1 * i for i in range(8)],
                "long_factor": [1.0 + 1.5 * i for i in range(8)]}
    hf = save_tiny_hf("llama-linear", tmp_path, rope_scaling=longrope)
    model = pretrained.load(tmp_path)
    idx = _ids(2, 16, seed=1)
    assert torch.equal(gen(model, idx, 70), _hf_greedy(hf, idx, 70))


def test_yarn_with_mscale_and_mscale_all_dim_scales_attention_as_transformers_does(tmp_path):
    """YaRN's attention factor with both ``mscale`` and ``mscale_all_dim`` (DeepSeek's form) is
    (0.1 mscale ln(factor) + 1) / (0.1 mscale_all_dim ln(factor) + 1); the logits over 100
    positions are within 1e-5 of transformers' Llama with that scaling."""
    yarn = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64,
            "mscale": 2.0, "mscale_all_dim": 0.5}
    hf = save_tiny_hf("llama-yarn", tmp_path, rope_scaling=yarn)
    model = pretrained.load(tmp_path)
    expected = (0.2 * math.log(4.0) + 1) / (0.05 * math.log(4.0) + 1)
    assert model.rope.attention_factor == pytest.approx(expected, rel=1e-12)
    idx = _ids(1, 100, seed=4)
    with torch.no_grad():
        ref = hf(idx).logits
    assert (model(idx) - ref).abs().max().item() <= 1e-5
