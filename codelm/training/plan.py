"""The plan of a run, made before anything is built: its settings checked together and against
the files they name (``parse_config``, ``validate_config``), and preset auto's model for the
machine (``choose_rung``), from the steps' costs (codelm.training.budget, which sizes the time
budget's steps too). Measures come from the caller, which times its own training step; what is
here is the arithmetic on them."""

from __future__ import annotations

import dataclasses
import math
import sys
import time
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import NamedTuple

import torch

import lora
from architecture import PRESETS, ModelConfig, Transformer
from codelm import trainconfig
from codelm.data.config import PREFERENCE_TASKS
from codelm.models import adapter_config, families
from codelm.runs import rundir
from codelm.runtime import hub, process, settings
from codelm.runtime.settings import setting
from codelm.trainconfig import (
    LOADED_MODEL_OPTIONS,
    MODEL_SHAPE_KEYS,
    OVERFIT_STEPS,
    TrainConfig,
    check_config,
    has_final_eval,
    is_set,
    model_config,
    read_config,
    where_set_of,
)
from codelm.training import preference
from codelm.training.budget import (
    TIMING_WINDOWS,
    WARM_UP_STEPS,
    StepCost,
    StepMeasure,
    check_step_cost,
    model_shape,
    scaled_cost,
    step_refusal,
)

# ---- The settings, checked together and against the files they name ----


def parse_config(argv: Sequence[str] | None = None) -> TrainConfig:
    """Defaults < ``--resume`` run's config.json < ``--config`` file < command-line flags; then
    checked (``validate_config``), each error naming its flag or file."""
    cfg, typed, resume_name = read_config(argv)
    if resume_name is not None and process.is_rank_zero():
        print(f"--resume {resume_name}: {cfg.resume} (under --out-dir)", file=sys.stderr)
    if cfg.overfit_batches and not cfg.overfit:
        cfg = with_overfit_batches_plan(cfg, typed)
    if not cfg.overfit:  # --overfit takes what it honours (overfit_settings)
        validate_config(cfg, where_set_of(argv), typed)
    command_line = sys.argv[1:] if argv is None else argv
    asked = cfg.final_eval and "--final-eval" in command_line
    if asked and not has_final_eval(cfg) and process.is_rank_zero():
        print(f"note: --final-eval: this run makes no final evaluation ({no_final_eval(cfg)}); "
              "python eval.py --models RUN_DIR --tasks line method scores it as that would",
              file=sys.stderr)
    return cfg


def no_final_eval(cfg: TrainConfig) -> str:
    """Why a run with final_eval set makes no final evaluation (has_final_eval): it ends a run
    of task lm that trains every weight, exported."""
    if cfg.task != "lm":
        return f"task {cfg.task}: it ends task lm's runs"
    if cfg.lora_r:
        return "a LoRA run: it ends a run that trains every weight"
    return "no export: it scores the export"


# What --overfit (a small model memorising the bundled corpus) honours, and what means nothing
# to it (no run directory, no validation); any other setting is refused, not dropped.
OVERFIT_HONOURS = ("overfit", "max_steps", "lr", "preset", "n_layer", "n_head", "n_embd",
                   "mlp_hidden", "model_options", "seed", "device", "precision", "progress",
                   "min_lr_ratio", "beta1", "beta2", "adam_eps", "grad_clip")
OVERFIT_IGNORES = ("name", "out_dir", "eval_every", "eval_examples", "eval_precision",
                   "early_stop_patience", "early_stop_min_delta", "log_every", "save_every",
                   "keep_last", "max_time_s", "time_budget_min", "export", "export_merged",
                   "export_gguf", "sample_prompt", "sample_tokens", "final_eval", "force")


def overfit_settings(cfg: TrainConfig) -> dict:
    """``run_overfit``'s max_steps and lr; a ValueError naming any setting it cannot honour."""
    refused = [f"{f.name}={getattr(cfg, f.name)!r}" for f in dataclasses.fields(cfg)
               if f.name not in OVERFIT_HONOURS + OVERFIT_IGNORES and is_set(cfg, f.name)]
    if refused:
        raise ValueError(f"--overfit trains a small model on the bundled corpus: it cannot honour "
                         f"{', '.join(refused)}; --overfit-batches K memorises that setup's data")
    trainconfig.check_values(cfg, only=("max_steps", "lr"))
    return {"max_steps": OVERFIT_STEPS if cfg.max_steps is None else cfg.max_steps,
            "lr": 3e-3 if cfg.lr is None else cfg.lr}


