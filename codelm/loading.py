"""Any model codelm scores, loaded: an HF checkpoint directory or hub id, a codelm run (its
export, best/ or latest checkpoint), an adapter whose config names its base, or BASE+ADAPTER
(``load_model``); and a run's model built from its TrainConfig (``build_model``), from scratch
or from ``init_from``, with its quantized base and LoRA."""

from __future__ import annotations

import contextlib
import os
import sys
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.nn as nn

import lora
from architecture import SHORT_DTYPES, Transformer
from codelm import trainconfig
from codelm.models import adapter_config, pretrained, quantize
from codelm.runs import checkpoint, rundir
from codelm.runtime import hub, process, settings
from codelm.runtime.settings import fields_of
from codelm.tokenization.bpe import BPETokenizer
from codelm.tokenization.files import tokenizer_path
from tokenizer import (
    CodeTokenizer,
    check_model_tokenizer,
    load_tokenizer,
    same_vocabulary,
    where_tokenizer_is,
)


@dataclass
class LoadedModel:
    label: str
    source: str
    model: torch.nn.Module
    tokenizer: object
    run_config: dict | None = None  # the TrainConfig of a codelm run
    run_weights: dict | None = None  # which of a codelm run's weights were loaded (_run_weights)
    run_dir: Path | None = None  # a codelm run's directory
    trained_task: str | None = None  # a checkpoint's own record of its task (no run's)

    @property
    def prompt_start(self) -> list[int]:
        """The ids before a prompt, as the model saw text in training (a checkpoint that names
        no task: its template's start alone)."""
        from codelm.data.encoding import prompt_prefix  # when asked: a load reads no data

        task = self.run_config.get("task", "lm") if self.run_config else self.trained_task
        return prompt_prefix(self.tokenizer, task)


def device_named(name: str) -> torch.device:
    """The torch device of eval.py's ``--device``; one this machine lacks is a user error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if device.type == "cuda" and (device.index or 0) >= count:
        raise ValueError(f"--device {name!r}: " + (
            f"this machine has {count} CUDA device(s), cuda:0 to cuda:{count - 1}" if count
            else "CUDA is not available on this machine (use cpu or auto)"))
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"--device {name!r}: MPS is not available on this machine")
    return device


def _load_hf(path: Path, device: torch.device, dtype: str | None = None,
             adapter: Path | None = None) -> torch.nn.Module:
    """An HF model directory (fp32 on CPU unless ``dtype``), with ``adapter`` loaded on it."""
    dtype = dtype or (torch.float32 if device.type == "cpu" else None)
    model = pretrained.load(path, dtype=dtype, device=device)
    if adapter is not None:
        lora.load_adapter(model, adapter)
    return model


def _run_base(run_dir: Path, config: dict) -> str:
    """A run's ``init_from`` base (a path not found names config.json and the key, and how to
    name the base where it moved)."""
    try:
        checkpoint.check_run_paths(config, ["init_from"], str(run_dir / rundir.CONFIG_FILE))
    except ValueError as e:
        export = run_dir / rundir.EXPORT_DIR
        if not config.get("lora_r") or not (export / adapter_config.ADAPTER_CONFIG).is_file():
            raise
        raise ValueError(f"{e}; where the base moved, give it as BASE+ADAPTER: "
                         f"/path/to/base+{export}") from None
    return config["init_from"]


def _run_tokenizer(run_dir: Path, override: str | None) -> Path:
    """The run dir's tokenizer, else its export's, else ``--tokenizer``'s."""
    export = run_dir / rundir.EXPORT_DIR
    for directory in (run_dir, export):
        if (directory / "tokenizer.json").is_file():
            return directory
    if override is not None:
        return Path(override)
    nor = f", nor {export / 'tokenizer.json'}" if export.is_dir() else ""
    raise ValueError(f"{run_dir / 'tokenizer.json'}: not found{nor}; pass --tokenizer with the "
                     "tokenizer the run trained with")


