//! Measures blob sealing, opening and hashing speed in memory, beside raw XChaCha20-Poly1305. Run: cargo run --release -p noa-store --example seal_speed
fn main() {
    let key = noa_store::crypto::DataKey::new([3u8; 32]);
    let data = vec![7u8; 64 << 20];
    let t = std::time::Instant::now();
    let mut s = noa_store::crypto::BlobFileSealer::new(&key, Vec::with_capacity(70 << 20)).unwrap();
    s.write(&data).unwrap();
    let (out, id, _) = s.finish().unwrap();
    let seal = t.elapsed();
    let t = std::time::Instant::now();
    let o = noa_store::crypto::BlobOpener::new(&key, &out[..], &id, "x")
        .unwrap()
        .read_all()
        .unwrap();
    let open = t.elapsed();
    assert_eq!(o.len(), data.len());
    let t = std::time::Instant::now();
    let h = key.hasher().update(&data).finalize();
    let hash = t.elapsed();
    {
        use chacha20poly1305::XChaCha20Poly1305;
        use chacha20poly1305::aead::{Aead, KeyInit};
        let c = XChaCha20Poly1305::new((&[1u8; 32]).into());
        let t = std::time::Instant::now();
        for chunk in data.chunks(64 << 10) {
            std::hint::black_box(c.encrypt(&[0u8; 24].into(), chunk).unwrap());
        }
        println!(
            "raw xchacha20-poly1305 {:.0} MiB/s",
            64.0 / t.elapsed().as_secs_f64()
        );
    }
    println!(
        "seal {:.0} MiB/s, open {:.0} MiB/s, keyed blake3 {:.0} MiB/s ({})",
        64.0 / seal.as_secs_f64(),
        64.0 / open.as_secs_f64(),
        64.0 / hash.as_secs_f64(),
        &h.to_hex()[..8]
    );
}
