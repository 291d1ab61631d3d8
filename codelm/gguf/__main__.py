"""``python -m codelm.gguf RUN_OR_DIR OUT.gguf [--outtype f32|f16|bf16|q8_0]`` (installed:
``codelm-export-gguf``): any model eval.py loads (an HF checkpoint directory, a run: its export,
best/ or last checkpoint, an adapter naming its base, or BASE+ADAPTER), loaded as eval.py loads it
and written as GGUF with its Ollama Modelfile by codelm.gguf.writer (LoRA merged)."""

from __future__ import annotations

if __name__ == "__main__":  # first, as in every script: the imports below take a while
    from codelm.runtime import process

    process.quiet_start_up_stops()

import os
import sys
from pathlib import Path

from codelm import loading
from codelm.gguf import writer
from codelm.models import families
from codelm.runs import rundir
from codelm.runtime import process, settings


def export(source: str, out: Path, outtype: str, tokenizer: str | None = None,
           runs_dir: str | Path = "runs") -> Path:
    """Load ``source`` as eval.py does (a run's name alone: the run under ``runs_dir``), write
    ``out`` and its Modelfile beside it."""
    out = Path(out).expanduser()
    if out.is_dir():
        raise ValueError(f"{out}: a directory; name the file to write in it, "
                         f"{out / 'NAME.gguf'}")
    if out.suffix != ".gguf":
        raise ValueError(f"{out}: name the output file NAME.gguf")
    existing = next(folder for folder in (out.parent.absolute(), *out.parent.absolute().parents)
                    if folder.exists())  # the root, at worst
    if not existing.is_dir():
        raise ValueError(f"{out}: {existing} is a file, not a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"{out}: cannot write into {existing} (permission denied); name a "
                         "directory you can write")
    if "+" not in source:  # BASE+ADAPTER names its parts as they are
        source = rundir.run_or_path(source, runs_dir)
    loaded = loading.load_model(source, "cpu", tokenizer=tokenizer, dtype="fp32",
                                what="export-gguf", unquantized=True)
    writer.check_exportable(loaded.model, loaded.tokenizer)
    out.parent.mkdir(parents=True, exist_ok=True)  # as a run's --out-dir is made
    fim = True  # a checkpoint that is no run's: its own training may hold it
    if loaded.run_config is not None:
        fim = writer.fills_in_middle(loaded.run_config.get("task", "lm"),
                                     loaded.run_config.get("init_from"),
                                     loaded.run_config.get("data_options", {}))
    return writer.save(loaded.model, loaded.tokenizer, out, outtype, name=loaded.label,
                       prompt_start=loaded.prompt_start, fill_in_middle=fim)


def main(argv: list[str] | None = None) -> int:
    parser = settings.ArgumentParser(
        prog="python -m codelm.gguf",
        description="Write a model as GGUF for llama.cpp, Ollama and LM Studio: an HF checkpoint "
        "directory, a codelm run (its export, best/ or last checkpoint, LoRA merged), an adapter "
        "whose config names its base, or BASE+ADAPTER; an Ollama Modelfile goes beside it.")
    parser.add_argument("source", help="the model (RUN_OR_DIR)")
    parser.add_argument("out", help="the file to write, NAME.gguf")
    parser.add_argument("--outtype", choices=families.OUTTYPES, default="f16",
                        help="tensor type of the matrices (default: f16); vectors stay f32")
    parser.add_argument("--tokenizer", default=None,
                        help="a tokenizer.json (or its directory) where the source has none")
    parser.add_argument("--runs-dir", default="runs",
                        help="where a run named alone is found (default: runs)")
    args = parser.parse_args(argv)

    def run() -> None:
        path = export(args.source, Path(args.out), args.outtype, args.tokenizer, args.runs_dir)
        print(writer.ollama_hint(path, args.outtype))

    return process.run_tool(run, "interrupted: nothing written")


if __name__ == "__main__":
    sys.exit(process.run_main(main))
