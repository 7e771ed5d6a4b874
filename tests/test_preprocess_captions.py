"""Captions against a real HTTP server on loopback that speaks the chat-completions protocol with scripted replies.

The server identifies each request's triplet and source from the image it carries (the test computes the same
base64 JPEGs with ``triplet_payloads``), answers from a per-(triplet, source) script of behaviours, and records
every request (headers, time) so the tests count retries and check the Authorization header.
"""

from __future__ import annotations

import json
import logging
import re
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from stmi.data.layouts import dataset_dir, read_split
from stmi.data.synth import make_synthetic
from stmi.preprocess.__main__ import main
from stmi.preprocess.attributes import (
    ReplyError,
    fuse,
    load_schema,
    parse_reply,
    render_description,
    strip_fences,
)
from stmi.preprocess.captions import CACHE_NAME, run_captions, triplet_payloads

SECRET = "sk-test-DO-NOT-LEAK-4f1c9e"
KEY_ENV = "STMI_TEST_CAPTION_KEY"


class ChatServer:
    """A chat-completions server on 127.0.0.1 (free port) answering from a script.

    ``script(item, source, n)`` -> a behaviour for the n-th request (0-based) of that (item, source):
    ``("ok", attrs)`` a JSON list reply; ``("fenced", attrs)`` the same in a ```json fence; ``("text", s)`` raw
    content; ``("status", code, retry_after)`` an HTTP error whose body echoes the Authorization header;
    ``("slow", seconds)`` sleeps then answers (the client has given up by then); ``("fatal",)`` HTTP 401.
    Text-only requests (the rewrite) have source ``rewrite`` and item ``None``.
    """

    def __init__(self, payloads: dict[str, tuple[str, str]], script: Callable[[str | None, str, int], tuple]) -> None:
        self.payloads = payloads
        self.script = script
        self.lock = threading.Lock()
        self.requests: list[dict[str, Any]] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_POST(self) -> None:  # noqa: N802
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                item, source = None, "rewrite"
                for msg in body["messages"]:
                    if isinstance(msg["content"], list):
                        for part in msg["content"]:
                            if part.get("type") == "image_url":
                                b64 = part["image_url"]["url"].split("base64,", 1)[1]
                                item, source = server.payloads[b64]
                with server.lock:
                    n = sum(1 for r in server.requests if (r["item"], r["source"]) == (item, source))
                    server.requests.append({"item": item, "source": source, "path": self.path, "t": time.monotonic(),
                                            "auth": self.headers.get("Authorization"), "body": body})
                behaviour = server.script(item, source, n)
                kind = behaviour[0]
                if kind == "slow":
                    time.sleep(behaviour[1])
                    behaviour = ("ok", [])
                    kind = "ok"
                if kind == "status":
                    self._send(behaviour[1], {"error": f"scripted failure for {self.headers.get('Authorization')}"},
                               {"Retry-After": str(behaviour[2])} if behaviour[2] is not None else {})
                    return
                if kind == "fatal":
                    self._send(401, {"error": "invalid api key"})
                    return
                if kind in ("ok", "fenced"):
                    content = json.dumps(behaviour[1])
                    if kind == "fenced":
                        content = f"```json\n{content}\n```"
                elif kind == "rewrite":
                    prompt = body["messages"][-1]["content"]
                    content = "Rewritten: " + re.search(r"Description: (.*)$", prompt).group(1)
                else:
                    content = behaviour[1]
                self._send(200, {"id": "x", "object": "chat.completion", "model": body["model"],
                                 "choices": [{"index": 0, "finish_reason": "stop",
                                              "message": {"role": "assistant", "content": content}}]})

            def _send(self, code: int, obj: dict, headers: dict | None = None) -> None:
                data = json.dumps(obj).encode()
                try:
                    self.send_response(code)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    for k, v in (headers or {}).items():
                        self.send_header(k, v)
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client timed out first

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def count(self, item: str | None = None, source: str | None = None) -> int:
        with self.lock:
            return sum(1 for r in self.requests if (item is None or r["item"] == item)
                       and (source is None or r["source"] == source))


