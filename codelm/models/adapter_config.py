"""A LoRA adapter's files and settings: their names, ``LoRAConfig`` (PEFT's LoraConfig under plain
names), and the one check of an adapter_config.json (``read_adapter_config``), which refuses
what codelm's LoRA does not compute as PEFT does."""

from __future__ import annotations

import math
import numbers
import re
from dataclasses import dataclass, field
from pathlib import Path

from codelm.runtime import hub, settings

# init_adapter's adapter_config.json -> the TrainConfig keys it sets (by LoRAConfig's names).
ADAPTER_KEYS = {"r": "lora_r", "alpha": "lora_alpha", "dropout": "lora_dropout",
                "use_dora": "lora_dora", "bias": "lora_bias",
                "modules_to_save": "lora_modules_to_save",
                "target_modules": "lora_targets"}

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
LEGACY_WEIGHTS = "adapter_model.bin"

# PEFT adapter_config.json keys codelm cannot honour, with the value that means "feature unused".
UNSUPPORTED_PEFT_KEYS = {
    "rank_pattern": {}, "alpha_pattern": {}, "layers_to_transform": None,
    "layers_pattern": None, "lora_bias": False, "fan_in_fan_out": False,
    "target_parameters": None, "exclude_modules": None, "layer_replication": None,
    "use_qalora": False, "trainable_token_indices": None, "alora_invocation_tokens": None,
    "use_bdlora": None, "kasa_config": None, "monteclora_config": None, "arrow_config": None,
    "velora_config": None,
}
# The module names whose presence in modules_to_save makes PEFT's ensure_weight_tying tie the
# embedding's saved copy to every module sharing its weight (PEFT's EMBEDDING_LAYER_NAMES).
TYING_NAMES = ("embed_tokens", "lm_head")
# PEFT keys that change neither the loaded adapter's forward nor what trains: how it was made
# (its initialization's settings, Megatron's layers), and the file's own metadata.
IGNORED_PEFT_KEYS = (
    "task_type", "peft_type", "auto_mapping", "peft_version", "base_model_name_or_path",
    "revision", "inference_mode", "megatron_config", "megatron_core", "loftq_config",
    "eva_config", "corda_config", "lora_ga_config", "qalora_group_size", "runtime_config",
    "init_lora_weights")
# init_lora_weights values that leave the base as it is and train A and B (PEFT's pissa,
# olora, corda and loftq rewrite the base when it loads the adapter; mica freezes B).
PLAIN_INITS = (True, False, "gaussian", "eva")
_BASE_REWRITING_INITS = ("pissa", "olora", "corda", "loftq")


@dataclass
class LoRAConfig:
    """PEFT's LoraConfig fields under plain names, checked where they enter. ``target_modules``:
    names matching a module name or its dotted suffix, or one regular expression (PEFT's rules)."""

    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: list[str] | str = field(default_factory=lambda: ["qkv", "attn.proj"])
    bias: str = "none"  # PEFT's: also train and save the adapted modules' biases, or all biases
    modules_to_save: list[str] | None = None  # PEFT's: modules trained whole and saved
    use_rslora: bool = False
    use_dora: bool = False  # weight-decomposed LoRA: a learned magnitude per output row
    # PEFT's: modules_to_save naming an embed_tokens or lm_head trains the embedding and every
    # module tied to it as one tensor (codelm holds tied weights as one, so it trains them so)
    ensure_weight_tying: bool = False

    def __post_init__(self) -> None:
        """Each field as PEFT's adapter_config.json may hold it (_PEFT_FIELDS), else ValueError;
        a tuple of names taken as the list, and numpy's numbers as Python's."""
        for name in ("target_modules", "modules_to_save"):
            if isinstance(getattr(self, name), tuple):
                setattr(self, name, list(getattr(self, name)))
        if isinstance(self.r, numbers.Integral) and not isinstance(self.r, (bool, int)):
            self.r = int(self.r)
        for name in ("alpha", "dropout"):
            value = getattr(self, name)
            if isinstance(value, numbers.Real) and not isinstance(value, (bool, int, float)):
                setattr(self, name, float(value))
        for name, _, fits, words in _PEFT_FIELDS.values():
            if not fits(getattr(self, name)):
                raise ValueError(f"LoRAConfig.{name}={getattr(self, name)!r}: must be {words}")

    @property
    def scale(self) -> float:
        """alpha / r, or alpha / sqrt(r) with rsLoRA (rank-stabilised scaling)."""
        return self.alpha / (math.sqrt(self.r) if self.use_rslora else self.r)