def overfit_ignored(cfg: TrainConfig) -> list[str]:
    """The keys of ``cfg`` that --overfit drops (set, and meaningless to a check that writes no
    run)."""
    return [key for key in OVERFIT_IGNORES if is_set(cfg, key)]


def with_overfit_batches_plan(cfg: TrainConfig, typed: Collection[str]) -> TrainConfig:
    """--overfit-batches K is a check, not a run planned by the clock: where ``cfg`` leaves them
    unset, preset auto's smallest rung (nothing timed), OVERFIT_STEPS steps, and no export (no
    sample, no final evaluation) unless one is asked for (``typed``: the keys given); said on
    stderr."""
    chosen, said = {}, []
    if cfg.preset == "auto" and cfg.init_from is None and cfg.init_adapter is None:
        cfg = with_rung(cfg, trainconfig.BUDGET_LADDER[0])
        said.append(f"{cfg.preset} (preset auto's smallest, untimed; --preset sets it)")
    if cfg.max_steps is None and cfg.epochs is None:
        chosen["max_steps"] = OVERFIT_STEPS
        said.append(f"at most {OVERFIT_STEPS} steps (--max-steps sets them)")
    asked = "export" in typed or cfg.export_gguf is not None or cfg.export_merged
    if cfg.export and not asked:
        chosen["export"] = False
        said.append("no export, sample or final evaluation (--export writes them)")
    if said:
        print(f"overfit_batches {cfg.overfit_batches}: {', '.join(said)}", file=sys.stderr)
    return replace(cfg, **chosen)


def validate_config(cfg: TrainConfig, where_set: Callable[[str], str] = settings.flag_of,
                    typed: Collection[str] = ()) -> None:
    """Reject impossible settings, naming each key, its value and where it was set: the
    values (trainconfig), an init_adapter's settings against the given ones, the model's
    source. ``typed``: keys given explicitly (a --lora-* flag at its default differs too)."""
    resolved = with_init_adapter(cfg, typed, where_set)
    check_config(resolved, where_set)
    check_length(resolved, typed, where_set)
    if resolved.task in PREFERENCE_TASKS:  # the loss's settings together, as the loss takes them
        preference.config_of(resolved, lambda key: setting(resolved, key, where_set))
    check_model_source(resolved, where_set)


def check_length(cfg: TrainConfig, typed: Collection[str],
                 where_set: Callable[[str], str]) -> None:
    """A time budget given (``typed``) beside max_steps or epochs sizes preset auto's model and
    ends nothing: refused where there is no model for it to size (a preset named, a pretrained
    model, a resumed run), naming both and where each was set. A config file's default budget
    is none given (a run's config.json records every key)."""
    fixed = "max_steps" if cfg.max_steps is not None else "epochs"
    budget = cfg.time_budget_min
    given = "time_budget_min" in typed and budget not in (None, TrainConfig.time_budget_min)
    if not given or getattr(cfg, fixed) is None:
        return
    if chooses_rung(cfg):
        return
    flag = settings.flag_of(fixed)
    way_out = f"drop one ({flag} none trains for the budget)"
    if cfg.resume is not None:
        way_out = (f"drop --time-budget-min (a resumed run trains to its {fixed}; {flag} sets "
                   "another)")
    raise ValueError(f"{setting(cfg, 'time_budget_min', where_set)} with "
                     f"{setting(cfg, fixed, where_set)}: the run's length is {fixed}, and the "
                     f"time budget only sizes preset auto's model: {way_out}")


def resolve(cfg: TrainConfig) -> TrainConfig:
    """``cfg`` with hub ids replaced by local snapshots and an init_adapter's settings read."""
    cfg = with_local_checkpoints(cfg)
    return with_init_adapter(cfg)


def with_local_checkpoints(cfg: TrainConfig) -> TrainConfig:
    """``cfg`` with a Hugging Face id in init_from or init_adapter replaced by its snapshot
    directory in the hub cache (fetched unless offline): config.json records that revision."""
    local = {}
    for key in ("init_from", "init_adapter"):
        value = getattr(cfg, key)
        if value is not None and hub.is_hub_id(value):
            local[key] = str(hub.checkpoint_dir(value, key))
            print(f"{key} {value}: {local[key]}", file=sys.stderr)
    return replace(cfg, **local)


