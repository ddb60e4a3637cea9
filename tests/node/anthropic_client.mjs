// The official `@anthropic-ai/sdk` Node SDK as a real client of detour's
// /v1/messages.
//
// Run by tests/sdk_node.rs with the gateway's base URL (without /v1), a gateway
// key, and the provider and upstream model the route `fast` goes to. The same
// scenarios as tests/sdk/anthropic_client.py, plus a 429 (`<key>-rpm` may make
// one request a minute). Every scenario runs, even after one failed; the script
// prints each failure and exits non-zero if there was any.
import assert from "node:assert/strict";

import Anthropic, {
  AuthenticationError,
  BadRequestError,
  NotFoundError,
  PermissionDeniedError,
  RateLimitError,
} from "@anthropic-ai/sdk";

import { rejects, scenario, summary } from "./check.mjs";

const [baseURL, key, provider, model] = process.argv.slice(2);
assert.ok(model, "usage: anthropic_client.mjs BASE_URL KEY PROVIDER MODEL");

const connect = (apiKey) => new Anthropic({ baseURL, apiKey, maxRetries: 0, timeout: 20_000 });
const client = connect(key);
const hello = [{ role: "user", content: "Say hello" }];
const x = [{ role: "user", content: "x" }];
const tools = [
  {
    name: "get_weather",
    description: "Weather for a city",
    input_schema: {
      type: "object",
      properties: { city: { type: "string" } },
      required: ["city"],
    },
  },
];
const weather = [{ role: "user", content: "Weather in Paris?" }];

await scenario("plain, with detour's headers through the raw response", async () => {
  const { data: msg, response } = await client.messages
    .create({ model: "fast", max_tokens: 256, messages: hello })
    .withResponse();
  assert.equal(msg.type, "message");
  assert.equal(msg.role, "assistant");
  assert.equal(msg.content[0].type, "text");
  assert.ok(msg.content[0].text.includes(model), JSON.stringify(msg));
  assert.equal(msg.stop_reason, "end_turn");
  assert.ok(msg.usage.output_tokens > 0, JSON.stringify(msg.usage));
  assert.equal(response.headers.get("x-detour-provider"), provider);
});

await scenario("streamed, through the SDK's event accumulator", async () => {
  const stream = client.messages.stream({ model: "fast", max_tokens: 256, messages: hello });
  let text = "";
  stream.on("text", (delta) => {
    text += delta;
  });
  const final = await stream.finalMessage();
  assert.ok(text.includes(model), text);
  assert.equal(final.stop_reason, "end_turn");
  assert.ok(final.usage.output_tokens > 0, JSON.stringify(final.usage));
});

await scenario("streamed, the raw events in order", async () => {
  const stream = await client.messages.create({
    model: "fast",
    max_tokens: 256,
    messages: hello,
    stream: true,
  });
  const types = [];
  for await (const event of stream) types.push(event.type);
  assert.equal(types[0], "message_start", types.join(","));
  assert.equal(types.at(-1), "message_stop", types.join(","));
  assert.ok(types.includes("content_block_delta"), types.join(","));
});

await scenario("a tool call round trip: call, tool result, answer", async () => {
  const messages = [...weather];
  const first = await client.messages.create({ model: "fast", max_tokens: 256, messages, tools });
  assert.equal(first.stop_reason, "tool_use", JSON.stringify(first));
  const call = first.content.find((b) => b.type === "tool_use");
  assert.ok(call, JSON.stringify(first.content));
  assert.equal(call.name, "get_weather");
  assert.ok("city" in call.input, JSON.stringify(call.input));
  messages.push({ role: "assistant", content: first.content });
  messages.push({
    role: "user",
    content: [{ type: "tool_result", tool_use_id: call.id, content: "sunny, 21C" }],
  });
  const answer = await client.messages.create({ model: "fast", max_tokens: 256, messages, tools });
  assert.ok(answer.content[0].text.includes("sunny, 21C"), JSON.stringify(answer));
});

await scenario("a streamed tool call: the input JSON reassembles", async () => {
  const stream = client.messages.stream({ model: "fast", max_tokens: 256, messages: weather, tools });
  const final = await stream.finalMessage();
  assert.equal(final.stop_reason, "tool_use", JSON.stringify(final));
  const call = final.content.find((b) => b.type === "tool_use");
  assert.ok(call && "city" in call.input, JSON.stringify(final.content));
});

await scenario("an unknown model is a NotFoundError", async () => {
  const e = await rejects(
    client.messages.create({ model: "nope", max_tokens: 10, messages: x }),
    NotFoundError,
  );
  assert.equal(e.status, 404);
  assert.ok(e.message.includes("fast"), e.message);
});

// Unlike the Python SDK, the Node SDK sends a request without max_tokens.
await scenario("a missing max_tokens is a BadRequestError", async () => {
  const e = await rejects(client.messages.create({ model: "fast", messages: x }), BadRequestError);
  assert.equal(e.status, 400);
  assert.equal(e.error?.error?.type, "invalid_request_error", JSON.stringify(e.error));
});

await scenario("a wrong key is an AuthenticationError", async () => {
  const e = await rejects(
    connect("dk-wrong").messages.create({ model: "fast", max_tokens: 10, messages: x }),
    AuthenticationError,
  );
  assert.equal(e.status, 401);
  assert.equal(e.error?.error?.type, "authentication_error", JSON.stringify(e.error));
});

// tests/sdk_node.rs: `<key>-limited` may call no route of the gateway's.
await scenario("a model outside the key's list is a PermissionDeniedError", async () => {
  const e = await rejects(
    connect(`${key}-limited`).messages.create({ model: "fast", max_tokens: 10, messages: x }),
    PermissionDeniedError,
  );
  assert.equal(e.status, 403);
  assert.equal(e.error?.error?.type, "permission_error", JSON.stringify(e.error));
  assert.ok(e.message.includes("fast") && !e.message.includes(key), e.message);
});

// tests/sdk_node.rs: `<key>-rpm` may make one request a minute.
await scenario("a key over its rate is a RateLimitError with retry-after", async () => {
  const once = connect(`${key}-rpm`);
  await once.messages.create({ model: "fast", max_tokens: 10, messages: x });
  const e = await rejects(
    once.messages.create({ model: "fast", max_tokens: 10, messages: x }),
    RateLimitError,
  );
  assert.equal(e.status, 429);
  assert.equal(e.error?.error?.type, "rate_limit_error", JSON.stringify(e.error));
  const wait = Number(e.headers.get("retry-after"));
  assert.ok(wait >= 1 && wait <= 60, String(e.headers.get("retry-after")));
});

summary("anthropic node sdk");
