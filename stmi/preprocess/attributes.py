"""Attribute schemas, the extraction prompt, reply parsing, confidence-aware fusion and the description template.

The paper's caption strategy (section "Multi-Modal Caption Generation", after NEXT): a multi-modal LLM extracts
(attribute, value, confidence) triplets from each modality and from the three frames concatenated; per attribute
the most confident value wins; attributes nobody is confident about are left out instead of written as
"unknown". Everything here is pure (no I/O beyond reading ``attributes.json``) so it is tested without a server.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

SCHEMA_FILE = Path(__file__).with_name("attributes.json")
SOURCES: tuple[str, ...] = ("concat", "rgb", "nir", "tir")
"""The four extraction sources; the order is also the tie-break of fusion (the concatenated view sees most)."""
SOURCE_DESCRIPTIONS: dict[str, str] = {
    "rgb": "a visible-light (RGB) photograph",
    "nir": "a near-infrared (NIR) image: grey levels show infrared reflectance, not colour",
    "tir": "a thermal-infrared (TIR) image: brightness shows heat, not colour or reflectance",
    "concat": (
        "three views of the same moment side by side: left visible light (RGB), middle near-infrared (NIR), "
        "right thermal infrared (TIR); combine what each view shows"
    ),
}
UNKNOWN_VALUES = frozenset({"", "unknown", "unsure", "n/a", "na", "none visible", "not visible", "unclear", "null"})
_FREE_TEXT = re.compile(r"^[\w][\w .&'-]{0,39}$")


class ReplyError(ValueError):
    """A model reply that is not the JSON list the prompt asked for (retried, then recorded as a failure)."""


@dataclass(frozen=True)
class Attribute:
    """One attribute of a schema."""

    name: str
    values: tuple[str, ...] | None
    """Allowed values (matched case-insensitively); None = free text (a brand)."""
    modalities: tuple[str, ...] | None
    """Sources trusted for this attribute (None = all four)."""
    render: dict[str, str]
    """Value -> words in the description ('' = leave out)."""


@dataclass(frozen=True)
class Schema:
    """The fixed attribute schema of one object kind (``persons`` or ``vehicles``)."""

    kind: str
    object: str
    attributes: tuple[Attribute, ...]
    template: dict[str, Any]

    def attribute(self, name: str) -> Attribute | None:
        """The attribute called ``name`` or None."""
        for attr in self.attributes:
            if attr.name == name:
                return attr
        return None

    def fingerprint(self) -> str:
        """A short hash of the schema; part of the cache key so a schema change is never served stale replies."""
        import hashlib

        payload = json.dumps(
            [(a.name, a.values, a.modalities) for a in self.attributes], sort_keys=True, ensure_ascii=True
        )
        return hashlib.sha256(payload.encode()).hexdigest()[:12]


@lru_cache(maxsize=None)
def _raw_schemas() -> dict[str, Any]:
    with open(SCHEMA_FILE, encoding="utf-8") as fh:
        return json.load(fh)["kinds"]


def load_schema(kind: str) -> Schema:
    """The schema of ``kind`` (``persons`` | ``vehicles``) from ``attributes.json``."""
    kinds = _raw_schemas()
    if kind not in kinds:
        raise ValueError(f"unknown object kind {kind!r} in {SCHEMA_FILE}; choose one of {sorted(kinds)}")
    raw = kinds[kind]
    attrs = tuple(
        Attribute(
            name=a["name"],
            values=tuple(a["values"]) if a.get("values") is not None else None,
            modalities=tuple(a["modalities"]) if a.get("modalities") is not None else None,
            render=dict(a.get("render", {})),
        )
        for a in raw["attributes"]
    )
    return Schema(kind, raw["object"], attrs, raw["template"])


def schema_for_dataset(dataset: str) -> Schema:
    """The schema of the dataset's object kind (``Layout.kind``: persons for RGBNT201, vehicles for the others)."""
    from stmi.data.layouts import get_layout

    return load_schema(get_layout(dataset).kind + "s")


def extraction_prompt(schema: Schema, source: str) -> str:
    """The text part of the extraction request for one source.

    The prompt asks for every attribute of the schema, allows "unknown", and asks for a calibrated confidence,
    because fusion compares confidences across sources and drops the low ones.
    """
    lines = [
        f"The image is {SOURCE_DESCRIPTIONS[source]}. It shows one {schema.object} to be re-identified.",
        "For each attribute below give the value you see, chosen from the allowed values, or \"unknown\" when the",
        "image does not show it, and your confidence from 0 to 1 that the value is right (be calibrated: low when",
        "the image is dark, blurred, occluded or the modality cannot show the attribute).",
        "Attributes:",
    ]
    for attr in schema.attributes:
        if attr.modalities is not None and source not in attr.modalities:
            continue  # not asked where the modality cannot show it (colour in NIR/TIR): saves tokens and noise
        allowed = ", ".join(attr.values) if attr.values is not None else "free text (a short name)"
        lines.append(f"- {attr.name}: {allowed}")
    lines.append(
        'Reply with only a JSON list, one object per attribute: [{"attribute": "<name>", "value": "<value>", '
        '"confidence": <0..1>}, ...]. No other text.'
    )
    return "\n".join(lines)


def strip_fences(text: str) -> str:
    """The reply without surrounding whitespace and a Markdown code fence (```json ... ```), if any."""
    t = text.strip()
    m = re.match(r"^```[A-Za-z0-9_-]*\s*\n?(.*?)\n?```$", t, flags=re.S)
    return m.group(1).strip() if m else t


