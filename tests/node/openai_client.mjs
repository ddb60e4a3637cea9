// The official `openai` Node SDK as a real client of detour.
//
// Run by tests/sdk_node.rs with the gateway's base URL (with /v1), a gateway
// key, and the provider and upstream model the route `fast` goes to. The same
// scenarios as tests/sdk/openai_client.py, plus a 429 (`<key>-rpm` may make one
// request a minute). Every scenario runs, even after one failed; the script
// prints each failure and exits non-zero if there was any.
import assert from "node:assert/strict";

import OpenAI, {
  AuthenticationError,
  BadRequestError,
  NotFoundError,
  PermissionDeniedError,
  RateLimitError,
} from "openai";

import { rejects, scenario, summary } from "./check.mjs";

const [baseURL, key, provider, model] = process.argv.slice(2);
assert.ok(model, "usage: openai_client.mjs BASE_URL KEY PROVIDER MODEL");

const connect = (apiKey) => new OpenAI({ baseURL, apiKey, maxRetries: 0, timeout: 20_000 });
const client = connect(key);
const hello = [{ role: "user", content: "Say hello" }];
const x = [{ role: "user", content: "x" }];
const tools = [
  {
    type: "function",
    function: {
      name: "get_weather",
      description: "Weather for a city",
      parameters: {
        type: "object",
        properties: { city: { type: "string" } },
        required: ["city"],
      },
    },
  },
];
const weather = [{ role: "user", content: "Weather in Paris?" }];

await scenario("plain, with detour's headers through the raw response", async () => {
  const { data, response } = await client.chat.completions
    .create({ model: "fast", messages: hello })
    .withResponse();
  assert.ok(data.choices[0].message.content, JSON.stringify(data));
  assert.equal(data.choices[0].finish_reason, "stop");
  assert.equal(data.model, model);
  assert.ok(data.usage.total_tokens > 0, JSON.stringify(data.usage));
  assert.equal(response.headers.get("x-detour-provider"), provider);
});

await scenario("streamed, with usage at the end; the SDK stops at [DONE]", async () => {
  const stream = await client.chat.completions.create({
    model: "fast",
    messages: hello,
    stream: true,
    stream_options: { include_usage: true },
  });
  let text = "";
  let usage = null;
  for await (const chunk of stream) {
    text += chunk.choices[0]?.delta?.content ?? "";
    if (chunk.usage) usage = chunk.usage;
  }
  assert.ok(text.includes(model), text);
  assert.ok(usage && usage.completion_tokens > 0, JSON.stringify(usage));
});

await scenario("streamed, accumulated by the SDK's stream helper", async () => {
  const runner = client.chat.completions.stream({ model: "fast", messages: hello });
  const final = await runner.finalChatCompletion();
  assert.ok(final.choices[0].message.content.includes(model), JSON.stringify(final));
  assert.equal(final.choices[0].finish_reason, "stop");
});

await scenario("a tool call round trip: call, tool result, answer", async () => {
  const messages = [...weather];
  const first = await client.chat.completions.create({ model: "fast", messages, tools });
  assert.equal(first.choices[0].finish_reason, "tool_calls", JSON.stringify(first));
  const call = first.choices[0].message.tool_calls[0];
  assert.equal(call.function.name, "get_weather");
  assert.ok("city" in JSON.parse(call.function.arguments), call.function.arguments);
  messages.push(first.choices[0].message);
  messages.push({ role: "tool", tool_call_id: call.id, content: "sunny, 21C" });
  const answer = await client.chat.completions.create({ model: "fast", messages, tools });
  assert.ok(answer.choices[0].message.content.includes("sunny, 21C"), JSON.stringify(answer));
});

await scenario("a streamed tool call: argument fragments reassemble into JSON", async () => {
  const stream = await client.chat.completions.create({
    model: "fast",
    messages: weather,
    tools,
    stream: true,
  });
  let args = "";
  let finish = null;
  for await (const chunk of stream) {
    for (const tc of chunk.choices[0]?.delta?.tool_calls ?? []) args += tc.function?.arguments ?? "";
    finish = chunk.choices[0]?.finish_reason ?? finish;
  }
  assert.ok("city" in JSON.parse(args), args);
  assert.equal(finish, "tool_calls");
});

// The SDK asks for base64 by default; only OpenAI kinds have embeddings.
if (!model.startsWith("claude") && !model.startsWith("gemini")) {
  await scenario("embeddings", async () => {
    const emb = await client.embeddings.create({ model: "fast", input: ["a", "b"] });
    assert.equal(emb.data.length, 2);
    assert.ok(emb.data[0].embedding.length > 0, JSON.stringify(emb.data[0]));
  });
}

await scenario("the models list, through the SDK's pager", async () => {
  const ids = [];
  for await (const m of client.models.list()) ids.push(m.id);
  assert.deepEqual(ids, ["fast"]);
});

await scenario("an unknown model is a NotFoundError", async () => {
  const e = await rejects(
    client.chat.completions.create({ model: "nope", messages: x }),
    NotFoundError,
  );
  assert.equal(e.status, 404);
  assert.equal(e.code, "model_not_found");
  assert.ok(e.message.includes("fast"), e.message);
});

await scenario("empty messages are a BadRequestError naming the param", async () => {
  const e = await rejects(
    client.chat.completions.create({ model: "fast", messages: [] }),
    BadRequestError,
  );
  assert.equal(e.status, 400);
  assert.equal(e.param, "messages");
});

await scenario("a wrong key is an AuthenticationError", async () => {
  const e = await rejects(
    connect("dk-wrong").chat.completions.create({ model: "fast", messages: x }),
    AuthenticationError,
  );
  assert.equal(e.status, 401);
});

// tests/sdk_node.rs: `<key>-limited` may call no route of the gateway's.
await scenario("a model outside the key's list is a PermissionDeniedError", async () => {
  const limited = connect(`${key}-limited`);
  const e = await rejects(
    limited.chat.completions.create({ model: "fast", messages: x }),
    PermissionDeniedError,
  );
  assert.equal(e.status, 403);
  assert.equal(e.code, "model_not_allowed");
  assert.ok(e.message.includes("fast") && !e.message.includes(key), e.message);
  const ids = [];
  for await (const m of limited.models.list()) ids.push(m.id);
  assert.deepEqual(ids, []);
});

// tests/sdk_node.rs: `<key>-rpm` may make one request a minute.
await scenario("a key over its rate is a RateLimitError with retry-after", async () => {
  const once = connect(`${key}-rpm`);
  await once.chat.completions.create({ model: "fast", messages: x });
  const e = await rejects(
    once.chat.completions.create({ model: "fast", messages: x }),
    RateLimitError,
  );
  assert.equal(e.status, 429);
  assert.equal(e.code, "rate_limit_exceeded");
  const wait = Number(e.headers.get("retry-after"));
  assert.ok(wait >= 1 && wait <= 60, String(e.headers.get("retry-after")));
});

summary("openai node sdk");
