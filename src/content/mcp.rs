//! MCP servers (docs/configuration.md, "MCP servers"): reading a JSON-RPC body to route `tools/call` by
//! tool name, argument limits on JSON values, and the shapes of MCP replies.

use serde_json::{json, Value};

/// A limit on the size of JSON values (`arg_limits`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ArgLimit {
    /// RFC 6901 pointers into the whole body.
    pub pointers: Vec<String>,
    /// Fewest characters (Unicode scalar values) in total.
    pub min_chars: Option<u64>,
    /// Most characters in total.
    pub max_chars: Option<u64>,
}

/// JSON-RPC "Invalid Request".
pub const INVALID_REQUEST: i64 = -32600;

/// JSON-RPC "Parse error".
pub const PARSE_ERROR: i64 = -32700;

/// The tool a JSON-RPC message calls: `params.name` of a `tools/call`.
pub fn tool_call(message: &Value) -> Option<&str> {
    if message.get("method")?.as_str()? != "tools/call" {
        return None;
    }
    message.get("params")?.get("name")?.as_str()
}

/// Whether a body is a JSON-RPC batch that calls a tool. Such batches are
/// refused: one request, one call, so no call escapes its tool's limits.
pub fn batch_calls_a_tool(body: &Value) -> bool {
    body.as_array()
        .is_some_and(|items| items.iter().any(|m| tool_call(m).is_some()))
}

/// The `id` of a JSON-RPC request (`null` for notifications, batches, non-objects).
pub fn request_id(body: &Value) -> Value {
    body.get("id").cloned().unwrap_or(Value::Null)
}

/// Whether two JSON-RPC ids are one id, compared by value: `0`, `-0` and
/// `0.0` are one id, as are `1` and `1.0`; strings compare exactly.
pub fn same_id(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => {
            if let (Some(x), Some(y)) = (x.as_i64(), y.as_i64()) {
                return x == y;
            }
            if let (Some(x), Some(y)) = (x.as_u64(), y.as_u64()) {
                return x == y;
            }
            matches!((x.as_f64(), y.as_f64()), (Some(x), Some(y)) if x == y)
        }
        _ => a == b,
    }
}

/// Whether a request id is one every JSON-RPC peer reads alike: a string,
/// an integer-valued number, or null (absent).
pub fn plain_id(id: &Value) -> bool {
    match id {
        Value::Null | Value::String(_) => true,
        Value::Number(n) => {
            n.is_i64()
                || n.is_u64()
                || n.as_f64()
                    .is_some_and(|f| f.is_finite() && f.fract() == 0.0)
        }
        _ => false,
    }
}

/// Characters (Unicode scalar values) of every string inside `value`.
fn chars_in(value: &Value) -> u64 {
    match value {
        Value::String(s) => s.chars().count() as u64,
        Value::Array(items) => items.iter().map(chars_in).sum(),
        Value::Object(map) => map.values().map(chars_in).sum(),
        _ => 0,
    }
}

/// The name shown for a rule: the last segment of each pointer (`/params/arguments/text` → `text`).
fn label(pointers: &[String]) -> String {
    let names: Vec<String> = pointers
        .iter()
        .map(|p| {
            p.rsplit('/')
                .next()
                .unwrap_or("")
                .replace("~1", "/")
                .replace("~0", "~")
        })
        .collect();
    names.join("+")
}

/// Checks every argument limit; the message says which and by how much.
pub fn check_args(limits: &[ArgLimit], body: &Value, subject: &str) -> Result<(), String> {
    for rule in limits {
        let got: u64 = rule
            .pointers
            .iter()
            .filter_map(|p| body.pointer(p))
            .map(chars_in)
            .sum();
        let too_few = rule.min_chars.is_some_and(|min| got < min);
        let too_many = rule.max_chars.is_some_and(|max| got > max);
        if !too_few && !too_many {
            continue;
        }
        let name = label(&rule.pointers);
        let bounds = match (rule.min_chars, rule.max_chars) {
            (Some(min), Some(max)) => format!("{min} to {max} characters"),
            (Some(min), None) => format!("at least {min} characters"),
            (None, Some(max)) => format!("at most {max} characters"),
            (None, None) => String::new(),
        };
        return Err(format!("{subject}: {name} must be {bounds} (got {got})"));
    }
    Ok(())
}

