//! The cluster half of `outpost demo`: a controller and its workers (one load balancer, the
//! rest media processors behind it) in this process on 127.0.0.1, talking real QUIC and HTTP.
//! Admission by join token and by an operator's accept, the load balancer's pool following a
//! dependent that stops and comes back, software delivered and replaced, configuration data
//! applied everywhere and a bad override rolled back on its one machine, and the machines
//! table at the end.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use serde_json::Value;

use crate::cluster::controller::{self, ControllerRunning};
use crate::cluster::worker::{self, WorkerRunning};
use crate::config::{AdmissionConfig, Config, ControllerConfig, MachineConfig};
use crate::ops::notify::Notifier;
use crate::wire::Role;

const DEADLINE: Duration = Duration::from_secs(60);
const DOWN_AFTER: Duration = Duration::from_secs(1);

struct Node {
    config: Config,
    api: String,
    token: String,
}

pub struct Fleet {
    pub controller: Option<ControllerRunning>,
    ctl: Node,
    workers: Vec<(Node, Option<WorkerRunning>)>,
    http: reqwest::Client,
}

fn local(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

fn free_port() -> anyhow::Result<u16> {
    loop {
        let udp = std::net::UdpSocket::bind("127.0.0.1:0")?;
        let port = udp.local_addr()?.port();
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return Ok(port);
        }
    }
}

fn token_of(dir: &Path) -> anyhow::Result<String> {
    Ok(std::fs::read_to_string(dir.join("token"))
        .with_context(|| format!("reading {}/token", dir.display()))?
        .trim()
        .to_owned())
}

