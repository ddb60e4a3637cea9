//! `detour mock --flavor gemini` over real loopback HTTP: response shapes, SSE and
//! JSON-array streams, function calls and responses, thought signatures, camelCase and
//! snake_case input, auth, Google error shapes, faults (stream errors included).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // a failed unwrap is a failed test

use std::time::Duration;

use detour_mock::{self as mock, Flavor, MockOptions, MockServer};
use serde_json::{json, Value};

// ---------------------------------------------------------------------------------
// Helpers

async fn start(opts: MockOptions) -> MockServer {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    mock::spawn(Flavor::Gemini, listener, opts).await.unwrap()
}

async fn start_default() -> MockServer {
    start(MockOptions::default()).await
}

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap()
}

async fn post(
    client: &reqwest::Client,
    server: &MockServer,
    path: &str,
    body: &Value,
) -> reqwest::Response {
    client
        .post(format!("{}{path}", server.url()))
        .header("content-type", "application/json")
        .body(body.to_string())
        .send()
        .await
        .unwrap()
}

async fn generate(
    client: &reqwest::Client,
    server: &MockServer,
    model: &str,
    body: &Value,
) -> reqwest::Response {
    post(
        client,
        server,
        &format!("/v1beta/models/{model}:generateContent"),
        body,
    )
    .await
}

async fn stream(
    client: &reqwest::Client,
    server: &MockServer,
    model: &str,
    body: &Value,
) -> reqwest::Response {
    let path = format!("/v1beta/models/{model}:streamGenerateContent?alt=sse");
    post(client, server, &path, body).await
}

async fn body_json(resp: reqwest::Response) -> Value {
    let bytes = resp.bytes().await.unwrap();
    serde_json::from_slice(&bytes)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&bytes)))
}

async fn set_faults(client: &reqwest::Client, server: &MockServer, faults: Value) {
    let resp = client
        .put(format!("{}/_mock/faults", server.url()))
        .body(faults.to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200, "{}", resp.text().await.unwrap());
}

fn header<'a>(resp: &'a reqwest::Response, name: &str) -> &'a str {
    resp.headers()
        .get(name)
        .unwrap_or_else(|| panic!("missing header {name}"))
        .to_str()
        .unwrap()
}

/// Data-only SSE with CRLF framing, no `event:` lines, no terminator.
fn sse_json(text: &str) -> Vec<Value> {
    assert!(!text.contains("[DONE]"));
    text.split("\r\n\r\n")
        .filter(|e| !e.is_empty())
        .map(|e| {
            let data = e
                .strip_prefix("data: ")
                .unwrap_or_else(|| panic!("not a data event: {e:?}"));
            serde_json::from_str(data).unwrap()
        })
        .collect()
}

fn hello() -> Value {
    json!({
        "systemInstruction": {"parts": [{"text": "You are terse."}]},
        "contents": [{"role": "user", "parts": [{"text": "Say hello to the gateway tests."}]}]
    })
}

fn with(mut base: Value, extra: Value) -> Value {
    for (k, v) in extra.as_object().unwrap() {
        base[k] = v.clone();
    }
    base
}

fn assert_google_error(body: &Value, code: u16, status: &str) {
    let error = &body["error"];
    assert_eq!(error["code"], code, "{body}");
    assert_eq!(error["status"], status, "{body}");
    assert!(
        error["message"].as_str().is_some_and(|m| !m.is_empty()),
        "{body}"
    );
}

fn weather_tools() -> Value {
    json!([{"functionDeclarations": [
        {"name": "get_weather", "description": "Current weather",
         "parametersJsonSchema": {"type": "object", "properties": {
             "city": {"type": "string"}, "days": {"type": "integer"}
         }, "required": ["city", "days"]}},
        {"name": "get_time",
         "parameters": {"type": "OBJECT", "properties": {"tz": {"type": "STRING"}}, "required": ["tz"]}}
    ]}])
}

fn text_of(response: &Value) -> String {
    response["candidates"][0]["content"]["parts"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|p| p["text"].as_str())
        .collect()
}

// ---------------------------------------------------------------------------------
// generateContent

