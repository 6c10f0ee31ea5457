#[derive(flows_core::Row)]
struct Reading {
    #[flows(key)]
    sensor: Option<String>,
}

fn main() {}
