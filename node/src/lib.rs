//! Outpost: a durable edge node. One binary; its role decides what the box is.
#![forbid(unsafe_code)]

pub mod boot;
pub mod bundle;
pub mod cli;
pub mod clock;
pub mod cluster;
pub mod config;
pub mod datacenter;
pub mod demo;
mod demo_cluster;
pub mod demo_sip;
pub mod fsmode;
#[doc(hidden)]
pub mod fuzzing;
pub mod http;
pub mod ids;
pub mod limits;
pub mod model;
pub mod net;
pub mod ops;
pub mod replication;
pub mod roles;
pub mod store;
pub mod testkit;
pub mod wire;
