//! The five event types, their processors (event -> data element, run once at the origin) and
//! their merge rules (element -> entry, run everywhere, never calling a processor).
//!
//! Elements are JSON, stored and sent as canonical bytes (sorted keys, no whitespace). Map
//! elements (`register`, `call`, `setting`) keep a version per member and merge member by member,
//! so concurrent events for one account at two datacenters both survive; `presence` and
//! `element` are single values, latest version wins. Merging is a join: commutative,
//! associative and idempotent, which is what makes every arrival order converge.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::canonical::to_canonical;
use super::version::Version;
use crate::limits::{ACCOUNT_BYTES_MAX, ELEMENT_BYTES_MAX, EVENT_NAME_BYTES_MAX, EXPIRES_S_MAX};

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EventType {
    Register,
    Call,
    Presence,
    Setting,
    Element,
}

impl EventType {
    pub const ALL: [EventType; 5] = [
        EventType::Register,
        EventType::Call,
        EventType::Presence,
        EventType::Setting,
        EventType::Element,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            EventType::Register => "register",
            EventType::Call => "call",
            EventType::Presence => "presence",
            EventType::Setting => "setting",
            EventType::Element => "element",
        }
    }

    /// Stable one-byte code, used in storage keys.
    pub fn code(self) -> u8 {
        match self {
            EventType::Register => 1,
            EventType::Call => 2,
            EventType::Presence => 3,
            EventType::Setting => 4,
            EventType::Element => 5,
        }
    }

    pub fn from_code(c: u8) -> Option<Self> {
        EventType::ALL.into_iter().find(|t| t.code() == c)
    }

    /// Whether elements of this type are member maps (merged member by member) rather than
    /// single values (latest version wins).
    pub fn is_map(self) -> bool {
        self.map_key().is_some()
    }

    /// The member map of a map-shaped element, if this type has one.
    fn map_key(self) -> Option<&'static str> {
        match self {
            EventType::Register => Some("contacts"),
            EventType::Call => Some("calls"),
            EventType::Setting => Some("settings"),
            EventType::Presence | EventType::Element => None,
        }
    }
}

impl fmt::Display for EventType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for EventType {
    type Err = EventError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        EventType::ALL
            .into_iter()
            .find(|t| t.as_str() == s)
            .ok_or_else(|| {
                EventError::new(
                    "type",
                    format!(
                        "unknown event type {:?} (known: register, call, presence, setting, element)",
                        s.chars().take(64).collect::<String>()
                    ),
                )
            })
    }
}

/// Why an event was refused; `field` names the part of the request that is wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {reason}")]
pub struct EventError {
    pub field: String,
    pub reason: String,
}

impl EventError {
    pub fn new(field: impl Into<String>, reason: impl Into<String>) -> Self {
        EventError {
            field: field.into(),
            reason: reason.into(),
        }
    }
}

/// A validated event, ready for its processor.
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    pub account: String,
    pub etype: EventType,
    pub data: Value,
}

/// An event as clients send it: `{"account","type","data"}`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawEvent {
    pub account: String,
    #[serde(rename = "type")]
    pub etype: String,
    #[serde(default)]
    pub data: Value,
}

pub fn validate_account(account: &str) -> Result<(), EventError> {
    if account.is_empty() {
        return Err(EventError::new("account", "must not be empty"));
    }
    if account.len() > ACCOUNT_BYTES_MAX {
        return Err(EventError::new(
            "account",
            format!(
                "is {} bytes, at most {ACCOUNT_BYTES_MAX} allowed",
                account.len()
            ),
        ));
    }
    Ok(())
}

impl Event {
    /// Validates account, type and the shape of the data for the type, so that the processor
    /// cannot fail later.
    pub fn from_raw(raw: RawEvent) -> Result<Event, EventError> {
        validate_account(&raw.account)?;
        let etype: EventType = raw.etype.parse()?;
        let ev = Event {
            account: raw.account,
            etype,
            data: raw.data,
        };
        ev.check_data()?;
        Ok(ev)
    }

