"""Hugging Face hub ids (``org/name[@revision]``) where a local directory may be given: which
specs are ids, and the local snapshot of one."""

from __future__ import annotations

import re
from pathlib import Path

_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+(@[\w./-]+)?")
_NOT_PYTORCH = ["*.msgpack", "*.h5", "*.ot", "*.onnx", "*.tflite", "*.gguf", "onnx/*", "*.mlmodel"]


def is_hub_id(spec: str | Path) -> bool:
    """Whether ``spec`` names a Hugging Face repo (``org/name[@revision]``), not a local path:
    one whose directory exists here (``runs/nme``, ``models/x``) is a path, mistyped or not."""
    path = Path(spec).expanduser()
    if path.exists() or path.parent.is_dir() and path.parent != Path("."):
        return False
    return _HUB_ID.fullmatch(str(spec)) is not None


def checkpoint_dir(spec: str | Path, what: str = "checkpoint", repo_type: str = "model",
                   local: str = "a local directory") -> Path:
    """A local directory, or else the snapshot of a Hugging Face id ``org/name[@revision]`` (a
    model's, or with ``repo_type="dataset"`` a dataset's): from the hub cache when there or
    offline (``HF_HUB_OFFLINE=1``), else downloaded into it. ``local``: what the error offers
    in place of the id."""
    if not is_hub_id(spec):
        return Path(spec).expanduser()
    from huggingface_hub import snapshot_download

    repo, _, revision = str(spec).partition("@")
    try:
        return Path(snapshot_download(repo, revision=revision or None, repo_type=repo_type,
                                      ignore_patterns=_NOT_PYTORCH))
    except Exception as e:  # not cached while offline, no such repo, no network: many types
        why = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"{what} {spec}: no such directory, and no Hugging Face snapshot of "
                         f"{repo} ({why}); download it (`hf download {repo}"
                         f"{' --repo-type dataset' if repo_type == 'dataset' else ''}`) or give "
                         f"{local}") from None


def snapshot_of(path: str | Path) -> tuple[str, str] | None:
    """(repo id, commit) where ``path`` is a model's snapshot in the Hugging Face hub cache
    (``.../models--ORG--NAME/snapshots/COMMIT``: the hub forbids "--" in names), else None."""
    path = Path(path)
    repo = path.parent.parent.name.split("--")
    if path.parent.name != "snapshots" or len(repo) != 3 or repo[0] != "models":
        return None
    return f"{repo[1]}/{repo[2]}", path.name
