"""Every endpoint and every error of the API through httpx against the ASGI app
(RELIABILITY.md rows "HTTP", "image" and "search")."""

from __future__ import annotations

import asyncio
import base64
import json
import threading

import numpy as np
import pytest

from app.filters import MetadataColumns

from .conftest import png_bytes, running, settings_for

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _assert_error(response, status: int, type_: str | None = None) -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"type", "message"}
    assert "Traceback" not in response.text
    if type_:
        assert body["error"]["type"] == type_
    return body["error"]


async def test_text_search_shape_and_paging(index_dir, app_encoder) -> None:
    async with running(settings_for(index_dir), app_encoder) as (client, _):
        response = await client.post("/v1/search/text", json={"query": "a red circle", "k": 5})
        assert response.status_code == 200
        body = response.json()
        assert len(body["results"]) == 5 and body["next_offset"] == 5 and body["took_ms"] >= 0
        first = body["results"][0]
        assert {"id", "score", "source", "caption", "width", "height"} <= set(first)
        assert not first["source"].startswith("/")
        scores = [r["score"] for r in body["results"]]
        assert scores == sorted(scores, reverse=True)
        page2 = (await client.post("/v1/search/text", json={"query": "a red circle", "k": 5, "offset": 5})).json()
        all10 = (await client.post("/v1/search/text", json={"query": "a red circle", "k": 10})).json()
        assert [r["id"] for r in body["results"] + page2["results"]] == [r["id"] for r in all10["results"]]
        # same query twice: identical results
        again = (await client.post("/v1/search/text", json={"query": "a red circle", "k": 5})).json()
        assert [r["id"] for r in again["results"]] == [r["id"] for r in body["results"]]


async def test_k_beyond_index_size_never_returns_missing_ids(index_dir, app_encoder) -> None:
    async with running(settings_for(index_dir), app_encoder) as (client, _):
        body = (await client.post("/v1/search/text", json={"query": "x", "k": 1000})).json()
        assert len(body["results"]) == 40 and all(r["id"] >= 0 for r in body["results"])
        assert body.get("next_offset") is None
        for k in (0, -1, 10**9, "ten"):
            _assert_error(await client.post("/v1/search/text", json={"query": "x", "k": k}), 422, "validation_error")
        _assert_error(await client.post("/v1/search/text", json={"query": "x", "k": 600, "offset": 600}), 400)


async def test_min_score_answers_no_confident_match(index_dir, app_encoder) -> None:
    async with running(settings_for(index_dir), app_encoder) as (client, _):
        body = (await client.post("/v1/search/text", json={"query": "a red circle", "min_score": 0.9999})).json()
        assert body["results"] == []


async def test_image_search_forms_agree_and_item_ranks_first(index_dir, app_encoder) -> None:
    async with running(settings_for(index_dir), app_encoder) as (client, _):
        item = (await client.get("/v1/items/7")).json()
        stored = (await client.get("/v1/items/7/image")).content
        by_id = (await client.post("/v1/search/image", json={"id": 7, "k": 3})).json()
        assert by_id["results"][0]["id"] == 7 and by_id["results"][0]["score"] > 0.99
        raw = (index_dir.parent / "data" / item["source"]).read_bytes()
        by_upload = (await client.post("/v1/search/image", files={"file": ("q.png", raw, "image/png")},
                                       data={"k": "3"})).json()
        by_base64 = (await client.post("/v1/search/image", json={"image_base64": _b64(raw), "k": 3})).json()
        assert by_upload["results"][0]["id"] == by_base64["results"][0]["id"] == 7
        assert by_upload["results"][0]["score"] >= 0.99
        assert stored[:8] == b"\x89PNG\r\n\x1a\n"


async def test_image_to_text_zero_shot(index_dir, app_encoder) -> None:
    async with running(settings_for(index_dir), app_encoder) as (client, _):
        body = (await client.post("/v1/search/image", json={"id": 0, "k": 3, "target": "texts"})).json()
        assert len(body["results"]) == 3
        assert all(r["caption"].startswith("a ") and "item_ids" in r for r in body["results"])