#[tokio::test]
async fn generate_content_has_the_gemini_shape() {
    let server = start_default().await;
    let resp = generate(&client(), &server, "gemini-2.0-flash", &hello()).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(
        header(&resp, "content-type"),
        "application/json; charset=UTF-8"
    );
    assert_eq!(header(&resp, "server"), "scaffolding on HTTPServer2");
    assert!(header(&resp, "server-timing").starts_with("gfet4t7; dur="));
    let body = body_json(resp).await;

    let candidate = &body["candidates"][0];
    assert_eq!(candidate["content"]["role"], "model");
    assert_eq!(candidate["finishReason"], "STOP");
    assert!(
        candidate.get("index").is_none(),
        "index is left out for candidate 0"
    );
    assert!(text_of(&body).starts_with("Hello from mock model gemini-2.0-flash."));
    let usage = &body["usageMetadata"];
    let (p, c) = (
        usage["promptTokenCount"].as_u64().unwrap(),
        usage["candidatesTokenCount"].as_u64().unwrap(),
    );
    assert_eq!(usage["totalTokenCount"], p + c);
    assert_eq!(usage["promptTokensDetails"][0]["modality"], "TEXT");
    assert_eq!(body["modelVersion"], "gemini-2.0-flash");
    assert_eq!(body["responseId"].as_str().unwrap().len(), 23);
}

#[tokio::test]
async fn the_recorded_path_names_the_model() {
    let server = start_default().await;
    generate(&client(), &server, "gemini-2.5-flash", &hello()).await;
    stream(&client(), &server, "gemini-2.5-pro", &hello()).await;
    let recorded = server.requests();
    assert_eq!(
        recorded[0].path,
        "/v1beta/models/gemini-2.5-flash:generateContent"
    );
    assert_eq!(
        recorded[1].path,
        "/v1beta/models/gemini-2.5-pro:streamGenerateContent?alt=sse"
    );
    assert_eq!(server.stats().generate_content, 2);
}

#[tokio::test]
async fn max_output_tokens_and_stop_sequences_shape_the_text() {
    let server = start_default().await;
    let client = client();
    let request = with(hello(), json!({"generationConfig": {"maxOutputTokens": 3}}));
    let body = body_json(generate(&client, &server, "g", &request).await).await;
    assert_eq!(body["candidates"][0]["finishReason"], "MAX_TOKENS");
    assert_eq!(text_of(&body).len(), 12);

    // snake_case is accepted as well.
    let request = with(
        hello(),
        json!({"generation_config": {"stop_sequences": ["mock"]}}),
    );
    let body = body_json(generate(&client, &server, "g", &request).await).await;
    assert_eq!(body["candidates"][0]["finishReason"], "STOP");
    assert_eq!(text_of(&body), "Hello from ");
}

#[tokio::test]
async fn stream_sends_whole_responses_with_usage_on_every_chunk() {
    let server = start_default().await;
    let resp = stream(&client(), &server, "gemini-2.0-flash", &hello()).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(header(&resp, "content-type"), "text/event-stream");
    assert_eq!(header(&resp, "content-disposition"), "attachment");
    let chunks = sse_json(&resp.text().await.unwrap());
    assert_eq!(chunks.len(), 8);
    let last = chunks.len() - 1;
    for (i, chunk) in chunks.iter().enumerate() {
        assert_eq!(chunk["modelVersion"], "gemini-2.0-flash");
        assert_eq!(chunk["responseId"], chunks[0]["responseId"]);
        assert!(chunk["usageMetadata"]["promptTokenCount"].is_u64());
        let finish = &chunk["candidates"][0]["finishReason"];
        if i == last {
            assert_eq!(finish, "STOP");
            assert!(chunk["usageMetadata"]["candidatesTokenCount"].is_u64());
        } else {
            assert!(finish.is_null(), "finishReason only on the last chunk");
            assert!(chunk["usageMetadata"].get("candidatesTokenCount").is_none());
        }
    }
    let text: String = chunks.iter().map(text_of).collect();
    let plain = body_json(generate(&client(), &server, "gemini-2.0-flash", &hello()).await).await;
    assert_eq!(text, text_of(&plain), "text is incremental, not cumulative");
    assert_eq!(chunks[last]["usageMetadata"], plain["usageMetadata"]);
}

#[tokio::test]
async fn stream_without_alt_sse_is_one_json_array() {
    let server = start_default().await;
    let resp = post(
        &client(),
        &server,
        "/v1beta/models/g:streamGenerateContent",
        &hello(),
    )
    .await;
    assert_eq!(resp.status(), 200);
    assert_eq!(
        header(&resp, "content-type"),
        "application/json; charset=UTF-8"
    );
    let array = body_json(resp).await;
    let array = array.as_array().unwrap();
    assert_eq!(array.len(), 8);
    assert_eq!(array[7]["candidates"][0]["finishReason"], "STOP");
}

