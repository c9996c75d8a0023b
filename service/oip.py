"""The Open Inference Protocol (KServe v2), beside /classify: what Triton's and KServe's clients speak.

``GET /v2``, ``/v2/health/live``, ``/v2/health/ready``, ``/v2/models/NAME[/versions/V]`` and its
``/ready``, ``POST /v2/models/NAME[/versions/V]/infer``. Inputs: ``image`` (BYTES, one encoded photo
a row: raw bytes in the binary tensor data extension, base64 strings in plain JSON) or ``pixels``
(UINT8 [n, crop, crop, 3], already resized and cropped as the manifest says). Outputs: ``scores``
and ``logits`` (FP32 [n, classes]); an output asked for with ``parameters.classification = k``
answers Triton's classification extension (BYTES ``"score:index:label"``, best first). The same
decoding, limits, batching and checks as /classify; errors are 4xx with ``{"error": ...}``. This
module parses and writes the protocol (the routes are in v2.py). No torch here.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import re
import struct
from dataclasses import dataclass, field
from typing import Any

import numpy as np

HEADER_LENGTH = "inference-header-content-length"  # the binary tensor data extension's header
INPUTS = ("image", "pixels")
OUTPUTS = ("scores", "logits")
MAX_HEADER = 1 << 20  # bytes of JSON a request's header may hold (the photos travel as binary or base64)
JSON_VALUE_BYTES = 64  # what one JSON value costs once parsed (a Python object and its list slot), at most
JSON_TEXT_COPIES = 3  # and the text itself: decoded, held as strings, a base64 photo decoded (measured: a 188 MB
# base64 photo in plain JSON took a worker from 302 to 1198 MB, bench/serving/body_memory.py)
_LENGTH = re.compile(r"[0-9]{1,18}")  # ASCII digits only: '²' is a digit to str.isdigit() and not to int()


class ProtocolError(Exception):
    """A request the protocol refuses: answered ``status`` with ``{"error": message}``."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


@dataclass
class Wanted:
    name: str
    binary: bool
    classification: int = 0


@dataclass
class InferRequest:
    id: str | None
    photos: list[bytes] = field(default_factory=list)  # encoded photos (input image)
    pixels: np.ndarray | None = None  # uint8 [n, crop, crop, 3] (input pixels)
    outputs: list[Wanted] = field(default_factory=list)

    @property
    def rows(self) -> int:
        return len(self.photos) if self.pixels is None else len(self.pixels)


def json_values(body: bytes, header_length: str | None) -> int:
    """An upper bound on the values the request's JSON holds (its commas, plus one), counted before
    it is parsed: what parsing will cost is ``JSON_VALUE_BYTES`` times this, taken from the budget first."""
    if header_length is not None and _LENGTH.fullmatch(header_length.strip()):
        return body.count(b",", 0, int(header_length.strip())) + 1
    return body.count(b",") + 1


def check_json_values(values: int, has_pixels: bool, crop: int, max_rows: int) -> None:
    """Refuse a JSON body with more values than the rows it may carry could need, before parsing it
    (250 MB of ``""`` elements once blocked a worker for 24 s and took it from 675 to 2511 MB)."""
    most = max_rows * (crop * crop * 3 if has_pixels else 1) + 1024
    if values > most:
        raise ProtocolError(413, f"the request's JSON holds up to {values} values, more than {max_rows} rows of "
                                 f"{'pixels' if has_pixels else 'photos'} could need ({most}); send one base64 string a "
                                 "photo, or photos and pixels as binary tensor data")