async def test_composed_query_and_negative_weights(index_dir, app_encoder) -> None:
    async with running(settings_for(index_dir), app_encoder) as (client, _):
        plain = (await client.post("/v1/search/text", json={"query": "a blue square", "k": 40})).json()
        composed = (await client.post("/v1/search", json={"terms": [{"text": "a blue square"}], "k": 40})).json()
        assert [r["id"] for r in plain["results"]] == [r["id"] for r in composed["results"]]
        mixed = await client.post("/v1/search", json={"k": 5, "terms": [
            {"id": 3, "weight": 1.0}, {"text": "red", "weight": 0.5}, {"text": "green", "weight": -0.5}]})
        assert mixed.status_code == 200 and len(mixed.json()["results"]) == 5
        cancel = await client.post("/v1/search", json={"terms": [{"text": "a"}, {"text": "a", "weight": -1}]})
        _assert_error(cancel, 400, "invalid_input")
        _assert_error(await client.post("/v1/search", json={"terms": [{"text": "a", "id": 1}]}), 422)


async def test_filters_inside_the_search(index_dir, app_encoder) -> None:
    async with running(settings_for(index_dir), app_encoder) as (client, _):
        body = (await client.post("/v1/search/text", json={
            "query": "a red circle", "k": 5, "filters": [{"field": "source", "prefix": "blue_square/"}]})).json()
        assert len(body["results"]) == 5  # k results whenever k match, although none ranks high
        assert all(r["source"].startswith("blue_square/") for r in body["results"])
        few = (await client.post("/v1/search/text", json={
            "query": "x", "k": 10, "filters": [{"field": "caption", "eq": "a green circle"},
                                               {"field": "width", "gte": 48, "lte": 48}]})).json()
        assert len(few["results"]) == 5 and all(r["caption"] == "a green circle" for r in few["results"])
        none = (await client.post("/v1/search/text", json={
            "query": "x", "filters": [{"field": "license", "eq": "cc0"}]})).json()
        assert none["results"] == []
        _assert_error(await client.post("/v1/search/text", json={"query": "x", "filters": [{"field": "a"}]}), 422)


async def test_a_slow_filter_scan_leaves_other_requests_served(index_dir, app_encoder, monkeypatch) -> None:
    """A field's first filter reads it from every item's metadata (about 0.2 s for a million items):
    off the event loop. Here that read is held while a plain search is answered, then it finishes."""
    scanning, release = threading.Event(), threading.Event()
    build = MetadataColumns._build

    def held(self, kind, field):
        if not scanning.is_set():  # the first column built waits for the test's word
            scanning.set()
            release.wait(10)
        return build(self, kind, field)

    monkeypatch.setattr(MetadataColumns, "_build", held)
    async with running(settings_for(index_dir), app_encoder) as (client, _):
        filtered = asyncio.create_task(client.post("/v1/search/text", json={
            "query": "a red circle", "k": 3, "filters": [{"field": "source", "prefix": "blue_square/"}]}))
        assert await asyncio.to_thread(scanning.wait, 10)
        plain = await client.post("/v1/search/text", json={"query": "a red circle", "k": 3})
        assert plain.status_code == 200 and len(plain.json()["results"]) == 3
        assert not filtered.done()  # still held in its scan, yet the other request was answered
        release.set()
        response = await filtered
        assert response.status_code == 200
        assert [r["source"].split("/")[0] for r in response.json()["results"]] == ["blue_square"] * 3


