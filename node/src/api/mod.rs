//! HTTP API (in progress)
