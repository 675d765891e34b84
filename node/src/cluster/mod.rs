//! The cluster: a controller (admission, machine state, the broker's per-machine channels,
//! new state from notifications) and its workers (join, apply publications, report, relay for
//! dependents when a load balancer). Pure state machines in `controller::core` and
//! `worker::core`; the runtimes around them own the QUIC connections, the database and the
//! clock.

pub mod body;
pub mod controller;
pub mod keys;
mod store;
#[cfg(test)]
mod tests;
pub mod worker;
