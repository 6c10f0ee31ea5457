#[derive(flows_core::Row)]
struct Twice {
    #[flows(key)]
    word: String,
    #[flows(rename = "WORD")]
    other: String,
}

fn main() {}