def _export_tokenizer(run_dir: Path, tok_dir: Path, override: str | None) -> Path:
    """The tokenizer an exported run is scored with: the export's own copy, saved with its
    weights, where it holds one (noted where the run's tokenizer.json reads otherwise), else
    ``tok_dir``; ``override`` (--tokenizer) is used in its place, unnoted."""
    export = run_dir / rundir.EXPORT_DIR
    own = export / "tokenizer.json"
    if override is not None or tok_dir != run_dir or not own.is_file():
        return tok_dir
    run_file = run_dir / "tokenizer.json"
    same_bytes = run_file.read_bytes() == own.read_bytes()
    if not same_bytes and settings.read_json_object(run_file, "tokenizer") != (
            settings.read_json_object(own, "tokenizer")):
        print(f"note: {run_file} is not the tokenizer {export} was saved with: scored with "
              f"{own}", file=sys.stderr)
    return export


def _run_weights(run_dir: Path, weights: Path, chosen: bool = False) -> dict:
    """What results.json records of a run's scored weights: where, their step, still training;
    ``chosen``: the weights were named (a checkpoint or best/), not picked as the run's model."""
    record = weights / rundir.EXPORT_RECORD
    if weights.name == rundir.EXPORT_DIR and record.is_file():
        step = settings.read_json_object(record, "export record").get("best_step")
    elif weights.name in (rundir.EXPORT_DIR, rundir.BEST_DIR):
        step = rundir.best_step(run_dir)
    else:
        step = rundir.checkpoint_step(weights)
    lock = run_dir / rundir.LOCK_FILE
    training = rundir.lock_is_held(lock)
    where = f"{weights.relative_to(run_dir).as_posix()}/"
    if training:
        print(f"note: {run_dir} is still training ({rundir.lock_holder(lock) or 'another process'}"
              f"): loading {where}, its weights of step {step} (an evaluation's results.json "
              "records the step)", file=sys.stderr)
    elif weights.parent.name == rundir.CHECKPOINTS_DIR and not chosen:
        print(f"note: {run_dir} has no {rundir.BEST_DIR}/: loading its latest checkpoint, "
              f"{weights}", file=sys.stderr)
    elif weights.name == rundir.BEST_DIR and not chosen and (stop := _unfinished(run_dir)):
        print(f"note: {run_dir} {stop}: loading {where}, its weights of step {step}",
              file=sys.stderr)
    elif weights.name == rundir.BEST_DIR and not chosen and not (
            run_dir / rundir.EXPORT_DIR).is_dir():
        print(f"note: {run_dir} has no {rundir.EXPORT_DIR}/: loading {where}, its weights of "
              f"step {step}", file=sys.stderr)
    return {"weights": where, "step": step, "still_training": training}


def _unfinished(run_dir: Path) -> str | None:
    """Where a run stopped short of its max_steps (its latest checkpoint), and how to go on;
    None where it trained them all, or ended on purpose before (early stopping, an
    --overfit-batches check that memorised its batches)."""
    checkpoints = rundir.list_checkpoints(run_dir)
    config = settings.read_json_object(run_dir / rundir.CONFIG_FILE, "run config")
    max_steps = config.get("max_steps")
    if not checkpoints or not isinstance(max_steps, int) or config.get("overfit_batches"):
        return None
    stopped_at = rundir.checkpoint_step(checkpoints[-1])
    if stopped_at >= max_steps:
        return None
    if patience := config.get("early_stop_patience"):
        with contextlib.suppress(ValueError):  # an unreadable checkpoint: said as stopped
            if checkpoint.read_state(checkpoints[-1], mmap=True).out_of_patience(patience):
                return None
    resume = _resume_command(run_dir, config, checkpoints)
    return f"stopped at step {stopped_at} of {max_steps} ({resume} continues it)"


