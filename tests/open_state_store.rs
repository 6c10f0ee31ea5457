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
