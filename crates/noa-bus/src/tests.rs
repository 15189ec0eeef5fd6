//! Bus semantics: wildcards, queue groups, overflow, request/reply, headers.

use super::*;
use std::time::Duration;

fn subj(s: &str) -> Subject {
    Subject::new(s).unwrap()
}

#[tokio::test]
async fn wildcards_route_to_every_match() {
    let bus = Bus::local();
    let mut exact = bus.subscribe("a.b.c", None, 16).unwrap();
    let mut star = bus.subscribe("a.*.c", None, 16).unwrap();
    let mut gt = bus.subscribe("a.>", None, 16).unwrap();
    let mut other = bus.subscribe("x.>", None, 16).unwrap();
    assert_eq!(bus.publish(Message::new(subj("a.b.c"), "1")).unwrap(), 3);
    for s in [&mut exact, &mut star, &mut gt] {
        assert_eq!(s.recv().await.unwrap().payload, "1");
    }
    assert!(other.try_recv().is_none());
    assert_eq!(bus.publish(Message::new(subj("a.b"), "2")).unwrap(), 1);
    assert_eq!(gt.recv().await.unwrap().subject.as_str(), "a.b");
    assert_eq!(
        bus.publish(Message::new(subj("a"), "3")).unwrap(),
        0,
        "'>' needs at least one token"
    );
}

#[tokio::test]
async fn queue_groups_deliver_each_message_to_one_member() {
    let bus = Bus::local();
    let mut members: Vec<_> = (0..3)
        .map(|_| bus.subscribe("work.*", Some("workers"), 1024).unwrap())
        .collect();
    let mut watcher = bus.subscribe("work.>", None, 1024).unwrap();
    for i in 0..300 {
        assert_eq!(
            bus.publish(Message::new(subj("work.job"), format!("{i}")))
                .unwrap(),
            2
        );
    }
    let mut total = 0;
    for m in &mut members {
        let mut n = 0;
        while m.try_recv().is_some() {
            n += 1;
        }
        assert_eq!(n, 100, "round-robin spreads evenly");
        total += n;
    }
    assert_eq!(total, 300);
    let mut seen = 0;
    while watcher.try_recv().is_some() {
        seen += 1;
    }
    assert_eq!(seen, 300, "a plain subscriber still sees every message");
}

#[tokio::test]
async fn one_queue_group_across_patterns_gets_one_copy() {
    let bus = Bus::local();
    let mut a = bus.subscribe("q.*", Some("g"), 16).unwrap();
    let mut b = bus.subscribe("q.x", Some("g"), 16).unwrap();
    bus.publish(Message::new(subj("q.x"), "m")).unwrap();
    let got = a.try_recv().is_some() as u32 + b.try_recv().is_some() as u32;
    assert_eq!(got, 1);
}

#[tokio::test]
async fn a_full_queue_member_passes_the_message_to_the_next() {
    let bus = Bus::local();
    let mut a = bus.subscribe("q", Some("g"), 1).unwrap();
    let mut b = bus.subscribe("q", Some("g"), 100).unwrap();
    for _ in 0..10 {
        bus.publish(Message::new(subj("q"), "m")).unwrap();
    }
    let mut n = 0;
    while a.try_recv().is_some() {
        n += 1;
    }
    while b.try_recv().is_some() {
        n += 1;
    }
    assert_eq!(n, 10);
    assert_eq!(bus.stats().dropped, 0);
}

#[tokio::test]
async fn overflow_drops_new_messages_for_the_slow_subscriber_only() {
    let bus = Bus::local();
    let mut slow = bus.subscribe("o", None, 2).unwrap();
    let mut fast = bus.subscribe("o", None, 100).unwrap();
    for i in 0..5 {
        bus.publish(Message::new(subj("o"), format!("{i}")))
            .unwrap();
    }
    assert_eq!(slow.dropped(), 3);
    assert_eq!(bus.stats().dropped, 3);
    assert_eq!(
        slow.recv().await.unwrap().payload,
        "0",
        "the oldest messages are kept"
    );
    assert_eq!(slow.recv().await.unwrap().payload, "1");
    assert!(slow.try_recv().is_none());
    let mut n = 0;
    while fast.try_recv().is_some() {
        n += 1;
    }
    assert_eq!(n, 5);
}

#[tokio::test]
async fn request_reply_with_headers() {
    let bus = Bus::local();
    let mut svc = bus.subscribe("svc.echo", None, 16).unwrap();
    let responder = bus.clone();
    tokio::spawn(async move {
        while let Some(m) = svc.recv().await {
            let tag = m.header("tag").unwrap_or("-").to_owned();
            responder
                .respond(&m, format!("{tag}:{}", String::from_utf8_lossy(&m.payload)))
                .unwrap();
        }
    });
    let msg = Message::new(subj("svc.echo"), "hi")
        .with_headers([("tag".to_string(), "t1".to_string())].into())
        .unwrap();
    let reply = bus.request(msg, Duration::from_secs(1)).await.unwrap();
    assert_eq!(reply.payload, "t1:hi");
}

#[tokio::test]
async fn no_responders_fails_at_once_and_timeouts_are_reported() {
    let bus = Bus::local();
    let err = bus
        .request(
            Message::new(subj("nobody.home"), ""),
            Duration::from_secs(5),
        )
        .await
        .unwrap_err();
    assert_eq!(
        err,
        Error::NoResponders {
            subject: "nobody.home".into()
        }
    );
    let _silent = bus.subscribe("silent", None, 16).unwrap();
    let err = bus
        .request(Message::new(subj("silent"), ""), Duration::from_millis(30))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("timed out after 30 ms"), "{err}");
}

#[tokio::test]
async fn unsubscribe_on_drop_and_prunes() {
    let bus = Bus::local();
    let s = bus.subscribe("a.b.c.d", None, 4).unwrap();
    let q = bus.subscribe("a.*.>", Some("g"), 4).unwrap();
    assert_eq!(bus.stats().subscriptions, 2);
    drop(s);
    drop(q);
    assert_eq!(bus.stats().subscriptions, 0);
    assert_eq!(bus.publish(Message::new(subj("a.b.c.d"), "")).unwrap(), 0);
}

#[test]
fn bad_headers_are_rejected() {
    let m = Message::new(subj("h"), "");
    let err = m
        .with_headers([("a b".to_string(), "v".to_string())].into())
        .unwrap_err();
    assert!(err.to_string().contains("header name"));
}

proptest::proptest! {
    /// The trie delivers to exactly the subscriptions whose pattern matches, as the reference matcher says.
    #[test]
    fn trie_agrees_with_reference_matcher(
        patterns in proptest::collection::vec(proptest::collection::vec(proptest::sample::select(vec!["a", "b", "*", ">"]), 1..4), 1..8),
        subject in proptest::collection::vec(proptest::sample::select(vec!["a", "b", "c"]), 1..5),
    ) {
        let bus = Bus::local();
        let subject = subject.join(".");
        let mut subs = Vec::new();
        for p in &patterns {
            let p = p.join(".");
            if let Ok(s) = bus.subscribe(&p, None, 4) { subs.push((p, s)); }
        }
        let n = bus.publish(Message::new(subj(&subject), "x")).unwrap();
        let mut expected = 0;
        for (p, s) in &mut subs {
            let want = matches(p, &subject);
            expected += want as usize;
            proptest::prop_assert_eq!(s.try_recv().is_some(), want, "pattern {} subject {}", p, subject);
        }
        proptest::prop_assert_eq!(n, expected);
    }
}