@contextmanager
def serve(payloads: dict[str, tuple[str, str]], script: Callable) -> Iterator[ChatServer]:
    srv = ChatServer(payloads, script)
    srv.thread.start()
    try:
        yield srv
    finally:
        srv.httpd.shutdown()
        srv.httpd.server_close()
        srv.thread.join(timeout=5)


def _dataset(tmp_path: Path, dataset: str = "rgbnt201") -> tuple[Path, Path, list, dict[str, tuple[str, str]]]:
    """A tiny synthetic dataset without captions: 3 ids x 2 images = 6 triplets (4 train, 2 test)."""
    root = tmp_path / dataset
    make_synthetic(dataset, root, ids=3, images_per_id=2, seed=5)
    droot = dataset_dir(dataset, root)
    for p in (droot / "text").glob("*.json"):
        p.unlink()
    triplets = {}
    for split in ("train", "query", "gallery"):
        for t in read_split(dataset, root, split):
            triplets[t.name] = t
    payloads = {}
    for name, t in triplets.items():
        for source, b64 in triplet_payloads(t).items():
            payloads[b64] = (name, source)
    return root, droot, sorted(triplets.values(), key=lambda t: t.name), payloads


def _attrs(*items: tuple[str, str, float]) -> list[dict[str, Any]]:
    return [{"attribute": a, "value": v, "confidence": c} for a, v, c in items]


DEFAULT = _attrs(("gender", "man", 0.9), ("upper_type", "jacket", 0.8))