impl Fleet {
    /// Starts a controller and `workers` workers under `dir`: `lb-1`, the call router `cr-1`
    /// coupled with it, then `media-1..` behind it; the last one has no join token (it waits
    /// for an operator).
    pub async fn start(dir: &Path, workers: usize) -> anyhow::Result<Fleet> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let token_file = dir.join("join-token");
        std::fs::write(&token_file, format!("{:032x}\n", rand::random::<u128>()))?;
        let ctl_dir = dir.join("controller");
        let info = crate::roles::init(&ctl_dir, Role::Controller, Some("controller"))?;
        let port = free_port()?;
        let mut c = Config::with_defaults(Role::Controller, "controller", &ctl_dir);
        c.listen = local(port);
        c.api = local(port);
        c.admission = Some(AdmissionConfig {
            join_token_file: token_file.clone(),
        });
        c.cluster.down_after = DOWN_AFTER;
        let running = controller::start(c.clone(), Notifier::disabled()).await?;
        let ctl = Node {
            api: format!("http://{}", running.api_addr),
            token: token_of(&ctl_dir)?,
            config: c,
        };
        println!(
            "  controller  node {}  quic+api {}",
            info.node_id, running.api_addr
        );
        let mut fleet = Fleet {
            controller: Some(running),
            ctl,
            workers: Vec::new(),
            http: reqwest::Client::new(),
        };
        for i in 0..workers {
            let (name, component, lb) = match i {
                0 => ("lb-1".to_owned(), "load-balancer", None),
                // Coupled with lb-1: it hands lb-1 its jobs.
                1 => ("cr-1".to_owned(), "call-router", Some("lb-1".to_owned())),
                _ => (
                    format!("media-{}", i - 1),
                    "media-processor",
                    Some("lb-1".to_owned()),
                ),
            };
            let wdir = dir.join(&name);
            crate::roles::init(&wdir, Role::Worker, Some(&name))?;
            let port = free_port()?;
            let mut w = Config::with_defaults(Role::Worker, &name, &wdir);
            w.listen = local(port);
            w.api = local(port);
            let with_token = i + 1 < workers || workers == 1;
            w.controller = Some(ControllerConfig {
                addr: fleet.ctl.config.listen,
                fingerprint: info.fingerprint,
                join_token_file: with_token.then(|| token_file.clone()),
            });
            w.machine = Some(MachineConfig {
                service: "voice".into(),
                component: component.into(),
                load_balancer: lb,
                service_addr: Some(local(free_port()?)),
                relay_addr: None,
                pool_file: None,
            });
            let node = Node {
                api: format!("http://{}", w.api),
                // Written by the worker when it starts; the demo asks the controller only.
                token: String::new(),
                config: w,
            };
            fleet.workers.push((node, None));
            fleet.start_worker(i).await?;
        }
        Ok(fleet)
    }

    pub fn worker_names(&self) -> Vec<String> {
        self.workers
            .iter()
            .map(|(n, _)| n.config.name.clone())
            .collect()
    }

    async fn start_worker(&mut self, i: usize) -> anyhow::Result<()> {
        let config = self.workers[i].0.config.clone();
        let running = worker::start(config, Notifier::disabled()).await?;
        self.workers[i].1 = Some(running);
        Ok(())
    }

    async fn stop_worker(&mut self, i: usize) {
        if let Some(r) = self.workers[i].1.take() {
            r.shutdown().await;
        }
    }

    pub fn pool_file(&self) -> PathBuf {
        self.workers[0].0.config.data_dir.join("pool.json")
    }

    /// The pool file of worker `i` (a call router's holds its load balancer).
    fn pool_doc(&self, i: usize) -> Value {
        std::fs::read(self.workers[i].0.config.data_dir.join("pool.json"))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default()
    }

    /// Waits until the call router (worker 1) holds lb-1's endpoint with `up`.
    async fn wait_coupled(&self, up: bool) -> anyhow::Result<(Value, Duration)> {
        self.until(&format!("cr-1 to hold lb-1 up={up}"), async |f: &Fleet| {
            let d = f.pool_doc(1);
            Ok(
                (d["load_balancer"]["name"] == "lb-1" && d["load_balancer"]["up"] == up)
                    .then_some(d),
            )
        })
        .await
    }

    /// The member names of the load balancer's pool file, sorted.
    pub fn pool(&self) -> Vec<String> {
        let Ok(text) = std::fs::read_to_string(self.pool_file()) else {
            return Vec::new();
        };
        let v: Value = serde_json::from_str(&text).unwrap_or_default();
        let mut names: Vec<String> = v["members"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|m| m["name"].as_str().map(String::from))
                    .collect()
            })
            .unwrap_or_default();
        names.sort();
        names
    }

    pub async fn get(&self, path: &str) -> anyhow::Result<Value> {
        let resp = self
            .http
            .get(format!("{}{path}", self.ctl.api))
            .bearer_auth(&self.ctl.token)
            .send()
            .await?;
        let status = resp.status();
        let v: Value = resp.json().await?;
        if !status.is_success() {
            bail!("GET {path}: {status}: {}", v["error"]);
        }
        Ok(v)
    }

    async fn post(&self, path: &str) -> anyhow::Result<Value> {
        let resp = self
            .http
            .post(format!("{}{path}", self.ctl.api))
            .bearer_auth(&self.ctl.token)
            .send()
            .await?;
        let status = resp.status();
        let v: Value = resp.json().await?;
        if !status.is_success() {
            bail!("POST {path}: {status}: {}", v["error"]);
        }
        Ok(v)
    }

    async fn put_config(&self, scope: &str, doc: &Value) -> anyhow::Result<Value> {
        let resp = self
            .http
            .put(format!("{}/v1/config/{scope}", self.ctl.api))
            .bearer_auth(&self.ctl.token)
            .json(doc)
            .send()
            .await?;
        let status = resp.status();
        let v: Value = resp.json().await?;
        if !status.is_success() {
            bail!("PUT /v1/config/{scope}: {status}: {}", v["error"]);
        }
        Ok(v)
    }

    /// Waits until every machine reports its configuration `version` (or, for `name`,
    /// `name_version`) in a final state; returns each machine's (name, version, state, detail).
    async fn wait_configs(
        &self,
        want: impl Fn(&str) -> u64,
    ) -> anyhow::Result<(Vec<(String, u64, String, String)>, Duration)> {
        self.until(
            "every machine's configuration applied or rolled back",
            async |f: &Fleet| {
                let ms = f.get("/v1/machines").await?;
                let list: Vec<(String, u64, String, String)> = ms
                    .as_array()
                    .cloned()
                    .unwrap_or_default()
                    .iter()
                    .map(|m| {
                        (
                            m["name"].as_str().unwrap_or("?").to_owned(),
                            m["config"]["version"].as_u64().unwrap_or(0),
                            m["config"]["state"].as_str().unwrap_or("").to_owned(),
                            m["config"]["detail"].as_str().unwrap_or("").to_owned(),
                        )
                    })
                    .collect();
                let done = list.iter().all(|(n, v, s, _)| {
                    *v == want(n) && matches!(s.as_str(), "applied" | "rolled_back" | "failed")
                });
                Ok(done.then_some(list))
            },
        )
        .await
    }

    /// The configuration file of worker `i`, as its software reads it.
    fn config_file(&self, i: usize) -> Value {
        let path = self.workers[i].0.config.data_dir.join("config.json");
        std::fs::read(path)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default()
    }

    /// Polls `check` every 50 ms until it returns `Some`, or fails after [`DEADLINE`].
    async fn until<T>(
        &self,
        what: &str,
        mut check: impl AsyncFnMut(&Fleet) -> anyhow::Result<Option<T>>,
    ) -> anyhow::Result<(T, Duration)> {
        let t = Instant::now();
        loop {
            if let Some(v) = check(self).await? {
                return Ok((v, t.elapsed()));
            }
            if t.elapsed() > DEADLINE {
                bail!("{what}: not within {DEADLINE:?}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn key_status(&self, name: &str) -> anyhow::Result<Option<(String, String)>> {
        let keys = self.get("/v1/keys").await?;
        Ok(keys.as_array().and_then(|a| {
            a.iter().find(|k| k["name"] == name).map(|k| {
                (
                    k["id"].as_str().unwrap_or_default().to_owned(),
                    k["status"].as_str().unwrap_or_default().to_owned(),
                )
            })
        }))
    }

    async fn wait_pool(&self, want: &[String]) -> anyhow::Result<Duration> {
        let mut want = want.to_vec();
        want.sort();
        let (_, took) = self
            .until(&format!("lb-1's pool to be {want:?}"), async |f: &Fleet| {
                Ok((f.pool() == want).then_some(()))
            })
            .await?;
        Ok(took)
    }

    pub async fn shutdown(mut self) {
        for i in 0..self.workers.len() {
            self.stop_worker(i).await;
        }
        if let Some(c) = self.controller.take() {
            c.shutdown().await;
        }
    }
}

/// The sample bundles of `fixtures/bundles/`, built into the binary so that the demo runs from
/// any directory.
const SAMPLES: [(&str, &str, &str); 2] = [
    (
        "voice",
        include_str!("../../fixtures/bundles/voice/outpost-bundle.toml"),
        include_str!("../../fixtures/bundles/voice/bin/start"),
    ),
    (
        "messaging",
        include_str!("../../fixtures/bundles/messaging/outpost-bundle.toml"),
        include_str!("../../fixtures/bundles/messaging/bin/start"),
    ),
];

/// Writes sample `service`'s source under `dir` and packs it; returns the bundle file.
fn sample_bundle(dir: &Path, service: &str) -> anyhow::Result<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let (_, manifest, start) = SAMPLES
        .iter()
        .find(|(s, ..)| *s == service)
        .context("no such sample")?;
    let src = dir.join(format!("{service}-src"));
    std::fs::create_dir_all(src.join("bin"))?;
    std::fs::write(src.join(crate::bundle::MANIFEST_FILE), manifest)?;
    let script = src.join("bin/start");
    std::fs::write(&script, start)?;
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755))?;
    let out = dir.join(format!("{service}.bundle"));
    crate::bundle::pack(&src, &out)?;
    Ok(out)
}

