"""web/serve: the JSON API with FastAPI's TestClient (a fake classifier: no TensorFlow), every bad input as a
4xx JSON error naming the file, the micro-batcher (concurrent requests share one model call), and the
Classifier that `serve` and `predict` share (a tiny real head, slow)."""

from __future__ import annotations

import asyncio
import io
import struct
import threading
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from conftest import noise_jpeg, pixels
from PIL import Image

from pipeline.errors import UserError
from pipeline.images import MAX_PIXELS, ImageError, decode_image

pytest.importorskip("fastapi", reason="the web extra is not installed: pip install 'cnncodes[web]'")
from fastapi.testclient import TestClient  # noqa: E402

from pipeline.web.api import MAX_FILES, MicroBatcher, ServeLimits, create_app  # noqa: E402
from pipeline.web.serve import serve  # noqa: E402

CLASSES = ["red", "green", "blue"]


class FakeClassifier:
    """Probabilities from the mean colour (red, green, blue), an unknown score that is high for grey images
    (no colour stands out), and a record of every model call."""

    classes = CLASSES
    image_size = 16
    resize = "bilinear"
    backbone = "fake-backbone-16"

    def __init__(self, fail: bool = False, detector: bool = True) -> None:
        self.batches: list[int] = []
        self.fail = fail
        self.lock = threading.Lock()
        self.unknown_threshold = 0.5 if detector else None

    def predict_scored(self, images: np.ndarray) -> np.ndarray:
        with self.lock:
            self.batches.append(len(images))
        if self.fail:
            raise RuntimeError("the model broke")
        means = images.reshape(len(images), -1, 3).mean(1)
        e = np.exp(means / 25.0 - means.max(1, keepdims=True) / 25.0)
        score = (
            1 - (means.max(1) - means.min(1)) / 100
            if self.unknown_threshold is not None
            else np.full(len(images), np.nan)
        )
        return np.column_stack([e / e.sum(1, keepdims=True), score])


def image_bytes(colour: tuple[int, int, int], fmt: str = "PNG", seed: int = 0) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels(colour, seed)).save(buffer, format=fmt)
    return buffer.getvalue()


def huge_png_header(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height pixels (the pixel data never comes): refused before decoding."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")
    )


@pytest.fixture
def fake() -> FakeClassifier:
    return FakeClassifier()


ORIGIN = "http://127.0.0.1:8000"  # where the test client says the server is (the default Host check passes)


def open_client(app) -> TestClient:
    return TestClient(app, base_url=ORIGIN)


@pytest.fixture
def client(fake: FakeClassifier):
    with open_client(
        create_app(fake, ServeLimits(max_upload_mb=0.05, max_request_mb=0.5), top_k=5, source="fake")
    ) as c:
        yield c


def post(client: TestClient, *files: tuple[str, bytes], **params):
    return client.post(
        "/predict", files=[("files", (name, data, "application/octet-stream")) for name, data in files], params=params
    )


def assert_error(response, status: int, *fragments: str) -> None:
    assert response.status_code == status, (response.status_code, response.text)
    body = response.json()
    assert list(body) == ["error"], body
    for fragment in fragments:
        assert fragment in body["error"], (fragment, body["error"])


# -- the JSON shape ----------------------------------------------------------------------------------
def test_health_names_classes_and_backbone(client: TestClient) -> None:
    body = client.get("/health").json()
    assert body["classes"] == CLASSES and body["backbone"] == "fake-backbone-16"
    assert body["status"] == "ok" and body["model_calls"] == 0


def test_predict_several_files_in_one_request(client: TestClient, fake: FakeClassifier) -> None:
    files = [
        ("r.png", image_bytes((220, 30, 30))),
        ("g.jpg", image_bytes((30, 220, 30), "JPEG")),
        ("b.webp", image_bytes((30, 30, 220), "WEBP")),
    ]
    response = post(client, *files)
    assert response.status_code == 200, response.text
    predictions = response.json()["predictions"]
    assert [p["filename"] for p in predictions] == ["r.png", "g.jpg", "b.webp"]
    assert [p["top"][0]["class"] for p in predictions] == ["red", "green", "blue"]
    for p in predictions:
        assert [set(t) for t in p["top"]] == [{"class", "probability"}] * 3  # top_k 5, only 3 classes
        probabilities = [t["probability"] for t in p["top"]]
        assert probabilities == sorted(probabilities, reverse=True) and abs(sum(probabilities) - 1) < 1e-6
    assert fake.batches == [3]  # one request, one model call


