"""lora.py against PEFT on the transformers models of every family, plus merge and QLoRA."""

from __future__ import annotations

import copy
import json
import math
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import transformers as tf
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from tiny_hf import save_tiny_hf, tiny_hf_config, tiny_hf_model

import lora
from architecture import PRESETS, Transformer
from codelm import kernels, trainconfig
from codelm.models import adapter_config, families, pretrained, quantize
from codelm.models.adapter_config import LoRAConfig
from codelm.models.quantize import QuantLinear, quantize_base
from lora import (
    LoRALinear,
    apply_lora,
    load_adapter,
    lora_modules,
    merge_and_export,
    merge_lora,
    save_adapter,
    unmerge_lora,
)

# (family, tiny-config overrides, LoRA setting): every seed's targets plus an embedding LoRA, and
# every row layout of the fused qkv (multi-query, per-head interleaved, CodeGen's permuted chunks,
# Llama's GQA slices, SwiGLU's gate/up halves).
CASES = {
    "gpt_bigcode": ("gpt_bigcode", {}, dict(r=16, alpha=32, dropout=0.08,
                                            target_modules=["c_proj", "c_attn", "wte"])),
    "gpt_bigcode_mha": ("gpt_bigcode", {"multi_query": False},
                        dict(r=4, alpha=8, target_modules=["c_attn", "c_fc"])),
    "codegen": ("codegen", {}, dict(r=8, alpha=32, target_modules=[
        "wte", "qkv_proj", "out_proj", "fc_in", "fc_out"])),
    "phi": ("phi", {}, dict(r=4, alpha=16, use_rslora=True, target_modules=[
        "q_proj", "k_proj", "v_proj", "dense", "fc1", "fc2", "lm_head", "embed_tokens"])),
    "llama": ("llama", {}, dict(r=16, alpha=32, dropout=0.05, target_modules=[
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "embed_tokens"])),
    # Today's families: Qwen2's biased q/k/v, StarCoder2's c_fc/c_proj, Phi-3's fused qkv_proj
    # and gate_up_proj (one adapter each over the whole fused module), Qwen3, Gemma 2.
    "qwen2": ("qwen2", {}, dict(r=8, alpha=16, dropout=0.05, target_modules=[
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])),
    "starcoder2": ("starcoder2", {}, dict(r=8, alpha=16, target_modules=[
        "q_proj", "k_proj", "v_proj", "o_proj", "c_fc", "c_proj"])),
    "phi3": ("phi3", {}, dict(r=8, alpha=16, target_modules=[
        "qkv_proj", "o_proj", "gate_up_proj", "down_proj"])),
    "qwen3": ("qwen3", {}, dict(r=4, alpha=8, target_modules=["q_proj", "k_proj", "o_proj"])),
    "gemma2": ("gemma2", {}, dict(r=4, alpha=8, target_modules=[
        "q_proj", "v_proj", "gate_proj", "up_proj", "down_proj"])),
}


def _peft_config(setting: dict) -> LoraConfig:
    return LoraConfig(r=setting["r"], lora_alpha=setting["alpha"],
                      lora_dropout=setting.get("dropout", 0.0),
                      target_modules=setting["target_modules"],
                      use_rslora=setting.get("use_rslora", False), task_type="CAUSAL_LM")


def _pair(case: str, tmp_path):
    family, overrides, setting = CASES[case]
    hf = save_tiny_hf(family, tmp_path / "hf", **overrides)
    return hf, pretrained.load(tmp_path / "hf"), setting


def _ids(seed: int = 0, batch: int = 2, T: int = 24) -> torch.Tensor:
    return torch.randint(0, 256, (batch, T), generator=torch.Generator().manual_seed(seed))


def _train(model, steps: int, lr: float = 1e-2, ids: torch.Tensor | None = None) -> list[float]:
    ids = _ids() if ids is None else ids
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    losses = []
    for _ in range(steps):
        logits = model(ids[:, :-1])
        loss = F.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten())
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    model.eval()
    return losses


@torch.no_grad()
def _logits(model, ids):
    out = model(ids)
    return (out.logits if hasattr(out, "logits") else out).float()


@pytest.mark.parametrize("case", list(CASES))
def test_codelm_adapter_loads_in_peft(case, tmp_path):
    """An adapter codelm trains and saves loads in PEFT on the transformers model with codelm's
    logits (within 1e-4), for every family and row layout, with PEFT's trainable count."""
    hf, model, setting = _pair(case, tmp_path)
    report = apply_lora(model, LoRAConfig(**setting))
    _train(model, steps=3)
    save_adapter(model, tmp_path / "adapter")
    peft_model = PeftModel.from_pretrained(copy.deepcopy(hf), tmp_path / "adapter").eval()
    ids = _ids(1)
    ours, theirs, base = _logits(model, ids), _logits(peft_model, ids), _logits(hf, ids)
    assert (ours - base).abs().max() > 1e-2  # the trained adapter changes the model...
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=0)  # ...exactly as PEFT reads it
    n_peft = sum(p.numel() for n, p in peft_model.named_parameters() if "lora_" in n)
    assert report.trainable_params == n_peft


@pytest.mark.parametrize("case", list(CASES))
def test_peft_adapter_loads_in_codelm(case, tmp_path):
    """An adapter PEFT writes (every weight non-zero) loads in codelm with PEFT's logits and
    trainable count, for every family and row layout."""
    hf, model, setting = _pair(case, tmp_path)
    peft_model = get_peft_model(copy.deepcopy(hf), _peft_config(setting))
    with torch.no_grad():  # PEFT starts B (embedding: A) at zero; make every adapter count
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn_like(p) * 0.1)
    peft_model.save_pretrained(tmp_path / "peft")
    report = load_adapter(model, tmp_path / "peft")
    ids = _ids(2)
    torch.testing.assert_close(_logits(model, ids), _logits(peft_model.eval(), ids),
                               atol=1e-4, rtol=0)
    assert report.trainable_params == peft_model.get_nb_trainable_parameters()[0]


@pytest.mark.parametrize("family", ["qwen2", "phi3", "gemma", "gemma2", "stablelm"])
def test_all_linear_adapts_what_peft_adapts_and_loads_there(family, tmp_path):
    """PEFT's "all-linear": every Linear by its last name, the output layer left out."""
    hf = save_tiny_hf(family, tmp_path / "hf")
    model = pretrained.load(tmp_path / "hf")
    report = apply_lora(model, LoRAConfig(r=4, alpha=8, target_modules="all-linear"))
    peft_model = get_peft_model(copy.deepcopy(hf), LoraConfig(r=4, lora_alpha=8,
                                                             target_modules="all-linear"))
    assert report.trainable_params == peft_model.get_nb_trainable_parameters()[0]
    _train(model, steps=3)
    save_adapter(model, tmp_path / "adapter")
    theirs = PeftModel.from_pretrained(copy.deepcopy(hf), tmp_path / "adapter").eval()
    torch.testing.assert_close(_logits(model, _ids(1)), _logits(theirs, _ids(1)),
                               atol=1e-4, rtol=0)


# DoRA on each row layout: whole modules (gpt_bigcode), Llama's GQA slices, CodeGen's permuted
# chunks (scattered rows).
DORA_CASES = {
    "gpt_bigcode": dict(r=4, alpha=8, target_modules=["c_attn", "c_proj", "c_fc"]),
    "llama": dict(r=4, alpha=8, target_modules=["q_proj", "v_proj", "o_proj", "gate_proj"]),
    "codegen": dict(r=4, alpha=8, target_modules=["qkv_proj", "fc_in"]),
}


@pytest.mark.parametrize("family", list(DORA_CASES))
def test_dora_adapters_load_both_ways_with_peft_and_merge(family, tmp_path):
    """PEFT's DoRA adapter (a magnitude per output row) gives PEFT's logits in codelm; codelm's,
    trained, gives its own logits in PEFT; merging and unmerging keep them."""
    setting = DORA_CASES[family]
    hf = save_tiny_hf(family, tmp_path / "hf")
    peft_model = get_peft_model(copy.deepcopy(hf), LoraConfig(
        r=setting["r"], lora_alpha=setting["alpha"], target_modules=setting["target_modules"],
        use_dora=True, init_lora_weights=False))
    with torch.no_grad():  # magnitudes off the weights' norms, so that they count
        for name, p in peft_model.named_parameters():
            if "lora_magnitude_vector" in name:
                p.mul_(1 + 0.2 * torch.randn_like(p))
    peft_model.save_pretrained(tmp_path / "peft")
    ids = _ids(3)
    model = pretrained.load(tmp_path / "hf")
    report = load_adapter(model, tmp_path / "peft")
    want = _logits(peft_model.eval(), ids)
    assert (want - _logits(hf, ids)).abs().max() > 1e-2
    torch.testing.assert_close(_logits(model, ids), want, atol=1e-5, rtol=0)
    assert report.trainable_params == peft_model.get_nb_trainable_parameters()[0]

    ours = pretrained.load(tmp_path / "hf")
    apply_lora(ours, LoRAConfig(**setting, use_dora=True))
    start = {n: p.detach().clone() for n, p in ours.named_parameters() if "magnitude" in n}
    _train(ours, steps=3)
    assert all(not torch.equal(p, start[n]) for n, p in ours.named_parameters() if n in start)
    save_adapter(ours, tmp_path / "ours")
    assert json.loads((tmp_path / "ours" / "adapter_config.json").read_text())["use_dora"]
    theirs = PeftModel.from_pretrained(copy.deepcopy(hf), tmp_path / "ours").eval()
    trained = _logits(ours, ids)
    torch.testing.assert_close(_logits(theirs, ids), trained, atol=1e-5, rtol=0)
    merge_lora(ours)
    torch.testing.assert_close(_logits(ours, ids), trained, atol=1e-5, rtol=0)
    unmerge_lora(ours)
    torch.testing.assert_close(_logits(ours, ids), trained, atol=1e-5, rtol=0)


def _sgd_step(model, ids: torch.Tensor, lr: float) -> None:
    """One plain SGD step of the model's trainable parameters on next-token loss of ``ids``."""
    out = model(ids[:, :-1])
    logits = out.logits if hasattr(out, "logits") else out
    F.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten()).backward()
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.sub_(lr * p.grad)
                p.grad = None


@pytest.mark.parametrize("family", ["gpt_bigcode", "llama"])
def test_dora_trains_as_peft_with_the_row_norm_held_constant(family, tmp_path):
    """One SGD step on PEFT's DoRA adapter moves codelm's logits as it moves PEFT's: the
    gradients of A, B and the magnitude treat ||W + scale B A|| as a constant (PEFT's detach,
    DoRA's paper), so the update is PEFT's."""
    setting = DORA_CASES[family]
    hf = save_tiny_hf(family, tmp_path / "hf")
    peft_model = get_peft_model(copy.deepcopy(hf), LoraConfig(
        r=setting["r"], lora_alpha=setting["alpha"], target_modules=setting["target_modules"],
        use_dora=True, init_lora_weights=False)).eval()
    peft_model.save_pretrained(tmp_path / "peft")
    model = pretrained.load(tmp_path / "hf").eval()
    load_adapter(model, tmp_path / "peft")
    ids = _ids(5)
    for trained in (peft_model, model):
        _sgd_step(trained, ids, lr=2.0)
    want = _logits(peft_model, ids)
    assert (want - _logits(hf, ids)).abs().max() > 1e-2
    torch.testing.assert_close(_logits(model, ids), want, atol=1e-5, rtol=0)


def test_merged_dora_unmerges_after_the_model_moves_or_casts(tmp_path):
    """The row norms a DoRA merge keeps for its unmerge move and cast with the model (the meta
    device stands in for an accelerator): unmerging after ``.to(...)`` neither fails on a
    device mismatch nor leaves them behind in the state dict."""
    save_tiny_hf("codegen", tmp_path / "hf")
    model = pretrained.load(tmp_path / "hf")
    apply_lora(model, LoRAConfig(**DORA_CASES["codegen"], use_dora=True))
    _train(model, steps=2)
    ids = _ids(3)
    trained = _logits(model, ids)
    keys = set(model.state_dict())
    merge_lora(model)
    assert set(model.state_dict()) == keys
    model.double()
    unmerge_lora(model)
    torch.testing.assert_close(_logits(model, ids), trained, atol=1e-5, rtol=0)
    merge_lora(model)
    model.to("meta")
    unmerge_lora(model)
    assert all(p.device.type == "meta" for p in model.parameters())
    assert not [name for name, _ in model.named_buffers() if "merged_norms" in name]


# PEFT's bias and modules_to_save: extra base tensors trained and saved with the adapter.
SAVED_BASE_CASES = [
    ("gpt_bigcode", dict(target_modules=["c_attn"], bias="lora_only")),
    ("gpt_bigcode", dict(target_modules=["c_attn"], bias="all")),  # layer norms' biases too
    ("gpt_bigcode", dict(target_modules=["c_attn"], modules_to_save=["c_fc"])),
    ("llama", dict(target_modules=["q_proj"], modules_to_save=["norm"])),  # every *norm, as PEFT
    ("phi", dict(target_modules=["q_proj", "k_proj", "v_proj"], bias="lora_only")),  # fused
    ("codegen", dict(target_modules=["qkv_proj"], bias="all")),  # permuted rows
    # a target saved whole gets no adapter, as PEFT leaves it
    ("phi", dict(target_modules=["q_proj", "lm_head"], modules_to_save=["lm_head"])),
    ("llama", dict(target_modules=["q_proj", "v_proj", "down_proj"],
                   modules_to_save=["down_proj"])),
    # PEFT's ensure_weight_tying: a tied embedding and head train as one tensor, named by either
    ("llama", dict(target_modules=["q_proj"], modules_to_save=["embed_tokens"],
                   ensure_weight_tying=True)),
    ("gpt_bigcode", dict(target_modules=["c_attn"], modules_to_save=["lm_head"],
                         ensure_weight_tying=True)),
]


