//! A controller and its workers as real `outpost` processes on 127.0.0.1, built on
//! [`Cluster::start_nodes`]: node 0 is the controller, nodes 1.. the workers in spec order.

use std::path::{Path, PathBuf};

use anyhow::Context;
use serde_json::Value;

use super::api::Api;
use super::cluster::{Cluster, NodeInfo};

/// The join token every fleet's controller and token-holding workers share.
pub const JOIN_TOKEN: &str = "fleet-join-token-0123456789";

#[derive(Clone, Debug)]
pub struct WorkerSpec {
    pub name: String,
    /// `load-balancer`, `media-processor`, ...
    pub component: String,
    pub load_balancer: Option<String>,
    /// Presents the join token (admitted at once) or waits as pending.
    pub join_token: bool,
}

impl WorkerSpec {
    pub fn load_balancer(name: &str) -> WorkerSpec {
        WorkerSpec {
            name: name.into(),
            component: "load-balancer".into(),
            load_balancer: None,
            join_token: true,
        }
    }

    pub fn dependent(name: &str, lb: &str) -> WorkerSpec {
        WorkerSpec {
            name: name.into(),
            component: "media-processor".into(),
            load_balancer: Some(lb.into()),
            join_token: true,
        }
    }

    /// A call router coupled with the load balancer `lb`.
    pub fn router(name: &str, lb: &str) -> WorkerSpec {
        WorkerSpec {
            name: name.into(),
            component: "call-router".into(),
            load_balancer: Some(lb.into()),
            join_token: true,
        }
    }

    pub fn without_token(mut self) -> WorkerSpec {
        self.join_token = false;
        self
    }
}

#[derive(Clone, Debug)]
pub struct FleetSpec {
    pub label: String,
    pub workers: Vec<WorkerSpec>,
    /// `[cluster] down_after` of the controller.
    pub down_after: String,
    pub log_level: String,
}

impl FleetSpec {
    pub fn new(label: &str, workers: Vec<WorkerSpec>) -> FleetSpec {
        FleetSpec {
            label: label.into(),
            workers,
            down_after: "2s".into(),
            log_level: "info".into(),
        }
    }
}

pub struct Fleet {
    pub cluster: Cluster,
    pub spec: FleetSpec,
    pub token_file: PathBuf,
}

impl Fleet {
    pub async fn start(bin: &Path, spec: FleetSpec) -> anyhow::Result<Fleet> {
        let mut nodes = vec![("controller".to_owned(), "controller".to_owned())];
        for w in &spec.workers {
            nodes.push((w.name.clone(), "worker".to_owned()));
        }
        let token_file = std::env::temp_dir().join(format!(
            "outpost-fleet-token-{}-{}",
            std::process::id(),
            rand::random::<u64>()
        ));
        write_private(&token_file, JOIN_TOKEN)?;
        let log_level = std::env::var("OUTPOST_TEST_LOG").unwrap_or(spec.log_level.clone());
        let s = spec.clone();
        let tf = token_file.clone();
        let configure = move |all: &[NodeInfo], i: usize| fleet_config(&s, &tf, &log_level, all, i);
        let cluster = Cluster::start_nodes(bin, &spec.label, &nodes, &configure).await?;
        Ok(Fleet {
            cluster,
            spec,
            token_file,
        })
    }

    pub fn controller(&self) -> Api {
        self.cluster.api(0)
    }

    /// The cluster index of worker `name`.
    pub fn index(&self, name: &str) -> usize {
        self.cluster
            .index(name)
            .unwrap_or_else(|| panic!("no worker {name:?}"))
    }

    pub fn worker(&self, name: &str) -> Api {
        self.cluster.api(self.index(name))
    }

    pub fn info(&self, name: &str) -> &NodeInfo {
        self.cluster.node(self.index(name))
    }

    /// `GET /v1/machines` on the controller.
    pub async fn machines(&self) -> anyhow::Result<Vec<Value>> {
        let v: Value = self.controller().get_json("/v1/machines").await?;
        list(v, "machines")
    }

    /// `GET /v1/keys` on the controller.
    pub async fn keys(&self) -> anyhow::Result<Vec<Value>> {
        let v: Value = self.controller().get_json("/v1/keys").await?;
        list(v, "keys")
    }

    /// The key record of machine `name`, if the controller has one.
    pub async fn key(&self, name: &str) -> anyhow::Result<Option<Value>> {
        Ok(self.keys().await?.into_iter().find(|k| k["name"] == name))
    }

