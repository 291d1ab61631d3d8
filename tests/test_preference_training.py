"""The preference tasks in trainingmanager's one loop, on the CPU in seconds: a tiny model learns
a toy preference (a sum over a difference) under each of dpo, kto, orpo and simpo, its rewards
logged; the reference is the starting model (DPO's loss starts at log 2, TRL's value where the
policy is the reference); a resumed run continues bit for bit; the settings are checked."""

from __future__ import annotations

import dataclasses
import json
import math
import random
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import trainingmanager as tm
from codelm import trainconfig
from codelm.data.sources import stdlib_files
from codelm.runs import rundir
from codelm.runtime.distributed import Dist
from codelm.training import plan, preference_run
from tokenizer import CodeTokenizer, load_tokenizer

NAMES = ["alpha", "beta", "gamma", "delta", "total", "count", "value", "item", "width", "size"]


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> dict:
    """A CodeTokenizer trained on stdlib files, and a toy preference: each prompt a function
    header, its chosen body the sum of its arguments, its rejected body their difference
    (as pairs, and as labelled completions for kto)."""
    root = tmp_path_factory.mktemp("pref")
    files = [f for f in stdlib_files() if 1500 < f.stat().st_size < 5000][:40]
    CodeTokenizer.train([f.read_text("utf-8") for f in files], min_freq=3,
                        max_vocab=200).save(root)
    rng = random.Random(0)
    pairs, labelled = [], []
    for i in range(64):
        a, b = rng.sample(NAMES, 2)
        prompt = f"def add_{i}({a}, {b}):\n    return"
        pairs.append({"prompt": prompt, "chosen": f" {a} + {b}\n", "rejected": f" {a} - {b}\n"})
        labelled.append({"prompt": prompt, "completion": f" {a} {'+-'[i % 2]} {b}\n",
                         "label": i % 2 == 0})
    for name, records in (("pairs", pairs), ("kto", labelled)):
        (root / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return {"tokenizer": str(root / "tokenizer.json"), "pairs": str(root / "pairs.jsonl"),
            "kto": str(root / "kto.jsonl")}


def pref_cfg(assets: dict, tmp_path: Path, task: str = "dpo", **overrides
             ) -> trainconfig.TrainConfig:
    values = dict(task=task, data=[assets["kto" if task == "kto" else "pairs"]],
                  tokenizer=assets["tokenizer"], preset="tiny", block_size=48, batch_size=8,
                  max_steps=24, warmup_steps=2, lr=3e-3, eval_every=12, eval_examples=None,
                  log_every=1, progress=False, export=False, report_to=["none"],
                  out_dir=str(tmp_path / "runs"), name=task, force=True,
                  data_options={"progress": False})
    values.update(overrides)
    return trainconfig.TrainConfig(**values)


def logged(run_dir: Path, kind: str) -> list[dict]:
    lines = (run_dir / rundir.METRICS_FILE).read_text().splitlines()
    return [entry for entry in map(json.loads, lines) if entry["kind"] == kind]


@pytest.mark.parametrize("task, overrides", [
    ("dpo", {"pref_beta": 0.5}), ("kto", {}), ("orpo", {"orpo_lambda": 0.5}),
    ("simpo", {"pref_beta": 2.0, "simpo_gamma": 0.5})])
def test_each_preference_task_learns_a_toy_preference_in_the_one_loop(assets, tmp_path,
                                                                      task, overrides):
    """DPO, KTO, ORPO and SimPO each learn a toy preference in 24 steps of the
    shared loop: loss and val loss fall, the margin grows, val accuracy passes 0.9
    (KTO logs none), a checkpoint is saved. Validation counts what it scored in the task's
    unit: pairs, or KTO's labelled completions."""
    result = tm.train(pref_cfg(assets, tmp_path, task, **overrides))
    train, val = logged(result.run_dir, "train"), logged(result.run_dir, "val")
    assert len(train) == 24 and len(val) == 2
    assert train[-1]["loss"] < 0.8 * train[0]["loss"]
    assert val[-1]["val_loss"] < val[0]["val_loss"]
    assert train[-1]["rewards/margins"] > train[0]["rewards/margins"]
    assert {"rewards/chosen", "rewards/rejected", "logps/chosen", "logps/rejected"} <= set(train[0])
    if task != "kto":  # KTO's rewards have no accuracy (TRL logs none)
        assert val[-1]["val_accuracy"] > 0.9 and "rewards/accuracies" in train[0]
    assert (result.run_dir / "checkpoints" / "step-24").is_dir()
    counted, other = ("val_completions", "val_pairs")[::1 if task == "kto" else -1]
    assert val[-1][counted] > 0 and other not in val[-1]


def test_dpo_starts_at_log_2_with_the_starting_model_as_reference(assets, tmp_path, capsys):
    """Before the first update the policy is its reference: every margin 0, the loss log 2
    (TRL's sigmoid loss at a zero margin), the rewards 0; the console shows them, the accuracy
    and margin named as the implicit reward's (an SFT run's acc is the next token's)."""
    result = tm.train(pref_cfg(assets, tmp_path, max_steps=1, eval_every=1, lr=1e-9))
    first = logged(result.run_dir, "train")[0]
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert first["rewards/margins"] == pytest.approx(0.0, abs=1e-6)
    assert logged(result.run_dir, "val")[0]["val_loss"] == pytest.approx(math.log(2), abs=1e-4)
    out = capsys.readouterr().out
    assert "step 1/1 | loss 0.6931 | reward_acc 0.000 | reward_margin 0.000 | logp_chosen" in out
    # (after the step: margins of about 1e-9, whose signs make any accuracy)
    assert re.search(r"val loss 0\.6931 \| reward_acc \d\.\d{3} \| reward_margin -?0\.000 \|",
                     out)
    assert "perplexity" not in out


@pytest.mark.parametrize("task", ["dpo", "kto"])
def test_a_bf16_run_validates_against_a_reference_of_the_validation_precision(assets, tmp_path,
                                                                            task):
    """Training in bf16 and validating in fp32 (eval_precision's default), a policy equal to its
    reference validates at zero rewards: the validation rows' reference log-probs are computed
    in the precision validation runs in, as TRL evaluates under the autocast of its reference."""
    result = tm.train(pref_cfg(assets, tmp_path, task, max_steps=1, eval_every=1, lr=1e-12,
                               precision="bf16"))
    [val] = logged(result.run_dir, "val")
    rewards = {key: value for key, value in val.items() if key.startswith("val_rewards/")}
    assert rewards and all(abs(value) < 1e-6 for value in rewards.values()), rewards
    if task == "dpo":
        assert val["val_loss"] == pytest.approx(math.log(2), abs=1e-6)


def test_a_model_with_dropout_trains_preferences_without_it_as_trl_does(assets, tmp_path):
    """A StarCoder-style checkpoint carries dropout 0.1 (residual, embeddings, attention):
    DPO switches every dropout off, as TRL's disable_dropout, so the first loss is log 2; a
    dropout given (--dropout) is kept."""
    from tiny_hf import save_tiny_hf

    tok = load_tokenizer(assets["tokenizer"])
    base = tmp_path / "bigcode"
    save_tiny_hf("gpt_bigcode", base, vocab_size=tok.vocab_size, resid_pdrop=0.1,
                 embd_pdrop=0.1, attn_pdrop=0.1)
    cfg = pref_cfg(assets, tmp_path, max_steps=1, eval_every=1, lr=1e-9, preset=None,
                   init_from=str(base), lora_r=4, lora_dropout=0.0)
    first = logged(tm.train(cfg).run_dir, "train")[0]
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-6)
    kept = tm.train(dataclasses.replace(cfg, dropout=0.5, name="kept"))
    assert logged(kept.run_dir, "train")[0]["loss"] != pytest.approx(math.log(2), abs=1e-6)


