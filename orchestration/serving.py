"""STMI as an MLflow pyfunc for ``mlflow models serve``: rows of base64 images in, retrieval embeddings out.

Request (``POST /invocations``, ``Content-Type: application/json``)::

    {"inputs": [{"rgb": "<base64 JPEG/PNG>", "nir": "<base64>", "tir": "<base64>",
                 "mask": "<base64 PNG, optional>", "caption": "<text, optional>", "camera": 0}]}

From a shell (``base64 -w0`` is GNU coreutils; ``printf`` is a shell builtin, so large images do not hit the
argument-length limit that ``curl -d "..."`` would)::

    mlflow models serve -m models:/stmi-rgbnt201@champion --env-manager local -h 127.0.0.1 -p 5001
    printf '{"inputs": [{"rgb": "%s", "nir": "%s", "tir": "%s", "mask": "%s", "caption": "%s", "camera": %d}]}' \
      "$(base64 -w0 rgb.jpg)" "$(base64 -w0 nir.jpg)" "$(base64 -w0 tir.jpg)" "$(base64 -w0 mask.png)" \
      "a man with a backpack" 0 > request.json
    curl -s http://127.0.0.1:5001/invocations -H 'Content-Type: application/json' --data @request.json

A row may leave out any one or two of ``rgb``, ``nir`` and ``tir`` (a failed thermal camera, a site without NIR)::

    {"inputs": [{"rgb": "<base64>", "tir": "<base64>"}, {"nir": "<base64>"}]}

Response: ``{"predictions": [{"embedding": [e_1, ..., e_E], "modalities": ["rgb", "nir", "tir"]}, ...]}``, per
row in row order its L2-normalised embedding (``STMI.embed``, length ``embedding_dim``) and the modalities it was
computed from (those the row carried, in the model's order). The embedding of a partial row is ``STMI.embed`` with
the row's presence mask (the absent modalities reach no stage of the model; docs/design.md "Missing modalities"), in
the same space as a complete row's, so partial queries search a complete gallery. Fields of a row:

- ``rgb``, ``nir``, ``tir`` (at least one; a row with none is refused): base64 (standard alphabet; a
  ``data:image/...;base64,`` prefix and line breaks are tolerated) of a JPEG or PNG image in mode ``RGB`` or
  ``L``. ``L`` (grayscale, the usual NIR/TIR camera output) is replicated to three channels, exactly as the dataset
  readers' ``convert("RGB")`` does. Other
  modes are refused rather than converted: ``RGBA``/``LA`` (what would the alpha mean: a cut-out background?),
  ``P`` (palette), ``CMYK``, 16-bit/float (``I;16``, ``I``, ``F``: raw thermal needs a deliberate 8-bit scaling).
  Frames may have any size up to :data:`MAX_IMAGE_PIXELS`; each is resized to the model's ``image_size``.
- ``mask`` (optional): a single-channel (``L`` or ``1``) PNG/JPEG, 0 = background, > 0 = foreground, any size
  (resized with nearest neighbour like the dataset masks). Without it the row gets plain attention (S = 0).
- ``caption`` (optional): a string; absent = the empty caption, as for a triplet without one in training.
- ``camera`` (optional): integer camera id, 0-based, ``< num_cameras`` of the training set. Only models trained
  with the camera embedding (SIE) accept it; absent = no SIE term.

Preprocessing is :class:`stmi.data.transforms.PairedTransform` in evaluation mode (bicubic resize, CLIP mean/std,
nearest-neighbour mask), the same code the evaluation loaders run, so a served embedding equals an offline one.

Errors. Any malformed request gets HTTP 400 with a JSON body ``{"error_code": "BAD_REQUEST", "message": "<one
line>"}`` that names the row and field and says what to send instead; never a stack trace, and the server keeps
serving. Three mechanisms give that control over MLflow's scoring server (``mlflow/pyfunc/scoring_server``):

1. ``predict`` is type-hinted ``list[dict[str, Any]]``, so the model is logged with a signature inferred from the
   type hint and the server hands the raw JSON ``inputs`` value to ``predict`` without pandas parsing or column
   schema enforcement (whose errors are long multi-line texts echoing the data). MLflow's own element validation
   against the hint is switched off (``_skip_type_hint_validation``): this module validates every row itself with
   messages a client can act on.
2. Errors are :class:`ServingInputError`, an ``MlflowException`` whose message cannot be rewritten: the server
   prefixes every model error with ``"Failed to predict data '<the whole request>'. \\nError: "``, which would
   echo megabytes of base64 back and break the one-line rule; the property keeps the original reason.
3. Requests the server rejects before calling the model (an empty or non-JSON body, invalid UTF-8) carry a
   multi-line message that echoes the body. When (and only when) the model is loaded inside a scoring server
   process, ``load_context`` wraps the server's ``invocations`` function so that any ``MlflowException`` leaving
   it is reduced to one line and loses its ``stack_trace`` (which is logged on the server instead).

Unexpected failures inside the model (a bug, out of memory) answer HTTP 500 with a one-line message; the traceback
goes to the server log only. The limits below bound the memory one request can take.

This module is what runs in the server. Logging a checkpoint as this pyfunc and registering it is
``orchestration.registry``.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import functools
import io
import logging
import os
import re
import sys
from typing import Any

import mlflow
import mlflow.pyfunc
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import BAD_REQUEST, INTERNAL_ERROR, ErrorCode
from PIL import Image, ImageDraw

log = logging.getLogger(__name__)

MODALITIES: tuple[str, ...] = ("rgb", "nir", "tir")
"""The image fields of a row, in the model's argument order; a row carries at least one of them."""
OPTIONAL_FIELDS: tuple[str, ...] = ("mask", "caption", "camera")
"""Optional fields of a row; any other key is refused (a typo such as ``camid`` would otherwise be ignored)."""
FRAME_MODES: tuple[str, ...] = ("RGB", "L")
"""PIL modes accepted for ``rgb``/``nir``/``tir``; ``L`` is replicated to three channels as the readers do."""
MASK_MODES: tuple[str, ...] = ("L", "1")
"""PIL modes accepted for ``mask`` (single channel, > 0 = foreground)."""
IMAGE_FORMATS: tuple[str, ...] = ("JPEG", "PNG")
"""Decoders PIL may use; restricting them keeps PIL's rarely used decoders away from untrusted bytes."""
MAX_ROWS = 64
"""Rows per request: one forward pass over the batch, so this bounds activation memory."""
MAX_IMAGE_BYTES = 8 * 1024 * 1024
"""Decoded (after base64) bytes of one image; a 256x128 ReID crop is a few tens of kB."""
MAX_IMAGE_PIXELS = 2048 * 2048
"""Width x height of one image, checked from the header before the pixels are decoded (decompression bombs)."""
MAX_CAPTION_CHARS = 2000
"""Characters of a caption (the CLIP tokenizer truncates to 77 tokens anyway; this bounds tokenizer work)."""
MAX_MESSAGE_CHARS = 400
"""Length of an error message in a response."""
CHECKPOINT_ARTIFACT = "checkpoint"
"""Artifact key of the exported checkpoint (``stmi.engine.export_model``) in the logged model."""

