#[derive(flows_core::Row)]
#[flows(table = "word counts; drop table x")]
struct Counts {
    #[flows(key)]
    word: String,
}

fn main() {}
