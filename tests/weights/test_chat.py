"""V4 chat prompt encoding and output parsing (docs/deepseek-v4.md §8), both directions."""

import json

import pytest

from v4d.serving.chat import (
    ASSISTANT,
    BOS,
    END_THINK,
    EOS,
    REASONING_EFFORT_MAX,
    THINK,
    USER,
    ChatFormatError,
    OutputParser,
    ToolCall,
    encode_messages,
    parse_output,
    render_tool_calls,
)

D = "｜DSML｜"
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather of a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
    },
}
CONV = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello!", "reasoning_content": "greet back"},
    {"role": "user", "content": "2+2?"},
]


def call(cid, name, args):
    return {"id": cid, "type": "function", "function": {"name": name, "arguments": json.dumps(args)}}


def test_chat_mode_prefills_end_think_and_drops_reasoning():
    assert encode_messages(CONV, thinking=False).text == (
        f"{BOS}Be brief.{USER}Hi{ASSISTANT}{END_THINK}Hello!{EOS}{USER}2+2?{ASSISTANT}{END_THINK}"
    )


def test_thinking_mode_prefills_think_and_drops_old_reasoning_without_tools():
    assert encode_messages(CONV, thinking=True).text == (
        f"{BOS}Be brief.{USER}Hi{ASSISTANT}{END_THINK}Hello!{EOS}{USER}2+2?{ASSISTANT}{THINK}"
    )


def test_thinking_mode_with_tools_keeps_all_reasoning():
    p = encode_messages(CONV, tools=[WEATHER], thinking=True).text
    assert p.startswith(f"{BOS}Be brief.\n\n## Tools\n")
    assert '{"name": "get_weather", "description": "Weather of a city"' in p
    assert p.endswith(f"{USER}Hi{ASSISTANT}{THINK}greet back{END_THINK}Hello!{EOS}{USER}2+2?{ASSISTANT}{THINK}")


def test_tools_without_system_message_get_one():
    p = encode_messages([{"role": "user", "content": "x"}], tools=[WEATHER]).text
    assert p.startswith(f"{BOS}\n\n## Tools\n\nYou have access to a set of tools")
    assert f'"<{D}tool_calls>" block' in p
    assert p.endswith(f"{USER}x{ASSISTANT}{END_THINK}")


def test_reasoning_after_the_last_user_turn_is_kept():
    msgs = [
        {"role": "user", "content": "q"},
        {"role": "assistant", "content": "partial", "reasoning_content": "r", "prefix": True},
    ]
    assert encode_messages(msgs, thinking=True).text == f"{BOS}{USER}q{ASSISTANT}{THINK}r{END_THINK}partial"


def test_tool_call_round_with_results_in_call_order():
    msgs = [
        {"role": "user", "content": "Weather in Paris and the time?"},
        {
            "role": "assistant",
            "content": "",
            "reasoning_content": "two calls",
            "tool_calls": [call("a", "get_weather", {"city": "Paris", "days": 2}), call("b", "get_time", {})],
        },
        {"role": "tool", "tool_call_id": "b", "content": "12:00"},
        {"role": "tool", "tool_call_id": "a", "content": [{"type": "text", "text": "sunny"}]},
    ]
    p = encode_messages(msgs, tools=[WEATHER], thinking=True).text
    block = (
        f"\n\n<{D}tool_calls>\n"
        f'<{D}invoke name="get_weather">\n'
        f'<{D}parameter name="city" string="true">Paris</{D}parameter>\n'
        f'<{D}parameter name="days" string="false">2</{D}parameter>\n'
        f"</{D}invoke>\n"
        f'<{D}invoke name="get_time">\n\n</{D}invoke>\n'
        f"</{D}tool_calls>"
    )
    assert p.endswith(
        f"{USER}Weather in Paris and the time?{ASSISTANT}{THINK}two calls{END_THINK}{block}{EOS}"
        f"{USER}<tool_result>sunny</tool_result>\n\n<tool_result>12:00</tool_result>{ASSISTANT}{THINK}"
    )


