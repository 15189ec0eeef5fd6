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
    assert_eq!(store.schema_version().unwrap(), 3);
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

fn open_in(dir: &std::path::Path) -> Store {
    Store::open(&dir.join("noa.db")).unwrap()
}

fn p(s: &str) -> VPath {
    VPath::parse(s).unwrap()
}

/// Every file under `dir`, recursively.
fn all_files(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let path = e.path();
        // The WAL and its index disappear when the last connection closes.
        if path.to_string_lossy().contains(".db-") {
            continue;
        }
        if path.is_dir() {
            out.extend(all_files(&path));
        } else {
            out.push(path);
        }
    }
    out
}

#[tokio::test]
async fn files_have_history_rollback_and_dedup() {
    let dir = tempfile::tempdir().unwrap();
    let store = open_in(dir.path());
    let f = p("/shared/notes.md");
    let v1 = store.fs_write("user:admin", &f, b"one").await.unwrap();
    assert_eq!(v1.version, 1);
    store.fs_write("user:admin", &f, b"two!").await.unwrap();
    assert_eq!(
        store.fs_open(&f, None).unwrap().read_all().unwrap(),
        b"two!"
    );
    assert_eq!(
        store.fs_open(&f, Some(1)).unwrap().read_all().unwrap(),
        b"one"
    );
    let r = store
        .fs_commit(
            "user:admin",
            vec![FsOp::Rollback {
                path: f.to_string(),
                to: 1,
            }],
        )
        .await
        .unwrap();
    assert_eq!(r[0].version, 3);
    assert_eq!(store.fs_open(&f, None).unwrap().read_all().unwrap(), b"one");
    let h = store.fs_history(&f).unwrap();
    assert_eq!(
        h.iter().map(|i| i.op.as_str()).collect::<Vec<_>>(),
        ["write", "write", "rollback"]
    );
    let e = store
        .fs_commit(
            "user:admin",
            vec![FsOp::Rollback {
                path: f.to_string(),
                to: 9,
            }],
        )
        .await
        .unwrap_err();
    assert!(
        e.to_string().contains("has no version 9 (it has 1..=3)"),
        "{e}"
    );
    // Two large files with the same contents share one blob file.
    let big = vec![42u8; 300_000];
    store
        .fs_write("u", &p("/shared/a.bin"), &big)
        .await
        .unwrap();
    store
        .fs_write("u", &p("/shared/b.bin"), &big)
        .await
        .unwrap();
    let blob_files: Vec<_> = all_files(&dir.path().join("blobs"));
    assert_eq!(blob_files.len(), 1, "{blob_files:?}");
    assert_eq!(
        store
            .fs_open(&p("/shared/b.bin"), None)
            .unwrap()
            .read_all()
            .unwrap(),
        big
    );
    let listing = store.fs_list(&p("/shared")).unwrap();
    let names: Vec<_> = listing.iter().map(|e| e.name.as_str()).collect();
    assert_eq!(names, ["a.bin", "b.bin", "notes.md"]);
    store
        .fs_write("u", &p("/shared/sub/deep/x"), b"x")
        .await
        .unwrap();
    let listing = store.fs_list(&p("/shared")).unwrap();
    assert!(listing.iter().any(|e| e.name == "sub" && e.dir));
    // Deleting keeps the history; reading a missing file names it.
    store
        .fs_commit(
            "u",
            vec![FsOp::Delete {
                path: "/shared/notes.md".into(),
            }],
        )
        .await
        .unwrap();
    let e = store.fs_open(&f, None).unwrap_err().to_string();
    assert!(
        e.contains("NOA-E0310 no such file: /shared/notes.md"),
        "{e}"
    );
    assert_eq!(store.fs_history(&f).unwrap().len(), 4);
}

