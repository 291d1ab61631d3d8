"""LoRA for codelm, file-compatible with PEFT (q/k/v are rows of one fused module): the LoRA and
DoRA layers, targeting, merge, adapter files and the merge command; a quantized base for QLoRA
is codelm.models.quantize's, an adapter's names and settings codelm.models.adapter_config's."""

from __future__ import annotations

if __name__ == "__main__":  # first: the imports below load torch for seconds
    from codelm.runtime import process

    process.quiet_start_up_stops()

import json
import math
import os
import re
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from architecture import Transformer, linear
from codelm import kernels
from codelm.models import families, pretrained
from codelm.models.adapter_config import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    LEGACY_WEIGHTS,
    UNSUPPORTED_PEFT_KEYS,
    LoRAConfig,
    adapter_base,
    check_base_family,
    other_base_note,
    read_adapter_config,
)
from codelm.models.quantize import QuantLinear, parameter_count, set_submodule, shared_parameters
from codelm.runs import rundir
from codelm.runtime import hub, process, settings

PEFT_PREFIX = "base_model.model."
# The version of codelm's adapter files, in the weights' safetensors metadata (PEFT's have none).
FORMAT_KEY, FORMAT_VERSION = "codelm_format_version", "1"

# An adapter file's key: an adapter tensor, or a base tensor it trained (bias, modules_to_save).
_KEY_RE = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+?)\."
                     r"(?P<kind>lora_A\.weight|lora_B\.weight|lora_embedding_A|lora_embedding_B"
                     r"|lora_magnitude_vector|(?:base_layer\.)?weight|(?:base_layer\.)?bias)$")


@dataclass
class LoRAReport:
    """What ``apply_lora``/``load_adapter`` did: which modules each target matched, and the counts."""

    targets: dict[str, list[str]]
    modules: list[str]
    trainable_params: int
    total_params: int


# ----------------------------------------------------------------------------- LoRA layers

@kernels.faster(kernels.dropped_linear)
def dropped_linear(x: torch.Tensor, weight: torch.Tensor, p: float, seed: int) -> torch.Tensor:
    """linear(dropout(x), weight) with the mask ``seed`` draws, in the weight's dtype."""
    return F.linear(x.to(weight.dtype) * kernels.dropout_keep(x, p, seed, weight.dtype), weight)


class AdapterPlace(NamedTuple):
    """Where an adapter's rows sit in its fused module's output."""

    lo: int  # the first row of the span it covers
    hi: int  # one past the last
    reorder: bool  # its rows are a permuted slice: B is put in the module's order
    scatter: bool  # its rows are not one contiguous span: merged by index_copy