def parse_infer(body: bytes, header_length: str | None, crop: int, classes: int, max_rows: int) -> InferRequest:
    """A v2 infer request (plain JSON, or JSON then binary tensor data) -> what to run."""
    if header_length is not None:
        if not _LENGTH.fullmatch(header_length.strip()) or int(header_length) > len(body):
            raise ProtocolError(400, f"Inference-Header-Content-Length {header_length[:20]!r} is not the length of "
                                     "the JSON header at the start of the body")
        n = int(header_length)
        view = memoryview(body)  # the binary data is read in place: slicing bytes copied it twice (+720 MB at 192 MB)
        head, rest = body[:n], view[n:]
    else:
        head, rest = body, memoryview(b"")
    if header_length is not None and len(head) > MAX_HEADER:
        raise ProtocolError(400, f"the JSON header is over {MAX_HEADER // 1024} KB; send photos as binary tensor data")
    try:
        req = json.loads(head)  # bytes: no decoded copy kept beside them
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise ProtocolError(400, "the request is not JSON (UTF-8); send {\"inputs\": [...]} as the Open Inference "
                                 "Protocol says, photos as base64 strings or as binary tensor data") from None
    if not isinstance(req, dict) or not isinstance(req.get("inputs"), list) or not req["inputs"]:
        raise ProtocolError(400, "the request has no 'inputs' list; give the input 'image' (BYTES) or 'pixels' (UINT8)")
    out = InferRequest(id=str(req["id"])[:256] if isinstance(req.get("id"), (str, int)) else None)
    offset = 0
    for inp in req["inputs"]:
        if not isinstance(inp, dict) or inp.get("name") not in INPUTS:
            name = inp.get("name") if isinstance(inp, dict) else inp
            raise ProtocolError(400, f"unknown input {str(name)[:40]!r}; this model takes 'image' (BYTES, encoded "
                                     f"photos) or 'pixels' (UINT8 [n, {crop}, {crop}, 3])")
        params = inp.get("parameters") or {}
        raw = None
        if isinstance(params, dict) and "binary_data_size" in params:
            size = params["binary_data_size"]
            if not isinstance(size, int) or isinstance(size, bool) or size < 0 or offset + size > len(rest):
                raise ProtocolError(400, f"input {inp['name']}: binary_data_size {str(size)[:20]} is more than the "
                                         "binary data after the header")
            raw, offset = rest[offset : offset + size], offset + size
        elif "data" not in inp:
            raise ProtocolError(400, f"input {inp['name']}: no 'data' and no binary_data_size; give one")
        _read_input(inp, raw, out, crop, max_rows)
    if offset != len(rest):
        raise ProtocolError(400, f"{len(rest) - offset} bytes of binary data after the inputs that no input declares")
    if out.photos and out.pixels is not None:
        raise ProtocolError(400, "give either 'image' or 'pixels', not both")
    if not out.rows:
        raise ProtocolError(400, "no photos in the request")
    if out.rows > max_rows:
        raise ProtocolError(413, f"{out.rows} photos in one request is over the limit of {max_rows} "
                                 "(EXTENDSERVE_MAX_BATCH_PHOTOS); split them over several requests")
    out.outputs = _outputs(req, classes)
    return out


def _read_input(inp: dict[str, Any], raw: memoryview | None, out: InferRequest, crop: int, max_rows: int) -> None:
    """One input (``raw``: its binary data, if sent so) into ``out``, its rows counted first."""
    shape = _shape(inp)
    if shape and shape[0] > max_rows:  # before a single element is read
        raise ProtocolError(413, f"input {inp['name']}: shape {shape[:4]} holds {shape[0]} rows, over the limit of "
                                 f"{max_rows} (EXTENDSERVE_MAX_BATCH_PHOTOS); split them over several requests")
    if inp["name"] == "image" and out.photos:
        raise ProtocolError(400, "two 'image' inputs; give one, with one element a photo")
    if inp["name"] == "pixels" and out.pixels is not None:
        raise ProtocolError(400, "two 'pixels' inputs; give one, with one row a photo")
    if inp["name"] == "image":
        if inp.get("datatype") != "BYTES":
            raise ProtocolError(400, "input image: datatype must be BYTES (one encoded photo a row)")
        out.photos = _bytes_elements(raw, max_rows) if raw is not None else _base64_elements(inp["data"], max_rows)
        if not shape or shape[0] != len(out.photos) or math.prod(shape) != len(out.photos):
            raise ProtocolError(400, f"input image: shape {shape} does not hold the {len(out.photos)} photos sent; "
                                     "give shape [n] (or [n, 1]) for n photos")
    else:
        out.pixels = _pixels(inp, raw, shape, crop)


