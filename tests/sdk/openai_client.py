"""The official `openai` Python SDK as a real client of detour.

Run by tests/sdk.rs with the gateway's base URL, a gateway key, and the
provider and upstream model the route `fast` goes to; exits non-zero with a
message on the first failed expectation.
"""
import json
import sys

import openai
from openai import OpenAI


def main(base_url: str, key: str, provider: str, model: str) -> None:
    client = OpenAI(base_url=base_url, api_key=key, max_retries=0, timeout=20)

    # Non-streamed, with detour's headers visible through the raw response.
    raw = client.chat.completions.with_raw_response.create(
        model="fast", messages=[{"role": "user", "content": "Say hello"}]
    )
    completion = raw.parse()
    assert completion.choices[0].message.content, completion
    assert completion.model == model, completion.model
    assert completion.usage.total_tokens > 0, completion.usage
    assert raw.headers["x-detour-provider"] == provider, dict(raw.headers)

    # Streamed, with usage at the end; the SDK stops at [DONE].
    stream = client.chat.completions.create(
        model="fast",
        messages=[{"role": "user", "content": "Say hello"}],
        stream=True,
        stream_options={"include_usage": True},
    )
    text, usage = "", None
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            text += chunk.choices[0].delta.content
        if chunk.usage:
            usage = chunk.usage
    assert model in text, text
    assert usage is not None and usage.completion_tokens > 0, usage

    # A tool call round trip: call, tool result, answer.
    tools = [{
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Weather for a city",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}},
                "required": ["city"],
            },
        },
    }]
    messages = [{"role": "user", "content": "Weather in Paris?"}]
    first = client.chat.completions.create(model="fast", messages=messages, tools=tools)
    call = first.choices[0].message.tool_calls[0]
    assert first.choices[0].finish_reason == "tool_calls", first
    assert call.function.name == "get_weather", call
    assert "city" in json.loads(call.function.arguments), call
    messages.append(first.choices[0].message.model_dump(exclude_none=True))
    messages.append({"role": "tool", "tool_call_id": call.id, "content": "sunny, 21C"})
    answer = client.chat.completions.create(model="fast", messages=messages, tools=tools)
    assert "sunny, 21C" in answer.choices[0].message.content, answer

    # Streamed tool call: argument fragments reassemble into JSON.
    stream = client.chat.completions.create(
        model="fast", messages=messages[:1], tools=tools, stream=True
    )
    args = ""
    for chunk in stream:
        for tc in (chunk.choices[0].delta.tool_calls or []) if chunk.choices else []:
            args += tc.function.arguments or ""
    assert "city" in json.loads(args), args

    # Embeddings (the SDK asks for base64 by default); only OpenAI kinds have them.
    if not model.startswith(("claude", "gemini")):
        emb = client.embeddings.create(model="fast", input=["a", "b"])
        assert len(emb.data) == 2 and len(emb.data[0].embedding) > 0, emb

    # Models list.
    assert [m.id for m in client.models.list()] == ["fast"]

    # Errors surface as the SDK's own exception types.
    try:
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "x"}])
        raise AssertionError("unknown model must fail")
    except openai.NotFoundError as e:
        assert e.status_code == 404 and "fast" in str(e), e
        assert e.code == "model_not_found", e.code
    try:
        client.chat.completions.create(model="fast", messages=[])
        raise AssertionError("empty messages must fail")
    except openai.BadRequestError as e:
        assert e.param == "messages", e
    bad = OpenAI(base_url=base_url, api_key="dk-wrong", max_retries=0)
    try:
        bad.chat.completions.create(model="fast", messages=[{"role": "user", "content": "x"}])
        raise AssertionError("a wrong key must fail")
    except openai.AuthenticationError as e:
        assert e.status_code == 401, e
    # A key whose `models` list leaves `fast` out (tests/sdk.rs: `<key>-limited`).
    limited = OpenAI(base_url=base_url, api_key=key + "-limited", max_retries=0)
    try:
        limited.chat.completions.create(model="fast", messages=[{"role": "user", "content": "x"}])
        raise AssertionError("a model outside the key's list must fail")
    except openai.PermissionDeniedError as e:
        assert e.status_code == 403 and e.code == "model_not_allowed", e
        assert "fast" in str(e) and key not in str(e), e
    assert [m.id for m in limited.models.list()] == []

    print("openai sdk: all checks passed")


if __name__ == "__main__":
    main(*sys.argv[1:5])