@pytest.mark.parametrize("family, setting", SAVED_BASE_CASES)
def test_bias_and_modules_to_save_round_trip_with_peft(family, setting, tmp_path):
    """PEFT's adapter with trained biases or whole modules gives PEFT's logits in codelm, with
    PEFT's trainable count; codelm's, trained, gives its logits in PEFT."""
    hf = save_tiny_hf(family, tmp_path / "hf")
    peft_model = get_peft_model(copy.deepcopy(hf), LoraConfig(r=2, lora_alpha=4,
                                                              init_lora_weights=False, **setting))
    with torch.no_grad():  # the biases and saved modules away from the base's
        for p in peft_model.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn_like(p))
    peft_model.save_pretrained(tmp_path / "peft")
    ids = _ids(4)
    model = pretrained.load(tmp_path / "hf")
    report = load_adapter(model, tmp_path / "peft")
    torch.testing.assert_close(_logits(model, ids), _logits(peft_model.eval(), ids),
                               atol=1e-5, rtol=0)
    assert report.trainable_params == peft_model.get_nb_trainable_parameters()[0]

    ours = pretrained.load(tmp_path / "hf")
    apply_lora(ours, LoRAConfig(r=2, alpha=4, **setting))
    _train(ours, steps=2)
    save_adapter(ours, tmp_path / "ours")
    theirs = PeftModel.from_pretrained(copy.deepcopy(hf), tmp_path / "ours").eval()
    torch.testing.assert_close(_logits(theirs, ids), _logits(ours, ids), atol=1e-5, rtol=0)


def test_a_tied_embedding_trained_whole_is_one_tensor_in_peft_too(tmp_path):
    """codelm trains a tied embedding and head as one tensor, so its adapter file asks PEFT for
    ensure_weight_tying: PEFT continues it with one trainable copy, not two. A run's settings
    naming the embedding alone train it so; a LoRA on a tied embedding under ensure_weight_tying
    (PEFT ties a head adapter to it) is refused."""
    hf = save_tiny_hf("llama", tmp_path / "hf")
    settings = trainconfig.TrainConfig(lora_r=2, lora_targets=["q_proj"],
                                       lora_modules_to_save=["embed_tokens"])
    ours = pretrained.load(tmp_path / "hf")
    apply_lora(ours, adapter_config.lora_config(settings))
    save_adapter(ours, tmp_path / "ours")
    assert json.loads((tmp_path / "ours" / "adapter_config.json").read_text())[
        "ensure_weight_tying"] is True
    theirs = PeftModel.from_pretrained(copy.deepcopy(hf), tmp_path / "ours", is_trainable=True)
    whole = [n for n, p in theirs.named_parameters() if p.requires_grad and "lora_" not in n]
    assert whole == ["base_model.model.model.embed_tokens.modules_to_save.default.weight"]
    with pytest.raises(ValueError, match=r"LoRA on .*embed_tokens.*ensure_weight_tying"):
        apply_lora(pretrained.load(tmp_path / "hf"), LoRAConfig(
            r=2, target_modules=["embed_tokens"], ensure_weight_tying=True))


def test_targets_all_saved_whole_are_refused_and_counted_as_apply_lora_counts(tmp_path):
    """A target every module of which is saved whole would get no adapter (PEFT excludes saved
    modules): refused in one line; beside another target, the saved module is left out, and
    targeted_modules says what apply_lora adapts."""
    save_tiny_hf("llama", tmp_path / "hf")
    model = pretrained.load(tmp_path / "hf")
    with pytest.raises(ValueError, match=r"every module they select is saved whole"):
        apply_lora(model, LoRAConfig(r=2, alpha=4, target_modules=["down_proj"],
                                     modules_to_save=["down_proj"]))
    chosen = lora.targeted_modules(model, ["q_proj", "down_proj"],
                                   modules_to_save=["down_proj"])
    assert chosen and all(name.endswith("q_proj") for name in chosen)


def test_a_modules_to_save_entry_that_names_no_module_is_refused(tmp_path):
    """An entry no module name ends with would train nothing, and PEFT refuses the adapter:
    one line naming it and the model's modules."""
    save_tiny_hf("llama", tmp_path / "llama")
    with pytest.raises(ValueError, match=r"modules_to_save \['layer_norm'\].*input_layernorm"):
        apply_lora(pretrained.load(tmp_path / "llama"),
                   LoRAConfig(r=2, target_modules=["q_proj"], modules_to_save=["layer_norm"]))


def test_a_config_refused_for_its_saved_tensors_leaves_the_model_as_it_was(tmp_path):
    """bias and modules_to_save are checked once the adapters are placed; a refusal there, from
    apply_lora or from load_adapter, takes them off again: no LoRA layer stays, every parameter
    trains as before, and a corrected config applies to the same model."""
    save_tiny_hf("llama", tmp_path / "llama")
    model = pretrained.load(tmp_path / "llama")
    before = {name: p.requires_grad for name, p in model.named_parameters()}
    bad = LoRAConfig(r=2, target_modules=["q_proj"], modules_to_save=["layer_norm"])
    with pytest.raises(ValueError, match=r"modules_to_save \['layer_norm'\]"):
        apply_lora(model, bad)
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["q_proj"],
         "modules_to_save": ["layer_norm"]}))
    with pytest.raises(ValueError, match=r"adapter_config\.json: modules_to_save"):
        load_adapter(model, adapter)
    assert not list(lora_modules(model)) and not hasattr(model, "lora_config")
    assert {name: p.requires_grad for name, p in model.named_parameters()} == before
    report = apply_lora(model, LoRAConfig(r=2, target_modules=["q_proj"]))
    assert report.modules == [f"blocks.{i}.attn.qkv" for i in range(model.cfg.n_layer)]


def test_a_tensor_codelm_shares_is_trained_only_with_all_its_modules(tmp_path):
    """codelm fuses q/k/v and ties Llama's head to its embedding: PEFT would train one part alone,
    so that is refused, and two saved copies of a tied weight that differ are refused on load."""
    _, model, _ = _pair("phi", tmp_path)
    with pytest.raises(ValueError, match=r"q_proj.base_layer.bias: .*one tensor with "
                                         r".*k_proj.bias.*modules_to_save"):
        apply_lora(model, LoRAConfig(r=2, target_modules=["q_proj"], bias="lora_only"))
    hf = save_tiny_hf("llama", tmp_path / "llama")
    with pytest.raises(ValueError, match=r"lm_head\.weight: .*one tensor.*embed_tokens\.weight"):
        apply_lora(pretrained.load(tmp_path / "llama"),
                   LoRAConfig(r=2, target_modules=["q_proj"], modules_to_save=["lm_head"]))
    peft_model = get_peft_model(copy.deepcopy(hf), LoraConfig(
        r=2, target_modules=["q_proj"], modules_to_save=["lm_head", "embed_tokens"]))
    with torch.no_grad():
        for p in peft_model.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn_like(p))
    peft_model.save_pretrained(tmp_path / "peft")
    with pytest.raises(ValueError, match=r"embed_tokens\.weight' and .*lm_head\.weight' differ"
                                         r".*one tensor"):
        load_adapter(pretrained.load(tmp_path / "llama"), tmp_path / "peft")


def test_dora_on_an_embedding_is_refused(tmp_path):
    """DoRA on an embedding is refused naming the module: codelm's DoRA adapts Linear layers
    only."""
    _, model, _ = _pair("llama", tmp_path)
    with pytest.raises(ValueError, match="embed_tokens is an embedding.*DoRA.*Linear"):
        apply_lora(model, LoRAConfig(r=2, target_modules=["q_proj", "embed_tokens"],
                                     use_dora=True))


def test_peft_adapter_with_targets_the_model_lacks_loads(tmp_path):
    """PEFT's rule: a target list is fine when one name matches (Llama's MLP names on Phi). The
    adapter loads on the names the model has, with PEFT's logits."""
    hf, model, _ = _pair("phi", tmp_path)
    setting = dict(r=4, alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj",
                                                 "gate_proj", "up_proj", "down_proj"])
    peft_model = get_peft_model(copy.deepcopy(hf), _peft_config(setting))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn_like(p) * 0.1)
    peft_model.save_pretrained(tmp_path / "peft")
    report = load_adapter(model, tmp_path / "peft")
    assert set(report.targets) == {"q_proj", "k_proj", "v_proj"}
    torch.testing.assert_close(_logits(model, _ids(2)), _logits(peft_model.eval(), _ids(2)),
                               atol=1e-4, rtol=0)


@pytest.mark.parametrize("family,targets", [("llama", ["q_proj", "v_proj", "wte"]),
                                            ("gpt_bigcode", ["c_attn", "proj"])])
def test_peft_adapter_targets_match_hf_names_only(tmp_path, family, targets):
    """'wte' and 'proj' are codelm module names; PEFT, reading the file, matches HF names only and
    skips them. Matching codelm's names here would add adapters the file has no weights for: the
    logits are PEFT's."""
    hf, model, _ = _pair(family, tmp_path)
    peft_model = get_peft_model(copy.deepcopy(hf), _peft_config(dict(r=4, alpha=8,
                                                                      target_modules=targets)))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn_like(p) * 0.1)
    peft_model.save_pretrained(tmp_path / "peft")
    load_adapter(model, tmp_path / "peft")
    torch.testing.assert_close(_logits(model, _ids(2)), _logits(peft_model.eval(), _ids(2)),
                               atol=1e-4, rtol=0)


@pytest.mark.parametrize("family,peft_targets,codelm_targets", [
    ("llama", ["q_proj", "v_proj", "wte", "fc1"], ["qkv", "attn.proj"]),
    ("gpt_bigcode", r".*\.(c_attn|c_fc)$", ["qkv", "fc"]),
])
def test_targeted_modules_are_the_modules_peft_and_apply_lora_adapt(tmp_path, family,
                                                                     peft_targets, codelm_targets):
    """On a meta-device model: under peft_rules the modules PEFT adapts for an adapter file's
    target_modules (HF names only; a name the model lacks is skipped), else the modules
    apply_lora adapts (codelm names too); targets that select nothing are an error."""
    hf, model, _ = _pair(family, tmp_path)
    with torch.device("meta"):
        meta = Transformer(families.read_config(tmp_path / "hf").model)
    peft_model = get_peft_model(copy.deepcopy(hf), _peft_config(dict(
        r=4, alpha=8, target_modules=peft_targets)))
    peft_adapted = {n.removeprefix(lora.PEFT_PREFIX) for n, m in peft_model.named_modules()
                    if hasattr(m, "lora_A")}
    assert lora.targeted_modules(meta, peft_targets, peft_rules=True) == peft_adapted
    apply_lora(model, LoRAConfig(r=4, target_modules=codelm_targets))
    adapted = {n for _, m in lora_modules(model) for n in m.names.values()}
    assert lora.targeted_modules(meta, codelm_targets) == adapted
    for targets, peft_rules in ((["qkv"], True), (["nowhere"], False), ([*codelm_targets, "x"],
                                                                        False)):
        with pytest.raises(ValueError, match="match no module"):
            lora.targeted_modules(meta, targets, peft_rules)


def test_apply_adapter_layout_from_a_renamed_config_is_where_peft_puts_the_adapter(tmp_path):
    """A run's copy of an adapter's config (another file name, no weights beside it) gives the
    layout load_adapter gives: the same adapted modules, rank and scale, so the adapter's
    weights copied in compute PEFT's logits. Once per model, on a codelm Transformer only."""
    hf, model, _ = _pair("llama", tmp_path)
    peft_model = get_peft_model(copy.deepcopy(hf), _peft_config(dict(
        r=4, alpha=8, target_modules=["q_proj", "v_proj", "down_proj", "nowhere"])))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn_like(p) * 0.1)
    peft_model.save_pretrained(tmp_path / "peft")
    run = tmp_path / "run"
    run.mkdir()
    config = json.loads((tmp_path / "peft" / adapter_config.ADAPTER_CONFIG).read_text())
    (run / "copy.json").write_text(json.dumps({**config,
                                               "base_model_name_or_path": str(tmp_path / "hf")}))
    assert adapter_config.adapter_base(run, "", "copy.json") == tmp_path / "hf"
    loaded = pretrained.load(tmp_path / "hf")
    expected = load_adapter(loaded, tmp_path / "peft")
    report = lora.apply_adapter_layout(model, run, "copy.json")
    assert (report.targets, report.modules, report.trainable_params) == (
        expected.targets, expected.modules, expected.trainable_params)
    assert not any(p.detach().any() for n, p in model.named_parameters() if "lora_B" in n)
    model.load_state_dict(loaded.state_dict())
    torch.testing.assert_close(_logits(model, _ids(2)), _logits(peft_model.eval(), _ids(2)),
                               atol=1e-4, rtol=0)
    with pytest.raises(ValueError, match="already has LoRA adapters; apply_adapter_layout once"):
        lora.apply_adapter_layout(model, run, "copy.json")
    with pytest.raises(ValueError, match=r"^apply_adapter_layout works on codelm's Transformer"):
        lora.apply_adapter_layout(hf, run, "copy.json")
    fresh = pretrained.load(tmp_path / "hf")
    config_file = run / adapter_config.ADAPTER_CONFIG
    with pytest.raises(ValueError, match=rf"^{re.escape(str(config_file))}: not "):
        lora.apply_adapter_layout(fresh, run)
    (run / "none.json").write_text(json.dumps({**config, "target_modules": ["nowhere"]}))
    with pytest.raises(ValueError, match=rf"^{re.escape(str(run / 'none.json'))}: LoRA target"):
        lora.apply_adapter_layout(fresh, run, "none.json")


def test_loading_into_a_model_with_adapters_is_refused(tmp_path):
    """load_adapter on a model that already has adapters is refused (once per model): a second set
    on top would add both updates."""
    _, model, setting = _pair("phi", tmp_path)
    apply_lora(model, LoRAConfig(**setting))
    save_adapter(model, tmp_path / "a")
    with pytest.raises(ValueError, match=r"already has LoRA adapters; load_adapter once"):
        load_adapter(model, tmp_path / "a")


@pytest.mark.parametrize("key,value", [("init_lora_weights", "pissa_niter_4"),
                                       ("init_lora_weights", "olora"),
                                       ("init_lora_weights", "mica"),
                                       ("alora_invocation_tokens", [7, 8]),
                                       ("velora_config", {"num_groups": 4})])