class LoRALinear(nn.Module):
    """A frozen linear layer plus low-rank updates. Each adapter ``key`` owns output rows (all,
    or one HF module's inside a fused module) and adds PEFT's ``lora_B(lora_A(dropout(x))) *
    scaling`` to them; the A matmuls are one when no dropout mask is drawn."""

    def __init__(self, base: nn.Module, r: int, scale: float, dropout: float,
                 dora: bool = False):
        super().__init__()
        self.base = base
        self.r, self.scale, self.dropout = r, scale, dropout
        self.lora_A = nn.ParameterDict()
        self.lora_B = nn.ParameterDict()
        self.magnitude = nn.ParameterDict() if dora else None  # DoRA: PEFT's magnitude vector
        self.names: dict[str, str] = {}       # adapter key -> module name in the adapter file
        self._place: dict[str, AdapterPlace] = {}
        self._segments: list[str | int] | None = []
        self.merged = False
        self.enabled = True  # off: the base layer alone (adapters_off)

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    @property
    def weight(self) -> torch.Tensor:
        return self.base.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base.bias

    def add_adapter(self, key: str, name: str, rows: torch.Tensor | None) -> None:
        """Add an adapter on output ``rows`` (``rows[j]`` is the row that adapter row j feeds);
        the HF modules of one codelm module own disjoint rows."""
        assert key not in self.names, key
        rows = None if rows is None else rows.to(torch.long).cpu()
        device = next(iter(self.base.state_dict().values())).device
        n_out = self.out_features if rows is None else len(rows)
        A = torch.empty(self.r, self.in_features, device=device, dtype=torch.float32)
        nn.init.kaiming_uniform_(A, a=math.sqrt(5))
        self.lora_A[key] = nn.Parameter(A)
        self.lora_B[key] = nn.Parameter(torch.zeros(n_out, self.r, device=device))
        self.names[key] = name
        # Where the adapter's rows go: a contiguous slice (B reordered if permuted), or a scatter.
        lo, hi, reorder, scatter = 0, self.out_features, False, False
        if rows is not None:
            order = torch.argsort(rows)
            lo, hi = int(rows[order[0]]), int(rows[order[0]]) + len(rows)
            scatter = not torch.equal(rows[order], torch.arange(lo, hi))
            reorder = not scatter and not torch.equal(order, torch.arange(len(rows)))
            self.register_buffer(f"rows_{key}", rows.to(device), persistent=False)
            self.register_buffer(f"order_{key}", order.to(device), persistent=False)
        self._place[key] = AdapterPlace(lo, hi, reorder, scatter)
        self._segments = self._plan_segments()
        if self.magnitude is not None:  # B = 0: the magnitude is the weight's row norm
            weight = self._base_weight().float()
            own = weight if rows is None else weight.index_select(0, rows.to(weight.device))
            self.magnitude[key] = nn.Parameter(torch.linalg.norm(own, dim=1))

    def _plan_segments(self) -> list[str | int] | None:
        """The output rows as adapter keys and widths of unowned rows, so the update is one
        concatenation; None when some adapter's rows are scattered."""
        if any(scatter for *_, scatter in self._place.values()):
            return None
        segments, pos = [], 0
        for lo, hi, key in sorted((lo, hi, key) for key, (lo, hi, _, _) in self._place.items()):
            if lo > pos:
                segments.append(lo - pos)
            segments.append(key)
            pos = hi
        if pos < self.out_features:
            segments.append(self.out_features - pos)
        return segments

    def rows(self, key: str) -> torch.Tensor | None:
        return getattr(self, f"rows_{key}", None)

    def _in_place_order(self, key: str, t: torch.Tensor) -> torch.Tensor:
        """An adapter's rows (of B, of the magnitude) in the fused module's order when its rows
        are a permuted slice."""
        if not self._place[key].reorder:
            return t
        return t.index_select(0, getattr(self, f"order_{key}"))

    def _delta_B(self, key: str) -> torch.Tensor:
        return self._in_place_order(key, self.lora_B[key])

    def _base_weight(self) -> torch.Tensor:
        return self.base.dequantize() if isinstance(self.base, QuantLinear) else self.base.weight

    def _own_rows(self, key: str, t: torch.Tensor, dim: int) -> torch.Tensor:
        """The rows of ``t`` (a weight: dim 0; an output: dim -1) that ``key``'s update adds to,
        in the order of that update."""
        lo, hi, _, scatter = self._place[key]
        return t.index_select(dim, self.rows(key)) if scatter else t.narrow(dim, lo, hi - lo)

    def _dora_factor(self, key: str, delta: torch.Tensor | None = None) -> torch.Tensor:
        """magnitude / ||W + scale * B A|| per row (the norm held constant, as DoRA's paper and
        PEFT do), in the order of ``key``'s update."""
        if delta is None:
            delta = (self._delta_B(key).float() @ self.lora_A[key].float()) * self.scale
        weight = self._own_rows(key, self._base_weight().float(), 0) + delta
        norm = torch.linalg.norm(weight, dim=1).detach()
        return self._in_place_order(key, self.magnitude[key]) / norm

    def _dora(self, key: str, update: torch.Tensor, x: torch.Tensor, out: torch.Tensor
              ) -> torch.Tensor:
        """PEFT's DoRA output for ``key``'s rows: (f - 1) * W x + f * update."""
        if self.training and self.dropout:  # W x of the dropped-out input, as PEFT
            base = F.linear(x, self._own_rows(key, self._base_weight(), 0).to(x.dtype))
        else:
            base = self._own_rows(key, out, -1)
            if self.base.bias is not None:
                base = base - self._own_rows(key, self.base.bias, 0)
        factor = self._dora_factor(key).to(update.dtype)
        return (factor - 1) * base.to(update.dtype) + factor * update

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = linear(self.base, x)  # (packed while decoding: architecture.linear)
        if not self.enabled or _skips_merged(self) or not self.lora_A:
            return out
        keys = list(self.lora_A.keys())
        p = self.dropout if self.training else 0.0
        if p and self.magnitude is None and torch.compiler.is_compiling():
            # torch's dropout, which a compiled graph draws itself (a seed drawn here would be a
            # Python int the graph is specialized on: a recompilation every call)
            x = x.to(self.lora_A[keys[0]].dtype)  # in the adapters' dtype, as the others
            hs = [F.linear(F.dropout(x, p), self.lora_A[k]) for k in keys]
        elif p:  # a mask per adapter, as PEFT's modules each draw one
            seeds = [kernels.dropout_seed() for _ in keys]
            hs = [dropped_linear(x, self.lora_A[k], p, seed) for k, seed in zip(keys, seeds)]
        else:
            x = x.to(self.lora_A[keys[0]].dtype)
            A = torch.cat([self.lora_A[k] for k in keys]) if len(keys) > 1 else self.lora_A[keys[0]]
            hs = F.linear(x, A).split(self.r, dim=-1)
        ys = {key: F.linear(h * self.scale, self._delta_B(key)) for key, h in zip(keys, hs)}
        if self.magnitude is not None:
            xs = [self._dropped(x, p, seed) for seed in seeds] if p else [x] * len(keys)
            ys = {key: self._dora(key, y, xd, out) for (key, y), xd in zip(ys.items(), xs)}
        ys = {key: y.to(out.dtype) for key, y in ys.items()}
        if self._segments is None:
            for key, y in ys.items():
                out = out.index_add(-1, self.rows(key), y)
            return out
        parts = [ys[s] if isinstance(s, str) else out.new_zeros(*out.shape[:-1], s)
                 for s in self._segments]
        return out + (parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1))

    def _dropped(self, x: torch.Tensor, p: float, seed: int) -> torch.Tensor:
        """x dropped out by the mask ``seed`` draws, in the adapters' dtype."""
        dtype = next(iter(self.lora_A.values())).dtype
        return x.to(dtype) * kernels.dropout_keep(x, p, seed, dtype)

    def _weight_delta(self, key: str) -> torch.Tensor:
        return (self.lora_B[key].float() @ self.lora_A[key].float()) * self.scale

    @torch.no_grad()
    def merge(self, sign: float = 1.0) -> None:
        """Add (``sign=1``) or subtract (``-1``) every adapter's update in fp32, then cast back."""
        w32 = self.base.weight.float()
        for key in self.lora_A:
            if self.magnitude is not None:  # rows scaled by magnitude / ||W + delta||, as PEFT
                self._merge_dora(key, w32, sign)
                continue
            delta = self._weight_delta(key)
            if (rows := self.rows(key)) is None:
                w32.add_(delta, alpha=sign)
            else:
                w32.index_add_(0, rows, delta, alpha=sign)
        self.base.weight.copy_(w32.to(self.base.weight.dtype))

    def _merge_dora(self, key: str, w32: torch.Tensor, sign: float) -> None:
        delta = self._in_place_order(key, self._weight_delta(key))
        own = self._own_rows(key, w32, 0)
        if sign > 0:
            factor = self._dora_factor(key, delta)
            # what unmerging divides by: a buffer, so that it moves and casts with the module
            norms = self._in_place_order(key, self.magnitude[key]) / factor
            self.register_buffer(f"merged_norms_{key}", norms, persistent=False)
            new = factor[:, None] * (own + delta)
        else:
            norms = getattr(self, f"merged_norms_{key}")
            delattr(self, f"merged_norms_{key}")
            factor = self._in_place_order(key, self.magnitude[key]) / norms
            new = own / factor[:, None] - delta
        if self._place[key].scatter:
            w32.index_copy_(0, self.rows(key), new)
        else:
            own.copy_(new)

    def extra_repr(self) -> str:
        return (f"r={self.r}, scale={self.scale:g}, dropout={self.dropout:g}, "
                f"dora={self.magnitude is not None}, adapters={list(self.names.values())}")


