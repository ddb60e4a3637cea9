"""The official `anthropic` Python SDK's metadata calls against detour:
`client.models.list()` (Anthropic's shape, only the key's models) and
`client.messages.count_tokens(...)` (passed through to an Anthropic target,
or estimated and marked with `x-detour-estimated`).

Run by tests/anthropic_meta.rs with the gateway's base URL (without /v1).
"""
import sys

import anthropic
from anthropic import Anthropic


def main(base_url: str) -> None:
    everything = Anthropic(base_url=base_url, api_key="dk-all", max_retries=0, timeout=20)
    limited = Anthropic(base_url=base_url, api_key="dk-claude", max_retries=0, timeout=20)

    page = everything.models.list()
    assert [m.id for m in page.data] == ["claude", "gpt", "down", "claude-other"], page
    assert page.has_more is False and page.first_id == "claude", page
    model = page.data[0]
    assert model.type == "model" and model.display_name == "claude", model
    assert model.created_at.year == 1970, model
    # Auto-pagination over small pages reaches every model.
    assert [m.id for m in everything.models.list(limit=1)] == [m.id for m in page.data]
    assert [m.id for m in limited.models.list()] == ["claude", "claude-other"]

    messages = [{"role": "user", "content": "x" * 400}]
    raw = everything.messages.with_raw_response.count_tokens(model="claude", messages=messages)
    counted = raw.parse()
    assert counted.input_tokens == 100, counted
    assert "x-detour-estimated" not in raw.headers, dict(raw.headers)

    raw = everything.messages.with_raw_response.count_tokens(model="gpt", messages=messages)
    assert raw.parse().input_tokens == 101, raw.parse()
    assert raw.headers["x-detour-estimated"] == "true", dict(raw.headers)

    try:
        limited.messages.count_tokens(model="gpt", messages=messages)
        raise AssertionError("a model outside the key's list was counted")
    except anthropic.PermissionDeniedError:
        pass
    print("ok")


if __name__ == "__main__":
    main(*sys.argv[1:])