_B64_PREFIX = re.compile(r"^data:[\w/+.-]+;base64,", re.IGNORECASE)
_B64_ALPHABET = re.compile(r"^[A-Za-z0-9+/]*={0,2}$")
_WHITESPACE = re.compile(r"\s+")


def one_line(text: Any, limit: int = MAX_MESSAGE_CHARS) -> str:
    """The first non-empty line of ``text``, stripped and cut to ``limit`` characters."""
    lines = [ln.strip() for ln in str(text).splitlines() if ln.strip()]
    line = lines[0] if lines else "bad request"
    return line if len(line) <= limit else line[: limit - 3] + "..."


class ServingInputError(MlflowException):
    """A request the model refuses: HTTP 400 with a one-line message (the row, the field and the fix).

    The scoring server rewrites ``e.message`` of every ``MlflowException`` from ``predict`` into a multi-line text
    that echoes the whole request; the ``message`` property ignores such rewrites so the client sees the reason.
    """

    def __init__(self, reason: str, error_code: int = BAD_REQUEST) -> None:
        super().__init__(one_line(reason), error_code=error_code)

    @property
    def message(self) -> str:  # type: ignore[override]
        """The one-line reason given at construction."""
        return self._reason

    @message.setter
    def message(self, value: str) -> None:
        if not hasattr(self, "_reason"):
            self._reason = one_line(value)