def _resume_command(run_dir: Path, config: dict, checkpoints: list[Path]) -> str:
    """The command that continues ``run_dir`` (its ``config`` and ``checkpoints``, oldest
    first) from its latest checkpoint: on as many processes as wrote it, under torchrun where
    more than one did or where the run shards its model."""
    writers = None  # of the newest readable checkpoint, the one a resume continues from
    for path in reversed(checkpoints):
        with contextlib.suppress(checkpoint.CorruptCheckpointError):
            writers = len(checkpoint.read_state(path, mmap=True).rng)
            break
    if writers is None and config.get("strategy") == "fsdp":
        return f"torchrun --nproc-per-node N trainingmanager.py --resume {run_dir}"
    if writers is None or writers == 1:
        return f"python trainingmanager.py --resume {run_dir}"
    return f"torchrun --nproc-per-node {writers} trainingmanager.py --resume {run_dir}"


def _intact(weights_dir: Path) -> bool:
    """Whether a run's weights directory holds the bytes its manifest recorded (a warning if not:
    the next of the run's weights is loaded)."""
    if problem := process.manifest_problem(weights_dir):
        print(f"warning: {weights_dir}: {problem}; not loaded, the run's next weights are",
              file=sys.stderr)
    return problem is None


def _load_run(run_dir: Path, device: torch.device, tokenizer: str | None = None,
              dtype: str | None = None, unquantized: bool = False,
              chosen: Path | None = None, as_run: bool = True
              ) -> tuple[torch.nn.Module, Path, dict, dict]:
    """A run's model (its export while that holds best/, else best/ or the latest checkpoint;
    ``chosen``: that best/ or checkpoint), its tokenizer's directory, config and
    ``_run_weights``; ``unquantized``: load_model's. A LoRA run on a base of another form than
    its export's (NF4, bf16) is scored as it trained, from best/ or a checkpoint, where the run
    (``as_run``) and not its export/ was named."""
    config = settings.read_json_object(run_dir / rundir.CONFIG_FILE, "run config")
    export = run_dir / rundir.EXPORT_DIR
    tok_dir = _run_tokenizer(run_dir, tokenizer)
    adapter = (export / adapter_config.ADAPTER_CONFIG).is_file()
    exported = adapter or (export / rundir.HF_CONFIG).is_file()
    as_trained = adapter and as_run and not unquantized and _reduced_base(config)
    if chosen is None and (stale := rundir.stale_export(run_dir)):
        print(f"note: {export} is not used: {stale}; loading best/", file=sys.stderr)
    elif chosen is None and as_trained and _has_trained_weights(run_dir):
        form = quantize.base_form(config.get("quantize_bits", 0), config.get("base_dtype", ""))
        print(f"note: {run_dir} trained on {form}: loaded on it, as it trained, from its "
              f"weights beside {export} (an adapter for the full-precision base: "
              f"BASE+{export} loads it there)", file=sys.stderr)
    elif chosen is None and exported and not as_run and (
            problem := process.manifest_problem(export)):
        raise ValueError(f"{export}: {problem}; not loaded (--models {run_dir} loads the run's "
                         "best/ or its latest intact checkpoint)")
    elif chosen is None and exported and _intact(export):
        if adapter and not as_run and not unquantized and _reduced_base(config):
            form = quantize.base_form(config.get("quantize_bits", 0), config.get("base_dtype", ""))
            print(f"note: {export}: an adapter trained on {form}, loaded on the full-precision "
                  f"base (--models {run_dir} scores it as it trained)", file=sys.stderr)
        base = Path(_run_base(run_dir, config)) if adapter else export
        model = _load_hf(base, device, dtype, export if adapter else None)
        tok_dir = _export_tokenizer(run_dir, tok_dir, tokenizer)
        return model, tok_dir, config, _run_weights(run_dir, export)
    cfg = trainconfig.config_from_dict(config, str(run_dir / rundir.CONFIG_FILE))
    if cfg.init_from:
        cfg = replace(cfg, init_from=_run_base(run_dir, config))
    weights_dir = _run_weights_dir(run_dir, chosen)
    # an init_adapter run's LoRA layout comes from the run's own copy
    model_settings = trainconfig.ModelSettings(**fields_of(
        trainconfig.ModelSettings, cfg, adapter_copy=rundir.adapter_copy(run_dir)))
    if unquantized:
        model_settings = replace(model_settings, quantize_bits=0)
    model = build_model(model_settings, load_tokenizer(tok_dir))
    if checkpoint.is_sharded(weights_dir):  # --strategy fsdp's: this process reads every shard
        adapter_only = cfg.lora_r > 0 and cfg.init_from is not None  # as the run saved them
        checkpoint.load_sharded_weights(weights_dir, model, adapter_only)
    else:
        adapter_only = (weights_dir / rundir.ADAPTER_FILE).is_file()
        weights = weights_dir / checkpoint.weights_file(adapter_only)
        file = pretrained.SafetensorsFile(weights)  # a truncated file is an error naming it
        checkpoint.load_model_tensors(model, {name: file.view(name) for name in file.entries},
                                      str(weights), adapter_only)
    if dtype is not None:  # else as it trained (a LoRA base in its base_dtype)
        model = quantize.cast_model(model, SHORT_DTYPES[dtype])
    scored = _run_weights(run_dir, weights_dir, chosen is not None)
    return model.to(device), tok_dir, config, scored