def parse_reply(text: str, schema: Schema, source: str) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Parse one extraction reply.

    Returns:
        ``(accepted, rejected)``: accepted items ``{"attribute", "value", "confidence"}`` with the value
        normalised to the schema's spelling; rejected items carry a ``reason`` (unknown attribute, value outside
        the schema, "unknown", bad confidence, attribute not trusted from this source). Both go to the audit file.

    Raises:
        ReplyError: the reply is not JSON (after stripping code fences) or not a list of objects: the caller
            retries and finally records the triplet as a failure.
    """
    try:
        data = json.loads(strip_fences(text))
    except json.JSONDecodeError as exc:
        raise ReplyError(f"reply is not valid JSON ({exc.msg} at char {exc.pos})") from None
    if isinstance(data, dict) and isinstance(data.get("attributes"), list):
        data = data["attributes"]
    if not isinstance(data, list) or not all(isinstance(x, dict) for x in data):
        raise ReplyError("reply is JSON but not a list of {attribute, value, confidence} objects")
    accepted: list[dict[str, Any]] = []
    rejected: list[dict[str, Any]] = []
    seen: set[str] = set()
    for item in data:
        name = str(item.get("attribute", "")).strip().lower()
        raw_value = item.get("value")
        value = "" if raw_value is None else str(raw_value).strip()
        conf = item.get("confidence")
        attr = schema.attribute(name)
        reason = None
        if attr is None:
            reason = "attribute not in schema"
        elif name in seen:
            reason = "duplicate attribute"
        elif not isinstance(conf, (int, float)) or isinstance(conf, bool) or not 0.0 <= float(conf) <= 1.0:
            reason = "confidence missing or outside [0, 1]"
        elif value.lower() in UNKNOWN_VALUES:
            reason = "unknown"
        elif attr.modalities is not None and source not in attr.modalities:
            reason = f"not trusted from source {source}"
        else:
            if attr.values is not None:
                match = next((v for v in attr.values if v.lower() == value.lower()), None)
                if match is None:
                    reason = "value not in schema"
                else:
                    value = match
            elif not _FREE_TEXT.match(value):
                reason = "free-text value not a short name"
        if reason is None:
            seen.add(name)
            accepted.append({"attribute": name, "value": value, "confidence": float(conf)})
        else:
            rejected.append({"attribute": name, "value": value, "confidence": conf, "reason": reason})
    return accepted, rejected


def fuse(
    per_source: dict[str, list[dict[str, Any]]], schema: Schema, min_confidence: float
) -> dict[str, dict[str, Any]]:
    """Confidence-aware fusion: per attribute the most confident value across the sources.

    Ties go to the earlier source of :data:`SOURCES` (concat, rgb, nir, tir). An attribute whose best confidence
    is below ``min_confidence`` is left out.

    Returns:
        attribute -> ``{"value", "confidence", "source"}``, in schema order.
    """
    best: dict[str, dict[str, Any]] = {}
    for source in sorted(per_source, key=lambda s: SOURCES.index(s) if s in SOURCES else len(SOURCES)):
        for item in per_source[source]:
            cur = best.get(item["attribute"])
            if cur is None or item["confidence"] > cur["confidence"]:
                best[item["attribute"]] = {"value": item["value"], "confidence": item["confidence"], "source": source}
    return {
        a.name: best[a.name]
        for a in schema.attributes
        if a.name in best and best[a.name]["confidence"] >= min_confidence
    }


def _fill(alternatives: list[str], words: dict[str, str]) -> str | None:
    for alt in alternatives:
        names = re.findall(r"\{(\w+)\}", alt)
        if all(words.get(n) for n in names):
            return alt.format(**{n: words[n] for n in names})
    return None


def _join(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def render_description(fused: dict[str, dict[str, Any]], schema: Schema) -> str:
    """The deterministic template description of the fused attributes (same input -> same text)."""
    words: dict[str, str] = {}
    for attr in schema.attributes:
        if attr.name in fused:
            value = fused[attr.name]["value"]
            words[attr.name] = attr.render.get(value, value)
    template = schema.template
    subject = _fill(template["subject"], words) or f"A {schema.object}"
    parts = []
    for part in template.get("parts", []):
        items = [text for alts in part["items"] if (text := _fill(alts, words))]
        if items:
            parts.append(f"{part['prefix']} {_join(items)}")
    text = subject + (" " + ", ".join(parts) if parts else "") + "."
    text = re.sub(r"\s+", " ", text)
    return re.sub(r"\b([Aa]) (?=[aeiouAEIOU])", lambda m: m.group(1) + "n ", text)


def rewrite_prompt(description: str, fused: dict[str, dict[str, Any]], schema: Schema) -> str:
    """The text-only request of the optional LLM rewrite: fluent wording, no new facts."""
    facts = "; ".join(f"{k}: {v['value']}" for k, v in fused.items()) or "none"
    return (
        f"Rewrite this description of a {schema.object} as one fluent English sentence of at most 40 words. "
        "Keep every fact, add none, do not mention confidence or image modalities. Reply with the sentence only.\n"
        f"Facts: {facts}\nDescription: {description}"
    )


def clean_rewrite(text: str) -> str:
    """The rewritten sentence without fences, quotes and line breaks; raises ReplyError when empty."""
    t = strip_fences(text).strip().strip('"').strip()
    t = re.sub(r"\s+", " ", t)
    if not t:
        raise ReplyError("rewrite reply is empty")
    return t