def _shape(inp: dict[str, Any]) -> list[int]:
    shape = inp.get("shape")
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
        raise ProtocolError(400, f"input {inp['name']}: 'shape' must be a list of whole numbers")
    return shape


def _too_many(max_rows: int) -> ProtocolError:
    return ProtocolError(413, f"input image: more than {max_rows} photos in one request, over the limit "
                              "(EXTENDSERVE_MAX_BATCH_PHOTOS); split them over several requests")


def _bytes_elements(raw: memoryview, max_rows: int) -> list[memoryview]:
    """A BYTES tensor in the binary extension: each element a 4-byte little-endian length, then its
    bytes (views, not copies); refused as soon as it holds more than ``max_rows``."""
    items: list[memoryview] = []
    at, view = 0, raw
    while at < len(raw):
        if len(items) >= max_rows:
            raise _too_many(max_rows)
        if at + 4 > len(raw):
            raise ProtocolError(400, "input image: binary BYTES data cut inside an element's 4-byte length")
        (n,) = struct.unpack_from("<I", raw, at)
        if at + 4 + n > len(raw):
            raise ProtocolError(400, "input image: a binary BYTES element is longer than the data sent")
        items.append(view[at + 4 : at + 4 + n])
        at += 4 + n
    return items


def _base64_elements(data: Any, max_rows: int) -> list[bytes]:
    flat = data if isinstance(data, list) else [data]
    if len(flat) > max_rows:
        raise _too_many(max_rows)
    if any(isinstance(x, list) for x in flat):
        flat = [y for x in flat for y in (x if isinstance(x, list) else [x])]
        if len(flat) > max_rows:
            raise _too_many(max_rows)
    out = []
    for i, s in enumerate(flat):
        if not isinstance(s, str):
            raise ProtocolError(400, f"input image: element {i} is not a string; in JSON, send each photo as a base64 string")
        try:
            out.append(base64.b64decode(s, validate=True))
        except (binascii.Error, ValueError):
            raise ProtocolError(400, f"input image: element {i} is not base64; in JSON, send each photo's bytes as "
                                     "base64 (or the raw bytes as binary tensor data)") from None
    return out


def _pixels(inp: dict[str, Any], raw: memoryview | None, shape: list[int], crop: int) -> np.ndarray:
    if inp.get("datatype") != "UINT8":
        raise ProtocolError(400, "input pixels: datatype must be UINT8")
    if len(shape) != 4 or shape[1:] != [crop, crop, 3]:
        raise ProtocolError(400, f"input pixels: shape must be [n, {crop}, {crop}, 3] (resized and cropped as the "
                                 f"model's preprocess says), not {shape}")
    count = math.prod(shape)  # Python ints: np.prod wraps in int64 ([2**54 + 1, 224, 224, 3] once made a 500)
    if raw is not None:
        if len(raw) != count:
            raise ProtocolError(400, f"input pixels: {len(raw)} bytes of binary data for shape {shape} ({count} values)")
        return np.frombuffer(raw, np.uint8).reshape(shape)
    try:
        a = np.asarray(inp["data"])
    except (ValueError, TypeError, OverflowError):
        raise ProtocolError(400, "input pixels: 'data' must be whole numbers 0-255") from None
    if a.dtype.kind not in "iu":  # 1.5, "7" and true are refused, not read as 1, 7 and 1
        what = {"f": "decimals", "b": "true/false"}.get(a.dtype.kind, "strings or mixed values")
        raise ProtocolError(400, f"input pixels: 'data' must be whole numbers 0-255, not {what}")
    if a.size != count or (a.size and (a.min() < 0 or a.max() > 255)):
        raise ProtocolError(400, f"input pixels: 'data' must hold {count} whole numbers 0-255 for shape {shape}")
    return a.astype(np.uint8).reshape(shape)