def _reduced_base(config: dict) -> bool:
    """Whether a LoRA run's frozen base trained in another form than its exported adapter loads
    on (NF4, int8, bf16 or fp16, not fp32)."""
    return bool(config.get("quantize_bits", 0)) or config.get("base_dtype", "fp32") != "fp32"


def _weights_candidates(run_dir: Path) -> list[Path]:
    """A run's weights directories as eval.py prefers them: best/, then its checkpoints, the
    newest first."""
    best = run_dir / rundir.BEST_DIR
    return [best] * best.is_dir() + rundir.list_checkpoints(run_dir)[::-1]


def _has_trained_weights(run_dir: Path) -> bool:
    """Whether a run holds a best/ or checkpoint whose files have their recorded sizes (a look
    that reads no file: ``_run_weights_dir`` checks the digests of the one it takes)."""
    return any(process.manifest_problem(c, sizes_only=True) is None
               for c in _weights_candidates(run_dir))


def _study_trials(path: Path) -> str | None:
    """A hyperparam_tune study directory's trial runs, listed for an error (``trials/trial-0000,
    ...``); None where ``path`` is no study (no trials/ beside a trials.csv or tune_config.json)."""
    if not (path / "trials").is_dir() or not any(
            (path / name).is_file() for name in ("trials.csv", "tune_config.json")):
        return None
    runs = sorted(run for run in (path / "trials").iterdir() if rundir.is_run_dir(run))
    shown = ", ".join(str(run) for run in runs[:3]) + (", ..." if len(runs) > 3 else "")
    return shown or f"under {path / 'trials'} (none holds weights yet)"


def _note_another_base(adapter: Path, base: Path) -> None:
    """A note where BASE+ADAPTER's base is not the local directory the adapter's config names
    (refused where its family is another): scored on the given base."""
    adapter_config.check_base_family(adapter, base)
    if note := adapter_config.other_base_note(adapter, base):
        print(f"note: {note}: loaded on {base}, as given", file=sys.stderr)


def _run_weights_dir(run_dir: Path, chosen: Path | None) -> Path:
    """``chosen`` (a run's best/ or checkpoint) if its bytes are intact; else the run's best/, or
    its latest intact checkpoint."""
    if chosen is not None:
        if problem := process.manifest_problem(chosen):
            raise ValueError(f"{chosen}: {problem}; not loaded")
        return chosen
    weights_dir = next((c for c in _weights_candidates(run_dir) if _intact(c)), None)
    if weights_dir is None:
        raise ValueError(f"{run_dir}: no model in {rundir.EXPORT_DIR}/, and no intact "
                         f"{rundir.BEST_DIR}/ or checkpoint to score")
    return weights_dir


