"""The official OpenAI Python client (``openai`` from PyPI) against our /v1/models and /v1/chat/completions on a
real uvicorn server with the built-in engine: plain, streaming, a model name other than ours, unknown parameters
(ignored), n > 1 (refused). Only what a client sees, so it holds however the server produces its chunks."""

from __future__ import annotations

import openai
import pytest
from conftest import b64, blob_image
from MiniGPTMedSlicerLib.png import encode_png


@pytest.fixture(scope="module")
def client(builtin_server):
    with openai.OpenAI(base_url=f"{builtin_server}/v1", api_key="unused", max_retries=0, timeout=60) as c:
        yield c


@pytest.fixture(scope="module")
def messages():
    png = encode_png(blob_image(size=96)[:, :80].copy())  # 80 x 96: not square
    return [
        {
            "role": "user",
            "content": [
                {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{b64(png)}"}},
                {"type": "text", "text": "Describe this image."},
            ],
        }
    ]


def test_models_lists_the_served_model(client, builtin_server):
    import requests

    health = requests.get(f"{builtin_server}/health", timeout=10).json()
    models = client.models.list()
    assert [m.id for m in models.data] == [health["model"]]
    assert models.data[0].object == "model"


def test_plain_and_streaming_answers_agree(client, messages):
    served = client.models.list().data[0].id
    done = client.chat.completions.create(model=served, messages=messages)
    assert done.object == "chat.completion" and len(done.choices) == 1
    choice = done.choices[0]
    assert choice.message.role == "assistant" and choice.finish_reason == "stop"
    text = choice.message.content
    assert text and "80×96 pixels" in text  # the built-in engine's report names the image it was sent
    assert done.model == served and done.usage is not None and done.usage.total_tokens >= 0

    chunks = list(client.chat.completions.create(model=served, messages=messages, stream=True))
    assert chunks and all(c.object == "chat.completion.chunk" for c in chunks)
    assert len({c.id for c in chunks}) == 1
    with_choices = [c for c in chunks if c.choices]
    assert "".join(c.choices[0].delta.content or "" for c in with_choices) == text
    assert with_choices[-1].choices[0].finish_reason == "stop"
    assert all(c.choices[0].finish_reason is None for c in with_choices[:-1])


def test_another_model_name_is_answered_by_the_served_model(client, messages):
    """One model per server: the request's model name is not checked; the answer says which model answered."""
    served = client.models.list().data[0].id
    r = client.chat.completions.create(model="gpt-4o-this-is-not-served", messages=messages)
    assert r.model == served and r.choices[0].message.content


def test_unknown_parameters_are_ignored(client, messages):
    base = client.chat.completions.create(model="m", messages=messages)
    r = client.chat.completions.create(
        model="m",
        messages=messages,
        top_p=0.5,
        seed=7,
        presence_penalty=0.1,
        user="someone",
        n=1,
        extra_body={"not_an_openai_field": {"a": 1}},
    )
    assert r.choices[0].message.content == base.choices[0].message.content


def test_n_above_one_is_refused_with_a_clear_error(client, messages, builtin_server):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="m", messages=messages, n=3)
    assert e.value.status_code == 400
    body = e.value.body
    assert body["code"] == "bad_request" and "n=3" in body["message"] and "n=1" in body["message"]
    # the server keeps serving
    assert client.chat.completions.create(model="m", messages=messages).choices[0].message.content
