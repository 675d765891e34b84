//! Running the node for an operator, for every role: the systemd notify protocol (`notify`),
//! what a config reload changes (`reload`), the recent-errors log (`errors`) and the log itself
//! (`logging`: text or JSON, journald priorities) whose filter a reload can change. It owns no
//! storage or replication logic and imports no role: a datacenter's watchdog loop and reload
//! are `crate::datacenter::{supervise, reload}`.

pub mod errors;
pub mod logging;
pub mod notify;
pub mod reload;
pub mod shutdown;
pub mod watchdog;

pub use errors::ErrorLog;
pub use notify::Notifier;
pub use reload::LogControl;