class LoRAEmbedding(nn.Module):
    """A frozen embedding plus a low-rank update in PEFT's layout (A zero, B normal, no dropout)."""

    def __init__(self, base: nn.Embedding, r: int, scale: float, name: str):
        super().__init__()
        self.base = base
        self.r, self.scale, self.name = r, scale, name
        device = base.weight.device
        self.lora_embedding_A = nn.Parameter(torch.zeros(r, base.num_embeddings, device=device))
        self.lora_embedding_B = nn.Parameter(torch.randn(base.embedding_dim, r, device=device))
        self.merged = False
        self.enabled = True  # off: the base embedding alone (adapters_off)

    @property
    def weight(self) -> torch.Tensor:
        return self.base.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        out = self.base(ids)
        if not self.enabled or _skips_merged(self):
            return out
        h = F.embedding(ids, self.lora_embedding_A.t(), padding_idx=self.base.padding_idx)
        return out + (F.linear(h, self.lora_embedding_B) * self.scale).to(out.dtype)

    @torch.no_grad()
    def merge(self, sign: float = 1.0) -> None:
        delta = (self.lora_embedding_B.float() @ self.lora_embedding_A.float()).t() * self.scale
        w = self.base.weight
        w.copy_((w.float() + sign * delta).to(w.dtype))

    def extra_repr(self) -> str:
        return f"r={self.r}, scale={self.scale:g}, adapter={self.name}"


def _skips_merged(module: LoRALinear | LoRAEmbedding) -> bool:
    """Whether forward leaves the adapters out (merged); training through merged adapters, which
    would get no gradient, is an error naming the cure."""
    if module.merged and module.training and torch.is_grad_enabled():
        raise ValueError("the LoRA adapters are merged into the base weights: call "
                         "lora.unmerge_lora(model) before training (or model.eval() to evaluate)")
    return module.merged


def lora_modules(model: nn.Module) -> Iterator[tuple[str, LoRALinear | LoRAEmbedding]]:
    """(codelm path, module) of every LoRA layer in ``model``."""
    return ((p, m) for p, m in model.named_modules() if isinstance(m, (LoRALinear, LoRAEmbedding)))


# ----------------------------------------------------------------------------- targeting

def _matches(target: list[str] | str, name: str) -> bool:
    """PEFT's target_modules rule: a regex matching the whole name, or a name or dotted
    suffix of one of the list's."""
    if isinstance(target, str):
        return re.fullmatch(target, name) is not None
    return any(name == t or name.endswith("." + t) for t in target)


def _saved_whole(modules_to_save: list[str], name: str) -> bool:
    """PEFT's modules_to_save rule: the name ends with one of the list's, as text (``norm``
    names every layer norm, not the final norm alone)."""
    return any(name.endswith(t) for t in modules_to_save)


def _leaf_names(names) -> list[str]:
    return list(dict.fromkeys(n.rsplit(".", 1)[-1] for n in names))


ALL_LINEAR = "all-linear"  # PEFT's target_modules shorthand


def _saved_not_adapted(modules_to_save: Sequence[str], name: str) -> bool:
    """PEFT's rule: a module saved whole gets no adapter (a name that is one of
    ``modules_to_save`` or ends with ``.`` and one, or holds one as a dotted part)."""
    return any(re.fullmatch(rf"(^|.*\.){re.escape(m)}($|\..*)", name) for m in modules_to_save)


