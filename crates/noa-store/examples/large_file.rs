//! Writes and reads one large file through the VFS, printing each phase's speed, and reads the raw blob file
//! with `cp` for comparison. Run: cargo run --release -p noa-store --example large_file -- 256
use std::time::Instant;

fn drop_caches() {
    let _ = std::process::Command::new("sync").status();
    let _ = std::fs::write("/proc/sys/vm/drop_caches", "3");
}

fn main() {
    let mib: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(256);
    let dir = tempfile::tempdir_in(".").unwrap();
    let store = noa_store::Store::open(&dir.path().join("noa.db")).unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let block: Vec<u8> = (0..1 << 20).map(|i| (i % 253) as u8).collect();
    let t = Instant::now();
    let mut w = store.blob_writer().unwrap();
    for i in 0..mib {
        let mut b = block.clone();
        b[0] = i as u8;
        w.write(&b).unwrap();
    }
    let blob = w.finish().unwrap();
    let id = blob.id.clone();
    rt.block_on(store.fs_commit(
        "x",
        vec![noa_store::FsOp::Put {
            path: "/shared/big".into(),
            blob,
        }],
    ))
    .unwrap();
    println!("write {:.0} MiB/s", mib as f64 / t.elapsed().as_secs_f64());
    drop_caches();
    let t = Instant::now();
    let mut n = 0;
    store
        .fs_open(&noa_store::VPath::parse("/shared/big").unwrap(), None)
        .unwrap()
        .for_each_chunk(|c| {
            n += c.len();
            Ok(())
        })
        .unwrap();
    println!("read {:.0} MiB/s", mib as f64 / t.elapsed().as_secs_f64());
    let file = dir.path().join("blobs").join(&id[..2]).join(&id);
    drop_caches();
    let t = Instant::now();
    std::process::Command::new("cp")
        .arg(&file)
        .arg("/dev/null")
        .status()
        .unwrap();
    println!(
        "cp of the blob file {:.0} MiB/s",
        mib as f64 / t.elapsed().as_secs_f64()
    );
    let t = Instant::now();
    let mut n = 0;
    store
        .fs_open(&noa_store::VPath::parse("/shared/big").unwrap(), None)
        .unwrap()
        .for_each_chunk(|c| {
            n += c.len();
            Ok(())
        })
        .unwrap();
    println!(
        "warm read {:.0} MiB/s",
        mib as f64 / t.elapsed().as_secs_f64()
    );
}
