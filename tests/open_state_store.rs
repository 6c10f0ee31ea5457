//! The facade picks a backend from the URL scheme.

#[tokio::test]
async fn memory_and_sqlite_urls_open_working_stores() {
    let dir = std::env::temp_dir().join(format!("flows-facade-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let sqlite_url = format!("sqlite://{}", dir.join("facade.db").display());
    for url in ["memory://", "sqlite::memory:", sqlite_url.as_str()] {
        let store = flows::open_state_store(url, "facade_states").await.unwrap();
        let id = flows::PersistenceId::new("k").unwrap();
        let written = store
            .upsert(&store.get(&id).await.unwrap().with_content(vec![1]))
            .await
            .unwrap();
        assert_eq!(written.version, 1, "{url}");
        assert_eq!(
            store.get(&id).await.unwrap().content,
            Some(vec![1]),
            "{url}"
        );
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

#[tokio::test]
async fn unknown_schemes_and_bad_table_names_are_configuration_errors() {
    let err = flows::open_state_store("redis://localhost", "t")
        .await
        .err()
        .unwrap();
    assert!(
        matches!(err, flows::RepositoryError::Configuration(_)),
        "{err}"
    );
    let err = flows::open_state_store("sqlite::memory:", "bad-name")
        .await
        .err()
        .unwrap();
    assert!(
        matches!(err, flows::RepositoryError::Configuration(_)),
        "{err}"
    );
}

/// One connection serves the state tables and the row tables of a program.
#[tokio::test]
async fn one_store_connection_opens_state_and_row_tables() {
    use flows::prelude::*;

    #[derive(Clone, Debug, PartialEq, flows::Row)]
    #[flows(table = "facade_rows")]
    struct Seen {
        #[flows(key)]
        word: String,
        times: i64,
    }

    let dir = std::env::temp_dir().join(format!("flows-facade-store-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let url = format!("sqlite://{}", dir.join("both.db").display());
    let store = Store::connect(&url).await.unwrap();
    let states = store.state_table("facade_store_states").await.unwrap();
    let rows = store.row_table::<Seen>().await.unwrap();
    let id = PersistenceId::new("fox").unwrap();
    states
        .upsert(&states.get(&id).await.unwrap().with_content(b"2".to_vec()))
        .await
        .unwrap();
    let seen = Seen {
        word: "fox".into(),
        times: 2,
    };
    rows.upsert_all(std::slice::from_ref(&seen)).await.unwrap();
    // Read back through a second connection to the same file.
    let again = Store::connect(&url).await.unwrap();
    let counts = StateReader::new(
        again.state_table("facade_store_states").await.unwrap(),
        Json::<i64>::new(),
    );
    assert_eq!(counts.content("fox").await.unwrap(), Some(2));
    let key = flows::PrimaryKey::from("fox".to_owned());
    let table = again.row_table::<Seen>().await.unwrap();
    assert_eq!(table.get_all(&[key]).await.unwrap(), vec![Some(seen)]);
    std::fs::remove_dir_all(&dir).unwrap();
}
