//! Mistakes in a `#[derive(Row)]` are compile errors that say what is wrong.

#[test]
fn row_mistakes_do_not_compile() {
    let cases = trybuild::TestCases::new();
    cases.compile_fail("tests/ui/*.rs");
}