#[tokio::test]
async fn function_declarations_produce_a_whole_function_call() {
    let server = start_default().await;
    let client = client();
    let request = with(hello(), json!({"tools": weather_tools()}));
    let body = body_json(generate(&client, &server, "gemini-2.0-flash", &request).await).await;
    let candidate = &body["candidates"][0];
    assert_eq!(
        candidate["finishReason"], "STOP",
        "no tool_calls finish reason"
    );
    let call = &candidate["content"]["parts"][0]["functionCall"];
    assert_eq!(call["name"], "get_weather");
    assert_eq!(call["args"], json!({"city": "mock", "days": 1}));
    assert!(call.get("id").is_none(), "the Gemini API sends no id");
    assert!(candidate["content"]["parts"][0]
        .get("thoughtSignature")
        .is_none());

    // ANY with allowedFunctionNames, a `parameters` Schema with upper-case types.
    let request = with(
        hello(),
        json!({"tools": weather_tools(), "toolConfig": {"functionCallingConfig": {
            "mode": "ANY", "allowedFunctionNames": ["get_time"]}}}),
    );
    let body = body_json(generate(&client, &server, "g", &request).await).await;
    let call = &body["candidates"][0]["content"]["parts"][0]["functionCall"];
    assert_eq!(call["name"], "get_time");
    assert_eq!(call["args"], json!({"tz": "mock"}));

    // NONE: text.
    let request = with(
        hello(),
        json!({"tools": weather_tools(), "tool_config": {"function_calling_config": {"mode": "NONE"}}}),
    );
    let body = body_json(generate(&client, &server, "g", &request).await).await;
    assert!(text_of(&body).starts_with("Hello"));

    // Streamed: one chunk holding the whole call.
    let request = with(hello(), json!({"tools": weather_tools()}));
    let chunks = sse_json(
        &stream(&client, &server, "g", &request)
            .await
            .text()
            .await
            .unwrap(),
    );
    assert_eq!(chunks.len(), 1);
    assert_eq!(chunks[0]["candidates"][0]["finishReason"], "STOP");
    assert_eq!(
        chunks[0]["candidates"][0]["content"]["parts"][0]["functionCall"]["args"],
        json!({"city": "mock", "days": 1})
    );
}

#[tokio::test]
async fn a_function_response_is_answered_with_text_that_quotes_it() {
    let server = start_default().await;
    let request = json!({
        "contents": [
            {"role": "user", "parts": [{"text": "Weather in Paris?"}]},
            {"role": "model", "parts": [{"functionCall": {"name": "get_weather", "args": {"city": "Paris"}}}]},
            {"role": "user", "parts": [{"functionResponse": {"name": "get_weather", "response": {"output": {"temp_c": 18}}}}]}
        ],
        "tools": weather_tools()
    });
    let body = body_json(generate(&client(), &server, "g", &request).await).await;
    let text = text_of(&body);
    assert!(
        text.contains("received the tool result: {\"temp_c\":18}"),
        "{text}"
    );
}

#[tokio::test]
async fn gemini_3_function_calls_need_their_thought_signature_back() {
    let server = start_default().await;
    let client = client();
    let model = "gemini-3-pro-preview";
    let request = with(hello(), json!({"tools": weather_tools()}));
    let body = body_json(generate(&client, &server, model, &request).await).await;
    let part = body["candidates"][0]["content"]["parts"][0].clone();
    let signature = part["thoughtSignature"].as_str().unwrap().to_owned();

    let follow_up = |call_part: Value| {
        json!({
            "contents": [
                hello()["contents"][0].clone(),
                {"role": "model", "parts": [call_part]},
                {"role": "user", "parts": [{"functionResponse": {"name": "get_weather", "response": {"output": "sunny"}}}]}
            ],
            "tools": weather_tools()
        })
    };
    let resp = generate(&client, &server, model, &follow_up(part.clone())).await;
    assert_eq!(resp.status(), 200);
    assert!(text_of(&body_json(resp).await).contains("tool result: sunny"));

    let mut unsigned = part.clone();
    unsigned.as_object_mut().unwrap().remove("thoughtSignature");
    let resp = generate(&client, &server, model, &follow_up(unsigned.clone())).await;
    assert_eq!(resp.status(), 400);
    let error = body_json(resp).await;
    assert_google_error(&error, 400, "INVALID_ARGUMENT");
    assert!(error["error"]["message"]
        .as_str()
        .unwrap()
        .contains("thought_signature"));

    let mut wrong = part.clone();
    wrong["thoughtSignature"] = Value::from(format!("x{signature}"));
    let resp = generate(&client, &server, model, &follow_up(wrong)).await;
    assert_eq!(resp.status(), 400);

    let mut skipped = part;
    skipped["thoughtSignature"] = Value::from("skip_thought_signature_validator");
    assert_eq!(
        generate(&client, &server, model, &follow_up(skipped))
            .await
            .status(),
        200
    );

    // Older models do not check.
    assert_eq!(
        generate(&client, &server, "gemini-2.5-flash", &follow_up(unsigned))
            .await
            .status(),
        200
    );
}