async def test_captions_embed_and_search_as_documents(tmp_path) -> None:
    """With a model that has an image bank (the default one), `role: caption` gives the vectors a
    caption index holds (`encode_captions`), the default `query` role the plain text ones, and
    image -> text search scores an image against the captions as documents."""
    from indexer.reader import open_source
    from indexer.runner import IndexConfig, run_index
    from models import decode_image, load_encoder

    encoder = load_encoder(device="cpu")
    labels = ["a bird", "a piece of fruit", "a road sign"]
    (tmp_path / "labels.txt").write_text("\n".join(labels) + "\n")
    run_index(open_source(tmp_path / "labels.txt"), encoder, IndexConfig(out_dir=tmp_path / "index", progress=False))
    async with running(settings_for(tmp_path / "index"), encoder) as (client, _):
        as_captions = (await client.post("/v1/embed/text", json={"texts": labels, "role": "caption"})).json()
        as_queries = (await client.post("/v1/embed/text", json={"texts": labels})).json()
        np.testing.assert_allclose(as_captions["embeddings"], encoder.encode_captions(labels), atol=1e-5)
        np.testing.assert_allclose(as_queries["embeddings"], encoder.encode_texts(labels), atol=1e-5)
        assert not np.allclose(as_captions["embeddings"], as_queries["embeddings"], atol=1e-3)
        _assert_error(await client.post("/v1/embed/text", json={"texts": labels, "role": "document"}), 422)
        # the OpenAI-shaped endpoint takes the same role, as an extra body field
        openai = (await client.post("/v1/embeddings", json={"input": labels, "role": "caption"})).json()
        np.testing.assert_allclose([d["embedding"] for d in openai["data"]], as_captions["embeddings"], atol=1e-6)
        openai = (await client.post("/v1/embeddings", json={"input": labels})).json()
        np.testing.assert_allclose([d["embedding"] for d in openai["data"]], as_queries["embeddings"], atol=1e-6)
        image = png_bytes()
        found = (await client.post("/v1/search/image", files={"file": ("x.png", image, "image/png")},
                                   data={"target": "texts", "k": "3"})).json()["results"]
        expected = encoder.encode_captions(labels) @ encoder.encode_images([decode_image(image)])[0]
        scores = {r["caption"]: r["score"] for r in found}
        assert set(scores) == set(labels)
        for label, score in zip(labels, expected, strict=True):
            assert scores[label] == pytest.approx(float(score), abs=1e-4)


async def test_embed_endpoints_match_the_encoder(index_dir, app_encoder) -> None:
    async with running(settings_for(index_dir), app_encoder) as (client, _):
        texts = ["a red circle", "a blue square"]
        body = (await client.post("/v1/embed/text", json={"texts": texts})).json()
        np.testing.assert_allclose(body["embeddings"], app_encoder.encode_texts(texts), atol=1e-5)
        assert body["dim"] == app_encoder.dim
        image = png_bytes()
        from models import decode_image

        want = app_encoder.encode_images([decode_image(image)])
        upload = (await client.post("/v1/embed/image", files={"file": ("a.png", image)})).json()
        as_json = (await client.post("/v1/embed/image", json={"image_base64": _b64(image)})).json()
        np.testing.assert_allclose(upload["embeddings"], want, atol=1e-5)
        np.testing.assert_allclose(as_json["embeddings"], want, atol=1e-5)
        openai = (await client.post("/v1/embeddings", json={"input": texts, "model": "anything"})).json()
        assert openai["object"] == "list" and [d["index"] for d in openai["data"]] == [0, 1]
        np.testing.assert_allclose([d["embedding"] for d in openai["data"]], body["embeddings"], atol=1e-6)
        single = (await client.post("/v1/embeddings", json={"input": "a red circle"})).json()
        assert len(single["data"]) == 1
        _assert_error(await client.post("/v1/embeddings", json={"input": ""}), 400)
        same_size = (await client.post("/v1/embeddings", json={"input": texts, "dimensions": app_encoder.dim})).json()
        assert [d["embedding"] for d in same_size["data"]] == [d["embedding"] for d in openai["data"]]
        shorter = await client.post("/v1/embeddings", json={"input": texts, "dimensions": 8})
        _assert_error(shorter, 400)
        assert f"this model embeds in {app_encoder.dim} dimensions; dimensions=8" in shorter.text
        _assert_error(await client.post("/v1/embed/text", json={"texts": ["x"] * 300}), 422)


async def test_items_by_id_only(index_dir, app_encoder) -> None:
    async with running(settings_for(index_dir), app_encoder) as (client, _):
        item = await client.get("/v1/items/2")
        assert item.status_code == 200 and item.json()["id"] == 2
        thumb = await client.get("/v1/items/2/thumbnail")
        assert thumb.headers["content-type"] == "image/jpeg"
        assert thumb.headers["x-content-type-options"] == "nosniff"
        _assert_error(await client.get("/v1/items/40"), 404, "not_found")
        _assert_error(await client.get("/v1/items/999999/image"), 404)
        for bad in ("../../etc/passwd", "%2e%2e%2fetc%2fpasswd", "-1", "1.5"):
            response = await client.get(f"/v1/items/{bad}")
            assert response.status_code in (404, 422), (bad, response.status_code)
            assert "root:" not in response.text