def test_adapters_peft_reads_differently_are_refused(tmp_path, key, value):
    """PiSSA/OLoRA adapters change the base weights when PEFT loads them; MiCA trains A alone;
    aLoRA applies only after its invocation tokens; VeLoRA adds tensors of its own. Loaded as plain
    LoRA they would give other logits or train other weights: refused, naming the key."""
    _, model, setting = _pair("llama", tmp_path)
    apply_lora(model, LoRAConfig(**setting))
    save_adapter(model, tmp_path / "a")
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    (tmp_path / "a" / "adapter_config.json").write_text(json.dumps({**config, key: value}))
    _, fresh, _ = _pair("llama", tmp_path / "other")
    with pytest.raises(ValueError, match=rf"adapter_config.json: {key}=.* not supported"):
        load_adapter(fresh, tmp_path / "a")


@pytest.mark.parametrize("dtype", [torch.int8, torch.int32, torch.uint8])
def test_an_adapter_of_integer_tensors_is_refused_naming_the_file(tmp_path, dtype):
    """An adapter file whose tensors are integers (a quantized file's codes) is refused naming
    the file, the key and the dtype, and the model keeps no adapters: copied into float
    parameters, the codes would load as numbers, an update of nonsense."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    _, model, setting = _pair("llama", tmp_path)
    apply_lora(model, LoRAConfig(**setting))
    weights = save_adapter(model, tmp_path / "a") / "adapter_model.safetensors"
    with safe_open(weights, "pt") as f:
        metadata = f.metadata()
    tensors = {k: (t * 100).to(dtype) for k, t in load_file(weights).items()}
    save_file(tensors, weights, metadata=metadata)
    _, fresh, _ = _pair("llama", tmp_path / "other")
    with pytest.raises(ValueError, match=rf"adapter_model.safetensors: tensor .* is {dtype}: "
                                         "an adapter's weights are floating point"):
        load_adapter(fresh, tmp_path / "a")
    assert not any("lora_" in name for name, _ in fresh.named_parameters())


def test_every_field_of_peft_lora_config_is_read_refused_or_known_to_change_nothing():
    """A field PEFT adds later is neither read, refused nor ignored: this names it, so that
    its meaning is decided before an adapter using it loads as a plain one."""
    import dataclasses

    import peft

    fields = {f.name for f in dataclasses.fields(peft.LoraConfig)}
    known = (set(adapter_config._PEFT_FIELDS) | set(adapter_config.UNSUPPORTED_PEFT_KEYS)
             | set(adapter_config.IGNORED_PEFT_KEYS))
    assert fields - known == set()


def test_contracts_list_exactly_the_adapter_options_codelm_refuses():
    """docs/contracts.md's list of refused adapter_config.json keys is adapter_config's, not a
    copy that drifts: every key read_adapter_config refuses, and no other."""
    text = (Path(__file__).resolve().parents[1] / "docs" / "contracts.md").read_text("utf-8")
    listed = text.split("leave one unset): ", 1)[1].split("\nmerge_lora(", 1)[0]
    refused = set(adapter_config.UNSUPPORTED_PEFT_KEYS)
    assert {key.strip(" #\n") for key in listed.split(",")} == refused
    assert all(f" {init}" in text for init in adapter_config._BASE_REWRITING_INITS)

# Real shapes, built on the meta device (no memory): transformers configs typed from the
# published checkpoints' config.json, codelm's from its presets.
REAL = {
    "000-starcoderbase-1b": (
        lambda: tf.GPTBigCodeConfig(vocab_size=49152, n_positions=8192, n_embd=2048, n_layer=24,
                                    n_head=16, n_inner=8192, multi_query=True),
        "starcoderbase-1b", dict(r=16, alpha=32, dropout=0.08, target_modules=["c_proj", "c_attn"])),
    "002-phi-1_5": (
        lambda: tf.PhiConfig(vocab_size=51200, hidden_size=2048, intermediate_size=8192,
                             num_hidden_layers=24, num_attention_heads=32,
                             partial_rotary_factor=0.5, max_position_embeddings=2048),
        # Seed 002 names no targets; configs/kotlin_phi.json takes PEFT's Phi default.
        "phi-1_5", dict(r=16, alpha=32, dropout=0.05, target_modules=[
            "q_proj", "v_proj", "fc1", "fc2"])),
    "003-codegen-350M-mono": (
        lambda: tf.CodeGenConfig(vocab_size=51200, n_positions=2048, n_ctx=2048, n_embd=1024,
                                 n_layer=20, n_head=16, rotary_dim=32, tie_word_embeddings=False),
        "codegen-350M-mono", dict(r=8, alpha=32, target_modules=[
            "wte", "qkv_proj", "out_proj", "fc_in", "fc_out"])),
    "004-llama-3.2-1b": (
        lambda: tf.LlamaConfig(vocab_size=128256, hidden_size=2048, intermediate_size=8192,
                               num_hidden_layers=16, num_attention_heads=32,
                               num_key_value_heads=8, head_dim=64, tie_word_embeddings=True,
                               max_position_embeddings=131072),
        "llama-3.2-1b", dict(r=16, alpha=32, dropout=0.05,
                             target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])),
}


@pytest.mark.parametrize("seed", list(REAL))
def test_trainable_params_equal_peft_on_real_shapes(seed):
    """On the published shapes of the seed models (built on the meta device) apply_lora's trainable
    count equals PEFT's for the same setting, and only LoRA parameters train."""
    hf_config, preset, setting = REAL[seed]
    with torch.device("meta"):
        hf = tf.AutoModelForCausalLM.from_config(hf_config())
        model = Transformer(PRESETS[preset])
    n_peft = get_peft_model(hf, _peft_config(setting)).get_nb_trainable_parameters()[0]
    report = apply_lora(model, LoRAConfig(**setting))
    assert report.trainable_params == n_peft
    assert all(not p.requires_grad for n, p in model.named_parameters() if "lora_" not in n)


def test_codelm_names_select_the_hf_modules_inside_them(tmp_path):
    """A codelm module name as a target adapts the HF modules inside it (qkv: q/k/v_proj), and a
    dotted name matches as a suffix: "attn.proj" adapts o_proj and leaves mlp.proj alone."""
    _, model, _ = _pair("llama", tmp_path)
    report = apply_lora(model, LoRAConfig(r=2, target_modules=["qkv", "attn.proj"]))
    names = report.targets["qkv"]
    assert names[:3] == [f"model.layers.0.self_attn.{p}_proj" for p in "qkv"]
    assert report.targets["attn.proj"] == [f"model.layers.{i}.self_attn.o_proj" for i in (0, 1)]
    assert isinstance(model.blocks[0].attn.qkv, LoRALinear)
    assert not isinstance(model.blocks[0].mlp.proj, LoRALinear)  # "attn.proj", not every proj


def test_unknown_target_is_an_error_listing_the_model_names(tmp_path):
    """Targets the model lacks (GPT-2 names on CodeGen) are an error naming them and the model's
    own module names, and a LayerNorm target is refused; nothing is half-applied: no adapter,
    requires_grad as it was."""
    _, model, _ = _pair("codegen", tmp_path)
    trainable = [p.requires_grad for p in model.parameters()]
    # The CodeGen recipe of seed 003 asks for GPT-2 names that CodeGen does not have.
    with pytest.raises(ValueError) as err:
        apply_lora(model, LoRAConfig(target_modules=["wte", "c_attn", "c_proj", "c_fc"]))
    msg = str(err.value)
    assert "['c_attn', 'c_proj', 'c_fc']" in msg
    for name in ("qkv_proj", "out_proj", "fc_in", "fc_out", "wte"):
        assert name in msg
    assert [p.requires_grad for p in model.parameters()] == trainable  # nothing half-applied
    assert not list(lora.lora_modules(model))
    with pytest.raises(ValueError, match="LayerNorm"):
        apply_lora(model, LoRAConfig(target_modules=["qkv_proj", "ln_1"]))
    assert [p.requires_grad for p in model.parameters()] == trainable
    assert not list(lora.lora_modules(model))


def test_merge_unmerge_exact_and_idempotent(tmp_path):
    """merge_lora folds the adapters into the base keeping the logits (1e-5) and unmerge_lora
    restores the base weights (1e-6), each a no-op when repeated; a merged model still counts as
    having adapters."""
    _, model, _ = _pair("codegen", tmp_path)
    original = {k: v.clone() for k, v in model.state_dict().items()}
    apply_lora(model, LoRAConfig(r=4, alpha=8, target_modules=[
        "wte", "qkv_proj", "out_proj", "fc_in", "fc_out", "lm_head"]))
    with torch.no_grad():
        for _, m in lora.lora_modules(model):
            for p in m.parameters():
                if p.requires_grad:
                    p.normal_(0, 0.1)
    ids = _ids(3)
    unmerged = _logits(model, ids)
    merge_lora(model)
    merged_weights = {k: v.clone() for k, v in model.state_dict().items()}
    merge_lora(model)  # idempotent
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in merged_weights.items())
    save_adapter(model, tmp_path / "a")
    with pytest.raises(ValueError, match="already has LoRA adapters"):
        load_adapter(model, tmp_path / "a")
    torch.testing.assert_close(_logits(model, ids), unmerged, atol=1e-5, rtol=0)
    assert (model.blocks[0].attn.qkv.base.weight - original["blocks.0.attn.qkv.weight"]).abs().max() > 1e-3
    unmerge_lora(model)
    unmerge_lora(model)  # idempotent
    for key, value in model.state_dict().items():
        if "lora_" not in key:
            plain = key.replace(".base.", ".")
            torch.testing.assert_close(value, original[plain], atol=1e-6, rtol=0)
    torch.testing.assert_close(_logits(model, ids), unmerged, atol=1e-6, rtol=0)


def test_merge_of_bf16_base_is_done_in_fp32(tmp_path):
    """On a bf16 base the update B @ A * scale is added in fp32 and rounded once: a small update
    that a bf16 sum would round away still reaches the merged weights."""
    save_tiny_hf("llama", tmp_path / "hf")
    model = pretrained.load(tmp_path / "hf", dtype=torch.bfloat16)
    apply_lora(model, LoRAConfig(r=4, alpha=8, target_modules=["k_proj"]))
    layer = model.blocks[0].attn.qkv
    with torch.no_grad():
        layer.lora_B["k_proj"].normal_(0, 1e-3)  # small: a bf16 merge would round it away
    w = layer.base.weight.detach().clone()
    rows = layer.rows("k_proj")
    expected = w.float()
    expected[rows] += (layer.lora_B["k_proj"] @ layer.lora_A["k_proj"]).detach() * layer.scale
    merge_lora(model)
    assert layer.base.weight.dtype == torch.bfloat16
    assert torch.equal(layer.base.weight, expected.to(torch.bfloat16))


def test_lora_on_a_bf16_base_without_autocast_trains_in_fp32(tmp_path):
    """A base loaded in bf16 and run without autocast: the adapters stay fp32 (their input is
    cast up, not the weights down), their gradients are fp32 and finite, and the logits and
    gradients follow the fp32 base's within bf16's rounding."""
    save_tiny_hf("llama", tmp_path / "hf")
    ids = _ids(7)
    out = {}
    for dtype in (torch.float32, torch.bfloat16):
        model = pretrained.load(tmp_path / "hf", dtype=dtype)
        apply_lora(model, LoRAConfig(r=4, alpha=8, target_modules=[
            "q_proj", "v_proj", "o_proj", "down_proj"]))  # a fused qkv and two plain Linears
        torch.manual_seed(0)
        with torch.no_grad():  # the same non-zero adapters on both bases
            for n, p in model.named_parameters():
                if "lora_" in n:
                    p.normal_(0, 0.05)
        logits = model(ids[:, :-1])
        F.cross_entropy(logits.float().flatten(0, 1), ids[:, 1:].flatten()).backward()
        grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
        assert len(grads) == 2 * 4 * 2 and all("lora_" in n for n in grads)
        assert {p.dtype for n, p in model.named_parameters() if "lora_" not in n} == {dtype}
        assert all(g.dtype == torch.float32 and g.isfinite().all() for g in grads.values())
        out[dtype] = logits.detach(), grads
    (l32, g32), (l16, g16) = out[torch.float32], out[torch.bfloat16]
    assert l16.dtype == torch.bfloat16

    def rel(a, b):
        return ((a.float() - b).norm() / b.norm()).item()

    # Relative errors measured over 16 checkpoint/adapter/input seeds: logits 0.0058-0.0072,
    # the worst adapter's gradient 0.011-0.016 (bf16's unit roundoff is 0.0039). The bf16 base
    # without its adapters is 0.37-0.58 from the fp32 model with them.
    assert rel(l16, l32) < 0.01
    assert max(rel(g16[n], g) for n, g in g32.items()) < 0.025


def test_merging_into_a_tied_embedding_is_refused(tmp_path):
    """An embedding adapter on a model whose head is tied to it is refused at merge: merging would
    change the output head too."""
    _, model, _ = _pair("llama", tmp_path)  # tiny Llama ties lm_head to embed_tokens
    apply_lora(model, LoRAConfig(target_modules=["embed_tokens"]))
    with pytest.raises(ValueError, match="tied"):
        merge_lora(model)


def test_merge_and_export_writes_a_checkpoint_transformers_loads(tmp_path):
    """merge_and_export writes a plain HF checkpoint with the adapted model's logits in
    transformers (1e-4), and the model keeps its logits."""
    _, model, setting = _pair("codegen", tmp_path)
    apply_lora(model, LoRAConfig(**setting))
    _train(model, steps=2)
    ids = _ids(4)
    adapted = _logits(model, ids)
    merge_and_export(model, tmp_path / "merged")
    exported = tf.AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    torch.testing.assert_close(_logits(exported, ids), adapted, atol=1e-4, rtol=0)
    torch.testing.assert_close(_logits(model, ids), adapted, atol=1e-5, rtol=0)