def test_skip_bad_holds_out_validation_from_the_records_it_keeps(assets, tmp_path, capsys):
    """With skip_bad, the records encoding refuses (a prompt longer than the block) leave before
    the split: whichever prompt the seed holds out, validation holds a good record."""
    from codelm.training import preference_run

    good = [json.loads(line) for line in Path(assets["pairs"]).read_text().splitlines()[:3]]
    long = [{"prompt": f"def f{i}():\n    return" + " x" * 200, "chosen": " 1\n",
             "rejected": " 2\n"} for i in range(3)]
    data = tmp_path / "mixed.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in good + long))
    tok = load_tokenizer(assets["tokenizer"])
    for seed in range(6):
        cfg = pref_cfg(assets, tmp_path, data=[str(data)], batch_size=1,
                       data_options={"progress": False, "skip_bad": True, "seed": seed})
        prepared = preference_run.prepare(cfg, tok, 48, Dist())
        assert (len(prepared.batches.train), len(prepared.batches.val)) == (2, 1), seed
        assert "skip_bad: 3 preference record(s) skipped" in capsys.readouterr().err


def test_lora_dpo_takes_the_base_with_adapters_off_as_reference(assets, tmp_path):
    """A LoRA run on a pretrained base: the reference log-probs kept in the run are the base's
    own (loaded apart), and the adapters learn the preference."""
    from tiny_hf import save_tiny_hf

    from codelm.models import pretrained
    from codelm.training import preference_run

    base = tmp_path / "base"
    save_tiny_hf("llama", base, vocab_size=512)
    cfg = pref_cfg(assets, tmp_path, init_from=str(base), lora_r=8, lora_alpha=16.0,
                   pref_beta=0.5, lr=1e-2)
    result = tm.train(cfg)
    train = logged(result.run_dir, "train")
    assert train[-1]["loss"] < 0.8 * train[0]["loss"]
    kept = torch.load(result.run_dir / preference_run.REFERENCE_FILE, weights_only=True)
    model = pretrained.load(base).eval()  # the data prepared as the run prepared it
    data = preference_run.prepare(cfg, load_tokenizer(result.run_dir), 48, Dist())
    rows = data.batches.val
    expected = preference_run.reference_logps(model, rows, data.batches.collate, 4,
                                              torch.device("cpu"), "fp32",
                                              adapters_off=False)
    torch.testing.assert_close(kept["val"], expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("adapter", [{"lora_modules_to_save": ["embed_tokens", "lm_head"]},
                                     {"lora_bias": "all"}])
def test_lora_dpo_training_base_tensors_takes_its_starting_model_as_reference(assets, tmp_path,
                                                                            adapter):
    """An adapter that trains base tensors (modules_to_save, bias) cannot be switched off; the
    reference is the model before any update, which is its base: every margin starts at 0,
    the loss at log 2, and the reference log-probs are the base's loaded apart."""
    from tiny_hf import save_tiny_hf

    from codelm.models import pretrained

    base = tmp_path / "base"
    save_tiny_hf("llama", base, vocab_size=512)
    cfg = pref_cfg(assets, tmp_path, init_from=str(base), lora_r=8, lora_alpha=16.0,
                   max_steps=1, eval_every=1, lr=1e-9, **adapter)
    result = tm.train(cfg)
    first = logged(result.run_dir, "train")[0]
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert first["rewards/margins"] == pytest.approx(0.0, abs=1e-6)
    kept = torch.load(result.run_dir / preference_run.REFERENCE_FILE, weights_only=True)
    data = preference_run.prepare(cfg, load_tokenizer(result.run_dir), 48, Dist())
    expected = preference_run.reference_logps(pretrained.load(base).eval(), data.batches.val,
                                              data.batches.collate, 4, torch.device("cpu"),
                                              "fp32", adapters_off=False)
    torch.testing.assert_close(kept["val"], expected, rtol=1e-5, atol=1e-5)


def test_a_lora_dpo_run_from_an_adapter_takes_the_model_it_starts_from_as_reference(
        assets, tmp_path):
    """--init-adapter: the reference is the base with that adapter (the model the run starts
    from), not the bare base: before the first update every margin is 0 and the loss log 2."""
    from tiny_hf import save_random_adapter, save_tiny_hf

    base = tmp_path / "base"
    save_tiny_hf("llama", base, vocab_size=512)
    save_random_adapter(base, tmp_path / "adapter")
    adapter_file = tmp_path / "adapter" / "adapter_config.json"
    # PEFT saves its training-time lora_dropout (0.05-0.1 in the wild): DPO switches it off too
    adapter_file.write_text(json.dumps({**json.loads(adapter_file.read_text()),
                                        "lora_dropout": 0.1}))
    cfg = pref_cfg(assets, tmp_path, init_from=str(base), init_adapter=str(tmp_path / "adapter"),
                   max_steps=1, eval_every=1, lr=1e-9)
    first = logged(tm.train(cfg).run_dir, "train")[0]
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert first["rewards/margins"] == pytest.approx(0.0, abs=1e-6)
    assert plan.with_init_adapter(cfg).lora_dropout == 0.0
    assert plan.with_init_adapter(dataclasses.replace(cfg, task="lm")).lora_dropout == 0.1
    given = dataclasses.replace(cfg, lora_dropout=0.2)  # a training-time setting: taken
    assert plan.with_init_adapter(given).lora_dropout == 0.2
    plan.validate_config(given)


def _varied_pairs(n: int = 6, vocab: int = 64) -> list:
    """Pairs of prompts and completions of differing lengths (the packing has work to do)."""
    from codelm.data.preferences import Preference

    g = torch.Generator().manual_seed(0)

    def ids(length: int) -> list[int]:
        return torch.randint(vocab, (length,), generator=g).tolist()

    pairs = []
    for i in range(n):
        pairs.append(Preference(ids(3 + i), (ids(2 + 3 * i % 7), ids(9 - i))))
    return pairs


def _unpaired() -> list:
    """_varied_pairs as KTO's labelled completions, laid out as `unpair` lays a file's pairs
    out: each pair's chosen, then its rejected."""
    from codelm.data.preferences import Preference

    unpaired = []
    for pair in _varied_pairs():
        unpaired.append(Preference(pair.prompt, pair.completions[:1], True))
        unpaired.append(Preference(pair.prompt, pair.completions[1:], False))
    return unpaired


def test_a_kto_rows_kl_completion_comes_from_another_prompt():
    """KTO's KL row pairs a prompt with another prompt's completion (a mismatched pair); the two
    labelled halves of one pair are neighbours, so the other half of the same prompt is
    skipped. A file of one prompt takes its previous record's."""
    from codelm.data.preferences import Preference
    from codelm.training.preference_batches import PreferenceRows

    unpaired = _unpaired()
    rows = PreferenceRows(unpaired, block_size=24, unpaired=True)
    for i, preference in enumerate(unpaired):
        completion, kl_completion = rows.completions(i)
        assert completion == preference.completions[0]
        others = [p.completions[0] for p in unpaired if p.prompt != preference.prompt]
        assert kl_completion in others, i
    one_prompt = [Preference([1, 2], ([3],), True), Preference([1, 2], ([4],), False)]
    assert PreferenceRows(one_prompt, block_size=24, unpaired=True).completions(0)[1] == [4]


def test_packed_rows_read_back_the_padded_rows_predictions():
    """Each padded row's next tokens are found, through the index, where the packed forward
    predicts them; no packed row is longer than its width."""
    from codelm.training.preference_batches import PreferenceRows, collate_preferences

    rows = PreferenceRows(_varied_pairs(), block_size=24, unpaired=False)
    batch = collate_preferences([rows[i] for i in range(len(rows))], 0, pack_into=24)
    assert batch["packed_ids"].shape[1] == 24 and len(batch["packed_ids"]) < len(batch["ids"])
    predicted = batch["packed_labels"][:, :-1].flatten()[batch["packed_index"]]
    real = batch["attention_mask"][:, 1:].bool()
    assert torch.equal(predicted[real], batch["ids"][:, 1:][real])


@pytest.mark.parametrize("method", ["dpo", "orpo", "simpo"])
def test_packed_pairs_give_the_padded_pairs_loss_and_gradients(method):
    """The same pairs packed (each row attending to itself only) or padded: the same loss and
    gradients, so packing changes the work, not what is learned."""
    from architecture import PRESETS, Transformer
    from codelm.training import preference
    from codelm.training.preference_batches import PreferenceRows, collate_preferences

    rows = PreferenceRows(_varied_pairs(), block_size=24, unpaired=False)
    items = [rows[i] for i in range(len(rows))]
    cfg = preference.PreferenceConfig(method=method, beta=0.1)
    torch.manual_seed(0)
    shape = dataclasses.replace(PRESETS["tiny"], vocab_size=64, block_size=24, dropout=0.0)
    model = Transformer(shape).eval()
    results = []
    for pack_into in (None, 24):
        batch = collate_preferences(items, 0, pack_into=pack_into)
        if method == "dpo":
            batch["ref_logps"] = torch.linspace(-30.0, -10.0, len(batch["ids"]))
        model.zero_grad(set_to_none=True)
        loss, _ = preference.batch_loss(model, batch, cfg)
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    (padded, padded_grads), (packed, packed_grads) = results
    torch.testing.assert_close(packed, padded, rtol=0, atol=1e-6)
    for name, grad in padded_grads.items():
        torch.testing.assert_close(packed_grads[name], grad, rtol=1e-5, atol=1e-5, msg=name)


def test_packed_token_logps_equal_the_padded_ones_and_are_0_at_pads():
    """token_logps of packed rows reads back each padded row's log-probs, 0 at its pads as in
    the padded layout, so a sum over any mask of the rows is the padded one."""
    from architecture import PRESETS, Transformer
    from codelm.training import preference
    from codelm.training.preference_batches import PreferenceRows, collate_preferences

    rows = PreferenceRows(_varied_pairs(), block_size=24, unpaired=False)
    items = [rows[i] for i in range(len(rows))]
    torch.manual_seed(0)
    shape = dataclasses.replace(PRESETS["tiny"], vocab_size=64, block_size=24, dropout=0.0)
    model = Transformer(shape).eval()
    padded = collate_preferences(items, 0)
    packed = collate_preferences(items, 0, pack_into=24)
    with torch.no_grad():
        expected = preference.token_logps(model, padded["ids"], padded["attention_mask"])
        got = preference.token_logps(model, packed["ids"], packed["attention_mask"],
                                     preference.packed_rows(packed))
    pads = padded["attention_mask"][:, 1:] == 0
    assert pads.any()
    assert not got[pads].any()
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_a_kto_batch_takes_its_kl_estimate_over_every_process(monkeypatch):
    """Under several processes a KTO batch's KL estimate is the mean over the KL rows of every
    process's batch: each process's sum and count of rows summed (a collective), so that the
    processes' batches together estimate as one batch holding them all."""
    from architecture import PRESETS, Transformer
    from codelm.runtime.distributed import Dist
    from codelm.training import preference
    from codelm.training.preference_batches import PreferenceRows, collate_preferences

    rows = PreferenceRows(_unpaired(), block_size=24, unpaired=True)
    batch = collate_preferences([rows[i] for i in range(len(rows))], 0)
    batch["ref_logps"] = torch.full((len(batch["ids"]),), -1000.0)  # this process's KL > 0
    cfg = preference.PreferenceConfig(method="kto", beta=0.1)
    torch.manual_seed(0)
    shape = dataclasses.replace(PRESETS["tiny"], vocab_size=64, block_size=24, dropout=0.0)
    model = Transformer(shape).eval()
    other = torch.tensor([21.0, 3.0])  # the other process: 3 KL rows of log-ratio 7 in all
    monkeypatch.setattr(preference, "all_reduce_sum", lambda t, dist: t + other)
    _, alone = preference.batch_loss(model, batch, cfg)
    _, together = preference.batch_loss(model, batch, cfg, Dist(rank=0, world=2))
    n = len(rows)
    assert together["kl"] == pytest.approx((float(alone["kl"]) * n + 21.0) / (n + 3))


def test_a_resumed_run_from_an_adapter_computes_its_reference_again_from_that_adapter(
        assets, tmp_path, capsys):
    """A resume whose reference log-probs are to be computed again (its pairs edited, or the
    file deleted) scores the model the run started from, base + init adapter, as a fresh run
    does, not the adapter's bare layout; with the adapter gone it is refused, naming it."""
    from tiny_hf import save_random_adapter, save_tiny_hf

    base = tmp_path / "base"
    save_tiny_hf("llama", base, vocab_size=512)
    save_random_adapter(base, tmp_path / "adapter")
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(Path(assets["pairs"]).read_text())
    common = dict(data=[str(pairs)], max_steps=2, eval_every=2, warmup_steps=0,
                  init_from=str(base), init_adapter=str(tmp_path / "adapter"))
    run = tm.train(pref_cfg(assets, tmp_path, name="run", **common)).run_dir
    path = run / preference_run.REFERENCE_FILE
    started = torch.load(path, weights_only=True)
    path.unlink()
    tm.train(pref_cfg(assets, tmp_path, name="run", resume=str(run), **dict(common, max_steps=3)))
    again = torch.load(path, weights_only=True)
    assert torch.allclose(again["train"], started["train"], atol=1e-5)
    records = [json.loads(line) for line in pairs.read_text().splitlines()]
    for record in records:
        record["rejected"] = record["rejected"].replace(" - ", " * ")
    pairs.write_text("".join(json.dumps(r) + "\n" for r in records))
    fresh = tm.train(pref_cfg(assets, tmp_path, name="fresh", **common)).run_dir
    tm.train(pref_cfg(assets, tmp_path, name="run", resume=str(run), **dict(common, max_steps=4)))
    resumed = torch.load(path, weights_only=True)
    expected = torch.load(fresh / preference_run.REFERENCE_FILE, weights_only=True)
    assert torch.allclose(resumed["train"], expected["train"], atol=1e-5)
    path.unlink()
    shutil.rmtree(tmp_path / "adapter")
    with pytest.raises(ValueError, match="init_adapter .* gone"):
        tm.train(pref_cfg(assets, tmp_path, name="run", resume=str(run),
                          **dict(common, max_steps=5)))


def test_a_packed_dpo_run_trains_on_the_same_reference(assets, tmp_path):
    """--packing: the run packs its pairs, keeps the reference log-probs the padded run keeps
    (to float error), and learns the preference."""
    from codelm.training import preference_run

    runs = {}
    for packing in (False, True):
        result = tm.train(pref_cfg(assets, tmp_path, packing=packing, max_steps=8,
                                   name=f"packing-{packing}"))
        train = logged(result.run_dir, "train")
        assert train[-1]["loss"] < train[0]["loss"]
        runs[packing] = torch.load(result.run_dir / preference_run.REFERENCE_FILE,
                                   weights_only=True)
    for split in ("train", "val"):
        torch.testing.assert_close(runs[True][split], runs[False][split], rtol=1e-5, atol=1e-5)


def test_a_resumed_dpo_run_continues_bit_for_bit(assets, tmp_path):
    """6 steps straight, or 3 then a resume for 3 more (a constant learning rate): the same
    weights; the resume reads the reference log-probs its run kept."""
    common = dict(min_lr_ratio=1.0, warmup_steps=0, eval_every=3, save_every=3)
    straight = tm.train(pref_cfg(assets, tmp_path, max_steps=6, name="straight", **common))
    tm.train(pref_cfg(assets, tmp_path, max_steps=3, name="halves", **common))
    halves = tmp_path / "runs" / "halves"
    resumed = tm.train(pref_cfg(assets, tmp_path, max_steps=6, name="halves", resume=str(halves),
                                **common))
    assert resumed.step == 6
    a = load_file(straight.run_dir / "checkpoints" / "step-6" / rundir.MODEL_FILE)
    b = load_file(halves / "checkpoints" / "step-6" / rundir.MODEL_FILE)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_resume_on_other_pairs_computes_their_reference_and_refuses_a_damaged_file(
        assets, tmp_path, capsys):
    """The reference log-probs a run kept are of the pairs it trained on: a resume on edited
    pairs (the same count) computes those of the new pairs from the starting weights, as a
    new run on them would; a damaged reference file stops the resume naming it."""
    from codelm.training import preference_run

    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(Path(assets["pairs"]).read_text())
    common = dict(data=[str(pairs)], max_steps=2, eval_every=2, warmup_steps=0)
    run = tm.train(pref_cfg(assets, tmp_path, name="run", **common)).run_dir
    records = [json.loads(line) for line in pairs.read_text().splitlines()]
    for record in records:
        record["rejected"] = record["rejected"].replace(" - ", " * ")
    pairs.write_text("".join(json.dumps(r) + "\n" for r in records))
    fresh = tm.train(pref_cfg(assets, tmp_path, name="fresh", **common))
    tm.train(pref_cfg(assets, tmp_path, name="run", resume=str(run), **dict(common, max_steps=3)))
    assert "reference log-probs of other preference data" in capsys.readouterr().err
    kept = torch.load(run / preference_run.REFERENCE_FILE, weights_only=True)
    expected = torch.load(fresh.run_dir / preference_run.REFERENCE_FILE, weights_only=True)
    assert torch.equal(kept["train"], expected["train"])
    assert torch.equal(kept["val"], expected["val"])

    reference = run / preference_run.REFERENCE_FILE
    reference.write_bytes(reference.read_bytes()[: reference.stat().st_size // 2])
    with pytest.raises(ValueError, match="reference_logps.pt: not a readable reference"):
        tm.train(pref_cfg(assets, tmp_path, name="run", resume=str(run),
                          **dict(common, max_steps=4)))


@pytest.mark.parametrize("flags, message", [
    (["--task", "dpo", "--pref-beta", "0"], "pref_beta (0.0, --pref-beta): must be a finite "
                                             "number > 0 (task dpo)"),
    (["--task", "orpo", "--label-smoothing", "0.1"], "label_smoothing (0.1, --label-smoothing): "
                                                      "orpo ignores it"),
    (["--orpo-lambda", "0.5"], "orpo_lambda (0.5, --orpo-lambda): preference settings, but task "
                               "('lm', --task) is not one of dpo, kto, orpo, simpo"),
    (["--task", "kto", "--packing"], "packing (True, --packing): the kto task reads its KL"),
])
def test_bad_preference_settings_are_refused_naming_their_flag(assets, flags, message):
    """A bad preference setting (beta 0, a setting the task ignores, preference settings on the lm
    task, packing under kto) is refused in one line naming the setting, its value and its flag."""
    with pytest.raises(ValueError) as caught:
        plan.parse_config(["--data", assets["pairs"], "--tokenizer", assets["tokenizer"],
                           "--max-steps", "2", *flags])
    assert message in str(caught.value) and "\n" not in str(caught.value)


def test_a_preference_task_needs_its_data_and_a_tokenizer(assets):
    """A preference task without --data is refused saying it trains on preference records, and one
    without --init-from or --tokenizer saying it tunes a model's preferences."""
    with pytest.raises(ValueError, match=r"^task \('dpo', --task\): trains on preference "
                                         "records"):
        plan.parse_config(["--task", "dpo", "--max-steps", "2"])
    with pytest.raises(ValueError, match=r"^task \('simpo', --task\): tunes a model's"):
        plan.parse_config(["--task", "simpo", "--data", assets["pairs"], "--max-steps", "2"])


def test_a_bad_record_stops_the_command_in_one_line(assets, tmp_path, capsys):
    """A record whose chosen equals its rejected stops train.py with exit 2 and one error line
    naming its file, line and fault, before any run directory is written."""
    data = tmp_path / "bad.jsonl"
    shutil.copy(assets["pairs"], data)
    with data.open("a") as f:
        f.write(json.dumps({"prompt": "def f():\n    return", "chosen": " 1\n",
                            "rejected": " 1\n"}) + "\n")
    code = tm.main(["--task", "dpo", "--data", str(data), "--tokenizer", assets["tokenizer"],
                    "--preset", "tiny", "--max-steps", "2", "--out-dir", str(tmp_path / "runs"),
                    "--no-progress", "--report-to", "none"])
    err = capsys.readouterr().err
    assert code == 2
    assert f"error: {data}:65: 'chosen' and 'rejected' are the same" in err
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


def _labelled(desirable: int, undesirable: int) -> list:
    from codelm.data.preferences import PreferenceRecord

    return [PreferenceRecord(f"f:{i}", "p", ("c",), i < desirable)
            for i in range(desirable + undesirable)]


@pytest.mark.parametrize("desirable, undesirable, weights, said", [
    (0, 20, (1.0, 1.0), "every training completion is undesirable (label false)"),
    (20, 0, (1.0, 1.0), "every training completion is desirable (label true)"),
    (30, 10, (1.0, 1.0), "--kto-desirable-weight in [0.33, 0.44] or --kto-undesirable-weight "
                         "in [2.25, 3.00]"),
    (30, 10, (0.4, 1.0), None),  # 0.4 x 30 / 10 = 1.2, within [1, 4/3]
    (10, 30, (1.0, 1.0), "here 0.33; --kto-desirable-weight in [3.00, 4.00]"),
    (16, 16, (1.0, 1.0), None),
])
def test_kto_labels_out_of_balance_are_noted_with_the_weights_that_balance_them(
        desirable, undesirable, weights, said):
    """The KTO paper's rule (TRL's KTOTrainer warns outside it): desirable_weight x desirable /
    (undesirable_weight x undesirable) in [1, 4/3]; a note names the weights that bring the
    data there, and one kind missing is said as such."""
    note = preference_run.kto_balance_note(_labelled(desirable, undesirable), *weights)
    assert note is None if said is None else said in note


def test_a_kto_run_on_undesirable_completions_alone_says_so(assets, tmp_path, capsys):
    """A KTO run whose records are all label false (a weak model's pass@k samples) trains, and
    says as its data is prepared that KTO learns from both kinds."""
    records = [json.loads(line) for line in Path(assets["kto"]).read_text().splitlines()]
    failed = tmp_path / "failed.jsonl"
    failed.write_text("".join(json.dumps({**r, "label": False}) + "\n" for r in records))
    tm.train(pref_cfg(assets, tmp_path, task="kto", data=[str(failed)], max_steps=1,
                      eval_every=1, warmup_steps=0))
    assert "every training completion is undesirable" in capsys.readouterr().err


def test_kto_metrics_are_the_means_over_each_labels_completions():
    """KTO's rewards/chosen and logps/chosen are means over every desirable completion the
    batches hold (.../rejected over the undesirable ones, TRL's sums over its counts), and
    rewards/margins their difference, however the batches split the labels: validation over
    two batches of differing label mixes gives the metrics of all their completions at once."""
    from architecture import PRESETS, Transformer
    from codelm.data.preferences import Preference
    from codelm.runtime.settings import fields_of
    from codelm.training import preference
    from codelm.training.preference_batches import PreferenceRows, collate_preferences

    g = torch.Generator().manual_seed(0)
    labels = [True, False, False, False, True, True, True, False]
    records = [Preference(torch.randint(64, (3 + i,), generator=g).tolist(),
                          (torch.randint(64, (2 + i % 3,), generator=g).tolist(),), label)
               for i, label in enumerate(labels)]
    rows = PreferenceRows(records, 24, unpaired=True)
    rows.set_reference(torch.linspace(-40.0, -20.0, 16).reshape(8, 2))
    items = [rows[i] for i in range(len(rows))]
    cfg = plan.with_fallbacks(trainconfig.TrainConfig(task="kto", preset="tiny", max_steps=10,
                                                      warmup_steps=1))
    settings = trainconfig.StepSettings(**fields_of(trainconfig.StepSettings, cfg))
    torch.manual_seed(0)
    shape = dataclasses.replace(PRESETS["tiny"], vocab_size=64, block_size=24, dropout=0.0)
    model = Transformer(shape)
    trainer = preference_run.PreferenceTrainer(model, settings,
                                               preference.PreferenceConfig(method="kto"),
                                               torch.device("cpu"))
    metrics = trainer.evaluate([collate_preferences(items[:4], 0),
                                collate_preferences(items[4:], 0)])
    whole = collate_preferences(items, 0)
    n = len(items)
    with torch.no_grad():
        logps = preference.sequence_logps(
            preference.token_logps(model.eval(), whole["ids"][:n], whole["attention_mask"][:n]),
            whole["completion_mask"][:n])
    rewards = 0.1 * (logps - whole["ref_logps"][:n])
    desirable = whole["desirable"]
    expected = {"rewards/chosen": rewards[desirable].mean(),
                "rewards/rejected": rewards[~desirable].mean(),
                "rewards/margins": rewards[desirable].mean() - rewards[~desirable].mean(),
                "logps/chosen": logps[desirable].mean(), "logps/rejected": logps[~desirable].mean()}
    for name, value in expected.items():
        assert metrics[f"val_{name}"] == pytest.approx(float(value), abs=1e-5), name


def kto_validation(batch_size: int, dist: Dist) -> tuple[dict, preference_run.PreferenceTrainer,
                                                         list[dict]]:
    """A tiny model's KTO validation of 11 labelled completions in batches of ``batch_size`` a
    process (``dist``'s share of them: one process's batches, or a torchrun rank's), its
    trainer and the batches this process took."""
    from architecture import PRESETS, Transformer
    from codelm.data.preferences import Preference
    from codelm.runtime.settings import fields_of
    from codelm.training import preference
    from codelm.training.preference_batches import PreferenceBatches, PreferenceRows

    g = torch.Generator().manual_seed(0)
    records = []
    for i in range(11):
        prompt = torch.randint(64, (3 + i % 5,), generator=g).tolist()
        completion = torch.randint(64, (2 + i % 3,), generator=g).tolist()
        records.append(Preference(prompt, (completion,), i % 3 == 0))
    rows = PreferenceRows(records, 24, unpaired=True)
    rows.set_reference(torch.linspace(-60.0, -20.0, 2 * len(records)).reshape(-1, 2))
    batches = PreferenceBatches(rows, rows, 0, batch_size, 1, 0, rank=dist.rank,
                                world=dist.world)
    cfg = plan.with_fallbacks(trainconfig.TrainConfig(task="kto", preset="tiny", max_steps=10,
                                                      warmup_steps=1, device="cpu"))
    settings = trainconfig.StepSettings(**fields_of(trainconfig.StepSettings, cfg))
    torch.manual_seed(0)
    shape = dataclasses.replace(PRESETS["tiny"], vocab_size=64, block_size=24, dropout=0.0)
    trainer = preference_run.PreferenceTrainer(Transformer(shape), settings,
                                               preference.PreferenceConfig(method="kto"),
                                               torch.device("cpu"), dist)
    val, total = batches.validation()
    taken = list(val)
    return trainer.evaluate(taken, total), trainer, taken


KTO_VALIDATION_ON_RANKS = """
import json, sys
import torch
sys.path.insert(0, "tests")
from test_preference_training import kto_validation
from codelm.runtime import distributed
torch.set_num_threads(1)
dist = distributed.this_process()
distributed.join(dist, torch.device("cpu"))
metrics, _, _ = kto_validation(int(sys.argv[1]), dist)
if dist.main:
    print(json.dumps(metrics))
distributed.leave()
"""


# slow; quick cover: test_a_kto_batch_takes_its_kl_estimate_over_every_process (the collective)
# and test_preference.py's test_kto_equals_trls (the loss)
@pytest.mark.slow
def test_kto_validates_alike_on_two_ranks_of_half_the_batch_and_as_trls_loss(tmp_path):
    """KTO's validation loss depends on the global batch alone: 2 gloo ranks of batch 4 (their
    batches dealt 2 and 1, the rank with fewer joining the KL estimate's collective with none)
    give one process's loss at batch 8, each batch's KL estimate taken over the rows of every
    rank's batch of that turn. That one-process loss is TRL's KTOTrainer._compute_loss on the
    same log-probs, each batch weighted by its completions."""
    import subprocess
    import sys

    from test_preference import _fused_output, _kto_trainer
    from test_trainingmanager import ENV, ROOT
    from trl import KTOTrainer

    from codelm.training import preference

    script = tmp_path / "kto_validation.py"
    script.write_text(KTO_VALIDATION_ON_RANKS)
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           "--nproc_per_node=2", str(script), "4"], cwd=ROOT,
                          env={**ENV, "CUDA_VISIBLE_DEVICES": ""}, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    on_ranks = json.loads(proc.stdout.strip().splitlines()[-1])
    alone, trainer, taken = kto_validation(8, Dist())
    assert len(taken) == 2 and on_ranks["val_completions"] == alone["val_completions"] == 11
    assert on_ranks["val_loss"] == pytest.approx(alone["val_loss"], rel=0, abs=1e-6)
    assert on_ranks["val_kl"] == pytest.approx(alone["val_kl"], rel=0, abs=1e-5)

    model = trainer.eval_model.eval()
    trl = _kto_trainer(trainer.preference)
    trl.model.training = False
    weighted = 0.0
    for batch in taken:
        n = len(batch["desirable"])
        ids, attention, completion = (batch[key] for key in ("ids", "attention_mask",
                                                             "completion_mask"))
        with torch.no_grad():
            token_logps = preference.token_logps(model, ids, attention) * completion[:, 1:]
        trl_batch = {"input_ids": ids[:n], "attention_mask": attention[:n],
                     "completion_mask": completion[:n], "KL_input_ids": ids[n:],
                     "KL_attention_mask": attention[n:], "KL_completion_mask": completion[n:],
                     "label": batch["desirable"], "ref_logps": batch["ref_logps"][:n],
                     "ref_KL_logps": batch["ref_logps"][n:]}

        def stub(input_ids, token_logps=token_logps, kl_ids=trl_batch["KL_input_ids"], n=n,
                 **kwargs):
            """TRL's model: the completions' per-token log-probs, or the KL rows'."""
            return _fused_output(token_logps[n:] if input_ids is kl_ids else token_logps[:n])

        weighted += float(KTOTrainer._compute_loss(trl, stub, trl_batch, return_outputs=False)) * n
    assert alone["val_loss"] == pytest.approx(weighted / 11, rel=0, abs=1e-6)