def test_fusion_retries_failures_and_key_safety(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                capsys: pytest.CaptureFixture, caplog: pytest.LogCaptureFixture
                                                ) -> None:
    root, droot, triplets, payloads = _dataset(tmp_path)
    a, b, c, d, e, f = (t.name for t in triplets)
    replies = {
        (a, "concat"): _attrs(("gender", "man", 0.6), ("hair", "short", 0.55), ("bag", "backpack", 0.95),
                              ("age", "elderly", 0.4)),
        (a, "rgb"): _attrs(("gender", "woman", 0.9), ("upper_color", "red", 0.8), ("age", "young", 0.3)),
        (a, "nir"): _attrs(("gender", "man", 0.7), ("hair", "long", 0.55), ("lower_type", "unknown", 0.9)),
        (a, "tir"): _attrs(("upper_color", "blue", 0.99), ("footwear", "flip-flops", 0.9)),
    }

    def script(item: str | None, source: str, n: int) -> tuple:
        if item == b and source == "rgb" and n == 0:
            return ("status", 429, 1)
        if item == c and source == "nir" and n == 0:
            return ("slow", 2.0)
        if item == d and source == "tir" and n < 2:
            return ("status", 500, None)
        if item == e and source == "concat":
            return ("text", "Sure! Here are the attributes: gender=man")  # never JSON
        if item == f:
            return ("fenced", DEFAULT)
        return ("ok", replies.get((item, source), DEFAULT))

    monkeypatch.setenv(KEY_ENV, SECRET)
    caplog.set_level(logging.DEBUG, logger="stmi")  # an in-process train/sweep main() leaves "stmi" at INFO
    with serve(payloads, script) as srv:
        rc = main(["captions", "--dataset", "rgbnt201", "--root", str(root), "--endpoint", srv.url,
                   "--model", "test-vlm", "--api-key-env", KEY_ENV, "--concurrency", "3", "--timeout", "0.5",
                   "--max-retries", "3", "--backoff", "0.01", "--min-confidence", "0.5", "--quiet"])
    out, err = capsys.readouterr()

    # the key went to the server in the Authorization header, on every request, to the chat-completions path
    assert srv.requests and all(r["auth"] == f"Bearer {SECRET}" for r in srv.requests)
    assert {r["path"] for r in srv.requests} == {"/v1/chat/completions"}
    first = srv.requests[0]["body"]
    assert first["model"] == "test-vlm" and first["messages"][-1]["content"][1]["image_url"]["url"].startswith(
        "data:image/jpeg;base64,")

    # retries: 429 (Retry-After honoured), timeout, two 500s; the malformed source exhausts its 1 + 3 attempts
    assert srv.count(b, "rgb") == 2
    t429 = [r["t"] for r in srv.requests if (r["item"], r["source"]) == (b, "rgb")]
    assert t429[1] - t429[0] >= 0.9
    assert srv.count(c, "nir") == 2
    assert srv.count(d, "tir") == 3
    assert srv.count(e, "concat") == 4
    assert srv.count() == 6 * 4 + 1 + 1 + 2 + 3

    # the malformed-forever triplet is a listed failure with its path; exit code 1
    assert rc == 1
    e_path = next(t.rgb for t in triplets if t.name == e)
    assert f"failures (no caption written): 1\n  {e_path}: concat: invalid reply" in out
    assert "have no caption" in err

    # fusion: most confident value per attribute; low confidence dropped; colour not trusted from TIR; tie -> concat
    train = {x["item"]: x["description"] for x in json.loads((droot / "text" / "train.json").read_text())}
    test = {x["item"]: x["description"] for x in json.loads((droot / "text" / "test.json").read_text())}
    captions = {**train, **test}
    assert e not in captions and len(captions) == 5
    assert captions[a] == "A woman with short hair, wearing a red top, carrying a backpack."
    assert captions[f] == "A man wearing a jacket."
    assert a in train
    audit = json.loads((droot / "text" / "train.audit.json").read_text())
    rec = next(x for x in audit["items"] if x["item"] == a)
    assert rec["fused"]["gender"] == {"value": "woman", "confidence": 0.9, "source": "rgb"}
    assert rec["fused"]["hair"]["source"] == "concat" and "age" not in rec["fused"]
    assert {x["reason"] for x in rec["sources"]["tir"]["rejected"]} == {"not trusted from source tir",
                                                                       "value not in schema"}
    assert rec["sources"]["nir"]["rejected"][0]["reason"] == "unknown"
    all_audit = audit["items"] + json.loads((droot / "text" / "test.audit.json").read_text())["items"]
    failed = [x for x in all_audit if x["status"] == "failed"]
    assert [x["item"] for x in failed] == [e] and failed[0]["path"] == str(e_path)

    # the output reads back through stmi.data
    seen = {t.name: t.caption for s in ("train", "query", "gallery") for t in read_split("rgbnt201", root, s)}
    assert {k: v for k, v in seen.items() if v is not None} == captions and seen[e] is None

    # the key never appears in files or logs (the 429 body echoed it back)
    for p in (droot / "text").iterdir():
        assert SECRET not in p.read_text(encoding="utf-8"), p
    assert SECRET not in out + err + caplog.text
    assert "scripted failure for Bearer ***" in caplog.text  # the echoed key was redacted, not dropped unseen


