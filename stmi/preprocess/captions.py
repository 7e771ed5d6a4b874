"""``python -m stmi.preprocess captions``: one caption per triplet from a multi-modal LLM (the paper's strategy).

For every triplet, four extraction requests go to an OpenAI-compatible chat-completions endpoint: one per modality
(RGB, NIR, TIR) and one with the three frames side by side ("concat", the paper's image-concatenation input). Each
reply is a JSON list of (attribute, value, confidence) over the fixed schema of the object kind
(``attributes.json``). Per attribute the most confident value wins and values below ``min_confidence`` are left out
(:func:`stmi.preprocess.attributes.fuse`); the description is the deterministic template of the fused attributes,
optionally reworded by the LLM (``rewrite``).

Outputs, beside the dataset's other caption files (docs/datasets.md "Captions"):

- ``text/{train,test}.json``: ``[{"item": <RGB file name>, "description": ...}]`` (query and gallery share ``test``);
- ``text/{train,test}.audit.json``: per triplet, every source's parsed attributes (accepted and rejected with the
  reason), the fused attributes with their source, the template text and the final description, or the failure;
- ``text/.captions_cache.jsonl``: every successful reply, keyed by triplet + source + model + prompt hash, appended
  as it arrives, so an interrupted or partly failed run resumes without paying twice.

A triplet whose requests still fail after the retries (HTTP errors, timeouts, replies that are not the JSON asked
for) gets no caption, is listed with its path in the summary, and makes the command exit non-zero: nothing is
silently replaced by a default text. The API key is only sent in the ``Authorization`` header; it is never logged
or written (replies and errors are redacted before they are stored).
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import logging
import os
import threading
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image
from tqdm import tqdm

from stmi.data.layouts import Triplet, load_dataset
from stmi.data.triplet_dataset import load_frames
from stmi.preprocess.attributes import (
    SOURCES,
    Schema,
    clean_rewrite,
    extraction_prompt,
    fuse,
    parse_reply,
    render_description,
    rewrite_prompt,
    schema_for_dataset,
)
from stmi.preprocess.chat_client import ChatClient, ChatError, FatalChatError, image_part

log = logging.getLogger(__name__)

SYSTEM_PROMPT = (
    "You are a careful visual annotator for object re-identification datasets. You report only what the image "
    "shows, with calibrated confidences, and you answer with JSON only."
)
CACHE_NAME = ".captions_cache.jsonl"
JPEG_QUALITY = 90


# ------------------------------------------------------------------------------------------------- images


def source_images(frames: list[Image.Image]) -> dict[str, Image.Image]:
    """The four images sent for a triplet: ``rgb``, ``nir``, ``tir`` and ``concat`` (the three side by side).

    Frames of different heights (not the case in the public datasets) are scaled to the RGB frame's height before
    concatenation so the composite stays one aligned strip.
    """
    rgb, nir, tir = (f.convert("RGB") for f in frames)
    h = rgb.height
    parts = [f if f.height == h else f.resize((max(1, round(f.width * h / f.height)), h)) for f in (rgb, nir, tir)]
    concat = Image.new("RGB", (sum(p.width for p in parts), h))
    x = 0
    for p in parts:
        concat.paste(p, (x, 0))
        x += p.width
    return {"rgb": rgb, "nir": nir, "tir": tir, "concat": concat}


def encode_jpeg(image: Image.Image) -> str:
    """Base64 JPEG of an image (deterministic for a given Pillow build)."""
    buf = io.BytesIO()
    image.convert("RGB").save(buf, format="JPEG", quality=JPEG_QUALITY)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def triplet_payloads(t: Triplet) -> dict[str, str]:
    """Base64 JPEG of each source of a triplet, as sent in the ``image_url`` data URLs."""
    return {s: encode_jpeg(im) for s, im in source_images(load_frames(t)).items()}


# ------------------------------------------------------------------------------------------------- cache


def _digest(*parts: str) -> str:
    return hashlib.sha256("\x1f".join(parts).encode("utf-8")).hexdigest()[:16]


class ReplyCache:
    """Successful replies as JSON lines ``{"key": ..., "reply": ...}``, appended and flushed one by one.

    A line cut short by an interruption is ignored on load (that reply is simply requested again).
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._entries: dict[str, str] = {}
        self._needs_newline = False
        if path.is_file():
            with open(path, "rb") as fb:
                if fb.seek(0, os.SEEK_END) > 0:
                    fb.seek(-1, os.SEEK_END)
                    # a line cut short by a crash must not swallow the next record appended after it
                    self._needs_newline = fb.read(1) != b"\n"
            with open(path, encoding="utf-8") as fh:
                for line in fh:
                    try:
                        rec = json.loads(line)
                        self._entries[str(rec["key"])] = str(rec["reply"])
                    except (json.JSONDecodeError, KeyError, TypeError):
                        continue

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: str) -> str | None:
        """The cached reply of ``key`` or None."""
        with self._lock:
            return self._entries.get(key)

    def put(self, key: str, reply: str) -> None:
        """Record a reply (in memory and on disk, flushed at once)."""
        line = json.dumps({"key": key, "reply": reply}, ensure_ascii=False)
        with self._lock:
            self._entries[key] = reply
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "a", encoding="utf-8") as fh:
                fh.write(("\n" if self._needs_newline else "") + line + "\n")
                self._needs_newline = False
                fh.flush()