#[tokio::test]
async fn transactions_are_all_or_nothing_and_quotas_hold() {
    let dir = tempfile::tempdir().unwrap();
    let mut opts = StoreOptions::for_dir(dir.path());
    opts.quotas = Quotas {
        agent: 100,
        run: 0,
        shared: 0,
    };
    let store = Store::open_with(&dir.path().join("noa.db"), opts).unwrap();
    let stage = |data: &[u8]| {
        let mut w = store.blob_writer().unwrap();
        w.write(data).unwrap();
        w.finish().unwrap()
    };
    // The second op fails (no such file to delete): the first one must not be applied either.
    let e = store
        .fs_commit(
            "u",
            vec![
                FsOp::Put {
                    path: "/shared/t1".into(),
                    blob: stage(b"a"),
                },
                FsOp::Delete {
                    path: "/shared/missing".into(),
                },
            ],
        )
        .await
        .unwrap_err();
    assert!(e.to_string().contains("/shared/missing"), "{e}");
    assert!(store.fs_open(&p("/shared/t1"), None).is_err());
    // The quota of an agent's namespace.
    store
        .fs_write("u", &p("/agents/bot/a"), &[0u8; 60])
        .await
        .unwrap();
    let e = store
        .fs_write("u", &p("/agents/bot/b"), &[0u8; 60])
        .await
        .unwrap_err();
    assert!(
        e.to_string().contains(
            "quota exceeded for /agents/bot: 60 of 100 bytes used, this change needs 60 more"
        ),
        "{e}"
    );
    // Overwriting with a smaller file frees space; another agent has its own quota.
    store
        .fs_write("u", &p("/agents/bot/a"), &[0u8; 10])
        .await
        .unwrap();
    store
        .fs_write("u", &p("/agents/bot/b"), &[0u8; 60])
        .await
        .unwrap();
    store
        .fs_write("u", &p("/agents/other/a"), &[0u8; 90])
        .await
        .unwrap();
    let usage = store.fs_usage().unwrap();
    assert!(
        usage.contains(&("/agents/bot".into(), 70, 100)),
        "{usage:?}"
    );
    // Failed writes are audited too.
    let failed = store
        .audit_query(&AuditQuery {
            action: Some("fs.*".into()),
            ..Default::default()
        })
        .unwrap();
    assert!(
        failed
            .iter()
            .any(|a| a.outcome == "failed" && a.resource == "/agents/bot/b")
    );
}

#[tokio::test]
async fn nothing_is_stored_in_plaintext() {
    let dir = tempfile::tempdir().unwrap();
    let store = open_in(dir.path());
    let marker = b"PLAINTEXT-MARKER-7f3a";
    store
        .fs_write("u", &p("/shared/small"), marker)
        .await
        .unwrap();
    let mut big = Vec::new();
    while big.len() < 500_000 {
        big.extend_from_slice(marker);
    }
    store.fs_write("u", &p("/shared/big"), &big).await.unwrap();
    store
        .secret_set("u", "api_key", b"SECRET-VALUE-91c2")
        .await
        .unwrap();
    store.flush().await.unwrap();
    for file in all_files(dir.path()) {
        let Ok(bytes) = std::fs::read(&file) else {
            continue;
        };
        for needle in [&marker[..], b"SECRET-VALUE-91c2"] {
            assert!(
                !bytes.windows(needle.len()).any(|w| w == needle),
                "{} holds plaintext",
                file.display()
            );
        }
    }
    let store = open_in(dir.path());
    assert_eq!(
        store
            .fs_open(&p("/shared/big"), None)
            .unwrap()
            .read_all()
            .unwrap(),
        big
    );
    assert_eq!(
        store.secret_read("u", "api_key", "test").unwrap(),
        b"SECRET-VALUE-91c2"
    );
}

#[tokio::test]
async fn rekey_changes_the_wrapping_key_and_wrong_keys_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("noa.db");
    let store = open_in(dir.path());
    store.fs_write("u", &p("/shared/x"), b"kept").await.unwrap();
    let old_key = std::fs::read(dir.path().join("store.key")).unwrap();
    let old_id = store.kek_id();
    let new_id = store
        .rekey("u", KeySource::File(dir.path().join("store.key")))
        .await
        .unwrap();
    assert_ne!(old_id, new_id);
    assert_ne!(
        std::fs::read(dir.path().join("store.key")).unwrap(),
        old_key
    );
    drop(store);
    let store = open_in(dir.path());
    assert_eq!(
        store
            .fs_open(&p("/shared/x"), None)
            .unwrap()
            .read_all()
            .unwrap(),
        b"kept"
    );
    // To a passphrase, then back to a key file.
    store
        .rekey("u", KeySource::Passphrase("correct horse".into()))
        .await
        .unwrap();
    drop(store);
    let e = Store::open(&db).unwrap_err().to_string();
    assert!(e.contains("protected by a passphrase"), "{e}");
    let mut opts = StoreOptions::for_dir(dir.path());
    opts.key = KeySource::Passphrase("wrong".into());
    let e = Store::open_with(&db, opts.clone()).unwrap_err().to_string();
    assert!(
        e.contains("NOA-E0306") && e.contains("passphrase is wrong"),
        "{e}"
    );
    opts.key = KeySource::Passphrase("correct horse".into());
    let store = Store::open_with(&db, opts).unwrap();
    assert_eq!(
        store
            .fs_open(&p("/shared/x"), None)
            .unwrap()
            .read_all()
            .unwrap(),
        b"kept"
    );
    // A crash after the database changed but before the key file was renamed still opens.
    let key_path = dir.path().join("store.key");
    store
        .rekey("u", KeySource::File(key_path.clone()))
        .await
        .unwrap();
    drop(store);
    let current = std::fs::read(&key_path).unwrap();
    std::fs::rename(&key_path, keyring::pending_path(&key_path)).unwrap();
    std::fs::write(&key_path, &old_key).unwrap();
    let store = open_in(dir.path());
    assert_eq!(std::fs::read(&key_path).unwrap(), current);
    assert_eq!(
        store
            .fs_open(&p("/shared/x"), None)
            .unwrap()
            .read_all()
            .unwrap(),
        b"kept"
    );
    drop(store);
    std::fs::write(&key_path, &old_key).unwrap();
    let e = Store::open(&db).unwrap_err().to_string();
    assert!(e.contains("does not unlock this store"), "{e}");
}