def test_user_text_after_tool_results_joins_the_same_turn():
    msgs = [
        {"role": "user", "content": "go"},
        {"role": "assistant", "tool_calls": [call("x", "f", {"n": [1, 2]})]},
        {"role": "tool", "tool_call_id": "x", "content": "ok"},
        {"role": "user", "content": "thanks"},
    ]
    p = encode_messages(msgs).text
    assert p.endswith(f"{EOS}{USER}<tool_result>ok</tool_result>\n\nthanks{ASSISTANT}{END_THINK}")
    assert f'<{D}parameter name="n" string="false">[1, 2]</{D}parameter>' in p


def test_developer_turns_before_last_user_are_dropped_in_thinking_mode():
    msgs = [{"role": "developer", "content": "dev"}, {"role": "user", "content": "u"}]
    assert encode_messages(msgs, thinking=True).text == f"{BOS}{USER}u{ASSISTANT}{THINK}"
    assert encode_messages(msgs, thinking=False).text == f"{BOS}{USER}dev{USER}u{ASSISTANT}{END_THINK}"


def test_reasoning_effort_max_preamble_only_in_thinking_mode():
    msgs = [{"role": "user", "content": "u"}]
    assert encode_messages(msgs, thinking=True, reasoning_effort="max").text.startswith(
        BOS + REASONING_EFFORT_MAX + USER
    )
    assert encode_messages(msgs, thinking=True, reasoning_effort="high").text == f"{BOS}{USER}u{ASSISTANT}{THINK}"
    assert REASONING_EFFORT_MAX not in encode_messages(msgs, thinking=False, reasoning_effort="max").text


def test_response_format_goes_into_the_system_prompt():
    p = encode_messages([{"role": "user", "content": "u"}], response_format={"type": "json_object"}).text
    assert p.startswith(BOS + "\n\n## Response Format:\n\nYou MUST strictly adhere")
    assert '{"type": "json_object"}' in p


@pytest.mark.parametrize(
    "messages,kwargs,param",
    [
        ([], {}, "messages"),
        ([{"role": "robot", "content": "x"}], {}, "messages[0].role"),
        ([{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}], {}, "messages[0].content[0].type"),
        ([{"role": "user", "content": "x"}], {"reasoning_effort": "huge"}, "reasoning_effort"),
        (
            [
                {"role": "user", "content": "x"},
                {"role": "assistant", "tool_calls": [{"function": {"arguments": "{}"}}]},
            ],
            {},
            "messages[1].tool_calls[0].function.name",
        ),
        ([{"role": "user", "content": "x"}], {"tools": [{"type": "function"}]}, "tools[0].function.name"),
    ],
)
def test_bad_messages_name_the_field(messages, kwargs, param):
    with pytest.raises(ChatFormatError) as e:
        encode_messages(messages, **kwargs)
    assert e.value.param == param


# -- parsing -------------------------------------------------------------------------------------
CALLS = [
    call("a", "get_weather", {"city": "Paris", "days": 2, "opts": {"units": "C", "hourly": False}}),
    call("b", "note", {"text": 'He said "hi" <b>\nline2'}),
]


def test_parse_thinking_content_and_tool_calls():
    text = f"Let me check.{END_THINK}Checking now.\n\n{''.join(render_tool_calls(CALLS))}{EOS}"
    out = parse_output(text, thinking=True)
    assert out.reasoning_content == "Let me check."
    assert out.content == "Checking now."
    assert [(c.name, json.loads(c.arguments)) for c in out.tool_calls] == [
        ("get_weather", {"city": "Paris", "days": 2, "opts": {"units": "C", "hourly": False}}),
        ("note", {"text": 'He said "hi" <b>\nline2'}),
    ]


