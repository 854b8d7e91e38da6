//! Structured random JSON: a valid document with values replaced, removed
//! or added at random places, so that most of it still parses as JSON and
//! reaches the format's own rules.

use proptest::prelude::*;
use serde_json::{Value, json};

/// One change to a JSON document; `at` picks a node modulo their number.
#[derive(Debug, Clone)]
pub(crate) enum JsonEdit {
    /// Put `value` where the node was.
    Replace(usize, Value),
    /// Remove the node from its object or array.
    Remove(usize),
    /// Add a member named `name` to an object (or an element to an array).
    Add(usize, String, Value),
}

fn leaf() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(|n| json!(n)),
        prop_oneof![
            Just(-1i64),
            Just(0),
            Just(1),
            Just(2),
            Just(3),
            Just(u32::MAX as i64 + 1)
        ]
        .prop_map(|n| json!(n)),
        any::<f64>().prop_map(|f| json!(f)),
        ".{0,40}".prop_map(Value::String),
        "[0-9a-f]{0,80}".prop_map(Value::String),
        Just(json!("")),
        Just(json!([])),
        Just(json!({})),
    ]
}

fn value() -> impl Strategy<Value = Value> {
    leaf().prop_recursive(2, 8, 4, |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            proptest::collection::btree_map("[a-z_]{1,10}", inner, 0..4)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// One to four edits.
pub(crate) fn json_edits() -> impl Strategy<Value = Vec<JsonEdit>> {
    let edit = prop_oneof![
        4 => (any::<usize>(), value()).prop_map(|(at, v)| JsonEdit::Replace(at, v)),
        2 => any::<usize>().prop_map(JsonEdit::Remove),
        1 => (any::<usize>(), "[a-z_]{1,12}", value()).prop_map(|(at, n, v)| JsonEdit::Add(at, n, v)),
    ];
    proptest::collection::vec(edit, 1..=4)
}

/// Every node's JSON pointer, the root first.
fn pointers(value: &Value, at: String, out: &mut Vec<String>) {
    out.push(at.clone());
    match value {
        Value::Object(map) => {
            for (name, child) in map {
                let name = name.replace('~', "~0").replace('/', "~1");
                pointers(child, format!("{at}/{name}"), out);
            }
        }
        Value::Array(items) => {
            for (i, child) in items.iter().enumerate() {
                pointers(child, format!("{at}/{i}"), out);
            }
        }
        _ => {}
    }
}

/// `original` with `edits` applied.
pub(crate) fn apply(original: &Value, edits: &[JsonEdit]) -> Value {
    let mut doc = original.clone();
    for edit in edits {
        let mut all = Vec::new();
        pointers(&doc, String::new(), &mut all);
        let pick = |at: usize| all[at % all.len()].clone();
        match edit {
            JsonEdit::Replace(at, value) => {
                let pointer = pick(*at);
                if let Some(node) = doc.pointer_mut(&pointer) {
                    *node = value.clone();
                }
            }
            JsonEdit::Remove(at) => {
                let pointer = pick(*at);
                let Some((parent, last)) = pointer.rsplit_once('/') else {
                    continue;
                };
                let last = last.replace("~1", "/").replace("~0", "~");
                match doc.pointer_mut(parent) {
                    Some(Value::Object(map)) => {
                        map.remove(&last);
                    }
                    Some(Value::Array(items)) => {
                        if let Ok(i) = last.parse::<usize>() {
                            if i < items.len() {
                                items.remove(i);
                            }
                        }
                    }
                    _ => {}
                }
            }
            JsonEdit::Add(at, name, value) => match doc.pointer_mut(&pick(*at)) {
                Some(Value::Object(map)) => {
                    map.insert(name.clone(), value.clone());
                }
                Some(Value::Array(items)) => items.push(value.clone()),
                _ => {}
            },
        }
    }
    doc
}
