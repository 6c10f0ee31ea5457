#[derive(flows_core::Row)]
struct Reading {
    #[flows(key)]
    value: f64,
}

fn main() {}