def test_encode_then_parse_round_trips_an_assistant_turn():
    msgs = [
        {"role": "user", "content": "u"},
        {"role": "assistant", "content": "Sure.", "reasoning_content": "plan", "tool_calls": CALLS},
    ]
    prompt = encode_messages(msgs, tools=[WEATHER], thinking=True).text
    generated = prompt.split(f"{USER}u{ASSISTANT}{THINK}", 1)[1]
    out = parse_output(generated, thinking=True)
    assert out.reasoning_content == "plan" and out.content == "Sure."
    assert [(c.name, json.loads(c.arguments)) for c in out.tool_calls] == [
        (c0["function"]["name"], json.loads(c0["function"]["arguments"])) for c0 in CALLS
    ]


def test_parse_chat_mode_plain_answer_with_and_without_eos():
    assert parse_output("Four." + EOS, thinking=False).content == "Four."
    out = parse_output("Four.", thinking=False)
    assert (out.reasoning_content, out.content, out.tool_calls) == (None, "Four.", [])
    assert parse_output("a" + EOS + "junk after eos", thinking=False).content == "a"


def test_parse_truncated_outputs():
    assert parse_output("still thinking", thinking=True).reasoning_content == "still thinking"
    half = f'{END_THINK}\n\n<{D}tool_calls>\n<{D}invoke name="f">\n<{D}parameter name="x" string="true">1'
    out = parse_output(half, thinking=True)
    assert out.content == "" and out.tool_calls == []


def test_non_json_false_parameter_is_kept_as_text():
    text = (
        f'\n\n<{D}tool_calls>\n<{D}invoke name="f">\n<{D}parameter name="x" string="false">not json</{D}parameter>'
        f"\n</{D}invoke>\n</{D}tool_calls>"
    )
    assert parse_output(text, thinking=False).tool_calls == [ToolCall("f", '{"x": "not json"}')]


@pytest.mark.parametrize("chunk", [1, 2, 3, 7, 1000])
def test_streaming_in_any_chunking_gives_the_same_parts(chunk):
    calls = "".join(render_tool_calls(CALLS))
    text = f"Think\n\nmore.{END_THINK}Answer with <b>tags</b> and\n\nblank lines.\n\n{calls}{EOS}"
    p = OutputParser(thinking=True)
    events = []
    for i in range(0, len(text), chunk):
        events += p.feed(text[i : i + chunk])
    events += p.finish()
    reasoning = "".join(v for k, v in events if k == "reasoning")
    content = "".join(v for k, v in events if k == "content")
    calls = [v for k, v in events if k == "tool_call"]
    assert reasoning == "Think\n\nmore."
    assert content == "Answer with <b>tags</b> and\n\nblank lines."
    assert [c.name for c in calls] == ["get_weather", "note"]
    # nothing that belongs to a marker ever leaks into the text
    assert all(END_THINK not in v and D not in v and EOS not in v for k, v in events if k != "tool_call")
    # kinds arrive in order: reasoning, then content, then tool calls
    kinds = [k for k, _ in events]
    assert kinds == sorted(kinds, key=["reasoning", "content", "tool_call"].index)


def test_streaming_emits_text_early_and_each_tool_call_when_its_invoke_closes():
    p = OutputParser(thinking=False)
    assert p.feed("Hello wor") == [("content", "Hello wor")]
    assert p.feed("ld\n") == [("content", "ld")]  # the newline could start the tool-call block
    assert p.feed("next") == [("content", "\nnext")]
    assert p.feed(f'\n\n<{D}tool_calls>\n<{D}invoke name="a">\n</{D}invoke>') == [("tool_call", ToolCall("a", "{}"))]
    assert p.feed(f'\n<{D}invoke name="b">\n</{D}invoke>\n</{D}tool_calls>{EOS}') == [
        ("tool_call", ToolCall("b", "{}"))
    ]
    assert p.finish() == []