def _resolve_targets(model: nn.Module, targets: list[str] | str, peft_rules: bool = False,
                     modules_to_save: Sequence[str] = ()) -> dict[str, list[str]]:
    """target -> the adapter-file module names it selects (HF names, else codelm names); each
    must select something, or under ``peft_rules`` (HF names only) at least one. ALL_LINEAR
    selects what PEFT's shorthand does: by last name, every Linear but the output layer. A
    module saved whole (``modules_to_save``) is left out, as PEFT leaves it."""
    names = families.hf_module_slots(model.cfg)
    if targets in (ALL_LINEAR, [ALL_LINEAR]):
        targets = _leaf_names(n for n, (path, _) in names.items() if path != "lm_head"
                              and isinstance(model.get_submodule(path), (nn.Linear, QuantLinear)))
    codelm_paths = [p for p, m in model.named_modules()
                    if isinstance(m, (nn.Linear, nn.Embedding, QuantLinear))]
    by_path: dict[str, list[str]] = {}
    for name, (path, _) in names.items():
        by_path.setdefault(path, []).append(name)
    resolved, missing = {}, []
    for target in [targets] if isinstance(targets, str) else targets:
        spec = target if isinstance(targets, str) else [target]
        hits = [n for n in names if _matches(spec, n)]
        if not hits and not peft_rules:  # codelm's names select the HF modules inside them
            hits = [n for p in codelm_paths if _matches(spec, p) for n in by_path.get(p, [])]
        if hits:
            resolved[target] = [n for n in hits if not _saved_not_adapted(modules_to_save, n)]
        else:
            missing.append(target)
    if missing and (not peft_rules or not resolved):
        adaptable = [n for n, (p, _) in names.items() if p in codelm_paths]
        if isinstance(targets, str):  # PEFT's rule, easily taken for one name
            example = next((n for n in adaptable if n.endswith("." + targets)), adaptable[0])
            raise ValueError(f"LoRA target(s) {targets!r} match no module of this "
                             f"{model.cfg.family} model: one string is a regular expression "
                             f"that must match a whole module name (e.g. {example}); to match "
                             f"names by their last part, pass a list: {[targets]}")
        raise ValueError(f"LoRA target(s) {missing} match no module of this {model.cfg.family} "
                         f"model. HF names: {', '.join(_leaf_names(adaptable))}; codelm names: "
                         f"{', '.join(_leaf_names(codelm_paths))} (or any dotted suffix of a full "
                         "module name, e.g. 'attn.proj')")
    if resolved and not any(resolved.values()):
        raise ValueError(f"LoRA target(s) {list(resolved)}: every module they select is saved "
                         f"whole (modules_to_save {list(modules_to_save)}), which PEFT adapts "
                         "not: no module would get an adapter; target others")
    return resolved


def targeted_modules(model: nn.Module, targets: list[str] | str, peft_rules: bool = False,
                     modules_to_save: Sequence[str] = ()) -> set[str]:
    """The adapter-file module names ``targets`` selects, as ``apply_lora`` (or under
    ``peft_rules``, ``load_adapter``) would: two spellings adapt the same modules when equal."""
    resolved = _resolve_targets(model, targets, peft_rules, modules_to_save)
    return {n for hits in resolved.values() for n in hits}


def apply_lora(model: nn.Module, cfg: LoRAConfig) -> LoRAReport:
    """Freeze the model and add LoRA adapters on ``cfg.target_modules`` (checked first)."""
    if not isinstance(cfg, LoRAConfig):
        raise ValueError(f"apply_lora takes codelm's LoRAConfig (r, alpha, dropout, "
                         f"target_modules, ...: PEFT's LoraConfig fields under plain names), got "
                         f"{type(cfg).__name__}")
    _check_model(model, "apply_lora")
    return _attach(model, cfg, _resolve_targets(model, cfg.target_modules,
                                                modules_to_save=cfg.modules_to_save or ()))


def _check_model(model: nn.Module, caller: str) -> None:
    """A codelm model (LoRA targets go through its config and module names) without adapters."""
    if not isinstance(model, Transformer):
        raise ValueError(f"{caller} works on codelm's Transformer (pretrained.load(dir) "
                         f"loads an HF checkpoint as one), got {type(model).__name__}")
    if any(True for _ in lora_modules(model)):
        raise ValueError(f"the model already has LoRA adapters; {caller} once per model")


