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

    /// Canonical bytes are a fixed point: what a datacenter commits, its peers parse and encode
    /// to the same bytes (their check refuses anything else). Found by the api_event fuzz
    /// targets: without serde_json's `float_roundtrip`, an integer too large for u64 became an
    /// f64 whose shortest form parsed back one ULP off, so peers refused the origin's record.
    #[test]
    fn canonical_bytes_survive_a_round_trip() {
        let fixed_point = |text: &str| {
            let once = to_canonical(&serde_json::from_str(text).unwrap());
            let twice = to_canonical(&serde_json::from_slice(&once).unwrap());
            assert_eq!(
                String::from_utf8_lossy(&once),
                String::from_utf8_lossy(&twice),
                "{text}"
            );
        };
        fixed_point(&format!("[1{}]", "8".repeat(93)));
        fixed_point("888888888808888888888888888888888888888888888888881");
        fixed_point("[1e308, 2.2250738585072014e-308, 5e-324, -0.0, 0.1, 18446744073709551616]");
    }

    proptest::proptest! {
        #[test]
        fn any_finite_float_is_a_fixed_point(x in proptest::num::f64::NORMAL | proptest::num::f64::SUBNORMAL) {
            let once = to_canonical(&json!([x]));
            let twice = to_canonical(&serde_json::from_slice(&once).unwrap());
            proptest::prop_assert_eq!(once, twice);
        }
    }
}