def test_grey_image_is_unknown_with_its_closest_class(client: TestClient) -> None:
    response = post(client, ("r.png", image_bytes((220, 30, 30))), ("grey.png", image_bytes((128, 128, 128))))
    red, grey = response.json()["predictions"]
    assert red["unknown"] is False and grey["unknown"] is True
    assert grey["unknown_score"] > 0.5 > red["unknown_score"]
    assert len(grey["top"]) == 3  # the closest classes are still listed
    assert client.get("/health").json()["unknown_detector"] is True
    assert "unknown detector on" in client.get("/").text


def test_model_without_detector_says_so() -> None:
    with open_client(create_app(FakeClassifier(detector=False))) as c:
        answer = post(c, ("grey.png", image_bytes((128, 128, 128)))).json()["predictions"][0]
        assert answer["unknown"] is None and answer["unknown_score"] is None
        assert answer["top"][0]["probability"] > 0
        assert c.get("/health").json()["unknown_detector"] is False
        assert "has no unknown detector" in c.get("/").text


def test_top_k_query(client: TestClient) -> None:
    response = post(client, ("r.png", image_bytes((220, 30, 30))), top_k=1)
    assert [t["class"] for t in response.json()["predictions"][0]["top"]] == ["red"]
    every = post(client, ("r.png", image_bytes((220, 30, 30))), top_k=4)  # more than the classes: all of them
    assert len(every.json()["predictions"][0]["top"]) == 3
    assert_error(post(client, ("r.png", image_bytes((220, 30, 30))), top_k=0), 422, "top_k")