def with_init_adapter(cfg: TrainConfig, typed: Collection[str] = (),
                      where_set: Callable[[str], str] = settings.flag_of) -> TrainConfig:
    """``cfg`` with the LoRA settings (and, without ``init_from``, the base) of its
    ``init_adapter``; a setting given (not the default, or typed) that differs is an error, but
    for lora_dropout, a training-time setting the adapter's weights do not hold: a given one is
    taken, else the adapter's, but 0 for a preference task (TRL's disable_dropout: the policy
    starts equal to its reference)."""
    if cfg.init_adapter is None:
        return cfg
    path = hub.checkpoint_dir(cfg.init_adapter, setting(cfg, "init_adapter", where_set))
    config_name = adapter_config.ADAPTER_CONFIG
    copy = rundir.adapter_copy(cfg.resume) if cfg.resume else None
    if copy is not None:  # a continued run reads its own copy of the adapter's config
        path, config_name = copy.parent, copy.name
    if not path.is_dir():
        raise ValueError(f"{setting(cfg, 'init_adapter', where_set)}: not a directory: give the "
                         f"directory of a PEFT adapter (its {config_name})")
    adapter = adapter_config.read_adapter_config(path, config_name)
    theirs = {key: getattr(adapter, name) for name, key in adapter_config.ADAPTER_KEYS.items()}
    base = cfg.init_from or str(adapter_config.adapter_base(
        path, "name the base with --init-from", config_name))
    if cfg.init_from is not None and Path(cfg.init_from).is_dir():  # a hub id is not read
        try:
            adapter_config.check_base_family(path, cfg.init_from, config_name)
        except ValueError as e:
            raise ValueError(f"{where_set('init_from')}: {e}") from None

    def agrees(key: str, mine) -> bool:
        if key != "lora_targets":
            return mine == theirs[key]
        # none (every run's config.json holds it) takes the adapter's; else the same names
        return mine is None or (isinstance(theirs[key], list) and set(mine) == set(theirs[key]))

    def given(key: str) -> bool:
        return is_set(cfg, key) or key in typed

    if differ := [f"{setting(cfg, key, where_set)} (the adapter's: {theirs[key]!r})"
                  for key in theirs if key != "lora_dropout" and given(key)
                  and not agrees(key, getattr(cfg, key))]:
        raise ValueError(f"{'; '.join(differ)}: {setting(cfg, 'init_adapter', where_set)} "
                         f"fixes these ({path / config_name}): drop those settings to train the "
                         "adapter on as it is")
    # The adapter's targets: a list of names, taken; or one regular expression (PEFT's other
    # form), which lora_targets (a list) cannot hold: the file keeps it, and build_model's
    # load_adapter reads it there.
    targets = theirs["lora_targets"]
    dropout = float(theirs["lora_dropout"])
    if given("lora_dropout"):
        dropout = cfg.lora_dropout
    elif cfg.task in PREFERENCE_TASKS:
        dropout = 0.0
    return dataclasses.replace(cfg, init_from=base, **{
        **theirs, "lora_alpha": float(theirs["lora_alpha"]), "lora_dropout": dropout,
        "lora_targets": cfg.lora_targets or (targets if isinstance(targets, list) else None)})


def check_lora_targets(cfg: TrainConfig, model_cfg: ModelConfig) -> None:
    """The adapters the run adds, added to the checkpoint's shape on the meta device (no
    weights): a target that matches no module, or DoRA where it cannot go, is refused before
    the data is prepared, as the build would refuse it after."""
    with torch.device("meta"):
        model = Transformer(model_cfg)
    lora.apply_lora(model, adapter_config.lora_config(cfg))


def check_model_source(cfg: TrainConfig, where_set: Callable[[str], str] = settings.flag_of
                       ) -> None:
    """The model's settings against what they name: a loaded checkpoint (its directory, its
    context, the options it takes), or the preset's shape and its HF export."""
    if cfg.init_from is not None:
        _check_loaded_model(cfg, where_set)
    else:
        _check_preset_model(cfg, where_set)


# The settings of a model's shape, which a loaded checkpoint fixes.
LOADED_MODEL_FIXES = ("n_layer", "n_head", "n_embd", "mlp_hidden")