def test_adapter_file_errors_name_the_file(tmp_path):
    """A missing adapter_config.json, fields codelm cannot honour, targets that match no module and
    weights the targets do not cover are each a ValueError naming the file; a refused load leaves
    the model as it was."""
    _, model, setting = _pair("phi", tmp_path)
    with pytest.raises(ValueError, match="adapter_config.json: not found"):
        load_adapter(model, tmp_path)
    apply_lora(model, LoRAConfig(**setting))
    save_adapter(model, tmp_path / "a")
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    (tmp_path / "a" / "adapter_config.json").write_text(json.dumps({**config, "lora_bias": True}))
    _, fresh, _ = _pair("phi", tmp_path / "other")
    with pytest.raises(ValueError, match=r"adapter_config.json: lora_bias=True is not supported"):
        load_adapter(fresh, tmp_path / "a")
    for key, value in (("use_bdlora", {"target_modules_bd_a": ["o_proj"]}),
                       ("kasa_config", {"on": True}), ("monteclora_config", {"n_experts": 2}),
                       ("layers_to_transform", 0)):  # layer 0 only: read as "unused" (0 == False)
        (tmp_path / "a" / "adapter_config.json").write_text(json.dumps({**config, key: value}))
        with pytest.raises(ValueError, match=rf"adapter_config.json: {key}=.* is not supported"):
            load_adapter(fresh, tmp_path / "a")
    (tmp_path / "a" / "adapter_config.json").write_text(json.dumps(
        {**config, "target_modules": ["c_attn", "gate_proj"]}))
    with pytest.raises(ValueError, match=r"adapter_config.json: LoRA target\(s\) \['c_attn', "
                       r"'gate_proj'\] match no module"):
        load_adapter(fresh, tmp_path / "a")
    # A file whose keys the config's targets do not cover fails, and leaves the model untouched.
    (tmp_path / "a" / "adapter_config.json").write_text(json.dumps(
        {**config, "target_modules": ["q_proj"]}))
    before = {k: v.clone() for k, v in fresh.state_dict().items()}
    with pytest.raises(ValueError, match=r"adapter_model.safetensors: key .* matches no adapter"):
        load_adapter(fresh, tmp_path / "a")
    assert not list(lora.lora_modules(fresh)) and not hasattr(fresh, "lora_config")
    assert all(p.requires_grad for p in fresh.parameters())
    assert all(torch.equal(v, fresh.state_dict()[k]) for k, v in before.items())


def _drop_one_lora_B(adapter_dir) -> tuple[Path, str]:
    """Rewrite the adapter's weights without one lora_B tensor; return the file and that key."""
    file = adapter_dir / adapter_config.ADAPTER_WEIGHTS
    tensors = load_file(file)
    dropped = "base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"
    assert dropped in tensors
    del tensors[dropped]
    save_file(tensors, file)
    return file, dropped.removeprefix(lora.PEFT_PREFIX)


def test_adapter_file_missing_a_tensor_is_refused_and_the_model_left_as_it_was(tmp_path):
    """Every adapter the config creates must get its weights: a missing lora_B would silently
    keep its init (zero), a no-op adapter. The refused load takes the adapters off again."""
    _, model, _ = _pair("llama", tmp_path)
    apply_lora(model, LoRAConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"]))
    _train(model, steps=2)
    save_adapter(model, tmp_path / "a")
    file, dropped = _drop_one_lora_B(tmp_path / "a")
    _, fresh, _ = _pair("llama", tmp_path / "other")
    fresh.blocks[0].mlp.requires_grad_(False)  # not all True: restored as it was, not "all"
    trainable = {n: p.requires_grad for n, p in fresh.named_parameters()}
    before = {k: v.clone() for k, v in fresh.state_dict().items()}
    ids = _ids(5)
    logits = _logits(fresh, ids)
    with pytest.raises(ValueError) as err:
        load_adapter(fresh, tmp_path / "a")
    assert str(err.value) == f"{file}: no weights for 1 adapter tensor(s), e.g. {dropped}"
    assert not list(lora.lora_modules(fresh)) and not hasattr(fresh, "lora_config")
    assert {n: p.requires_grad for n, p in fresh.named_parameters()} == trainable
    assert fresh.state_dict().keys() == before.keys()  # the base modules back in place
    assert all(torch.equal(v, fresh.state_dict()[k]) for k, v in before.items())
    torch.testing.assert_close(_logits(fresh, ids), logits, atol=0, rtol=0)


@pytest.mark.parametrize(("key", "value", "message"), [
    ("r", True, "a positive integer"), ("r", 8.5, "a positive integer"),
    ("r", 0, "a positive integer"), ("r", None, "a positive integer"),
    ("lora_alpha", "16", "a finite number"), ("lora_alpha", False, "a finite number"),
    ("lora_alpha", 0, "other than 0"),
    ("lora_dropout", "0.1", r"in \[0, 1\)"), ("lora_dropout", 1.0, r"in \[0, 1\)"),
    ("lora_dropout", -0.1, r"in \[0, 1\)"),
    ("use_rslora", "false", "true/false"), ("bias", "some", "'none', 'lora_only' or 'all'"),
    ("modules_to_save", "lm_head", "a list of module names"),
    ("target_modules", 5, "a list"), ("target_modules", [], "a list"),
    ("target_modules", ["q_proj", 3], "a list of module names"),
    ("target_modules", "(q_proj", "valid regular expression"),
])
def test_malformed_adapter_config_is_an_error_naming_the_file(tmp_path, key, value, message):
    """A hand-edited adapter_config.json fails as "<file>: ..." (eval.py catches ValueError)."""
    _, model, setting = _pair("phi", tmp_path)
    apply_lora(model, LoRAConfig(**setting))
    save_adapter(model, tmp_path / "a")
    file = tmp_path / "a" / "adapter_config.json"
    file.write_text(json.dumps({**json.loads(file.read_text()), key: value}))
    _, fresh, _ = _pair("phi", tmp_path / "other")
    with pytest.raises(ValueError, match=rf"adapter_config\.json: {key}=.*: must be .*{message}"):
        load_adapter(fresh, tmp_path / "a")
    assert not list(lora.lora_modules(fresh))


def test_truncated_adapter_weights_are_an_error_naming_the_file(tmp_path):
    """A copy cut short (a full disk, a killed rsync) is the user's file to fix, not a crash."""
    _, model, setting = _pair("phi", tmp_path)
    apply_lora(model, LoRAConfig(**setting))
    save_adapter(model, tmp_path / "a")
    weights = tmp_path / "a" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    _, fresh, _ = _pair("phi", tmp_path / "other")
    with pytest.raises(ValueError, match="truncated or corrupt") as e:
        load_adapter(fresh, tmp_path / "a")
    assert str(e.value).startswith(f"{weights}: ")
    assert not list(lora.lora_modules(fresh))


def test_a_failed_save_leaves_the_earlier_adapter_whole(tmp_path):
    """save_adapter writes both files before either replaces one: a full disk mid-save (here a
    file-size limit) must not leave the new adapter's config (another rank) beside the earlier
    weights, where neither adapter could be loaded."""
    import resource
    import signal

    _, model, setting = _pair("phi", tmp_path)
    apply_lora(model, LoRAConfig(**setting))
    _train(model, steps=2)
    save_adapter(model, tmp_path / "a")
    before = {p.name: p.read_bytes() for p in (tmp_path / "a").iterdir()}
    ids = _ids(5)
    saved = _logits(model, ids)
    _train(model, steps=2)
    _, other, _ = _pair("phi", tmp_path / "other")
    apply_lora(other, LoRAConfig(**{**setting, "r": 2 * setting["r"]}))
    limit = len(before[adapter_config.ADAPTER_WEIGHTS]) // 2
    assert limit > len(before[adapter_config.ADAPTER_CONFIG])
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past it fails (EFBIG)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
    try:
        with pytest.raises((OSError, SafetensorError)):  # safetensors' own type before
            save_adapter(other, tmp_path / "a")
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, handler)
    assert {p.name: p.read_bytes() for p in (tmp_path / "a").iterdir()} == before  # no temp
    fresh = pretrained.load(tmp_path / "hf")
    load_adapter(fresh, tmp_path / "a")
    torch.testing.assert_close(_logits(fresh, ids), saved, atol=0, rtol=0)
    save_adapter(other, tmp_path / "a")
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == sorted(before)
    assert adapter_config.read_adapter_config(tmp_path / "a").r == 2 * setting["r"]


def test_partial_suffix_target_is_saved_exactly(tmp_path):
    """The target attn.c_proj is saved as written, not as PEFT's "c_proj", which would also
    select mlp.c_proj: PEFT loads the adapter on the same modules, with the same count and
    logits."""
    hf, model, _ = _pair("gpt_bigcode", tmp_path)
    report = apply_lora(model, LoRAConfig(r=4, target_modules=["attn.c_proj"]))
    _train(model, steps=2)
    save_adapter(model, tmp_path / "a")
    peft_model = PeftModel.from_pretrained(hf, tmp_path / "a").eval()
    assert peft_model.get_nb_trainable_parameters()[0] == 0  # inference mode
    assert sum(p.numel() for n, p in peft_model.named_parameters()
               if "lora_" in n) == report.trainable_params
    torch.testing.assert_close(_logits(model, _ids()), _logits(peft_model, _ids()),
                               atol=1e-4, rtol=0)


def test_lora_linear_init_and_scale():
    """A new adapter starts as PEFT's does: A kaiming-uniform within 1/sqrt(fan_in), B zero (the
    layer computes its base), and rsLoRA's scale alpha / sqrt(r)."""
    base = torch.nn.Linear(32, 48)
    layer = LoRALinear(base, r=8, scale=LoRAConfig(r=8, alpha=16, use_rslora=True).scale,
                       dropout=0.0)
    layer.add_adapter("q", "q", torch.arange(16))
    assert layer.scale == pytest.approx(16 / math.sqrt(8))
    bound = 1 / math.sqrt(32)  # kaiming_uniform(a=sqrt(5)): U(-1/sqrt(fan_in), 1/sqrt(fan_in))
    A = layer.lora_A["q"]
    assert A.abs().max() <= bound and A.abs().max() > 0.5 * bound
    assert torch.equal(layer.lora_B["q"], torch.zeros(16, 8))
    x = torch.randn(3, 32)
    assert torch.equal(layer(x), base(x))


def test_dropout_acts_on_the_input_of_A_in_training_only():
    """LoRA dropout masks the adapter's input (x before A), not the base path, keeping 0 or
    1/(1-p), and only in training: in eval the output is base(x) + B A x."""
    base = torch.nn.Linear(16, 16)
    layer = LoRALinear(base, r=4, scale=1.0, dropout=0.5)
    layer.add_adapter("a", "a", None)
    with torch.no_grad():
        layer.lora_B["a"].normal_()
    x = torch.randn(64, 16)
    layer.eval()
    expected = base(x) + x @ layer.lora_A["a"].T @ layer.lora_B["a"].T
    torch.testing.assert_close(layer(x), expected)
    layer.train()
    torch.manual_seed(0)
    mask = kernels.dropout_keep(x, 0.5, kernels.dropout_seed(), torch.float32)
    assert 0.3 < (mask == 0).float().mean() < 0.7 and set(mask.unique().tolist()) == {0.0, 2.0}
    torch.manual_seed(0)
    expected = base(x) + (x * mask) @ layer.lora_A["a"].T @ layer.lora_B["a"].T
    torch.testing.assert_close(layer(x), expected)


# ----------------------------------------------------------------------------- quantized base

NF4_PUBLISHED = [  # the NF4 table as published with QLoRA (bitsandbytes)
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0]


def test_nf4_levels_are_qloras():
    """The 16 NF4 levels are QLoRA's published table (bitsandbytes) within 1e-6: 4-bit checkpoints
    mean the same numbers here as there."""
    torch.testing.assert_close(quantize.nf4_levels(), torch.tensor(NF4_PUBLISHED), atol=1e-6,
                               rtol=0)


@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_linear_roundtrip_and_gradient(bits):
    """Dequantized weights lie within half a step of the originals (int8: row absmax / 127; NF4:
    block absmax times half the widest gap), a padded last block included; the input's gradient is
    the dequantized Linear's."""
    torch.manual_seed(0)
    linear = torch.nn.Linear(100, 40)  # 4,000 weights: 62.5 blocks of 64, the last padded
    q = QuantLinear(linear, bits)
    w, deq = linear.weight.detach(), q.dequantize()
    if bits == 8:
        step = w.abs().amax(1, keepdim=True) / 127
        assert ((w - deq).abs() <= step / 2 + 1e-7).all()
    else:
        blocks = F.pad(w.flatten(), (0, -w.numel() % 64)).view(-1, 64)
        absmax = blocks.abs().amax(1, keepdim=True)
        half_gap = (torch.tensor(NF4_PUBLISHED).diff().max() / 2).item()
        err = F.pad((w - deq).flatten(), (0, -w.numel() % 64)).view(-1, 64).abs()
        assert (err <= absmax * half_gap + 1e-6).all()
    x = torch.randn(5, 100, requires_grad=True)
    q(x).pow(2).sum().backward()
    x2 = x.detach().clone().requires_grad_()
    F.linear(x2, deq, linear.bias).pow(2).sum().backward()
    torch.testing.assert_close(x.grad, x2.grad)


def _saved_for_backward(loss: torch.Tensor, model: torch.nn.Module) -> list[torch.Tensor]:
    """The tensors ``loss``'s graph keeps for its backward, each storage once, the model's own
    parameters and buffers left out (they are held anyway)."""
    held = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    saved, seen, nodes = {}, set(), [loss.grad_fn]
    while nodes:
        node = nodes.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        tensors = list(getattr(node, "saved_tensors", None) or ())
        tensors += [getattr(node, name) for name in dir(node) if name.startswith("_saved_")]
        for t in tensors:
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in held:
                saved[t.untyped_storage().data_ptr()] = t
        nodes.extend(next_node for next_node, _ in node.next_functions)
    return list(saved.values())


