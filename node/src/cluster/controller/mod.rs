//! The controller role: admission, the machine-state database and the broker's channels.
//! `core` decides (pure); the rest is its runtime: `thread` owns the core and the database and
//! commits before anything is sent, `conn` owns the QUIC connections of the workers, `api` is
//! the HTTP API and `/metrics`, `run` starts and stops it all. Software delivery: `bundles` is
//! the bundle store (uploads, sealing), `deploy` the deployments (records, the seal worker, the
//! sweeper of sealed files), `transfer` serves sealed bundles on the workers' connections.
//! Configuration data: `configdata` versions the documents and merges a machine's effective
//! configuration; the core publishes it.
//! Nothing outside `core` decides who is admitted or what a machine is sent.

mod api;
pub(crate) use api::parse_deployment_request;
mod bundles;
mod cmd;
mod config_api;
pub mod configdata;
mod conn;
pub mod core;
pub mod deploy;
pub mod deploy_core;
#[cfg(test)]
mod deploy_tests;
mod deploy_view;
pub mod deployment;
mod journal;
mod refusal;
pub mod rollout;
mod run;
mod shared;
pub mod storage;
#[cfg(test)]
mod tests;
mod thread;
mod transfer;
mod views;
mod watch;

pub use cmd::{KeyView, MachineView, Summary};
pub use run::{ensure_signing_key, read_join_token, start, ControllerRunning};
pub use shared::ControllerShared;
