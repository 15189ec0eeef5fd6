//! Decisions of the default policy set, and errors for bad policy files.

use super::*;

fn agent(n: &str) -> Principal {
    Principal::Agent(n.into())
}
fn subj(s: &str) -> Resource {
    Resource::Subject(s.into())
}

#[test]
fn admin_and_node_may_do_everything() {
    let p = Policy::default_policy();
    for principal in [Principal::User("admin".into()), Principal::Node] {
        p.authorize(
            &principal,
            Action::Spawn,
            &Resource::Process("x".into()),
            false,
        )
        .unwrap();
        p.authorize(
            &principal,
            Action::Publish,
            &subj("sys.events.1.running"),
            false,
        )
        .unwrap();
    }
}

#[test]
fn agents_are_denied_by_default() {
    let p = Policy::default_policy();
    let err = p
        .authorize(
            &agent("echo"),
            Action::Spawn,
            &Resource::Process("other".into()),
            false,
        )
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        "NOA-E0400 permission denied: agent \"echo\" may not spawn process \"other\" (no policy in <embedded default.cedar> permits it)"
    );
    assert!(
        p.authorize(
            &agent("echo"),
            Action::Subscribe,
            &subj("agent.other.>"),
            false
        )
        .is_err()
    );
    assert!(
        p.authorize(&agent("echo"), Action::Subscribe, &subj(">"), false)
            .is_err()
    );
    assert!(
        p.authorize(
            &agent("echo"),
            Action::Publish,
            &subj("random.topic"),
            false
        )
        .is_err()
    );
    assert!(
        p.authorize(
            &Principal::User("guest".into()),
            Action::Read,
            &Resource::System,
            false
        )
        .is_err()
    );
}

#[test]
fn agents_use_their_own_subjects_inboxes_and_grants() {
    let p = Policy::default_policy();
    let echo = agent("echo");
    p.authorize(&echo, Action::Subscribe, &subj("agent.echo.>"), false)
        .unwrap();
    p.authorize(&echo, Action::Publish, &subj("agent.echo.out"), false)
        .unwrap();
    assert!(
        p.authorize(&echo, Action::Subscribe, &subj("agent.echoes.x"), false)
            .is_err(),
        "a prefix of a name is not the name"
    );
    p.authorize(&echo, Action::Request, &subj("agent.other.inbox"), false)
        .unwrap();
    p.authorize(&echo, Action::Reply, &subj("_INBOX.abc.1"), false)
        .unwrap();
    assert!(
        p.authorize(&echo, Action::Publish, &subj("_INBOX.abc.1"), false)
            .is_err(),
        "replies only through the kernel"
    );
    assert!(
        p.authorize(&echo, Action::Reply, &subj("agent.other.inbox"), false)
            .is_err()
    );
    p.authorize(&echo, Action::Subscribe, &subj("jobs.>"), true)
        .unwrap();
}

#[test]
fn agents_never_publish_system_events_even_when_granted() {
    let p = Policy::default_policy();
    let err = p
        .authorize(
            &agent("echo"),
            Action::Publish,
            &subj("sys.events.1.running"),
            true,
        )
        .unwrap_err();
    assert!(
        err.to_string()
            .contains("forbidden by policy agents-never-forge-system-events"),
        "{err}"
    );
}

#[test]
fn policy_files_override_and_errors_name_line_and_column() {
    let dir = tempfile::tempdir().unwrap();
    assert_eq!(
        Policy::load(dir.path()).unwrap().source(),
        "<embedded default.cedar>"
    );
    std::fs::write(
        dir.path().join("policy.cedar"),
        "permit(principal, action, resource);\n",
    )
    .unwrap();
    let p = Policy::load(dir.path()).unwrap();
    p.authorize(&agent("x"), Action::Spawn, &Resource::System, false)
        .unwrap();
    std::fs::write(
        dir.path().join("policy.cedar"),
        "permit(principal, action, resource);\npermit(principal action);\n",
    )
    .unwrap();
    let err = Policy::load(dir.path()).unwrap_err().to_string();
    assert!(err.contains("policy.cedar at line 2"), "{err}");
}

#[test]
fn cached_decisions_equal_fresh_ones() {
    let p = Policy::default_policy();
    let cases = [
        (
            agent("echo"),
            Action::Publish,
            subj("agent.echo.out"),
            false,
        ),
        (
            agent("echo"),
            Action::Spawn,
            Resource::Process("x".into()),
            false,
        ),
        (agent("echo"), Action::Subscribe, subj("jobs.>"), true),
        (agent("echo"), Action::Subscribe, subj("jobs.>"), false),
        (
            Principal::User("admin".into()),
            Action::Kill,
            Resource::Process("x".into()),
            false,
        ),
    ];
    for _ in 0..3 {
        for (pr, a, r, g) in &cases {
            assert_eq!(
                p.authorize(pr, *a, r, *g),
                p.decide(pr, *a, r, *g),
                "{pr} {a:?} {r}"
            );
        }
    }
}

