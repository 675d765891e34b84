//! Command line (in progress).
pub fn main() {}
