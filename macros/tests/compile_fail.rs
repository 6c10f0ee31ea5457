//! Mistakes in a `#[derive(Row)]`, and builder mistakes that are type errors (a `&S`
//! handler without an initial state), are compile errors that say what is wrong.

#[test]
fn row_mistakes_do_not_compile() {
    let cases = trybuild::TestCases::new();
    cases.compile_fail("tests/ui/*.rs");
}
