"""The end of a training run: its best weights exported (the HF layout, or the PEFT adapter and
the merged model; with export_gguf a GGUF file too) with a sample completion, and the final
evaluation of the export."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import re
import shutil
import typing
from collections.abc import Sequence
from functools import partial
from pathlib import Path

import torch
import torch.nn as nn
from safetensors.torch import load_file

import eval as evaluation
import lora
from codelm import loading
from codelm.data.encoding import (
    encode_prompts,
    fit_prompt,
    prompt_prefix,
    reads_special_tokens,
    template_writes_start,
)
from codelm.data.examples import SamplePrompt, stop_ids_of
from codelm.evaluation.results import OtherEvaluation
from codelm.evaluation.tasks.text import GENERATION_EXAMPLES, NoExamples
from codelm.gguf import writer
from codelm.models import generation, pretrained
from codelm.models.generation import FUNCTION_STOPS, GenerationConfig, truncate_at_stops
from codelm.runs import checkpoint, rundir
from codelm.runs.checkpoint import load_model_tensors, write_dir_atomically
from codelm.runs.rundir import best_step
from codelm.runtime import distributed, process
from codelm.runtime.console import blank_text
from codelm.runtime.settings import read_json_object
from codelm.trainconfig import GRPO_TASK, ExportSettings
from codelm.training.build import Run
from codelm.training.record import NonFiniteLossError
from codelm.training.trainer import best_quality

if typing.TYPE_CHECKING:
    from codelm.tokenization.bpe import BPETokenizer
    from tokenizer import CodeTokenizer


BLANK_RUN = re.compile(r"(?:[ \t]*\n){3,}")  # three or more line ends with only blanks between
# A line written again three or more times in a row (a loop of an undertrained model).
REPEATED_LINE = re.compile(r"^([^\n]*\S[^\n]*\n)(?:\1){2,}", re.MULTILINE)
PROMPT_LINES_SHOWN = 6  # the sample prompt's last lines the console shows before the sample
PARTIAL_LINE_SHOWN = 80  # of a prompt's last line, unended, the end repeated before the sample
# The tasks whose sample prompt is a held-out Python function (the others' are their examples').
CODE_PROMPTED = ("lm", "fim", "completion", "project")


def shown_sample(prompt: str, sample: str, weights: str) -> str:
    """A prompt's last PROMPT_LINES_SHOWN lines and its sample as the console shows them, each
    under a line that says what it is; the sample's runs of two or more blank lines as one line
    that counts them, and a line written three or more times in a row as once and a count (an
    undertrained model writes newlines, or one line, by the screenful), a sample of whitespace
    alone as its length. A prompt that ends within a line has that line's end
    (PARTIAL_LINE_SHOWN characters at most) repeated before the sample."""
    def counted(run: re.Match) -> str:
        return f"\n[{run.group().count(chr(10)) - 1} blank lines]\n"

    def once(run: re.Match) -> str:
        line = run.group(1)
        return f"{line}[the line above {run.group().count(chr(10)) - 1} more times]\n"

    lines = prompt.split("\n")
    ended = lines.pop()  # the text after the last line end: a line the sample continues
    if ended:
        lines.append(ended)
    heading = "sample prompt"
    if len(lines) > PROMPT_LINES_SHOWN:
        heading += f" (its last {PROMPT_LINES_SHOWN} of {len(lines)} lines)"
    shown = "\n".join(lines[-PROMPT_LINES_SHOWN:])
    completion = ended[-PARTIAL_LINE_SHOWN:] + sample
    if (blank := blank_text(sample)) is not None:
        completion = f"[{blank}]"
    continued = ", after the prompt's last line repeated" if ended and sample.strip() else ""
    return (f"{heading}:\n{shown}\nsample completion (greedy, {weights}{continued}):\n"
            f"{REPEATED_LINE.sub(once, BLANK_RUN.sub(counted, completion))}")


def export_run(run: Run) -> tuple[Path | None, str | None]:
    """Best weights back in the model, a sample completion, the HF export (rank 0); the export's
    directory and the sample."""
    settings, model, tok, record = run.export, run.trainer.raw_model, run.data.tok, run.record
    run_dir = record.run_dir
    if distributed.is_sharded(model):
        model = unsharded_copy(run)
        if model is None:
            return None, None
    best = run_dir / rundir.BEST_DIR / checkpoint.weights_file(record.trainable_only)
    exported_step = None
    if best.is_file():
        if problem := process.manifest_problem(best.parent):  # never export weights unchecked
            raise ValueError(f"{best.parent}: {problem}: not exported (rename it to "
                             f"broken-best; --resume {run_dir} then exports the last weights)")
        load_model_tensors(model, load_file(best), str(best), record.trainable_only)
        exported_step = best_step(run_dir)
    if not record.dist.main:
        return None, None
    if bad := checkpoint.nonfinite_tensor(model.state_dict()):  # export/ holds finite weights
        raise NonFiniteLossError(f"{bad} holds inf or NaN: not exported", run.state.step)
    prompt = run.data.sample_prompt  # --sample-prompt, else the held-out one in the task's format
    if settings.sample_prompt is not None:
        prompt = SamplePrompt(settings.sample_prompt,
                              settings.task in ("lm", "fim", "completion", "method"))
    sample = None
    if prompt is not None and prompt.text and settings.sample_tokens > 0:
        stops = FUNCTION_STOPS if prompt.ends_function else ()
        tokens = settings.sample_tokens
        if settings.task == GRPO_TASK:  # as long as the completions it trained on, at most
            tokens = min(tokens, settings.max_completion_tokens)
        sample = sample_completion(model, tok, prompt.text, tokens, settings.task,
                                   run.data.dcfg.pair_special_tokens, stops)
        weights = (f"best checkpoint at step {exported_step}" if exported_step is not None
                   else f"the last weights, step {run.state.step}")
        print(shown_sample(prompt.text, sample, weights))
    elif prompt is None and settings.sample_tokens > 0 and settings.task in CODE_PROMPTED:
        print("no sample: the held-out data holds no code to prompt with (a Python function's "
              "header, another language's opening of a block); --sample-prompt TEXT gives one")
    export = run_dir / rundir.EXPORT_DIR

    def write(tmp: Path) -> None:
        if settings.lora_r == 0:
            pretrained.save(model, tmp, task=settings.task)
        else:  # on init_from (validate_config): the adapter, naming that base
            base = str(Path(settings.init_from).resolve())  # as PEFT records it: loadable alone
            lora.save_adapter(model, tmp, base_model_name_or_path=base)
            if settings.export_merged:  # as `python lora.py` merges: into the base on disk, in
                # the checkpoint's own dtype (a bf16 base: bf16, not the fp32 training copy)
                merged = pretrained.load(settings.init_from, dtype="auto", device="cpu")
                lora.load_adapter(merged, tmp)
                lora.merge_and_export(merged, tmp / rundir.MERGED_DIR, task=settings.task)
                tok.save(tmp / rundir.MERGED_DIR)
                pretrained.copy_hf_companions(settings.tokenizer, settings.init_from, tok,
                                               tmp / rundir.MERGED_DIR, weights=True)
                if settings.task == "chat":
                    pretrained.stop_at_end_of_turn(tok, tmp / rundir.MERGED_DIR)
        tok.save(tmp)
        pretrained.copy_hf_companions(settings.tokenizer, settings.init_from, tok, tmp,
                                      weights=settings.lora_r == 0)
        if settings.task == "chat" and settings.lora_r == 0:
            pretrained.stop_at_end_of_turn(tok, tmp)
        if settings.export_gguf is not None:
            write_gguf(settings, model, tok, tmp, run_dir.name)
        # Which best/ it holds: eval.py scores best/ instead once a resume trains past it.
        (tmp / rundir.EXPORT_RECORD).write_text(json.dumps({"best_step": exported_step}))

    write_dir_atomically(export, write)
    if exported_step is None:
        print(f"exported to {export}: the last weights, step {run.state.step}")
    else:
        best_loss = run.state.best_val_loss
        print(f"exported to {export}: {best_quality(settings.task, best_loss)} at step "
              f"{exported_step}")
    if settings.export_gguf is not None:
        merged_into = settings.init_from if settings.lora_r > 0 else None
        print(writer.ollama_hint(export / rundir.GGUF_FILE, settings.export_gguf, merged_into))
    return export, sample


def write_gguf(settings: ExportSettings, model: nn.Module, tok: CodeTokenizer | BPETokenizer,
               export: Path, name: str) -> Path:
    """``export``/model.gguf and its Modelfile, of the model the export holds: ``model`` itself,
    or under LoRA the adapter just written there merged into its base (fp32, on the CPU), as
    ``python -m codelm.gguf`` loads a LoRA run's export."""
    if settings.lora_r > 0:
        model = pretrained.load(settings.init_from, dtype="fp32", device="cpu")
        lora.load_adapter(model, export)
    return writer.save(model, tok, export / rundir.GGUF_FILE, settings.export_gguf, name,
                       prompt_prefix(tok, settings.task), settings.progress,
                       writer.fills_in_middle(settings.task, settings.init_from,
                                               settings.data_options))