def _check_loaded_model(cfg: TrainConfig, where_set: Callable[[str], str]) -> None:
    """The settings of a model loaded from ``cfg.init_from`` against its checkpoint directory:
    its shape left unset, the options it takes, its context, its GGUF architecture and LoRA
    targets."""

    def named(key: str) -> str:
        return setting(cfg, key, where_set)

    def need(ok: bool, key: str, why: str) -> None:
        if not ok:
            raise ValueError(f"{named(key)}: {why}")

    for key in LOADED_MODEL_FIXES:
        need(getattr(cfg, key) is None, key,
             f"the shape of a model loaded from {named('init_from')} cannot be changed")
    if fixed := sorted(set(cfg.model_options) - set(LOADED_MODEL_OPTIONS)):
        raise ValueError(f"model_options ({where_set('model_options')}): "
                         f"{', '.join(fixed)}: the checkpoint of {named('init_from')} fixes "
                         f"these; a loaded model takes only {', '.join(LOADED_MODEL_OPTIONS)}")
    for key, value in cfg.model_options.items():
        need(settings.is_number(value) and 0 <= value < 1, "model_options",
             f"{key} must be a probability in [0, 1), got {value!r}")
    path = hub.checkpoint_dir(cfg.init_from, named("init_from"))
    if not path.is_dir():
        earlier = (" (a run's export/: train that run first; python -m codelm.recipes CONFIG "
                   "names the recipe that trains it)" if path.name == rundir.EXPORT_DIR else "")
        raise ValueError(f"{named('init_from')}: not a directory{earlier}")
    if ((path / adapter_config.ADAPTER_CONFIG).is_file()
            and not (path / rundir.HF_CONFIG).is_file()):
        raise ValueError(f"{named('init_from')}: a LoRA adapter ({adapter_config.ADAPTER_CONFIG}), "
                         "not a model: use its base, or the merged model (a run with "
                         "--export-merged writes it to export/merged); to train that "
                         f"adapter on, set init_adapter ({where_set('init_adapter')}) to "
                         f"{cfg.init_from}")
    if not (path / rundir.HF_CONFIG).is_file():
        raise ValueError(f"{named('init_from')}: {path} holds no {rundir.HF_CONFIG}: not an "
                         "HF checkpoint directory (its config.json beside its weights)")
    loaded = families.read_config(path).model
    _note_other_preset(cfg, loaded, named)
    if cfg.block_size is not None:  # else the first forward pass finds it, after the data
        need(cfg.block_size <= loaded.block_size, "block_size",
             f"longer than the context of {named('init_from')}, {loaded.block_size} positions")
    if cfg.export_gguf is not None:  # the tokenizer: build.check_gguf_export
        try:
            families.check_architecture(loaded)
        except ValueError as e:
            raise ValueError(f"{named('export_gguf')}: {named('init_from')}: {e}; or set "
                             "export_gguf none") from None
    if cfg.lora_r and cfg.init_adapter is None:  # its targets, before the data
        check_lora_targets(cfg, loaded)


def _note_other_preset(cfg: TrainConfig, loaded: ModelConfig, named: Callable[[str], str]
                       ) -> None:
    """A note where a named preset is not the shape of the model ``init_from`` loads, which
    trains as it is (the preset names it alone: a recipe's ``llama-3.2-1b``)."""
    preset = PRESETS.get(cfg.preset)
    if preset is None or not process.is_rank_zero():  # auto, or an unknown one (refused)
        return
    shape = ("family", "n_layer", "n_head", "n_embd")
    if [getattr(preset, key) for key in shape] == [getattr(loaded, key) for key in shape]:
        return
    print(f"note: {named('preset')} is not the shape of the model {named('init_from')} loads "
          f"({loaded.family}, {loaded.n_layer} layers, {loaded.n_head} heads, width "
          f"{loaded.n_embd}), which trains as it is: the preset goes unused (leave it auto)",
          file=sys.stderr)