async fn audit_some(store: &Store, n: usize) {
    for i in 0..n {
        store.audit(AuditRecord::new(
            "u",
            "test.op",
            format!("r{i}"),
            "ok",
            serde_json::json!({"i": i}),
        ));
    }
    store.flush().await.unwrap();
}

/// Runs SQL on the database as an attacker with the `sqlite3` tool would.
fn tamper(db: &std::path::Path, sql: &str) {
    let c = rusqlite::Connection::open(db).unwrap();
    c.execute_batch(sql).unwrap();
}

#[tokio::test]
async fn audit_verify_names_edits_removals_and_reorders() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("noa.db");
    let mut opts = StoreOptions::for_dir(dir.path());
    opts.checkpoint_every = 10;
    let store = Store::open_with(&db, opts.clone()).unwrap();
    audit_some(&store, 35).await;
    let ok = store.audit_verify().unwrap();
    assert_eq!(ok.problem, None);
    assert_eq!(
        (ok.records, ok.checkpoints, ok.last_checkpoint),
        (35, 3, Some(30))
    );
    drop(store);
    let fresh = |sql: &str| {
        let d = tempfile::tempdir().unwrap();
        for f in [
            "noa.db",
            "noa.db-wal",
            "store.key",
            "node.key",
            "audit.head",
        ] {
            let _ = std::fs::copy(dir.path().join(f), d.path().join(f));
        }
        tamper(&d.path().join("noa.db"), sql);
        let mut o = StoreOptions::for_dir(d.path());
        o.checkpoint_every = 10;
        let s = Store::open_with(&d.path().join("noa.db"), o).unwrap();
        let r = s.audit_verify().unwrap();
        (r.problem.unwrap_or_default(), r.at)
    };
    let (m, at) = fresh("UPDATE audit SET outcome = 'denied' WHERE seq = 7");
    assert_eq!(
        (m.as_str(), at),
        (
            "record 7 was edited: its contents do not match its hash",
            Some(7)
        )
    );
    let (m, at) = fresh("DELETE FROM audit WHERE seq = 12");
    assert_eq!(
        (m.as_str(), at),
        ("record 12 is missing: it was removed", Some(12))
    );
    let (m, at) = fresh(
        "UPDATE audit SET seq = -1 WHERE seq = 15; UPDATE audit SET seq = 15 WHERE seq = 16; UPDATE audit SET seq = 16 WHERE seq = -1;",
    );
    assert!(m.starts_with("record 15 does not follow record 14"), "{m}");
    assert_eq!(at, Some(15));
    let (m, _) = fresh("DELETE FROM audit WHERE seq > 25");
    assert!(
        m.contains("records from 26 on were removed: checkpoint 30 is signed"),
        "{m}"
    );
    // An attacker who rewrites a record and recomputes every hash after it still fails at the checkpoint signature.
    let (m, _) = fresh("UPDATE audit_checkpoints SET signature = zeroblob(64) WHERE seq = 20");
    assert!(m.contains("checkpoint 20 has no valid signature"), "{m}");
    // The chain goes on across reopen.
    let store = Store::open_with(&db, opts).unwrap();
    audit_some(&store, 5).await;
    assert_eq!(store.audit_verify().unwrap().records, 40);
}