def lora_config(settings) -> LoRAConfig:
    """The LoRAConfig of a run's settings (a TrainConfig or its ModelSettings: lora_r,
    lora_alpha, ...); without lora_targets, LoRAConfig's default targets. A run trains a tied
    embedding and head as one tensor: PEFT's ensure_weight_tying where it applies."""
    values = {name: getattr(settings, key) for name, key in ADAPTER_KEYS.items()
              if key != "lora_targets" or settings.lora_targets}
    return LoRAConfig(**values, ensure_weight_tying=ties_embedding(values["modules_to_save"]))


def ties_embedding(modules_to_save: list[str] | None) -> bool:
    """Whether PEFT's ensure_weight_tying acts on this modules_to_save: it names a module
    whose last dotted part is one of TYING_NAMES."""
    return any(m.rsplit(".", 1)[-1] in TYING_NAMES for m in modules_to_save or ())


def _unused(value: object, unused: object) -> bool:
    """PEFT writes a feature's absence as null, false, {} or [] (by type: 0 is layer 0)."""
    return (value is None or value is False or value in ({}, [])
            or (type(value) is type(unused) and value == unused))


def adapters_below(path: Path) -> str:
    """" (RUN/export holds one)": for a directory given where an adapter's is wanted."""
    inside = sorted(p.parent for p in path.glob(f"*/{ADAPTER_CONFIG}"))
    return f" ({', '.join(map(str, inside))} holds one)" if inside else ""


def _is_targets(value: object) -> bool:
    """A non-empty list of module names, or one regular expression: PEFT's two forms."""
    if isinstance(value, str):
        try:
            return re.compile(value) is not None
        except re.error:
            return False
    return isinstance(value, list) and bool(value) and all(isinstance(t, str) for t in value)


# adapter_config.json key -> (LoRAConfig field, value when absent, test of the value, its words)
_PEFT_FIELDS = {
    "r": ("r", None, lambda v: settings.is_number(v, int) and v > 0, "a positive integer"),
    "lora_alpha": ("alpha", None, lambda v: settings.is_number(v) and math.isfinite(v) and v != 0,
                   "a finite number other than 0"),
    "lora_dropout": ("dropout", 0.0, lambda v: settings.is_number(v) and 0 <= v < 1,
                     "a number in [0, 1)"),
    "target_modules": ("target_modules", None, _is_targets,
                       "a list of module names or one valid regular expression"),
    "bias": ("bias", "none", lambda v: v in ("none", "lora_only", "all"),
             "'none', 'lora_only' or 'all'"),
    "modules_to_save": ("modules_to_save", None, lambda v: v is None or (
        isinstance(v, list) and all(isinstance(m, str) for m in v)), "a list of module names"),
    "use_rslora": ("use_rslora", False, lambda v: isinstance(v, bool), "true/false"),
    "use_dora": ("use_dora", False, lambda v: isinstance(v, bool), "true/false"),
    "ensure_weight_tying": ("ensure_weight_tying", False, lambda v: isinstance(v, bool),
                            "true/false"),
}


