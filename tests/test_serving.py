"""Serving the STMI pyfunc: row validation in-process, and the real `mlflow models serve` of a registered champion.

The integration test logs a tiny model's exported checkpoint through a real MLflow server (S3 artifacts) with
``orchestration.registry``, registers it as ``stmi-testds@champion``, serves it with the real CLI, and checks that
the served embedding equals ``STMI.embed`` on the same preprocessed input (for rows with every non-empty subset of
rgb / nir / tir: ``STMI.embed`` with the row's presence mask), that every malformed request (a row with no modality
among them) gets a one-line 400, and that the server stays up.
"""

from __future__ import annotations

import base64
import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image, ImageDraw

from orchestration import registry, serving
from orchestration.serving import (
    MAX_IMAGE_BYTES,
    MAX_IMAGE_PIXELS,
    MODALITIES,
    ServingInputError,
    decode_image,
    encode_image,
    make_example_row,
    parse_rows,
)
from orchestration.tracking import RunLogger
from stmi.config import ModelConfig, STMIConfig
from stmi.data.transforms import PairedTransform

IMAGE_SIZE = (64, 32)
NUM_CAMERAS = 2


def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode("ascii")


def _scene(size: tuple[int, int], seed: int, mode: str) -> Image.Image:
    """A small deterministic picture (W, H) = ``size`` with a shape that depends on ``seed``."""
    g = torch.Generator().manual_seed(seed)
    w, h = size
    base = tuple(int(v) for v in torch.randint(0, 256, (3,), generator=g))
    img = Image.new("RGB", (w, h), base)
    d = ImageDraw.Draw(img)
    for _ in range(4):
        x0, y0 = (int(v) for v in torch.randint(0, max(w, h) // 2, (2,), generator=g))
        col = tuple(int(v) for v in torch.randint(0, 256, (3,), generator=g))
        d.ellipse((x0 % w, y0 % h, x0 % w + w // 3, y0 % h + h // 3), fill=col)
    return img.convert(mode)


def _jpeg(img: Image.Image) -> str:
    return encode_image(img, "JPEG")


def _good_rows() -> list[dict[str, Any]]:
    """Two rows covering the optional fields: JPEG + grayscale PNGs + odd-size mask + caption + camera, and bare."""
    mask = Image.new("L", (20, 30), 0)
    ImageDraw.Draw(mask).rectangle((5, 6, 15, 25), fill=255)
    return [
        {"rgb": _jpeg(_scene((40, 80), 1, "RGB")), "nir": encode_image(_scene((32, 64), 2, "L")),
         "tir": encode_image(_scene((32, 64), 3, "L")), "mask": encode_image(mask),
         "caption": "a man in a black coat with a backpack", "camera": 1},
        {"rgb": encode_image(_scene((32, 64), 4, "RGB")), "nir": encode_image(_scene((32, 64), 5, "RGB")),
         "tir": _jpeg(_scene((48, 96), 6, "L"))},
    ]


def _reference_embedding(model: Any, row: dict[str, Any]) -> torch.Tensor:
    """``STMI.embed`` of one row, decoded and preprocessed here exactly as evaluation does (not via serving); a row
    without some of rgb/nir/tir is embedded with its presence mask, the absent frames being random noise (which
    the model must ignore)."""
    def img(key: str) -> Image.Image:
        return Image.open(io.BytesIO(base64.b64decode(row[key])))

    tf = PairedTransform(IMAGE_SIZE, train=False)
    mask = img("mask") if "mask" in row else None
    present = [m for m in MODALITIES if m in row]
    frames, m = tf([img(k) for k in present], mask)
    by_name = dict(zip(present, frames))
    g = torch.Generator().manual_seed(5)
    rgb, nir, tir = (by_name.get(k, torch.randn(3, *IMAGE_SIZE, generator=g)) for k in MODALITIES)
    kwargs: dict[str, Any] = {"text": model.tokenize([row.get("caption", "")])}
    if len(present) < 3:
        kwargs["presence"] = torch.tensor([[k in row for k in MODALITIES]])
    if m is not None:
        kwargs["mask"] = m[None]
        kwargs["has_mask"] = torch.tensor([True])
    if "camera" in row:
        kwargs["camid"] = torch.tensor([row["camera"]])
    return model.embed(rgb[None], nir[None], tir[None], **kwargs)[0]


# ---------------------------------------------------------------------------------------------- in-process checks


def test_parse_rows_accepts_the_documented_modes_and_fields() -> None:
    rows = parse_rows(_good_rows(), NUM_CAMERAS)
    assert [r.camera for r in rows] == [1, None]
    assert [r.caption for r in rows] == ["a man in a black coat with a backpack", ""]
    assert [f.mode for f in rows[0].frames] == ["RGB", "L", "L"]
    assert rows[0].mask is not None and rows[0].mask.size == (20, 30)
    assert rows[1].mask is None
    # A data-URI prefix and wrapped base64 lines are tolerated.
    text = _good_rows()[1]["rgb"]
    wrapped = "data:image/png;base64," + "\n".join(text[i:i + 76] for i in range(0, len(text), 76))
    assert decode_image(wrapped, "x", ("RGB",)).size == (32, 64)


@pytest.mark.parametrize("subset", ["RNT", "RN", "RT", "NT", "R", "N", "T"])
def test_rows_with_any_nonempty_subset_are_accepted(subset: str) -> None:
    row = _subset_row(_good_rows()[0], subset)
    (parsed,) = parse_rows([row], NUM_CAMERAS)
    assert parsed.modalities == [m for m, c in zip(MODALITIES, "RNT") if c in subset]
    assert parsed.presence == tuple(c in subset for c in "RNT")
    assert [f is not None for f in parsed.frames] == list(parsed.presence)


def _subset_row(row: dict[str, Any], subset: str) -> dict[str, Any]:
    """``row`` with only the modalities of ``subset`` (letters R, N, T)."""
    return {k: v for k, v in row.items() if k not in MODALITIES or "RNT"[MODALITIES.index(k)] in subset}


def test_in_process_pyfunc_embeds_partial_rows_like_the_model(tmp_path: Path) -> None:
    """``STMIServingModel.predict`` on a batch mixing complete and partial rows (with and without camera) equals
    ``model.embed(..., presence=...)`` row by row, and says which modalities each row used."""
    import mlflow.pyfunc

    model = _build_tiny_checkpoint(tmp_path / "best.pt")
    pyfunc = serving.STMIServingModel()
    pyfunc.load_context(mlflow.pyfunc.PythonModelContext(artifacts={serving.CHECKPOINT_ARTIFACT: str(
        tmp_path / "best.pt")}, model_config={}))
    a, b = _good_rows()
    rows = [a, _subset_row(a, "RT"), _subset_row(b, "N"), b, _subset_row(a, "NT")]
    out = pyfunc.predict(None, rows)
    assert [o["modalities"] for o in out] == [["rgb", "nir", "tir"], ["rgb", "tir"], ["nir"], ["rgb", "nir", "tir"],
                                              ["nir", "tir"]]
    served = torch.tensor([o["embedding"] for o in out])
    expected = torch.stack([_reference_embedding(model, r) for r in rows])
    torch.testing.assert_close(served, expected, atol=1e-5, rtol=0)
    assert (served[0] - served[1]).abs().max() > 1e-3 and (served[0] - served[4]).abs().max() > 1e-3


@pytest.mark.parametrize(("mutate", "expected"), [
    (lambda r: [r.pop(m) for m in MODALITIES], "has no modality"),
    (lambda r: r.update(tir=None, rgb=None, nir=None), "has no modality"),
    (lambda r: r.update(rgb=123), "'rgb' must be a base64 string"),
    (lambda r: r.update(nir="@@not*base64@@"), "'nir' is not valid base64"),
    (lambda r: r.update(rgb=_b64(b"GIF89a this is not a jpeg or png at all")), "'rgb' is not a JPEG or PNG"),
    (lambda r: r.update(tir=encode_image(Image.new("RGBA", (8, 8)))), "'tir' has image mode RGBA"),
    (lambda r: r.update(rgb=_jpeg(Image.new("CMYK", (8, 8)))), "'rgb' has image mode CMYK"),
    (lambda r: r.update(mask=encode_image(Image.new("RGB", (8, 8)))), "'mask' has image mode RGB"),
    (lambda r: r.update(camera="abc"), "'camera' must be an integer"),
    (lambda r: r.update(camera=True), "'camera' must be an integer"),
    (lambda r: r.update(camera=NUM_CAMERAS), "0..1"),
    (lambda r: r.update(caption=7), "'caption' must be a string"),
    (lambda r: r.update(camid=0), "unknown field(s) 'camid'"),
    (lambda r: r.update(rgb=encode_image(Image.new("L", (2049, 2049)))), f"outside 1..{MAX_IMAGE_PIXELS} pixels"),
    (lambda r: r.update(rgb="A" * (MAX_IMAGE_BYTES // 3 * 4 + 8)), f"larger than {MAX_IMAGE_BYTES} bytes"),
])
def test_bad_rows_give_one_line_reasons(mutate: Any, expected: str) -> None:
    row = _good_rows()[0]
    mutate(row)
    with pytest.raises(ServingInputError) as info:
        parse_rows([_good_rows()[1], row], NUM_CAMERAS)
    msg = info.value.message
    assert expected in msg and msg.startswith("row 1")
    assert "\n" not in msg and len(msg) <= serving.MAX_MESSAGE_CHARS
    assert info.value.get_http_status_code() == 400


def test_truncated_png_and_bad_containers() -> None:
    full = base64.b64decode(encode_image(_scene((32, 64), 7, "RGB")))
    with pytest.raises(ServingInputError, match="truncated or corrupt"):
        decode_image(_b64(full[: len(full) // 2]), "row 0 field 'rgb'", ("RGB",))
    for rows, expected in [([], "no rows"), (None, "no rows"), ("abc", "must be a list of rows"),
                           ({"rgb": "x"}, "wrap it in a list"), ([1], "row 0 must be an object")]:
        with pytest.raises(ServingInputError, match=expected):
            parse_rows(rows, NUM_CAMERAS)
    with pytest.raises(ServingInputError, match="without camera ids"):
        parse_rows([{**_good_rows()[1], "camera": 0}], 0)


def test_dataframe_rows_for_in_process_pyfunc_users() -> None:
    """``pyfunc.load_model(...).predict(DataFrame)``: NaN cells are absent fields, float cameras become ints."""
    import pandas as pd

    good = _good_rows()
    rows = parse_rows(pd.DataFrame(good), NUM_CAMERAS)
    assert [r.camera for r in rows] == [1, None] and rows[1].mask is None and rows[1].caption == ""
    with pytest.raises(ServingInputError, match="'camera' must be an integer"):
        parse_rows(pd.DataFrame([{**good[0], "camera": 0.5}]), NUM_CAMERAS)


def test_error_message_survives_the_scoring_server_rewrite() -> None:
    """The server does ``e.message = f"Failed to predict data '{data}'. \\nError: {e.message}"``."""
    e = ServingInputError("row 0 field 'rgb' is not valid base64\nsecond line")
    e.message = f"Failed to predict data '{'A' * 1000}'. \nError: {e.message}"
    assert e.message == "row 0 field 'rgb' is not valid base64"
    body = json.loads(e.serialize_as_json())
    assert body["message"] == e.message and "stack_trace" not in body


def test_example_row_is_valid_for_the_model_config() -> None:
    cfg = STMIConfig(model=ModelConfig(clip_model="stmi-tiny", image_size=IMAGE_SIZE, num_cameras=NUM_CAMERAS))
    row = make_example_row(cfg)
    (parsed,) = parse_rows([row], NUM_CAMERAS)
    assert parsed.camera == 0 and parsed.frames[0].size == (IMAGE_SIZE[1], IMAGE_SIZE[0])
    no_sie = make_example_row(ModelConfig(clip_model="stmi-tiny", image_size=IMAGE_SIZE, num_cameras=0))
    assert "camera" not in no_sie


# ---------------------------------------------------------------------------------------------- real server


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _build_tiny_checkpoint(path: Path) -> Any:
    """A tiny STMI with non-default BN statistics (so a server that failed to load weights would differ)."""
    from stmi.engine import export_model
    from stmi.model.network import build_model

    cfg = STMIConfig(model=ModelConfig(clip_model="stmi-tiny", image_size=IMAGE_SIZE, num_classes=4,
                                       num_cameras=NUM_CAMERAS))
    torch.manual_seed(0)
    model = build_model(cfg.model)
    g = torch.Generator().manual_seed(1)
    for name, buf in model.named_buffers():
        if name.endswith("running_mean"):
            buf.copy_(0.1 * torch.randn(buf.shape, generator=g))
        elif name.endswith("running_var"):
            buf.copy_(0.5 + torch.rand(buf.shape, generator=g))
    export_model(model, cfg, path)
    return model.eval()


def _post(url: str, body: bytes | str, content_type: str = "application/json") -> tuple[int, Any, str]:
    import requests

    r = requests.post(url, data=body, headers={"Content-Type": content_type}, timeout=60)
    try:
        parsed = r.json()
    except ValueError:
        parsed = None
    return r.status_code, parsed, r.text


def _malformed_requests() -> list[tuple[str, bytes | str, str]]:
    """(label, body, a fragment the one-line message must contain)."""
    good = _good_rows()

    def rows(**change: Any) -> str:
        row = {**good[1], **change}
        return json.dumps({"inputs": [good[0], {k: v for k, v in row.items() if v is not None}]})

    cmyk = _jpeg(Image.new("CMYK", (16, 32), (0, 50, 100, 0)))
    huge = encode_image(Image.new("L", (2049, 2049)))
    return [
        ("empty body", b"", "empty request body"),
        ("not JSON", b"{inputs: [", "not valid JSON"),
        ("JSON list", b"[]", "JSON list"),
        ("no inputs key", json.dumps({"dataframe_records": good}), "no 'inputs' key"),
        ("no rows", json.dumps({"inputs": []}), "no rows"),
        ("inputs not a list", json.dumps({"inputs": "abc"}), "must be a list of rows"),
        ("no modality", json.dumps({"inputs": [good[0], {"caption": "no frames at all"}]}), "row 1 has no modality"),
        ("rgb is a number", rows(rgb=123), "'rgb' must be a base64 string"),
        ("bad base64", rows(nir="%%%not-base64%%%"), "'nir' is not valid base64"),
        ("not an image", rows(tir=_b64(b"hello, I am not an image" * 4)), "'tir' is not a JPEG or PNG"),
        ("CMYK image", rows(rgb=cmyk), "'rgb' has image mode CMYK"),
        ("RGBA image", rows(nir=encode_image(Image.new("RGBA", (16, 32)))), "'nir' has image mode RGBA"),
        ("camera not an int", rows(camera="abc"), "'camera' must be an integer"),
        ("camera out of range", rows(camera=7), "0..1"),
        ("too many pixels", rows(rgb=huge), "pixels"),
    ]


@pytest.mark.integration
@pytest.mark.timeout(300)
def test_mlflow_models_serve_registered_champion(mlflow_server: Any, platform_env: dict[str, str], tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    import mlflow
    import requests

    mlflow.set_tracking_uri(mlflow_server.tracking_uri)
    monkeypatch.setenv("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    ckpt = tmp_path / "best.pt"
    model = _build_tiny_checkpoint(ckpt)
    mlflow.set_experiment("serving-test")
    with mlflow.start_run() as run:
        champion = registry.register_champion(ckpt, "testds", RunLogger(run.info.run_id, mlflow_server.tracking_uri))
    info = champion.model
    assert info.signature is not None and info.saved_input_example_info is not None
    client = mlflow.MlflowClient()
    assert champion.name == "stmi-testds"
    assert int(client.get_model_version_by_alias("stmi-testds", "champion").version) == champion.version
    finished = client.get_run(run.info.run_id)
    assert finished.info.status == "FINISHED"
    assert finished.data.tags["stmi.champion_version"] == str(champion.version)

    # A run that is not active is resumed for the logging and keeps its status (a RUNNING sweep parent stays so).
    running = client.create_run(run.info.experiment_id)
    registry.log_model(ckpt, RunLogger(running.info.run_id, mlflow_server.tracking_uri))
    assert client.get_run(running.info.run_id).info.status == "RUNNING"
    logged = client.search_logged_models([run.info.experiment_id])
    assert any(m.source_run_id == running.info.run_id and m.name == "model" for m in logged)

    port = _free_port()
    venv_bin = str(Path(sys.executable).parent)
    env = {**os.environ, **mlflow_server.env, "PATH": f"{venv_bin}{os.pathsep}{os.environ.get('PATH', '')}",
           "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false"}
    log_path = tmp_path / "serve.log"
    with log_path.open("wb") as log_file:
        proc = subprocess.Popen(
            [str(Path(venv_bin) / "mlflow"), "models", "serve", "-m", "models:/stmi-testds@champion",
             "--env-manager", "local", "-p", str(port), "-h", "127.0.0.1"],
            env=env, cwd=tmp_path, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            if proc.poll() is not None:
                pytest.fail(f"mlflow models serve exited with {proc.returncode}:\n{log_path.read_text()[-3000:]}")
            try:
                if requests.get(f"{base}/ping", timeout=2).status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"server not up after 90 s:\n{log_path.read_text()[-3000:]}")
            time.sleep(0.5)

        rows = _good_rows()
        status, body, text = _post(f"{base}/invocations", json.dumps({"inputs": rows}))
        assert status == 200, text
        assert [p["modalities"] for p in body["predictions"]] == [list(MODALITIES)] * 2
        served = torch.tensor([p["embedding"] for p in body["predictions"]])
        assert served.shape == (2, model.embedding_dim)
        expected = torch.stack([_reference_embedding(model, r) for r in rows])
        torch.testing.assert_close(served, expected, atol=1e-5, rtol=0)
        torch.testing.assert_close(served.norm(dim=1), torch.ones(2), atol=1e-5, rtol=0)
        assert (served[0] - served[1]).abs().max() > 1e-3

        for label, bad, fragment in _malformed_requests():
            status, err, text = _post(f"{base}/invocations", bad)
            assert status == 400, f"{label}: {status} {text[:300]}"
            assert isinstance(err, dict), f"{label}: not JSON: {text[:300]}"
            msg = err.get("message", "")
            assert fragment in msg, f"{label}: {msg!r}"
            assert "\n" not in msg and "Traceback" not in text and "stack_trace" not in err, f"{label}: {text[:500]}"
            assert len(msg) <= serving.MAX_MESSAGE_CHARS, label

        status, body, text = _post(f"{base}/invocations", json.dumps({"inputs": rows[1:]}))
        assert status == 200, text
        torch.testing.assert_close(torch.tensor(body["predictions"][0]["embedding"]), expected[1], atol=1e-5, rtol=0)

        # Every non-empty modality subset, one request each (a row with none got its 400 above): the served
        # embedding is the in-process model.embed with the row's presence mask, and the answer names the subset.
        complete = {}
        for subset in ("RNT", "RN", "RT", "NT", "R", "N", "T"):
            partial = [_subset_row(r, subset) for r in rows]
            status, body, text = _post(f"{base}/invocations", json.dumps({"inputs": partial}))
            assert status == 200, f"{subset}: {text[:300]}"
            names = [m for m, c in zip(MODALITIES, "RNT") if c in subset]
            assert [p["modalities"] for p in body["predictions"]] == [names, names], subset
            got = torch.tensor([p["embedding"] for p in body["predictions"]])
            want = torch.stack([_reference_embedding(model, r) for r in partial])
            torch.testing.assert_close(got, want, atol=1e-5, rtol=0, msg=lambda m, s=subset: f"{s}: {m}")
            torch.testing.assert_close(got.norm(dim=1), torch.ones(2), atol=1e-5, rtol=0)
            complete[subset] = got
        assert all((complete[s] - complete["RNT"]).abs().max() > 1e-3 for s in complete if s != "RNT")
        assert "Traceback" not in log_path.read_text(errors="replace"), "the server logged an unhandled error"
    finally:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=15)
        except ProcessLookupError:
            pass
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