def _checkpoints_held(path: Path) -> str:
    """For a run's checkpoint that is not there: the ones its run holds."""
    run_dir = rundir.run_of_weights(path)
    if run_dir is None or path.name in (rundir.EXPORT_DIR, rundir.BEST_DIR):
        return ""
    held = [p.name for p in rundir.list_checkpoints(run_dir)] or ["none"]
    return (f"; {run_dir} holds checkpoints {', '.join(held)} (a run keeps its last "
            "--keep-last)")


def split_label(spec: str) -> tuple[str, str]:
    """(label, path) of a model spec ``[LABEL=]PATH``; the label is "" where none is given (an
    "=" after a "/" belongs to the path)."""
    label, sep, path_spec = spec.partition("=")
    if not sep or not label or "/" in label:
        return "", spec
    return label, path_spec


def _split_adapter(path_spec: str) -> tuple[str, str]:
    """(base, adapter) of ``BASE+ADAPTER``, split at the first "+" after a directory's name."""
    if not Path(path_spec).is_dir():
        for plus in (i for i, ch in enumerate(path_spec) if ch == "+"):
            if Path(path_spec[:plus]).is_dir() or hub.is_hub_id(path_spec[:plus]):
                return path_spec[:plus], path_spec[plus + 1 :]
    return path_spec, ""


def run_config_of(spec: str) -> dict | None:
    """The config.json of the run a ``[LABEL=]PATH`` spec names (the run, its export/, best/ or
    a checkpoint; BASE+ the run's export/); None where it names no run (an HF directory, a hub
    id, another adapter)."""
    _, path_spec = split_label(spec)
    _, adapter = _split_adapter(path_spec)
    path = Path(adapter or path_spec)
    if not path.is_dir():
        return None
    run_dir = rundir.run_of_weights(path) if adapter else (
        path if rundir.is_run_dir(path) else rundir.run_of_weights(path))
    if run_dir is None:
        return None
    return settings.read_json_object(run_dir / rundir.CONFIG_FILE, "run config")


def run_task(spec: str) -> str | None:
    """The task of the run a spec names (``run_config_of``); None where it names no run."""
    config = run_config_of(spec)
    return None if config is None else config.get("task", "lm")


def trained_task(directory: Path) -> str | None:
    """The task an HF checkpoint's config.json says codelm trained it on (None: it names none,
    or one this codelm lacks, said so: its prompts then start as a base checkpoint's)."""
    task = pretrained.trained_task(directory)
    if task is not None and task not in trainconfig.ALL_TASKS:
        print(f"warning: {directory / 'config.json'}: {pretrained.TASK_KEY} {task!r} is no "
              f"codelm task ({', '.join(trainconfig.ALL_TASKS)}): its prompts start as a base "
              "checkpoint's", file=sys.stderr)
        return None
    return task