def read_adapter_config(path: str | Path, config_name: str = ADAPTER_CONFIG) -> LoRAConfig:
    """The LoRAConfig of an adapter directory, refusing what codelm cannot honour: the one check
    of every adapter_config.json read (``config_name``: a run's copy has its own name)."""
    path = Path(path)
    file = path / config_name
    if not file.is_file():
        raise ValueError(f"{file}: not found; an adapter directory holds {ADAPTER_CONFIG} and "
                         f"{ADAPTER_WEIGHTS}{adapters_below(path)}")
    raw = settings.read_json_object(file, "adapter config")
    if raw.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"{file}: peft_type {raw['peft_type']!r} is not LORA")
    for key, unused in UNSUPPORTED_PEFT_KEYS.items():
        if not _unused(raw.get(key, unused), unused):
            raise ValueError(f"{file}: {key}={raw[key]!r} is not supported by codelm's LoRA")
    init = raw.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower().startswith(_BASE_REWRITING_INITS):
        raise ValueError(f"{file}: init_lora_weights={init!r} is not supported: convert it to a "
                         "plain LoRA adapter with PEFT's path_initial_model_for_weight_conversion")
    if init not in PLAIN_INITS:
        raise ValueError(f"{file}: init_lora_weights={init!r} is not supported by codelm's LoRA "
                         f"(it trains adapters made with {', '.join(map(repr, PLAIN_INITS))})")
    values = {}
    for key, (name, absent, fits, words) in _PEFT_FIELDS.items():
        values[name] = raw.get(key, absent)
        if not fits(values[name]):
            raise ValueError(f"{file}: {key}={values[name]!r}: must be {words}")
    return LoRAConfig(**values)


def adapter_base(adapter_dir: str | Path, remedy: str, config_name: str = ADAPTER_CONFIG
                 ) -> Path:
    """The base model an adapter's config names (a directory or a cached hub id); ``remedy``
    ends the error otherwise."""
    file = Path(adapter_dir) / config_name
    config = settings.read_json_object(file, "adapter config")
    base = config.get("base_model_name_or_path")
    if base is not None and not isinstance(base, str):
        raise ValueError(f"{file}: base_model_name_or_path={base!r}: expected a string (the "
                         f"base's directory or hub id); {remedy}")
    revision = config.get("revision")
    if base and revision and hub.is_hub_id(base) and "@" not in base:  # the commit it names
        base = f"{base}@{revision}"
    try:
        path = hub.checkpoint_dir(base, f"{file}: base_model_name_or_path") if base else None
    except ValueError as e:
        raise ValueError(f"{e}; or {remedy}") from None
    if path is None or not path.is_dir():
        raise ValueError(f"{file}: base_model_name_or_path {base!r} is not a local directory; "
                         f"{remedy}")
    return path


def _other_named_base(adapter_dir: Path, base: Path, config_name: str) -> Path | None:
    """The local directory an adapter's config names as its base, where it is not ``base``;
    None where it is, or the config names none (no string) or a hub id (not looked up: nothing
    is downloaded for a check)."""
    config = settings.read_json_object(adapter_dir / config_name, "adapter config")
    named = config.get("base_model_name_or_path")
    if not isinstance(named, str) or not named or not Path(named).is_dir() or (
            Path(named).resolve() == base.resolve()):
        return None
    return Path(named)


def _model_type(checkpoint: Path) -> str | None:
    try:
        return settings.read_json_object(checkpoint / "config.json", "config").get("model_type")
    except (ValueError, OSError):  # not an HF checkpoint: nothing to compare
        return None


def check_base_family(adapter_dir: str | Path, base: str | Path,
                      config_name: str = ADAPTER_CONFIG) -> None:
    """Refuse a base of another family (config.json's model_type) than the base the adapter's
    config names: its weights were trained for another architecture, even where the shapes
    agree."""
    adapter_dir, base = Path(adapter_dir), Path(base)
    named = _other_named_base(adapter_dir, base, config_name)
    if named is None:
        return
    trained_on, given = _model_type(named), _model_type(base)
    if trained_on and given and trained_on != given:
        raise ValueError(f"{adapter_dir / config_name} was trained on {named}, a {trained_on} "
                         f"model; {base} is a {given} model: give a {trained_on} base")


def other_base_note(adapter_dir: str | Path, base: str | Path,
                    config_name: str = ADAPTER_CONFIG) -> str | None:
    """Where ``base`` is not the local directory the adapter's config names: a note saying so
    (the adapter's deltas were trained against that base's weights); None where it is, or the
    config names none or a hub id."""
    adapter_dir, base = Path(adapter_dir), Path(base)
    named = _other_named_base(adapter_dir, base, config_name)
    if named is None:
        return None
    return f"{adapter_dir / config_name} names the base {named}, not {base}"
