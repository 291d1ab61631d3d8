"""HF checkpoints <-> codelm `Transformer` through the family tables of codelm.models.families:
load and save that never hold two copies of the weights, new checkpoint directories, and the
convert command (``python -m codelm.models.pretrained SRC OUT``)."""

from __future__ import annotations

if __name__ == "__main__":  # first: the imports below load torch for seconds
    from codelm.runtime import process

    process.quiet_start_up_stops()

import contextlib
import json
import os
import re
import shutil
import sys
import zipfile
from collections.abc import Callable
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import BinaryIO

import torch
from safetensors import SafetensorError, safe_open

from architecture import SHORT_DTYPES, ModelConfig, Transformer, cuda_half_dtype
from codelm.models.families import (
    TABLES,
    FamilyTable,
    expand,
    hf_config,
    part_rows,
    read_config,
)
from codelm.runs import rundir
from codelm.runtime import process, settings
from codelm.runtime.hub import checkpoint_dir
from codelm.tokenization.bpe import BPETokenizer
from codelm.tokenization.chat import ChatTokenizer, end_of_turn_ids
from codelm.tokenization.files import tokenizer_path

# ------------------------------------------------------------------------- weight plan

def _param_plan(model: Transformer, table: FamilyTable):
    """codelm parameter -> [(HF tensor name, rows)], for every parameter of the model."""
    cfg = model.cfg
    params = dict(model.named_parameters(remove_duplicate=False))
    modules = dict(model.named_modules(remove_duplicate=False))
    plan: dict[str, list[tuple[str, torch.Tensor | None]]] = {}
    for hf, (path, part) in expand(table, cfg).items():
        if path in modules and f"{path}.weight" not in params:
            raise ValueError(f"{path} is a {type(modules[path]).__name__} without a full-precision "
                             "weight: export LoRA with lora.merge_and_export or save_adapter")
        rows = part_rows(cfg, part)
        for suffix in ("weight", "bias"):
            name = f"{path}.{suffix}"
            if name in params:
                plan.setdefault(name, []).append((f"{hf}.{suffix}", rows))
    assert set(plan) == set(params), set(params) - set(plan)  # hf_config checked the layout
    return plan


# ------------------------------------------------------------------------- readers

SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16,
                      "BF16": torch.bfloat16, "I64": torch.int64, "I32": torch.int32,
                      "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
                      "BOOL": torch.bool}
DTYPE_NAMES = {v: k for k, v in SAFETENSORS_DTYPES.items()}


class SafetensorsFile:
    """A safetensors file (checked by safetensors): tensors as copy-on-write views of its map,
    or read into a given buffer, so no page is both mapped and copied."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            self._file = safe_open(path, "pt")
        except SafetensorError as e:
            raise ValueError(f"{path}: truncated or corrupt safetensors file ({e})") from None
        self.metadata = self._file.metadata() or {}
        with open(path, "rb") as f:  # the offsets, for read_into
            n = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(n))
        header.pop("__metadata__", None)
        self.entries: dict[str, int] = {}  # tensor name -> where its data starts
        for name, e in header.items():
            if e["dtype"] not in SAFETENSORS_DTYPES:
                raise ValueError(f"{path}: tensor {name!r} has dtype {e['dtype']}, which codelm "
                                 f"does not load (supported: {', '.join(SAFETENSORS_DTYPES)})")
            self.entries[name] = 8 + n + e["data_offsets"][0]

    def view(self, name: str) -> torch.Tensor:
        return self._file.get_tensor(name)

    def read_into(self, name: str, out: torch.Tensor) -> None:
        """Read the tensor into a contiguous CPU tensor of its dtype (through the page cache)."""
        with open(self.path, "rb") as f:
            f.seek(self.entries[name])
            f.readinto(memoryview(out.view(-1).view(torch.uint8).numpy()))


def read_bin(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a pickled weights file, read with weights_only (a pickle runs code)."""
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True,
                        mmap=zipfile.is_zipfile(path))  # the pre-zip format cannot be mapped
    except Exception as e:  # zip/pickle errors of a damaged file come in many types
        if found := re.search(r"GLOBAL (\S+)", str(e)):  # torch's safe loader refused it
            raise ValueError(f"{path}: refused: the pickle holds objects other than tensors "
                             f"({found.group(1)}), which a pickle may only load by running "
                             "code; use the model's safetensors weights") from None
        raise ValueError(f"{path}: truncated or corrupt weights file ({type(e).__name__})"
                         ) from None
    if not isinstance(sd, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                           for k, v in sd.items()):
        raise ValueError(f"{path}: expected a state dict (names -> tensors)")
    return sd