#[tokio::test]
async fn backup_under_writes_restores_and_verifies() {
    let dir = tempfile::tempdir().unwrap();
    let store = open_in(dir.path());
    let big: Vec<u8> = (0..400_000u32).map(|i| (i % 253) as u8).collect();
    store.fs_write("u", &p("/shared/big"), &big).await.unwrap();
    store
        .fs_write("u", &p("/shared/small"), b"small")
        .await
        .unwrap();
    store.secret_set("u", "tok", b"v").await.unwrap();
    // Keep writing while the backup runs.
    let writer = {
        let store = store.clone();
        tokio::spawn(async move {
            for i in 0..200 {
                store
                    .fs_write(
                        "u",
                        &p(&format!("/shared/w/{i}")),
                        format!("{i}").as_bytes(),
                    )
                    .await
                    .unwrap();
            }
        })
    };
    let archive = dir.path().join("b.noabak");
    let s2 = store.clone();
    let a2 = archive.clone();
    let manifest =
        tokio::task::spawn_blocking(move || s2.backup_to_file(&a2, false, &mut |_, _| {}))
            .await
            .unwrap()
            .unwrap();
    writer.await.unwrap();
    assert!(!manifest.includes_keys);
    assert!(
        manifest
            .entries
            .iter()
            .any(|e| e.path.starts_with("blobs/"))
    );
    backup::verify(&archive, &mut |_, _| {}).unwrap();
    let target = dir.path().join("restored");
    let e = backup::restore(&archive, &target, None, &mut |_, _| {}).unwrap_err();
    assert!(e.to_string().contains("--key-file"), "{e}");
    assert!(!target.exists());
    backup::restore(
        &archive,
        &target,
        Some(&dir.path().join("store.key")),
        &mut |_, _| {},
    )
    .unwrap();
    let restored = open_in(&target);
    assert_eq!(
        restored
            .fs_open(&p("/shared/big"), None)
            .unwrap()
            .read_all()
            .unwrap(),
        big
    );
    assert_eq!(restored.secret_read("u", "tok", "t").unwrap(), b"v");
    assert_eq!(restored.audit_verify().unwrap().problem, None);
    // Into a non-empty folder: refused.
    let e = backup::restore(&archive, &target, None, &mut |_, _| {}).unwrap_err();
    assert!(e.to_string().contains("not empty"), "{e}");
    // A truncated archive and a corrupted one.
    let bytes = std::fs::read(&archive).unwrap();
    let cut = dir.path().join("cut.noabak");
    std::fs::write(&cut, &bytes[..bytes.len() / 2]).unwrap();
    let e = backup::verify(&cut, &mut |_, _| {})
        .unwrap_err()
        .to_string();
    assert!(e.contains("truncated"), "{e}");
    let mut bad = bytes.clone();
    let at = bad.len() / 3;
    bad[at] ^= 0xff;
    let badp = dir.path().join("bad.noabak");
    std::fs::write(&badp, &bad).unwrap();
    let e = backup::verify(&badp, &mut |_, _| {})
        .unwrap_err()
        .to_string();
    assert!(e.contains("corrupt") || e.contains("differs"), "{e}");
    let e = backup::restore(
        &badp,
        &dir.path().join("r2"),
        Some(&dir.path().join("store.key")),
        &mut |_, _| {},
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("NOA-E0316"), "{e}");
    assert!(!dir.path().join("r2").exists());
}

#[tokio::test]
async fn secrets_are_named_listed_and_audited() {
    let dir = tempfile::tempdir().unwrap();
    let store = open_in(dir.path());
    let e = store
        .secret_set("u", "bad name", b"v")
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("NOA-E0315"), "{e}");
    store.secret_set("u", "openai_key", b"sk-1").await.unwrap();
    store.secret_set("u", "openai_key", b"sk-2").await.unwrap();
    assert_eq!(store.secrets().unwrap().len(), 1);
    assert_eq!(
        store
            .secret_read("agent:bot", "openai_key", "spawn")
            .unwrap(),
        b"sk-2"
    );
    store.secret_delete("u", "openai_key").await.unwrap();
    let e = store
        .secret_delete("u", "openai_key")
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("no such secret: openai_key"), "{e}");
    store.flush().await.unwrap();
    let log = store
        .audit_query(&AuditQuery {
            action: Some("secret.*".into()),
            ..Default::default()
        })
        .unwrap();
    let actions: Vec<_> = log
        .iter()
        .map(|a| (a.action.as_str(), a.outcome.as_str()))
        .collect();
    assert_eq!(
        actions,
        [
            ("secret.write", "ok"),
            ("secret.write", "ok"),
            ("secret.read", "ok"),
            ("secret.delete", "ok"),
            ("secret.delete", "failed")
        ]
    );
    assert!(!serde_json::to_string(&log).unwrap().contains("sk-"));
}