class ServingInternalError(ServingInputError):
    """The model failed on a valid request (a bug, out of memory): HTTP 500, one line, traceback in the server log."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason, error_code=INTERNAL_ERROR)


@dataclasses.dataclass
class DecodedRow:
    """One validated row: decoded PIL images (None for an absent modality), caption and camera."""

    frames: list[Image.Image | None]
    mask: Image.Image | None
    caption: str
    camera: int | None

    @property
    def presence(self) -> tuple[bool, bool, bool]:
        """``(rgb, nir, tir)``: which modalities the row carries."""
        return tuple(f is not None for f in self.frames)  # type: ignore[return-value]

    @property
    def modalities(self) -> list[str]:
        """The names of the modalities the row carries, in :data:`MODALITIES` order (the response's field)."""
        return [m for m, f in zip(MODALITIES, self.frames) if f is not None]


def encode_image(img: Image.Image, fmt: str = "PNG") -> str:
    """Base64 text of ``img`` saved as ``fmt`` (what a client puts in ``rgb``/``nir``/``tir``/``mask``)."""
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def decode_image(value: Any, where: str, modes: tuple[str, ...]) -> Image.Image:
    """Decode one base64 image field and check its size and mode.

    Raises:
        ServingInputError: not a string, not base64, too large, not a JPEG/PNG, or a mode outside ``modes``.
    """
    if not isinstance(value, str):
        raise ServingInputError(f"{where} must be a base64 string of a JPEG or PNG image, got {_type_name(value)}")
    text = _B64_PREFIX.sub("", value.strip(), count=1)
    text = _WHITESPACE.sub("", text)
    if not text:
        raise ServingInputError(f"{where} is empty; send the base64 of a JPEG or PNG image")
    if len(text) > (MAX_IMAGE_BYTES + 2) // 3 * 4:
        raise ServingInputError(f"{where} is larger than {MAX_IMAGE_BYTES} bytes (limit MAX_IMAGE_BYTES); send a "
                                f"smaller image (ReID crops are typically 256x128)")
    if len(text) % 4 != 0 or not _B64_ALPHABET.match(text):
        raise ServingInputError(f"{where} is not valid base64 (standard alphabet A-Z a-z 0-9 + / with = padding); "
                                f"encode the image file bytes with base64")
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise ServingInputError(f"{where} is not valid base64; encode the image file bytes with base64") from None
    if len(raw) > MAX_IMAGE_BYTES:
        raise ServingInputError(f"{where} is {len(raw)} bytes, more than the limit of {MAX_IMAGE_BYTES} "
                                f"(MAX_IMAGE_BYTES); send a smaller image")
    try:
        img = Image.open(io.BytesIO(raw), formats=list(IMAGE_FORMATS))
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
        raise ServingInputError(f"{where} is not a JPEG or PNG image (the base64 decodes to {len(raw)} bytes that "
                                f"no allowed decoder reads); send the bytes of a .jpg or .png file") from None
    w, h = img.size
    if w < 1 or h < 1 or w * h > MAX_IMAGE_PIXELS:
        raise ServingInputError(f"{where} is {w}x{h} pixels, outside 1..{MAX_IMAGE_PIXELS} pixels "
                                f"(MAX_IMAGE_PIXELS); downscale it (the model resizes to its input size anyway)")
    if img.mode not in modes:
        raise ServingInputError(f"{where} has image mode {img.mode}; accepted modes are {', '.join(modes)}: convert "
                                f"it first (e.g. PIL img.convert('{modes[0]}'))")
    try:
        img.load()
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
        raise ServingInputError(f"{where} is a truncated or corrupt {img.format} image; re-encode the file") from None
    return img


def parse_rows(rows: Any, num_cameras: int) -> list[DecodedRow]:
    """Validate the request's ``inputs`` and decode every row.

    Args:
        rows: the JSON ``inputs`` value (a list of row dicts; a pandas DataFrame is accepted for in-process use).
        num_cameras: cameras the model's SIE knows; 0 = the model takes no ``camera``.

    Raises:
        ServingInputError: the first problem found, naming the row index and field.
    """
    if rows is None:
        raise ServingInputError('the request has no rows; send {"inputs": [{"rgb": ..., "nir": ..., "tir": ...}]}')
    if _is_dataframe(rows):
        rows = [_dataframe_row(r) for r in rows.to_dict(orient="records")]
    if isinstance(rows, dict):
        raise ServingInputError('"inputs" must be a list of rows, got one object; wrap it in a list: '
                                '{"inputs": [{...}]}')
    if not isinstance(rows, list):
        raise ServingInputError(f'"inputs" must be a list of rows (objects with rgb, nir and/or tir), got '
                                f'{_type_name(rows)}')
    if not rows:
        raise ServingInputError('the request has no rows ("inputs" is empty); send at least one row')
    if len(rows) > MAX_ROWS:
        raise ServingInputError(f"the request has {len(rows)} rows, more than MAX_ROWS={MAX_ROWS}; split it")
    return [_parse_row(i, row, num_cameras) for i, row in enumerate(rows)]


def _parse_row(i: int, row: Any, num_cameras: int) -> DecodedRow:
    """One row of :func:`parse_rows`."""
    if not isinstance(row, dict):
        raise ServingInputError(f"row {i} must be an object with fields rgb, nir, tir (at least one; optional mask, "
                                f"caption, camera), got {_type_name(row)}")
    unknown = sorted(str(k) for k in row if k not in MODALITIES + OPTIONAL_FIELDS)
    if unknown:
        raise ServingInputError(f"row {i} has unknown field(s) {', '.join(repr(k[:40]) for k in unknown[:5])}; "
                                f"allowed: {', '.join(MODALITIES + OPTIONAL_FIELDS)}")
    if all(row.get(m) is None for m in MODALITIES):
        raise ServingInputError(f"row {i} has no modality: every row needs a base64 image for at least one of rgb, "
                                f"nir and tir")
    frames = [decode_image(row[m], f"row {i} field '{m}'", FRAME_MODES) if row.get(m) is not None else None
              for m in MODALITIES]
    mask = None
    if row.get("mask") is not None:
        mask = decode_image(row["mask"], f"row {i} field 'mask'", MASK_MODES)
    caption = row.get("caption")
    if caption is None:
        caption = ""
    if not isinstance(caption, str):
        raise ServingInputError(f"row {i} field 'caption' must be a string, got {_type_name(caption)}")
    if len(caption) > MAX_CAPTION_CHARS:
        raise ServingInputError(f"row {i} field 'caption' has {len(caption)} characters, more than "
                                f"MAX_CAPTION_CHARS={MAX_CAPTION_CHARS}; shorten it")
    camera = row.get("camera")
    if camera is not None:
        if isinstance(camera, bool) or not isinstance(camera, int):
            raise ServingInputError(f"row {i} field 'camera' must be an integer camera id, got {_type_name(camera)}")
        if num_cameras <= 0:
            raise ServingInputError(f"row {i} field 'camera': this model was trained without camera ids (no SIE); "
                                    f"omit 'camera'")
        if not 0 <= camera < num_cameras:
            raise ServingInputError(f"row {i} field 'camera' is {camera}; camera ids are 0-based and this model "
                                    f"knows {num_cameras} cameras (0..{num_cameras - 1})")
    return DecodedRow(frames=frames, mask=mask, caption=caption, camera=camera)


def _type_name(value: Any) -> str:
    """A JSON-ish type name and a short repr, for messages (never the whole value: it may be megabytes)."""
    names = {str: "a string", bool: "a boolean", int: "a number", float: "a number", list: "a list",
             dict: "an object", type(None): "null"}
    shown = repr(value)
    shown = shown if len(shown) <= 40 else shown[:37] + "..."
    return f"{names.get(type(value), type(value).__name__)} ({shown})"


def _is_dataframe(value: Any) -> bool:
    return type(value).__name__ == "DataFrame" and hasattr(value, "to_dict")


def _dataframe_row(record: dict[str, Any]) -> dict[str, Any]:
    """A DataFrame record as a JSON row: NaN cells are absent fields, and ``camera`` is back to an int (pandas makes
    a column with missing cameras float)."""
    row = {k: v for k, v in record.items() if not _is_missing(v)}
    cam = row.get("camera")
    if isinstance(cam, float) and cam.is_integer():
        row["camera"] = int(cam)
    return row


def _is_missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and value != value)