# A checkpoint's weights, in the order the loader looks for them.
MODEL_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                      "pytorch_model.bin.index.json")


class TensorSource:
    """Name -> tensor over one or several files (safetensors, sharded, or pytorch .bin)."""

    def __init__(self, directory: Path) -> None:
        self.tensors: dict[str, torch.Tensor] = {}  # safetensors': views of the (unread) map
        self.files: dict[str, SafetensorsFile] = {}  # the safetensors file of a name
        self.origin: dict[str, Path] = {}  # the file each tensor is in (for messages)
        found = next((directory / f for f in MODEL_WEIGHT_FILES if (directory / f).exists()), None)
        if found is None:
            raise ValueError(f"{directory}: no weights (model.safetensors, "
                             "model.safetensors.index.json, pytorch_model.bin or its index)")
        paths = self._shards(found) if found.name.endswith(".index.json") else [found]
        self.first_file = min(paths)  # where transformers' dtype="auto" looks
        for path in paths:
            if path.suffix == ".safetensors":
                f = SafetensorsFile(path)
                self.files.update(dict.fromkeys(f.entries, f))
                tensors = {name: f.view(name) for name in f.entries}
            else:
                tensors = read_bin(path)
            self.tensors.update(tensors)
            self.origin.update(dict.fromkeys(tensors, path))

    @staticmethod
    def _shards(index: Path) -> list[Path]:
        weight_map = settings.read_json_object(index, "shard index").get("weight_map")
        if not isinstance(weight_map, dict) or not all(isinstance(f, str)
                                                       for f in weight_map.values()):
            raise ValueError(f"{index}: expected a weight_map object of tensor names -> shard "
                             "file names; download or save the checkpoint again")
        shards = [index.parent / f for f in dict.fromkeys(weight_map.values())]
        if missing := [str(s) for s in shards if not s.exists()]:
            raise ValueError(f"{index}: shard files missing: {missing}")
        return shards

    def first_file_dtypes(self) -> list[torch.dtype]:
        """The dtypes of ``first_file``'s tensors in the order transformers reads them (a
        safetensors file's by name, a pickle's as saved)."""
        names = [name for name, path in self.origin.items() if path == self.first_file]
        if self.first_file.suffix == ".safetensors":
            names.sort()
        return [self.tensors[name].dtype for name in names]

    def whole(self, name: str, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """The tensor in dtype on device: the view of the file map when nothing changes, else
        read into new memory, so no page is both mapped and copied."""
        t = self.tensors[name]
        if name in self.files and (t.dtype != dtype or device.type != "cpu"):
            t = torch.empty_like(t)
            self.files[name].read_into(name, t)
        return t.to(device=device, dtype=dtype)

    def fill(self, name: str, out: torch.Tensor) -> None:
        """Copy the tensor into `out` (a contiguous slice of a fused parameter)."""
        dtype = self.tensors[name].dtype
        if name in self.files and dtype == out.dtype and out.device.type == "cpu":
            self.files[name].read_into(name, out)
        else:
            out.copy_(self.whole(name, dtype, torch.device("cpu")))


# --------------------------------------------------------------------------- load

def _listing(names) -> str:
    names = sorted(names)
    more = f" ... and {len(names) - 20} more" if len(names) > 20 else ""
    return ", ".join(names[:20]) + more


def _config_dtype(hf: dict) -> torch.dtype | None:
    """config.json's ``dtype`` (transformers 5) or ``torch_dtype`` (older), if it names one."""
    name = hf.get("dtype") or hf.get("torch_dtype")
    dtype = getattr(torch, name, None) if isinstance(name, str) else None
    return dtype if isinstance(dtype, torch.dtype) else None


def _auto_dtype(hf: dict, device: torch.device) -> torch.dtype:
    if device.type == "cuda":
        return cuda_half_dtype(device)
    dtype = _config_dtype(hf)  # fp16 arithmetic on CPU is slow and overflows where bf16 does not
    return dtype if dtype in (torch.bfloat16, torch.float32) else torch.float32


def _requested_dtype(dtype: torch.dtype | str | None, hf: dict,
                     source: TensorSource) -> torch.dtype | None:
    """The `dtype` argument as a torch dtype; "auto": the config's, else the first float tensor's
    (transformers': of the first file, in its order)."""
    resolved = dtype
    if dtype == "auto":
        found = source.first_file_dtypes()
        resolved = _config_dtype(hf) or next((d for d in found if d.is_floating_point),
                                             torch.float32)
    elif isinstance(dtype, str):
        resolved = SHORT_DTYPES.get(dtype, getattr(torch, dtype, None))
    if dtype is not None and not (isinstance(resolved, torch.dtype)
                                  and resolved.is_floating_point):
        raise ValueError(f"dtype={dtype!r}: expected a floating-point torch dtype, its name "
                         f"('bfloat16', 'float16', 'float32', or 'bf16', 'fp16', 'fp32'), or "
                         f"'auto' (the checkpoint's dtype)")
    return resolved


def _tie_as_the_file_says(cfg: ModelConfig, table: FamilyTable, source: TensorSource,
                           dtype: torch.dtype) -> ModelConfig:
    """transformers' rule: a tied config whose head differs from the embeddings loads untied."""
    weights = {path: f"{hf}.weight" for hf, (path, _) in table.modules.items()}
    head, embeddings = weights["lm_head"], weights["wte"]
    if not (cfg.tie_embeddings and {head, embeddings} <= source.tensors.keys()):
        return cfg  # a head alone is the tied pair (`load`); no tensor at all is missing
    cpu = torch.device("cpu")
    if source.tensors[head].shape == source.tensors[embeddings].shape and torch.equal(
            source.whole(head, dtype, cpu), source.whole(embeddings, dtype, cpu)):
        return cfg
    print(f"warning: {source.origin[head]}: {head} differs from {embeddings}, but the config "
          "ties them; loading them untied, as transformers does", file=sys.stderr)
    return replace(cfg, tie_embeddings=False)


def _checked_plan(directory: Path, cfg: ModelConfig, table: FamilyTable,
                  source: TensorSource) -> tuple[Transformer, dict]:
    """The meta-device model of cfg and its `_param_plan`, checked against the file's tensors."""
    with torch.device("meta"):
        model = Transformer(cfg)
    plan = _param_plan(model, table)
    present = set(source.tensors)
    if cfg.tie_embeddings:
        head = plan.pop("lm_head.weight")
        if not present & {name for name, _ in plan["wte.weight"]} and head[0][0] in present:
            # the tied pair saved under the head's name: transformers loads it into both
            plan["wte.weight"] = head
    params = dict(model.named_parameters(remove_duplicate=False))
    expected = {hf_name for parts in plan.values() for hf_name, _ in parts}
    optional = {"lm_head.weight"} if cfg.tie_embeddings else set()
    if missing := expected - present:
        raise ValueError(f"{directory}: missing tensors: {_listing(missing)}")
    if unexpected := {n for n in present - expected - optional
                      if not n.endswith(table.ignored_suffixes)}:
        raise ValueError(f"{directory}: unexpected tensors: {_listing(unexpected)}")
    for name, parts in plan.items():
        for hf_name, rows in parts:
            shape = tuple(params[name].shape)
            want = shape if rows is None else (len(rows),) + shape[1:]
            found = tuple(source.tensors[hf_name].shape)
            if found != want:
                raise ValueError(f"{directory}: shape mismatch for {hf_name}: expected {want} "
                                 f"(from config.json), found {found}")
            # integers would be cast as numbers: a model of nonsense, scored without a word
            if not source.tensors[hf_name].dtype.is_floating_point:
                raise ValueError(f"{source.origin[hf_name]}: tensor {hf_name} is "
                                 f"{source.tensors[hf_name].dtype}: a model's weights are "
                                 "floating point (a quantized checkpoint's integer codes are "
                                 "read by its own library)")
    return model, plan


def load(directory: str | Path, dtype: torch.dtype | str | None = None,
         device: torch.device | str | None = None) -> Transformer:
    """A `Transformer` from an HF checkpoint (a directory or a hub id), checked before the model
    exists."""
    directory = checkpoint_dir(directory)
    if not directory.is_dir():
        raise ValueError(f"{directory}: not a directory")
    if (directory / process.MANIFEST_FILE).exists():  # written by codelm: checked
        problem = process.manifest_problem(directory)
        if problem:
            raise ValueError(f"{directory}: {problem}: the checkpoint is damaged, or edited "
                             "since codelm wrote it: use an intact copy, or, to keep an edit "
                             f"of yours, delete {process.MANIFEST_FILE} (the record of the "
                             "bytes written)")
    cfg, hf = read_config(directory)
    table = TABLES[cfg.family]
    device = torch.device(device if device is not None else "cpu")
    source = TensorSource(directory)
    dtype = _requested_dtype(dtype, hf, source) or _auto_dtype(hf, device)
    model, plan = _checked_plan(directory, cfg, table, source)
    untied = _tie_as_the_file_says(cfg, table, source, dtype)
    if untied is not cfg:
        cfg = untied
        model, plan = _checked_plan(directory, cfg, table, source)
    params = dict(model.named_parameters(remove_duplicate=False))

    state = {}
    for name, parts in plan.items():
        if len(parts) == 1 and parts[0][1] is None:
            state[name] = source.whole(parts[0][0], dtype, device)
            continue
        out = torch.empty(params[name].shape, dtype=dtype, device=device)
        for hf_name, rows in parts:
            if rows is not None and bool((rows.diff() == 1).all()):
                source.fill(hf_name, out[int(rows[0]):int(rows[-1]) + 1])
            else:
                out[rows.to(device)] = source.whole(hf_name, dtype, device)
        state[name] = out
    if cfg.tie_embeddings:
        state["lm_head.weight"] = state["wte.weight"]
    model.load_state_dict(state, strict=True, assign=True)
    if cfg.tie_embeddings:
        model.lm_head.weight = model.wte.weight
    if model.rope is not None:
        # computed, not moved: to_empty on a meta buffer imports sympy (+65 MiB RSS)
        model.rope.set_frequencies(device)
    model.name_or_path = str(directory)
    return model.eval()


# --------------------------------------------------------------------------- save

# config.json's record of the codelm task a checkpoint was trained on: its prompts start as
# that training's text did (an lm run's after an EOS) wherever the directory is copied.
TASK_KEY = "codelm_task"


def trained_task(directory: str | Path) -> object:
    """config.json's TASK_KEY in an HF directory (None where it has none), as the file holds it."""
    config = Path(directory) / "config.json"
    if not config.is_file():
        return None
    return settings.read_json_object(config, "model config").get(TASK_KEY)


def hf_tensors(model: Transformer) -> dict[str, torch.Tensor]:
    """The model's weights under their HF names, in the family's layout (a tied head once)."""
    plan = _param_plan(model, TABLES[model.cfg.family])
    if model.cfg.tie_embeddings:
        plan.pop("lm_head.weight")
    params = dict(model.named_parameters(remove_duplicate=False))
    tensors: dict[str, torch.Tensor] = {}
    for name, parts in plan.items():
        p = params[name].detach()
        for hf_name, rows in parts:
            tensors[hf_name] = p if rows is None else p[rows.to(p.device)]
    return tensors


def save(model: Transformer, directory: str | Path, max_shard_bytes: float = 5 * 2**30,
         task: str | None = None) -> None:
    """Write config.json + model.safetensors (or shards + index) in the family's HF layout, all
    files in full before any replaces the last save's (config.json last), and a manifest there
    (``process.write_manifest``) brought up to date; ``task``: the codelm task the weights were
    trained on, kept in config.json's TASK_KEY (``trained_task``)."""
    directory = Path(directory)
    check_output_dir(directory, "save_pretrained")
    config = hf_config(model.cfg, model.wte.weight.dtype)
    if task is not None:
        config[TASK_KEY] = task
    files = _weight_files(hf_tensors(model), max_shard_bytes)
    files["config.json"] = json.dumps(config, indent=2) + "\n"
    directory.mkdir(parents=True, exist_ok=True)
    process.write_atomic_files({directory / name: data for name, data in files.items()})
    # The last save's weight files go: a single file left beside new shards would load instead.
    removed = []
    for pattern in ("model.safetensors", "model-*-of-*.safetensors", "pytorch_model*.bin",
                    "model.safetensors.index.json", "pytorch_model.bin.index.json"):
        for stale in directory.glob(pattern):
            if stale.name not in files:
                stale.unlink()
                removed.append(stale.name)
    # A directory codelm wrote (an export) records these files' bytes: now the new ones.
    process.update_manifest(directory, [*files, *removed])


def check_output_dir(directory: Path, writer: str, adapter: bool = False) -> None:
    """Refuse, before any work, a directory that holds a run's TrainConfig, or a model beside
    an ``adapter`` (or back)."""
    config = directory / "config.json"
    try:
        is_run = config.is_file() and rundir.is_run_config(settings.read_json_object(config))
    except ValueError:  # an unreadable config.json is replaced, as any other
        is_run = False
    model = next((f for f in MODEL_WEIGHT_FILES if (directory / f).is_file()), None)
    if is_run:
        held = f"{config} is a codelm run's TrainConfig"
    elif adapter and model is not None:
        held = f"{directory} holds a model ({model}), which transformers would load no longer"
    elif not adapter and (directory / "adapter_config.json").is_file():
        held = f"{directory} holds a LoRA adapter, which transformers would load instead"
    else:
        return
    raise ValueError(f"{writer}: {held}; save into another directory")


def _weight_files(tensors: dict[str, torch.Tensor],
                  max_shard_bytes: float) -> dict[str, process.FileContent]:
    """File name -> content (a streaming writer): model.safetensors, or shards of at most
    max_shard_bytes (or one tensor) and their index, split as transformers splits them."""
    from huggingface_hub import split_torch_state_dict_into_shards

    split = split_torch_state_dict_into_shards(tensors, max_shard_size=max_shard_bytes)
    files = {f: partial(write_safetensors, tensors={n: tensors[n] for n in names})
             for f, names in split.filename_to_tensors.items()}
    if split.is_sharded:
        index = {"metadata": split.metadata, "weight_map": split.tensor_to_filename}
        files["model.safetensors.index.json"] = json.dumps(index, indent=2) + "\n"
    return files


def write_safetensors(f: BinaryIO, tensors: dict[str, torch.Tensor],
                      metadata: dict[str, str] | None = None) -> None:
    """safetensors layout (8-byte header length, JSON header padded to 8, raw data), streamed."""
    header: dict = {"__metadata__": {"format": "pt", **(metadata or {})}}
    offset = 0
    for name, t in tensors.items():
        n = t.nbytes
        header[name] = {"dtype": DTYPE_NAMES[t.dtype], "shape": list(t.shape),
                        "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    f.write(len(raw).to_bytes(8, "little"))
    f.write(raw)
    for t in tensors.values():
        t = t.detach().to("cpu").contiguous()
        if t.numel():
            f.write(memoryview(t.view(-1).view(torch.uint8).numpy()))


# --------------------------------------------------------------------------- new checkpoints

# The tokenizer and generation files that travel with a checkpoint's weights (transformers 5
# writes a chat template to a file of its own).
HF_TOKENIZER_FILES = ("tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                      "chat_template.json")
GENERATION_CONFIG = "generation_config.json"
COMPANION_FILES = ("tokenizer.json", *HF_TOKENIZER_FILES, "vocab.json", "merges.txt",
                   "added_tokens.json", "tokenizer.model", "spiece.model", GENERATION_CONFIG)
# transformers 5's named chat templates besides chat_template.jinja (tool_use.jinja, ...).
CHAT_TEMPLATES_DIR = "additional_chat_templates"


def copy_chat_templates(source: Path, out: Path) -> None:
    """Copy ``source``'s CHAT_TEMPLATES_DIR, where it has one, into ``out``."""
    if (source / CHAT_TEMPLATES_DIR).is_dir():
        shutil.copytree(source / CHAT_TEMPLATES_DIR, out / CHAT_TEMPLATES_DIR,
                        dirs_exist_ok=True)


def export_checkpoint(out: str | Path, save_weights: Callable[[Path], object],
                      companions: str | Path, generation_from: str | Path | None = None,
                      chat: bool = False) -> Path:
    """Write the new directory ``out`` whole or not at all: the model (``save_weights``) and the
    COMPANION_FILES and CHAT_TEMPLATES_DIR of ``companions`` (generation_config.json of
    ``generation_from`` if given); ``chat``: a chat run's model, whose generation stops at the
    end-of-turn token of the tokenizer written beside it too (``stop_at_end_of_turn``)."""
    out = Path(out)
    if os.path.lexists(out):  # a dangling link too
        raise ValueError(f"{out} already exists: name a new directory")

    def build(tmp: Path) -> None:
        save_weights(tmp)
        for name in COMPANION_FILES:
            source = Path(generation_from if name == GENERATION_CONFIG and generation_from
                          else companions)
            if (source / name).is_file():
                shutil.copy2(source / name, tmp / name)
        copy_chat_templates(Path(companions), tmp)
        if chat and tokenizer_path(tmp).is_file():
            stop_at_end_of_turn(BPETokenizer.from_file(tmp), tmp)
        process.write_manifest(tmp)

    if not process.write_dir_atomically(out, build, replace=False):
        raise ValueError(f"{out} was written by another process meanwhile; name a new directory")
    return out


def stop_at_end_of_turn(tok: ChatTokenizer, directory: Path) -> None:
    """A chat run's exported model: its generation_config.json's eos_token_id lists the
    template's end-of-turn token beside the EOS (as Qwen2.5-Instruct's lists <|im_end|>), so
    that transformers' generate and vLLM stop where the run's answers end."""
    ends = end_of_turn_ids(tok)
    if not ends:
        return
    path = directory / GENERATION_CONFIG
    if path.is_file():
        config = json.loads(path.read_text("utf-8"))
    else:  # as transformers' GenerationConfig.from_model_config takes the model's ids
        model = json.loads((directory / rundir.HF_CONFIG).read_text("utf-8"))
        config = {key: model[key] for key in ("bos_token_id", "eos_token_id", "pad_token_id")
                  if model.get(key) is not None}
    eos = config.get("eos_token_id")
    listed = eos if isinstance(eos, list) else [eos]
    config["eos_token_id"] = [i for i in dict.fromkeys([*listed, *ends]) if i is not None]
    path.write_text(json.dumps(config, indent=2) + "\n", "utf-8")


def copy_hf_companions(tokenizer: str | None, init_from: str | None, tok, out: Path,
                       weights: bool) -> None:
    """Copy into a run's export the HF files beside its tokenizer (``tokenizer``, else
    ``init_from``'s, when it is the run's ``tok``) and ``init_from``'s generation config."""
    def holds_runs_tokenizer(directory: str | None) -> bool:
        with contextlib.suppress(OSError, ValueError):
            return directory is not None and isinstance(tok, BPETokenizer) and json.loads(
                tokenizer_path(directory).read_text("utf-8")) == tok.spec
        return False

    source = tokenizer if tokenizer is not None else init_from
    if holds_runs_tokenizer(source):
        where = tokenizer_path(source).parent
        for name in HF_TOKENIZER_FILES:
            if (where / name).is_file():
                shutil.copyfile(where / name, out / name)
        copy_chat_templates(where, out)
        config = out / HF_TOKENIZER_FILES[0]
        if (where / config.name).is_file():
            written = json.loads(config.read_text("utf-8"))
            written["tokenizer_class"] = "PreTrainedTokenizerFast"  # tok.save's
            for role in ("bos", "eos", "pad"):  # a role codelm guessed (the run trained with it)
                i = getattr(tok, f"{role}_id")
                if f"{role}_token" not in written and i is not None:
                    written[f"{role}_token"] = tok.token_content(i)
            config.write_text(json.dumps(written, ensure_ascii=False, indent=2), "utf-8")
    generation = Path(init_from or "") / GENERATION_CONFIG
    if (weights and init_from is not None and generation.is_file()
            and (tokenizer is None or holds_runs_tokenizer(init_from))):
        shutil.copyfile(generation, out / GENERATION_CONFIG)


def main(argv: list[str] | None = None) -> int:
    parser = settings.ArgumentParser(
        prog="python -m codelm.models.pretrained",
        description="Convert a local HF checkpoint codelm loads (safetensors or .bin, sharded or "
        "not) into a new safetensors directory in the family's HF layout, cast to --dtype; "
        "'python -m codelm.gguf --help': write one as GGUF for llama.cpp and Ollama.")
    parser.add_argument("checkpoint", help="the checkpoint directory")
    parser.add_argument("out", help="the new directory (must not exist)")
    parser.add_argument("--dtype", default="auto",
                        help="auto (the checkpoint's own) | bf16 | fp16 | fp32 (default: auto)")
    parser.add_argument("--max-shard-gb", type=float, default=5.0,
                        help="shard size limit (default: 5.0; inf: one file)")
    args = parser.parse_args(argv)

    def convert() -> None:
        if not args.max_shard_gb > 0:
            raise ValueError(f"--max-shard-gb {args.max_shard_gb}: must be > 0")
        checkpoint = checkpoint_dir(args.checkpoint)  # a hub id: its snapshot's files
        model = load(checkpoint, dtype=args.dtype)
        shard = args.max_shard_gb * 2**30  # inf: one file
        task = trained_task(checkpoint)  # its prompts start as its training's
        export_checkpoint(args.out, partial(save, model, max_shard_bytes=shard, task=task),
                          checkpoint)
        print(f"wrote {args.out} ({model.cfg.family}, {model.wte.weight.dtype})")

    return process.run_tool(convert, "interrupted: nothing written")


if __name__ == "__main__":
    sys.exit(process.run_main(main))
