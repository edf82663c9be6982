//! `ch-remote`: drives a running VMM through its REST API.

fn main() {}
