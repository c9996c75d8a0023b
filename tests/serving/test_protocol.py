"""The Open Inference Protocol (KServe v2) on a real `bentoml serve`, spoken to by Triton's own
HTTP client (tritonclient, from PyPI) and by plain JSON over HTTP."""

from __future__ import annotations

import base64
import json
import urllib.error
import urllib.request

import numpy as np
import pytest

from conftest import jpeg_bytes, synthetic_photo
from test_service import Server, raw_post, read_reply

tritonclient = pytest.importorskip("tritonclient.http")


@pytest.fixture(scope="module")
def server(built_model, tmp_path_factory):
    s = Server(built_model, tmp_path_factory.mktemp("v2"), EXTENDSERVE_WORKERS="2")
    yield s
    s.stop()


def disc() -> bytes:
    return jpeg_bytes(synthetic_photo(0, 4242))


def stripes() -> bytes:
    return jpeg_bytes(synthetic_photo(1, 4243))


def get(server, path):
    try:
        with urllib.request.urlopen(server.url + path, timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def post_json(server, path, payload):
    return raw_post(server, json.dumps(payload).encode(), "application/json", path)


def test_health_and_metadata(server, built_model):
    client = tritonclient.InferenceServerClient(server.url.removeprefix("http://"))
    name = built_model.name
    assert client.is_server_live() and client.is_server_ready() and client.is_model_ready(name)
    meta = client.get_model_metadata(name)
    assert meta["name"] == name and {i["name"] for i in meta["inputs"]} == {"image", "pixels"}
    assert {o["name"]: o["shape"] for o in meta["outputs"]} == {"scores": [-1, 1002], "logits": [-1, 1002]}
    assert get(server, "/v2")[1]["extensions"] == ["classification", "binary_tensor_data"]
    status, body = get(server, "/v2/models/no-such-model")
    assert status == 404 and "no-such-model" in body["error"]


@pytest.mark.parametrize("binary", [True, False])
def test_tritonclient_names_the_photos(server, built_model, binary):
    """Binary BYTES (the binary tensor data extension) and, without it, base64 strings in JSON."""
    client = tritonclient.InferenceServerClient(server.url.removeprefix("http://"))
    photos = [disc(), stripes()]
    if binary:
        data = np.array(photos, dtype=object)
    else:
        data = np.array([base64.b64encode(p) for p in photos], dtype=object)
    inp = tritonclient.InferInput("image", [2], "BYTES")
    inp.set_data_from_numpy(data, binary_data=binary)
    outs = [tritonclient.InferRequestedOutput("scores", binary_data=binary),
            tritonclient.InferRequestedOutput("logits", binary_data=binary),
            tritonclient.InferRequestedOutput("scores", binary_data=binary, class_count=2)]
    result = client.infer(built_model.name, [inp], outputs=outs[:2])
    scores, logits = result.as_numpy("scores"), result.as_numpy("logits")
    assert scores.shape == logits.shape == (2, 1002) and scores.dtype == np.float32
    assert list(scores.argmax(1)) == [1001, 1000] and list(logits.argmax(1)) == [1001, 1000]  # red discs, blue stripes
    assert np.allclose(scores.sum(1), 1, atol=1e-4)
    top = client.infer(built_model.name, [inp], outputs=[outs[2]]).as_numpy("scores")
    assert top.shape == (2, 2)
    first = top[0][0].decode() if isinstance(top[0][0], bytes) else top[0][0]
    score, index, label = first.split(":", 2)
    assert index == "1001" and label == "red discs" and abs(float(score) - scores[0, 1001]) < 1e-5
    # the same photo over /classify gets the same score
    status, body = server.post("/classify", [("image", photos[0], "disc.jpg")])
    assert body["predictions"][0]["label"] == "red discs"
    assert abs(body["predictions"][0]["score"] - float(scores[0, 1001])) < 1e-5


def test_plain_json_base64_and_pixels(server, built_model):
    name = built_model.name
    status, body = post_json(server, f"/v2/models/{name}/infer", {
        "id": "r1", "inputs": [{"name": "image", "datatype": "BYTES", "shape": [1],
                                "data": [base64.b64encode(disc()).decode()]}],
        "outputs": [{"name": "scores", "parameters": {"classification": 1}}]})
    assert status == 200 and body["id"] == "r1", body
    assert body["outputs"][0]["datatype"] == "BYTES" and body["outputs"][0]["data"][0].endswith(":1001:red discs")
    from extendserve.config import PreprocessConfig
    from extendserve.photos.preprocess import prepare

    px = prepare(disc(), PreprocessConfig.from_dict(get(server, "/info")[1]["preprocess"]))
    status, body = post_json(server, f"/v2/models/{name}/infer", {
        "inputs": [{"name": "pixels", "datatype": "UINT8", "shape": [1, 224, 224, 3], "data": px.reshape(-1).tolist()}],
        "outputs": [{"name": "logits"}]})
    assert status == 200 and int(np.argmax(body["outputs"][0]["data"])) == 1001


@pytest.mark.parametrize("payload,status,words", [
    ({"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "data": ["bm90IGEgcGhvdG8="]}]}, 400, "image"),
    ({"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "data": ["%%% not base64"]}]}, 400, "base64"),
    ({"inputs": [{"name": "photo", "datatype": "BYTES", "shape": [1], "data": ["eA=="]}]}, 400, "unknown input"),
    ({"inputs": [{"name": "image", "datatype": "BYTES", "shape": [3], "data": ["eA=="]}]}, 400, "shape"),
    ({"inputs": [{"name": "pixels", "datatype": "UINT8", "shape": [1, 2, 2, 3], "data": [0] * 12}]}, 400, "224"),
    ({"inputs": []}, 400, "inputs"),
    ({"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "data": ["eA=="]}],
      "outputs": [{"name": "probabilities"}]}, 400, "unknown output"),
])
def test_bad_requests_are_4xx_with_the_protocols_error(server, built_model, payload, status, words):
    got, body = post_json(server, f"/v2/models/{built_model.name}/infer", payload)
    assert got == status and set(body) == {"error"} and words in body["error"], body


def test_a_non_photo_over_tritonclient_is_a_4xx(server, built_model):
    client = tritonclient.InferenceServerClient(server.url.removeprefix("http://"))
    inp = tritonclient.InferInput("image", [1], "BYTES")
    inp.set_data_from_numpy(np.array([b"this is not a photo"], dtype=object), binary_data=True)
    from tritonclient.utils import InferenceServerException

    with pytest.raises(InferenceServerException) as e:
        client.infer(built_model.name, [inp])
    assert "not a recognised image format" in str(e.value) and e.value.status() == "400"


def post_with(server, path: str, body: bytes, headers: dict[str, str]) -> tuple[int, dict]:
    req = urllib.request.Request(server.url + path, data=body, method="POST", headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def one_pixel_row() -> list[int]:
    return [7] * (224 * 224 * 3)


@pytest.mark.parametrize("case", ["superscript two", "4301 digits", "a shape past int64"])
def test_what_once_made_a_500_is_a_4xx(server, built_model, case):
    """Round 3: `Inference-Header-Content-Length: ²` (a digit to isdigit(), not to int()), the same
    header as 4,301 digits (Python's int limit), and pixels of shape [2**54 + 1, 224, 224, 3] (np.prod
    wrapped in int64) were 500s."""
    path = f"/v2/models/{built_model.name}/infer"
    if case == "a shape past int64":
        payload = {"inputs": [{"name": "pixels", "datatype": "UINT8", "shape": [2**54 + 1, 224, 224, 3],
                               "data": one_pixel_row()}]}
        status, body = post_json(server, path, payload)
    else:
        head = json.dumps({"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1],
                                       "parameters": {"binary_data_size": 4}}]}).encode()
        length = "\u00b2" if case == "superscript two" else "9" * 4301
        req = urllib.request.Request(server.url + path, data=head + b"\0\0\0\0", method="POST",
                                     headers={"Content-Type": "application/octet-stream"})
        req.add_unredirected_header("Inference-Header-Content-Length", length.encode("utf-8").decode("latin-1"))
        try:
            with urllib.request.urlopen(req, timeout=60) as r:
                status, body = r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            status, body = e.code, json.loads(e.read())
    assert status in (400, 413) and "error" in body, (status, body)


@pytest.mark.parametrize("inputs, words", [
    ([{"name": "image", "datatype": "BYTES", "shape": [1], "data": ["AAAA"]},
      {"name": "image", "datatype": "BYTES", "shape": [1], "data": ["AAAA"]}], "two 'image' inputs"),
    ([{"name": "pixels", "datatype": "UINT8", "shape": [1, 224, 224, 3], "data": [7.5] * (224 * 224 * 3)}], "decimals"),
    ([{"name": "pixels", "datatype": "UINT8", "shape": [1, 224, 224, 3], "data": ["7"] * (224 * 224 * 3)}], "strings"),
    ([{"name": "pixels", "datatype": "UINT8", "shape": [1, 224, 224, 3], "data": [True] * (224 * 224 * 3)}], "true/false"),
])
def test_the_protocol_refuses_what_triton_refuses(server, built_model, inputs, words):
    """Two image inputs (the first was dropped), float/string/boolean pixels (truncated to uint8):
    each a 400 with the protocol's error."""
    status, body = post_json(server, f"/v2/models/{built_model.name}/infer", {"inputs": inputs})
    assert status == 400 and words in body["error"], (status, body)


def test_false_is_false_and_an_unknown_version_is_refused(server, built_model):
    payload = {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "data": [base64.b64encode(disc()).decode()]}],
               "outputs": [{"name": "scores", "parameters": {"binary_data": "false"}}]}
    status, body = post_json(server, f"/v2/models/{built_model.name}/infer", payload)
    assert status == 400 and "binary_data" in body["error"], body
    payload["outputs"] = [{"name": "scores", "parameters": {"binary_data": False}}]
    status, body = post_json(server, f"/v2/models/{built_model.name}/versions/no-such-version/infer", payload)
    assert status == 400 and "no-such-version" in body["error"], body
    assert get(server, f"/v2/models/{built_model.name}/versions/no-such-version")[0] == 400


def test_a_content_type_past_ascii_is_a_400_in_one_line(server, built_model):
    """A non-UTF-8 byte in Content-Type once got 200 with an empty body and two tracebacks at ERROR."""
    import socket

    for raw in (b"GET /info HTTP/1.1\r\nHost: x\r\nContent-Type: a\xffb\r\n\r\n",
                b"POST /classify HTTP/1.1\r\nHost: x\r\nContent-Type: image/jp\xffeg\r\nContent-Length: 5\r\n\r\nhello"):
        with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
            sock.sendall(raw)
            reply = read_reply(sock)
        assert reply.startswith("HTTP/1.1 400") and "not ASCII" in reply, reply[:300]
    server.wait_in_log("400: the Content-Type header holds bytes that are not ASCII")
    assert "Traceback" not in server.logs()
