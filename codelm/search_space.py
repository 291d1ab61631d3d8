"""A sweep's search space: a JSON file of TrainConfig keys and their distributions
(configs/search_spaces/*.json), checked against TrainConfig, and the values each trial's
suggestions give (hyperparam_tune.py samples them through Optuna)."""

from __future__ import annotations

import dataclasses
import json
import math
import typing
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path

import optuna

from codelm import trainconfig
from codelm.runs import checkpoint as checkpoint_module
from codelm.runtime import settings
from codelm.trainconfig import HF_FLAGS, TrainConfig

SPACES_DIR = settings.bundled("configs", "search_spaces")


@dataclass
class SpaceFile:
    """What a search space file holds (configs/search_spaces/*.json)."""

    params: dict = dataclasses.field(default_factory=dict)  # name -> distribution spec
    base: dict = dataclasses.field(default_factory=dict)  # TrainConfig values of every trial
    requires: list[str] = dataclasses.field(default_factory=list)  # keys --train-config sets
    description: str = ""


@dataclass
class SearchSpace(SpaceFile):
    """A checked space file (``base`` with absolute paths) and where it came from."""

    source: str = ""

    def extremes(self) -> list[tuple[str, typing.Any]]:
        """(name, value) for each choice and range end (as a step lets a trial reach it)."""
        values = []
        for name, spec in self.params.items():
            dist = distribution(spec)
            ends = spec["choices"] if spec["type"] == "categorical" else (dist.low, dist.high)
            values += [(name, value) for value in ends]
        return values

    def distributions(self) -> dict[str, optuna.distributions.BaseDistribution]:
        return {name: distribution(spec) for name, spec in self.params.items()}

    def values(self, params: dict) -> dict:
        """A trial's TrainConfig values; a list or object choice was sampled as its JSON."""
        return {name: json.loads(params[name]) if spec["type"] == "categorical"
                and params[name] not in spec["choices"] else params[name]
                for name, spec in self.params.items()}


def distribution(spec: dict) -> optuna.distributions.BaseDistribution:
    if spec["type"] == "categorical":  # Optuna stores scalar choices; lists and objects as JSON
        return optuna.distributions.CategoricalDistribution(
            [json.dumps(c) if isinstance(c, (list, dict)) else c for c in spec["choices"]])
    if spec["type"] == "int":
        return optuna.distributions.IntDistribution(
            spec["low"], spec["high"], log=spec.get("log", False), step=spec.get("step", 1))
    return optuna.distributions.FloatDistribution(
        spec["low"], spec["high"], log=spec.get("log", False), step=spec.get("step"))


def _check_spec_types(spec: typing.Any, where: str) -> None:
    """Each field of one parameter's spec has its JSON type (Optuna reads "false" as true)."""
    if not isinstance(spec, dict):
        raise ValueError(f"{where}: must be an object with a 'type', got {spec!r}")
    kind = spec.get("type")
    if kind not in ("categorical", "float", "int"):
        raise ValueError(f"{where}.type: must be one of categorical, float, int; got {kind!r}")
    keys = {"type", "choices"} if kind == "categorical" else {"type", "low", "high", "log", "step"}
    if extra := set(spec) - keys:
        raise ValueError(f"{where}: unknown key(s) {sorted(extra)}; a {kind} parameter's keys "
                         f"are {', '.join(sorted(keys))}")
    if kind == "categorical":
        if not isinstance(spec.get("choices"), list) or not spec["choices"]:
            raise ValueError(f"{where}.choices: must be a non-empty list, got "
                             f"{spec.get('choices')!r}")
        return
    if missing := {"low", "high"} - set(spec):
        raise ValueError(f"{where}: missing {sorted(missing)}")
    number, what = (int, "an integer") if kind == "int" else (float, "a finite number")
    for field in ("low", "high", "step"):
        value = spec.get(field, 0)  # JSON's true/false are Python ints: refused too
        if not settings.is_number(value, number) or not math.isfinite(value):
            raise ValueError(f"{where}.{field}: must be {what}, got {value!r}")
    if not isinstance(spec.get("log", False), bool):
        raise ValueError(f"{where}.log: must be true or false (a JSON boolean), "
                         f"got {spec['log']!r}")


def absolute_paths(values: dict, source: str) -> dict:
    """TrainConfig ``values`` with their paths absolute, as a run's config.json holds them."""
    paths = {k: values[k] for k in checkpoint_module.PATH_KEYS if k in values}
    absolute = checkpoint_module.with_absolute_paths(trainconfig.config_from_dict(paths, source))
    return {**values, **{k: getattr(absolute, k) for k in paths}}


