"""The settings each part of a training run takes of its TrainConfig (codelm.trainconfig's
*Settings): each holds TrainConfig's fields of its names, and exactly what its readers read of
it, read from their code; a built run holds no TrainConfig (config.json, the whole of it, is
its record's)."""

from __future__ import annotations

import ast
import dataclasses
import inspect
import textwrap
import time
from collections.abc import Callable, Sequence

import pytest
import torch

import trainingmanager as tm
from codelm import loading, trainconfig
from codelm.data.config import TokenizerTraining
from codelm.models import adapter_config
from codelm.runs import rundir
from codelm.runtime import distributed
from codelm.runtime.settings import fields_of
from codelm.trainconfig import (
    DataSettings,
    ExportSettings,
    GRPOSettings,
    LoopSettings,
    ModelSettings,
    StepSettings,
    TrainConfig,
)
from codelm.training import build, finish, optim, preference_run, rollout, trainer
from tokenizer import CodeTokenizer

# Fields a part takes that are no TrainConfig field: where the run puts it, what it holds.
NOT_CONFIG = {DataSettings: {"run_dir", "own_tokenizer"}, ModelSettings: {"adapter_copy"}}


def read_of(readers: Sequence[tuple[Callable, str]]) -> set[str]:
    """The fields ``readers`` read of the settings each names (a parameter, a local, or a
    dotted path such as ``run.loop`` or ``self.settings``): its attributes read, the keys it
    names to a call (``setting(cfg, "task")``) and what it reads by name (``getattr(cfg,
    key)`` over a constant list, in ``KEY_LISTS``)."""
    read = set()
    for function, path in readers:
        tree = ast.parse(textwrap.dedent(inspect.getsource(function)))
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and ast.unparse(node.value) == path:
                read.add(node.attr)
            elif (isinstance(node, ast.Call) and len(node.args) >= 2
                  and ast.unparse(node.args[0]) == path):
                read |= {key.value for key in ast.walk(node.args[1])
                         if isinstance(key, ast.Constant) and isinstance(key.value, str)}
    return read


KEY_LISTS = {  # fields read by name, over these constants (getattr(cfg, key) in a loop)
    ModelSettings: set(trainconfig.MODEL_SHAPE_KEYS) | set(adapter_config.ADAPTER_KEYS.values()),
    # load_or_train_tokenizer's fields_of(TokenizerTraining, cfg)
    DataSettings: {f.name for f in dataclasses.fields(TokenizerTraining)},
}

READERS = {
    DataSettings: [
        (build.prepare_data, "settings"), (build.example_batches, "settings"),
        (build.prepare_problems, "settings"), (build.prepare_preference_data, "settings"),
        (build.load_or_train_tokenizer, "cfg"), (trainconfig.data_config, "cfg"),
        (trainconfig.default_block_size, "cfg"), (rollout.problem_batches, "cfg"),
        (rollout.checked_problems, "cfg"), (rollout.reward_sandbox, "cfg"),
        (preference_run.prepare, "cfg")],
    ModelSettings: [(loading.build_model, "model_settings"), (loading._add_lora, "model_settings"),
                    (trainconfig.model_config, "cfg")],
    StepSettings: [(trainer.Trainer.__init__, "settings"), (trainer.Trainer.train_step,
                                                            "self.settings"),
                   (trainer.Trainer.update, "self.settings"),
                   (trainer.Trainer.evaluate, "self.settings"),
                   (trainer.Trainer._eval_batches, "self.settings"),
                   (trainer.Trainer._eval_precision, "self.settings"),
                   (preference_run.PreferenceTrainer.evaluate, "self.settings"),
                   *[(method, "self.settings") for _, method in inspect.getmembers(
                       rollout.GRPOTrainer, inspect.isfunction)],
                   (trainer.checked_precision, "cfg"), (optim.build_optimizer, "settings")],
    GRPOSettings: [(rollout.GRPOTrainer.__init__, "grpo_settings"),
                   *[(method, "self.grpo_settings") for _, method in inspect.getmembers(
                       rollout.GRPOTrainer, inspect.isfunction)],
                   (rollout.GRPOTrainer.backward, "settings"), (rollout.check_stops, "settings"),
                   *[(method, "self.settings") for _, method in inspect.getmembers(
                       rollout.Sampler, inspect.isfunction)], (rollout.reward_sandbox, "cfg")],
    LoopSettings: [(tm.train, "loop"), *[(function, "run.loop") for function in (
        tm._evaluate, tm._start_decay, tm._nonfinite)], (tm._stops_early, "loop"),
                   (tm._end, "loop"), (tm._after_step, "loop")],
    ExportSettings: [(finish.export_run, "settings"), (finish.write_gguf, "settings")],
}


