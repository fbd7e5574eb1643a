"""Tool calls both ways: DSML model output -> SDK tool calls, and tool results back into the prompt."""

import json

import anthropic
import openai
import pytest
from helpers.servingapp import API_KEY

from v4d.serving import chat
from v4d.serving.tokenizer import Tokenizer

pytestmark = pytest.mark.ray

MODEL = "v4-tiny"
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Weather of a city",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}}},
        },
    }
]
ASK = [{"role": "user", "content": "Weather in Paris?"}]


@pytest.fixture
def scripted_oai(scripted_url):
    return openai.OpenAI(base_url=f"{scripted_url}/v1", api_key=API_KEY, max_retries=0)


def test_openai_tool_call_round_trip(scripted_oai, oai, plan):
    kw = dict(model=MODEL, messages=ASK, tools=TOOLS, max_tokens=200, seed=1)  # seed 1: the DSML script
    r = scripted_oai.chat.completions.create(**kw)
    msg = r.choices[0].message
    assert r.choices[0].finish_reason == "tool_calls"
    assert msg.model_extra["reasoning_content"] == "The user wants the weather."
    assert msg.content == "Let me check."
    (call,) = msg.tool_calls
    assert call.function.name == "get_weather" and json.loads(call.function.arguments) == {"city": "Paris", "days": 3}

    chunks = list(scripted_oai.chat.completions.create(**kw, stream=True))
    deltas = [tc for c in chunks for tc in (c.choices[0].delta.tool_calls or [])]
    assert [(d.index, d.function.name, json.loads(d.function.arguments)) for d in deltas] == [
        (0, "get_weather", {"city": "Paris", "days": 3})
    ]
    assert chunks[-1].choices[0].finish_reason == "tool_calls"

    # Send the call and its result back to the real engine: the prompt is the V4 encoding of it.
    history = ASK + [
        {
            "role": "assistant",
            "content": msg.content,
            "reasoning_content": msg.model_extra["reasoning_content"],
            "tool_calls": [call.model_dump()],
        },
        {"role": "tool", "tool_call_id": call.id, "content": "sunny, 21C"},
    ]
    r2 = oai.chat.completions.create(model=MODEL, messages=history, tools=TOOLS, max_tokens=4, temperature=0)
    tok = Tokenizer.from_file(plan.weights_uri)
    expected = chat.encode_messages(history, tools=TOOLS, thinking=True)
    assert "<tool_result>sunny, 21C</tool_result>" in expected.text
    assert r2.usage.prompt_tokens == len(tok.encode_prompt(expected))


def test_anthropic_tool_use_round_trip(scripted_url, anth, plan):
    client = anthropic.Anthropic(base_url=scripted_url, api_key=API_KEY, max_retries=0)
    tools = [
        {"name": "get_weather", "description": "Weather of a city", "input_schema": TOOLS[0]["function"]["parameters"]}
    ]
    kw = dict(model=MODEL, max_tokens=200, messages=ASK, tools=tools, extra_body={"seed": 1})
    m = client.messages.create(**kw)
    assert m.stop_reason == "tool_use"
    assert [b.type for b in m.content] == ["thinking", "text", "tool_use"]
    use = m.content[2]
    assert use.name == "get_weather" and use.input == {"city": "Paris", "days": 3}
    with client.messages.stream(**kw) as stream:
        final = stream.get_final_message()
    assert final.content[2].input == use.input and final.stop_reason == "tool_use"

    history = ASK + [
        {"role": "assistant", "content": [b.model_dump(exclude_none=True) for b in m.content]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": use.id, "content": "sunny, 21C"}]},
    ]
    m2 = anth.messages.create(model=MODEL, max_tokens=4, messages=history, tools=tools, extra_body={"temperature": 0})
    tok = Tokenizer.from_file(plan.weights_uri)
    oai_history = ASK + [
        {
            "role": "assistant",
            "content": "Let me check.",
            "reasoning_content": "The user wants the weather.",
            "tool_calls": [
                {
                    "id": use.id,
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": json.dumps(use.input)},
                }
            ],
        },
        {"role": "tool", "tool_call_id": use.id, "content": "sunny, 21C"},
    ]
    oai_tools = [
        {
            "type": "function",
            "function": {"name": t["name"], "description": t["description"], "parameters": t["input_schema"]},
        }
        for t in tools
    ]
    assert m2.usage.input_tokens == len(
        tok.encode_prompt(chat.encode_messages(oai_history, tools=oai_tools, thinking=True))
    )


def test_error_mid_stream_ends_the_stream_in_each_api_shape(scripted_oai, scripted_url):
    # seed 2: the engine stream fails after a few tokens, as when no copy of an expert answers.
    with pytest.raises(openai.APIError, match="expert shard is unavailable"):
        for _ in scripted_oai.chat.completions.create(model=MODEL, messages=ASK, max_tokens=50, seed=2, stream=True):
            pass
    client = anthropic.Anthropic(base_url=scripted_url, api_key=API_KEY, max_retries=0)
    with pytest.raises(anthropic.APIStatusError, match="expert shard is unavailable"):
        with client.messages.stream(model=MODEL, max_tokens=50, messages=ASK, extra_body={"seed": 2}) as s:
            s.get_final_message()