@pytest.mark.parametrize(
    ("payload", "status", "type_"),
    [
        (b"", 400, "invalid_image"),
        (b"<html>hello</html>", 415, "unsupported_image"),
        (b"%!PS-Adobe-3.0 EPSF-3.0\n", 415, "unsupported_image"),
        (png_bytes(size=(64, 64))[:-30], 400, "invalid_image"),
    ],
)
async def test_bad_images_answer_4xx(index_dir, app_encoder, payload: bytes, status: int, type_: str) -> None:
    async with running(settings_for(index_dir), app_encoder) as (client, _):
        response = await client.post("/v1/search/image", files={"file": ("x.png", payload)})
        _assert_error(response, status, type_)
        response = await client.post("/v1/embed/image", json={"image_base64": _b64(payload) or "AA=="})
        assert response.status_code in (400, 415)


async def test_decompression_bomb_is_400(index_dir, app_encoder) -> None:
    from ..models.test_images import _bomb_png

    async with running(settings_for(index_dir), app_encoder) as (client, _):
        response = await client.post("/v1/search/image", files={"file": ("bomb.png", _bomb_png(40_000, 40_000))})
        error = _assert_error(response, 400, "invalid_image")
        assert "pixels" in error["message"]


async def test_odd_image_modes_are_fine(index_dir, app_encoder) -> None:
    import io

    from PIL import Image

    async with running(settings_for(index_dir), app_encoder) as (client, _):
        for mode, size in (("RGBA", (20, 20)), ("P", (20, 20)), ("L", (1, 1)), ("1", (1, 400)), ("CMYK", (9, 9))):
            buffer = io.BytesIO()
            Image.new(mode, size).save(buffer, format="TIFF" if mode == "CMYK" else "PNG")
            response = await client.post("/v1/search/image", files={"file": ("x", buffer.getvalue())})
            assert response.status_code == 200, (mode, response.text)


async def test_malformed_requests(index_dir, app_encoder) -> None:
    async with running(settings_for(index_dir), app_encoder) as (client, _):
        headers = {"content-type": "application/json"}
        _assert_error(await client.post("/v1/search/text", content=b"{not json", headers=headers), 422)
        _assert_error(await client.post("/v1/search/text", json={"query": 5}), 422)
        _assert_error(await client.post("/v1/search/text", json={"query": "x" * 20_000}), 422)
        for blank in ("   ", "\t\n"):  # a search box sent with spaces only: refused, saying why
            error = _assert_error(await client.post("/v1/search/text", json={"query": blank}), 422)
            assert error["message"] == "query: the text is blank (only whitespace)"
            error = _assert_error(await client.post("/v1/search", json={"terms": [{"text": blank}]}), 422)
            assert "blank" in error["message"]
        assert (await client.post("/v1/search/text", json={"query": " a bird "})).status_code == 200
        secret = "U0VDUkVUSU1BR0U=" * 100
        response = await client.post("/v1/search/image", json={"image_base64": secret + "!!"})
        _assert_error(response, 400, "invalid_input")
        assert secret not in response.text  # errors never echo the input
        _assert_error(await client.post("/v1/search/image", json={"k": 3}), 422)
        _assert_error(await client.post("/v1/search/image", content=b"x", headers={"content-type": "text/plain"}), 415)
        _assert_error(await client.post("/v1/search/image", json={"id": 10_000}), 404)
        _assert_error(await client.post("/v1/search/image", files={"other": ("x", b"1")}), 400)
        _assert_error(await client.get("/v1/nothing"), 404)


async def test_body_limit_413_with_and_without_content_length(index_dir, app_encoder) -> None:
    async with running(settings_for(index_dir, max_body_bytes=4096), app_encoder) as (client, _):
        big = b"x" * 10_000
        response = await client.post("/v1/search/image", files={"file": ("x.png", big)})
        _assert_error(response, 413, "payload_too_large")

        async def chunks():
            for _ in range(10):
                yield b"y" * 1000

        response = await client.post("/v1/embed/image", content=chunks(), headers={"content-type": "application/json"})
        _assert_error(response, 413, "payload_too_large")

        async def multipart_chunks():
            yield b"--xx\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.png\"\r\n\r\n"
            for _ in range(10):
                yield b"z" * 1000
            yield b"\r\n--xx--\r\n"

        response = await client.post("/v1/search/image", content=multipart_chunks(),
                                     headers={"content-type": "multipart/form-data; boundary=xx"})
        _assert_error(response, 413, "payload_too_large")


