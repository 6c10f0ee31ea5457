#[derive(flows_core::Row)]
struct Reading(String, i64);

fn main() {}
