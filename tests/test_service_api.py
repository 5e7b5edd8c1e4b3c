"""The HTTP API end to end: a real uvicorn server, real images, real HTTP."""

from __future__ import annotations

import base64
import io
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from service.routes.upscale import wants_json
from service.settings import Settings
from tests.conftest import FIXTURES, free_port
from tests.live import live_server, scrape

PHOTOS = FIXTURES / "service"


@pytest.fixture(scope="module")
def url(tiny_registry: Path) -> Iterator[str]:
    settings = Settings(
        registry=tiny_registry, model="tiny@production", device="cpu", port=free_port(), max_batch_size=2, max_delay_ms=5
    )
    with live_server(settings, torch_threads=1) as base:
        yield base


def png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


def noise_image(width: int, height: int, mode: str = "RGB", seed: int = 0) -> Image.Image:
    channels = len(mode)
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, channels), dtype=np.uint8)
    return Image.fromarray(pixels.squeeze(-1) if channels == 1 else pixels, mode)


def post_png(client: httpx.Client, data: bytes, **params: object) -> httpx.Response:
    return client.post("/v1/upscale", content=data, headers={"content-type": "image/png"}, params=params)


def assert_error(response: httpx.Response, status: int, code: str) -> None:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    error = response.json()["error"]
    assert error["code"] == code and error["message"]


@pytest.mark.parametrize(("name", "media_type"), [("bears.jpg", "image/jpeg"), ("butterfly.png", "image/png")])
def test_photo_comes_back_four_times_larger(client: httpx.Client, name: str, media_type: str) -> None:
    data = (PHOTOS / name).read_bytes()
    response = client.post("/v1/upscale", content=data, headers={"content-type": media_type})
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == media_type  # JPEG in → JPEG out, PNG in → PNG out
    with Image.open(PHOTOS / name) as original, Image.open(io.BytesIO(response.content)) as result:
        assert result.size == (original.width * 4, original.height * 4)
        assert result.mode == "RGB"
    headers = response.headers
    assert (headers["x-model"], headers["x-model-version"], headers["x-steps"]) == ("tiny", "1", "1")
    assert int(headers["x-seed"]) >= 0 and headers["x-frames-ignored"] == "0"
    assert float(headers["x-queue-time-ms"]) >= 0 and float(headers["x-compute-time-ms"]) > 0


def test_multipart_upload_with_options_as_form_fields(client: httpx.Client) -> None:
    data = (PHOTOS / "bears.jpg").read_bytes()
    response = client.post(
        "/v1/upscale",
        params={"scale": 4, "format": "png"},  # form fields take precedence over the query
        files={"image": ("bears.jpg", data, "image/jpeg")},
        data={"scale": "2", "format": "webp", "quality": "80"},
    )
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "image/webp"
    assert Image.open(io.BytesIO(response.content)).size == (96, 64)


@pytest.mark.parametrize("scale", [2, 3, 4])
def test_scale(client: httpx.Client, scale: int) -> None:
    response = post_png(client, png(noise_image(20, 12)), scale=scale)
    assert response.status_code == 200, response.text
    assert Image.open(io.BytesIO(response.content)).size == (20 * scale, 12 * scale)


def test_json_mode_and_seed_reproduces(client: httpx.Client) -> None:
    data = png(noise_image(24, 16))
    answers = [
        client.post(
            "/v1/upscale",
            content=data,
            params={"seed": seed, "format": "png"},
            headers={"content-type": "image/png", "accept": "application/json"},
        )
        for seed in (7, 7, 8)
    ]
    for response in answers:
        assert response.status_code == 200, response.text
        assert response.headers["content-type"] == "application/json"
    body = answers[0].json()
    assert {k: body[k] for k in ("model", "version", "width", "height", "format", "seed", "steps")} == {
        "model": "tiny", "version": "1", "width": 96, "height": 64, "format": "png", "seed": 7, "steps": 1,
    }
    assert body["queue_ms"] >= 0 and body["compute_ms"] > 0
    assert answers[0].headers["x-seed"] == "7"
    images = [base64.b64decode(r.json()["image_base64"]) for r in answers]
    assert Image.open(io.BytesIO(images[0])).size == (96, 64)
    assert images[0] == images[1] and images[0] != images[2]


@pytest.mark.parametrize("tile", [16, 32])
def test_tile_option(client: httpx.Client, tile: int) -> None:
    response = post_png(client, png(noise_image(40, 20)), tile=tile)
    assert response.status_code == 200, response.text
    assert Image.open(io.BytesIO(response.content)).size == (160, 80)


@pytest.mark.parametrize("ref", ["tiny", "tiny:1", "tiny@production"])
def test_loaded_model_by_any_reference(client: httpx.Client, ref: str) -> None:
    assert post_png(client, png(noise_image(8, 8)), model=ref).status_code == 200