async def test_health_ready_metrics_docs(index_dir, app_encoder) -> None:
    async with running(settings_for(index_dir), app_encoder) as (client, _):
        assert (await client.get("/healthz")).json() == {"status": "alive"}
        ready = (await client.get("/readyz")).json()
        assert ready["status"] == "ready" and ready["detail"]["items"] == 40
        await client.post("/v1/search/text", json={"query": "x"})
        metrics = (await client.get("/metrics")).text
        for name in ("clipsearch_requests_total", "clipsearch_request_seconds_bucket", "clipsearch_batch_size_bucket",
                     "clipsearch_queue_depth", "clipsearch_stage_seconds_bucket"):
            assert name in metrics, name
        assert 'route="/v1/search/text"' in metrics
        from app.bench import server_rss_mb

        assert 10 < (await server_rss_mb(client) or 0) < 100_000  # what `clipsearch bench` watches on soak runs
        schema = (await client.get("/openapi.json")).json()
        for path in ("/v1/search/text", "/v1/search/image", "/v1/search", "/v1/embed/text", "/v1/embed/image",
                     "/v1/embeddings", "/v1/items/{item_id}", "/v1/items/{item_id}/thumbnail"):
            assert path in schema["paths"], path
        page = await client.get("/")
        assert page.status_code == 200 and "<title>clipsearch</title>" in page.text


async def test_api_keys(index_dir, app_encoder) -> None:
    async with running(settings_for(index_dir, api_keys=["k1", "secret-2"]), app_encoder) as (client, _):
        _assert_error(await client.post("/v1/search/text", json={"query": "x"}), 401, "unauthorized")
        _assert_error(await client.post("/v1/search/text", json={"query": "x"}, headers={"x-api-key": "nope"}), 401)
        ok = await client.post("/v1/search/text", json={"query": "x"}, headers={"authorization": "Bearer secret-2"})
        assert ok.status_code == 200
        assert (await client.post("/v1/search/text", json={"query": "x"}, headers={"x-api-key": "k1"})).status_code == 200
        assert (await client.get("/healthz")).status_code == 200  # probes need no key


async def test_index_of_another_model_is_not_served(index_dir, app_encoder) -> None:
    import torch

    from models import load_encoder

    torch.manual_seed(5)
    other = load_encoder("clipsearch-tiny", device="cpu")
    from app.errors import NotReady

    with pytest.raises(NotReady, match="made with model"):
        async with running(settings_for(index_dir), other):
            pass


async def test_a_server_loads_its_model_in_the_precision_its_settings_name(index_dir, app_encoder,
                                                                         app_model_dir) -> None:
    """CLIPSEARCH_PRECISION=bf16 (or `serve --precision bf16`) reaches the model the server loads;
    the index built in float32 is served (same weights, same fingerprint), its answers alike."""
    import torch

    async with running(settings_for(index_dir, model=str(app_model_dir), precision="bf16"), None) as (client, app):
        assert app.state.service.encoder.autocast_dtype == torch.bfloat16
        half = await client.post("/v1/embed/text", json={"texts": ["a red circle"]})
    assert half.status_code == 200
    exact = app_encoder.encode_texts(["a red circle"])
    assert float(np.dot(np.asarray(half.json()["embeddings"][0]), exact[0])) > 0.99


async def test_cors_only_for_listed_origins(index_dir, app_encoder) -> None:
    async with running(settings_for(index_dir, cors_origins=["https://ok.example"]), app_encoder) as (client, _):
        allowed = await client.options("/v1/search/text", headers={
            "origin": "https://ok.example", "access-control-request-method": "POST"})
        assert allowed.headers.get("access-control-allow-origin") == "https://ok.example"
        denied = await client.options("/v1/search/text", headers={
            "origin": "https://evil.example", "access-control-request-method": "POST"})
        assert "access-control-allow-origin" not in denied.headers
        body = json.dumps({"query": "x"})
        assert (await client.post("/v1/search/text", content=body,
                                  headers={"content-type": "application/json"})).status_code == 200