def unsharded_copy(run: Run) -> nn.Module | None:
    """The run's sharded model gathered whole into a model of its own on rank 0, built as the
    run built it (collective; None on the other ranks): export and generation run on it."""
    tensors = checkpoint.gathered_tensors(run.trainer.raw_model, trainable_only=False)
    if not run.record.dist.main:
        return None
    built_as = dataclasses.replace(run.model_settings,
                                   adapter_copy=rundir.adapter_copy(run.record.run_dir))
    model = loading.build_model(built_as, run.data.tok)
    load_model_tensors(model, tensors, "the gathered model", trainable_only=False)
    return model


def sample_completion(model: nn.Module, tok: CodeTokenizer | BPETokenizer, prompt: str,
                      max_new_tokens: int, task: str, pair_special_tokens: bool = False,
                      stops: Sequence[str] = ()) -> str:
    """Greedy continuation of ``prompt``, formatted and encoded as the run's ``task`` data, cut
    at the first of ``stops`` (eval's decoding)."""
    from tokenizer import decode_generated, generation_eos_ids

    eos = stop_ids_of(tok, generation_eos_ids(tok, model.cfg.eos_id, model.name_or_path), task)
    if template_writes_start(task):  # a chat template's text, read as it is
        prefix, prompt_ids = [], tok.encode(prompt)
    else:
        reads = reads_special_tokens(task, pair_special_tokens)
        (prompt_ids,) = encode_prompts(tok, [prompt], reads)
        prefix = prompt_prefix(tok, task)
    block = model.cfg.block_size
    room = block - len(prefix) - min(max_new_tokens, block // 2)  # the prompt's, at most
    if len(prompt_ids) > room:  # its left end cut, as eval.py cuts a prompt too long
        print(f"note: the sample prompt is {len(prompt_ids)} tokens: its first "
              f"{len(prompt_ids) - room} are cut so that the {block}-token context leaves room "
              "for the completion")
        prompt_ids = fit_prompt(prompt_ids, room)
    ids = prefix + prompt_ids
    max_new_tokens = min(max_new_tokens, block - len(ids))
    if max_new_tokens <= 0:
        return ""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    out = generation.generate(model, torch.tensor([ids], device=device),
                              GenerationConfig(max_new_tokens, eos_id=eos or None,
                                               stop=list(stops) or None,
                                               decode=partial(decode_generated, tok)))
    model.train(was_training)
    new = out[0, len(ids):].tolist()
    end = len(new)
    for i, token in enumerate(new):  # the first end-of-sequence token ends the completion
        if token in eos:
            end = i
            break
    text = decode_generated(tok, new[:end])
    return truncate_at_stops(text, stops)


# A budgeted run's final evaluation keeps to the budget's share for it (budget.FINAL_EVAL_SHARE):
# its examples a task scale with the budget, eval.py's GENERATION_EXAMPLES at
# FINAL_EVAL_BUDGET_MIN and above, at least FINAL_EVAL_FEWEST.
FINAL_EVAL_BUDGET_MIN = 15.0
FINAL_EVAL_FEWEST = 10


def final_eval_limit(time_budget_min: float | None) -> int | None:
    """The examples a task of a run's final evaluation scores: scaled to a budget shorter than
    FINAL_EVAL_BUDGET_MIN; None (eval.py's 100) for a longer one, or a run of steps or
    epochs (``time_budget_min`` None)."""
    if time_budget_min is None or time_budget_min >= FINAL_EVAL_BUDGET_MIN:
        return None
    share = time_budget_min / FINAL_EVAL_BUDGET_MIN
    return max(FINAL_EVAL_FEWEST, round(GENERATION_EXAMPLES * share))


def _evaluated(run_dir: Path, tasks: list[str], out: Path, device: str,
               limit: int | None) -> dict:
    """The run's export scored on ``tasks`` into ``out`` (``limit`` examples a task, None:
    eval.py's): an interrupted evaluation of these weights goes on where it stopped, one of
    weights the run has since replaced (resumed, exported anew) is done again."""
    cfg = evaluation.EvalConfig(models=[str(run_dir)], tasks=tasks, out_dir=str(out),
                                progress=False, device=device, limit=limit)
    try:
        return evaluation.evaluate(cfg)["rows"][0]["metrics"]
    except OtherEvaluation:
        shutil.rmtree(out)
        return evaluation.evaluate(cfg)["rows"][0]["metrics"]


def _recorded_limit(out: Path) -> int | None:
    """The examples a task an earlier final evaluation in ``out`` scored, where its time budget
    sized them; None where none did."""
    try:
        results = read_json_object(out / "results.json", "evaluation results")
    except (ValueError, OSError):  # none yet, or unreadable: the evaluation says so itself
        return None
    return results.get("config", {}).get("limit")


def final_quality(run_dir: Path, last: dict | None, device: str,
                  limit: int | None = None) -> dict | None:
    """A finished run's export scored as ``python eval.py --tasks line method`` scores it (the
    test split, ``limit`` examples a task: final_eval_limit, or an earlier final evaluation's,
    eval.py's --limit; ``line`` alone, noted, where
    method finds no function in it: other languages' files, text records, scripts,
    docstrings stripped), printed with the validation metrics of the weights it holds:
    best/'s step's, else ``last`` (the last weights'); an evaluation that cannot run is only
    noted."""
    step = rundir.exported_step(run_dir)
    if step is not None:
        last = rundir.evaluation_at(run_dir / rundir.METRICS_FILE, step)
    out = run_dir / rundir.FINAL_EVAL_DIR
    limit = limit or _recorded_limit(out)  # a resumed run keeps its budget's size
    sized = "" if limit is None else f", {limit} examples each, sized to the time budget"
    print(f"scoring the export: line and function completion{sized} (--no-final-eval skips "
          "it)", flush=True)
    try:
        try:
            metrics = _evaluated(run_dir, ["line", "method"], out, device, limit)
        except NoExamples as e:
            if e.task != "method":
                raise
            print(f"note: line completion alone: {e}")
            with contextlib.redirect_stdout(io.StringIO()):  # its data line, said once already
                metrics = _evaluated(run_dir, ["line"], out, device, limit)
    except ValueError as e:
        print(f"note: no final evaluation: {e}")
        return None
    val = ""
    if last is not None:  # scored on the examples --eval-examples takes: its tokens said
        tokens = f" over {last['val_tokens']:,} validation tokens" if "val_tokens" in last else ""
        val = f"val loss {last['val_loss']:.4f} ({last['val_bpb']:.3f} bits/byte{tokens}), "
    parses = ("" if "method/parses" not in metrics else
              f"; function completions that parse {metrics['method/parses']:.0f}%")
    scored = "" if limit is None else f", {limit} examples a task"
    print(f"final evaluation ({out}{scored}): {val}line completion exact match "
          f"{metrics['line/EM']:.1f}%, edit similarity {metrics['line/edit_sim']:.1f}{parses}")
    return metrics