    pub async fn machine(&self, name: &str) -> anyhow::Result<Option<Value>> {
        Ok(self
            .machines()
            .await?
            .into_iter()
            .find(|m| m["name"] == name))
    }

    /// The pool file a load balancer wrote.
    pub fn pool_file(&self, lb: &str) -> PathBuf {
        self.info(lb).data_dir.join("pool.json")
    }

    /// The pool file of worker `name` (a load balancer's pool and router, a call router's load
    /// balancer); `None` before it is written.
    pub fn pool_doc(&self, name: &str) -> anyhow::Result<Option<Value>> {
        let path = self.pool_file(name);
        match std::fs::read_to_string(&path) {
            Ok(t) => Ok(Some(serde_json::from_str(&t).with_context(|| {
                format!("{} is not JSON: {t:?}", path.display())
            })?)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
        }
    }

    /// The names in a load balancer's pool file, sorted; `None` before it is written.
    pub fn pool_names(&self, lb: &str) -> anyhow::Result<Option<Vec<String>>> {
        let path = self.pool_file(lb);
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
        };
        let v: Value = serde_json::from_str(&text)
            .with_context(|| format!("{} is not JSON: {text:?}", path.display()))?;
        let members = v
            .get("members")
            .and_then(Value::as_array)
            .with_context(|| format!("{} has no members: {text}", path.display()))?;
        let mut names: Vec<String> = members
            .iter()
            .filter_map(|m| m["name"].as_str().map(str::to_owned))
            .collect();
        names.sort();
        Ok(Some(names))
    }

    pub async fn finish(self) -> anyhow::Result<()> {
        let _ = std::fs::remove_file(&self.token_file);
        self.cluster.finish().await
    }
}

fn list(v: Value, key: &str) -> anyhow::Result<Vec<Value>> {
    match v {
        Value::Array(a) => Ok(a),
        Value::Object(mut o) => match o.remove(key) {
            Some(Value::Array(a)) => Ok(a),
            _ => anyhow::bail!("no {key} list in {}", Value::Object(o)),
        },
        other => anyhow::bail!("no {key} list in {other}"),
    }
}

fn write_private(path: &Path, text: &str) -> anyhow::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("writing {}", path.display()))?;
    f.write_all(text.as_bytes())?;
    Ok(())
}

fn fleet_config(
    spec: &FleetSpec,
    token_file: &Path,
    log_level: &str,
    all: &[NodeInfo],
    i: usize,
) -> String {
    let me = &all[i];
    let mut doc = toml::Table::new();
    doc.insert("role".into(), me.role.clone().into());
    doc.insert("name".into(), me.name.clone().into());
    doc.insert(
        "data_dir".into(),
        me.data_dir.to_string_lossy().into_owned().into(),
    );
    doc.insert("listen".into(), me.listen.to_string().into());
    doc.insert("api".into(), me.api_addr.to_string().into());
    let mut log = toml::Table::new();
    log.insert("level".into(), log_level.into());
    doc.insert("log".into(), toml::Value::Table(log));
    let token = token_file.to_string_lossy().into_owned();
    if i == 0 {
        let mut adm = toml::Table::new();
        adm.insert("join_token_file".into(), token.into());
        doc.insert("admission".into(), toml::Value::Table(adm));
        let mut cl = toml::Table::new();
        cl.insert("down_after".into(), spec.down_after.clone().into());
        doc.insert("cluster".into(), toml::Value::Table(cl));
    } else {
        let w = &spec.workers[i - 1];
        let ctl = &all[0];
        let mut c = toml::Table::new();
        c.insert("addr".into(), ctl.listen.to_string().into());
        c.insert("fingerprint".into(), ctl.fingerprint.clone().into());
        if w.join_token {
            c.insert("join_token_file".into(), token.into());
        }
        doc.insert("controller".into(), toml::Value::Table(c));
        let mut m = toml::Table::new();
        m.insert("service".into(), "voice".into());
        m.insert("component".into(), w.component.clone().into());
        if let Some(lb) = &w.load_balancer {
            m.insert("load_balancer".into(), lb.clone().into());
        }
        m.insert(
            "service_addr".into(),
            format!("127.0.0.1:{}", 15060 + i).into(),
        );
        doc.insert("machine".into(), toml::Value::Table(m));
    }
    toml::to_string(&doc).expect("a config table serializes")
}