def _attach(model: nn.Module, cfg: LoRAConfig, resolved: dict[str, list[str]]) -> LoRAReport:
    names = families.hf_module_slots(model.cfg)
    chosen = list(dict.fromkeys(n for hits in resolved.values() for n in hits))
    for name in chosen:  # (an embedding's slot is always its whole table: no rows to check)
        path, _ = names[name]
        module = model.get_submodule(path)
        if not isinstance(module, (nn.Linear, QuantLinear, nn.Embedding)):
            raise ValueError(f"LoRA target {name} ({path}) is a {type(module).__name__}; LoRA "
                             "adapts Linear and Embedding modules only")
        if cfg.use_dora and isinstance(module, nn.Embedding):
            raise ValueError(f"LoRA target {name} is an embedding: codelm's DoRA adapts Linear "
                             "modules only; leave it out of the targets")
    trainable = {name: p.requires_grad for name, p in model.named_parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    for name in chosen:
        path, rows = names[name]
        module = model.get_submodule(path)
        if isinstance(module, nn.Embedding):
            set_submodule(model, path, LoRAEmbedding(module, cfg.r, cfg.scale, name))
            continue
        if not isinstance(module, LoRALinear):
            module = LoRALinear(module, cfg.r, cfg.scale, cfg.dropout, cfg.use_dora)
            set_submodule(model, path, module)
        module.add_adapter(name.rsplit(".", 1)[-1], name, rows)
    for _, module in lora_modules(model):
        module.train(model.training)  # new layers join an eval-mode model in eval mode
    model.lora_config = cfg
    try:  # bias and modules_to_save are checked against the adapted model
        saved = _saved_base_tensors(model, cfg)
    except ValueError:
        _detach(model, trainable)  # a refused config leaves the model as it was
        raise
    for tensor, _ in saved.values():
        tensor.requires_grad_(True)
    return _report(model, resolved)


def whole_saved_paths(model: nn.Module, modules_to_save: Sequence[str]) -> tuple[str, ...]:
    """The paths of codelm's modules holding what PEFT's ``modules_to_save`` trains whole (a
    QLoRA base keeps them unquantized: a quantized module cannot train)."""
    slots = families.hf_module_slots(model.cfg)
    paths = {path for name, (path, _) in slots.items() if _saved_whole(modules_to_save, name)}
    return tuple(sorted(paths))


def _saved_base_tensors(model: nn.Module, cfg: LoRAConfig
                        ) -> dict[str, tuple[nn.Parameter, torch.Tensor | None]]:
    """Adapter-file key -> (base parameter, rows) of what PEFT's ``bias`` and ``modules_to_save``
    train and save. A parameter codelm shares between HF modules (a fused qkv, a tied head) is
    trained only when the adapter saves every module sharing it, as PEFT's copies would be."""
    adapted = {name for _, m in lora_modules(model) for name in getattr(m, "names", {}).values()}
    adapted |= {m.name for _, m in lora_modules(model) if isinstance(m, LoRAEmbedding)}
    slots = families.hf_module_slots(model.cfg)
    tied_whole = _tied_to_saved_embedding(model, cfg, slots, adapted)
    if cfg.bias == "none" and not cfg.modules_to_save:
        return {}
    saved, holders = {}, {}
    unmatched = [t for t in cfg.modules_to_save or [] if not any(
        _saved_whole([t], name) for name in slots)]
    if unmatched:
        raise ValueError(f"modules_to_save {unmatched}: no module of the model's ends with it "
                         f"(its modules: {', '.join(_leaf_names(slots))}); name one of them")
    for name, (path, rows) in slots.items():
        module = model.get_submodule(path)
        module = getattr(module, "base", module)
        whole = bool(cfg.modules_to_save) and _saved_whole(cfg.modules_to_save, name)
        whole = whole or name in tied_whole
        if whole and isinstance(module, QuantLinear):
            raise ValueError(f"modules_to_save {name}: quantized with the base (QLoRA), it "
                             "cannot train whole; leave it out, or train without quantize_bits")
        for attr in ("weight", "bias"):
            tensor = getattr(module, attr, None)
            if not isinstance(tensor, nn.Parameter):
                continue
            holders.setdefault(id(tensor), []).append(f"{name}.{attr}")
            if whole:
                saved[f"{name}.{attr}"] = (tensor, rows)
            elif attr == "bias" and (cfg.bias == "all" or cfg.bias == "lora_only" and name in
                                     adapted):
                saved[f"{name}.base_layer.bias" if name in adapted else f"{name}.bias"] = (
                    tensor, rows)
    keys = {k.replace(".base_layer.", "."): k for k in saved}
    for key, (tensor, _) in saved.items():
        if missing := [h for h in holders[id(tensor)] if h not in keys]:
            raise ValueError(f"{key}: codelm holds it in one tensor with {', '.join(missing)}, "
                             "which the adapter would not train: add them to modules_to_save "
                             "(or bias 'all'), or leave it out")
    return saved


def _tied_to_saved_embedding(model: nn.Module, cfg: LoRAConfig, slots: dict,
                             adapted: set[str]) -> set[str]:
    """The modules PEFT's ensure_weight_tying trains whole with the embedding, as one tensor:
    where the embedding's weight is tied and modules_to_save names one module sharing it, every
    module sharing it. A tied module adapted by LoRA under it is refused: PEFT ties a LoRA on
    the head to the embedding's, which codelm does not compute."""
    if not cfg.ensure_weight_tying:
        return set()
    weight = getattr(model.wte, "base", model.wte).weight
    tied = set()
    for name, (path, _) in slots.items():
        module = model.get_submodule(path)
        if getattr(getattr(module, "base", module), "weight", None) is weight:
            tied.add(name)
    if len(tied) < 2:  # an untied embedding: PEFT ties nothing
        return set()
    if any(_saved_whole(cfg.modules_to_save or [], name) for name in tied):
        return tied
    if adapted_tied := sorted(adapted & tied):
        raise ValueError(f"LoRA on {', '.join(adapted_tied)} with ensure_weight_tying: PEFT ties "
                         "the head's adapter to the embedding's, which codelm does not compute; "
                         "set ensure_weight_tying false, or leave them out of the targets")
    return set()


def _detach(model: nn.Module, trainable: dict[str, bool]) -> None:
    """Undo ``_attach``: the base modules back in place, ``requires_grad`` as it was."""
    for path, module in list(lora_modules(model)):
        set_submodule(model, path, module.base)
    for name, p in model.named_parameters():
        p.requires_grad_(trainable[name])
    del model.lora_config


def _report(model: nn.Module, resolved: dict[str, list[str]]) -> LoRAReport:
    return LoRAReport(
        targets=resolved,
        modules=[path for path, _ in lora_modules(model)],
        trainable_params=sum(p.numel() for p in model.parameters() if p.requires_grad),
        total_params=parameter_count(model),
    )


# ----------------------------------------------------------------------------- merge

def tied_targets(model: nn.Module) -> dict[str, list[str]]:
    """LoRA modules whose base weight another module shares -> that weight's names."""
    tied = shared_parameters(model)
    weights = ((path, getattr(module.base, "weight", None))  # a QuantLinear base: never tied
               for path, module in lora_modules(model))
    return {path: tied[id(w)] for path, w in weights if w is not None and id(w) in tied}


def merge_lora(model: nn.Module) -> None:
    """Fold every adapter into its base weight (in fp32, then cast). Idempotent."""
    todo = [(p, m) for p, m in lora_modules(model) if not m.merged]
    if any(isinstance(m.base, QuantLinear) for _, m in todo):
        raise ValueError("cannot merge LoRA into a quantized base: load the base unquantized "
                         "(pretrained.load), load_adapter, then merge")
    if tied := tied_targets(model):
        path, sharers = next(iter(tied.items()))
        raise ValueError(f"cannot merge the LoRA on {path}: its weight is tied to "
                         f"{sharers}, so merging would change both; untie them first")
    for _, module in todo:
        module.merge(+1.0)
        module.merged = True


def unmerge_lora(model: nn.Module) -> None:
    """Undo ``merge_lora`` (in fp32, then cast: to within one rounding, as PEFT). Idempotent."""
    for _, module in lora_modules(model):
        if module.merged:
            module.merge(-1.0)
            module.merged = False


@contextmanager
def merged(model: nn.Module) -> Iterator[nn.Module]:
    """The model with its adapters merged and its LoRA layers swapped for their bases while
    plain weights are written; the layers come back after (the model stays merged)."""
    merge_lora(model)
    wrapped = list(lora_modules(model))
    for path, module in wrapped:
        set_submodule(model, path, module.base)
    try:
        yield model
    finally:
        for path, module in wrapped:
            set_submodule(model, path, module)


@contextmanager
def adapters_off(model: nn.Module) -> Iterator[nn.Module]:
    """The model as its base inside the block: every LoRA layer leaves its update out (PEFT's
    ``disable_adapter``), on the same weights, nothing copied. Refused where the base is not
    the one loaded: adapters merged into it, or base tensors the adapter trains (bias,
    modules_to_save)."""
    layers = [module for _, module in lora_modules(model)]
    if not layers:
        raise ValueError("the model has no LoRA adapters to switch off")
    if any(module.merged for module in layers):
        raise ValueError("the LoRA adapters are merged into the base weights: call "
                         "lora.unmerge_lora(model) before switching them off")
    cfg = model.lora_config
    if cfg.bias != "none" or cfg.modules_to_save:
        raise ValueError(f"the adapter trains base tensors (bias {cfg.bias!r}, modules_to_save "
                         f"{cfg.modules_to_save}): with it off the model is not its base; "
                         "train with bias 'none' and no modules_to_save")
    before = [module.enabled for module in layers]
    for module in layers:
        module.enabled = False
    try:
        yield model
    finally:
        for module, enabled in zip(layers, before):
            module.enabled = enabled


def merge_and_export(model: nn.Module, out_dir: str | Path, task: str | None = None) -> Path:
    """Merge the adapters and write a full HF checkpoint (the model is left merged); ``task``:
    the codelm task the adapter trained on, as ``pretrained.save`` records it."""
    with merged(model):
        pretrained.save(model, out_dir, task=task)
    return Path(out_dir)


# ----------------------------------------------------------------------------- adapter files

def _adapter_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """Adapter-file key (without PEFT's prefix) -> the model's parameter."""
    params = {}
    for _, module in lora_modules(model):
        if isinstance(module, LoRAEmbedding):
            params[f"{module.name}.lora_embedding_A"] = module.lora_embedding_A
            params[f"{module.name}.lora_embedding_B"] = module.lora_embedding_B
            continue
        for key, name in module.names.items():
            params[f"{name}.lora_A.weight"] = module.lora_A[key]
            params[f"{name}.lora_B.weight"] = module.lora_B[key]
            if module.magnitude is not None:
                params[f"{name}.lora_magnitude_vector"] = module.magnitude[key]
    return params


def _target_spec(model: nn.Module, written: set[str]) -> list[str] | str:
    """Leaf names when PEFT's suffix rule selects exactly the written modules, else an exact regex."""
    leaves = sorted(_leaf_names(written))
    selected = {n for n in families.hf_module_slots(model.cfg) if _matches(leaves, n)}
    return leaves if selected == written else "|".join(re.escape(n) for n in sorted(written))


def save_adapter(model: nn.Module, out_dir: str | Path,
                 base_model_name_or_path: str | Path | None = None) -> Path:
    """Write the adapters in PEFT's layout (adapter_config.json + adapter_model.safetensors),
    recording the base (default: ``model.name_or_path``) as PEFT does: a snapshot of the hub
    cache by its repo id and commit (``revision``), which any machine's cache resolves."""
    cfg: LoRAConfig | None = getattr(model, "lora_config", None)
    if cfg is None:
        raise ValueError("save_adapter: the model has no LoRA adapters (apply_lora first)")
    base = base_model_name_or_path or getattr(model, "name_or_path", None)
    revision = None
    if base is not None and (snapshot := hub.snapshot_of(base)) is not None:
        base, revision = snapshot
    elif base is not None and Path(base).is_dir():  # a local base: found from any directory
        base = Path(base).absolute()
    out = Path(out_dir)
    pretrained.check_output_dir(out, "save_adapter", adapter=True)
    if base is None:
        print("note: save_adapter: the model names no base (not loaded from a checkpoint), so the "
              "adapter records none: pass base_model_name_or_path=DIR, or load it as "
              "BASE+ADAPTER", file=sys.stderr)
    tensors = {PEFT_PREFIX + k: p.detach().float().cpu().contiguous()
               for k, p in _adapter_parameters(model).items()}
    written = {_KEY_RE.match(k)["module"] for k in tensors}
    saved = _saved_base_tensors(model, cfg)
    for key, (tensor, rows) in saved.items():
        rows = slice(None) if rows is None else rows.to(tensor.device)
        tensors[PEFT_PREFIX + key] = tensor.detach()[rows].float().cpu().contiguous()
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM",
        "base_model_name_or_path": None if base is None else os.fspath(base),
        "revision": revision,
        "r": cfg.r, "lora_alpha": cfg.alpha, "lora_dropout": cfg.dropout,
        "target_modules": _target_spec(model, written), "bias": cfg.bias,
        "modules_to_save": cfg.modules_to_save,
        "use_rslora": cfg.use_rslora, "init_lora_weights": True, "inference_mode": True,
        **UNSUPPORTED_PEFT_KEYS, "use_dora": cfg.use_dora,
        "ensure_weight_tying": _trains_tied(model, saved),
    }
    out.mkdir(parents=True, exist_ok=True)
    # As a set (config last, as save_pretrained): a failed save leaves the last adapter whole.
    process.write_atomic_files({
        out / ADAPTER_WEIGHTS: partial(pretrained.write_safetensors, tensors=tensors,
                                       metadata={FORMAT_KEY: FORMAT_VERSION}),
        out / ADAPTER_CONFIG: json.dumps(config, indent=2, sort_keys=True) + "\n",
    })
    return out


