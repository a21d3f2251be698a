"""The OpenAI-compatible endpoint driven by the official `openai` client, which asks for base64
embeddings unless told otherwise (a request our schema refused with 422)."""

from __future__ import annotations

import httpx
import numpy as np
import pytest
from openai import BadRequestError, OpenAI


@pytest.fixture()
def client(live_server: str) -> OpenAI:
    return OpenAI(base_url=f"{live_server}/v1", api_key="unused", max_retries=0)


def _reference(live_server: str, texts: list[str], role: str = "query") -> np.ndarray:
    body = httpx.post(f"{live_server}/v1/embed/text", json={"texts": texts, "role": role}, timeout=30).json()
    return np.asarray(body["embeddings"], dtype=np.float32)


def test_the_official_client_gets_the_same_vectors_in_either_encoding(client: OpenAI, live_server: str) -> None:
    texts = ["a red circle", "a blue square"]
    expected = _reference(live_server, texts)
    by_default = client.embeddings.create(model="any", input=texts)  # base64 on the wire
    as_floats = client.embeddings.create(model="any", input=texts, encoding_format="float")
    for response in (by_default, as_floats):
        assert [d.index for d in response.data] == [0, 1]
        np.testing.assert_array_equal(np.asarray([d.embedding for d in response.data], dtype=np.float32), expected)
    single = client.embeddings.create(model="any", input="a red circle")
    # a batch of one runs other kernels than a batch of two: equal up to float rounding
    np.testing.assert_allclose(np.asarray(single.data[0].embedding, dtype=np.float32), expected[0], atol=1e-6)
    captions = client.embeddings.create(model="any", input=texts, extra_body={"role": "caption"})
    np.testing.assert_array_equal(np.asarray([d.embedding for d in captions.data], dtype=np.float32),
                                  _reference(live_server, texts, "caption"))


def test_token_ids_are_refused_with_what_to_send_instead(client: OpenAI, live_server: str) -> None:
    """LangChain's OpenAIEmbeddings sends tiktoken ids unless told not to: ids of another tokenizer."""
    for ids in ([1, 2, 3], [[1, 2], [3]]):
        with pytest.raises(BadRequestError, match="input holds token ids; this server embeds text"):
            client.embeddings.create(model="any", input=ids)
    raw = httpx.post(f"{live_server}/v1/embeddings", json={"input": [5, 6]}, timeout=30)
    assert raw.status_code == 400 and "check_embedding_ctx_length=False" in raw.json()["error"]["message"]


def test_too_many_inputs_say_how_to_split_them(client: OpenAI) -> None:
    """LangChain sends 1,000 texts a request unless told otherwise; the server takes 256."""
    with pytest.raises(BadRequestError, match=r"at most 256 inputs per request: send them in parts .*chunk_size=256"):
        client.embeddings.create(model="any", input=["a red circle"] * 300)