/// One machine's part of a deployment: name, status, reason.
type Outcome = (String, String, String);

impl Fleet {
    /// Uploads `bundle` and deploys it to every worker; waits until every one has a final
    /// status and returns the bundle id and each machine's outcome.
    /// Uploads `bundle` and deploys it (with the `rollout` keys of the request, if any) until
    /// every target and the rollout are done; answers the bundle id, each target's outcome,
    /// and the deployment as the controller shows it.
    async fn deploy(
        &self,
        service: &str,
        bundle: &Path,
        rollout: Value,
    ) -> anyhow::Result<(String, Vec<Outcome>, Value)> {
        let bytes = tokio::fs::read(bundle).await?;
        let resp = self
            .http
            .post(format!("{}/v1/bundles", self.ctl.api))
            .bearer_auth(&self.ctl.token)
            .body(bytes)
            .send()
            .await?;
        let status = resp.status();
        let up: Value = resp.json().await?;
        if !status.is_success() {
            bail!("uploading {}: {status}: {}", bundle.display(), up["error"]);
        }
        let bundle_id = up["bundle_id"].as_str().unwrap_or_default().to_owned();
        let resp = self
            .http
            .post(format!("{}/v1/deployments", self.ctl.api))
            .bearer_auth(&self.ctl.token)
            .json(&{
                let mut body = serde_json::json!({"service": service, "bundle_id": bundle_id});
                if let (Some(b), Some(r)) = (body.as_object_mut(), rollout.as_object()) {
                    b.extend(r.clone());
                }
                body
            })
            .send()
            .await?;
        let status = resp.status();
        let created: Value = resp.json().await?;
        if !status.is_success() {
            bail!("deploying {service}: {status}: {}", created["error"]);
        }
        let id = created["deployment_id"].to_string();
        self.until(&format!("deployment {id} to finish"), async |f: &Fleet| {
            let d = f.get(&format!("/v1/deployments/{id}")).await?;
            let list = d["machines"].as_array().cloned().unwrap_or_default();
            let done = !list.is_empty()
                && d["rollout"]["state"] != "running"
                && list.iter().all(|m| {
                    matches!(
                        m["status"].as_str(),
                        Some("running" | "rolled_back" | "failed" | "skipped")
                    )
                });
            Ok(done.then_some(()))
        })
        .await?;
        let d = self.get(&format!("/v1/deployments/{id}")).await?;
        let list = d["machines"]
            .as_array()
            .cloned()
            .unwrap_or_default()
            .iter()
            .map(|m| {
                (
                    m["name"].as_str().unwrap_or("?").to_owned(),
                    m["status"].as_str().unwrap_or("?").to_owned(),
                    m["reason"].as_str().unwrap_or_default().to_owned(),
                )
            })
            .collect();
        Ok((bundle_id, list, d))
    }
}

