//! Reading client request bodies as JSON values, with errors that name the
//! offending field (`messages[2].content[0].image_url.url`). Values are moved
//! out of their parents, so nothing is copied.

use serde_json::{Map, Value};

use crate::openai::InvalidRequest;

pub(crate) type Object = Map<String, Value>;

fn error(message: String, param: Option<String>) -> InvalidRequest {
    InvalidRequest { message, param }
}

/// The body as a JSON object.
pub(crate) fn parse_object(body: &[u8]) -> Result<Object, InvalidRequest> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Err(error("request body is empty".to_owned(), None));
    }
    match serde_json::from_slice::<Value>(body) {
        Ok(Value::Object(map)) => Ok(map),
        Ok(_) => Err(error("request body must be a JSON object".to_owned(), None)),
        Err(e) => Err(error(format!("request body is not valid JSON: {e}"), None)),
    }
}

/// `path.key`, or `key` at the top level.
pub(crate) fn at(path: &str, key: &str) -> String {
    if path.is_empty() {
        key.to_owned()
    } else {
        format!("{path}.{key}")
    }
}

/// `path[i]`.
pub(crate) fn idx(path: &str, i: usize) -> String {
    format!("{path}[{i}]")
}

pub(crate) fn missing(path: &str) -> InvalidRequest {
    error(
        format!("missing required parameter: '{path}'"),
        Some(path.to_owned()),
    )
}

pub(crate) fn invalid(path: &str, detail: &str) -> InvalidRequest {
    error(
        format!("invalid value for '{path}': {detail}"),
        Some(path.to_owned()),
    )
}

fn expected(path: &str, what: &str, got: &Value) -> InvalidRequest {
    let got = match got {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    };
    invalid(path, &format!("expected {what}, got {got}"))
}

/// Removes `key`; a JSON `null` counts as absent.
pub(crate) fn take(map: &mut Object, key: &str) -> Option<Value> {
    match map.remove(key) {
        None | Some(Value::Null) => None,
        some => some,
    }
}

pub(crate) fn string(v: Value, path: &str) -> Result<String, InvalidRequest> {
    match v {
        Value::String(s) => Ok(s),
        other => Err(expected(path, "a string", &other)),
    }
}

pub(crate) fn object(v: Value, path: &str) -> Result<Object, InvalidRequest> {
    match v {
        Value::Object(m) => Ok(m),
        other => Err(expected(path, "an object", &other)),
    }
}

pub(crate) fn array(v: Value, path: &str) -> Result<Vec<Value>, InvalidRequest> {
    match v {
        Value::Array(a) => Ok(a),
        other => Err(expected(path, "an array", &other)),
    }
}

pub(crate) fn boolean(v: Value, path: &str) -> Result<bool, InvalidRequest> {
    match v {
        Value::Bool(b) => Ok(b),
        other => Err(expected(path, "a boolean", &other)),
    }
}

pub(crate) fn unsigned(v: Value, path: &str) -> Result<u64, InvalidRequest> {
    match v.as_u64() {
        Some(n) => Ok(n),
        None => Err(expected(path, "a non-negative integer", &v)),
    }
}

pub(crate) fn integer(v: Value, path: &str) -> Result<i64, InvalidRequest> {
    match v.as_i64() {
        Some(n) => Ok(n),
        None => Err(expected(path, "an integer", &v)),
    }
}

pub(crate) fn number(v: Value, path: &str) -> Result<f64, InvalidRequest> {
    match v.as_f64() {
        Some(n) => Ok(n),
        None => Err(expected(path, "a number", &v)),
    }
}

/// A required field.
pub(crate) fn required(map: &mut Object, key: &str, path: &str) -> Result<Value, InvalidRequest> {
    take(map, key).ok_or_else(|| missing(&at(path, key)))
}

/// A required string field.
pub(crate) fn required_string(
    map: &mut Object,
    key: &str,
    path: &str,
) -> Result<String, InvalidRequest> {
    string(required(map, key, path)?, &at(path, key))
}

pub(crate) fn opt_string(
    map: &mut Object,
    key: &str,
    path: &str,
) -> Result<Option<String>, InvalidRequest> {
    take(map, key)
        .map(|v| string(v, &at(path, key)))
        .transpose()
}

pub(crate) fn opt_bool(
    map: &mut Object,
    key: &str,
    path: &str,
) -> Result<Option<bool>, InvalidRequest> {
    take(map, key)
        .map(|v| boolean(v, &at(path, key)))
        .transpose()
}

pub(crate) fn opt_unsigned(
    map: &mut Object,
    key: &str,
    path: &str,
) -> Result<Option<u64>, InvalidRequest> {
    take(map, key)
        .map(|v| unsigned(v, &at(path, key)))
        .transpose()
}

pub(crate) fn opt_number(
    map: &mut Object,
    key: &str,
    path: &str,
) -> Result<Option<f64>, InvalidRequest> {
    take(map, key)
        .map(|v| number(v, &at(path, key)))
        .transpose()
}

/// A string or an array of strings (OpenAI `stop`, Anthropic `stop_sequences`).
pub(crate) fn strings(v: Value, path: &str) -> Result<Vec<String>, InvalidRequest> {
    match v {
        Value::String(s) => Ok(vec![s]),
        Value::Array(items) => items
            .into_iter()
            .enumerate()
            .map(|(i, s)| string(s, &idx(path, i)))
            .collect(),
        other => Err(expected(path, "a string or an array of strings", &other)),
    }
}
