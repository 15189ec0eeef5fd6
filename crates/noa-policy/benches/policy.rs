//! Policy decision latency with the default policy set: an allow (admin), an agent's own subject, and a deny.
//! Peer: the same Cedar authorizer called directly with a prebuilt request (the floor of any Cedar-based check).
//! Run: `cargo bench -p noa-policy --bench policy`.

use cedar_policy::{Authorizer, Context, Entities, EntityUid, PolicySet, Request};
use noa_policy::{Action, DEFAULT_POLICY, Policy, Principal, Resource};
use std::str::FromStr;
use std::time::{Duration, Instant};

fn p50(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn time(n: usize, mut f: impl FnMut()) -> Duration {
    for _ in 0..n / 10 {
        f();
    }
    let mut v = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        f();
        v.push(t.elapsed());
    }
    p50(v)
}

fn main() {
    let policy = Policy::default_policy();
    let n = 50_000;
    let admin = Principal::User("admin".into());
    let agent = Principal::Agent("echo".into());
    let allow = time(n, || {
        policy
            .authorize(&admin, Action::Spawn, &Resource::Process("x".into()), false)
            .unwrap()
    });
    let own = time(n, || {
        policy
            .authorize(
                &agent,
                Action::Publish,
                &Resource::Subject("agent.echo.out".into()),
                false,
            )
            .unwrap()
    });
    let deny = time(n, || {
        assert!(
            policy
                .authorize(&agent, Action::Spawn, &Resource::Process("x".into()), false)
                .is_err()
        )
    });
    // Without the decision cache: what a first-time decision costs.
    let fresh_admin = time(n, || {
        policy
            .decide(&admin, Action::Spawn, &Resource::Process("x".into()), false)
            .unwrap()
    });
    let fresh_own = time(n, || {
        policy
            .decide(
                &agent,
                Action::Publish,
                &Resource::Subject("agent.echo.out".into()),
                false,
            )
            .unwrap()
    });

    let set = PolicySet::from_str(DEFAULT_POLICY).unwrap();
    let authz = Authorizer::new();
    let req = Request::new(
        EntityUid::from_str(r#"Noa::User::"admin""#).unwrap(),
        EntityUid::from_str(r#"Noa::Action::"spawn""#).unwrap(),
        EntityUid::from_str(r#"Noa::Process::"x""#).unwrap(),
        Context::empty(),
        None,
    )
    .unwrap();
    let entities = Entities::empty();
    let raw = time(n, || {
        authz.is_authorized(&req, &set, &entities);
    });
    let us = |d: Duration| d.as_secs_f64() * 1e6;
    println!(
        "policy decision p50 (decision cache): admin allow {:.2} us, agent own subject {:.2} us, deny {:.2} us",
        us(allow),
        us(own),
        us(deny)
    );
    println!(
        "policy decision p50 (first time, Cedar): admin allow {:.2} us, agent own subject {:.2} us | raw Cedar is_authorized, prebuilt admin request: {:.2} us | admin ratio {:.2}",
        us(fresh_admin),
        us(fresh_own),
        us(raw),
        us(fresh_admin) / us(raw)
    );
}