class STMIServingModel(mlflow.pyfunc.PythonModel):
    """The pyfunc: loads the training checkpoint, validates rows, returns ``STMI.embed`` per row.

    See the module docstring for the request format, the accepted image modes, the limits and how the error
    responses stay one line.
    """

    # MLflow would validate the input against the type hint before ``predict`` and raise multi-line errors
    # echoing the data; ``parse_rows`` does the validation instead (the signature is still inferred from the hint).
    _skip_type_hint_validation = True

    def load_context(self, context: Any) -> None:
        """Build the model from the ``checkpoint`` artifact on CUDA when available, else CPU, in eval mode."""
        import torch

        from stmi.data.transforms import PairedTransform
        from stmi.engine import build_tokenizer, load_exported_model

        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.model, self.cfg = load_exported_model(context.artifacts[CHECKPOINT_ARTIFACT], self.device)
        self.num_cameras = self.cfg.model.num_cameras if self.cfg.model.use_sie else 0
        self.transform = PairedTransform(tuple(self.cfg.model.image_size), train=False)
        self.tokenize = build_tokenizer(self.cfg.model)
        _install_one_line_errors()

    def predict(self, context: Any, model_input: list[dict[str, Any]],
                params: dict[str, Any] | None = None) -> list[dict[str, Any]]:
        """Per row ``{"embedding": [embedding_dim floats], "modalities": [names used]}``; rows: module docstring."""
        rows = parse_rows(model_input, self.num_cameras)
        try:
            return [{"embedding": e, "modalities": r.modalities} for r, e in zip(rows, self._embed(rows))]
        except MlflowException:
            raise
        except Exception as e:
            log.exception("STMI serving: embedding failed on a validated request")
            raise ServingInternalError(f"internal error while computing the embedding ({type(e).__name__}); the "
                                       f"server log has the traceback") from None

    def _embed(self, rows: list[DecodedRow]) -> list[list[float]]:
        """Preprocess like evaluation and run ``STMI.embed`` (partial rows with their presence mask); rows with and
        without ``camera`` run as two batches."""
        import torch

        from stmi.data.batch import model_inputs

        out: list[list[float] | None] = [None] * len(rows)
        groups = [[i for i, r in enumerate(rows) if r.camera is not None],
                  [i for i, r in enumerate(rows) if r.camera is None]]
        for idx in groups:
            if not idx:
                continue
            imgs, kw = model_inputs(preprocess([rows[i] for i in idx], self.transform, self.tokenize), self.device)
            with torch.inference_mode():
                emb = self.model.embed(*imgs, **kw)
            for i, e in zip(idx, emb.float().cpu().tolist()):
                out[i] = e
        return out  # type: ignore[return-value]