def _trains_tied(model: nn.Module, saved: dict[str, tuple[nn.Parameter, torch.Tensor | None]]
                 ) -> bool:
    """Whether the adapter's ``saved`` base tensors (``_saved_base_tensors``) hold one that
    modules share (a tied embedding and head): codelm trains it as one, so its file asks PEFT
    for ensure_weight_tying, which trains them so too."""
    tied = shared_parameters(model)
    return any(id(tensor) in tied for tensor, _ in saved.values())


def _read_weights(path: Path) -> tuple[Path, dict[str, torch.Tensor]]:
    """The adapter's weight file and tensors; a corrupt file is an error naming it."""
    file = path / ADAPTER_WEIGHTS
    if not file.is_file() and (path / LEGACY_WEIGHTS).is_file():  # older PEFT's: tensors only
        return path / LEGACY_WEIGHTS, pretrained.read_bin(path / LEGACY_WEIGHTS)
    if not file.is_file():
        raise ValueError(f"{path}: no {ADAPTER_WEIGHTS} (or {LEGACY_WEIGHTS}) found")
    f = pretrained.SafetensorsFile(file)
    version = f.metadata.get(FORMAT_KEY, FORMAT_VERSION)
    if version != FORMAT_VERSION:
        raise ValueError(f"{file}: a codelm adapter of format_version {version}, not "
                         f"{FORMAT_VERSION}: load it with the codelm that wrote it")
    return file, {k: f.view(k) for k in f.entries}