def load_model(spec: str | os.PathLike, device: torch.device | str,
               tokenizer: str | None = None, dtype: str | None = None,
               what: str | None = None, unquantized: bool = False) -> LoadedModel:
    """Load ``[LABEL=]PATH``: an HF dir or hub id, a codelm run dir (or its export/, best/ or
    checkpoints/step-N/), an adapter whose config names its base, or ``BASE+ADAPTER``;
    ``device`` and ``dtype`` as EvalConfig's; ``what``: where the spec was given, for errors
    (default: eval.py's --models); ``unquantized``: a
    QLoRA run's base as its checkpoint holds it, not quantized, so its adapter merges in (as
    the run's export does)."""
    spec = os.fspath(spec)
    device = device_named(device) if isinstance(device, str) else device
    label, path_spec = split_label(spec)
    base_spec, adapter_spec = _split_adapter(path_spec)
    where = f"{what or '--models'} {spec!r}:"
    if path_spec.endswith("+") and not adapter_spec and not Path(path_spec).exists():
        raise ValueError(f"{where} BASE+ADAPTER without its adapter: name the adapter's "
                         "directory after the +, or drop the +")
    path = hub.checkpoint_dir(base_spec, where)
    if not path.is_dir():
        held = _checkpoints_held(path)
        if path.is_file():  # a model is a directory: its config.json's, where that is one
            held = ": give the directory that holds the model"
            if (path.parent / "config.json").is_file():
                held += f", {path.parent}"
        raise ValueError(f"{where} {path} is not a directory{held}")
    run_config = run_weights = task = None
    run_dir = None if adapter_spec else (path if rundir.is_run_dir(path)
                                         else rundir.run_of_weights(path))
    if run_dir is not None:  # a run (its export/ is the run's model), its best/ or a checkpoint
        chosen = None if path == run_dir or path.name == rundir.EXPORT_DIR else path
        model, tok_dir, run_config, run_weights = _load_run(
            run_dir, device, tokenizer, dtype, unquantized, chosen,
            as_run=path.name != rundir.EXPORT_DIR)
        named = run_dir.absolute().name
        label = label or (named if chosen is None else f"{named}-{path.name}")
    elif adapter_spec or (path / adapter_config.ADAPTER_CONFIG).is_file():
        adapter = hub.checkpoint_dir(adapter_spec, where) if adapter_spec else path
        if not (adapter / adapter_config.ADAPTER_CONFIG).is_file():
            swapped = bool(adapter_spec) and (path / adapter_config.ADAPTER_CONFIG).is_file()
            hint = (f": {path} is the adapter; give BASE+ADAPTER, {adapter_spec}+{base_spec}"
                    if swapped else adapter_config.adapters_below(adapter))
            raise ValueError(f"{where} {adapter} holds no {adapter_config.ADAPTER_CONFIG}{hint}")
        base = path if adapter_spec else adapter_config.adapter_base(
            path, "name the base as BASE+ADAPTER")
        if adapter_spec:
            _note_another_base(adapter, base)
        model = _load_hf(base, device, dtype, adapter)
        tok_dir = adapter if (adapter / "tokenizer.json").is_file() else base
        adapters_run = rundir.run_of_weights(adapter)
        if adapters_run is not None:  # a run's export/: named and scored as the run (its data)
            label = label or adapters_run.absolute().name
            run_dir = adapters_run
            run_config = settings.read_json_object(run_dir / rundir.CONFIG_FILE, "run config")
            run_weights = _run_weights(run_dir, adapter)
    elif (no_weights := rundir.no_weights_yet(path)) is not None:
        raise ValueError(f"{where} {no_weights}")
    elif (trials := _study_trials(path)) is not None:
        raise ValueError(f"{where} {path} is a hyperparam_tune study, not a model: its trials' "
                         f"runs are {trials} (trials.csv names each one's value); score those")
    else:
        task = trained_task(path)
        model = _load_hf(path, device, dtype)
        tok_dir = path
    if tokenizer is None and not (Path(tok_dir) / "tokenizer.json").is_file():
        raise ValueError(f"{where} no tokenizer.json in {tok_dir}"
                         f"{where_tokenizer_is(tok_dir)}; pass --tokenizer")
    if bad := checkpoint.nonfinite_tensor(model.state_dict()):
        raise ValueError(f"{where} {bad} holds inf or NaN: the model diverged; score a "
                         "checkpoint with finite weights")
    tok = load_tokenizer(tokenizer or tok_dir)
    own = Path(tok_dir) / "tokenizer.json"  # a run's: its own checks (_export_tokenizer)
    if tokenizer is not None and run_config is None and own.is_file():
        with contextlib.suppress(ValueError):  # one codelm cannot read: --tokenizer stands in
            if not same_vocabulary(tok, load_tokenizer(own)):
                print(f"warning: {where} --tokenizer {tokenizer} differs from {own}, the "
                      "model's own: its ids are read as the one given names them",
                      file=sys.stderr)
    if tok.vocab_size > model.cfg.vocab_size:
        raise ValueError(f"{where} the tokenizer has {tok.vocab_size} tokens, the model only "
                         f"{model.cfg.vocab_size} embeddings")
    # a checkpoint with a tokenizer from elsewhere; a run's own is the one it trained with (its
    # adapter on a base given beside it is checked against that base)
    if model.name_or_path is not None and (run_config is None or bool(adapter_spec)
                                           or tokenizer is not None):
        check_model_tokenizer(tok, tokenizer_path(tokenizer or tok_dir), model.name_or_path)
    name = label or Path(adapter_spec or base_spec).name
    return LoadedModel(name, path_spec, model.eval(), tok, run_config, run_weights, run_dir, task)