def preprocess(rows: list[DecodedRow], transform: Any, tokenize: Any) -> dict[str, Any]:
    """The batch (a ``TripletDataset`` batch's keys) of decoded rows: evaluation transform, tokenized captions.

    ``stmi.data.batch.model_inputs`` turns it into ``STMI.embed`` arguments, as for an evaluation batch. An absent
    modality's frame is zeros and the batch carries ``presence`` ``(B, 3)``; a batch of complete rows carries no
    ``presence`` (the model's complete path, bit-identical to a model without missing-modality support).

    Args:
        rows: decoded rows; all with a camera or all without.
        transform: ``PairedTransform(image_size, train=False)``.
        tokenize: ``stmi.engine.build_tokenizer(cfg.model)``.
    """
    import torch

    frames: list[list[torch.Tensor]] = [[], [], []]
    masks, has_mask = [], []
    for r in rows:
        present, m = transform([f for f in r.frames if f is not None], r.mask)  # eval mode: per-frame resize only
        it = iter(present)
        slots = [next(it) if f is not None else None for f in r.frames]
        blank = torch.zeros_like(present[0])
        for k, x in enumerate(slots):
            frames[k].append(x if x is not None else blank)
        has_mask.append(m is not None)
        masks.append(m if m is not None else torch.zeros(1, *present[0].shape[1:]))
    any_mask = any(has_mask)
    cams = [r.camera for r in rows]
    presence = torch.tensor([r.presence for r in rows], dtype=torch.bool)
    return {
        "rgb": torch.stack(frames[0]), "nir": torch.stack(frames[1]), "tir": torch.stack(frames[2]),
        "presence": None if bool(presence.all()) else presence,
        "mask": torch.stack(masks) if any_mask else None,
        "has_mask": torch.tensor(has_mask) if any_mask else None,
        "text": tokenize([r.caption for r in rows]),
        "camid": torch.tensor(cams, dtype=torch.long) if all(c is not None for c in cams) else None,
    }