@torch.no_grad()
def load_adapter(model: nn.Module, adapter_dir: str | Path) -> LoRAReport:
    """Load an adapter written by ``save_adapter`` or by PEFT into a model without adapters,
    attached as its config says; a failed load leaves the model as it was."""
    _check_model(model, "load_adapter")
    trainable = {name: p.requires_grad for name, p in model.named_parameters()}
    report = apply_adapter_layout(model, adapter_dir)
    try:
        _copy_adapter(model, *_read_weights(Path(adapter_dir)))
    except ValueError:
        _detach(model, trainable)
        raise
    return report


@torch.no_grad()
def load_adapter_weights(model: nn.Module, adapter_dir: str | Path) -> None:
    """Copy an adapter's weights into a model that has its layout (``apply_adapter_layout``'s,
    or a copy of a model that ``load_adapter`` made)."""
    _copy_adapter(model, *_read_weights(Path(adapter_dir)))


def apply_adapter_layout(model: nn.Module, adapter_dir: str | Path,
                         config_name: str = ADAPTER_CONFIG) -> LoRAReport:
    """Freeze the model and add the adapters ``load_adapter`` would (where the adapter's config
    puts them, by PEFT's rules), without their weights (a run's checkpoint holds them)."""
    _check_model(model, "apply_adapter_layout")
    cfg = read_adapter_config(adapter_dir, config_name)
    try:
        return _attach(model, cfg, _resolve_targets(model, cfg.target_modules, peft_rules=True,
                                                    modules_to_save=cfg.modules_to_save or ()))
    except ValueError as e:
        raise ValueError(f"{Path(adapter_dir) / config_name}: {e}") from None


def _copy_adapter(model: nn.Module, file: Path, tensors: dict[str, torch.Tensor]) -> None:
    """Check every key and shape of the file against the model's adapters, then copy."""
    slots = _adapter_parameters(model)
    base = _base_layers(model, tensors, file)
    writes: list[Callable[[], object]] = []
    first_key: dict[int, str] = {}  # a tensor of the model -> the file's first key for it
    for key, tensor in tensors.items():
        if not tensor.dtype.is_floating_point:  # integers would be copied as numbers
            raise ValueError(f"{file}: tensor {key!r} is {tensor.dtype}: an adapter's weights "
                             "are floating point")
        if key in base:  # an adapted embedding's or head's weight, a bias, a saved module
            path, target, rows = base[key]
            shape = tuple(target.shape) if rows is None else (len(rows), *target.shape[1:])
            if shape != tuple(tensor.shape):
                raise ValueError(f"{file}: {key!r} has shape {tuple(tensor.shape)}, {path} "
                                 f"expects {shape} (was the vocabulary resized?)")
            first = first_key.setdefault(id(target) if rows is None else id(rows), key)
            if not torch.equal(tensors[first], tensor):
                raise ValueError(f"{file}: {key!r} and {first!r} differ, but this model holds "
                                 "them in one tensor (tied weights); untie them to load both")
            writes.append(partial(target.copy_, tensor) if rows is None else
                          partial(target.index_copy_, 0, rows.to(target.device), tensor.to(target)))
            continue
        param = slots.get(key.removeprefix(PEFT_PREFIX))
        if param is None:
            raise ValueError(f"{file}: key {key!r} matches no adapter of this model "
                             f"(adapters: {sorted(slots)[:6]}...)")
        if param.shape != tensor.shape:
            raise ValueError(f"{file}: {key!r} has shape {tuple(tensor.shape)}, the model expects "
                             f"{tuple(param.shape)}")
        writes.append(partial(param.copy_, tensor))
    if missing := sorted(slots.keys() - {k.removeprefix(PEFT_PREFIX) for k in tensors}):
        raise ValueError(f"{file}: no weights for {len(missing)} adapter tensor(s), e.g. {missing[0]}")
    for write in writes:
        write()


