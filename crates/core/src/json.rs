//! JSON text assembled from pieces that are JSON already (rows as
//! PostgreSQL's `row_to_json` wrote them, canonical primary keys), without
//! parsing them again.

/// `[a,b,...]` from JSON texts.
pub fn json_array<S: AsRef<str>>(items: impl IntoIterator<Item = S>) -> String {
    let mut out = String::from("[");
    for (i, item) in items.into_iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        out.push_str(item.as_ref());
    }
    out.push(']');
    out
}

#[cfg(test)]
mod tests {
    use super::json_array;

    #[test]
    fn joins_json_texts_into_an_array() {
        assert_eq!(json_array(Vec::<String>::new()), "[]");
        assert_eq!(json_array([r#"{"id":1}"#]), r#"[{"id":1}]"#);
        let items = [r#"{"id":1}"#, "null", r#"{"a":"x,y"}"#];
        let text = json_array(items);
        let parsed: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(
            parsed,
            serde_json::json!([{"id":1}, null, {"a":"x,y"}]),
            "{text}"
        );
    }
}