def _install_one_line_errors() -> None:
    """In a scoring-server process, make every ``MlflowException`` leaving ``invocations`` one line.

    The model only sees requests that parsed as JSON; an empty body, a non-JSON body or invalid UTF-8 fail in the
    server before ``predict`` with a multi-line message echoing the body, and an unexpected error would carry a
    ``stack_trace``. The wrapper keeps status codes, logs stack traces on the server, and leaves every other
    behaviour unchanged. It is installed only in processes started by ``mlflow models serve`` (the server exports
    the model path in ``__pyfunc_model_path__``), never in a process that merely loads the model.
    """
    server = sys.modules.get("mlflow.pyfunc.scoring_server")
    if server is None or not os.environ.get(getattr(server, "_SERVER_MODEL_PATH", "__pyfunc_model_path__")):
        return
    original = getattr(server, "invocations", None)
    if original is None or getattr(original, "_stmi_one_line", False):
        if original is None:
            log.warning("mlflow scoring server has no 'invocations' function: error responses may span lines")
        return

    @functools.wraps(original)
    def invocations(data: Any, content_type: Any = None, *args: Any, **kwargs: Any) -> Any:
        try:
            return original(data, content_type, *args, **kwargs)
        except ServingInputError:
            raise
        except MlflowException as e:
            trace = e.json_kwargs.pop("stack_trace", None) if isinstance(e.json_kwargs, dict) else None
            if trace:
                log.error("scoring server error: %s\n%s", one_line(e.message), trace)
            is_json = str(content_type or "").split(";")[0].strip().lower() == "application/json"
            reason = (_json_body_problem(data) if is_json else None) or e.message
            code = ErrorCode.Value(e.error_code) if e.error_code in ErrorCode.keys() else INTERNAL_ERROR
            raise ServingInputError(reason, error_code=code) from None

    invocations._stmi_one_line = True  # type: ignore[attr-defined]
    server.invocations = invocations


