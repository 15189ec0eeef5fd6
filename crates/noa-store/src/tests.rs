//! Store tests against real SQLite files.

use super::*;
use noa_types::ProcessSpec;

#[tokio::test]
async fn journal_and_registry_survive_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("noa.db");
    {
        let store = Store::open(&path).unwrap();
        let seq = store
            .append_durable(Event::new(
                Pid(2),
                "echo",
                "starting",
                serde_json::json!({"a":1}),
            ))
            .await
            .unwrap();
        assert_eq!(seq, 1);
        store.append(Event::new(
            Pid(2),
            "echo",
            "running",
            serde_json::Value::Null,
        ));
        store
            .put_spec(&ProcessSpec::native("echo", "python3", &["x.py"]))
            .await
            .unwrap();
        store
            .put_spec(&ProcessSpec::native("b", "true", &[]))
            .await
            .unwrap();
        store.set_os_pid("echo", Some((1234, 99)));
        store.flush().await.unwrap();
    }
    let store = Store::open(&path).unwrap();
    assert_eq!(store.schema_version().unwrap(), 1);
    let events = store.events(&EventQuery::default()).unwrap();
    assert_eq!(
        events.iter().map(|e| e.event.as_str()).collect::<Vec<_>>(),
        ["starting", "running"]
    );
    assert_eq!(events[0].detail["a"], 1);
    let specs = store.specs().unwrap();
    assert_eq!(specs.len(), 2);
    assert_eq!(specs[0].spec.name, "echo");
    assert_eq!(specs[0].os_pid, Some(1234));
    assert_eq!(specs[0].os_start, Some(99));
    assert!(store.remove_spec("echo").await.unwrap());
    assert!(!store.remove_spec("echo").await.unwrap());
    assert_eq!(store.specs().unwrap().len(), 1);
}

#[tokio::test]
async fn event_queries_filter_and_page() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&dir.path().join("noa.db")).unwrap();
    for i in 0..10u64 {
        store.append(Event::new(
            Pid(i % 2),
            if i % 2 == 0 { "a" } else { "b" },
            "running",
            serde_json::Value::Null,
        ));
    }
    store.flush().await.unwrap();
    let a = store
        .events(&EventQuery {
            name: Some("a".into()),
            ..Default::default()
        })
        .unwrap();
    assert_eq!(a.len(), 5);
    let last3 = store
        .events(&EventQuery {
            limit: Some(3),
            ..Default::default()
        })
        .unwrap();
    assert_eq!(last3.iter().map(|e| e.seq).collect::<Vec<_>>(), [8, 9, 10]);
    let after = store
        .events(&EventQuery {
            after: Some(8),
            ..Default::default()
        })
        .unwrap();
    assert_eq!(after.len(), 2);
}

#[test]
fn newer_schema_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("noa.db");
    drop(Store::open(&path).unwrap());
    let conn = rusqlite::Connection::open(&path).unwrap();
    conn.execute("INSERT INTO schema_migrations VALUES (99, 0)", [])
        .unwrap();
    drop(conn);
    let err = Store::open(&path).unwrap_err().to_string();
    assert!(
        err.contains("schema version 99") && err.contains("upgrade noa"),
        "{err}"
    );
}

#[test]
fn a_file_that_is_not_a_database_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("noa.db");
    std::fs::write(
        &path,
        b"this is not sqlite, just some text that is long enough to fill a header page....",
    )
    .unwrap();
    let err = Store::open(&path).unwrap_err().to_string();
    assert!(err.contains("NOA-E03"), "{err}");
}