/// A tool result reporting an error (`isError: true`) with a text for people.
pub fn tool_error(id: &Value, text: &str) -> String {
    json!({
        "jsonrpc": "2.0",
        "id": id,
        "result": { "content": [{ "type": "text", "text": text }], "isError": true },
    })
    .to_string()
}

/// A JSON-RPC error object (parse errors, refused batches, oversized bodies).
pub fn rpc_error(id: &Value, code: i64, message: &str) -> String {
    json!({ "jsonrpc": "2.0", "id": id, "error": { "code": code, "message": message } }).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_compare_by_value() {
        let id = |t: &str| serde_json::from_str::<Value>(t).unwrap();
        for (a, b) in [
            ("0", "-0"),
            ("0", "0.0"),
            ("-0", "0.0"),
            ("1", "1.0"),
            ("\"a\"", "\"a\""),
        ] {
            assert!(same_id(&id(a), &id(b)), "{a} {b}");
        }
        for (a, b) in [("1", "2"), ("1", "\"1\""), ("null", "0"), ("1.5", "1")] {
            assert!(!same_id(&id(a), &id(b)), "{a} {b}");
        }
        for ok in ["1", "-0", "1.0", "\"x\"", "null", "18446744073709551615"] {
            assert!(plain_id(&id(ok)), "{ok}");
        }
        for bad in ["1.5", "{}", "[1]", "true"] {
            assert!(!plain_id(&id(bad)), "{bad}");
        }
    }

    #[test]
    fn tool_calls_are_recognised() {
        let call = json!({"jsonrpc":"2.0","id":7,"method":"tools/call","params":{"name":"generate_media","arguments":{}}});
        assert_eq!(tool_call(&call), Some("generate_media"));
        assert_eq!(request_id(&call), json!(7));
        assert_eq!(
            tool_call(&json!({"jsonrpc":"2.0","id":1,"method":"tools/list"})),
            None
        );
        assert_eq!(
            tool_call(&json!({"method":"tools/call","params":{"name":3}})),
            None
        );
        assert!(batch_calls_a_tool(
            &json!([{"method":"notifications/initialized"}, call])
        ));
        assert!(!batch_calls_a_tool(
            &json!([{"method":"notifications/initialized"}])
        ));
        assert_eq!(request_id(&json!([1])), Value::Null);
    }

    #[test]
    fn pointer_rules_sum_characters_over_every_selected_string() {
        let rules = [ArgLimit {
            pointers: vec!["/params/arguments/text".into()],
            min_chars: Some(5),
            max_chars: Some(5000),
        }];
        let body = |text: Value| json!({"params":{"arguments":{"text": text}}});
        assert_eq!(
            check_args(&rules, &body(json!("héllo")), "generate_dialogue"),
            Ok(())
        );
        assert_eq!(
            check_args(&rules, &body(json!("abc")), "generate_dialogue"),
            Err("generate_dialogue: text must be 5 to 5000 characters (got 3)".into())
        );
        // Lines of a dialogue: every string counts.
        assert_eq!(
            check_args(&rules, &body(json!(["ab", {"line": "cde"}])), "d"),
            Ok(())
        );
        let absent = json!({"params":{"arguments":{}}});
        assert_eq!(
            check_args(&rules, &absent, "d"),
            Err("d: text must be 5 to 5000 characters (got 0)".into())
        );
        let two = ArgLimit {
            pointers: vec!["/a".into(), "/b~1c".into()],
            min_chars: None,
            max_chars: Some(3),
        };
        assert_eq!(
            check_args(&[two], &json!({"a":"xx","b/c":"yy"}), "r"),
            Err("r: a+b/c must be at most 3 characters (got 4)".into())
        );
    }

    #[test]
    fn reply_shapes() {
        assert_eq!(
            tool_error(&json!(7), "Rate limit exceeded. Try again in 42 s."),
            r#"{"jsonrpc":"2.0","id":7,"result":{"content":[{"type":"text","text":"Rate limit exceeded. Try again in 42 s."}],"isError":true}}"#
        );
        assert_eq!(
            rpc_error(&Value::Null, -32700, "Parse error"),
            r#"{"jsonrpc":"2.0","id":null,"error":{"code":-32700,"message":"Parse error"}}"#
        );
    }
}