_REQUEST_SHAPE = '{"inputs": [{"rgb": "<base64>", "nir": "<base64>", "tir": "<base64>"}]}'


def _json_body_problem(data: Any) -> str | None:
    """Why a JSON request body failed before reaching the model (empty, not JSON, a bare list), or None.

    Only called after the server refused the request, so valid requests are never parsed twice.
    """
    import json

    if isinstance(data, (bytes, str)) and not data.strip():
        return f"empty request body; send JSON {_REQUEST_SHAPE}"
    try:
        body = json.loads(data)
    except UnicodeDecodeError:
        return f"request body is not UTF-8 text; send JSON {_REQUEST_SHAPE}"
    except (ValueError, TypeError) as e:
        return f"request body is not valid JSON ({one_line(e, 120)}); send {_REQUEST_SHAPE}"
    if isinstance(body, list):
        return f"request body is a JSON list; wrap the rows in an object: {_REQUEST_SHAPE}"
    if not isinstance(body, dict):
        return f"request body must be a JSON object, got {_type_name(body)}; send {_REQUEST_SHAPE}"
    if "inputs" not in body:
        found = ", ".join(repr(str(k)[:30]) for k in list(body)[:5]) or "no keys"
        return f"request body has no 'inputs' key (found {found}); this model takes rows as {_REQUEST_SHAPE}"
    return None


def make_example_row(cfg: Any) -> dict[str, Any]:
    """A valid row (small synthetic images of the model's input size, a mask, a caption, a camera if SIE).

    Args:
        cfg: an ``STMIConfig`` or its ``ModelConfig``.
    """
    mcfg = getattr(cfg, "model", cfg)
    h, w = (int(v) for v in mcfg.image_size)
    rgb = Image.new("RGB", (w, h), (96, 110, 128))
    draw = ImageDraw.Draw(rgb)
    draw.rectangle((w // 4, h // 6, 3 * w // 4, 5 * h // 6), fill=(200, 40, 40))
    nir = Image.new("L", (w, h), 60)
    ImageDraw.Draw(nir).rectangle((w // 4, h // 6, 3 * w // 4, 5 * h // 6), fill=180)
    tir = Image.new("L", (w, h), 30)
    ImageDraw.Draw(tir).ellipse((w // 4, h // 6, 3 * w // 4, 5 * h // 6), fill=220)
    mask = Image.new("L", (w, h), 0)
    ImageDraw.Draw(mask).rectangle((w // 4, h // 6, 3 * w // 4, 5 * h // 6), fill=255)
    row: dict[str, Any] = {"rgb": encode_image(rgb), "nir": encode_image(nir), "tir": encode_image(tir),
                           "mask": encode_image(mask), "caption": "a person in a red jacket"}
    if mcfg.use_sie and mcfg.num_cameras > 0:
        row["camera"] = 0
    return row


def example_request(cfg: Any) -> str:
    """The JSON body of a one-row request (for docs and smoke tests)."""
    import json

    return json.dumps({"inputs": [make_example_row(cfg)]})


__all__ = [
    "MAX_IMAGE_BYTES", "MAX_IMAGE_PIXELS", "MAX_ROWS", "MAX_CAPTION_CHARS", "FRAME_MODES", "MASK_MODES",
    "STMIServingModel", "ServingInputError", "ServingInternalError", "decode_image", "encode_image", "example_request",
    "make_example_row", "parse_rows", "preprocess",
]