def _inductor_partitioned(matmuls: dict[str, int]):
    """A torch.compile backend that partitions forward and backward as inductor does (its
    decompositions and min-cut partitioner) and runs the graphs as traced, counting each
    graph's matrix products into ``matmuls`` ("forward", "backward")."""
    import functools

    from functorch.compile import make_boxed_func, min_cut_rematerialization_partition
    from torch._dynamo.backends.common import aot_autograd
    from torch._inductor.decomposition import select_decomp_table

    def counting(kind):
        def compiler(graph_module, example_inputs):
            matmuls[kind] += sum(node.target in (torch.ops.aten.mm.default,
                                                 torch.ops.aten.bmm.default)
                                 for node in graph_module.graph.nodes)
            return make_boxed_func(graph_module.forward)
        return compiler

    return aot_autograd(fw_compiler=counting("forward"), bw_compiler=counting("backward"),
                        decompositions=select_decomp_table(),
                        partition_fn=functools.partial(min_cut_rematerialization_partition,
                                                       compiler="inductor"))


def _wide_one_layer_qlora(bits: int) -> Transformer:
    """One block of width 256 with LoRA on attention, its base quantized (bits 4 or 8) or not
    (0)."""
    import dataclasses

    torch.manual_seed(0)
    model = Transformer(dataclasses.replace(PRESETS["tiny"], n_embd=256, head_dim=64,
                                            rotary_dim=64, mlp_hidden=1024, vocab_size=64,
                                            n_layer=1))
    if bits:
        quantize_base(model, bits=bits)
    apply_lora(model, LoRAConfig(r=4, alpha=8, target_modules=["qkv", "proj"]))
    return model.train()


# [8] is slow; quick cover: [4], the same compiled QuantLinear.forward (int8 dequantizes by row
# scales where NF4 looks its codes up by block)
@pytest.mark.parametrize("bits", [4, pytest.param(8, marks=pytest.mark.slow)])
def test_a_compiled_quantized_base_keeps_no_dequantized_weight_for_the_backward(bits):
    """Compiled, a QLoRA step keeps what the eager step keeps for its backward (the activations,
    not the weights dequantized: those are computed again in the backward), its graphs hold
    the matrix products of the same model unquantized (no forward product is recomputed), and
    its adapters' gradients equal the eager step's. Forward and backward are partitioned as
    inductor partitions them; 8 tokens a row of width 256, so that the weights outweigh the
    activations."""
    import torch._dynamo

    model = _wide_one_layer_qlora(bits)
    ids = _ids(batch=1, T=8) % 64
    weights = [2 * q.in_features * q.out_features for q in model.modules()
               if isinstance(q, QuantLinear)]  # each dequantized, in bf16
    matmuls = {"forward": 0, "backward": 0}
    kept, grads = {}, {}
    torch._dynamo.reset()
    compiled = torch.compile(model, backend=_inductor_partitioned(matmuls))
    for name, run in (("eager", model), ("compiled", compiled)):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = run(ids, ids)
        kept[name] = _saved_for_backward(loss, model)
        loss.backward()
        grads[name] = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
        model.zero_grad(set_to_none=True)
    sizes = {name: sum(t.untyped_storage().nbytes() for t in tensors)
             for name, tensors in kept.items()}
    assert sizes["eager"] < sum(weights) / 8  # what the comparison rests on
    assert sizes["compiled"] < sizes["eager"] + min(weights) / 2, sizes
    assert not [t.shape for t in kept["compiled"] if 2 * t.numel() >= min(weights)]
    for n, grad in grads["eager"].items():  # bf16 rounding apart
        torch.testing.assert_close(grads["compiled"][n], grad, rtol=2e-2,
                                   atol=2e-2 * grad.abs().max().item())

    unquantized = {"forward": 0, "backward": 0}
    torch._dynamo.reset()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = torch.compile(_wide_one_layer_qlora(0),
                             backend=_inductor_partitioned(unquantized))(ids, ids)
    loss.backward()
    assert matmuls == unquantized and matmuls["backward"] > 0


def test_nf4_takes_each_blocks_own_absmax_and_the_nearest_level_a_padded_block_included():
    """NF4 scales each block of 64 weights by its absmax and stores the nearest level: a Linear
    of 7 x 10 weights is one full block and a last block of 6 (padded with zeros, which change
    neither its absmax nor its weights). Block 1 (absmax 2): 0.08 / 2 = 0.04 lies past the
    midpoint 0.0398 of levels 0 and 0.0796 and comes back as 2 x 0.0796, 0.078 as 0. Block 2
    (absmax 0.5) holds half of six levels: each comes back exactly."""
    levels = torch.tensor(NF4_PUBLISHED)
    linear = torch.nn.Linear(10, 7, bias=False)
    first = torch.zeros(64)
    first[:3] = torch.tensor([2.0, 0.08, 0.078])
    last = 0.5 * levels[[0, 2, 7, 9, 14, 15]]
    with torch.no_grad():
        linear.weight.copy_(torch.cat([first, last]).view(7, 10))
    deq = QuantLinear(linear, 4).dequantize().flatten()
    expected_first = torch.zeros(64)
    expected_first[:2] = torch.tensor([2.0, 2 * NF4_PUBLISHED[8]])
    torch.testing.assert_close(deq[:64], expected_first, atol=1e-6, rtol=0)
    torch.testing.assert_close(deq[64:], last, atol=1e-6, rtol=0)


@pytest.mark.parametrize("bits", [8, 4])
def test_a_quantized_base_cast_to_bf16_keeps_its_fp32_scales_and_weights(bits):
    """cast_model casts the base, not a quantized Linear's scales: they stay fp32 (a bf16 scale
    rounds every weight of its row or block), so the weight dequantized in bf16 is the fp32
    dequantized weight rounded once."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 32))
    quantize_base(model, bits)
    layer = model[0]
    before = layer.dequantize(torch.float32)
    quantize.cast_model(model, torch.bfloat16)
    assert layer.scale.dtype == torch.float32
    assert layer.bias.dtype == torch.bfloat16
    assert torch.equal(layer.dequantize(), before.to(torch.bfloat16))


def test_the_quantization_report_counts_codes_and_scales_against_bf16():
    """One 64 x 64 Linear: NF4 holds 2048 bytes of codes (two a byte) and 64 fp32 block scales,
    2304 bytes; int8 4096 bytes of codes and 64 fp32 row scales, 4352; the same weights in bf16
    are 8192 bytes, the ratios 0.28125 and 0.53125."""
    for bits, quantized in ((4, 2304), (8, 4352)):
        model = torch.nn.Sequential(torch.nn.Linear(64, 64, bias=False))
        report = quantize_base(model, bits)
        assert report.quantized_bytes == quantized
        assert report.bf16_bytes == 8192
        assert report.ratio_to_bf16 == quantized / 8192


@pytest.mark.parametrize("bits,limit", [(8, 0.55), (4, 0.30)])
def test_quantized_base_memory_and_logits(bits, limit, tmp_path):
    """quantize_base quantizes every block Linear but lm_head, the weights in at most 0.55x
    (8-bit) or 0.30x (4-bit) of their bf16 bytes, the logits within 2% or 15% relative error."""
    _, model, _ = _pair("llama", tmp_path)
    ids = _ids(6)
    reference = _logits(model, ids)
    report = quantize_base(model, bits=bits)
    assert report.ratio_to_bf16 <= limit
    assert len(report.modules) == 2 * 5  # qkv, proj, gate, fc, proj per block; not lm_head
    rel = ((_logits(model, ids) - reference).norm() / reference.norm()).item()
    print(f"\n{report.ratio_to_bf16:.3f}x of bf16; logits relative error {rel:.4f}")
    assert rel < (0.02 if bits == 8 else 0.15)


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_qlora_on_nf4_base_lowers_the_loss(family, tmp_path):
    """QLoRA (NF4 base, adapters on every linear layer) halves the loss of a bigram task in 15
    steps, the quantized weights frozen; merging into a quantized base is refused."""
    _, model, _ = _pair(family, tmp_path)
    quantize_base(model, bits=4)
    # QLoRA's recipe: every linear layer (the output head stays in full precision).
    apply_lora(model, LoRAConfig(r=8, alpha=16, target_modules=[
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head"]))
    assert isinstance(model.blocks[0].attn.qkv.base, QuantLinear)
    frozen = model.blocks[0].attn.qkv.base.qweight.clone()
    task = torch.arange(32).repeat(4, 1) % 7 + 10  # each token fixes the next: a bigram task
    losses = _train(model, steps=15, lr=1e-2, ids=task)
    assert losses[-1] < 0.5 * losses[0]
    assert torch.equal(model.blocks[0].attn.qkv.base.qweight, frozen)
    with pytest.raises(ValueError, match="quantized"):
        merge_lora(model)
    with pytest.raises(ValueError, match="quantized"):
        merge_and_export(model, tmp_path / "merged")


@pytest.mark.parametrize("bits", [3, 16, True, 4.5])
def test_quantize_base_refuses_other_bits_before_changing_the_model(bits):
    """quantize_base takes 8 (int8) or 4 (NF4) bits alone: another value is a ValueError naming
    it, and the model keeps every nn.Linear as it was (no module half replaced)."""
    model = Transformer(PRESETS["tiny"])
    before = {name: type(module) for name, module in model.named_modules()}
    with pytest.raises(ValueError, match=rf"bits {bits!r}: must be 8 .* or 4"):
        quantize_base(model, bits=bits)
    assert {name: type(module) for name, module in model.named_modules()} == before


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_qlora_on_cuda_bf16_autocast(tmp_path):
    """On CUDA under bf16 autocast an NF4 base with adapters runs forward and backward, and the
    adapters get gradients."""
    _, model, _ = _pair("llama", tmp_path)
    model.cuda()
    quantize_base(model, bits=4)
    apply_lora(model, LoRAConfig(r=8, alpha=16, target_modules=["q_proj", "v_proj"]))
    ids = _ids().cuda()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = F.cross_entropy(model(ids[:, :-1]).flatten(0, 1).float(), ids[:, 1:].flatten())
    loss.backward()
    assert model.blocks[0].attn.qkv.lora_A["q_proj"].grad is not None


def test_quantize_then_lora_matches_peft_count(tmp_path):
    """On a 4-bit base apply_lora's trainable and total counts are PEFT's on the full-precision
    model: the quantized weights count as the parameters they stand for."""
    hf = tiny_hf_model("phi")
    save_tiny_hf("phi", tmp_path / "hf")
    model = pretrained.load(tmp_path / "hf")
    quantize_base(model, bits=4)
    setting = REAL["002-phi-1_5"][2]
    report = apply_lora(model, LoRAConfig(**setting))
    # all params as PEFT counts them: the quantized weights too (buffers, yet counted)
    assert (report.trainable_params, report.total_params) == get_peft_model(
        hf, _peft_config(setting)).get_nb_trainable_parameters()


@pytest.mark.parametrize("layout", ["slices_with_gap", "permuted", "scattered"])
def test_lora_linear_row_layouts_match_explicit_sum(layout):
    """Adapters on rows of a fused Linear (slices with a gap, permuted, scattered) add each update
    to its own rows, as the explicit sum does, and merge() writes that sum into the base."""
    torch.manual_seed(0)
    base = torch.nn.Linear(8, 12)
    rows = {"slices_with_gap": {"q": torch.arange(0, 4), "v": torch.arange(8, 12)},
            "permuted": {"a": torch.tensor([5, 4, 3]), "b": torch.tensor([0, 2, 1])},
            "scattered": {"a": torch.tensor([0, 6, 3]), "b": torch.tensor([11, 1])}}[layout]
    layer = LoRALinear(base, r=2, scale=0.5, dropout=0.0)
    for key, r in rows.items():
        layer.add_adapter(key, key, r)
        with torch.no_grad():
            layer.lora_B[key].normal_()
    x = torch.randn(3, 8)
    expected = base(x)
    for key, r in rows.items():
        expected[:, r] += x @ layer.lora_A[key].T @ layer.lora_B[key].T * 0.5
    torch.testing.assert_close(layer(x), expected)
    layer.merge()
    torch.testing.assert_close(base(x), expected)


def test_legacy_pickled_peft_adapter_loads(tmp_path):
    """A PEFT adapter saved as adapter_model.bin (safe_serialization=False, the older form) loads
    with PEFT's logits."""
    hf, model, _ = _pair("llama", tmp_path)
    peft_model = get_peft_model(copy.deepcopy(hf), LoraConfig(r=2, target_modules=["v_proj"]))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_()
    peft_model.save_pretrained(tmp_path / "bin", safe_serialization=False)
    assert (tmp_path / "bin" / "adapter_model.bin").is_file()
    load_adapter(model, tmp_path / "bin")
    torch.testing.assert_close(_logits(model, _ids()), _logits(peft_model.eval(), _ids()),
                               atol=1e-4, rtol=0)


