"""The official `openai` Python SDK's Responses API as a real client of detour.

Run by tests/sdk.rs with the gateway's base URL, a gateway key, the provider
and upstream model the route `fast` goes to, and the provider's kind; exits
non-zero with a message on the first failed expectation.
"""
import json
import sys

import openai
from openai import OpenAI

TOOLS = [{
    "type": "function",
    "name": "get_weather",
    "description": "Weather for a city",
    "parameters": {
        "type": "object",
        "properties": {"city": {"type": "string"}},
        "required": ["city"],
    },
}]


def main(base_url: str, key: str, provider: str, model: str, kind: str) -> None:
    client = OpenAI(base_url=base_url, api_key=key, max_retries=0, timeout=20)

    # Non-streamed, with detour's headers visible through the raw response.
    raw = client.responses.with_raw_response.create(
        model="fast", instructions="Be brief.", input="Say hello", max_output_tokens=200
    )
    response = raw.parse()
    assert response.status == "completed", response
    assert model in response.output_text, response.output_text
    assert response.model == model, response.model
    assert response.usage.input_tokens > 0 and response.usage.output_tokens > 0, response.usage
    assert response.usage.total_tokens == response.usage.input_tokens + response.usage.output_tokens
    assert raw.headers["x-detour-provider"] == provider, dict(raw.headers)

    # Streamed: typed events, numbered, ending with the whole response.
    stream = client.responses.create(model="fast", input="Say hello", stream=True)
    text, final, numbers = "", None, []
    for event in stream:
        numbers.append(event.sequence_number)
        if event.type == "response.output_text.delta":
            text += event.delta
        if event.type == "response.completed":
            final = event.response
    assert model in text, text
    assert numbers == list(range(len(numbers))), numbers
    assert final is not None and final.output_text == text, final
    assert final.usage.output_tokens > 0, final.usage

    # The SDK's stream helper checks every event against what it built.
    with client.responses.stream(model="fast", input="Say hello") as helper:
        for _ in helper:
            pass
        assert model in helper.get_final_response().output_text

    # A tool call round trip: call, output, answer.
    first = client.responses.create(model="fast", input="Weather in Paris?", tools=TOOLS)
    calls = [o for o in first.output if o.type == "function_call"]
    assert calls and calls[0].name == "get_weather", first.output
    assert "city" in json.loads(calls[0].arguments), calls[0]
    history = [{"role": "user", "content": "Weather in Paris?"}]
    history += [o.model_dump(exclude_none=True) for o in first.output]
    history.append({"type": "function_call_output", "call_id": calls[0].call_id, "output": "sunny, 21C"})
    answer = client.responses.create(model="fast", input=history, tools=TOOLS)
    assert "sunny, 21C" in answer.output_text, answer

    # Streamed tool call: argument fragments reassemble into JSON.
    args, done = "", None
    for event in client.responses.create(
        model="fast", input="Weather in Paris?", tools=TOOLS, stream=True
    ):
        if event.type == "response.function_call_arguments.delta":
            args += event.delta
        if event.type == "response.function_call_arguments.done":
            done = event.arguments
    assert "city" in json.loads(args) and done == args, (args, done)

    # Errors surface as the SDK's own exception types.
    try:
        client.responses.create(model="nope", input="x")
        raise AssertionError("unknown model must fail")
    except openai.NotFoundError as e:
        assert e.status_code == 404 and e.code == "model_not_found", e
    try:
        client.responses.create(model="fast")
        raise AssertionError("a request without input must fail")
    except openai.BadRequestError as e:
        assert "input" in str(e), e

    # State kept by OpenAI: passed through to it, refused by name elsewhere.
    if kind == "openai":
        chained = client.responses.create(
            model="fast", input="And then?", previous_response_id=response.id
        )
        assert chained.previous_response_id == response.id, chained
    else:
        try:
            client.responses.create(model="fast", input="And then?", previous_response_id="resp_x")
            raise AssertionError("previous_response_id must be refused for a " + kind + " provider")
        except openai.BadRequestError as e:
            assert "previous_response_id" in str(e), e

    print("openai responses sdk: all checks passed")


if __name__ == "__main__":
    main(*sys.argv[1:6])
