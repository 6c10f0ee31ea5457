#[derive(flows_core::Row)]
struct NoKey {
    word: String,
    count: i64,
}

fn main() {}