def test_resume_after_interruption_requests_only_missing(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    root, droot, triplets, payloads = _dataset(tmp_path)
    budget = {"ok": 9}
    lock = threading.Lock()

    def dying(item: str | None, source: str, n: int) -> tuple:
        with lock:
            budget["ok"] -= 1
            return ("ok", DEFAULT) if budget["ok"] >= 0 else ("fatal",)

    args = ["captions", "--dataset", "rgbnt201", "--root", str(root), "--model", "m", "--concurrency", "2",
            "--max-retries", "1", "--backoff", "0.01", "--quiet"]
    with serve(payloads, dying) as srv1:
        rc = main([*args, "--endpoint", srv1.url])
    assert rc == 2 and "HTTP 401" in capsys.readouterr().err  # the run stopped: a real interruption
    assert not (droot / "text" / "train.json").exists()
    cached = (droot / "text" / CACHE_NAME).read_text().splitlines()
    assert len(cached) == 9
    # a crash in the middle of writing the last line: that reply is lost and must be requested again
    (droot / "text" / CACHE_NAME).write_text("\n".join(cached[:-1]) + "\n" + cached[-1][: len(cached[-1]) // 2])

    with serve(payloads, lambda i, s, n: ("ok", DEFAULT)) as srv2:
        assert main([*args, "--endpoint", srv2.url]) == 0
    assert srv2.count() == 24 - 8
    out = capsys.readouterr().out
    assert "requests sent: 16 (replies reused from the cache: 8)" in out

    with serve(payloads, lambda i, s, n: ("ok", DEFAULT)) as srv3:
        assert main([*args, "--endpoint", srv3.url]) == 0
    assert srv3.count() == 0
    assert all(t.caption == "A man wearing a jacket." for t in read_split("rgbnt201", root, "train"))


def test_rewrite_and_vehicle_schema(tmp_path: Path) -> None:
    root, droot, triplets, payloads = _dataset(tmp_path, "rgbnt100")
    vehicle = _attrs(("color", "white", 0.9), ("type", "suv", 0.8), ("brand", "Toyota", 0.7),
                     ("roof", "plain", 0.9), ("gender", "man", 0.9))

    def script(item: str | None, source: str, n: int) -> tuple:
        return ("rewrite",) if source == "rewrite" else ("ok", vehicle)

    with serve(payloads, script) as srv:
        summary = run_captions("rgbnt100", root, srv.url, "m", None, concurrency=2, rewrite=True, backoff=0.01,
                               progress=False)
    assert not summary.failures and srv.count() == 6 * 5 and srv.count(source="rewrite") == 6
    assert all(r["auth"] is None for r in srv.requests)  # no key configured: no header
    prompt = srv.requests[0]["body"]["messages"][-1]["content"]
    text = prompt[0]["text"] if isinstance(prompt, list) else prompt
    assert "gender" not in text
    audit = json.loads((droot / "text" / "train.audit.json").read_text())["items"][0]
    assert audit["template_description"] == "A white Toyota SUV."
    assert audit["description"] == "Rewritten: A white Toyota SUV."
    assert {t.caption for t in read_split("rgbnt100", root, "query")} == {"Rewritten: A white Toyota SUV."}


def test_schemas_parsing_and_template() -> None:
    persons, vehicles = load_schema("persons"), load_schema("vehicles")
    assert len(persons.attributes) == 13 and len(vehicles.attributes) == 6
    assert strip_fences("```json\n[1]\n```") == "[1]" and strip_fences(" [] ") == "[]"
    with pytest.raises(ReplyError):
        parse_reply("not json", persons, "rgb")
    with pytest.raises(ReplyError):
        parse_reply('{"gender": "man"}', persons, "rgb")
    accepted, rejected = parse_reply(json.dumps(_attrs(
        ("GENDER", "Woman", 0.8), ("gender", "man", 0.9), ("age", "young", 1.5), ("colour", "red", 0.9),
        ("bag", "none", 0.9))), persons, "rgb")
    assert accepted == _attrs(("gender", "woman", 0.8), ("bag", "none", 0.9))
    assert [r["reason"] for r in rejected] == ["duplicate attribute", "confidence missing or outside [0, 1]",
                                               "attribute not in schema"]
    fused = fuse({"tir": _attrs(("gender", "man", 0.7)), "rgb": _attrs(("gender", "woman", 0.7))}, persons, 0.5)
    assert fused["gender"]["source"] == "rgb"  # tie: rgb comes before tir
    assert render_description(fused | {"bag": {"value": "none", "confidence": 1.0, "source": "rgb"}},
                              persons) == "A woman."
    assert render_description({}, vehicles) == "A vehicle."
    assert render_description({"age": {"value": "elderly", "confidence": 1, "source": "rgb"}},
                              persons) == "An elderly person."
