//! Configuration data: documents an outside system sets for a service, a component within a
//! service, or one machine (`PUT /v1/config/...`), versioned by the controller, merged into
//! each machine's effective configuration and published to the machines whose effective
//! configuration changed (see [`super::core::ControllerCore::set_config`]).
//!
//! Every change gets the next cluster-wide version. A scope's current document is its newest
//! change (a deletion is a change without a document). A machine's effective configuration is
//! its service's document, then its component's, then its own, each merged over the one before
//! as a JSON merge patch (RFC 7386: objects merge key by key, `null` removes a key, anything
//! else replaces), so an override names only what it changes.
//!
//! Pure: no I/O. The store keeps the newest [`CONFIG_HISTORY_KEPT`] changes of each scope.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::config;
use crate::limits::{CONFIG_DOC_BYTES_MAX, CONFIG_DOC_DEPTH_MAX};

/// What a document applies to.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Scope {
    Service(String),
    Component { service: String, component: String },
    Machine(String),
}

/// Why a path names no configuration scope (the API answers 404 with it). Names are cut to
/// their first 64 characters.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ScopeError {
    #[error("unknown service {0:?} (one of {services})", services = config::SERVICES.join(", "))]
    UnknownService(String),
    #[error("unknown component {0:?} (one of {components})", components = config::COMPONENTS.join(", "))]
    UnknownComponent(String),
    #[error("machine name: {0}")]
    MachineName(String),
    #[error(
        "{0:?} is not a configuration scope: service/SERVICE, \
         component/SERVICE/COMPONENT or machine/NAME"
    )]
    NotAScope(String),
}

/// Why a configuration document was refused (the API answers 400 with it).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum DocError {
    #[error("the document is {0} bytes; at most {CONFIG_DOC_BYTES_MAX}")]
    TooLarge(usize),
    #[error("not UTF-8: {0}")]
    NotUtf8(String),
    #[error("not TOML: {0}")]
    NotToml(String),
    #[error("TOML that has no JSON form: {0}")]
    TomlWithoutJson(String),
    #[error("not JSON: {0}")]
    NotJson(String),
    #[error("the document must be an object (a table of keys)")]
    NotAnObject,
    #[error("nested more than {CONFIG_DOC_DEPTH_MAX} levels deep")]
    TooDeep,
}

impl Scope {
    /// From the path after `/v1/config/`: `service/S`, `component/S/C` or `machine/NAME`.
    pub fn parse(path: &str) -> Result<Scope, ScopeError> {
        let parts: Vec<&str> = path.split('/').collect();
        let service = |s: &str| {
            if config::SERVICES.contains(&s) {
                Ok(s.to_owned())
            } else {
                Err(ScopeError::UnknownService(short(s)))
            }
        };
        match parts.as_slice() {
            ["service", s] => Ok(Scope::Service(service(s)?)),
            ["component", s, c] => {
                if !config::COMPONENTS.contains(c) {
                    return Err(ScopeError::UnknownComponent(short(c)));
                }
                Ok(Scope::Component {
                    service: service(s)?,
                    component: (*c).to_owned(),
                })
            }
            ["machine", name] => {
                config::check_name(name).map_err(|e| ScopeError::MachineName(e.to_string()))?;
                Ok(Scope::Machine((*name).to_owned()))
            }
            _ => Err(ScopeError::NotAScope(short(path))),
        }
    }

    /// The stored key, which is also the path after `/v1/config/`.
    pub fn key(&self) -> String {
        match self {
            Scope::Service(s) => format!("service/{s}"),
            Scope::Component { service, component } => format!("component/{service}/{component}"),
            Scope::Machine(n) => format!("machine/{n}"),
        }
    }

    /// Whether a machine of this service, component and name takes this scope's document.
    pub fn covers(&self, service: &str, component: &str, name: &str) -> bool {
        match self {
            Scope::Service(s) => s == service,
            Scope::Component {
                service: s,
                component: c,
            } => s == service && c == component,
            Scope::Machine(n) => n == name,
        }
    }
}

/// One change of one scope, as stored and as `history` lists it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConfigChange {
    pub version: u64,
    /// [`Scope::key`].
    pub scope: String,
    /// The document (compact JSON, keys sorted); `None`: the scope's document was deleted.
    pub doc: Option<String>,
    pub at_ms: u64,
    /// `rollback to N` for a rollback; what an operator gave otherwise.
    pub note: Option<String>,
}