def build_model(model_settings: trainconfig.ModelSettings, tok: CodeTokenizer | BPETokenizer
                ) -> nn.Module:
    """From scratch or from ``init_from``; then the quantized base and LoRA if asked for (an
    init_adapter in the layout of ``model_settings.adapter_copy``, a continued run's copy)."""
    base_dtype = SHORT_DTYPES[model_settings.base_dtype]
    if model_settings.init_from is not None:
        model = pretrained.load(model_settings.init_from, dtype=base_dtype, device="cpu")
        if tok.vocab_size > model.cfg.vocab_size:
            raise ValueError(f"the tokenizer has {tok.vocab_size} tokens but the model at "
                             f"{model_settings.init_from} only {model.cfg.vocab_size} embeddings")
        if model_settings.dropout is not None:  # embeddings and residual branches, as from scratch
            model.cfg.dropout = model.cfg.embd_dropout = model_settings.dropout
        for key, value in model_settings.model_options.items():  # LOADED_MODEL_OPTIONS: read live
            setattr(model.cfg, key, value)
    else:
        model = Transformer(trainconfig.model_config(model_settings, tok.vocab_size, tok.bos_id,
                                                     tok.eos_id))
        model.to(base_dtype)
    if model_settings.lora_r > 0:
        _add_lora(model, model_settings)
    model.gradient_checkpointing = model_settings.gradient_checkpointing
    model.offload_activations = model_settings.offload_activations
    return model


def _add_lora(model: nn.Module, model_settings: trainconfig.ModelSettings) -> None:
    """The quantized base and the adapters: the run's own layout, the init_adapter's, or new."""
    if model_settings.quantize_bits:  # what modules_to_save trains whole stays unquantized
        kept = lora.whole_saved_paths(model, model_settings.lora_modules_to_save or ())
        quantize.quantize_base(model, bits=model_settings.quantize_bits, skip=("lm_head", *kept))
    layout = model_settings.adapter_copy
    if model_settings.init_adapter is not None and layout is not None:  # the weights: the run's
        lora.apply_adapter_layout(model, layout.parent, layout.name)
    elif model_settings.init_adapter is not None:  # its own config (with_init_adapter read it)
        if changed := lora.changed_base_tensors(model, model_settings.init_adapter):
            raise ValueError(
                f"init_adapter {model_settings.init_adapter}: its {changed[0]} (of {len(changed)}) "
                f"differs from the base's, {model_settings.init_from}; a resume and the export "
                "would lose it: save the merged base (PEFT: unload().save_pretrained), use "
                "--init-from")
        lora.load_adapter(model, model_settings.init_adapter)
    else:
        lora.apply_lora(model, adapter_config.lora_config(model_settings))
    if model_settings.init_adapter is not None:  # dropout, a training-time setting: the run's
        for _, module in lora.lora_modules(model):  # (plan.with_init_adapter chose it)
            if isinstance(module, lora.LoRALinear):
                module.dropout = model_settings.lora_dropout
        # the export's adapter_config.json records the dropout the run trained with
        model.lora_config = replace(model.lora_config, dropout=model_settings.lora_dropout)