async def test_search_by_a_vector_of_this_model(index_dir, app_encoder) -> None:
    """An embedding from /v1/embed/text searched as a `vector` term finds what the text finds;
    vectors of another size, without direction or with NaN are refused with a message."""
    async with running(settings_for(index_dir), app_encoder) as (client, _):
        vector = (await client.post("/v1/embed/text", json={"texts": ["a red circle"]})).json()["embeddings"][0]
        by_text = (await client.post("/v1/search/text", json={"query": "a red circle", "k": 5})).json()
        scaled = [3 * x for x in vector]  # any length: the server normalises
        by_vector = (await client.post("/v1/search", json={"terms": [{"vector": scaled}], "k": 5})).json()
        assert [r["id"] for r in by_vector["results"]] == [r["id"] for r in by_text["results"]]
        np.testing.assert_allclose([r["score"] for r in by_vector["results"]],
                                   [r["score"] for r in by_text["results"]], atol=1e-4)
        short = _assert_error(await client.post("/v1/search", json={"terms": [{"vector": vector[:-1]}]}),
                              400, "invalid_input")
        assert short["message"] == (f"the vector has {len(vector) - 1} numbers; this model's embeddings "
                                    f"have {len(vector)}")
        zeros = await client.post("/v1/search", json={"terms": [{"vector": [0.0] * len(vector)}]})
        assert "no direction" in _assert_error(zeros, 400, "invalid_input")["message"]
        nan = await client.post("/v1/search", content=json.dumps({"terms": [{"vector": [float("nan")] * len(vector)}]}),
                                headers={"content-type": "application/json"})
        _assert_error(nan, 422)
        both = await client.post("/v1/search", json={"terms": [{"vector": vector, "text": "a"}]})
        assert "exactly one of text, image_base64, id, vector" in _assert_error(both, 422)["message"]


async def test_a_side_the_index_lacks_is_said_not_answered_empty(tmp_path, app_encoder) -> None:
    """Image -> text search on images indexed without captions, and image search on an index of
    labels alone: 409 saying what the index lacks, where an empty list would read "no match"."""
    from indexer.reader import open_source
    from indexer.runner import IndexConfig, run_index

    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "a.png").write_bytes(png_bytes())
    (tmp_path / "photos" / "b.png").write_bytes(png_bytes((20, 200, 20)))
    run_index(open_source(tmp_path / "photos"), app_encoder, IndexConfig(out_dir=tmp_path / "no-captions", progress=False))
    (tmp_path / "labels.txt").write_text("a bird\na road sign\n")
    run_index(open_source(tmp_path / "labels.txt"), app_encoder, IndexConfig(out_dir=tmp_path / "labels", progress=False))
    async with running(settings_for(tmp_path / "no-captions"), app_encoder) as (client, _):
        assert len((await client.post("/v1/search/image", json={"id": 0})).json()["results"]) == 2
        for response in (await client.post("/v1/search/image", json={"id": 0, "target": "texts"}),
                         await client.post("/v1/search", json={"terms": [{"text": "a"}], "target": "texts"})):
            assert "holds no captions or labels" in _assert_error(response, 409, "empty_index")["message"]
    async with running(settings_for(tmp_path / "labels"), app_encoder) as (client, _):
        found = await client.post("/v1/search/image", json={"image_base64": _b64(png_bytes()), "target": "texts"})
        assert len(found.json()["results"]) == 2
        refused = await client.post("/v1/search/text", json={"query": "a bird"})
        assert "holds no images" in _assert_error(refused, 409, "empty_index")["message"]


async def test_filters_follow_a_hot_reload_and_let_the_old_version_go(tmp_path, app_encoder) -> None:
    """A filter judged on one version is judged again on the next (its new items found), and the
    old version (FAISS index, metadata: gigabytes for a million items) is freed: neither the
    filter columns nor the server's start still hold it."""
    import gc
    import weakref

    from PIL import Image

    from .conftest import build_index

    (tmp_path / "data").mkdir()
    Image.new("RGB", (24, 24), (200, 30, 30)).save(tmp_path / "data" / "red.png")
    build_index(tmp_path / "data", tmp_path / "index", app_encoder)
    async with running(settings_for(tmp_path / "index"), app_encoder) as (client, app):
        body = {"query": "x", "filters": [{"field": "source", "prefix": "new"}]}
        assert (await client.post("/v1/search/text", json=body)).json()["results"] == []
        old = weakref.ref(app.state.service.index)
        Image.new("RGB", (24, 24), (30, 200, 30)).save(tmp_path / "data" / "new.png")
        build_index(tmp_path / "data", tmp_path / "index", app_encoder)
        assert app.state.service.try_reload()
        found = (await client.post("/v1/search/text", json=body)).json()["results"]
        assert [r["source"] for r in found] == ["new.png"]
        gc.collect()
        assert old() is None  # the server's start kept its first version alive after any reload
