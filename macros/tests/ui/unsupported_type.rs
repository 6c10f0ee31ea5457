#[derive(flows_core::Row)]
struct Reading {
    #[flows(key)]
    sensor: String,
    huge: u128,
}

fn main() {}
