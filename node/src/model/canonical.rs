//! Canonical JSON: sorted keys, no insignificant whitespace. Element bytes, message ids and
//! digests depend on it, so every node must produce exactly the same bytes for the same value.

use serde_json::Value;

pub fn to_canonical(v: &Value) -> Vec<u8> {
    let mut out = Vec::with_capacity(64);
    write(v, &mut out);
    out
}

fn write(v: &Value, out: &mut Vec<u8>) {
    match v {
        Value::Object(map) => {
            // serde_json's map is ordered unless `preserve_order` is enabled somewhere in the
            // build; sort anyway so that a feature flag elsewhere cannot change our bytes.
            let mut keys: Vec<&String> = map.keys().collect();
            keys.sort();
            out.push(b'{');
            for (i, k) in keys.into_iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                serde_json::to_writer(&mut *out, k).expect("string to vec");
                out.push(b':');
                write(&map[k], out);
            }
            out.push(b'}');
        }
        Value::Array(items) => {
            out.push(b'[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                write(item, out);
            }
            out.push(b']');
        }
        scalar => serde_json::to_writer(&mut *out, scalar).expect("scalar to vec"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn sorted_and_compact() {
        let v = json!({"b": [1, {"z": null, "a": "x"}], "a": true});
        assert_eq!(
            to_canonical(&v),
            br#"{"a":true,"b":[1,{"a":"x","z":null}]}"#.to_vec()
        );
    }
}
