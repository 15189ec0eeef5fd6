//! Bus benchmarks, each beside its peer from the same run: publish→deliver throughput against a raw
//! `tokio::sync::mpsc` channel (the limit), and request/reply latency against a raw mpsc + oneshot round trip.
//! Run: `cargo bench -p noa-bus --bench bus` (prints medians of 5 runs and the ratios).

use noa_bus::{Bus, Message, Subject};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot};

const MESSAGES: u64 = 2_000_000;
const CAPACITY: usize = 65_536;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

fn percentile(v: &mut [Duration], p: f64) -> Duration {
    v.sort();
    v[((v.len() as f64 - 1.0) * p).round() as usize]
}

/// Both sides of each throughput run use the same flow control: the publisher yields while the consumer is
/// more than half a buffer behind, so nothing is dropped and the run measures delivered messages.
async fn bus_throughput() -> f64 {
    let bus = Bus::local();
    let mut sub = bus.subscribe("bench.throughput", None, CAPACITY).unwrap();
    let subject = Subject::new("bench.throughput").unwrap();
    let payload = bytes::Bytes::from_static(b"0123456789abcdef");
    let received = Arc::new(AtomicU64::new(0));
    let seen = received.clone();
    let start = Instant::now();
    let consumer = tokio::spawn(async move {
        let mut n = 0u64;
        while n < MESSAGES {
            if sub.recv().await.is_none() {
                break;
            }
            n += 1;
            seen.store(n, Ordering::Relaxed);
        }
        n
    });
    for sent in 0..MESSAGES {
        while sent - received.load(Ordering::Relaxed) > (CAPACITY / 2) as u64 {
            tokio::task::yield_now().await;
        }
        bus.publish(Message::new(subject.clone(), payload.clone()))
            .unwrap();
    }
    assert_eq!(consumer.await.unwrap(), MESSAGES);
    assert_eq!(bus.stats().dropped, 0);
    MESSAGES as f64 / start.elapsed().as_secs_f64()
}

async fn mpsc_throughput() -> f64 {
    let (tx, mut rx) = mpsc::channel::<(Subject, bytes::Bytes)>(CAPACITY);
    let subject = Subject::new("bench.throughput").unwrap();
    let payload = bytes::Bytes::from_static(b"0123456789abcdef");
    let received = Arc::new(AtomicU64::new(0));
    let seen = received.clone();
    let start = Instant::now();
    let consumer = tokio::spawn(async move {
        let mut n = 0u64;
        while rx.recv().await.is_some() {
            n += 1;
            seen.store(n, Ordering::Relaxed);
            if n == MESSAGES {
                break;
            }
        }
        n
    });
    for sent in 0..MESSAGES {
        while sent - received.load(Ordering::Relaxed) > (CAPACITY / 2) as u64 {
            tokio::task::yield_now().await;
        }
        tx.try_send((subject.clone(), payload.clone())).unwrap();
    }
    assert_eq!(consumer.await.unwrap(), MESSAGES);
    MESSAGES as f64 / start.elapsed().as_secs_f64()
}

async fn bus_request_latency(n: usize) -> Vec<Duration> {
    let bus = Bus::local();
    let mut svc = bus.subscribe("bench.echo", None, 1024).unwrap();
    let responder = bus.clone();
    tokio::spawn(async move {
        while let Some(m) = svc.recv().await {
            let _ = responder.respond(&m, m.payload.clone());
        }
    });
    let subject = Subject::new("bench.echo").unwrap();
    let mut lat = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        bus.request(
            Message::new(subject.clone(), "ping"),
            Duration::from_secs(1),
        )
        .await
        .unwrap();
        lat.push(t.elapsed());
    }
    lat
}

async fn mpsc_request_latency(n: usize) -> Vec<Duration> {
    let (tx, mut rx) = mpsc::channel::<(bytes::Bytes, oneshot::Sender<bytes::Bytes>)>(1024);
    tokio::spawn(async move {
        while let Some((p, reply)) = rx.recv().await {
            let _ = reply.send(p);
        }
    });
    let mut lat = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        let (otx, orx) = oneshot::channel();
        tx.send((bytes::Bytes::from_static(b"ping"), otx))
            .await
            .unwrap();
        orx.await.unwrap();
        lat.push(t.elapsed());
    }
    lat
}

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let (mut bus_rates, mut raw_rates) = (Vec::new(), Vec::new());
        for _ in 0..5 {
            bus_rates.push(bus_throughput().await);
            raw_rates.push(mpsc_throughput().await);
        }
        let (b, r) = (median(bus_rates), median(raw_rates));
        println!("bus publish->deliver, 1 subscriber: {:.2} M msgs/s | raw tokio mpsc: {:.2} M msgs/s | ratio {:.2}", b / 1e6, r / 1e6, b / r);

        let n = 20_000;
        // Two places to ask from: a task on the runtime (as every requester in the daemon is: HTTP handlers,
        // agents' protocol tasks, workflow steps), and a thread outside it (`block_on`), where every request
        // and every reply wakes a parked thread.
        for inside in [true, false] {
            let run = |f: std::pin::Pin<Box<dyn std::future::Future<Output = Vec<Duration>> + Send>>| async move {
                if inside {
                    tokio::spawn(f).await.unwrap()
                } else {
                    f.await
                }
            };
            run(Box::pin(bus_request_latency(2_000))).await;
            run(Box::pin(mpsc_request_latency(2_000))).await;
            let (mut b50s, mut b99s, mut r50s, mut r99s) = (vec![], vec![], vec![], vec![]);
            for _ in 0..5 {
                let mut bus_lat = run(Box::pin(bus_request_latency(n))).await;
                let mut raw_lat = run(Box::pin(mpsc_request_latency(n))).await;
                b50s.push(percentile(&mut bus_lat, 0.5).as_secs_f64() * 1e6);
                b99s.push(percentile(&mut bus_lat, 0.99).as_secs_f64() * 1e6);
                r50s.push(percentile(&mut raw_lat, 0.5).as_secs_f64() * 1e6);
                r99s.push(percentile(&mut raw_lat, 0.99).as_secs_f64() * 1e6);
            }
            let (b50, b99, r50, r99) = (median(b50s), median(b99s), median(r50s), median(r99s));
            println!(
                "bus request/reply, requester {}: p50 {b50:.1} us, p99 {b99:.1} us | raw mpsc+oneshot: p50 {r50:.1} us, p99 {r99:.1} us | p99 ratio {:.2} (medians of 5 runs)",
                if inside { "a runtime task" } else { "outside the runtime (block_on)" },
                b99 / r99
            );
        }
    });
}