def test_quantize_base_keeps_tied_head_and_can_take_an_untied_one(tmp_path):
    """Even with skip=() a tied head stays full precision (it is the embedding), an untied one is
    quantized; the loss through it, LoRA-wrapped or not, is the cross-entropy of its logits."""
    _, llama, _ = _pair("llama", tmp_path / "llama")  # lm_head tied to embed_tokens
    assert "lm_head" not in quantize_base(llama, bits=4, skip=()).modules
    assert llama.lm_head.weight is llama.wte.weight
    _, phi, _ = _pair("phi", tmp_path / "phi")
    assert "lm_head" in quantize_base(phi, bits=4, skip=()).modules
    assert isinstance(phi.lm_head, QuantLinear)
    # The one loss takes such a head (unfused: it has no plain weight), LoRA-wrapped or not.
    ids = torch.randint(0, phi.cfg.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    for wrap in (False, True):
        if wrap:
            apply_lora(phi, LoRAConfig(r=2, target_modules=["lm_head"]))
        ref = F.cross_entropy(phi(ids).flatten(0, 1).float(), ids.flatten())
        torch.testing.assert_close(phi(ids, ids), ref)


def test_merge_and_export_leaves_the_adapters_merged_in_place_and_unmerge_resumes(tmp_path):
    """Its docstring: the model is left merged and unmerge_lora resumes training, so the LoRA
    layers must stay (merged), unmerging must give the adapted logits back, and saving works."""
    _, model, setting = _pair("codegen", tmp_path)
    apply_lora(model, LoRAConfig(**setting))
    _train(model, steps=2)
    ids = _ids(7)
    adapted = _logits(model, ids)
    before = [path for path, _ in lora_modules(model)]
    merge_and_export(model, tmp_path / "merged")
    modules = list(lora_modules(model))
    assert [p for p, _ in modules] == before and all(m.merged for _, m in modules)
    unmerge_lora(model)
    assert not any(m.merged for _, m in lora_modules(model))
    torch.testing.assert_close(_logits(model, ids), adapted, atol=1e-5, rtol=0)
    save_adapter(model, tmp_path / "adapter")  # still an adapter model


@pytest.mark.parametrize("regex", [r"q_proj", r"layers\.0\.self_attn\.q_proj",
                                   r"model\.layers\.0\.self_attn\.(q|v)",
                                   r".*\.layers\.1\.self_attn\.[qv]_proj"])
def test_a_regex_target_selects_what_peft_selects(tmp_path, regex):
    """A string target_modules must match the WHOLE module name, as PEFT's re.fullmatch does;
    a search would adapt modules PEFT leaves alone. Reference: PEFT on the HF model."""
    hf_dir = tmp_path / "hf"
    save_tiny_hf("llama", hf_dir)
    hf = tf.AutoModelForCausalLM.from_pretrained(hf_dir)
    try:
        peft = get_peft_model(hf, LoraConfig(r=4, lora_alpha=8, target_modules=regex))
        want = sorted(n.removeprefix("base_model.model.") for n, m in peft.named_modules()
                      if hasattr(m, "lora_A") and len(m.lora_A))
    except ValueError:
        want = None  # PEFT: no module matched
    model = pretrained.load(hf_dir)
    if want is None:
        with pytest.raises(ValueError, match="match no module"):
            apply_lora(model, LoRAConfig(r=4, alpha=8, target_modules=regex))
        return
    report = apply_lora(model, LoRAConfig(r=4, alpha=8, target_modules=regex))
    assert sorted(report.targets[regex]) == want


def test_quantizing_a_model_that_already_has_adapters_keeps_the_head_and_names_hf_modules(
        tmp_path):
    """quantize_base reaches Linears under LoRA too: skip=("lm_head",) must still keep a
    LoRA-wrapped head, and the report names the modules, not their .base."""
    _, model, _ = _pair("phi", tmp_path)
    apply_lora(model, LoRAConfig(r=4, alpha=8, target_modules=["q_proj", "lm_head"]))
    report = quantize_base(model, bits=8)
    assert not any(name.endswith(".base") for name in report.modules)
    assert "lm_head" not in report.modules
    assert isinstance(model.lm_head.base, torch.nn.Linear)


def test_quantizing_after_lora_keeps_the_biases_lora_trains(tmp_path):
    """bias="lora_only" trains the adapted modules' biases: quantizing the base afterwards
    keeps them trainable (the same parameters), and a step changes them."""
    _, model, _ = _pair("phi", tmp_path)
    apply_lora(model, LoRAConfig(r=4, alpha=8, target_modules=["q_proj", "k_proj", "v_proj"],
                                 bias="lora_only"))
    trained = {name: p for name, p in model.named_parameters()
               if name.endswith("bias") and p.requires_grad}
    assert trained
    quantize_base(model, bits=4)
    after = {name: p for name, p in model.named_parameters()
             if name.endswith("bias") and p.requires_grad}
    assert after.keys() == trained.keys()
    assert all(after[name] is p for name, p in trained.items())
    start = {name: p.detach().clone() for name, p in after.items()}
    _train(model, steps=1)
    assert all(not torch.equal(p, start[name]) for name, p in after.items())


def test_the_saved_adapter_config_records_the_training_settings(tmp_path):
    """adapter_config.json carries r, lora_alpha and lora_dropout as trained: PEFT reads
    lora_dropout when the adapter is trained further (is_trainable=True)."""
    _, model, setting = _pair("llama", tmp_path)  # dropout 0.05
    apply_lora(model, LoRAConfig(**setting))
    save_adapter(model, tmp_path / "a")
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], config["lora_dropout"]) == (16, 32, 0.05)
    peft = PeftModel.from_pretrained(tf.AutoModelForCausalLM.from_pretrained(tmp_path / "hf"),
                                     tmp_path / "a", is_trainable=True)
    assert peft.peft_config["default"].lora_dropout == 0.05


def test_dora_with_dropout_in_training_equals_peft_under_the_same_mask(monkeypatch):
    """In training with dropout, DoRA's base term is W of the dropped-out input, without the
    bias, as PEFT's DoRA layer computes it: with PEFT's dropout drawing codelm's mask, one
    layer's output equals PEFT's."""
    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.q = torch.nn.Linear(6, 4)

        def forward(self, x):
            return self.q(x)

    torch.manual_seed(0)
    base = Tiny()
    peft_model = get_peft_model(Tiny(), LoraConfig(
        r=2, lora_alpha=1, target_modules=["q"], use_dora=True, lora_dropout=0.3,
        init_lora_weights=False))
    layer = peft_model.base_model.model.q
    layer.base_layer.load_state_dict(base.q.state_dict())
    with torch.no_grad():
        layer.lora_magnitude_vector["default"].weight.mul_(1.5)
    ours = lora.LoRALinear(base.q, 2, 0.5, 0.3, dora=True)
    ours.add_adapter("q", "q", None)
    with torch.no_grad():
        ours.lora_A["q"].copy_(layer.lora_A["default"].weight)
        ours.lora_B["q"].copy_(layer.lora_B["default"].weight)
        ours.magnitude["q"].copy_(layer.lora_magnitude_vector["default"].weight)
    x = torch.randn(3, 6)
    mask = kernels.dropout_keep(x, 0.3, 1234, torch.float32)

    class Masked(torch.nn.Module):
        def forward(self, t):
            return t * mask

    layer.lora_dropout["default"] = Masked()
    monkeypatch.setattr(kernels, "dropout_seed", lambda: 1234)
    peft_model.train()
    ours.train()
    assert layer.scaling["default"] == ours.scale == 0.5
    assert base.q.bias.abs().min() > 0
    torch.testing.assert_close(ours(x), peft_model(x), atol=1e-6, rtol=0)


def test_each_adapter_of_a_fused_module_draws_its_own_dropout_mask():
    """As each PEFT module does: one shared mask would correlate the q and v updates."""
    base = torch.nn.Linear(16, 6)
    layer = LoRALinear(base, r=2, scale=0.5, dropout=0.5)
    rows = {"a": torch.arange(0, 3), "b": torch.arange(3, 6)}
    for key, r in rows.items():
        layer.add_adapter(key, key, r)
        with torch.no_grad():
            layer.lora_B[key].normal_()
    x = torch.randn(8, 16)
    layer.train()
    torch.manual_seed(0)
    masks = {key: kernels.dropout_keep(x, 0.5, kernels.dropout_seed(), torch.float32)
             for key in rows}
    assert not torch.equal(masks["a"], masks["b"])
    expected = base(x)
    for key, r in rows.items():
        expected[:, r] += (x * masks[key]) @ layer.lora_A[key].T @ layer.lora_B[key].T * 0.5
    torch.manual_seed(0)
    torch.testing.assert_close(layer(x), expected)