/// The current document of every scope, and the last version handed out.
#[derive(Clone, Debug, Default)]
pub struct ConfigData {
    current: BTreeMap<String, (u64, Value)>,
    last_version: u64,
}

impl ConfigData {
    /// From the newest stored change of each scope (and `last_version`, the highest version
    /// ever stored, which a deletion may hold).
    pub fn open(newest: Vec<ConfigChange>) -> ConfigData {
        let mut d = ConfigData::default();
        for c in newest {
            d.last_version = d.last_version.max(c.version);
            if let Some(doc) = c.doc.as_deref().and_then(|t| serde_json::from_str(t).ok()) {
                d.current.insert(c.scope, (c.version, doc));
            }
        }
        d
    }

    pub fn last_version(&self) -> u64 {
        self.last_version
    }

    /// The current document of `scope` and its version.
    pub fn get(&self, scope: &Scope) -> Option<(u64, &Value)> {
        self.current.get(&scope.key()).map(|(v, d)| (*v, d))
    }

    /// Records a change (a new document, or `None` to delete it) under the next version.
    pub fn change(
        &mut self,
        scope: &Scope,
        doc: Option<Value>,
        note: Option<String>,
        now_ms: u64,
    ) -> ConfigChange {
        self.last_version += 1;
        let version = self.last_version;
        let key = scope.key();
        let text = doc.as_ref().map(canonical);
        match doc {
            Some(d) => {
                self.current.insert(key.clone(), (version, d));
            }
            None => {
                self.current.remove(&key);
            }
        }
        ConfigChange {
            version,
            scope: key,
            doc: text,
            at_ms: now_ms,
            note,
        }
    }

    /// A machine's effective configuration: service, then component, then machine, merged;
    /// `None` when none of the three has a document.
    pub fn effective(&self, service: &str, component: &str, name: &str) -> Option<Value> {
        let layers = [
            Scope::Service(service.to_owned()),
            Scope::Component {
                service: service.to_owned(),
                component: component.to_owned(),
            },
            Scope::Machine(name.to_owned()),
        ];
        let mut out: Option<Value> = None;
        for l in &layers {
            if let Some((_, doc)) = self.get(l) {
                let base = out.get_or_insert_with(|| Value::Object(Default::default()));
                merge(base, doc);
            }
        }
        out
    }
}

/// RFC 7386 JSON merge patch of `patch` onto `target`.
pub fn merge(target: &mut Value, patch: &Value) {
    let Value::Object(p) = patch else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = Value::Object(Default::default());
    }
    let t = target.as_object_mut().expect("made an object");
    for (k, v) in p {
        if v.is_null() {
            t.remove(k);
        } else {
            merge(t.entry(k.clone()).or_insert(Value::Null), v);
        }
    }
}

/// Compact JSON with keys sorted (serde_json's map is ordered): the bytes that are published,
/// hashed and written.
pub fn canonical(v: &Value) -> String {
    serde_json::to_string(v).expect("a JSON value always serializes")
}

/// A document as `PUT` takes it: JSON (default) or TOML (`toml` true), at most
/// [`CONFIG_DOC_BYTES_MAX`] bytes, an object at the top, nested at most [`CONFIG_DOC_DEPTH_MAX`] deep. The
/// error says what is wrong, for a 400.
pub fn parse_doc(bytes: &[u8], toml: bool) -> Result<Value, DocError> {
    if bytes.len() > CONFIG_DOC_BYTES_MAX {
        return Err(DocError::TooLarge(bytes.len()));
    }
    let text = std::str::from_utf8(bytes).map_err(|e| DocError::NotUtf8(e.to_string()))?;
    let v: Value = if toml {
        let t: toml::Table = toml::from_str(text).map_err(|e| DocError::NotToml(e.to_string()))?;
        serde_json::to_value(t).map_err(|e| DocError::TomlWithoutJson(e.to_string()))?
    } else {
        serde_json::from_str(text).map_err(|e| DocError::NotJson(e.to_string()))?
    };
    if !v.is_object() {
        return Err(DocError::NotAnObject);
    }
    if depth(&v) > CONFIG_DOC_DEPTH_MAX {
        return Err(DocError::TooDeep);
    }
    Ok(v)
}