@pytest.mark.parametrize(
    ("params", "status", "code"),
    [
        ({"model": "tiny-teacher"}, 409, "model_not_loaded"),
        ({"model": "tiny:2"}, 404, "model_not_found"),
        ({"model": "nope@production"}, 404, "model_not_found"),
        ({"model": "../etc"}, 422, "invalid_model_ref"),
        ({"steps": 99}, 422, "invalid_parameter"),
        ({"steps": 0}, 422, "invalid_parameter"),
        ({"tile": 24}, 422, "invalid_parameter"),
        ({"scale": 5}, 422, "invalid_parameter"),
        ({"format": "gif"}, 422, "invalid_parameter"),
        ({"quality": 0}, 422, "invalid_parameter"),
        ({"seed": -1}, 422, "invalid_parameter"),
        ({"seed": "abc"}, 422, "invalid_parameter"),
    ],
)
def test_bad_options_are_clear_4xx(client: httpx.Client, params: dict, status: int, code: str) -> None:
    assert_error(post_png(client, png(noise_image(8, 8)), **params), status, code)


def test_bad_form_field(client: httpx.Client) -> None:
    response = client.post("/v1/upscale", files={"image": ("a.png", png(noise_image(8, 8)))}, data={"scale": "x"})
    assert_error(response, 422, "invalid_parameter")
    assert "form.scale" in response.json()["error"]["message"]


def test_models_lists_registry_and_loaded_model(client: httpx.Client) -> None:
    response = client.get("/v1/models")
    assert response.status_code == 200
    body = response.json()
    assert {(m["name"], m["version"]) for m in body["models"]} == {("tiny", "1"), ("tiny-teacher", "1")}
    loaded = body["loaded"]
    assert loaded["state"] == "ready" and (loaded["name"], loaded["version"]) == ("tiny", "1")
    assert (loaded["device"], loaded["dtype"]) == ("cpu", "float32")
    assert loaded["tile_sizes"] == [16, 32] and loaded["batch_sizes"] == [1, 2]


def test_health_readiness_and_unknown_routes(client: httpx.Client) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz")
    assert ready.status_code == 200
    assert ready.json() == {"status": "ready", "checks": {"model": {"ok": True, "state": "ready"}}}
    assert_error(client.get("/nope"), 404, "not_found")
    assert_error(client.get("/v1/upscale"), 405, "method_not_allowed")
    assert_error(client.delete("/healthz"), 405, "method_not_allowed")


def test_metrics_use_the_documented_names(client: httpx.Client, url: str) -> None:
    assert post_png(client, png(noise_image(8, 8))).status_code == 200
    samples = scrape(url)
    names = {name for name, _ in samples}
    for name in (
        "vpdsr_requests_total", "vpdsr_request_duration_seconds_bucket", "vpdsr_queue_wait_seconds_bucket",
        "vpdsr_compute_seconds_bucket", "vpdsr_batch_size_bucket", "vpdsr_queue_depth", "vpdsr_tiles_total",
        "vpdsr_model_info", "vpdsr_gpu_memory_bytes",
    ):
        assert name in names, name
    upscale_ok = frozenset({("route", "/v1/upscale"), ("method", "POST"), ("status", "200")})
    assert samples[("vpdsr_requests_total", upscale_ok)] >= 1
    assert samples[("vpdsr_model_info", frozenset({("name", "tiny"), ("version", "1"), ("device", "cpu"), ("dtype", "float32")}))] == 1
    assert samples[("vpdsr_gpu_memory_bytes", frozenset({("kind", "allocated")}))] == 0
    batch_buckets = {dict(labels)["le"] for name, labels in samples if name == "vpdsr_batch_size_bucket"}
    assert batch_buckets == {"1.0", "2.0", "4.0", "8.0", "16.0", "32.0", "64.0", "+Inf"}
    latency_buckets = {dict(labels)["le"] for name, labels in samples if name == "vpdsr_compute_seconds_bucket"}
    assert {"60.0", "120.0", "300.0"} <= latency_buckets
    assert ("vpdsr_requests_total", frozenset({("route", "unmatched"), ("method", "GET"), ("status", "404")})) in samples


def test_openapi_documents_parameters_media_types_and_errors(client: httpx.Client) -> None:
    spec = client.get("/openapi.json").json()
    operation = spec["paths"]["/v1/upscale"]["post"]
    assert {p["name"] for p in operation["parameters"]} == {"model", "scale", "format", "quality", "seed", "steps", "tile"}
    assert all(p.get("description") for p in operation["parameters"])
    assert {"multipart/form-data", "image/png", "image/jpeg"} <= set(operation["requestBody"]["content"])
    ok = operation["responses"]["200"]
    assert {"image/png", "image/jpeg", "image/webp", "application/json"} <= set(ok["content"])
    assert {"X-Seed", "X-Model", "X-Queue-Time-Ms"} <= set(ok["headers"])
    for status in ("400", "401", "404", "409", "413", "415", "422", "429", "503", "504"):
        schema = operation["responses"][status]["content"]["application/json"]["schema"]
        assert schema == {"$ref": "#/components/schemas/ErrorResponse"}, status


@pytest.mark.parametrize(
    ("accept", "expected"),
    [
        ("application/json", True),
        ("application/json, */*;q=0.1", True),
        ("image/*;q=0.5, application/json;q=0.9", True),
        ("image/png, application/json", False),  # a tie goes to the first listed
        ("application/json;q=0", False),
        ("*/*", False),
        ("", False),
    ],
)
def test_accept_negotiation(accept: str, expected: bool) -> None:
    assert wants_json(accept) is expected