def _check_preset_model(cfg: TrainConfig, where_set: Callable[[str], str]) -> None:
    """The preset, the shape and model_options (preset auto's smallest rung), checked before
    the data is prepared, with the HF export the run ends with; an error names the settings
    the model was made of, and where."""
    try:
        smallest = trainconfig.BUDGET_LADDER[0]
        shape = model_config(with_rung(cfg, smallest) if cfg.preset == "auto" else cfg, 1,
                             None, None)
        if cfg.export:  # else it trains to the end and fails writing export/
            try:
                families.hf_config(shape, torch.float32)
            except ValueError as e:
                raise ValueError(f"{e}; to train it without an HF export: "
                                 f"{settings.off_switch('export', where_set)}") from None
    except ValueError as e:
        made_of = [setting(cfg, k, where_set) for k in ("preset", *MODEL_SHAPE_KEYS,
                                                        "model_options")
                   if k == "preset" or getattr(cfg, k) not in (None, {})]
        raise ValueError(f"{', '.join(made_of)}: {e}") from None


# ---- Preset auto's ladder, and what settings left unset take ----

# Preset auto (trainconfig.BUDGET_LADDER) takes the largest model that still trains on
# TOKENS_PER_PARAM tokens per parameter in its minutes on the machine it runs on.
TOKENS_PER_PARAM = 3.5  # 2 idle cores clear it for code-4x192 with room: a slow start keeps it
# What the settings left unset (None) take outside preset auto's choice (the warmup: warmup_for).
FALLBACKS = {"batch_size": 4, "lr": 1e-3, "optimizer": "adamw"}

# The warmup a run of fixed length leaves unset: LONG_RUN_WARMUP steps, or SHORT_RUN_WARMUP_SHARE
# of a shorter run's steps (50 of a 60-step run would skip its evaluations and leave 10 steps
# for the decay).
LONG_RUN_WARMUP = 50
SHORT_RUN_WARMUP_SHARE = 0.1


def with_rung(cfg: TrainConfig, rung: dict) -> TrainConfig:
    """``cfg`` on a BUDGET_LADDER rung: its preset, and its values where ``cfg`` leaves them
    unset."""
    unset = {k: v for k, v in rung.items() if k == "preset" or getattr(cfg, k) is None}
    return replace(cfg, **unset)


def with_fallbacks(cfg: TrainConfig) -> TrainConfig:
    """``cfg`` with FALLBACKS where it leaves a setting unset (the warmup is sized with the
    run's steps: ``warmup_for``, or a budgeted run's ``fit_budget``)."""
    unset = {k: v for k, v in FALLBACKS.items() if getattr(cfg, k) is None}
    return replace(cfg, **unset)


def warmup_for(steps: int) -> int:
    """The warmup of a run of ``steps`` steps that leaves it unset."""
    return min(LONG_RUN_WARMUP, int(round(SHORT_RUN_WARMUP_SHARE * steps, 6)))


def run_length(cfg: TrainConfig, steps_for: Callable[[float], int]) -> int:
    """The steps a run takes by its settings: max_steps (a budgeted run's, as fit_budget sized
    it), else those that train its epochs (``steps_for``: Batches.steps_for). The run's state
    holds it (RunState.max_steps), the one length its loop, schedule and records read; a
    budgeted run's clock moves it (BudgetClock)."""
    return cfg.max_steps if cfg.epochs is None else steps_for(cfg.epochs)


# ---- Preset auto: the largest rung the machine trains well in the budget ----

# The share of preset auto's budget it expects to train in (the data is yet to be prepared).
TRAIN_SHARE = 0.85
# Preset auto trains on a CPU in bf16 when that measures this many times fp32's speed, on the
# ladder's rung PRECISION_RUNG (code-4x192): the first rung's matmuls are too narrow for the
# difference to show above the noise.
CPU_BF16_SPEEDUP = 1.2
PRECISION_RUNG = 2
# Preset auto waits at most this share of its budget for other processes to leave the CPU.
QUIET_WAIT_SHARE = 0.05
# The seconds of one rung's timing windows (build.measure_speed), all windows together.
RUNG_TIMING_S = 2.0
# Preset auto times rungs for at most this share of its budget: a short budget trains the
# largest rung timed by then (the smallest, untimed, if none) rather than spend itself timing.
TIMING_SHARE = 0.2


class Probe(NamedTuple):
    """A model's size and its training speed measured on this machine."""

    params: int
    tokens_per_s: float


def timing_seconds(step_s: float) -> float:
    """What timing a rung takes at most at ``step_s`` a step (``seconds_a_step``): its
    WARM_UP_STEPS and TIMING_WINDOWS windows of RUNG_TIMING_S together, each running on to the
    end of its last step."""
    return (WARM_UP_STEPS + TIMING_WINDOWS) * step_s + RUNG_TIMING_S


