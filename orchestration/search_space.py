"""Search spaces: YAML files over config field names, validated before anything starts.

Two kinds. ``optuna`` (the default) samples ``params`` with Optuna; ``start`` lists points evaluated first (the
paper's values). ``grid`` runs every entry of ``variants`` (the ablation tables). Both may set ``fixed`` overrides
for every trial. Example::

    kind: optuna
    description: ranges around the paper's values
    params:
      model.alpha_init: {type: float, low: 0.01, high: 1.0, log: true}
      model.K: {type: int, low: 1, high: 8}
      model.fusion: {type: choice, values: [chi, mhsa]}
    start:
      - {model.alpha_init: 0.1, model.K: 4, model.fusion: chi}
    fixed: {optim.epochs: 50}

Every name is checked against ``STMIConfig`` and every value against the field's type; an unknown field, an
empty range or a wrong type raises :class:`SearchSpaceError` naming the file and the field.
"""

from __future__ import annotations

import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from stmi.config import ConfigError, STMIConfig, apply_overrides, coerce, field_types, unknown_field_message

SEARCH_SPACES_DIR = Path(__file__).resolve().parent.parent / "search_spaces"
TOP_KEYS = {"kind", "description", "params", "start", "fixed", "variants", "metric", "mode"}
PARAM_KEYS = {"float": {"type", "low", "high", "log"}, "int": {"type", "low", "high", "log", "step"},
              "choice": {"type", "values"}}


class SearchSpaceError(ValueError):
    """A search-space file is invalid; the message names the file and the field."""


@dataclass(frozen=True)
class ParamSpec:
    """One searched field."""

    name: str
    type: Literal["float", "int", "choice"]
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: int | None = None
    values: tuple[Any, ...] = ()


@dataclass(frozen=True)
class SearchSpace:
    """A validated search space."""

    path: Path
    kind: Literal["optuna", "grid"]
    description: str = ""
    params: dict[str, ParamSpec] = field(default_factory=dict)
    start: list[dict[str, Any]] = field(default_factory=list)
    fixed: dict[str, Any] = field(default_factory=dict)
    variants: dict[str, dict[str, Any]] = field(default_factory=dict)
    metric: str = "best_val_mAP"
    mode: Literal["max", "min"] = "max"

    @property
    def name(self) -> str:
        return self.path.stem

    def optuna_distributions(self) -> dict[str, Any]:
        """``{field: optuna distribution}`` for ``OptunaSearch(space=...)``."""
        import optuna.distributions as d

        out: dict[str, Any] = {}
        for name, p in self.params.items():
            if p.type == "float":
                out[name] = d.FloatDistribution(p.low, p.high, log=p.log)
            elif p.type == "int":
                out[name] = d.IntDistribution(int(p.low), int(p.high), log=p.log, step=p.step or 1)
            else:
                out[name] = d.CategoricalDistribution(list(p.values))
        return out

    def trial_overrides(self, config: dict[str, Any]) -> dict[str, Any]:
        """The config overrides of one trial: ``fixed``, then the variant (grid) or sampled values (optuna)."""
        out = dict(self.fixed)
        if self.kind == "grid":
            out.update(self.variants[config["variant"]])
        else:
            out.update({k: config[k] for k in self.params if k in config})
        return out


def resolve_path(name_or_path: str | Path) -> Path:
    """``paper`` / ``paper.yaml`` / ``search_spaces/paper.yaml`` / an absolute path -> an existing file."""
    p = Path(name_or_path)
    for cand in (p, SEARCH_SPACES_DIR / p, SEARCH_SPACES_DIR / f"{p}.yaml"):
        if cand.is_file():
            return cand.resolve()
    known = ", ".join(sorted(f.stem for f in SEARCH_SPACES_DIR.glob("*.yaml")))
    raise SearchSpaceError(f"{name_or_path}: no such search-space file (known: {known})")