# ------------------------------------------------------------------------------------------------- the run


@dataclass
class CaptionResult:
    """The outcome of one triplet (one entry of the audit file)."""

    split: str
    item: str
    path: Path
    sources: dict[str, dict[str, Any]] = field(default_factory=dict)
    fused: dict[str, dict[str, Any]] = field(default_factory=dict)
    template: str | None = None
    description: str | None = None
    error: str | None = None
    requests: int = 0
    cached: int = 0

    def audit(self) -> dict[str, Any]:
        """The JSON record of this triplet in the audit file."""
        return {
            "item": self.item,
            "path": str(self.path),
            "status": "failed" if self.error else "ok",
            "error": self.error,
            "sources": self.sources,
            "fused": self.fused,
            "template_description": self.template,
            "description": self.description,
        }


@dataclass
class CaptionSummary:
    """What a captions run did."""

    triplets: int = 0
    written: dict[str, int] = field(default_factory=dict)
    """Captions written per caption file (``train``, ``test``)."""
    requests: int = 0
    """HTTP requests sent (retries included)."""
    cached: int = 0
    """Replies taken from the cache instead of the endpoint."""
    failures: list[tuple[Path, str]] = field(default_factory=list)
    """(triplet path, reason) of every triplet left without a caption."""
    outputs: list[Path] = field(default_factory=list)

    def format(self) -> str:
        """A human-readable report (printed by the command)."""
        lines = [f"triplets: {self.triplets}"]
        lines += [f"captions written to text/{s}.json: {n}" for s, n in sorted(self.written.items())]
        lines += [
            f"requests sent: {self.requests} (replies reused from the cache: {self.cached})",
            f"failures (no caption written): {len(self.failures)}",
        ]
        lines += [f"  {p}: {reason}" for p, reason in self.failures]
        lines += [f"wrote {p}" for p in self.outputs]
        return "\n".join(lines)


class CaptionRun:
    """One captions run over a dataset; :func:`run_captions` is the convenient entry point."""

    def __init__(self, schema: Schema, client: ChatClient, cache: ReplyCache, min_confidence: float = 0.5,
                 rewrite: bool = False) -> None:
        self.schema = schema
        self.client = client
        self.cache = cache
        self.min_confidence = min_confidence
        self.rewrite = rewrite
        self.prompts = {s: extraction_prompt(schema, s) for s in SOURCES}

    def _key(self, split: str, item: str, source: str, prompt: str) -> str:
        return f"{split}/{item}|{source}|{self.client.model}|{_digest(SYSTEM_PROMPT, prompt)}"

    def _ask(self, res: CaptionResult, key: str, content: Any, validate: Any) -> tuple[Any, str]:
        cached = self.cache.get(key)
        if cached is not None:
            try:
                value = validate(cached)
                res.cached += 1
                return value, cached
            except ValueError:
                pass  # parsed differently by a newer parser: ask again
        value, text, attempts = self.client.complete(content, validate, system=SYSTEM_PROMPT)
        res.requests += attempts
        text = self.client.redact(text)
        self.cache.put(key, text)
        return value, text

    def caption(self, split: str, t: Triplet) -> CaptionResult:
        """Extract, fuse and render the caption of one triplet (thread-safe).

        Raises:
            FatalChatError: the endpoint rejects the key, URL or model: the whole run stops.
        """
        res = CaptionResult(split=split, item=t.name, path=t.rgb)
        try:
            payloads = triplet_payloads(t)
        except Exception as exc:  # DatasetError and decoding problems: one triplet, not the run
            res.error = f"cannot read the triplet's images: {exc}"
            return res
        per_source: dict[str, list[dict[str, Any]]] = {}
        errors = []
        for source in SOURCES:
            prompt = self.prompts[source]
            content = [{"type": "text", "text": prompt}, image_part(payloads[source])]

            def validate(text: str, source: str = source) -> tuple[list, list]:
                return parse_reply(text, self.schema, source)

            try:
                (accepted, rejected), _ = self._ask(res, self._key(split, t.name, source, prompt), content, validate)
            except ChatError as exc:
                res.requests += exc.attempts
                res.sources[source] = {"attributes": [], "rejected": [], "error": str(exc)}
                errors.append(f"{source}: {exc}")
                continue
            per_source[source] = accepted
            res.sources[source] = {"attributes": accepted, "rejected": rejected, "error": None}
        if errors:
            res.error = "; ".join(errors)
            return res
        res.fused = fuse(per_source, self.schema, self.min_confidence)
        res.template = render_description(res.fused, self.schema)
        res.description = res.template
        if self.rewrite:
            prompt = rewrite_prompt(res.template, res.fused, self.schema)
            try:
                res.description, _ = self._ask(res, self._key(split, t.name, "rewrite", prompt), prompt, clean_rewrite)
            except ChatError as exc:
                res.requests += exc.attempts
                res.description = None
                res.error = f"rewrite: {exc}"
        return res


