"""The official `anthropic` Python SDK as a real client of detour's /v1/messages.

Run by tests/sdk.rs with the gateway's base URL (without /v1), a gateway key,
and the provider and upstream model the route `fast` goes to.
"""
import sys

import anthropic
from anthropic import Anthropic


def main(base_url: str, key: str, provider: str, model: str) -> None:
    client = Anthropic(base_url=base_url, api_key=key, max_retries=0, timeout=20)

    raw = client.messages.with_raw_response.create(
        model="fast", max_tokens=256, messages=[{"role": "user", "content": "Say hello"}]
    )
    msg = raw.parse()
    assert msg.type == "message" and msg.role == "assistant", msg
    assert msg.content[0].type == "text" and model in msg.content[0].text, msg
    assert msg.stop_reason == "end_turn", msg.stop_reason
    assert msg.usage.output_tokens > 0, msg.usage
    assert raw.headers["x-detour-provider"] == provider, dict(raw.headers)

    # Streaming, through the SDK's event accumulator.
    with client.messages.stream(
        model="fast", max_tokens=256, messages=[{"role": "user", "content": "Say hello"}]
    ) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert model in text, text
    assert final.stop_reason == "end_turn", final
    assert final.usage.output_tokens > 0, final.usage

    # A tool call round trip: call, tool result, answer.
    tools = [{
        "name": "get_weather",
        "description": "Weather for a city",
        "input_schema": {
            "type": "object",
            "properties": {"city": {"type": "string"}},
            "required": ["city"],
        },
    }]
    messages = [{"role": "user", "content": "Weather in Paris?"}]
    first = client.messages.create(model="fast", max_tokens=256, messages=messages, tools=tools)
    assert first.stop_reason == "tool_use", first
    call = next(b for b in first.content if b.type == "tool_use")
    assert call.name == "get_weather" and "city" in call.input, call
    messages.append({"role": "assistant", "content": [b.model_dump(exclude_none=True) for b in first.content]})
    messages.append({
        "role": "user",
        "content": [{"type": "tool_result", "tool_use_id": call.id, "content": "sunny, 21C"}],
    })
    answer = client.messages.create(model="fast", max_tokens=256, messages=messages, tools=tools)
    assert "sunny, 21C" in answer.content[0].text, answer

    # A streamed tool call: the input JSON reassembles.
    with client.messages.stream(
        model="fast", max_tokens=256, messages=messages[:1], tools=tools
    ) as stream:
        final = stream.get_final_message()
    call = next(b for b in final.content if b.type == "tool_use")
    assert "city" in call.input, final

    # Errors surface as the SDK's own exception types.
    try:
        client.messages.create(model="nope", max_tokens=10, messages=[{"role": "user", "content": "x"}])
        raise AssertionError("unknown model must fail")
    except anthropic.NotFoundError as e:
        assert e.status_code == 404 and "fast" in str(e), e
    try:
        client.messages.create(model="fast", messages=[{"role": "user", "content": "x"}])
        raise AssertionError("missing max_tokens must fail")
    except (anthropic.BadRequestError, TypeError) as e:
        pass
    bad = Anthropic(base_url=base_url, api_key="dk-wrong", max_retries=0)
    try:
        bad.messages.create(model="fast", max_tokens=10, messages=[{"role": "user", "content": "x"}])
        raise AssertionError("a wrong key must fail")
    except anthropic.AuthenticationError as e:
        assert e.status_code == 401, e
    # A key whose `models` list leaves `fast` out (tests/sdk.rs: `<key>-limited`).
    limited = Anthropic(base_url=base_url, api_key=key + "-limited", max_retries=0)
    try:
        limited.messages.create(model="fast", max_tokens=10, messages=[{"role": "user", "content": "x"}])
        raise AssertionError("a model outside the key's list must fail")
    except anthropic.PermissionDeniedError as e:
        assert e.status_code == 403 and "fast" in str(e) and key not in str(e), e

    print("anthropic sdk: all checks passed")


if __name__ == "__main__":
    main(*sys.argv[1:5])
