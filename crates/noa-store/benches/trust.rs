//! Store benchmarks, each beside its peer from the same run on the same disk:
//! - 4 KiB durable file writes through the VFS against raw SQLite inserts of the same bytes (WAL, synchronous=FULL);
//! - a 256 MiB encrypted file written and read through the VFS against `cp` (+ fsync) of the same file;
//! - a backup of 1 GiB of files against `tar` of the same data directory;
//! - audit appends and `verify` against raw SQLite inserts and a raw scan of the same rows.
//!
//! Run: `cargo bench -p noa-store --bench trust` (medians of 3 runs; `NOA_BENCH_QUICK=1` for smaller sizes).

use noa_store::{AuditRecord, FsOp, Store, VPath};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

fn quick() -> bool {
    std::env::var_os("NOA_BENCH_QUICK").is_some()
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

fn secs(d: Duration) -> f64 {
    d.as_secs_f64()
}

/// Sequential 4 KiB writes, each acknowledged only when durable; and 32 concurrent writers (group commit).
fn small_files(n: usize) -> (f64, f64, f64) {
    let dir = tempfile::tempdir_in(".").unwrap();
    let store = Store::open(&dir.path().join("noa.db")).unwrap();
    let data: Vec<u8> = (0..4096).map(|i| (i % 251) as u8).collect();
    let rt = rt();
    let start = Instant::now();
    rt.block_on(async {
        for i in 0..n {
            // Distinct contents, so nothing is deduplicated.
            let mut d = data.clone();
            d[..8].copy_from_slice(&(i as u64).to_le_bytes());
            store
                .fs_write(
                    "bench",
                    &VPath::parse(&format!("/shared/s/{i}")).unwrap(),
                    &d,
                )
                .await
                .unwrap();
        }
    });
    let seq = n as f64 / secs(start.elapsed());
    let start = Instant::now();
    rt.block_on(async {
        let mut tasks = Vec::new();
        for w in 0..32 {
            let store = store.clone();
            let data = data.clone();
            tasks.push(tokio::spawn(async move {
                for i in (w..n).step_by(32) {
                    let mut d = data.clone();
                    d[..8].copy_from_slice(&((i + n) as u64).to_le_bytes());
                    store
                        .fs_write(
                            "bench",
                            &VPath::parse(&format!("/shared/c/{i}")).unwrap(),
                            &d,
                        )
                        .await
                        .unwrap();
                }
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
    });
    let conc = n as f64 / secs(start.elapsed());
    // The peer: raw SQLite, same journal mode and synchronous setting, one insert per transaction.
    let raw_path = dir.path().join("raw.db");
    let conn = rusqlite::Connection::open(&raw_path).unwrap();
    conn.pragma_update(None, "journal_mode", "WAL").unwrap();
    conn.pragma_update(None, "synchronous", "FULL").unwrap();
    conn.execute_batch("CREATE TABLE f (path TEXT PRIMARY KEY, data BLOB)")
        .unwrap();
    let start = Instant::now();
    for i in 0..n {
        let mut d = data.clone();
        d[..8].copy_from_slice(&(i as u64).to_le_bytes());
        conn.execute(
            "INSERT INTO f (path, data) VALUES (?1, ?2)",
            rusqlite::params![format!("/shared/s/{i}"), d],
        )
        .unwrap();
    }
    let raw = n as f64 / secs(start.elapsed());
    (seq, conc, raw)
}

/// Drops the page cache (root only) so that reads come from the disk; returns whether it could. It first lets
/// the disk settle (pending writeback of earlier writes would slow whichever read comes first).
fn drop_caches() -> bool {
    let synced = Command::new("sync").status().is_ok_and(|s| s.success());
    std::thread::sleep(Duration::from_secs(1));
    synced && std::fs::write("/proc/sys/vm/drop_caches", "3").is_ok()
}

fn fsync(path: &Path) {
    std::fs::File::open(path).unwrap().sync_all().unwrap();
}

/// A large file through the VFS (encrypt, hash, write, fsync, commit) and back, against `cp`.
fn large_file(mib: usize) -> (f64, f64, f64, f64) {
    let dir = tempfile::tempdir_in(".").unwrap();
    let src = dir.path().join("src.bin");
    {
        use std::io::Write;
        let mut f = std::io::BufWriter::new(std::fs::File::create(&src).unwrap());
        let mut block = vec![0u8; 1 << 20];
        for i in 0..mib {
            for (j, b) in block.iter_mut().enumerate() {
                *b = ((i * 31 + j * 7) % 256) as u8;
            }
            f.write_all(&block).unwrap();
        }
    }
    fsync(&src);
    let bytes = (mib << 20) as f64;
    let store = Store::open(&dir.path().join("noa.db")).unwrap();
    let rt = rt();
    // Write: read the source, stream it into an encrypted blob, fsync, commit.
    let start = Instant::now();
    let blob = {
        use std::io::Read;
        let mut f = std::fs::File::open(&src).unwrap();
        let mut w = store.blob_writer().unwrap();
        let mut buf = vec![0u8; 1 << 20];
        loop {
            let n = f.read(&mut buf).unwrap();
            if n == 0 {
                break;
            }
            w.write(&buf[..n]).unwrap();
        }
        w.finish().unwrap()
    };
    rt.block_on(store.fs_commit(
        "bench",
        vec![FsOp::Put {
            path: "/shared/big.bin".into(),
            blob,
        }],
    ))
    .unwrap();
    let write = bytes / secs(start.elapsed());
    // The peer: cp of the same file on the same disk, then fsync of the copy.
    let dst = dir.path().join("copy.bin");
    let start = Instant::now();
    assert!(
        Command::new("cp")
            .arg(&src)
            .arg(&dst)
            .status()
            .unwrap()
            .success()
    );
    fsync(&dst);
    let cp_write = bytes / secs(start.elapsed());
    // Read: decrypt and verify every chunk, from a cold cache where the bench may drop it. The reads follow
    // 512 MiB of fsynced writes, and whichever read comes first is slowed while the disk settles (measured:
    // 0.3-0.4 of the speed of later ones, for either side). So an untimed cold read of the source comes
    // first, then the sides alternate (VFS, cp, cp, VFS) and each side's figure is over its two reads.
    let vfs_read = || {
        drop_caches();
        let start = Instant::now();
        let mut total = 0usize;
        store
            .fs_open(&VPath::parse("/shared/big.bin").unwrap(), None)
            .unwrap()
            .for_each_chunk(|c| {
                total += c.len();
                Ok(())
            })
            .unwrap();
        assert_eq!(total, mib << 20);
        secs(start.elapsed())
    };
    let cp_read = |file: &Path| {
        drop_caches();
        let start = Instant::now();
        assert!(
            Command::new("cp")
                .arg(file)
                .arg("/dev/null")
                .status()
                .unwrap()
                .success()
        );
        secs(start.elapsed())
    };
    cp_read(&src);
    let (a, b, c, d) = (vfs_read(), cp_read(&dst), cp_read(&dst), vfs_read());
    let read = 2.0 * bytes / (a + d);
    let cp_read = 2.0 * bytes / (b + c);
    (write, read, cp_write, cp_read)
}

/// A backup of `mib` MiB of files against tar of the same data directory.
fn backup(mib: usize) -> (f64, f64) {
    let dir = tempfile::tempdir_in(".").unwrap();
    let data = dir.path().join("data");
    std::fs::create_dir(&data).unwrap();
    let store = Store::open(&data.join("noa.db")).unwrap();
    let rt = rt();
    let per = 16usize;
    for i in 0..mib / per {
        let mut w = store.blob_writer().unwrap();
        let mut block = vec![0u8; 1 << 20];
        for j in 0..per {
            block[..16].copy_from_slice(&[(i * per + j) as u8; 16]);
            block[16..24].copy_from_slice(&(i as u64).to_le_bytes());
            w.write(&block).unwrap();
        }
        let blob = w.finish().unwrap();
        rt.block_on(store.fs_commit(
            "bench",
            vec![FsOp::Put {
                path: format!("/shared/b/{i}"),
                blob,
            }],
        ))
        .unwrap();
    }
    rt.block_on(store.flush()).unwrap();
    let out = dir.path().join("b.noabak");
    let start = Instant::now();
    store.backup_to_file(&out, false, &mut |_, _| {}).unwrap();
    let ours = secs(start.elapsed());
    let tar_out = dir.path().join("b.tar");
    let start = Instant::now();
    assert!(
        Command::new("tar")
            .arg("cf")
            .arg(&tar_out)
            .arg("-C")
            .arg(&data)
            .arg(".")
            .status()
            .unwrap()
            .success()
    );
    fsync(&tar_out);
    let tar = secs(start.elapsed());
    (ours, tar)
}

/// Audit appends (group-committed by the writer) and verification, against raw SQLite.
fn audit(n: usize) -> (f64, f64, f64, f64) {
    let dir = tempfile::tempdir_in(".").unwrap();
    let store = Store::open(&dir.path().join("noa.db")).unwrap();
    let rt = rt();
    let start = Instant::now();
    rt.block_on(async {
        for i in 0..n {
            store.audit(AuditRecord::new(
                "user:admin",
                "fs.write",
                format!("/shared/f{i}"),
                "ok",
                serde_json::json!({ "size": i }),
            ));
        }
        store.flush().await.unwrap();
    });
    let append = n as f64 / secs(start.elapsed());
    let start = Instant::now();
    let report = store.audit_verify().unwrap();
    assert_eq!(report.problem, None);
    let verify = n as f64 / secs(start.elapsed());
    // Peers: the same rows inserted raw in batches of 1024 per transaction, and a raw scan reading every column.
    let conn = rusqlite::Connection::open(dir.path().join("raw.db")).unwrap();
    conn.pragma_update(None, "journal_mode", "WAL").unwrap();
    conn.pragma_update(None, "synchronous", "FULL").unwrap();
    conn.execute_batch(
        "CREATE TABLE audit (seq INTEGER PRIMARY KEY, ts_ms INTEGER, principal TEXT, action TEXT, resource TEXT,
         outcome TEXT, detail TEXT, prev BLOB, hash BLOB)",
    )
    .unwrap();
    let start = Instant::now();
    let mut i = 0;
    while i < n {
        let tx = conn.unchecked_transaction().unwrap();
        for k in i..(i + 1024).min(n) {
            tx.prepare_cached("INSERT INTO audit VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)")
                .unwrap()
                .execute(rusqlite::params![
                    k as i64,
                    0i64,
                    "user:admin",
                    "fs.write",
                    format!("/shared/f{k}"),
                    "ok",
                    format!("{{\"size\":{k}}}"),
                    &[0u8; 32][..],
                    &[0u8; 32][..]
                ])
                .unwrap();
        }
        tx.commit().unwrap();
        i += 1024;
    }
    let raw_append = n as f64 / secs(start.elapsed());
    let start = Instant::now();
    let mut st = conn.prepare("SELECT * FROM audit ORDER BY seq").unwrap();
    let mut rows = st.query([]).unwrap();
    let mut count = 0;
    while let Some(r) = rows.next().unwrap() {
        let _ = r.get_ref(4).unwrap();
        count += 1;
    }
    assert_eq!(count, n);
    let raw_scan = n as f64 / secs(start.elapsed());
    (append, verify, raw_append, raw_scan)
}

fn main() {
    // Criterion-style arguments (`--bench`) are accepted and ignored.
    let q = quick();
    let runs = if q { 1 } else { 3 };
    let (small_n, large_mib, backup_mib, audit_n) = if q {
        (200, 32, 64, 20_000)
    } else {
        (2_000, 256, 1024, 200_000)
    };
    let large_mib = std::env::var("NOA_BENCH_LARGE_MIB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(large_mib);
    println!(
        "reads of large files are from a {} page cache",
        if drop_caches() {
            "cold (dropped)"
        } else {
            "warm (cannot drop it without root)"
        }
    );
    // `NOA_BENCH_ONLY=large` (or small, backup, audit) runs one part.
    let only = std::env::var("NOA_BENCH_ONLY").unwrap_or_default();
    let part = |name: &str| only.is_empty() || only == name;
    if part("small") {
        let mut s = (vec![], vec![], vec![]);
        for _ in 0..runs {
            let (a, b, c) = small_files(small_n);
            s.0.push(a);
            s.1.push(b);
            s.2.push(c);
        }
        let (seq, conc, raw) = (median(s.0), median(s.1), median(s.2));
        println!(
            "4 KiB durable writes: VFS {seq:.0}/s sequential, {conc:.0}/s with 32 writers; raw SQLite insert {raw:.0}/s; ratio {:.2} (sequential), {:.2} (concurrent)",
            seq / raw,
            conc / raw
        );
    }
    if part("large") {
        let mut l = (vec![], vec![], vec![], vec![]);
        for _ in 0..runs {
            let (a, b, c, d) = large_file(large_mib);
            l.0.push(a);
            l.1.push(b);
            l.2.push(c);
            l.3.push(d);
        }
        let mib = |v: f64| v / (1u64 << 20) as f64;
        let (w, r, cw, cr) = (median(l.0), median(l.1), median(l.2), median(l.3));
        println!(
            "{large_mib} MiB file: encrypted write {:.0} MiB/s vs cp+fsync {:.0} MiB/s (ratio {:.2}); read {:.0} MiB/s vs cp {:.0} MiB/s (ratio {:.2})",
            mib(w),
            mib(cw),
            w / cw,
            mib(r),
            mib(cr),
            r / cr
        );
    }
    if part("backup") {
        let mut b = (vec![], vec![]);
        for _ in 0..runs {
            let (o, t) = backup(backup_mib);
            b.0.push(o);
            b.1.push(t);
        }
        let (o, t) = (median(b.0), median(b.1));
        println!(
            "backup of {backup_mib} MiB of files: {o:.2} s vs tar {t:.2} s (ratio {:.2} of tar's time)",
            o / t
        );
    }
    if part("audit") {
        let mut a = (vec![], vec![], vec![], vec![]);
        for _ in 0..runs {
            let (x, y, z, w) = audit(audit_n);
            a.0.push(x);
            a.1.push(y);
            a.2.push(z);
            a.3.push(w);
        }
        let (ap, ve, rap, rsc) = (median(a.0), median(a.1), median(a.2), median(a.3));
        println!(
            "audit: append {ap:.0}/s vs raw batched insert {rap:.0}/s (ratio {:.2}); verify {ve:.0}/s vs raw scan {rsc:.0}/s (ratio {:.2})",
            ap / rap,
            ve / rsc
        );
    }
}