    fn check_data(&self) -> Result<(), EventError> {
        match self.etype {
            EventType::Register => {
                parse_data::<RegisterData>(&self.data)?.check()?;
            }
            EventType::Call => {
                parse_data::<CallData>(&self.data)?.check()?;
            }
            EventType::Presence => {
                parse_data::<PresenceData>(&self.data)?.check()?;
            }
            EventType::Setting => {
                parse_data::<SettingData>(&self.data)?.check()?;
            }
            EventType::Element => {}
        }
        let size = to_canonical(&self.data).len();
        if size > ELEMENT_BYTES_MAX {
            return Err(EventError::new(
                "data",
                format!("is {size} bytes encoded, at most {ELEMENT_BYTES_MAX} allowed"),
            ));
        }
        Ok(())
    }
}

fn parse_data<T: serde::de::DeserializeOwned>(data: &Value) -> Result<T, EventError> {
    T::deserialize(data).map_err(|e| EventError::new("data", e.to_string()))
}

fn check_name(field: &str, s: &str) -> Result<(), EventError> {
    if s.is_empty() {
        return Err(EventError::new(field, "must not be empty"));
    }
    if s.len() > EVENT_NAME_BYTES_MAX {
        return Err(EventError::new(
            field,
            format!(
                "is {} bytes, at most {EVENT_NAME_BYTES_MAX} allowed",
                s.len()
            ),
        ));
    }
    Ok(())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RegisterData {
    contact: String,
    expires_s: u64,
}

impl RegisterData {
    fn check(&self) -> Result<(), EventError> {
        check_name("data.contact", &self.contact)?;
        if self.expires_s > EXPIRES_S_MAX {
            return Err(EventError::new(
                "data.expires_s",
                format!("at most {EXPIRES_S_MAX} seconds"),
            ));
        }
        Ok(())
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CallData {
    call_id: String,
    action: CallAction,
}

#[derive(Deserialize, PartialEq)]
#[serde(rename_all = "lowercase")]
enum CallAction {
    Start,
    End,
}

impl CallData {
    fn check(&self) -> Result<(), EventError> {
        check_name("data.call_id", &self.call_id)
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PresenceData {
    status: String,
}

impl PresenceData {
    fn check(&self) -> Result<(), EventError> {
        check_name("data.status", &self.status)
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SettingData {
    key: String,
    value: Value,
}

impl SettingData {
    fn check(&self) -> Result<(), EventError> {
        check_name("data.key", &self.key)
    }
}

/// Runs the event's processor: the current element (if any) and the event become the new
/// element. Only the origin ever calls this. `ev` must come from [`Event::from_raw`].
pub fn process(ev: &Event, current: Option<&Value>, version: Version, now_ms: u64) -> Value {
    let v = Value::String(version.to_string());
    match ev.etype {
        EventType::Register => {
            let d: RegisterData = parse_data(&ev.data).expect("validated");
            let expires_at_ms = if d.expires_s == 0 {
                0
            } else {
                now_ms.saturating_add(d.expires_s * 1000)
            };
            with_member(
                ev.etype,
                current,
                d.contact,
                obj([("expires_at_ms", expires_at_ms.into()), ("v", v)]),
            )
        }
        EventType::Call => {
            let d: CallData = parse_data(&ev.data).expect("validated");
            let active = d.action == CallAction::Start;
            with_member(
                ev.etype,
                current,
                d.call_id,
                obj([
                    ("active", active.into()),
                    ("since_ms", now_ms.into()),
                    ("v", v),
                ]),
            )
        }
        EventType::Setting => {
            let d: SettingData = parse_data(&ev.data).expect("validated");
            with_member(
                ev.etype,
                current,
                d.key,
                obj([("value", d.value), ("v", v)]),
            )
        }
        EventType::Presence => {
            let d: PresenceData = parse_data(&ev.data).expect("validated");
            obj([("status", d.status.into()), ("since_ms", now_ms.into())])
        }
        EventType::Element => ev.data.clone(),
    }
}

fn obj<const N: usize>(fields: [(&str, Value); N]) -> Value {
    Value::Object(
        fields
            .into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .collect(),
    )
}

fn with_member(etype: EventType, current: Option<&Value>, name: String, member: Value) -> Value {
    let key = etype.map_key().expect("map type");
    let mut members = current
        .and_then(|c| c.get(key))
        .and_then(Value::as_object)
        .cloned()
        .unwrap_or_default();
    members.insert(name, member);
    obj([(key, Value::Object(members))])
}

/// Why a remote element cannot be applied. A peer that sends one is broken or hostile.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("malformed {etype} element: {reason}")]
pub struct ElementError {
    pub etype: EventType,
    pub reason: String,
}

/// Checks that an element received from the network has the shape its type requires.
pub fn check_element(etype: EventType, el: &Value) -> Result<(), ElementError> {
    let err = |reason: &str| ElementError {
        etype,
        reason: reason.to_string(),
    };
    let Some(key) = etype.map_key() else {
        return Ok(());
    };
    let members = el
        .as_object()
        .filter(|o| o.len() == 1)
        .and_then(|o| o.get(key))
        .and_then(Value::as_object)
        .ok_or_else(|| err(&format!("expected an object with only {key:?}")))?;
    for m in members.values() {
        let v = m
            .get("v")
            .and_then(Value::as_str)
            .ok_or_else(|| err("a member without a version"))?;
        // String order is version order only for the canonical form (lowercase hex).
        let parsed = v
            .parse::<Version>()
            .map_err(|_| err("a member with a malformed version"))?;
        if parsed.to_string() != v {
            return Err(err("a member with a non-canonical version"));
        }
    }
    Ok(())
}

fn member_version(m: &Value) -> &str {
    m.get("v").and_then(Value::as_str).unwrap_or("")
}

/// Merges `incoming` (at `incoming_v`) into the current element (at `current_v`). Both must
/// have passed [`check_element`]. The result does not depend on the order of merges.
pub fn merge(
    etype: EventType,
    current: Option<(&Value, Version)>,
    incoming: &Value,
    incoming_v: Version,
) -> Value {
    let Some((cur, cur_v)) = current else {
        return incoming.clone();
    };
    let Some(key) = etype.map_key() else {
        return if incoming_v > cur_v {
            incoming.clone()
        } else {
            cur.clone()
        };
    };
    let mut members: Map<String, Value> = cur
        .get(key)
        .and_then(Value::as_object)
        .cloned()
        .unwrap_or_default();
    if let Some(inc) = incoming.get(key).and_then(Value::as_object) {
        for (name, m) in inc {
            // Fixed-width version strings order like versions. Equal versions carry equal
            // members (a version is issued once), so either side may win a tie.
            let newer = members
                .get(name)
                .is_none_or(|old| member_version(m) > member_version(old));
            if newer {
                members.insert(name.clone(), m.clone());
            }
        }
    }
    obj([(key, Value::Object(members))])
}

/// What a reader sees of an element at `now_ms`: expired or removed members filtered out,
/// member versions hidden, a call count added.
pub fn view(etype: EventType, el: &Value, now_ms: u64) -> Value {
    let members = |key: &str| {
        el.get(key)
            .and_then(Value::as_object)
            .cloned()
            .unwrap_or_default()
    };
    match etype {
        EventType::Register => {
            let live: Map<String, Value> = members("contacts")
                .into_iter()
                .filter_map(|(c, m)| {
                    let at = m.get("expires_at_ms").and_then(Value::as_u64).unwrap_or(0);
                    (at > now_ms).then(|| (c, obj([("expires_at_ms", at.into())])))
                })
                .collect();
            obj([("contacts", Value::Object(live))])
        }
        EventType::Call => {
            let live: Map<String, Value> = members("calls")
                .into_iter()
                .filter(|(_, m)| m.get("active") == Some(&Value::Bool(true)))
                .map(|(id, m)| {
                    let since = m.get("since_ms").cloned().unwrap_or(Value::Null);
                    (id, obj([("since_ms", since)]))
                })
                .collect();
            let count = live.len();
            obj([("calls", Value::Object(live)), ("count", count.into())])
        }
        EventType::Setting => {
            let live: Map<String, Value> = members("settings")
                .into_iter()
                .filter_map(|(k, m)| {
                    let v = m.get("value").cloned().unwrap_or(Value::Null);
                    (!v.is_null()).then_some((k, v))
                })
                .collect();
            obj([("settings", Value::Object(live))])
        }
        EventType::Presence | EventType::Element => el.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ids::NodeId;
    use proptest::prelude::*;
    use serde_json::json;

    fn ver(ms: u64, node: u128) -> Version {
        Version {
            ms,
            logical: 0,
            node: NodeId(node),
        }
    }

    fn ev(t: &str, data: Value) -> Result<Event, EventError> {
        Event::from_raw(RawEvent {
            account: "alice".into(),
            etype: t.into(),
            data,
        })
    }

    #[test]
    fn refuses_bad_events_naming_the_field() {
        assert_eq!(ev("bogus", json!({})).unwrap_err().field, "type");
        assert_eq!(
            ev("register", json!({"contact": ""})).unwrap_err().field,
            "data"
        );
        assert_eq!(
            ev("register", json!({"contact": "", "expires_s": 5}))
                .unwrap_err()
                .field,
            "data.contact"
        );
        assert_eq!(
            ev("call", json!({"call_id": "c", "action": "hold"}))
                .unwrap_err()
                .field,
            "data"
        );
        let long = Event::from_raw(RawEvent {
            account: "a".repeat(257),
            etype: "presence".into(),
            data: json!({"status": "x"}),
        });
        assert_eq!(long.unwrap_err().field, "account");
        let big = ev("element", json!("x".repeat(ELEMENT_BYTES_MAX)));
        assert_eq!(big.unwrap_err().field, "data");
    }

    #[test]
    fn register_binds_and_expires() {
        let e = ev(
            "register",
            json!({"contact": "sip:a@10.0.0.1", "expires_s": 60}),
        )
        .unwrap();
        let el = process(&e, None, ver(1000, 1), 1000);
        check_element(EventType::Register, &el).unwrap();
        let seen = view(EventType::Register, &el, 2000);
        assert_eq!(seen["contacts"]["sip:a@10.0.0.1"]["expires_at_ms"], 61_000);
        let later = view(EventType::Register, &el, 61_000);
        assert_eq!(later["contacts"].as_object().unwrap().len(), 0);
        let rm = ev(
            "register",
            json!({"contact": "sip:a@10.0.0.1", "expires_s": 0}),
        )
        .unwrap();
        let el2 = process(&rm, Some(&el), ver(2000, 1), 2000);
        assert_eq!(view(EventType::Register, &el2, 2000)["contacts"], json!({}));
    }

    #[test]
    fn calls_are_counted() {
        let s = |id: &str, a: &str| ev("call", json!({"call_id": id, "action": a})).unwrap();
        let e1 = process(&s("c1", "start"), None, ver(1, 1), 1);
        let e2 = process(&s("c2", "start"), Some(&e1), ver(2, 1), 2);
        let e3 = process(&s("c1", "end"), Some(&e2), ver(3, 1), 3);
        assert_eq!(view(EventType::Call, &e2, 5)["count"], 2);
        assert_eq!(view(EventType::Call, &e3, 5)["count"], 1);
    }

    #[test]
    fn concurrent_members_both_survive() {
        let a = ev("setting", json!({"key": "dnd", "value": true})).unwrap();
        let b = ev("setting", json!({"key": "lang", "value": "fr"})).unwrap();
        let ea = process(&a, None, ver(10, 1), 10);
        let eb = process(&b, None, ver(10, 2), 10);
        let ab = merge(EventType::Setting, Some((&ea, ver(10, 1))), &eb, ver(10, 2));
        let ba = merge(EventType::Setting, Some((&eb, ver(10, 2))), &ea, ver(10, 1));
        assert_eq!(ab, ba);
        assert_eq!(
            view(EventType::Setting, &ab, 0),
            json!({"settings": {"dnd": true, "lang": "fr"}})
        );
    }

    #[test]
    fn malformed_remote_elements_are_refused() {
        assert!(check_element(EventType::Call, &json!({"calls": 3})).is_err());
        assert!(check_element(EventType::Call, &json!({"calls": {"x": {}}})).is_err());
        assert!(check_element(EventType::Call, &json!({"calls": {"x": {"v": "nope"}}})).is_err());
        let upper = "00000000000000000001.0000000000.0123456789ABCDEF0011223344556677";
        assert!(check_element(EventType::Call, &json!({"calls": {"x": {"v": upper}}})).is_err());
        assert!(check_element(EventType::Element, &json!(3)).is_ok());
    }

    /// One of a few events on one account, at one of three nodes.
    fn arb_update() -> impl Strategy<Value = (EventType, Value, Version)> {
        let data = prop_oneof![
            (0..3u8, 0..2u8).prop_map(|(k, v)| (
                EventType::Setting,
                json!({"key": format!("k{k}"), "value": if v == 0 { Value::Null } else { json!(v) }})
            )),
            (0..3u8, 0..3u64).prop_map(|(c, e)| (
                EventType::Register,
                json!({"contact": format!("c{c}"), "expires_s": e})
            )),
            (0..3u8).prop_map(|s| (EventType::Presence, json!({"status": format!("s{s}")}))),
        ];
        (data, 0..5u64, 0..3u32, 1..4u128).prop_map(|((t, d), ms, l, n)| {
            (
                t,
                d,
                Version {
                    ms,
                    logical: l,
                    node: NodeId(n),
                },
            )
        })
    }

    proptest! {
        /// The conflict rule: any arrival order of the same elements gives the same element.
        #[test]
        fn any_arrival_order_gives_the_same_state(
            updates in proptest::collection::vec(arb_update(), 1..8),
            seed: u64,
        ) {
            for t in [EventType::Setting, EventType::Register, EventType::Presence] {
                // Each update is processed against nothing, like an origin that saw no other.
                let mut els: Vec<(Value, Version)> = Vec::new();
                for (ut, d, v) in &updates {
                    if *ut != t { continue; }
                    let e = Event { account: "a".into(), etype: t, data: d.clone() };
                    e.check_data().unwrap();
                    els.push((process(&e, None, *v, v.ms), *v));
                }
                // Versions are unique per issued element.
                els.sort_by_key(|(_, v)| *v);
                els.dedup_by_key(|(_, v)| *v);
                if els.is_empty() { continue; }
                let fold = |order: &[(Value, Version)]| {
                    let mut cur: Option<(Value, Version)> = None;
                    for (el, v) in order {
                        let merged = merge(t, cur.as_ref().map(|(c, cv)| (c, *cv)), el, *v);
                        let nv = cur.as_ref().map_or(*v, |(_, cv)| (*cv).max(*v));
                        cur = Some((merged, nv));
                        // Idempotence: applying the same element again changes nothing.
                        let again = merge(t, cur.as_ref().map(|(c, cv)| (c, *cv)), el, *v);
                        assert_eq!(&again, &cur.as_ref().unwrap().0);
                    }
                    cur.unwrap()
                };
                let forward = fold(&els);
                let mut shuffled = els.clone();
                let mut s = seed;
                for i in (1..shuffled.len()).rev() {
                    s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                    shuffled.swap(i, (s >> 33) as usize % (i + 1));
                }
                let other = fold(&shuffled);
                prop_assert_eq!(to_canonical(&forward.0), to_canonical(&other.0));
                prop_assert_eq!(forward.1, other.1);
            }
        }
    }
}