def _base_layers(model: nn.Module, tensors: dict[str, torch.Tensor], file: Path
                 ) -> dict[str, tuple[str, torch.Tensor, torch.Tensor | None]]:
    """The file's base-tensor keys (an adapted embedding's or head's weight, PEFT's biases and
    modules_to_save) -> the codelm path, the model tensor the key names, and its rows there."""
    slots = families.hf_module_slots(model.cfg)
    out = {}
    for key in tensors:
        m = _KEY_RE.match(key)
        if m is None or m["kind"].startswith("lora_"):
            continue
        if m["module"] not in slots:
            raise ValueError(f"{file}: key {key!r} names no module of this model")
        path, rows = slots[m["module"]]
        attr = m["kind"].removeprefix("base_layer.")  # weight or bias
        target = getattr(model.get_submodule(path), attr, None)
        if not isinstance(target, torch.Tensor):
            raise ValueError(f"{file}: cannot load {key!r}: {path} has no full-precision {attr}")
        out[key] = path, target, rows
    return out


def changed_base_tensors(model: nn.Module, adapter_dir: str | Path) -> list[str]:
    """The adapter file's base-layer weights (PEFT saves an adapted embedding's) that differ
    from the model's: changes a run, keeping only what it trains, would lose."""
    file, tensors = _read_weights(Path(adapter_dir))
    changed = []
    for key, (_, target, rows) in _base_layers(model, tensors, file).items():
        if not key.endswith("base_layer.weight"):  # biases and saved modules: trained, kept
            continue
        if rows is not None:
            target = target.index_select(0, rows.to(target.device))
        if target.shape == tensors[key].shape and not torch.equal(target, tensors[key].to(target)):
            changed.append(key)
    return changed


# ----------------------------------------------------------------------------- command line

def tokenizer_size(path: Path) -> int | None:
    """How many ids a tokenizer.json gives out (its vocabulary's and its added tokens'); None
    where there is none, or it lists no id."""
    if not path.is_file():
        return None
    tokenizer = settings.read_json_object(path, "tokenizer")
    model = tokenizer.get("model")
    vocab = model.get("vocab") if isinstance(model, dict) else None
    ids = list(vocab.values()) if isinstance(vocab, dict) else list(range(len(vocab or [])))
    ids += [token["id"] for token in tokenizer.get("added_tokens") or []
            if isinstance(token, dict) and isinstance(token.get("id"), int)]
    return max(ids) + 1 if ids else None


def main(argv: list[str] | None = None) -> int:
    parser = settings.ArgumentParser(
        description="Merge a LoRA adapter (codelm's or PEFT's) into its base model and write a "
        "new HF checkpoint of the base's family, which transformers loads without PEFT.")
    parser.add_argument("adapter", help="the adapter directory (adapter_config.json + weights)")
    parser.add_argument("out", help="the new directory (must not exist)")
    parser.add_argument("--base", help="the base model directory (default: the adapter config's "
                        "base_model_name_or_path)")
    parser.add_argument("--dtype", default="auto", help="auto (the base's own) | bf16 | fp16 | "
                        "fp32: the merged weights' dtype (merged in fp32)")
    args = parser.parse_args(argv)

    def merge() -> None:
        adapter = Path(args.adapter)
        read_adapter_config(adapter)  # a bad adapter is named before the base loads
        base = (hub.checkpoint_dir(args.base, "--base") if args.base  # a hub id: its snapshot
                else adapter_base(adapter, "name it with --base"))
        check_base_family(adapter, base)
        if note := other_base_note(adapter, base):
            print(f"note: {note}: merged into {base}, as given", file=sys.stderr)
        model = pretrained.load(base, dtype=args.dtype)
        report = load_adapter(model, adapter)
        tokenizer_dir = adapter if (adapter / "tokenizer.json").is_file() else base
        tokens = tokenizer_size(tokenizer_dir / "tokenizer.json")
        if tokens is not None and tokens > model.cfg.vocab_size:
            raise ValueError(f"{tokenizer_dir / 'tokenizer.json'} has {tokens} tokens, {base} only "
                             f"{model.cfg.vocab_size} embeddings: the adapter was trained on "
                             "another base; name that one with --base")
        run_dir = rundir.run_of_weights(adapter)  # a run's export/: its task goes with the model
        task = None if run_dir is None else settings.read_json_object(
            run_dir / rundir.CONFIG_FILE, "run config").get("task", "lm")
        pretrained.export_checkpoint(args.out, partial(merge_and_export, model, task=task),
                                     tokenizer_dir, generation_from=base, chat=task == "chat")
        # The adapter's own count (PEFT's q_proj, k_proj, v_proj are one fused qkv here).
        adapted = {name for hits in report.targets.values() for name in hits}
        print(f"wrote {args.out}: the LoRA of {adapter} on {len(adapted)} modules "
              f"({len(report.modules)} codelm modules) merged into {base} "
              f"({model.wte.weight.dtype})")

    return process.run_tool(merge, "interrupted: nothing written")


if __name__ == "__main__":
    sys.exit(process.run_main(main))