def load_search_space(name_or_path: str | Path) -> SearchSpace:
    """Read and validate a search-space YAML file.

    Raises:
        SearchSpaceError: the file, the field and what is wrong.
    """
    path = resolve_path(name_or_path)
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise SearchSpaceError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise SearchSpaceError(f"{path}: expected a mapping with 'params' or 'variants' at the top level")
    err = _Errors(path)
    unknown = set(raw) - TOP_KEYS
    if unknown:
        err(f"unknown top-level field(s) {sorted(unknown)} (allowed: {sorted(TOP_KEYS)})")
    kind = raw.get("kind", "optuna")
    if kind not in ("optuna", "grid"):
        err(f"kind: {kind!r} is not one of ['optuna', 'grid']")
    types = field_types()
    params: dict[str, ParamSpec] = {}
    if kind == "optuna":
        rp = raw.get("params")
        if not isinstance(rp, dict) or not rp:
            err("params: an optuna search space needs a non-empty 'params' mapping")
        for name, spec in rp.items():
            params[name] = _param(err, types, name, spec)
        if "variants" in raw:
            err("variants: only for kind: grid")
    fixed = _overrides(err, raw.get("fixed") or {}, "fixed")
    start = []
    for i, point in enumerate(raw.get("start") or []):
        point = _overrides(err, point, f"start[{i}]")
        missing = set(params) - set(point)
        extra = set(point) - set(params)
        if missing or extra:
            err(f"start[{i}]: must give exactly the searched fields; missing {sorted(missing)}, extra {sorted(extra)}")
        for name, value in point.items():
            p = params[name]
            if p.type == "choice" and value not in p.values:
                err(f"start[{i}].{name}: {value!r} is not among the values {list(p.values)}")
            if p.type != "choice" and not (p.low <= value <= p.high):
                err(f"start[{i}].{name}: {value} is outside [{p.low}, {p.high}]")
        start.append(point)
    variants: dict[str, dict[str, Any]] = {}
    if kind == "grid":
        rv = raw.get("variants")
        if not isinstance(rv, dict) or not rv:
            err("variants: a grid search space needs a non-empty 'variants' mapping of name -> overrides")
        for vname, ov in rv.items():
            variants[str(vname)] = _overrides(err, ov or {}, f"variants.{vname}")
        if "params" in raw:
            err("params: only for kind: optuna (a grid lists 'variants')")
    metric = raw.get("metric", "best_val_mAP")
    mode = raw.get("mode", "max")
    if not isinstance(metric, str) or not metric:
        err("metric: must be a metric name such as best_val_mAP")
    if mode not in ("max", "min"):
        err(f"mode: {mode!r} is not one of ['max', 'min']")
    ss = SearchSpace(path, kind, str(raw.get("description", "")), params, start, fixed, variants, metric, mode)
    # every combination must build a valid config (e.g. a choice value of a Literal field)
    try:
        apply_overrides(STMIConfig(), fixed)
    except ConfigError as e:
        err(f"fixed: {e}")
    return ss


class _Errors:
    def __init__(self, path: Path) -> None:
        self.path = path

    def __call__(self, msg: str) -> typing.NoReturn:
        raise SearchSpaceError(f"{self.path}: {msg}")


def _param(err: _Errors, types: dict[str, Any], name: str, spec: Any) -> ParamSpec:
    if name not in types:
        err(f"params.{name}: {unknown_field_message(str(name), types)}")
    if not isinstance(spec, dict) or "type" not in spec:
        err(f"params.{name}: expected a mapping with 'type' (float | int | choice)")
    t = spec["type"]
    if t not in PARAM_KEYS:
        err(f"params.{name}.type: {t!r} is not one of {sorted(PARAM_KEYS)}")
    extra = set(spec) - PARAM_KEYS[t]
    if extra:
        err(f"params.{name}: unknown key(s) {sorted(extra)} for type {t} (allowed: {sorted(PARAM_KEYS[t])})")
    tp = types[name]
    if t == "choice":
        values = spec.get("values")
        if not isinstance(values, list) or not values:
            err(f"params.{name}.values: an empty choice; give a non-empty list")
        try:
            values = [coerce(name, v, tp) for v in values]
        except ConfigError as e:
            err(f"params.{name}.values: {e}")
        return ParamSpec(name, "choice", values=tuple(values))
    base = _base_type(tp)
    if base not in (int, float):
        err(f"params.{name}: field type is {tp}, so only 'choice' can search it (not {t})")
    if t == "float" and base is int:
        err(f"params.{name}: the field is an integer; use type: int")
    for key in ("low", "high"):
        if key not in spec:
            err(f"params.{name}.{key}: required for type {t}")
        v = spec[key]
        if isinstance(v, bool) or not isinstance(v, (int, float)) or (t == "int" and not float(v).is_integer()):
            err(f"params.{name}.{key}: expected {'an integer' if t == 'int' else 'a number'}, got {v!r}")
    low, high = spec["low"], spec["high"]
    if not low < high:
        err(f"params.{name}: empty range [{low}, {high}] (need low < high)")
    log_ = spec.get("log", False)
    if not isinstance(log_, bool):
        err(f"params.{name}.log: expected true/false, got {log_!r}")
    if log_ and low <= 0:
        err(f"params.{name}: a log range needs low > 0, got {low}")
    step = spec.get("step")
    if step is not None and (not isinstance(step, int) or isinstance(step, bool) or step < 1):
        err(f"params.{name}.step: expected a positive integer, got {step!r}")
    return ParamSpec(name, t, float(low) if t == "float" else int(low), float(high) if t == "float" else int(high),
                     log_, step)


def _base_type(tp: Any) -> Any:
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    return args[0] if typing.get_origin(tp) is not None and len(args) == 1 and typing.get_origin(tp) is not Literal \
        else tp


def _overrides(err: _Errors, mapping: Any, where: str) -> dict[str, Any]:
    if not isinstance(mapping, dict):
        err(f"{where}: expected a mapping of config field -> value")
    types = field_types()
    out = {}
    for k, v in mapping.items():
        if k not in types:
            err(f"{where}.{k}: {unknown_field_message(str(k), types)}")
        try:
            out[k] = coerce(k, v, types[k])
        except ConfigError as e:
            err(f"{where}.{k}: {e}")
    return out
