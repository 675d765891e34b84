//! Running the node for an operator: the systemd notify protocol and its watchdog
//! (`notify`, `supervise`), configuration reload on SIGHUP (`reload`), and the log (`logging`:
//! text or JSON, journald priorities) whose filter reload can change. It owns no storage or
//! replication logic: it reads `Shared` and talks to the writer thread like any other client.

pub mod errors;
pub mod logging;
pub mod notify;
pub mod reload;
pub mod supervise;

pub use errors::ErrorLog;
pub use notify::Notifier;
pub use reload::LogControl;