def test_quantized_linear_keeps_the_base_dtype_and_follows_autocast_like_nn_linear():
    """dequantize() defaults to the dtype quantized from; under autocast an fp32 layer's output
    (bias added) is in autocast's dtype, as nn.Linear's is, not promoted back to fp32."""
    torch.manual_seed(0)
    bf16 = QuantLinear(torch.nn.Linear(64, 16).to(torch.bfloat16), 8)
    assert bf16.dequantize().dtype == torch.bfloat16
    linear = torch.nn.Linear(64, 16)
    q = QuantLinear(linear, 8)
    x = torch.randn(3, 64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = F.linear(x, q.dequantize(), linear.bias)
        out = q(x)
    assert out.dtype == ref.dtype == torch.bfloat16
    torch.testing.assert_close(out, ref)


def test_quantize_base_skips_a_dotted_suffix_of_a_module_name(tmp_path):
    """skip takes a dotted suffix ("mlp.proj") and keeps exactly those Linears in full precision; a
    second call with nothing left to quantize is an error."""
    _, model, _ = _pair("llama", tmp_path)
    report = quantize_base(model, bits=8, skip=("lm_head", "mlp.proj"))
    assert not any(name.endswith("mlp.proj") for name in report.modules)
    assert all(type(b.mlp.proj) is torch.nn.Linear for b in model.blocks)
    assert isinstance(model.blocks[0].mlp.fc, QuantLinear)
    with pytest.raises(ValueError, match="no nn.Linear to quantize"):
        quantize_base(model, bits=8, skip=("lm_head", "mlp.proj"))


def test_qlora_trains_a_module_saved_whole_in_full_precision(tmp_path):
    """QLoRA with modules_to_save: the named module stays unquantized and trains whole, its
    weights in the adapter file as without quantization; a module quantized before the adapter
    is refused by name, not left untrained."""
    from codelm import loading
    from codelm.runtime.settings import fields_of

    hf = tmp_path / "hf"
    save_tiny_hf("llama", hf)
    trained = {}
    for bits in (0, 4):
        cfg = trainconfig.TrainConfig(init_from=str(hf), lora_r=4, quantize_bits=bits,
                                      lora_targets=["q_proj"], lora_modules_to_save=["down_proj"])
        model = pretrained.load(hf)
        loading._add_lora(model, trainconfig.ModelSettings(
            **fields_of(trainconfig.ModelSettings, cfg)))
        trained[bits] = {n for n, p in model.named_parameters() if p.requires_grad}
        assert type(model.blocks[0].mlp.proj) is torch.nn.Linear
        save_adapter(model, tmp_path / f"adapter{bits}")
    assert trained[4] == trained[0]
    assert "blocks.1.mlp.proj.weight" in trained[4]
    keys = [set(load_file(tmp_path / f"adapter{bits}" / "adapter_model.safetensors"))
            for bits in (0, 4)]
    assert keys[0] == keys[1] and any("down_proj" in key for key in keys[0])
    model = pretrained.load(hf)
    quantize_base(model, bits=4)
    with pytest.raises(ValueError, match="modules_to_save .*down_proj.*quantized"):
        apply_lora(model, LoRAConfig(r=2, target_modules=["q_proj"],
                                     modules_to_save=["down_proj"]))


def test_apply_lora_twice_and_save_without_adapters_are_refused(tmp_path):
    """save_adapter on a model without adapters is refused, writing nothing, and a second
    apply_lora is refused, the first adapters left as they were."""
    _, model, _ = _pair("llama", tmp_path)
    with pytest.raises(ValueError, match="the model has no LoRA adapters"):
        save_adapter(model, tmp_path / "a")
    assert not (tmp_path / "a").exists()
    apply_lora(model, LoRAConfig(r=2, target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="already has LoRA adapters"):
        apply_lora(model, LoRAConfig(r=2, target_modules=["v_proj"]))
    assert [p for p, _ in lora_modules(model)] == ["blocks.0.attn.qkv", "blocks.1.attn.qkv"]
    assert list(model.blocks[0].attn.qkv.lora_A) == ["q_proj"]


def _saved_adapter(tmp_path):
    """A llama model with trained q/v adapters saved to tmp_path / "a", and a fresh base."""
    _, model, _ = _pair("llama", tmp_path)
    apply_lora(model, LoRAConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"]))
    _train(model, steps=1)
    save_adapter(model, tmp_path / "a")
    _, fresh, _ = _pair("llama", tmp_path / "other")
    return model, fresh


def _edit_adapter(adapter_dir, config=None, tensors=None):
    if config is not None:
        file = adapter_dir / adapter_config.ADAPTER_CONFIG
        file.write_text(json.dumps({**json.loads(file.read_text()), **config}))
    if tensors is not None:
        file = adapter_dir / adapter_config.ADAPTER_WEIGHTS
        save_file(tensors(load_file(file)), file)


def test_adapter_of_another_peft_type_or_without_alpha_is_refused(tmp_path):
    """An adapter_config.json of another PEFT type (LOHA) or with a null lora_alpha is refused
    naming the file and field, and no adapter is attached: read as LoRA it would compute something
    else."""
    _, fresh = _saved_adapter(tmp_path)
    _edit_adapter(tmp_path / "a", config={"peft_type": "LOHA"})
    with pytest.raises(ValueError, match=r"adapter_config.json: peft_type 'LOHA' is not LORA"):
        load_adapter(fresh, tmp_path / "a")
    _edit_adapter(tmp_path / "a", config={"peft_type": "LORA", "lora_alpha": None})
    with pytest.raises(ValueError, match=r"adapter_config.json: lora_alpha=None: must be"):
        load_adapter(fresh, tmp_path / "a")
    assert not list(lora_modules(fresh))


def test_adapter_tensors_of_the_wrong_shape_or_name_are_refused(tmp_path):
    """A lora_A of one row would broadcast into all r rows; an unknown key or a base_layer tensor
    of another module or vocabulary must be errors naming the file, not a TypeError or a copy."""
    _, fresh = _saved_adapter(tmp_path)
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    good = load_file(tmp_path / "a" / adapter_config.ADAPTER_WEIGHTS)
    cases = [
        ({key: good[key][:1]}, rf"{key}' has shape \(1, 64\), the model expects \(4, 64\)"),
        ({"base_model.model.model.layers.0.scale": torch.ones(1)},
         r"key 'base_model.model.model.layers.0.scale' matches no adapter"),
        ({"base_model.model.model.extra.base_layer.weight": torch.ones(1)},
         r"key 'base_model.model.model.extra.base_layer.weight' names no module"),
        ({"base_model.model.model.embed_tokens.base_layer.weight": torch.zeros(300, 64)},
         r"has shape \(300, 64\), wte expects \(256, 64\) \(was the vocabulary resized\?\)"),
    ]
    before = {k: v.clone() for k, v in fresh.state_dict().items()}
    for change, message in cases:
        _edit_adapter(tmp_path / "a", tensors=lambda t, change=change: {**good, **change})
        with pytest.raises(ValueError, match=rf"adapter_model.safetensors: .*{message}"):
            load_adapter(fresh, tmp_path / "a")
        assert not list(lora_modules(fresh))
        assert all(torch.equal(v, fresh.state_dict()[k]) for k, v in before.items())


def test_safetensors_adapter_weights_are_preferred_over_a_pickled_copy(tmp_path):
    """PEFT reads adapter_model.safetensors when both are present (an old .bin left beside it)."""
    model, fresh = _saved_adapter(tmp_path)
    stale = {k: torch.zeros_like(v) for k, v in
             load_file(tmp_path / "a" / adapter_config.ADAPTER_WEIGHTS).items()}
    torch.save(stale, tmp_path / "a" / adapter_config.LEGACY_WEIGHTS)
    load_adapter(fresh, tmp_path / "a")
    ids = _ids(3)
    torch.testing.assert_close(_logits(fresh, ids), _logits(model, ids), atol=0, rtol=0)


def test_a_merged_checkpoint_keeps_the_bases_chat_template_and_sentencepiece_files(tmp_path):
    """transformers 5 writes a chat template to chat_template.jinja, and a SentencePiece base
    keeps tokenizer.model: both travel with the merged weights, as the tokenizer files do."""
    save_tiny_hf("llama", tmp_path / "hf")
    for name, text in (("tokenizer.json", '{"model": {}}'), ("chat_template.jinja", "{{ x }}"),
                       ("tokenizer.model", "sp")):
        (tmp_path / "hf" / name).write_text(text)
    hf = tf.AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    peft_model = get_peft_model(hf, _peft_config(dict(r=4, alpha=8, target_modules=["q_proj"])))
    peft_model.save_pretrained(tmp_path / "adapter")
    assert lora.main([str(tmp_path / "adapter"), str(tmp_path / "merged")]) == 0
    for name in ("chat_template.jinja", "tokenizer.model", "tokenizer.json"):
        assert (tmp_path / "merged" / name).read_text() == (tmp_path / "hf" / name).read_text()


def test_cli_merges_into_a_base_given_as_a_hub_id_with_its_files(tmp_path, offline_hub):
    """--base org/name is the snapshot in the hub cache, as load reads it: the merged directory
    holds its tokenizer and generation files beside the weights, as a directory's merge does."""
    from tiny_hf import hub_cache, save_random_adapter, save_tiny_llama3_instruct

    save_tiny_llama3_instruct(tmp_path / "dir", ["def f(x):\n    return x + 1\n"] * 20)
    hub_cache(offline_hub, "org/tiny", tmp_path / "dir")
    save_random_adapter(tmp_path / "dir", tmp_path / "adapter")
    assert lora.main([str(tmp_path / "adapter"), str(tmp_path / "out"), "--base", "org/tiny"]) == 0
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (tmp_path / "out" / name).read_bytes() == (tmp_path / "dir" / name).read_bytes()


def test_cli_merges_a_peft_adapter_into_a_checkpoint_transformers_loads(tmp_path, capsys):
    """`python lora.py ADAPTER OUT`: the base named by the adapter's config, the adapter merged,
    written as a plain HF checkpoint with the adapter's tokenizer file: transformers loads it
    without PEFT and its logits are PEFT's (base + adapter)."""
    setting = dict(r=4, alpha=8, target_modules=["q_proj", "v_proj", "o_proj", "gate_proj"])
    save_tiny_hf("llama", tmp_path / "hf")
    hf = tf.AutoModelForCausalLM.from_pretrained(tmp_path / "hf")  # PEFT records its path
    peft_model = get_peft_model(hf, _peft_config(setting))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn_like(p) * 0.1)
    adapter = tmp_path / "adapter"
    peft_model.save_pretrained(adapter)
    (adapter / "tokenizer.json").write_text('{"model": {}}')
    out = tmp_path / "merged"
    assert lora.main([str(adapter), str(out)]) == 0
    n_layer = hf.config.num_hidden_layers  # PEFT's 4 per layer; q/v are one fused qkv here
    said = capsys.readouterr().out
    assert len(said.splitlines()) == 1, said
    assert all(w in said for w in (f"wrote {out}", str(adapter), f"on {4 * n_layer} modules",
                                   f"({3 * n_layer} codelm modules)",
                                   f"into {tmp_path / 'hf'}", "(torch.float32)")), said
    assert (out / "tokenizer.json").read_text() == '{"model": {}}'
    assert not (out / "adapter_config.json").exists()
    merged = tf.AutoModelForCausalLM.from_pretrained(out).eval()
    ids = _ids(3)
    torch.testing.assert_close(_logits(merged, ids), _logits(peft_model.eval(), ids),
                               atol=1e-5, rtol=0)


def test_cli_without_a_local_base_asks_for_base_and_writes_nothing(tmp_path, capsys,
                                                                   offline_hub):
    """lora.py with a base that is neither a directory nor in the hub cache exits 2 naming the
    base, its download command and --base; a directory holding no adapter (a base, a run) is named
    likewise; nothing is written. With --base it merges."""
    hf, model, _ = _pair("phi", tmp_path)
    apply_lora(model, LoRAConfig(r=2, alpha=4, target_modules=["fc1"]))
    save_adapter(model, tmp_path / "adapter", base_model_name_or_path="microsoft/phi-1_5")
    out = tmp_path / "out"
    capsys.readouterr()
    assert lora.main([str(tmp_path / "adapter"), str(out)]) == 2
    err = capsys.readouterr().err  # the base is neither a directory nor in the hub cache
    assert err.startswith(f"error: {tmp_path / 'adapter' / 'adapter_config.json'}: "
                          "base_model_name_or_path microsoft/phi-1_5: no such directory")
    assert "hf download microsoft/phi-1_5" in err and err.endswith("name it with --base\n")
    assert lora.main([str(tmp_path / "adapter"), str(out), "--base", str(tmp_path / "hf"),
                      "--dtype", "bf16"]) == 0
    assert "(torch.bfloat16)" in capsys.readouterr().out
    assert lora.main([str(tmp_path / "hf"), str(tmp_path / "o2")]) == 2
    assert "adapter_config.json: not found" in capsys.readouterr().err
    assert not (tmp_path / "o2").exists()
    assert lora.main([str(tmp_path), str(tmp_path / "o3")]) == 2  # a run dir, not its export/
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and err.startswith("error: "), err
    assert all(w in err for w in (f"{tmp_path / 'adapter_config.json'}: not found",
                                  "adapter_model.safetensors",
                                  f"{tmp_path / 'adapter'} holds one")), err


def test_cli_refuses_a_base_whose_embeddings_the_adapters_tokenizer_overruns(tmp_path, capsys):
    """An adapter's tokenizer (the one it trained with) over a --base of fewer embeddings is
    another base's: refused in one line naming both sizes, nothing written; the tokenizer's
    ids count its vocabulary and added tokens."""
    hf, model, _ = _pair("llama", tmp_path)
    apply_lora(model, LoRAConfig(r=2, alpha=4, target_modules=["q_proj"]))
    adapter = tmp_path / "adapter"
    save_adapter(model, adapter, base_model_name_or_path=str(tmp_path / "hf"))
    vocab = hf.config.vocab_size
    (adapter / "tokenizer.json").write_text(json.dumps({
        "model": {"vocab": {f"t{i}": i for i in range(vocab)}},
        "added_tokens": [{"id": vocab + 4, "content": "<|extra|>"}]}))
    assert lora.tokenizer_size(adapter / "tokenizer.json") == vocab + 5
    out = tmp_path / "merged"
    capsys.readouterr()
    assert lora.main([str(adapter), str(out)]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and f"has {vocab + 5} tokens" in err, err
    assert f"only {vocab} embeddings" in err and "--base" in err and not out.exists()


def test_an_adapter_on_a_base_of_another_family_is_refused_another_same_family_base_noted(
        tmp_path, capsys):
    """An adapter trained on a llama base, given a mistral one (another family, whatever the
    shapes): lora.py's merge, eval's BASE+ADAPTER and trainingmanager's --init-adapter with
    --init-from refuse it in one line naming both families; a llama base other than its own
    is merged with a note naming both."""
    import shutil

    from codelm import loading
    from codelm.trainconfig import TrainConfig
    from codelm.training import plan

    _, model, _ = _pair("llama", tmp_path)
    apply_lora(model, LoRAConfig(r=2, alpha=4, target_modules=["q_proj"]))
    adapter = tmp_path / "adapter"
    save_adapter(model, adapter, base_model_name_or_path=str(tmp_path / "hf"))
    mistral = tmp_path / "mistral"
    save_tiny_hf("mistral", mistral)
    capsys.readouterr()
    assert lora.main([str(adapter), str(tmp_path / "m1"), "--base", str(mistral)]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and "a llama model" in err and "a mistral model" in err
    assert "give a llama base" in err and not (tmp_path / "m1").exists()
    with pytest.raises(ValueError, match="a mistral model: give a llama base"):
        loading.load_model(f"{mistral}+{adapter}", "cpu")
    with pytest.raises(ValueError, match=r"^--init-from: .*a mistral model"):
        plan.validate_config(TrainConfig(init_adapter=str(adapter), init_from=str(mistral)))
    other = tmp_path / "other-llama"
    shutil.copytree(tmp_path / "hf", other)
    assert lora.main([str(adapter), str(tmp_path / "m2"), "--base", str(other)]) == 0
    err = capsys.readouterr().err
    assert f"names the base {tmp_path / 'hf'}, not {other}" in err


def test_apply_lora_and_load_adapter_refuse_a_foreign_model(tmp_path):
    """A transformers model: a ValueError naming what is wanted, before anything is frozen."""
    _, model, _ = _pair("llama", tmp_path)
    apply_lora(model, LoRAConfig(r=2, target_modules=["q_proj"]))
    save_adapter(model, tmp_path / "a")
    hf = tiny_hf_model("llama")
    for call, arg in ((apply_lora, LoRAConfig(r=2, target_modules=["q_proj"])),
                      (load_adapter, tmp_path / "a")):
        with pytest.raises(ValueError, match=rf"^{call.__name__} .*codelm's Transformer.*"
                                             r"pretrained\.load\(dir\).*LlamaForCausalLM$"):
            call(hf, arg)
    assert all(p.requires_grad for p in hf.parameters())


def test_apply_lora_refuses_a_peft_config_or_a_dict_before_anything_is_frozen(tmp_path):
    """PEFT's LoraConfig or a dict of its fields: a ValueError naming codelm's LoRAConfig, the
    model left as it was."""
    _, model, _ = _pair("llama", tmp_path)
    for config in (LoraConfig(r=4, target_modules=["q_proj"]), {"r": 4}):
        with pytest.raises(ValueError, match=rf"^apply_lora takes codelm's LoRAConfig .*"
                                             rf"got {type(config).__name__}$"):
            apply_lora(model, config)
    assert all(p.requires_grad for p in model.parameters())


@pytest.mark.parametrize("values, message", [
    ({"r": 0}, r"LoRAConfig\.r=0: must be a positive integer"),
    ({"r": -3}, r"LoRAConfig\.r=-3"), ({"r": 2.5}, r"LoRAConfig\.r=2\.5"),
    ({"dropout": 1.5}, r"LoRAConfig\.dropout=1\.5: must be a number in \[0, 1\)"),
    ({"alpha": 0}, r"LoRAConfig\.alpha=0"),
    ({"target_modules": []}, r"LoRAConfig\.target_modules=\[\]: must be a list of module"),
    ({"bias": "some"}, r"LoRAConfig\.bias='some'")])
def test_lora_config_refuses_what_peft_would_not_write(values, message):
    """LoRAConfig's fields take what PEFT's adapter_config.json may hold, as reading one
    checks them: r 0 would divide by zero as the scale, a dropout of 1.5 drop everything."""
    with pytest.raises(ValueError, match=f"^{message}"):
        LoRAConfig(**values)


def test_lora_config_takes_tuples_of_names_and_numpys_numbers():
    """What PEFT's LoraConfig takes besides: a tuple of module names (kept as the list), and
    numpy's integers and floats (as Python's)."""
    import numpy as np

    cfg = LoRAConfig(r=np.int64(4), alpha=np.float32(8.0), dropout=np.float64(0.1),
                     target_modules=("q_proj", "v_proj"), modules_to_save=("lm_head",))
    assert (cfg.r, cfg.alpha, cfg.target_modules, cfg.modules_to_save) == (
        4, 8.0, ["q_proj", "v_proj"], ["lm_head"])
    assert type(cfg.r) is int and type(cfg.alpha) is float and cfg.scale == 2.0


@pytest.mark.parametrize(("write", "message"), [
    (lambda f, good: f.write_bytes(b"not a pickle"),
     "truncated or corrupt weights file (UnpicklingError)"),
    (lambda f, good: torch.save(list(good.values()), f),
     "expected a state dict (names -> tensors)"),
    (lambda f, good: torch.save({**good, next(iter(good)): [0.0]}, f),
     "expected a state dict (names -> tensors)"),
], ids=["not_a_pickle", "a_list", "a_non_tensor_value"])
def test_damaged_or_non_dict_legacy_adapter_bin_is_an_error_naming_the_file(tmp_path, write,
                                                                             message):
    """An old PEFT adapter_model.bin: not torch's text advising weights_only=False (which runs
    any code in the file), nor a TypeError from matching a tensor as a key name."""
    _, fresh = _saved_adapter(tmp_path)
    good = load_file(tmp_path / "a" / adapter_config.ADAPTER_WEIGHTS)
    (tmp_path / "a" / adapter_config.ADAPTER_WEIGHTS).unlink()
    write(tmp_path / "a" / adapter_config.LEGACY_WEIGHTS, good)
    with pytest.raises(ValueError) as e:
        load_adapter(fresh, tmp_path / "a")
    assert str(e.value) == f"{tmp_path / 'a' / adapter_config.LEGACY_WEIGHTS}: {message}"
    assert not list(lora_modules(fresh)) and all(p.requires_grad for p in fresh.parameters())


def test_save_adapter_records_a_path_base_as_a_string(tmp_path):
    """Users hold Paths (from_pretrained takes one): a Path base is recorded as its string (json
    takes no Path) and read back as the path."""
    _, model, _ = _pair("llama", tmp_path)
    hf_dir = tmp_path / "hf"
    apply_lora(model, LoRAConfig(r=2, target_modules=["q_proj"]))
    save_adapter(model, tmp_path / "a", base_model_name_or_path=hf_dir)
    config = json.loads((tmp_path / "a" / adapter_config.ADAPTER_CONFIG).read_text())
    assert config["base_model_name_or_path"] == str(hf_dir)
    assert adapter_config.adapter_base(tmp_path / "a", "") == hf_dir


@pytest.mark.parametrize("named", [5, ["hf"], {"path": "hf"}])
def test_a_base_named_by_no_string_is_one_line_or_no_note(tmp_path, named):
    """An adapter_config.json whose base_model_name_or_path is no string: alone, the adapter
    is a ValueError naming the file, the key and the remedy; with its base given beside it
    (BASE+ADAPTER), the config names no other base, so no note and no family check refuse it."""
    _, model, _ = _pair("llama", tmp_path)
    apply_lora(model, LoRAConfig(r=2, target_modules=["q_proj"]))
    save_adapter(model, tmp_path / "a")
    config_file = tmp_path / "a" / adapter_config.ADAPTER_CONFIG
    config = json.loads(config_file.read_text())
    config_file.write_text(json.dumps({**config, "base_model_name_or_path": named}))
    with pytest.raises(ValueError, match=rf"adapter_config.json: base_model_name_or_path="
                                         rf"{re.escape(repr(named))}: expected a string.*; give it"):
        adapter_config.adapter_base(tmp_path / "a", "give it")
    assert adapter_config.other_base_note(tmp_path / "a", tmp_path / "hf") is None
    adapter_config.check_base_family(tmp_path / "a", tmp_path / "hf")


def test_save_adapter_records_a_relative_local_base_as_found_from_anywhere(tmp_path,
                                                                          monkeypatch):
    """A local base named relative to the current directory is recorded absolute: the adapter
    finds it from any directory (lora.py's merge, eval.py's ADAPTER alone)."""
    _, model, _ = _pair("llama", tmp_path)
    apply_lora(model, LoRAConfig(r=2, target_modules=["q_proj"]))
    monkeypatch.chdir(tmp_path)
    save_adapter(model, tmp_path / "a", base_model_name_or_path="hf")
    monkeypatch.chdir(tmp_path / "a")
    assert adapter_config.adapter_base(tmp_path / "a", "") == tmp_path / "hf"


def test_save_adapter_of_a_model_without_a_base_says_so(tmp_path, capsys):
    """A model built from a config names no base: its adapter records none, and save_adapter
    says how to name one; a named base gets no such note."""
    model = Transformer(PRESETS["tiny"])
    apply_lora(model, LoRAConfig(r=2, target_modules=["q_proj"]))
    save_adapter(model, tmp_path / "a")
    config = json.loads((tmp_path / "a" / adapter_config.ADAPTER_CONFIG).read_text())
    assert config["base_model_name_or_path"] is None
    err = capsys.readouterr().err
    assert "names no base" in err and "base_model_name_or_path=" in err and "BASE+ADAPTER" in err
    save_adapter(model, tmp_path / "b", base_model_name_or_path=tmp_path)
    assert "names no base" not in capsys.readouterr().err


def test_training_through_merged_adapters_says_to_unmerge_first(tmp_path):
    """Merged adapters are skipped in forward, so a training step would get autograd's "does not
    require grad" (or adapters that stop learning): it says to unmerge first; evaluating merged
    still works."""
    _, model, _ = _pair("phi", tmp_path)  # untied: its embedding can be merged
    apply_lora(model, LoRAConfig(r=2, target_modules=["q_proj", "embed_tokens"]))
    merge_lora(model)
    model.train()
    message = r"^the LoRA adapters are merged .* call lora\.unmerge_lora\(model\) before training"
    with pytest.raises(ValueError, match=message):
        model(_ids())  # the embedding's adapter
    with pytest.raises(ValueError, match=message):
        model.blocks[0].attn.qkv(torch.randn(2, 64))  # a Linear's
    merged = _logits(model, _ids())  # no_grad
    model.eval()
    torch.testing.assert_close(model(_ids()).detach(), merged, atol=0, rtol=0)
    unmerge_lora(model)
    _train(model, steps=1)


def test_one_string_target_explains_that_it_is_a_full_name_regex(tmp_path):
    """PEFT reads one string as a regex over whole module names, so "q_proj" matches nothing;
    the error says why, not only listing q_proj among the valid names."""
    model, fresh = _saved_adapter(tmp_path)
    explained = ("target(s) 'q_proj'", "no module of this llama model", "regular expression",
                 "whole module name", "model.layers.0.self_attn.q_proj", "list: ['q_proj']")
    with pytest.raises(ValueError) as e:
        apply_lora(fresh, LoRAConfig(target_modules="q_proj"))
    assert all(w in str(e.value) for w in explained), e.value
    _edit_adapter(tmp_path / "a", config={"target_modules": "q_proj"})
    with pytest.raises(ValueError) as e:
        load_adapter(fresh, tmp_path / "a")
    said = str(e.value)
    assert said.startswith(f"{tmp_path / 'a' / adapter_config.ADAPTER_CONFIG}: "), said
    assert all(w in said for w in explained), said
    assert not list(lora_modules(fresh))


def test_saving_into_a_file_keeps_the_file(tmp_path):
    """mkdir's error names the path; nothing is written."""
    _, model, _ = _pair("llama", tmp_path)
    apply_lora(model, LoRAConfig(r=2, target_modules=["q_proj"]))
    file = tmp_path / "taken"
    file.write_text("mine")
    for call in (save_adapter, merge_and_export):
        for path in (file, file / "out"):
            with pytest.raises(OSError, match=str(file)):
                call(model, path)
    assert file.read_text() == "mine" and sorted(tmp_path.iterdir()) == [tmp_path / "hf", file]


def test_cli_takes_the_bases_tokenizer_files_when_the_adapter_has_none(tmp_path, capsys):
    """The merged checkpoint is usable as it stands: an adapter saved without tokenizer files
    gets its base's (by default the directory from_pretrained read, as transformers' PEFT
    records name_or_path); an adapter saved with no base known (a model built, not loaded) is a
    one-line error asking for --base, not a TypeError."""
    _, model, _ = _pair("phi", tmp_path)
    (tmp_path / "hf" / "tokenizer.json").write_text('{"model": "the base\'s"}')
    (tmp_path / "hf" / "tokenizer_config.json").write_text('{"eos_token": "<|endoftext|>"}')
    apply_lora(model, LoRAConfig(r=2, alpha=4, target_modules=["fc1"]))
    save_adapter(model, tmp_path / "named")
    assert adapter_config.adapter_base(tmp_path / "named", "") == tmp_path / "hf"
    assert lora.main([str(tmp_path / "named"), str(tmp_path / "out")]) == 0
    assert (tmp_path / "out" / "tokenizer.json").read_text() == '{"model": "the base\'s"}'
    assert (tmp_path / "out" / "tokenizer_config.json").is_file()
    built = Transformer(model.cfg)
    apply_lora(built, LoRAConfig(r=2, alpha=4, target_modules=["fc1"]))
    save_adapter(built, tmp_path / "unnamed")
    capsys.readouterr()
    assert lora.main([str(tmp_path / "unnamed"), str(tmp_path / "out2")]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and err.startswith("error: "), err
    assert all(w in err for w in (str(tmp_path / "unnamed" / "adapter_config.json"),
                                  "base_model_name_or_path None", "--base")), err


def test_cli_stopped_by_sigterm_while_writing_leaves_nothing(tmp_path, capsys, monkeypatch):
    """A scheduler's SIGTERM mid-write: exit 143, one line, and no half-merged OUT."""
    _, model, _ = _pair("llama", tmp_path)
    apply_lora(model, LoRAConfig(r=2, target_modules=["q_proj"]))
    save_adapter(model, tmp_path / "a", base_model_name_or_path=tmp_path / "hf")

    def stop(f, tensors):
        f.write(b"partial")
        raise KeyboardInterrupt("SIGTERM")

    monkeypatch.setattr(pretrained, "write_safetensors", stop)
    capsys.readouterr()
    assert lora.main([str(tmp_path / "a"), str(tmp_path / "out")]) == 143
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and err.startswith("interrupted"), err
    assert "nothing written" in err, err
    assert not (tmp_path / "out").exists()


def test_a_base_layer_tensor_of_a_fused_modules_rows_loads_where_peft_puts_it(tmp_path):
    """A base_layer tensor of an HF module that is rows of codelm's fused qkv (v_proj) is written
    to those rows only: PEFT loads the same file into q_proj, and the logits agree."""
    hf, model, _ = _pair("llama", tmp_path)
    peft_model = get_peft_model(copy.deepcopy(hf), _peft_config(
        dict(r=4, alpha=8, target_modules=["q_proj", "v_proj"])))
    peft_model.save_pretrained(tmp_path / "peft")
    key = "base_model.model.model.layers.0.self_attn.v_proj.base_layer.weight"
    _edit_adapter(tmp_path / "peft", tensors=lambda t: {**t, key: torch.randn(32, 64)})
    reference = PeftModel.from_pretrained(copy.deepcopy(hf), tmp_path / "peft").eval()
    q_and_k = model.blocks[0].attn.qkv.weight[:96].clone()  # v: the last 32 rows
    load_adapter(model, tmp_path / "peft")
    ids = _ids(4)
    torch.testing.assert_close(_logits(model, ids), _logits(reference, ids), atol=1e-5, rtol=0)
    assert torch.equal(model.blocks[0].attn.qkv.weight[:96], q_and_k)
    # On a quantized base there is no full-precision weight to write: an error naming the file.
    _, quantized, _ = _pair("llama", tmp_path / "q")
    quantize_base(quantized, bits=8)
    with pytest.raises(ValueError, match=rf"adapter_model\.safetensors: .*'{key}'.*"
                                         r"blocks\.0\.attn\.qkv.*no full-precision weight"):
        load_adapter(quantized, tmp_path / "peft")
    assert not list(lora_modules(quantized))


def test_an_adapter_directory_without_weights_is_an_error_naming_it(tmp_path):
    """An adapter directory with a config and no weights is an error naming the directory and both
    weight files PEFT writes; the model gets no adapters."""
    _, fresh = _saved_adapter(tmp_path)
    (tmp_path / "a" / adapter_config.ADAPTER_WEIGHTS).unlink()
    with pytest.raises(ValueError, match=r"a: no adapter_model\.safetensors.*adapter_model\.bin"):
        load_adapter(fresh, tmp_path / "a")
    assert not list(lora_modules(fresh))


def test_every_embedding_slot_covers_its_whole_table():
    """_attach adapts an Embedding as a whole (LoRAEmbedding has no rows): it relies on no family
    mapping an HF embedding to part of one, which this checks for every family."""
    for family in families.TABLES:
        for overrides in ({}, {"multi_query": False}) if family == "gpt_bigcode" else ({},):
            hf = tiny_hf_config(family, **overrides).to_dict()
            cfg = families.TABLES[family].read_config(hf)
            model = Transformer(cfg)
            slots = {name: slot for name, slot in families.hf_module_slots(cfg).items()
                     if isinstance(model.get_submodule(slot.path), torch.nn.Embedding)}
            assert slots and all(slot.rows is None for slot in slots.values()), family


@pytest.mark.parametrize("metadata, refused", [
    ({lora.FORMAT_KEY: lora.FORMAT_VERSION}, False),
    ({}, False),  # PEFT's own files carry no codelm version
    ({lora.FORMAT_KEY: "2"}, True),
])
def test_an_adapter_of_another_format_version_is_refused(tmp_path, metadata, refused):
    """save_adapter records codelm's format version in the safetensors metadata: a file of another
    version is refused naming both versions, one with none (PEFT's own) or this one loads."""
    _, fresh = _saved_adapter(tmp_path)
    weights = tmp_path / "a" / adapter_config.ADAPTER_WEIGHTS
    with open(weights, "rb") as f:
        assert json.loads(f.read(int.from_bytes(f.read(8), "little")))["__metadata__"][
            lora.FORMAT_KEY] == lora.FORMAT_VERSION  # what save_adapter writes
    save_file(load_file(weights), weights, metadata={"format": "pt", **metadata})
    if not refused:
        load_adapter(fresh, tmp_path / "a")
        return
    with pytest.raises(ValueError) as e:
        load_adapter(fresh, tmp_path / "a")
    assert all(w in str(e.value) for w in (str(weights), "format_version 2", "not 1"))
    assert not list(lora_modules(fresh))


@pytest.mark.slow
@pytest.mark.parametrize("base_dtype", [torch.float32, torch.bfloat16])
def test_a_compiled_model_with_lora_dropout_trains_without_recompiling(base_dtype):
    """Under torch.compile the adapters' dropout is drawn inside the graph: steps after the
    first reuse its compilation (no seed baked into the graph), and the loss falls; on a bf16
    base (--base-dtype bf16, no autocast) the dropped-out input is cast to the fp32 adapters'
    dtype, as uncompiled."""
    import torch._dynamo

    from codelm.models.quantize import cast_model

    torch.manual_seed(0)
    model = Transformer(PRESETS["tiny"])
    apply_lora(model, LoRAConfig(r=4, alpha=8, dropout=0.1))
    cast_model(model, base_dtype)
    model.train()
    compiled = torch.compile(model)
    ids = _ids(T=32)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    torch._dynamo.reset()
    with torch._dynamo.config.patch(error_on_recompile=True):
        for _ in range(4):
            loss = compiled(ids, ids)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(loss.item())
    assert losses[-1] < losses[0]


def test_a_model_cast_to_bf16_keeps_every_adapter_tensor_fp32():
    """cast_model (a run loaded in bf16) casts the base only: LoRA's matrices and DoRA's
    magnitudes, trained, stay fp32 (a bf16 magnitude would lose its small updates)."""
    from architecture import PRESETS, Transformer
    from codelm.models.quantize import cast_model

    model = Transformer(PRESETS["tiny"])
    apply_lora(model, LoRAConfig(r=4, alpha=8, target_modules=["qkv"], use_dora=True))
    cast_model(model, torch.bfloat16)
    trained = {n: p.dtype for n, p in model.named_parameters() if p.requires_grad}
    assert any(".magnitude." in n for n in trained)
    assert set(trained.values()) == {torch.float32}, trained
    assert {p.dtype for n, p in model.named_parameters() if not p.requires_grad} == {torch.bfloat16}
