"""Typed configuration of an STMI run.

One dataclass per concern (model, losses, data, optimisation, final evaluation), gathered in :class:`STMIConfig`.
Named recipes (``stmi.recipes``) are functions returning an ``STMIConfig``; search spaces and command-line overrides are
flat dicts over dotted field names (``model.alpha_init``) applied with :func:`apply_overrides`, which
uses ``dataclasses.replace`` and checks every name and type, so a typo fails before anything starts.

Values the paper does not publish (alpha/beta init, p, tau) are our defaults; each field says so. Every field, with
its type, default and meaning, is listed in docs/config.md (generated from this file by :func:`fields_reference`).
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import inspect
import json
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal

FIELDS_DOC = "docs/config.md"
"""Where every config field is listed (the pointer unknown-field errors give)."""


def __getattr__(name: str) -> Any:
    # ``DATASETS`` is the dataset registry's name tuple (``stmi.data.layouts.LAYOUTS``), looked up on first use:
    # importing the data package here at import time would be circular (its loaders import this module).
    if name == "DATASETS":
        from stmi.data.layouts import DATASETS

        return DATASETS
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@dataclass(frozen=True)
class ModelConfig:
    """The STMI model (paper eq. 1-20; the choices the paper leaves open: docs/design.md)."""

    clip_model: str = "ViT-B-16"
    """open_clip model config name; ``stmi-tiny`` (tests) and ``stmi-tiny-p8`` (demo) are tiny registered ones."""
    pretrained: str | None = None
    """``None`` (random init), ``openai`` (the user's open_clip cache) or a path to a local CLIP checkpoint."""
    image_size: tuple[int, int] = (256, 128)
    """Input (H, W); positional embeddings are interpolated to this grid when weights are loaded."""
    separate_backbones: bool = False
    """Three visual encoders (one per modality) instead of one shared encoder."""
    use_sie: bool = True
    """Side-information (camera) embedding added to the CLS token; inference without a camera id works."""
    num_cameras: int = 0
    """Number of cameras for SIE; 0 disables SIE whatever ``use_sie`` says (set by the dataset recipe)."""
    sie_coef: float = 1.0
    """Scale of the camera embedding."""

    use_sfm: bool = True
    """Segmentation-guided feature modulation in the visual attention layers (table 3)."""
    sfm_sharing: Literal["layer", "shared", "head"] = "layer"
    """One (alpha, beta) per layer (paper's best, table 5 E), one for all layers, or per layer and head."""
    sfm_layers: Literal["all", "early", "late"] = "all"
    """Which layers are modulated: all, the first half, or the second half (table 5 B, C)."""
    alpha_init: float = 0.1
    """Initial foreground-enhancement strength (not published; our default, searched)."""
    beta_init: float = 0.1
    """Initial background-suppression strength (not published; our default, searched)."""
    p: float = 0.1
    """Probability of flipping a background patch token to foreground in training (searched)."""
    mask_patch_threshold: float = 0.5
    """A patch is foreground when at least this fraction of its mask pixels is foreground."""

    use_str: bool = True
    """Semantic token reallocation (table 3); off -> the fusion sees the modality CLS tokens only."""
    K: int = 4
    """Learnable queries per modality in STR (paper best: 4)."""
    str_heads: int = 8
    """Heads of the STR cross-attention (must divide the embedding dim)."""
    str_share_weights: bool = True
    """STR cross-attention and FFN weights shared by the modalities (queries are always per modality)."""
    use_text: bool = True
    """Append the CLIP text feature T to the STR queries and supervise it (L(T))."""

    fusion: Literal["chi", "concat", "mlp", "mhsa"] = "chi"
    """Token fusion after STR (table 4); ``concat`` is no interaction."""
    tau: float = 0.5
    """CHI hyperedge threshold on cosine similarity (not published; our default, searched)."""
    chi_layers: int = 1
    """Stacked hypergraph convolutions."""
    use_global_fusion: bool = True
    """U = CrossAttn(G, H', H') + G (eq. 18); off -> U = G."""

    retrieval_feature: Literal["G", "U", "GU"] = "GU"
    """Which post-BN features form the retrieval embedding."""
    num_classes: int = 0
    """Training identities (set by the data pipeline)."""
    sfm_kernel: Literal["auto", "flex", "explicit"] = "auto"
    """SFM attention kernel: ``flex`` (compiled flex_attention), ``explicit`` (custom autograd over explicit
    logits) or ``auto`` (flex on CUDA, explicit on CPU, where it is the faster; benchmarks/sfm_attention.py)."""


@dataclass(frozen=True)
class LossConfig:
    """Eq. 19-20: per supervised feature ``ce_weight * CE_ls + triplet_weight * triplet``."""

    ce_weight: float = 0.25
    triplet_weight: float = 1.0
    label_smoothing: float = 0.1
    triplet_margin: float | None = None
    """``None`` = soft-margin batch-hard triplet (default); a float = hard margin."""


@dataclass(frozen=True)
class DataConfig:
    """Where the data is and how it is read (layouts and formats: docs/datasets.md)."""

    dataset: str = "rgbnt201"
    """rgbnt201 | rgbnt100 | msvr310."""
    root: str = ""
    """Folder that holds the dataset folder (``<root>/RGBNT201/...``); absolute in distributed runs."""
    batch_size: int = 72
    """Triplets per optimisation step (over all ranks)."""
    num_instances: int = 8
    """K of the P x K identity sampler."""
    num_workers: int = 2
    """DataLoader worker processes per rank."""
    val_fraction: float = 0.2
    """Fraction of training identities held out for model selection (0 disables validation)."""
    select_on_test: bool = False
    """Reproduce the anchors' habit of choosing the checkpoint on the test set (not recommended)."""
    flip_p: float = 0.5
    pad: int = 10
    erasing_p: float = 0.5
    cache: bool = True
    """Serve the loaders from the decoded-frame cache (each split decoded once per node and input size, then
    memory-mapped; augmentation on batches); false reads and decodes the image files per item every epoch."""
    cache_dir: str = ""
    """Node-local folder of the frame cache; empty: ``$STMI_CACHE_DIR``, else ``~/.cache/stmi/frames``."""
    modality_dropout: float = 0.0
    """Training only: probability that each modality (RGB, NIR, TIR, times ``modality_dropout_scale``) of a training
    triplet is dropped, i.e. marked absent for the model; never all three (independent drops conditioned on keeping
    one: stmi.data.batch.draw_presence). 0 (the paper's recipe): off. Searchable, in [0, 1]."""
    modality_dropout_scale: tuple[float, float, float] = (1.0, 1.0, 1.0)
    """Per-modality factors (RGB, NIR, TIR) of ``modality_dropout``: modality m is dropped with probability
    ``modality_dropout * scale[m]``, which must be in [0, 1] (``0,0,2`` with 0.25 drops only TIR, half the time)."""

    def __post_init__(self) -> None:
        rates = self.modality_dropout_rates()
        if not 0.0 <= self.modality_dropout <= 1.0 or any(s < 0 for s in self.modality_dropout_scale) \
                or any(r > 1.0 for r in rates):
            raise ConfigError(f"data.modality_dropout={self.modality_dropout} x data.modality_dropout_scale="
                              f"{self.modality_dropout_scale} gives per-modality drop rates {rates}; each must be in "
                              f"[0, 1]: lower data.modality_dropout or the scale")
        if all(r == 1.0 for r in rates):
            raise ConfigError("data.modality_dropout with data.modality_dropout_scale drops all three modalities "
                              "with probability 1, but a triplet always keeps one; lower one modality's rate below 1")

    def modality_dropout_rates(self) -> tuple[float, float, float]:
        """The per-modality drop probabilities (RGB, NIR, TIR): ``modality_dropout * modality_dropout_scale``."""
        r = tuple(float(self.modality_dropout) * float(s) for s in self.modality_dropout_scale)
        return r[0], r[1], r[2]


@dataclass(frozen=True)
class OptimConfig:
    """Adam + warmup + cosine (paper: 3.5e-6 decayed to 3.5e-7)."""

    lr: float = 3.5e-6
    """Base learning rate (searched)."""
    min_lr: float = 3.5e-7
    """Learning rate at the end of the cosine."""
    head_lr_mult: float = 1.0
    """Learning-rate multiplier for parameters outside the CLIP towers (STR, CHI, fusion, heads, alpha/beta)."""
    weight_decay: float = 1e-4
    warmup_epochs: int = 5
    warmup_factor: float = 0.1
    epochs: int = 50
    eval_every: int = 1
    seed: int = 1111
    amp: bool = True
    """bf16 autocast on GPU (ignored on CPU)."""
    grad_clip: float | None = None
    deterministic: bool = False
    """Bit-reproducible runs: torch's deterministic algorithms, the math attention kernel (no flash / memory-efficient
    SDPA, SFM's explicit kernel), cuDNN autotuning off, seeded loader workers. Slower on GPUs."""


@dataclass(frozen=True)
class EvalConfig:
    """What the test at the end of a run evaluates besides the complete triplets (docs/design.md)."""

    missing: Literal["none", "topreid", "any2any", "all"] = "none"
    """Missing-modality protocols of the final test (``stmi.eval_missing``): TOP-ReID's six settings (query and
    gallery lack the same modalities), MDReID's any-to-any grid (query and gallery each any non-empty subset, 49
    settings), both, or none. Logged as ``test_missing/<protocol>/<setting>/<metric>`` and a table."""
    missing_input: Literal["mask", "zero"] = "mask"
    """How an absent modality reaches the model in those protocols: the presence mask (STMI's design), or a zero
    frame fed as if present (how TOP-ReID's successors simulate it; a baseline)."""


@dataclass(frozen=True)
class STMIConfig:
    """A whole run: model, losses, data, optimisation and the final evaluation."""

    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    recipe: str = "custom"
    """Name of the recipe this config came from (recorded with every run)."""


class ConfigError(ValueError):
    """A config override or search-space entry names an unknown field or has the wrong type."""


def field_types(cls: type = STMIConfig, prefix: str = "") -> dict[str, Any]:
    """Flat map ``dotted.name -> type annotation`` of every leaf field."""
    hints = typing.get_type_hints(cls)
    out: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if isinstance(tp, type) and dataclasses.is_dataclass(tp):
            out.update(field_types(tp, f"{prefix}{f.name}."))
        else:
            out[f"{prefix}{f.name}"] = tp
    return out


def coerce(name: str, value: Any, tp: Any) -> Any:
    """Check (and gently convert: int -> float, str from the command line) ``value`` against ``tp``."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{name}: {value!r} is not one of {list(args)}")
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        if isinstance(value, str) and value.lower() in ("none", "null") and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return coerce(name, value, a)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{name}: bad value {value!r}")
    if origin is tuple:
        if isinstance(value, str):
            value = [v for v in value.replace("x", ",").split(",") if v]
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ConfigError(f"{name}: expected {len(args)} values, got {value!r}")
        return tuple(coerce(name, v, a) for v, a in zip(value, args))
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "false", "0", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(f"{name}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"{name}: expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
        raise ConfigError(f"{name}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"{name}: expected a number, got {value!r}")
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{name}: expected a number, got {value!r}")
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{name}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{name}: unsupported field type {tp}")


def apply_overrides(cfg: STMIConfig, overrides: dict[str, Any]) -> STMIConfig:
    """Return ``cfg`` with ``{"model.K": 8, "optim.lr": 1e-5}`` applied via ``dataclasses.replace``.

    Raises:
        ConfigError: an unknown field (with the close names) or a value of the wrong type.
    """
    types_ = field_types()
    per_section: dict[str, dict[str, Any]] = {}
    top: dict[str, Any] = {}
    for name, value in overrides.items():
        if name not in types_:
            raise ConfigError(unknown_field_message(name, types_))
        v = coerce(name, value, types_[name])
        if "." in name:
            sec, leaf = name.split(".", 1)
            per_section.setdefault(sec, {})[leaf] = v
        else:
            top[name] = v
    changes = {sec: dataclasses.replace(getattr(cfg, sec), **vals) for sec, vals in per_section.items()}
    return dataclasses.replace(cfg, **changes, **top)


def unknown_field_message(name: str, names: typing.Iterable[str] | None = None) -> str:
    """``unknown config field 'model.taus' (did you mean model.tau?); every field, ... is listed in docs/config.md``.

    Close matches: the same leaf in another section or in another case (``data.K`` -> ``model.K``), then names whose
    leaf is close by ``difflib`` (``model.alhpa_init`` -> ``model.alpha_init``), those of the same section first.
    """
    names = list(field_types() if names is None else names)
    section, _, leaf = name.rpartition(".")
    close = [k for k in names if k.rpartition(".")[2].lower() == leaf.lower()]
    leaves: dict[str, list[str]] = {}
    for k in names:
        leaves.setdefault(k.rpartition(".")[2], []).append(k)
    for match in difflib.get_close_matches(leaf, leaves, n=3, cutoff=0.7):
        ranked = sorted(leaves[match], key=lambda k: k.rpartition(".")[0] != section)
        close += [k for k in ranked if k not in close]
    hint = f" (did you mean {', '.join(close[:4])}?)" if close else ""
    return f"unknown config field {name!r}{hint}; every field, with its type and default, is listed in {FIELDS_DOC}"


def _field_docs(cls: type) -> dict[str, str]:
    """Attribute docstrings (the string literal after a field) of a dataclass, read from its source."""
    tree = ast.parse(inspect.getsource(cls))
    body = tree.body[0].body  # type: ignore[attr-defined]
    out: dict[str, str] = {}
    for node, nxt in zip(body, [*body[1:], None]):
        if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and isinstance(nxt, ast.Expr)
                and isinstance(nxt.value, ast.Constant) and isinstance(nxt.value.value, str)):
            out[node.target.id] = " ".join(nxt.value.value.split())
    return out


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) is Literal:
        return " | ".join(str(a) for a in typing.get_args(tp))
    return (getattr(tp, "__name__", None) if isinstance(tp, type) else None) or str(tp).replace("typing.", "")


def fields_reference() -> str:
    """The Markdown of docs/config.md: every field of :class:`STMIConfig` with its type, default and docstring.

    Regenerate the file after changing a field: ``make docs`` (a test fails while it is stale).
    """
    lines = ["# Configuration fields", "",
             "Generated from `stmi/config.py` by `stmi.config.fields_reference()` (`make docs`); do not edit by hand.",
             "", "Every name below can be overridden with `--set NAME=VALUE` (train, sweep) or searched in a",
             "`search_spaces/*.yaml` file. Recipes (`stmi/recipes.py`) set some of them per dataset: the defaults",
             "shown here are the dataclass defaults, before any recipe.", ""]
    default = STMIConfig()
    top_docs, top_hints = _field_docs(STMIConfig), typing.get_type_hints(STMIConfig)
    for f in dataclasses.fields(STMIConfig):
        section = getattr(default, f.name)
        if not dataclasses.is_dataclass(section):
            lines += [f"## `{f.name}`", "", f"{_type_name(top_hints[f.name])}, default `{section!r}`: "
                      f"{top_docs.get(f.name, '')}", ""]
            continue
        cls = type(section)
        docs, hints = _field_docs(cls), typing.get_type_hints(cls)
        lines += [f"## `{f.name}`: {(cls.__doc__ or '').strip().splitlines()[0]}", "",
                  "| field | type | default | meaning |", "|---|---|---|---|"]
        for sub in dataclasses.fields(cls):
            value = getattr(section, sub.name)
            shown = "x".join(map(str, value)) if isinstance(value, tuple) else repr(value)
            text = docs.get(sub.name, "").replace("|", "\\|")
            tp = _type_name(hints[sub.name]).replace("|", "\\|")
            lines.append(f"| `{f.name}.{sub.name}` | {tp} | `{shown}` | {text} |")
        lines.append("")
    return "\n".join(lines)


def parse_assignments(items: list[str]) -> dict[str, str]:
    """Command-line ``FIELD=VALUE`` strings -> ``{field: value}`` (values stay strings; :func:`apply_overrides`
    checks names and converts types)."""
    out: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"expected FIELD=VALUE, got {item!r} (e.g. --set model.K=8)")
        out[key.strip()] = value.strip()
    return out


def flatten(cfg: STMIConfig) -> dict[str, Any]:
    """Flat ``dotted.name -> value`` of every leaf (for MLflow params and search spaces)."""
    out: dict[str, Any] = {}
    for name in field_types():
        obj: Any = cfg
        for part in name.split("."):
            obj = getattr(obj, part)
        out[name] = obj
    return out


def to_dict(cfg: STMIConfig) -> dict[str, Any]:
    """Nested plain dict (JSON-serialisable)."""
    return json.loads(json.dumps(dataclasses.asdict(cfg)))


def from_dict(d: dict[str, Any]) -> STMIConfig:
    """Inverse of :func:`to_dict`; unknown keys are an error."""
    flat: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            for kk, vv in v.items():
                flat[f"{k}.{kk}"] = vv
        else:
            flat[k] = v
    return apply_overrides(STMIConfig(), flat)