#[test]
fn agents_keep_to_their_files_and_granted_secrets() {
    let p = Policy::default_policy();
    let file = |s: &str| Resource::File(s.into());
    let bot = agent("bot");
    for a in [Action::ReadFile, Action::WriteFile] {
        p.authorize(&bot, a, &file("/agents/bot/notes.md"), false)
            .unwrap();
        p.authorize(&bot, a, &file("/shared/x"), false).unwrap();
        assert!(
            p.authorize(&bot, a, &file("/agents/bot2/x"), false)
                .is_err()
        );
        assert!(
            p.authorize(&bot, a, &file("/agents/other/x"), false)
                .is_err()
        );
        assert!(p.authorize(&bot, a, &file("/host/docs/x"), false).is_err());
        assert!(p.authorize(&bot, a, &file("/sharedx/y"), false).is_err());
    }
    assert!(
        p.authorize(&bot, Action::Mount, &file("/host/docs"), false)
            .is_err()
    );
    let secret = Resource::Secret("openai_key".into());
    assert!(
        p.authorize(&bot, Action::ReadSecret, &secret, false)
            .is_err()
    );
    p.authorize(&bot, Action::ReadSecret, &secret, true)
        .unwrap();
    assert!(
        p.authorize(&bot, Action::WriteSecret, &secret, true)
            .is_err()
    );
    for a in [Action::Backup, Action::ReadAudit] {
        assert!(p.authorize(&bot, a, &Resource::System, false).is_err());
        p.authorize(
            &Principal::User("admin".into()),
            a,
            &Resource::System,
            false,
        )
        .unwrap();
    }
}

#[test]
fn agents_may_ask_the_models() {
    let p = Policy::default_policy();
    p.authorize(&agent("bot"), Action::Request, &subj("ai.infer"), false)
        .unwrap();
    p.authorize(&agent("bot"), Action::Request, &subj("ai.embed"), false)
        .unwrap();
    assert!(
        p.authorize(&agent("bot"), Action::Publish, &subj("ai.embed"), false)
            .is_err()
    );
    assert!(
        p.authorize(&agent("bot"), Action::Subscribe, &subj("ai.infer"), false)
            .is_err()
    );
    assert!(
        p.authorize(&agent("bot"), Action::Request, &subj("ai.other"), false)
            .is_err()
    );
}

#[test]
fn sliced_decisions_equal_decisions_over_the_whole_set() {
    let custom = r#"
        permit (principal == Noa::User::"ops", action in [Noa::Action::"spawn", Noa::Action::"stop"], resource);
        permit (principal in Noa::User::"ops", action == Noa::Action::"read", resource);
        permit (principal is Noa::Agent in Noa::User::"x", action, resource);
        permit (principal, action == Noa::Action::"read_audit", resource is Noa::System);
        forbid (principal, action, resource) when { context.system && !context.granted };
        permit (principal is Noa::Agent, action, resource is Noa::Subject) when { context.granted };
        permit (principal == Noa::Node::"local", action in Noa::Action::"kill", resource);
    "#;
    let sets = [
        Policy::default_policy(),
        Policy::parse(custom, "custom.cedar").unwrap(),
    ];
    let principals = [
        Principal::User("admin".into()),
        Principal::User("ops".into()),
        Principal::User("x".into()),
        agent("echo"),
        agent("other"),
        Principal::Node,
    ];
    let resources = [
        subj("agent.echo.out"),
        subj("agent.other.inbox"),
        subj("sys.events.1.running"),
        subj("_INBOX.1.2"),
        subj("jobs.>"),
        Resource::Process("echo".into()),
        Resource::System,
        Resource::File("/agents/echo/a".into()),
        Resource::File("/shared/b".into()),
        Resource::File("/agents/other/c".into()),
        Resource::Secret("key".into()),
        Resource::Workflow("w".into()),
    ];
    let mut checked = 0;
    for p in &sets {
        for pr in &principals {
            for a in ACTIONS {
                for r in &resources {
                    for g in [false, true] {
                        assert_eq!(
                            p.decide(pr, a, r, g),
                            p.decide_in(&p.set, pr, a, r, g),
                            "{pr} {a:?} {r} granted={g}"
                        );
                        checked += 1;
                    }
                }
            }
        }
    }
    assert_eq!(checked, 2 * 6 * ACTIONS.len() * 12 * 2);
}