def _write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def run_captions(
    dataset: str, root: str | Path, endpoint: str, model: str, api_key: str | None = None, *,
    concurrency: int = 4, min_confidence: float = 0.5, rewrite: bool = False, timeout: float = 60.0,
    max_retries: int = 4, backoff: float = 1.0, max_backoff: float = 60.0, temperature: float | None = 0.0,
    progress: bool = True,
) -> CaptionSummary:
    """Caption every triplet of a dataset; see the module docstring.

    Args:
        dataset, root: as ``stmi.data.read_split``.
        endpoint: the base URL of an OpenAI-compatible API (``https://api.openai.com/v1``) or its
            ``/chat/completions`` URL.
        model: the model name the endpoint serves (must accept image input).
        api_key: sent as ``Authorization: Bearer``; None for local servers without authentication.
        concurrency: triplets in flight at once (threads).
        min_confidence: fused attributes below this confidence are left out.
        rewrite: ask the LLM to reword the template description (one more request per triplet).
        timeout, max_retries, backoff, max_backoff, temperature: see :class:`ChatClient`.
        progress: show a tqdm bar.

    Raises:
        DatasetError: the dataset cannot be read.
        FatalChatError: the endpoint rejected the key, URL or model (nothing is written but the cache).
    """
    if concurrency < 1:
        raise ValueError(f"--concurrency must be at least 1, got {concurrency}")
    if not 0.0 <= min_confidence <= 1.0:
        raise ValueError(f"--min-confidence must be in [0, 1], got {min_confidence}")
    splits = load_dataset(dataset, root)
    schema = schema_for_dataset(dataset)
    client = ChatClient(endpoint, model, api_key, timeout=timeout, max_retries=max_retries, backoff=backoff,
                        max_backoff=max_backoff, temperature=temperature)
    text_dir = splits.root / "text"
    cache = ReplyCache(text_dir / CACHE_NAME)
    run = CaptionRun(schema, client, cache, min_confidence, rewrite)

    jobs: list[tuple[str, Triplet]] = []
    seen: set[tuple[str, str]] = set()
    for split in ("train", "query", "gallery"):
        text_split = splits.layout.text_splits[split]
        for t in getattr(splits, split):
            if (text_split, t.name) not in seen:
                seen.add((text_split, t.name))
                jobs.append((text_split, t))

    results: list[CaptionResult] = []
    summary = CaptionSummary(triplets=len(jobs))
    bar = tqdm(total=len(jobs), desc=f"captions ({model})", unit="triplet", disable=not progress)
    pool = ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="stmi-captions")
    pending: set[Future[CaptionResult]] = set()
    todo = iter(jobs)
    try:
        # Submit lazily (at most 2x concurrency queued) so a fatal error or Ctrl-C stops quickly.
        while True:
            while len(pending) < 2 * concurrency:
                job = next(todo, None)
                if job is None:
                    break
                pending.add(pool.submit(run.caption, *job))
            if not pending:
                break
            done, pending = wait(pending, return_when=FIRST_COMPLETED)
            for fut in done:
                results.append(fut.result())
                bar.update(1)
    except (FatalChatError, KeyboardInterrupt):
        for fut in pending:
            fut.cancel()
        raise
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        bar.close()

    summary.requests = client.requests_sent
    by_split: dict[str, list[CaptionResult]] = {}
    for r in sorted(results, key=lambda r: (r.split, r.item)):
        by_split.setdefault(r.split, []).append(r)
        summary.cached += r.cached
        if r.error:
            log.warning("no caption for %s: %s", r.path, r.error)
            summary.failures.append((r.path, r.error))
    for split, rs in sorted(by_split.items()):
        captions = [{"item": r.item, "description": r.description} for r in rs if not r.error and r.description]
        out = text_dir / f"{split}.json"
        audit = text_dir / f"{split}.audit.json"
        _write_json(out, captions)
        _write_json(audit, {
            "dataset": dataset.lower(),
            "model": model,
            "schema": schema.kind,
            "sources": list(SOURCES),
            "min_confidence": min_confidence,
            "rewrite": rewrite,
            "items": [r.audit() for r in rs],
        })
        summary.written[split] = len(captions)
        summary.outputs += [out, audit]
    summary.failures.sort(key=lambda f: str(f[0]))
    return summary