@dataclass
class TimingAllowance:
    """Preset auto's seconds for timing rungs (``left``), spent by each rung's timing as
    predicted from its step: from ``measured``, a step of ``of``'s (the first rung's, on short
    sequences), until a rung is timed, then from the last timed one's speed; ``spent``: the
    seconds taken so far. Every process decides alike: no clock is read."""

    left: float
    measured: StepCost
    of: TrainConfig
    spent: float = 0.0

    def take(self, candidate: TrainConfig, timings: int = 1) -> bool:
        """Whether ``timings`` timings of ``candidate`` fit in what is left: if so, spent."""
        step_s = scaled_cost(self.measured, self.of, candidate).seconds
        needed_s = timings * timing_seconds(step_s)
        if needed_s > self.left:
            return False
        self.left -= needed_s
        self.spent += needed_s
        return True

    def timed(self, rung: TrainConfig, measured: Probe) -> None:
        """Predict from ``rung``'s timed speed (one process's) from here on."""
        tokens = rung.batch_size * rung.grad_accum * rung.block_size
        self.measured = StepCost(0.0, tokens / measured.tokens_per_s)
        self.of = rung


def others_running() -> int:
    """Processes other than this one that keep this machine's cores busy: the fewest runnable
    of five looks over half a second (a passing daemon does not count); 0 where the kernel does
    not say (no /proc/stat)."""
    fewest = math.inf
    for _ in range(5):
        try:
            stat = Path("/proc/stat").read_text()
        except OSError:
            return 0
        running = next((int(line.split()[1]) for line in stat.splitlines()
                        if line.startswith("procs_running ")), 1)
        fewest = min(fewest, running - 1)  # this process is running as it reads
        time.sleep(0.1)
    return int(fewest)


def plan_run(cfg: TrainConfig, device_type: str, distributed: bool, main: bool,
             probe: Callable[[TrainConfig], Probe],
             measure: Callable[[TrainConfig], StepMeasure]) -> TrainConfig:
    """The settings a run trains with: hub ids replaced by their snapshots, an init_adapter's
    settings read, and for preset auto the rung for this machine (``auto_rung``)."""
    if chooses_rung(cfg):
        chosen = auto_rung(cfg, device_type, distributed, main, probe, measure)
        if chosen.max_steps is not None or chosen.epochs is not None:
            # the budget sized the model, which config.json names: it ends nothing
            chosen = replace(chosen, time_budget_min=None)
        return chosen
    return resolve(cfg)


def chooses_rung(cfg: TrainConfig) -> bool:
    """Whether preset auto chooses ``cfg``'s model for this machine: a new run from scratch
    (a pretrained model, or a resumed run's config.json, names its model)."""
    resumed = cfg.resume is not None and (Path(cfg.resume) / rundir.CONFIG_FILE).is_file()
    pretrained_model = cfg.init_from is not None or cfg.init_adapter is not None
    return cfg.preset == "auto" and not pretrained_model and not resumed


def auto_rung(cfg: TrainConfig, device_type: str, distributed: bool, main: bool,
              probe: Callable[[TrainConfig], Probe],
              measure: Callable[[TrainConfig], StepMeasure]) -> TrainConfig:
    """Preset auto's rung (``choose_rung``; ``probe`` times one). Before any rung is timed,
    the first rung's step is measured (``measure``) and refused as check_step_cost refuses it,
    unless forced (then taken untimed). A budgeted run on a CPU waits for other processes to
    leave it before timing rungs, and before measuring again a first step found beyond the
    limits, so that a passing load cannot refuse the run."""
    seconds = cfg.time_budget_min * 60
    budgeted = cfg.max_steps is None and cfg.epochs is None  # not a sweep's fixed steps
    seconds_left = seconds if budgeted else None
    waits = budgeted and device_type == "cpu" and not distributed  # the machine, not a load
    first = with_fallbacks(with_rung(cfg, trainconfig.BUDGET_LADDER[0]))
    if main:  # said first: measuring and timing may take a minute on a busy CPU
        print(f"preset auto: measuring this {device_type} to size the model to a "
              f"{cfg.time_budget_min:g}-min budget (a --preset skips it)", flush=True)
    measured = measure(first)
    refusal = step_refusal(measured.cost, measured.free_bytes, seconds_left)
    waited_s = 0.0  # (no process of a group waits: every process decides alike)
    if refusal is not None and waits:  # a load that passes must not refuse the run
        waited_s = wait_until_quiet(QUIET_WAIT_SHARE * seconds)
        waits = False
        measured = measure(first)
        refusal = step_refusal(measured.cost, measured.free_bytes, seconds_left)
    if refusal is not None:  # every rung's step is beyond the machine: refused, or forced
        check_step_cost(first, measured.cost, first.block_size, measured.free_bytes,
                        seconds_left)
        return untimed_first_rung(cfg, f"{refusal} (--force)", device_type, main)
    if waits:
        waited_s = wait_until_quiet(QUIET_WAIT_SHARE * seconds)
        measured = measure(first)  # the step the timing is predicted from, on a quieter CPU
    # several processes time the rungs together (their collectives): as much as they need
    allowed_s = math.inf if distributed else TIMING_SHARE * seconds
    allowance = TimingAllowance(allowed_s, measured.cost, first)
    if not allowance.take(first):
        too_long = (f"timing it would take over {TIMING_SHARE:.0%} of the "
                    f"{cfg.time_budget_min:g}-min budget")
        return untimed_first_rung(cfg, too_long, device_type, main)
    within = partial(within_limits, measured, first, measure, seconds_left)
    return choose_rung(cfg, probe, within, allowance, seconds - waited_s, device_type, main)