#[tokio::test]
async fn invalid_requests_get_400_invalid_argument() {
    let server = start_default().await;
    let client = client();
    let cases = [
        (json!({}), "contents is not specified"),
        (json!({"contents": []}), "contents is not specified"),
        (
            json!({"contents": [{"role": "assistant", "parts": [{"text": "x"}]}]}),
            "valid role",
        ),
        (
            json!({"contents": [{"role": "user", "parts": []}]}),
            "parts must not be empty",
        ),
        (
            with(hello(), json!({"messages": []})),
            "Unknown name \"messages\"",
        ),
        (
            with(hello(), json!({"generationConfig": {"max_tokens": 5}})),
            "Unknown name \"max_tokens\"",
        ),
    ];
    for (body, mentions) in cases {
        let resp = generate(&client, &server, "g", &body).await;
        assert_eq!(resp.status(), 400, "{body}");
        let error = body_json(resp).await;
        assert_google_error(&error, 400, "INVALID_ARGUMENT");
        let message = error["error"]["message"].as_str().unwrap();
        assert!(message.contains(mentions), "{message}");
    }
}

#[tokio::test]
async fn api_key_in_header_or_query() {
    let server = start(MockOptions {
        api_key: Some("AIza-mock".into()),
        ..MockOptions::default()
    })
    .await;
    let client = client();
    let url = format!("{}/v1beta/models/g:generateContent", server.url());
    let resp = client
        .post(&url)
        .body(hello().to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 403);
    assert_google_error(&body_json(resp).await, 403, "PERMISSION_DENIED");

    let resp = client
        .post(&url)
        .header("x-goog-api-key", "wrong")
        .body(hello().to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 400);
    let error = body_json(resp).await;
    assert_google_error(&error, 400, "INVALID_ARGUMENT");
    assert_eq!(error["error"]["details"][0]["reason"], "API_KEY_INVALID");

    let resp = client
        .post(&url)
        .header("x-goog-api-key", "AIza-mock")
        .body(hello().to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let resp = client
        .post(format!("{url}?key=AIza-mock"))
        .body(hello().to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
}

#[tokio::test]
async fn models_count_tokens_and_unknown_paths() {
    let server = start_default().await;
    let client = client();
    let list = body_json(
        client
            .get(format!("{}/v1beta/models", server.url()))
            .send()
            .await
            .unwrap(),
    )
    .await;
    let models = list["models"].as_array().unwrap();
    assert!(models
        .iter()
        .all(|m| m["name"].as_str().unwrap().starts_with("models/")));
    assert!(models[0]["supportedGenerationMethods"].is_array());
    let model = body_json(
        client
            .get(format!("{}/v1beta/models/gemini-x", server.url()))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(model["name"], "models/gemini-x");

    let body = json!({"contents": [{"parts": [{"text": "12345678"}]}]});
    let count =
        body_json(post(&client, &server, "/v1beta/models/g:countTokens", &body).await).await;
    assert_eq!(count["totalTokens"], 2);

    let resp = post(&client, &server, "/v1beta/models/g:nope", &hello()).await;
    assert_eq!(resp.status(), 404);
    assert_google_error(&body_json(resp).await, 404, "NOT_FOUND");
    // v1 works like v1beta.
    assert_eq!(
        generate(&client, &server, "g", &hello()).await.status(),
        200
    );
    let resp = post(&client, &server, "/v1/models/g:generateContent", &hello()).await;
    assert_eq!(resp.status(), 200);
}

// ---------------------------------------------------------------------------------
// Faults

#[tokio::test]
async fn error_faults_use_google_status_names() {
    let server = start_default().await;
    let client = client();
    for (status, name) in [
        (400, "INVALID_ARGUMENT"),
        (403, "PERMISSION_DENIED"),
        (404, "NOT_FOUND"),
        (429, "RESOURCE_EXHAUSTED"),
        (500, "INTERNAL"),
        (503, "UNAVAILABLE"),
        (504, "DEADLINE_EXCEEDED"),
    ] {
        set_faults(
            &client,
            &server,
            json!({"error_rate": 1.0, "error_status": status}),
        )
        .await;
        let resp = generate(&client, &server, "g", &hello()).await;
        assert_eq!(resp.status(), status);
        assert_google_error(&body_json(resp).await, status, name);
    }
}

#[tokio::test]
async fn rate_limit_fault_carries_retry_info_in_the_body_only() {
    let server = start_default().await;
    let client = client();
    set_faults(
        &client,
        &server,
        json!({"rate_limit_rate": 1.0, "retry_after_secs": 53, "should_retry": true}),
    )
    .await;
    let resp = generate(&client, &server, "g", &hello()).await;
    assert_eq!(resp.status(), 429);
    assert!(resp.headers().get("retry-after").is_none());
    assert!(
        resp.headers().get("x-should-retry").is_none(),
        "Google sends none"
    );
    let body = body_json(resp).await;
    assert_google_error(&body, 429, "RESOURCE_EXHAUSTED");
    let details = body["error"]["details"].as_array().unwrap();
    let retry = details
        .iter()
        .find(|d| d["@type"] == "type.googleapis.com/google.rpc.RetryInfo")
        .unwrap();
    assert_eq!(retry["retryDelay"], "53s");
}

#[tokio::test]
async fn stream_error_after_chunks_sends_an_error_object_and_ends_cleanly() {
    let server = start_default().await;
    let client = client();
    set_faults(
        &client,
        &server,
        json!({"chunks": 5, "stream_error_after_chunks": 2}),
    )
    .await;
    let resp = stream(&client, &server, "g", &hello()).await;
    assert_eq!(resp.status(), 200);
    let chunks = sse_json(&resp.text().await.unwrap());
    assert_eq!(chunks.len(), 3);
    assert!(chunks[..2]
        .iter()
        .all(|c| c["candidates"][0]["finishReason"].is_null()));
    assert_google_error(&chunks[2], 503, "UNAVAILABLE");

    // 0: the very first event is the error.
    set_faults(&client, &server, json!({"stream_error_after_chunks": 0})).await;
    let chunks = sse_json(
        &stream(&client, &server, "g", &hello())
            .await
            .text()
            .await
            .unwrap(),
    );
    assert_eq!(chunks.len(), 1);
    assert_google_error(&chunks[0], 503, "UNAVAILABLE");

    // The JSON-array form stays valid JSON.
    set_faults(&client, &server, json!({"stream_error_after_chunks": 1})).await;
    let resp = post(
        &client,
        &server,
        "/v1beta/models/g:streamGenerateContent",
        &hello(),
    )
    .await;
    let array = body_json(resp).await;
    assert_eq!(array.as_array().unwrap().len(), 2);
    assert_google_error(&array[1], 503, "UNAVAILABLE");
    set_faults(&client, &server, json!({"stream_error_after_chunks": 0})).await;
    let resp = post(
        &client,
        &server,
        "/v1beta/models/g:streamGenerateContent",
        &hello(),
    )
    .await;
    let array = body_json(resp).await;
    assert_google_error(&array[0], 503, "UNAVAILABLE");
    assert_eq!(server.stats().faults.stream_error, 4);
}

#[tokio::test]
async fn same_seed_gives_the_same_stream() {
    let seeded = |seed| MockOptions {
        seed,
        ..MockOptions::default()
    };
    let (a, b, other) = (
        start(seeded(3)).await,
        start(seeded(3)).await,
        start(seeded(4)).await,
    );
    let client = client();
    let from_a = stream(&client, &a, "g", &hello())
        .await
        .text()
        .await
        .unwrap();
    assert_eq!(
        from_a,
        stream(&client, &b, "g", &hello())
            .await
            .text()
            .await
            .unwrap()
    );
    assert_ne!(
        from_a,
        stream(&client, &other, "g", &hello())
            .await
            .text()
            .await
            .unwrap()
    );
}