def _outputs(req: dict[str, Any], classes: int) -> list[Wanted]:
    params = req.get("parameters") if isinstance(req.get("parameters"), dict) else {}
    default_binary = _flag(params.get("binary_data_output", False), "binary_data_output")
    asked = req.get("outputs")
    if asked is None:
        return [Wanted(name, default_binary) for name in OUTPUTS]
    if not isinstance(asked, list):
        raise ProtocolError(400, "'outputs' must be a list")
    wanted = []
    for o in asked:
        if not isinstance(o, dict) or o.get("name") not in OUTPUTS:
            name = o.get("name") if isinstance(o, dict) else o
            raise ProtocolError(400, f"unknown output {str(name)[:40]!r}; this model gives 'scores' and 'logits'")
        p = o.get("parameters") if isinstance(o.get("parameters"), dict) else {}
        k = p.get("classification", 0)
        if not isinstance(k, int) or isinstance(k, bool) or not 0 <= k <= classes:
            raise ProtocolError(400, f"output {o['name']}: classification must be a whole number from 1 to {classes}")
        wanted.append(Wanted(o["name"], _flag(p.get("binary_data", default_binary), f"output {o['name']}: binary_data"), k))
    return wanted


def _flag(value: Any, name: str) -> bool:
    """A JSON boolean: the string "false" is not read as true."""
    if not isinstance(value, bool):
        raise ProtocolError(400, f"{name} must be true or false (a JSON boolean), not {str(value)[:20]!r}")
    return value


def classification(values: np.ndarray, k: int, labels: list[str]) -> np.ndarray:
    """Triton's classification extension: each row's top ``k`` as ``"value:index:label"``, best first."""
    idx = np.argsort(-values, axis=1, kind="stable")[:, :k]
    return np.array([[f"{row[i]:f}:{i}:{labels[i]}".encode() for i in top] for row, top in zip(values, idx)],
                    dtype=object)


def encode_response(model: str, version: str, req_id: str | None,
                    tensors: list[tuple[Wanted, np.ndarray]]) -> tuple[bytes, dict[str, str]]:
    """The response body and its headers: plain JSON, or JSON then binary data where asked for."""
    outputs, blobs = [], []
    for want, value in tensors:
        is_bytes = value.dtype == object
        entry: dict[str, Any] = {"name": want.name, "datatype": "BYTES" if is_bytes else "FP32", "shape": list(value.shape)}
        if want.binary:
            blob = (b"".join(struct.pack("<I", len(x)) + x for x in value.reshape(-1)) if is_bytes
                    else np.ascontiguousarray(value, "<f4").tobytes())
            entry["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        else:
            entry["data"] = ([x.decode() for x in value.reshape(-1)] if is_bytes
                             else [float(x) for x in value.reshape(-1)])
        outputs.append(entry)
    body: dict[str, Any] = {"model_name": model, "model_version": version, "outputs": outputs}
    if req_id is not None:
        body["id"] = req_id
    head = json.dumps(body).encode()
    if not blobs:
        return head, {"content-type": "application/json"}
    return head + b"".join(blobs), {"content-type": "application/octet-stream", HEADER_LENGTH: str(len(head))}


def model_metadata(name: str, version: str, crop: int, classes: int) -> dict[str, Any]:
    return {"name": name, "versions": [version], "platform": "onnxruntime_onnx",
            "inputs": [{"name": "image", "datatype": "BYTES", "shape": [-1]},
                       {"name": "pixels", "datatype": "UINT8", "shape": [-1, crop, crop, 3]}],
            "outputs": [{"name": "scores", "datatype": "FP32", "shape": [-1, classes]},
                        {"name": "logits", "datatype": "FP32", "shape": [-1, classes]}]}