@pytest.mark.parametrize("kind", list(READERS), ids=lambda kind: kind.__name__)
def test_a_parts_settings_are_the_config_fields_it_reads(kind):
    """Each field is TrainConfig's of that name and type (or its type once a run fills it in:
    ``int`` for ``int | None``), and its readers read exactly its fields."""
    config = {f.name: f.type for f in dataclasses.fields(TrainConfig)}
    own = {f.name: f.type for f in dataclasses.fields(kind)}
    extra = NOT_CONFIG.get(kind, set())
    assert set(own) - extra <= set(config)
    for name in set(own) - extra:
        assert own[name] in (config[name], config[name].removesuffix(" | None")), name
    read = read_of(READERS[kind]) | KEY_LISTS.get(kind, set())
    assert read & (set(own) | set(config)) == set(own)


def test_fields_of_takes_the_config_the_given_and_the_defaults():
    """A settings object takes each field from what is given, else the config, else its default; a
    name given that is no field is a TypeError naming it; a field with no default must be there."""
    cfg = TrainConfig(preset="tiny", lora_r=4)
    settings = ModelSettings(**fields_of(ModelSettings, cfg))
    assert (settings.preset, settings.lora_r, settings.adapter_copy) == ("tiny", 4, None)
    given = ModelSettings(**fields_of(ModelSettings, cfg, lora_r=8))
    assert given.lora_r == 8
    with pytest.raises(TypeError, match="no field 'lora_rank'"):
        fields_of(ModelSettings, cfg, lora_rank=8)
    with pytest.raises(AttributeError, match="run_dir"):
        fields_of(DataSettings, cfg)  # no default: it must be given


def test_a_built_run_holds_no_train_config(tmp_path):
    """The run, its trainer and its record keep the settings their parts read, not the config;
    the record's config.json is the whole config the run trains with."""
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    text = "def f(x):\n    return x + 1\n\n\nclass A:\n    pass\n"
    for i in range(30):
        (corpus / f"f{i}.py").write_text(f"# file {i}\n" + text * (20 + i % 3))
    tok = CodeTokenizer.train([text], min_freq=1)
    tok.save(tmp_path)
    cfg = TrainConfig(preset="tiny", data=[str(corpus)], tokenizer=str(tmp_path), block_size=32,
                      batch_size=2, max_steps=4, warmup_steps=1, lr=1e-3, eval_every=2,
                      eval_examples=2, progress=False, export=False, report_to=[],
                      out_dir=str(tmp_path / "runs"), name="run",
                      data_options={"cache_dir": str(tmp_path / "cache"), "train_frac": 0.7,
                                    "val_frac": 0.2})
    claimed = rundir.claim_run_dir(None, cfg.out_dir, cfg.name, cfg.run_stem, None,
                                   distributed.Dist())
    run = build.Run(cfg, claimed, distributed.Dist(), torch.device("cpu"), time.perf_counter(),
                    None, False)
    try:
        for part in (run, run.trainer, run.record, run.data):
            held = vars(part) if not isinstance(part, tuple) else part._asdict()
            assert not any(isinstance(value, TrainConfig) for value in held.values()), part
        assert run.loop == LoopSettings(**fields_of(LoopSettings, cfg))
        filled = {"optimizer": "adamw"}  # plan.with_fallbacks' choice
        assert run.trainer.settings == StepSettings(**fields_of(StepSettings, cfg, **filled))
        assert set(run.record.config) == {f.name for f in dataclasses.fields(TrainConfig)}
        assert {key: run.record.config[key] for key in ("lr", "max_steps", "eval_every")} == {
            "lr": 1e-3, "max_steps": 4, "eval_every": 2}
    finally:
        run.record.close()
        run.record.claimed.release()



def test_a_trainer_outside_a_run_schedules_over_its_settings_max_steps():
    """A trainer of StepSettings alone (a probe, --overfit) schedules over their max_steps."""
    model = torch.nn.Sequential(torch.nn.Linear(4, 4))
    model.lm_head = model[0]
    settings = StepSettings(**fields_of(StepSettings, TrainConfig(
        optimizer="adamw", lr=1e-3, max_steps=7, warmup_steps=1)))
    made = trainer.Trainer(model, settings, torch.device("cpu"))
    assert made.run_state.max_steps == 7 and made.settings is settings