/// The cluster demo; returns whether every step did what it should.
pub async fn run(dir: &Path, workers: usize) -> anyhow::Result<bool> {
    if workers < 4 {
        bail!("--workers: at least 4 (a load balancer, its call router and two dependents)");
    }
    println!(
        "\ncluster: a controller and {workers} workers (lb-1, its call router cr-1, media-1..{}) on 127.0.0.1",
        workers - 2
    );
    let mut fleet = Fleet::start(dir, workers).await?;
    let names = fleet.worker_names();
    let last = names.last().cloned().expect("workers");
    let dependents: Vec<String> = names[2..].to_vec();

    // 1. Admission: the join token admits at once; without it, pending until accepted.
    let ((id, _), _) = fleet
        .until(&format!("{last} to wait as pending"), async |f: &Fleet| {
            Ok(f.key_status(&last).await?.filter(|(_, s)| s == "pending"))
        })
        .await?;
    let admitted_by_token = &dependents[..dependents.len() - 1];
    fleet
        .wait_pool(admitted_by_token)
        .await
        .context("the token-admitted dependents in lb-1's pool")?;
    println!(
        "5. lb-1, cr-1 and {} admitted by join token; {last} waits as pending (key {})",
        admitted_by_token.join(", "),
        &id[..12.min(id.len())]
    );
    fleet.post(&format!("/v1/keys/{id}/accept")).await?;
    let took = fleet.wait_pool(&dependents).await?;
    println!(
        "6. an operator accepts {last}: admitted, and in lb-1's pool {:.0?} later ({})",
        took,
        fleet.pool_file().display()
    );

    // 2. A dependent goes down and comes back; the pool follows.
    let victim = 2;
    fleet.stop_worker(victim).await;
    let rest: Vec<String> = dependents
        .iter()
        .filter(|n| **n != names[victim])
        .cloned()
        .collect();
    let took = fleet.wait_pool(&rest).await?;
    println!(
        "7. {} stops: marked down after down_after ({DOWN_AFTER:?}) and out of the pool {:.1?} after it stopped",
        names[victim], took
    );
    fleet.start_worker(victim).await?;
    let took = fleet.wait_pool(&dependents).await?;
    println!(
        "8. {} comes back: in the pool again {:.0?} after it started",
        names[victim], took
    );

    // 3. The call router and its load balancer: lb-1 stops, cr-1 is told; back, told again.
    let (doc, _) = fleet.wait_coupled(true).await?;
    let lb_of_router = fleet.pool_doc(0);
    println!(
        "9. cr-1 is coupled with lb-1: it holds lb-1's endpoint (jobs to {}, fingerprint {}...), lb-1 knows its router ({}) and its pool leaves it out",
        doc["load_balancer"]["service_addr"].as_str().unwrap_or("?"),
        &doc["load_balancer"]["fingerprint"].as_str().unwrap_or("?")[..12],
        lb_of_router["call_router"]["name"].as_str().unwrap_or("none"),
    );
    fleet.stop_worker(0).await;
    let (_, down) = fleet.wait_coupled(false).await?;
    fleet.start_worker(0).await?;
    let (_, up) = fleet.wait_coupled(true).await?;
    fleet.wait_pool(&dependents).await?;
    println!(
        "10. lb-1 stops: cr-1 is told it is down {down:.1?} later; lb-1 comes back: told it is up {up:.1?} after it started"
    );
    let coupled_ok = lb_of_router["call_router"]["name"] == "cr-1";

    // 4. Software: voice everywhere, then messaging replaces it.
    let mut deployed_ok = true;
    // Messaging goes in phases: one machine, then half, then the rest, each wave running
    // healthy for a second before the next, dependents drained out of lb-1's pool first.
    let phased =
        serde_json::json!({"waves": [1, "50%", "100%"], "healthy_for": "1s", "drain": "200ms"});
    let mut rollout_ok = false;
    for (step, service) in [(11, "voice"), (12, "messaging")] {
        let bundle = sample_bundle(dir, service)?;
        let t = Instant::now();
        let rollout = if step == 12 {
            phased.clone()
        } else {
            Value::Null
        };
        let (bundle_id, list, d) = fleet.deploy(service, &bundle, rollout).await?;
        let running = list.iter().filter(|(_, s, _)| s == "running").count();
        deployed_ok &= running == list.len();
        println!(
            "{step}. {service} bundle {} deployed, sealed to each worker's key: {running} of {} running after {:.1?}{}",
            &bundle_id[..12.min(bundle_id.len())],
            list.len(),
            t.elapsed(),
            if step == 12 { " (voice stopped on each)" } else { "" }
        );
        for (name, status, reason) in list.iter().filter(|(_, s, _)| s != "running") {
            println!("    {name}: {status} {reason}");
        }
        if step == 12 {
            let r = &d["rollout"];
            let waves = r["waves"].as_array().cloned().unwrap_or_default();
            let t0 = waves
                .first()
                .and_then(|w| w["started_ms"].as_u64())
                .unwrap_or(0);
            let parts: Vec<String> = waves
                .iter()
                .map(|w| {
                    format!(
                        "wave {} [{}] at +{:.1}s",
                        w["wave"],
                        w["machines"]
                            .as_array()
                            .map(|a| a
                                .iter()
                                .filter_map(Value::as_str)
                                .collect::<Vec<_>>()
                                .join(","))
                            .unwrap_or_default(),
                        w["started_ms"].as_u64().unwrap_or(t0).saturating_sub(t0) as f64 / 1000.0
                    )
                })
                .collect();
            println!(
                "    a phased rollout, {}: {}; each wave healthy for 1s before the next; media-1 and media-2 are drained out of lb-1's pool (200ms) before they are replaced",
                r["state"].as_str().unwrap_or("?"),
                parts.join(", ")
            );
            rollout_ok = r["state"] == "done" && waves.len() == 3;
        }
    }

    // 5. Configuration data: the service's document everywhere, then an override for one
    // machine that its software does not survive, rolled back there alone.
    let doc = serde_json::json!({"log": "info", "max_calls": 500});
    let t = Instant::now();
    let set = fleet.put_config("service/voice", &doc).await?;
    let v1 = set["version"].as_u64().unwrap_or(0);
    let (list, _) = fleet.wait_configs(|_| v1).await?;
    let applied = list.iter().filter(|(_, _, s, _)| s == "applied").count();
    let files_ok = (0..workers).all(|i| fleet.config_file(i) == doc);
    println!(
        "13. configuration: service/voice version {v1} {{\"log\":\"info\",\"max_calls\":500}} applied on {applied} of {} workers after {:.1?} (written to each DATA_DIR/config.json, SIGHUP to the software)",
        list.len(),
        t.elapsed()
    );
    let bad = serde_json::json!({"max_calls": 50, "crash_on_reload": true});
    let t = Instant::now();
    let set = fleet.put_config(&format!("machine/{last}"), &bad).await?;
    let v2 = set["version"].as_u64().unwrap_or(0);
    let (list2, _) = fleet
        .wait_configs(|n| if n == last { v2 } else { v1 })
        .await?;
    let rolled = list2
        .iter()
        .find(|(n, _, _, _)| *n == last)
        .map(|(_, _, s, d)| (s.clone(), d.clone()))
        .unwrap_or_default();
    let others_kept = list2
        .iter()
        .filter(|(n, _, _, _)| *n != last)
        .all(|(_, v, s, _)| *v == v1 && s == "applied");
    let restored = fleet.config_file(workers - 1) == doc;
    println!(
        "14. an override for {last} (version {v2}) makes its software exit on the reload: {} after {:.1?}, version {v1} written back{}; the other workers untouched",
        rolled.0,
        t.elapsed(),
        if restored { "" } else { " (NOT restored)" }
    );
    let config_ok =
        applied == workers && files_ok && rolled.0 == "rolled_back" && others_kept && restored;

    // 6. What the controller knows.

    let machines = fleet.get("/v1/machines").await?;
    println!(
        "\n  MACHINE    STATUS COMPONENT        LB            SOFTWARE          CONFIG            POOL"
    );
    for m in machines.as_array().cloned().unwrap_or_default() {
        let pool = m["pool"]["members"]
            .as_array()
            .or_else(|| m["pool"].as_array())
            .map(|a| {
                a.iter()
                    .filter_map(|x| x["name"].as_str().map(String::from))
                    .collect::<Vec<_>>()
                    .join(",")
            })
            .unwrap_or_default();
        let software = match m["software"].as_object() {
            Some(sw) => format!(
                "{} {}",
                sw.get("service").and_then(Value::as_str).unwrap_or("?"),
                sw.get("version").and_then(Value::as_str).unwrap_or("?")
            ),
            None => "-".to_owned(),
        };
        let config = match m["config"].as_object() {
            Some(c) => format!(
                "v{} {}",
                c.get("version").and_then(Value::as_u64).unwrap_or(0),
                c.get("state").and_then(Value::as_str).unwrap_or("?")
            ),
            None => "-".to_owned(),
        };
        println!(
            "  {:<10} {:<6} {:<16} {:<13} {:<17} {:<17} {}",
            m["name"].as_str().unwrap_or("?"),
            m["status"].as_str().unwrap_or("?"),
            m["component"].as_str().unwrap_or("?"),
            match (m["call_router"].as_str(), m["coupling"]["state"].as_str()) {
                (Some(r), _) => format!("for {r}"),
                (None, Some(state)) =>
                    format!("{} {state}", m["load_balancer"].as_str().unwrap_or("-")),
                _ => m["load_balancer"].as_str().unwrap_or("-").to_owned(),
            },
            software,
            config,
            pool
        );
    }
    let all_up = machines
        .as_array()
        .is_some_and(|a| a.len() == workers && a.iter().all(|m| m["status"] == "up"));
    let ok = all_up
        && coupled_ok
        && rollout_ok
        && deployed_ok
        && config_ok
        && fleet.pool() == {
            let mut d = dependents.clone();
            d.sort();
            d
        };
    println!(
        "\n{}",
        if ok {
            format!(
                "cluster: all {workers} workers admitted, up and running messaging with their configuration; lb-1's pool lists every dependent and cr-1 follows lb-1"
            )
        } else {
            "cluster: NOT as expected (see above)".to_owned()
        }
    );
    fleet.shutdown().await;
    Ok(ok)
}
