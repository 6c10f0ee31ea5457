#[derive(flows_core::Row)]
struct Reading {
    #[flows(primary)]
    sensor: String,
}

fn main() {}
