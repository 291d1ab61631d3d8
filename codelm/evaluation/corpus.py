"""The corpus an evaluation's text tasks score: the runs' own data (so their held-out split) unless
``--data`` names other, as a DataConfig; and its split's documents loaded."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Sequence
from dataclasses import fields
from pathlib import Path
from typing import Protocol

from codelm.data.config import NO_CORPUS_TASKS, SPLITS, DataConfig
from codelm.data.shards import describe_corpus
from codelm.data.sources import Doc
from codelm.data.splits import corpus_key, load_corpus
from codelm.loading import LoadedModel
from codelm.runs import checkpoint, rundir
from codelm.runtime import settings


class CorpusSettings(Protocol):
    """What choosing and loading the corpus reads of an evaluation's settings (EvalConfig and
    TaskSettings have each)."""

    data: list[str] | None
    data_options: dict
    split: str
    progress: bool


def corpus_runs(models: Sequence[LoadedModel]) -> list[LoadedModel]:
    """The models that are runs trained on a corpus's documents (not on problems or preference
    records: NO_CORPUS_TASKS)."""
    return [m for m in models
            if m.run_config and m.run_config.get("task", "lm") not in NO_CORPUS_TASKS]


def corpus_config(cfg: CorpusSettings, models: Sequence[LoadedModel]) -> DataConfig:
    """The data whose split is evaluated: the runs' own (held-out) unless ``data`` is given."""
    configs = {m.label: _corpus_config(cfg, m.run_config, str(m.run_dir / rundir.CONFIG_FILE))
               for m in corpus_runs(models)}
    keys = {label: corpus_key(c) for label, c in configs.items()}
    if cfg.data is None and len(set(keys.values())) > 1:
        raise ValueError(f"the runs {', '.join(configs)} were trained on different corpora or "
                         "splits, so no split is held out from all of them; name the data every "
                         "model is scored on with --data (and --data-options)")
    if cfg.data is None:
        for m in corpus_runs(models):
            if trained_corpus(m.run_dir) not in (None, keys[m.label]):
                print(f"warning: {m.label}: its data changed after it trained (files added, "
                      "removed or edited, or other cleaning options): the "
                      f"{getattr(cfg, 'split', 'held-out')} split may hold files it trained "
                      "on", file=sys.stderr)
    return next(iter(configs.values())) if configs else _corpus_config(cfg, None)


def trained_corpus(run_dir: Path) -> str | None:
    """The corpus key a run's newest checkpoint trained on (None: not recorded)."""
    for path in reversed(rundir.list_checkpoints(run_dir)):
        with contextlib.suppress(checkpoint.CorruptCheckpointError):
            data = checkpoint.read_state(path, mmap=True).data or {}
            return data.get("corpus")
    return None


def run_data_options(run: dict) -> dict:
    """The data options of a run's config.json that its corpus is read with here, below
    ``--data-options`` (not the task, block size or progress bars it trained with)."""
    known = {f.name for f in fields(DataConfig)} - {"task", "block_size", "progress"}
    return {k: v for k, v in (run.get("data_options") or {}).items() if k in known}


def _corpus_config(cfg: CorpusSettings, run: dict | None, run_source: str = "run config"
                   ) -> DataConfig:
    run = run or {}
    options = run_data_options(run)
    if run and cfg.data is None:  # the run's predefined splits shape its split too
        try:
            checkpoint.check_run_paths(run, ["data", "val_data", "test_data"], run_source)
        except ValueError as err:
            raise ValueError(f"{err}: the data the run trained on moved or is gone; --data "
                             "names the data to score") from None
        options.update(val_sources=list(run.get("val_data") or []),
                       test_sources=list(run.get("test_data") or []))
    options.update(cfg.data_options, sources=list(cfg.data or run.get("data") or ["stdlib"]),
                   progress=cfg.progress)
    return settings.config_from_dict(DataConfig, options, "data_options")  # errors name the key


def split_documents(cfg: CorpusSettings, models: Sequence[LoadedModel]
                    ) -> tuple[Sequence[Doc], DataConfig]:
    """The documents of ``cfg.split`` of the corpus scored (``all``: every one), and its
    DataConfig, a line saying which part of the data it is."""
    data_cfg = corpus_config(cfg, models)
    corpus = load_corpus(data_cfg)
    runs_own = cfg.data is None and bool(corpus_runs(models))
    if not runs_own:
        print(f"data: {describe_corpus(corpus.stats, splits=cfg.split != 'all')}")
    if cfg.split == "all":
        docs = [doc for split in SPLITS for doc in getattr(corpus, split)]
        if runs_own:
            print("note: --split all scores every document, those the runs trained on too",
                  file=sys.stderr)
        else:
            documents = "document" if len(docs) == 1 else "documents"
            print(f"data: scoring all {len(docs)} {documents} of {', '.join(data_cfg.sources)} "
                  "(--split all)")
        return docs, data_cfg
    docs = getattr(corpus, cfg.split)
    if runs_own:  # the table's figures are of this split (training's val_loss is of val)
        hint = "" if cfg.split == "val" else " (--split val scores the one they validated on)"
        documents = "document" if len(docs) == 1 else "documents"
        print(f"data: scoring the {cfg.split} split of the runs' own data, {len(docs)} "
              f"{documents}{hint}")
    else:
        unit = corpus.stats["split_by"]
        print(f"data: scoring the {cfg.split} split of {', '.join(data_cfg.sources)}: "
              f"{len(docs)} of {sum(corpus.stats['split'].values())} documents (train_frac "
              f"{data_cfg.train_frac:g}, val_frac {data_cfg.val_frac:g}, test_frac "
              f"{data_cfg.test_frac:g} by {unit}, seed {data_cfg.seed}; --split all scores "
              "every document)")
        if held_out := _held_out_by(cfg.data or [], models):
            print(f"note: {held_out}", file=sys.stderr)
    return docs, data_cfg


def _held_out_by(data: Sequence[str], models: Sequence[LoadedModel]) -> str:
    """Which of ``data`` a run held out whole (its --val-data or --test-data), with the run and
    the way to score all of it ("" for none): a split of it scores a part of it alone."""
    given = {Path(source).resolve(): source for source in data}
    for m in models:
        for key in ("val_data", "test_data"):
            for source in (m.run_config or {}).get(key) or []:
                named = given.get(Path(source).resolve())
                if named is not None:
                    split = key.removesuffix("_data")
                    return (f"{named} is {m.label}'s {settings.flag_of(key)}, held out whole: "
                            f"--split all scores all of it (or --split {split} without --data)")
    return ""
