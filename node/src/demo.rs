//! The demo (in progress)
