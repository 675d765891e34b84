//! Outpost: a durable edge node. One binary; its role decides what the box is.
#![forbid(unsafe_code)]

pub mod api;
pub mod bundle;
pub mod cli;
pub mod cluster;
pub mod config;
pub mod demo;
mod demo_cluster;
pub mod demo_sip;
pub mod fsmode;
#[doc(hidden)]
pub mod fuzzing;
pub mod ids;
pub mod model;
pub mod net;
pub mod node;
pub mod ops;
pub mod replication;
pub mod store;
pub mod testkit;
pub mod wire;
