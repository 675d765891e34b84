//! First boot and every boot of every role: opens (or creates) the database, its meta and the
//! node's TLS identity. A database created for another role is refused as bad config.

use std::path::Path;

use crate::clock::now_ms;
use crate::config::ConfigError;
use crate::ids::NodeId;
use crate::net::Identity;
use crate::store::{NodeMeta, Store};
use crate::wire::Role;

const SECRET_CERT: &str = "tls_cert_der";
const SECRET_KEY: &str = "tls_key_der";

/// Opens (or creates) the database, its meta and the node identity. A database created for
/// another role is refused as bad config (exit 2).
pub fn open_node(
    data_dir: &Path,
    role: Role,
    name: Option<&str>,
) -> anyhow::Result<(Store, NodeMeta, Identity, bool)> {
    let store = Store::open(data_dir)?;
    let (meta, created) = match store.meta()? {
        Some(m) => {
            if m.role != role {
                return Err(ConfigError {
                    origin: data_dir.display().to_string(),
                    field: "role".into(),
                    reason: format!(
                        "this database was created for a {}; refusing to run it as a {role}",
                        m.role
                    ),
                }
                .into());
            }
            (m, false)
        }
        None => {
            let m = NodeMeta {
                node_id: NodeId::random(),
                role,
                name: name.map(str::to_string).unwrap_or_else(|| {
                    format!("{role}-{}", &hex::encode(rand::random::<[u8; 3]>()))
                }),
                log_epoch: rand::random::<u64>() | 1,
                created_ms: now_ms(),
            };
            store.init_meta(&m)?;
            (m, true)
        }
    };
    let identity = match (store.secret(SECRET_CERT)?, store.secret(SECRET_KEY)?) {
        (Some(c), Some(k)) => Identity::from_der(c, k)?,
        _ => {
            let id = Identity::generate(meta.node_id, &meta.name)?;
            store.put_secret(SECRET_KEY, &id.key_der)?;
            store.put_secret(SECRET_CERT, &id.cert_der)?;
            id
        }
    };
    Ok((store, meta, identity, created))
}

/// The node's meta as it runs: the name in the config wins over the one stored at init (an
/// operator may rename a node), and the difference is said once at start.
pub fn with_configured_name(meta: NodeMeta, configured: &str) -> NodeMeta {
    if meta.name != configured {
        tracing::info!(
            stored = %meta.name,
            configured = %configured,
            "the configured name differs from the one stored at init; using the configured one"
        );
    }
    NodeMeta {
        name: configured.to_owned(),
        ..meta
    }
}