def wait_until_quiet(at_most_s: float, announce: bool = True) -> float:
    """Wait, at most ``at_most_s``, while other processes keep the cores busy, so that preset
    auto measures the machine and not a load that passes (a pip install finishing beside it).
    Returns the seconds waited."""
    start = time.monotonic()
    busy = others_running()
    if busy and announce:
        print(f"preset auto: {busy} other process(es) keep the CPU busy: waiting up to "
              f"{at_most_s:.0f} s for the machine to settle before measuring it")
    while busy and time.monotonic() - start < at_most_s:
        busy = others_running()
    return time.monotonic() - start


def within_limits(first_measured: StepMeasure, first: TrainConfig,
                  measure: Callable[[TrainConfig], StepMeasure], seconds_left: float | None,
                  candidate: TrainConfig) -> bool:
    """Whether a rung's step is within check_step_cost's limits, known before it is timed:
    predicted from the first rung's (``scaled_cost``), which is cheap and errs high; where that
    prediction is beyond them, the rung's own ``measure`` on short sequences decides."""
    predicted = scaled_cost(first_measured.cost, first, candidate)
    if step_refusal(predicted, first_measured.free_bytes, seconds_left) is None:
        return True
    own = measure(candidate)
    return step_refusal(own.cost, own.free_bytes, seconds_left) is None


def untimed_first_rung(cfg: TrainConfig, reason: str, device_type: str,
                       announce: bool = True) -> TrainConfig:
    """Preset auto's first rung, untimed (``reason``: forced, --force, past a step beyond the
    machine, or a budget too short to time it), on a CPU in fp32."""
    if cfg.precision == "auto" and device_type == "cpu":
        cfg = replace(cfg, precision="fp32")
    chosen = with_fallbacks(with_rung(cfg, trainconfig.BUDGET_LADDER[0]))
    if announce:
        print(f"preset auto: {chosen.preset} ({millions(model_shape(chosen).params)} "
              f"parameters, context {chosen.block_size}), batch {chosen.batch_size}, lr "
              f"{chosen.lr:g}, {chosen.precision}: the smallest, untimed: {reason}; pin it with "
              f"{pin_flags(chosen)}")
    return chosen