# -- bad input: 4xx JSON naming the file and the reason, and the server stays up ------------------------
BAD_FILES = {
    "not_an_image": (("notes.jpg", b"this is text, not a JPEG\n" * 4), 422, "not an image"),
    "zero_bytes": (("empty.png", b""), 422, "empty file"),
    "over_pixel_limit": (("bomb.png", huge_png_header(10_000, MAX_PIXELS // 10_000 + 1)), 422, f"{MAX_PIXELS}-pixel"),
    "over_size_limit": (("big.bmp", b"BM" + bytes(60_000)), 413, "upload limit"),
}


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")  # pytest resets the module filter
@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_bad_file_is_a_4xx_naming_it(client: TestClient, fake: FakeClassifier, case: str) -> None:
    (name, data), status, reason = BAD_FILES[case]
    assert_error(post(client, (name, data)), status, name, reason)
    assert fake.batches == []  # the model never saw it
    assert client.get("/health").status_code == 200


def test_truncated_jpeg(client: TestClient, tmp_path: Path) -> None:
    whole = noise_jpeg(tmp_path / "whole.jpg").read_bytes()
    assert_error(post(client, ("cut.jpg", whole[: len(whole) // 2])), 422, "cut.jpg", "truncated")


def test_one_bad_file_among_good_ones_names_only_it(client: TestClient) -> None:
    response = post(
        client,
        ("ok.png", image_bytes((220, 30, 30))),
        ("bad.gif", b"GIF89a broken"),
        ("fine.png", image_bytes((30, 30, 220))),
    )
    assert_error(response, 422, "1 of 3 files", "bad.gif")
    assert "ok.png" not in response.json()["error"]


@pytest.mark.parametrize(
    "request_kwargs",
    [{}, {"data": {"files": "not a file"}}, {"data": {"other": "x"}}],
    ids=["no_body", "text_field", "other_field"],
)
def test_request_without_files(client: TestClient, request_kwargs: dict) -> None:
    response = client.post("/predict", **request_kwargs)
    assert 400 <= response.status_code < 500 and list(response.json()) == ["error"], response.text
    if "other" in request_kwargs.get("data", {}) or not request_kwargs:
        assert "no files" in response.json()["error"]


def test_too_many_files(client: TestClient) -> None:
    small = image_bytes((220, 30, 30))
    assert_error(post(client, *[(f"f{k}.png", small) for k in range(MAX_FILES + 1)]), 422, f"at most {MAX_FILES}")


def test_body_over_the_limit_is_refused_before_reading(client: TestClient) -> None:
    response = client.post(
        "/predict",
        content=b"x" * 10,
        headers={"content-length": str(10**9), "content-type": "multipart/form-data; boundary=b"},
    )
    assert_error(response, 413, "request body", "--max-request-mb")


def test_streamed_body_is_refused_when_it_passes_the_limit(client: TestClient) -> None:
    """No Content-Length (chunked): counted while it streams (what a real socket then sends: test_serve_live)."""
    chunks = (b"x" * 65536 for _ in range(16))  # 1 MB; the limit is 0.5 MB
    response = client.post("/predict", content=chunks, headers={"content-type": "multipart/form-data; boundary=b"})
    assert_error(response, 413, "request body")
    assert response.headers["connection"] == "close"


def test_unknown_route_and_method_are_json(client: TestClient) -> None:
    assert_error(client.get("/nothing-here"), 404, "Not Found")
    response = client.get("/predict")
    assert_error(response, 405, "Method Not Allowed")
    assert response.headers["allow"] == "POST"
    assert "GET" in client.delete("/health").headers["allow"]


def test_unexpected_error_is_json_and_the_server_stays_up() -> None:
    broken = FakeClassifier(fail=True)
    with TestClient(create_app(broken), base_url=ORIGIN, raise_server_exceptions=False) as c:
        for _ in range(2):
            assert_error(post(c, ("r.png", image_bytes((220, 30, 30)))), 500, "internal error", "RuntimeError")
        assert c.get("/health").status_code == 200


def test_page_is_self_contained(client: TestClient) -> None:
    html = client.get("/").text
    assert all(name in html for name in CLASSES) and "fake-backbone-16" in html
    assert "<script src" not in html and "stylesheet" not in html and "https://" not in html
    assert 'type="file"' in html and "multiple" in html


def test_docs_page_is_off_unless_asked_for(client: TestClient, fake: FakeClassifier) -> None:
    """FastAPI's /docs loads Swagger UI from a CDN: off by default; the schema itself is always there."""
    assert_error(client.get("/docs"), 404, "Not Found")
    assert client.get("/openapi.json").json()["paths"]["/predict"]
    with open_client(create_app(fake, ServeLimits(docs=True))) as c:
        assert "swagger" in c.get("/docs").text.lower()


# -- the micro-batcher -------------------------------------------------------------------------------
def test_concurrent_requests_share_one_model_call(fake: FakeClassifier) -> None:
    colours = [(220, 30, 30), (30, 220, 30), (30, 30, 220), (200, 40, 40)]
    # the first request waits up to 3 s for others; four images fill the batch and it runs at once
    with open_client(create_app(fake, max_batch=4, batch_wait_ms=3000)) as c:
        with ThreadPoolExecutor(4) as pool:
            responses = list(pool.map(lambda k: post(c, (f"{k}.png", image_bytes(colours[k], seed=k))), range(4)))
        assert fake.batches == [4]
        assert [r.json()["predictions"][0]["top"][0]["class"] for r in responses] == ["red", "green", "blue", "red"]
        assert c.get("/health").json()["model_calls"] == 1


def test_batcher_splits_at_max_batch_and_returns_each_its_rows() -> None:
    calls: list[int] = []

    def identity(batch: np.ndarray) -> np.ndarray:
        calls.append(len(batch))
        return batch[:, :1].astype(np.float64)

    async def scenario() -> list[np.ndarray]:
        batcher = MicroBatcher(identity, max_batch=3, wait_s=0.05)
        task = asyncio.create_task(batcher.run())
        await asyncio.sleep(0)
        jobs = [np.arange(start, start + n)[:, None] for start, n in ((0, 2), (10, 1), (20, 4), (30, 1))]
        results = await asyncio.gather(*(batcher(j) for j in jobs))
        task.cancel()
        return [r.ravel().tolist() for r in results]

    results = asyncio.run(scenario())
    assert results == [[0, 1], [10], [20, 21, 22, 23], [30]]
    assert max(calls) <= 3 and sum(calls) == 8 and len(calls) < 8  # batched, never above max_batch


# -- decoding uploads from memory ----------------------------------------------------------------------
def test_decode_image_from_bytes_and_streams_matches_the_path(tmp_path: Path) -> None:
    path = tmp_path / "x.jpg"
    path.write_bytes(image_bytes((120, 60, 200), "JPEG"))
    expected = decode_image(path, 24)
    assert np.array_equal(decode_image(path.read_bytes(), 24), expected)
    assert np.array_equal(decode_image(io.BytesIO(path.read_bytes()), 24), expected)
    with pytest.raises(ImageError, match="empty"):
        decode_image(b"", 24)


# -- serve's own checks ------------------------------------------------------------------------------
def test_serve_refuses_bad_options_before_loading() -> None:
    with pytest.raises(UserError, match="exactly one of"):
        serve(None, None)
    with pytest.raises(UserError, match="^max_upload_mb is 0"):
        serve("some/head", max_upload_mb=0)
    with pytest.raises(UserError, match="^port is 70000"):
        serve("some/head", port=70000)
    with pytest.raises(UserError, match="^max_request_mb is -1"):
        serve("some/head", max_request_mb=-1)
    with pytest.raises(UserError, match="^allowed_hosts 'http://evil.example/' is not a host name"):
        serve("some/head", allowed_hosts=["http://evil.example/"])


def test_serve_refuses_a_port_in_use() -> None:
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        with pytest.raises(UserError, match="cannot listen"):
            serve("some/head", port=taken.getsockname()[1])


# -- the Classifier shared by serve and predict (a tiny real head; TensorFlow) ---------------------------
@pytest.mark.slow
def test_classifier_matches_the_head_on_cached_features(world) -> None:
    from pipeline.cache import load
    from pipeline.heads import load_head
    from pipeline.predict import load_classifier

    classifier = load_classifier(head=world.heads["logreg"], runtime="keras")
    assert classifier.classes == list(load_head(world.heads["logreg"]).classes)
    assert classifier.image_size == world.config.image_size and classifier.backbone.startswith("MobileNetV2")
    paths, images = world.images()
    cache = load(world.cache)
    row = {p: i for i, p in enumerate(cache.paths)}
    expected = load_head(world.heads["logreg"]).predict_proba(cache.features[[row[p] for p in paths]])
    np.testing.assert_allclose(classifier.predict_proba(images), expected, atol=1e-4)


# -- who may ask: the Host and the Origin ----------------------------------------------------------------
def test_cross_origin_requests_are_refused(client: TestClient, fake: FakeClassifier) -> None:
    """A page of another origin can POST a multipart form here (a CORS 'simple request'): refused, unrun."""
    red = ("r.png", image_bytes((220, 30, 30)))
    for origin in ("http://evil.example", "null", "http://127.0.0.1:9999", "https://127.0.0.1:8000"):
        response = client.post("/predict", files=[("files", red)], headers={"origin": origin})
        assert_error(response, 403, "other origins")
        assert response.headers["connection"] == "close"  # the body it did not read is not read later either
    assert fake.batches == []
    assert client.post("/predict", files=[("files", red)], headers={"origin": ORIGIN}).status_code == 200
    assert post(client, red).status_code == 200  # API clients send no Origin


@pytest.mark.parametrize("host", ["evil.example", "evil.example:8000", "127.0.0.1.evil.example", "[::2]:8000"])
def test_foreign_host_header_is_refused(client: TestClient, host: str) -> None:
    """DNS rebinding: a name the attacker controls, resolving to 127.0.0.1, arrives in the Host header."""
    assert_error(client.get("/health", headers={"host": host}), 400, "--allowed-hosts")


@pytest.mark.parametrize("host", ["127.0.0.1:8000", "localhost:8000", "LOCALHOST", "[::1]:8000"])
def test_loopback_host_names_pass(client: TestClient, host: str) -> None:
    assert client.get("/health", headers={"host": host}).status_code == 200


def test_allowed_hosts_extend_the_names(fake: FakeClassifier) -> None:
    with open_client(create_app(fake, ServeLimits(allowed_hosts=("ml.lan",)))) as c:
        assert c.get("/health", headers={"host": "ml.lan:8000"}).status_code == 200
        assert c.get("/health").status_code == 400  # 127.0.0.1 was not listed here
    with open_client(create_app(fake, ServeLimits(allowed_hosts=("*",)))) as c:
        assert c.get("/health", headers={"host": "anything.example"}).status_code == 200


def test_allowed_host_names_of_serve() -> None:
    from pipeline.web.serve import allowed_host_names

    assert allowed_host_names("127.0.0.1", []) == ("127.0.0.1", "localhost", "::1")
    assert allowed_host_names("0.0.0.0", ["ML.lan", "[fe80::1]"]) == (
        "127.0.0.1",
        "localhost",
        "::1",
        "ml.lan",
        "fe80::1",
    )
    assert allowed_host_names("192.168.1.5", []) == ("192.168.1.5",)


# -- what every answer carries ----------------------------------------------------------------------------
def test_every_answer_says_nosniff(client: TestClient) -> None:
    answers = [
        client.get("/"),
        client.get("/health"),
        client.get("/openapi.json"),
        client.get("/nothing"),
        client.get("/predict"),
        post(client, ("r.png", image_bytes((1, 2, 3)))),
        post(client, ("bad.png", b"not a png")),
        client.get("/health", headers={"host": "evil.example"}),
        client.get("/health", headers={"origin": "http://evil.example"}),
        client.post("/predict", content=b"x", headers={"content-length": str(10**9)}),
    ]
    assert sorted({a.status_code for a in answers}) == [200, 400, 403, 404, 405, 413, 422]
    for answer in answers:
        assert answer.headers["x-content-type-options"] == "nosniff", answer.url
        assert answer.headers["x-frame-options"] == "DENY"


def test_a_500_says_nosniff_too() -> None:
    with TestClient(create_app(FakeClassifier(fail=True)), base_url=ORIGIN, raise_server_exceptions=False) as c:
        response = post(c, ("r.png", image_bytes((220, 30, 30))))
        assert response.status_code == 500 and response.headers["x-content-type-options"] == "nosniff"


# -- what decoding may cost ---------------------------------------------------------------------------
def test_serve_has_its_own_pixel_limit(fake: FakeClassifier) -> None:
    big = image_bytes((220, 30, 30))  # 40 x 30 = 1200 pixels
    with open_client(create_app(fake, ServeLimits(max_megapixels=0.001))) as c:
        assert_error(post(c, ("big.png", big)), 422, "big.png", "1000-pixel limit", "--max-megapixels")
    with open_client(create_app(fake, ServeLimits(max_megapixels=0.0012))) as c:
        assert post(c, ("big.png", big)).status_code == 200


def test_decodes_at_once_are_bounded(fake: FakeClassifier, monkeypatch: pytest.MonkeyPatch) -> None:
    import time

    from pipeline.web import api

    running, most = [0], [0]
    lock = threading.Lock()
    real = api.decode_image

    def slow_decode(*args, **kwargs):
        with lock:
            running[0] += 1
            most[0] = max(most[0], running[0])
        time.sleep(0.05)
        with lock:
            running[0] -= 1
        return real(*args, **kwargs)

    monkeypatch.setattr(api, "decode_image", slow_decode)
    with open_client(create_app(fake, ServeLimits(max_decodes=2))) as c:
        with ThreadPoolExecutor(3) as pool:
            files = [(f"{k}.png", image_bytes((200, 30, 30), seed=k)) for k in range(6)]
            responses = list(pool.map(lambda _: post(c, *files), range(3)))
    assert all(r.status_code == 200 for r in responses)
    assert most[0] == 2  # 18 images in flight, two decoded at a time


@pytest.mark.parametrize("name", ["DDS_NotImplementedError.bin", "SPIDER_AttributeError.bin", "TIFF_TypeError.bin"])
def test_decoder_crashers_are_a_422_not_a_500(client: TestClient, name: str) -> None:
    from conftest import requires_shared

    data = requires_shared("testdata", "decoder-crashers", name).read_bytes()
    response = post(client, ("upload.tif", data), ("ok.png", image_bytes((220, 30, 30))))
    assert_error(response, 422, "1 of 2 files", "upload.tif")


def test_postscript_upload_is_refused(client: TestClient) -> None:
    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\nshowpage\n"
    assert_error(post(client, ("holiday.jpg", eps)), 422, "holiday.jpg", "not an image")


# -- the published contract ---------------------------------------------------------------------------------
def test_openapi_documents_the_refusals_and_the_file_count(client: TestClient) -> None:
    schema = client.get("/openapi.json").json()
    predict = schema["paths"]["/predict"]["post"]
    assert {"200", "400", "403", "408", "413", "422"} <= set(predict["responses"])
    assert set(schema["paths"]["/health"]["get"]["responses"]) >= {"200", "400", "403"}
    body = predict["requestBody"]["content"]["multipart/form-data"]["schema"]
    form = schema["components"]["schemas"][body["$ref"].rsplit("/", 1)[1]]
    assert form["properties"]["files"]["minItems"] == 1 and form["properties"]["files"]["maxItems"] == MAX_FILES
    assert form["required"] == ["files"]