fn depth(v: &Value) -> usize {
    match v {
        Value::Object(m) => 1 + m.values().map(depth).max().unwrap_or(0),
        Value::Array(a) => 1 + a.iter().map(depth).max().unwrap_or(0),
        _ => 0,
    }
}

fn short(s: &str) -> String {
    s.chars().take(64).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn effective_config_merges_service_then_component_then_machine() {
        let mut d = ConfigData::default();
        let svc = Scope::parse("service/voice").unwrap();
        let comp = Scope::parse("component/voice/call-router").unwrap();
        let one = Scope::parse("machine/cr-1").unwrap();
        assert_eq!(d.effective("voice", "call-router", "cr-1"), None);
        let c1 = d.change(
            &svc,
            Some(json!({"log": "info", "limits": {"calls": 100, "cps": 10}})),
            None,
            1,
        );
        let c2 = d.change(&comp, Some(json!({"limits": {"calls": 500}})), None, 2);
        let c3 = d.change(
            &one,
            Some(json!({"log": "debug", "limits": {"cps": null}})),
            None,
            3,
        );
        assert_eq!((c1.version, c2.version, c3.version), (1, 2, 3));
        assert_eq!(
            d.effective("voice", "call-router", "cr-1"),
            Some(json!({"log": "debug", "limits": {"calls": 500}}))
        );
        // Another router takes the component's document but not cr-1's.
        assert_eq!(
            d.effective("voice", "call-router", "cr-2"),
            Some(json!({"log": "info", "limits": {"calls": 500, "cps": 10}}))
        );
        // A media processor of the service only the service's.
        assert_eq!(
            d.effective("voice", "media-processor", "mp-1"),
            Some(json!({"log": "info", "limits": {"calls": 100, "cps": 10}}))
        );
        assert_eq!(d.effective("video", "call-router", "cr-9"), None);
        // Deleting the component's document is a change of its own.
        let c4 = d.change(&comp, None, None, 4);
        assert_eq!((c4.version, c4.doc), (4, None));
        assert_eq!(
            d.effective("voice", "call-router", "cr-2"),
            Some(json!({"log": "info", "limits": {"calls": 100, "cps": 10}}))
        );
        // Reopened from the newest change of each scope: the same, and versions go on.
        let reopened = ConfigData::open(vec![
            c1,
            c3,
            ConfigChange {
                version: 4,
                scope: comp.key(),
                doc: None,
                at_ms: 4,
                note: None,
            },
        ]);
        assert_eq!(reopened.last_version(), 4);
        assert_eq!(
            reopened.effective("voice", "call-router", "cr-1"),
            d.effective("voice", "call-router", "cr-1")
        );
    }

    #[test]
    fn a_bad_scope_or_document_is_refused_with_the_reason() {
        for (path, want) in [
            ("service/fax", "unknown service"),
            ("component/voice/toaster", "unknown component"),
            ("machine/", "machine name"),
            ("machines/w1", "not a configuration scope"),
            ("service/voice/extra", "not a configuration scope"),
        ] {
            let e = Scope::parse(path).unwrap_err();
            assert!(e.to_string().contains(want), "{path}: {e}");
        }
        for (doc, toml, want) in [
            (&b"[1, 2]"[..], false, "must be an object"),
            (b"{\"a\": ", false, "not JSON"),
            (b"a = ", true, "not TOML"),
            (b"\xff", false, "not UTF-8"),
        ] {
            let e = parse_doc(doc, toml).unwrap_err();
            assert!(e.to_string().contains(want), "{doc:?}: {e}");
        }
        let big = format!("{{\"a\": \"{}\"}}", "x".repeat(CONFIG_DOC_BYTES_MAX));
        assert!(parse_doc(big.as_bytes(), false)
            .unwrap_err()
            .to_string()
            .contains("at most"));
        let deep = format!(
            "{}{}",
            "{\"a\":".repeat(40),
            "1".to_owned() + &"}".repeat(40)
        );
        assert!(parse_doc(deep.as_bytes(), false)
            .unwrap_err()
            .to_string()
            .contains("levels deep"));
        assert_eq!(
            parse_doc(b"log = \"info\"\n[limits]\ncalls = 5\n", true).unwrap(),
            json!({"log": "info", "limits": {"calls": 5}})
        );
    }
}