def check_no_resume_or_time_budget(values: dict, source: str) -> None:
    """Each trial is a new run of the sweep's budget: no ``resume``, no ``max_time_s``."""
    if values.get("resume") is not None:
        raise ValueError(f"{source}: resume: each trial is a new run: remove 'resume'")
    if values.get("max_time_s") is not None:
        raise ValueError(f"{source}: max_time_s: trials share --max-steps or --time-budget-min, "
                         "a run cut short by max_time_s would be ranked as an equal: remove it")


def load_space(space: str, sweep_keys: Collection[str]) -> SearchSpace:
    """A built-in space name or a JSON file; every key and bound is checked against TrainConfig
    (``sweep_keys``: the TrainConfig keys a sweep sets on every trial, which no space samples)."""
    path = SPACES_DIR / f"{space}.json"
    if not path.is_file():
        path = Path(space)
    if not path.is_file():
        builtin = sorted(p.stem for p in SPACES_DIR.glob("*.json"))
        close = settings.closest_key(space, builtin)
        hint = f"; did you mean {close!r}?" if close else ""
        raise ValueError(f"search space {space!r}: not a built-in space {builtin} nor a "
                         f"file{hint}")
    source = str(path)
    data = settings.config_from_dict(
        SpaceFile, settings.read_json_object(path, "search space", strict=True), source)
    if not data.params:
        raise ValueError(f"{source}: a search space needs a non-empty 'params' object")
    trainconfig.config_from_dict(data.base, f"{source}: base")
    check_no_resume_or_time_budget(data.base, f"{source}: base")
    check_no_resume_or_time_budget(data.params, f"{source}: params")
    for name in sorted(set(data.params) & set(sweep_keys)):  # sampled, then overwritten
        raise ValueError(f"{source}: params.{name}: the sweep sets it for every trial: remove it")
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    for name, spec in data.params.items():
        where = f"{source}: params.{name}"
        if name not in known:
            raise ValueError(f"{where}: not a TrainConfig key; "
                             f"{settings.key_hint(name, known, 'TrainConfig', HF_FLAGS)}")
        _check_spec_types(spec, where)
        try:  # Optuna's own checks: low <= high, log needs low > 0 and no step, ...
            distribution(spec)
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from None
    if unknown := sorted(set(data.requires) - known):
        raise ValueError(f"{source}: requires: not TrainConfig key(s) {unknown}")
    space = SearchSpace(**{**vars(data), "base": absolute_paths(data.base, f"{source}: base")},
                        source=source)
    for name, value in space.extremes():
        trainconfig.config_from_dict({**space.base, name: value}, f"{source}: params.{name}")
    return space


def largest_value(space: SearchSpace, name: str) -> float | None:
    """The largest value a trial can draw for ``name`` (as a step lets it reach the range's
    end; a categorical's largest choice), None where the space does not sample it."""
    if name not in space.params:
        return None
    drawn = distribution(space.params[name])
    if isinstance(drawn, optuna.distributions.CategoricalDistribution):
        return max((c for c in drawn.choices if isinstance(c, int | float)), default=None)
    return drawn.high


def below(space: SearchSpace, name: str, limit: int) -> SearchSpace:
    """``space`` with ``name`` drawn below ``limit`` only: a range's high the largest value its
    step reaches under it (a float range without a step: the float just under it), a
    categorical's numeric choices under it (others kept); as it is where nothing it draws
    reaches ``limit``. ValueError where nothing is left."""
    spec = space.params.get(name)
    if spec is None or (largest_value(space, name) or -math.inf) < limit:
        return space
    if spec["type"] == "categorical":
        choices = [c for c in spec["choices"] if not isinstance(c, int | float) or c < limit]
        fitted = {**spec, "choices": choices}
        left = bool(choices)
    else:
        step = spec.get("step") or (1 if spec["type"] == "int" else None)
        if step is None:
            high = math.nextafter(limit, -math.inf)
        else:
            high = spec["low"] + (math.ceil((limit - spec["low"]) / step) - 1) * step
        fitted = {**spec, "high": high}
        left = high >= spec["low"]
    if not left:
        raise ValueError(f"{space.source}: params.{name} draws nothing below {limit}: give it "
                         f"values below {limit}")
    return dataclasses.replace(space, params={**space.params, name: fitted})