def choose_rung(cfg: TrainConfig, probe: Callable[[TrainConfig], Probe],
                within: Callable[[TrainConfig], bool], allowance: TimingAllowance,
                seconds: float, device_type: str, announce: bool = True) -> TrainConfig:
    """Preset auto: the largest BUDGET_LADDER rung whose measured speed lets it see
    TOKENS_PER_PARAM tokens per parameter in TRAIN_SHARE of ``seconds`` less the timing spent
    so far (``allowance.spent``). The first rung that falls short is
    measured once more before it is refused, so that a passing load cannot refuse it. A rung
    whose step is beyond the machine (not ``within``), or whose timing the ``allowance`` does
    not afford, is not timed, nor any above it; the first rung is within, and afforded."""
    if cfg.precision == "auto" and device_type == "cpu":
        precision_rung = trainconfig.BUDGET_LADDER[PRECISION_RUNG]
        precision_candidate = with_fallbacks(with_rung(cfg, precision_rung))
        timed = within(precision_candidate) and allowance.take(precision_candidate, timings=2)
        if timed and announce:
            print(f"preset auto: timing bf16 against fp32 on {precision_candidate.preset}",
                  flush=True)
        cfg = replace(cfg, precision=cpu_precision(cfg, probe) if timed else "fp32")

    def fits(measured: Probe) -> bool:  # in the training time the timing so far leaves
        train_s = seconds * TRAIN_SHARE - allowance.spent
        return measured.tokens_per_s * train_s >= TOKENS_PER_PARAM * measured.params

    def timed(candidate: TrainConfig, again: str = "") -> Probe:
        if announce:  # a line a rung: timing one takes seconds to minutes on a busy CPU
            print(f"preset auto: timing {candidate.preset} (context {candidate.block_size}, "
                  f"batch {candidate.batch_size}) on {device_type}{again}", flush=True)
        return probe(candidate)

    chosen = with_fallbacks(with_rung(cfg, trainconfig.BUDGET_LADDER[0]))
    chosen_probe = timed(chosen)  # its timing taken from the allowance already (auto_rung)
    allowance.timed(chosen, chosen_probe)
    unaffordable = ""  # a rung the allowance stopped at
    for rung in trainconfig.BUDGET_LADDER[1:]:
        candidate = with_fallbacks(with_rung(cfg, rung))
        if not within(candidate):
            break
        if not allowance.take(candidate):
            unaffordable = candidate.preset
            break
        measured = timed(candidate)
        allowance.timed(candidate, measured)
        if not fits(measured) and allowance.take(candidate):
            again = timed(candidate, " again: too slow for the budget once, and the machine "
                                     "may have been busy for a moment")
            measured = max(measured, again, key=lambda p: p.tokens_per_s)
        if not fits(measured):
            break
        chosen, chosen_probe = candidate, measured
    if not announce:
        return chosen
    untimed = ""
    if unaffordable:
        untimed = (f"; {unaffordable} and larger untimed: timing them would take over "
                   f"{TIMING_SHARE:.0%} of the budget")
    print(f"preset auto: {chosen.preset} ({millions(chosen_probe.params)} parameters, context "
          f"{chosen.block_size}), batch {chosen.batch_size}, lr {chosen.lr:g}, "
          f"{chosen.optimizer or 'adamw'}, {chosen.precision}: the largest that sees "
          f"{TOKENS_PER_PARAM} tokens a parameter in {cfg.time_budget_min:g} min on {device_type} "
          f"({chosen_probe.tokens_per_s:,.0f} tokens/s measured{sized_by(cfg)}{untimed}); pin it "
          f"with {pin_flags(chosen)}")
    return chosen


def sized_by(cfg: TrainConfig) -> str:
    """Where a run's length is its steps or epochs, that the time budget still sizes its model."""
    if cfg.max_steps is None and cfg.epochs is None:
        return ""
    return ("; --time-budget-min sizes the model, --max-steps or --epochs only end the run; "
            "pinning skips this timing")


def pin_flags(cfg: TrainConfig) -> str:
    """The flags that take preset auto's choice without timing the machine again."""
    return (f"--preset {cfg.preset} --batch-size {cfg.batch_size} --lr {cfg.lr:g} "
            f"--optimizer {cfg.optimizer or 'adamw'} --precision {cfg.precision}")


def cpu_precision(cfg: TrainConfig, probe: Callable[[TrainConfig], Probe]) -> str:
    """bf16 autocast where this CPU computes it natively (measured on the rung PRECISION_RUNG,
    at least CPU_BF16_SPEEDUP times fp32's tokens a second): the budget then buys more tokens."""
    rung = with_fallbacks(with_rung(cfg, trainconfig.BUDGET_LADDER[PRECISION_RUNG]))
    fp32 = probe(replace(rung, precision="fp32")).tokens_per_s
    bf16 = probe(replace(rung, precision="bf16")).tokens_per_s
    return "bf16" if bf16 >= CPU_BF16_SPEEDUP * fp32 else "fp32"


def millions(n: int) -> str:
    """A parameter count: 0.46M, but 3,072 rather than "0.00M"."""
    return f"{n / 1e6:.2f}M" if n >= 10_000 else f"{n:,}"
