"""Bad requests get 400-class errors in each API's own shape; API keys are enforced when configured."""

import anthropic
import httpx
import openai
import pytest
from helpers.servingapp import API_KEY

pytestmark = pytest.mark.ray

MODEL = "v4-tiny"
MSG = [{"role": "user", "content": "hi"}]


def _openai_error(r: httpx.Response, status: int, param: str | None = None) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    if param is not None:
        assert err["param"] == param, err
    return err


def _anthropic_error(r: httpx.Response, status: int, kind: str) -> dict:
    assert r.status_code == status, r.text
    body = r.json()
    assert body["type"] == "error" and body["error"]["type"] == kind and body["error"]["message"]
    return body["error"]


@pytest.mark.parametrize(
    "body, param",
    [
        ({"model": MODEL}, "messages"),
        ({"messages": MSG}, "model"),
        ({"model": MODEL, "messages": "hi"}, "messages"),
        ({"model": MODEL, "messages": MSG, "temperature": "hot"}, "temperature"),
        ({"model": MODEL, "messages": MSG, "max_tokens": 0}, "max_tokens"),
        ({"model": MODEL, "messages": [{"role": "wizard", "content": "x"}]}, "messages.0.role"),
        ({"model": MODEL, "messages": MSG, "n": 2}, "n"),
        ({"model": MODEL, "messages": MSG, "max_tokens": 100000}, "max_tokens"),
        ({"model": MODEL, "messages": [{"role": "user", "content": "word " * 1200}]}, "messages"),
    ],
)
def test_openai_bad_requests(base_url, body, param):
    _openai_error(httpx.post(f"{base_url}/v1/chat/completions", json=body), 400, param)


def test_context_and_unknown_model_errors(base_url):
    err = _openai_error(
        httpx.post(f"{base_url}/v1/chat/completions", json={"model": MODEL, "messages": MSG, "max_tokens": 100000}), 400
    )
    assert err["code"] == "context_length_exceeded" and "1024" in err["message"]
    err = _openai_error(
        httpx.post(f"{base_url}/v1/chat/completions", json={"model": "gpt-5", "messages": MSG}), 404, "model"
    )
    assert err["code"] == "model_not_found"
    _anthropic_error(
        httpx.post(f"{base_url}/v1/messages", json={"model": "claude", "max_tokens": 5, "messages": MSG}),
        404,
        "not_found_error",
    )
    _openai_error(httpx.post(f"{base_url}/v1/chat/completions", content=b"{oops"), 400)
    _openai_error(httpx.get(f"{base_url}/v1/nothing-here"), 404)


@pytest.mark.parametrize(
    "body, needle",
    [
        ({"model": MODEL, "messages": MSG}, "max_tokens"),
        (
            {"model": MODEL, "max_tokens": 5, "messages": [{"role": "user", "content": [{"type": "image"}]}]},
            "not supported",
        ),
        ({"model": MODEL, "max_tokens": 5, "messages": MSG, "temperature": 1.5}, "temperature"),
        (
            {"model": MODEL, "max_tokens": 5, "messages": [{"role": "user", "content": "word " * 1200}]},
            "context length",
        ),
    ],
)
def test_anthropic_bad_requests(base_url, body, needle):
    err = _anthropic_error(httpx.post(f"{base_url}/v1/messages", json=body), 400, "invalid_request_error")
    assert needle in err["message"]


def test_sdks_raise_their_own_error_types(oai, anth):
    with pytest.raises(openai.BadRequestError) as e:
        oai.chat.completions.create(model=MODEL, messages=MSG, max_tokens=100000)
    assert e.value.body["code"] == "context_length_exceeded"
    with pytest.raises(openai.NotFoundError):
        oai.chat.completions.create(model="nope", messages=MSG)
    with pytest.raises(anthropic.BadRequestError) as e:
        anth.messages.create(model=MODEL, max_tokens=5, messages=MSG, extra_body={"temperature": 3.0})
    assert e.value.body["error"]["type"] == "invalid_request_error"


def test_api_key_is_required_when_configured(scripted_url):
    bad = openai.OpenAI(base_url=f"{scripted_url}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
    good = openai.OpenAI(base_url=f"{scripted_url}/v1", api_key=API_KEY, max_retries=0)
    assert good.models.list().data[0].id == MODEL
    with pytest.raises(anthropic.AuthenticationError):
        anthropic.Anthropic(base_url=scripted_url, api_key="wrong", max_retries=0).messages.create(
            model=MODEL, max_tokens=5, messages=MSG
        )
    r = httpx.post(f"{scripted_url}/v1/messages", json={"model": MODEL, "max_tokens": 5, "messages": MSG})
    _anthropic_error(r, 401, "authentication_error")
    assert httpx.get(f"{scripted_url}/healthz").status_code == 200  # health stays open
