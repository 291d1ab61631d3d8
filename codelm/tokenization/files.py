"""The tokenizer file: where a path names it, reading it, writing it (beside its
tokenizer_config.json), the refusal of a component codelm does not read, and a JSON value shown
short in a refusal."""

from __future__ import annotations

import json
import os
from pathlib import Path

from codelm.runtime import settings

TOKENIZER_FILE = "tokenizer.json"


def read_json(path: Path) -> dict:
    return settings.read_json_object(path, "tokenizer file")


def write_tokenizer(path: str | os.PathLike, data: dict, indent: int, config: dict | None = None,
                     replace_config: bool = False) -> Path:
    """Write ``data`` to ``path``: a file named ``*.json`` (or one there already), else into a
    directory (made if need be, as transformers' save_pretrained makes one), as tokenizer.json
    beside a tokenizer_config.json of ``config`` (one there is kept unless ``replace_config``)."""
    path = Path(path)
    into_directory = path.is_dir() or (not path.exists() and path.suffix != ".json")
    if into_directory:
        path = path / TOKENIZER_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, ensure_ascii=False, indent=indent), "utf-8")
    config_file = path.parent / "tokenizer_config.json"
    if into_directory and config is not None and (replace_config or not config_file.exists()):
        config = {"tokenizer_class": "PreTrainedTokenizerFast", **config}
        config_file.write_text(json.dumps(config, ensure_ascii=False, indent=2), "utf-8")
    return path


class Unsupported(ValueError):
    """A tokenizer.json component codelm does not read."""


def expect(cond: bool, where: str, what: str) -> None:
    """Refuse the component ``where`` (``what`` it holds) unless ``cond``."""
    if not cond:
        raise Unsupported(f"unsupported {where}: {what}")


def shown_json(value: object, limit: int = 60) -> str:
    """A JSON value cut short for an error message: a Split regex runs to 200 characters."""
    text = json.dumps(value, ensure_ascii=False)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def tokenizer_path(path: str | os.PathLike) -> Path:
    """The tokenizer file ``path`` names (a directory's tokenizer.json)."""
    path = Path(path)
    if not path.is_dir():
        return path
    if not (path / TOKENIZER_FILE).exists() and all(
            (path / name).is_file() for name in ("vocab.json", "merges.txt")):
        raise ValueError(
            f"{path}: holds vocab.json and merges.txt (the slow tokenizer format) but no "
            f"{TOKENIZER_FILE}, the file codelm reads; write one with transformers: "
            f"AutoTokenizer.from_pretrained({str(path)!r}).save_pretrained({str(path)!r}) "
            "(GPT2TokenizerFast in place of AutoTokenizer where it cannot tell the class)")
    return path / TOKENIZER_FILE
