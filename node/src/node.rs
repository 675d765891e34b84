//! Node runtime (in progress)
