// A handler taking `&S` needs an initial state first (`starting_from_default`,
// `starting_with`); without one, handlers receive `Option<&S>`.
use flows_core::function::{PersistenceIdFn, StatefulFunction};
use flows_core::{Json, Message, Record, Topic, Utf8};

fn main() {
    let _ = StatefulFunction::new(Json::<i64>::new()).one_to_one(
        Topic::new("words", Utf8, Utf8),
        Topic::new("counts", Utf8, Json::<i64>::new()),
        PersistenceIdFn::key(),
        |count: &i64, word: Message<String, String>| {
            Ok((count + 1, Record::new(word.key, count + 1)))
        },
    );
}
