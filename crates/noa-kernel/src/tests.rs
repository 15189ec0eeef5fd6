//! Supervision, policy and persistence tests, with a scripted runtime whose processes crash on command.

use super::*;
use noa_types::{RestartPolicy, Strategy, SupervisorSpec};
use std::sync::Mutex as StdMutex;

/// A runtime for tests: each process runs until its inbox receives `crash` (exit 1), `exit` (exit 0),
/// or it is stopped or killed. Stops are recorded in order.
#[derive(Default)]
struct Scripted {
    stops: Arc<StdMutex<Vec<String>>>,
}

impl Runtime for Scripted {
    fn kind(&self) -> ProcessKind {
        ProcessKind::Native
    }
    fn check(&self, spec: &ProcessSpec) -> std::result::Result<(), String> {
        match spec.native.as_ref().map(|n| n.command.as_str()) {
            Some("missing") => Err("program \"missing\" not found in PATH".into()),
            _ => Ok(()),
        }
    }
    fn run(&self, mut ctx: ProcessContext) -> BoxFuture<'static, ExitReason> {
        let stops = self.stops.clone();
        Box::pin(async move {
            ctx.sys.ready();
            loop {
                let req = *ctx.stop.borrow_and_update();
                match req {
                    StopRequest::Run => {}
                    StopRequest::Kill => {
                        return ExitReason::Signal {
                            signal: 9,
                            name: "SIGKILL".into(),
                        };
                    }
                    StopRequest::Stop { .. } => {
                        stops.lock().unwrap().push(ctx.spec.name.clone());
                        return ExitReason::Stopped;
                    }
                }
                tokio::select! {
                    _ = ctx.stop.changed() => {}
                    d = ctx.mailbox.recv() => match d.map(|d| d.msg.payload) {
                        Some(p) if p == "crash" => return ExitReason::Code { code: 1 },
                        Some(p) if p == "exit" => return ExitReason::Code { code: 0 },
                        _ => {}
                    }
                }
            }
        })
    }
}

struct Fixture {
    kernel: Kernel,
    stops: Arc<StdMutex<Vec<String>>>,
    _dir: tempfile::TempDir,
}

fn fast_sup(strategy: Strategy, max_restarts: u32) -> SupervisorSpec {
    SupervisorSpec {
        strategy,
        max_restarts,
        within_ms: 10_000,
        backoff_ms: 5,
        backoff_max_ms: 20,
    }
}

fn kernel_in(dir: &std::path::Path) -> (Kernel, Arc<StdMutex<Vec<String>>>) {
    let store = Store::open(&dir.join("noa.db")).unwrap();
    let scripted = Scripted::default();
    let stops = scripted.stops.clone();
    let mut opts = KernelOptions::new(dir.join("logs"));
    opts.root = fast_sup(Strategy::OneForOne, 3);
    let kernel = Kernel::new(
        opts,
        Bus::local(),
        store,
        Policy::default_policy(),
        vec![Arc::new(scripted), Arc::new(BuiltinRuntime)],
    );
    (kernel, stops)
}

fn fixture() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let (kernel, stops) = kernel_in(dir.path());
    Fixture {
        kernel,
        stops,
        _dir: dir,
    }
}

fn admin() -> Principal {
    Principal::User("admin".into())
}

fn child(name: &str, parent: Option<&str>, restart: RestartPolicy) -> ProcessSpec {
    let mut s = ProcessSpec::native(name, "scripted", &[]);
    s.parent = parent.map(str::to_owned);
    s.restart = restart;
    s
}

impl Fixture {
    fn info(&self, name: &str) -> ProcessInfo {
        self.kernel.get(&admin(), name).unwrap()
    }

    async fn wait(&self, what: &str, cond: impl Fn(&Fixture) -> bool) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !cond(self) {
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {what}: {:#?}",
                self.kernel.list(&admin()).unwrap()
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    async fn running(&self, name: &str, restarts: u32) {
        self.wait(&format!("{name} running with {restarts} restarts"), |f| {
            let i = f.info(name);
            i.state == ProcessState::Running && i.restarts == restarts
        })
        .await;
    }

    fn send(&self, name: &str, text: &'static str) {
        self.kernel
            .bus()
            .publish_bytes(&format!("agent.{name}.inbox"), text)
            .unwrap();
    }

    async fn tree(&self, strategy: Strategy) {
        self.kernel
            .spawn(
                &admin(),
                ProcessSpec::supervisor("sup", fast_sup(strategy, 5)),
            )
            .await
            .unwrap();
        for n in ["a", "b", "c"] {
            self.kernel
                .spawn(&admin(), child(n, Some("sup"), RestartPolicy::Permanent))
                .await
                .unwrap();
            self.running(n, 0).await;
        }
    }
}

#[tokio::test]
async fn one_for_one_restarts_only_the_crashed_child() {
    let f = fixture();
    f.tree(Strategy::OneForOne).await;
    f.send("b", "crash");
    f.running("b", 1).await;
    assert_eq!(f.info("a").restarts, 0);
    assert_eq!(f.info("c").restarts, 0);
    assert!(f.stops.lock().unwrap().is_empty());
}

#[tokio::test]
async fn one_for_all_restarts_every_child_stopping_the_others_in_reverse_order() {
    let f = fixture();
    f.tree(Strategy::OneForAll).await;
    f.send("a", "crash");
    for n in ["a", "b", "c"] {
        f.running(n, 1).await;
    }
    assert_eq!(*f.stops.lock().unwrap(), ["c", "b"]);
}

#[tokio::test]
async fn rest_for_one_restarts_the_child_and_those_started_after_it() {
    let f = fixture();
    f.tree(Strategy::RestForOne).await;
    f.send("b", "crash");
    f.running("b", 1).await;
    f.running("c", 1).await;
    assert_eq!(f.info("a").restarts, 0);
    assert_eq!(*f.stops.lock().unwrap(), ["c"]);
}

#[tokio::test]
async fn restart_policies() {
    let f = fixture();
    for (n, r) in [
        ("perm", RestartPolicy::Permanent),
        ("trans", RestartPolicy::Transient),
        ("temp", RestartPolicy::Temporary),
    ] {
        f.kernel.spawn(&admin(), child(n, None, r)).await.unwrap();
        f.running(n, 0).await;
    }
    // A normal exit: only permanent comes back.
    for n in ["perm", "trans", "temp"] {
        f.send(n, "exit");
    }
    f.running("perm", 1).await;
    f.wait("trans exited", |f| {
        f.info("trans").state == ProcessState::Exited
    })
    .await;
    f.wait("temp exited", |f| {
        f.info("temp").state == ProcessState::Exited
    })
    .await;
    // A crash: transient comes back too, temporary does not.
    let mut t = child("trans2", None, RestartPolicy::Transient);
    t.restart = RestartPolicy::Transient;
    f.kernel.spawn(&admin(), t).await.unwrap();
    f.kernel
        .spawn(&admin(), child("temp2", None, RestartPolicy::Temporary))
        .await
        .unwrap();
    f.running("trans2", 0).await;
    f.running("temp2", 0).await;
    f.send("trans2", "crash");
    f.send("temp2", "crash");
    f.running("trans2", 1).await;
    f.wait("temp2 failed", |f| {
        f.info("temp2").state == ProcessState::Failed
    })
    .await;
    assert_eq!(f.info("temp2").restarts, 0);
}

#[tokio::test]
async fn intensity_exceeded_escalates_to_the_parent_which_restarts_the_supervisor() {
    let f = fixture();
    f.kernel
        .spawn(
            &admin(),
            ProcessSpec::supervisor("sup", fast_sup(Strategy::OneForOne, 2)),
        )
        .await
        .unwrap();
    f.kernel
        .spawn(&admin(), child("w", Some("sup"), RestartPolicy::Permanent))
        .await
        .unwrap();
    f.kernel
        .spawn(&admin(), child("x", Some("sup"), RestartPolicy::Permanent))
        .await
        .unwrap();
    for i in 0..2 {
        f.running("w", i).await;
        f.send("w", "crash");
    }
    f.running("w", 2).await;
    f.send("w", "crash");
    // The third crash within the window: `sup` gives up, fails, and root restarts it with its children.
    f.wait("sup restarted by root", |f| {
        f.info("sup").restarts == 1 && f.info("sup").state == ProcessState::Running
    })
    .await;
    f.wait("w and x back", |f| {
        f.info("w").state == ProcessState::Running && f.info("x").state == ProcessState::Running
    })
    .await;
    let events = f
        .kernel
        .events(
            &admin(),
            &EventQuery {
                name: Some("sup".into()),
                limit: Some(1000),
                ..Default::default()
            },
        )
        .unwrap();
    assert!(
        events.iter().any(|e| e.event == "escalated"
            && e.detail["reason"]
                .as_str()
                .unwrap()
                .contains("more than 2 restarts")),
        "{events:#?}"
    );
}

#[tokio::test]
async fn root_gives_up_on_a_crash_looping_child_and_keeps_the_others() {
    let f = fixture();
    f.kernel
        .spawn(&admin(), child("loop", None, RestartPolicy::Permanent))
        .await
        .unwrap();
    f.kernel
        .spawn(&admin(), child("calm", None, RestartPolicy::Permanent))
        .await
        .unwrap();
    for i in 0..=3 {
        f.running("loop", i).await;
        f.send("loop", "crash");
    }
    f.wait("loop failed for good", |f| {
        f.info("loop").state == ProcessState::Failed
            && f.info("loop")
                .exit
                .as_deref()
                .unwrap_or("")
                .contains("not restarted")
    })
    .await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(f.info("loop").restarts, 3);
    assert_eq!(f.info("calm").state, ProcessState::Running);
}

#[tokio::test]
async fn kill_is_a_crash_and_stop_is_final() {
    let f = fixture();
    f.kernel
        .spawn(&admin(), child("k", None, RestartPolicy::Permanent))
        .await
        .unwrap();
    f.running("k", 0).await;
    let info = f.kernel.kill(&admin(), "k").await.unwrap();
    assert!(info.exit.unwrap().contains("signal 9"));
    f.running("k", 1).await;
    let info = f.kernel.stop(&admin(), "k").await.unwrap();
    assert_eq!(info.state, ProcessState::Exited);
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(f.info("k").state, ProcessState::Exited);
    assert!(
        f.kernel.store().specs().unwrap().is_empty(),
        "a stopped process leaves the registry"
    );
}

#[tokio::test]
async fn stopping_a_supervisor_stops_children_in_reverse_start_order() {
    let f = fixture();
    f.tree(Strategy::OneForOne).await;
    f.kernel.stop(&admin(), "sup").await.unwrap();
    assert_eq!(*f.stops.lock().unwrap(), ["c", "b", "a"]);
    for n in ["a", "b", "c", "sup"] {
        assert!(f.info(n).state.is_terminal());
    }
}

#[tokio::test]
async fn bad_spawns_are_clear_errors() {
    let f = fixture();
    f.kernel
        .spawn(&admin(), child("dup", None, RestartPolicy::Permanent))
        .await
        .unwrap();
    let e = f
        .kernel
        .spawn(&admin(), child("dup", None, RestartPolicy::Permanent))
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("already") && e.contains("dup"), "{e}");
    let e = f
        .kernel
        .spawn(&admin(), child("x", Some("nope"), RestartPolicy::Permanent))
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("no process named \"nope\""), "{e}");
    let e = f
        .kernel
        .spawn(&admin(), child("y", Some("dup"), RestartPolicy::Permanent))
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("not a supervisor"), "{e}");
    let mut m = child("m", None, RestartPolicy::Permanent);
    m.native.as_mut().unwrap().command = "missing".into();
    let e = f.kernel.spawn(&admin(), m).await.unwrap_err().to_string();
    assert!(e.contains("not found in PATH"), "{e}");
    let e = f
        .kernel
        .spawn(&admin(), ProcessSpec::builtin("bi", "nope"))
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("unknown builtin"), "{e}");
    let e = f
        .kernel
        .stop(&admin(), "root")
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("root supervisor"), "{e}");
    assert_eq!(
        f.kernel.store().specs().unwrap().len(),
        1,
        "failed spawns record nothing"
    );
}

#[tokio::test]
async fn denials_are_errors_and_journal_events() {
    let f = fixture();
    let agent = Principal::Agent("rogue".into());
    let e = f
        .kernel
        .spawn(&agent, child("evil", None, RestartPolicy::Permanent))
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("may not spawn process \"evil\""), "{e}");
    let e = f
        .kernel
        .publish(&Principal::User("guest".into()), "a.b", Bytes::new(), None)
        .unwrap_err()
        .to_string();
    assert!(e.contains("may not publish subject \"a.b\""), "{e}");
    f.kernel.store().flush().await.unwrap();
    let denied: Vec<_> = f
        .kernel
        .events(&admin(), &EventQuery::default())
        .unwrap()
        .into_iter()
        .filter(|e| e.event == "denied")
        .collect();
    assert_eq!(denied.len(), 2);
    assert_eq!(denied[0].detail["action"], "spawn");
}

#[tokio::test]
async fn builtin_echo_answers_requests_and_events_are_published() {
    let f = fixture();
    let mut events = f.kernel.subscribe(&admin(), "sys.events.>", 100).unwrap();
    f.kernel
        .spawn(&admin(), ProcessSpec::builtin("e", "echo"))
        .await
        .unwrap();
    f.running("e", 0).await;
    let reply = f
        .kernel
        .request(
            &admin(),
            "agent.e.inbox",
            Bytes::from_static(b"hi"),
            None,
            Duration::from_secs(1),
        )
        .await
        .unwrap();
    assert_eq!(reply.payload, "hi");
    let first = events.recv().await.unwrap();
    assert_eq!(
        first.subject.as_str(),
        format!("sys.events.{}.starting", f.info("e").pid)
    );
    let e = f
        .kernel
        .request(
            &admin(),
            "agent.nobody.inbox",
            Bytes::new(),
            None,
            Duration::from_secs(1),
        )
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("no responders"), "{e}");
}

#[tokio::test]
async fn permanent_processes_come_back_after_a_restart_of_the_kernel() {
    let dir = tempfile::tempdir().unwrap();
    {
        let (kernel, _) = kernel_in(dir.path());
        kernel
            .spawn(
                &admin(),
                ProcessSpec::supervisor("sup", fast_sup(Strategy::OneForOne, 5)),
            )
            .await
            .unwrap();
        kernel
            .spawn(&admin(), child("p", Some("sup"), RestartPolicy::Permanent))
            .await
            .unwrap();
        kernel
            .spawn(&admin(), child("t", None, RestartPolicy::Transient))
            .await
            .unwrap();
        kernel.shutdown().await;
    }
    let (kernel, _) = kernel_in(dir.path());
    assert_eq!(kernel.restore().await.unwrap(), 1);
    let f = Fixture {
        kernel,
        stops: Default::default(),
        _dir: dir,
    };
    f.running("sup", 0).await;
    f.running("p", 0).await;
    assert_eq!(f.info("p").parent.as_deref(), Some("sup"));
    let t = f.info("t");
    assert_eq!(t.state, ProcessState::Exited);
    assert!(t.exit.unwrap().contains("restart = transient"));
}

#[tokio::test]
async fn root_gives_up_on_a_supervisor_that_keeps_escalating() {
    let f = fixture();
    f.kernel
        .spawn(
            &admin(),
            ProcessSpec::supervisor("sup", fast_sup(Strategy::OneForOne, 1)),
        )
        .await
        .unwrap();
    f.kernel
        .spawn(&admin(), child("w", Some("sup"), RestartPolicy::Permanent))
        .await
        .unwrap();
    // The worker crashes whenever it runs; `sup` escalates every second crash; root (3 in 10 s) must give up on `sup`.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let sup = f.info("sup");
        if sup
            .exit
            .as_deref()
            .is_some_and(|e| e.contains("not restarted"))
        {
            assert_eq!(sup.state, ProcessState::Failed);
            assert_eq!(sup.restarts, 3);
            break;
        }
        assert!(Instant::now() < deadline, "root never gave up: {sup:?}");
        if f.info("w").state == ProcessState::Running {
            f.send("w", "crash");
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test]
async fn concurrent_restarts_start_one_incarnation_and_restart_after_stop_is_refused() {
    let f = fixture();
    f.kernel
        .spawn(&admin(), child("r", None, RestartPolicy::Permanent))
        .await
        .unwrap();
    f.running("r", 0).await;
    let me = admin();
    let (a, b) = tokio::join!(f.kernel.restart(&me, "r"), f.kernel.restart(&me, "r"));
    a.unwrap();
    b.unwrap();
    f.running("r", 1).await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(f.info("r").restarts, 1);
    f.kernel.stop(&admin(), "r").await.unwrap();
    let e = f
        .kernel
        .restart(&admin(), "r")
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("was stopped"), "{e}");
    assert_eq!(f.info("r").state, ProcessState::Exited);
}

#[tokio::test]
async fn a_supervisor_with_live_children_cannot_be_replaced() {
    let f = fixture();
    let mut sup = ProcessSpec::supervisor("sup", fast_sup(Strategy::OneForOne, 5));
    sup.restart = RestartPolicy::Temporary;
    f.kernel.spawn(&admin(), sup.clone()).await.unwrap();
    f.kernel
        .spawn(&admin(), child("c", Some("sup"), RestartPolicy::Permanent))
        .await
        .unwrap();
    f.running("c", 0).await;
    f.kernel.kill(&admin(), "sup").await.unwrap();
    // Until its children are stopped, the failed supervisor keeps its place.
    let mut replaced = false;
    for _ in 0..2000 {
        match f.kernel.spawn(&admin(), sup.clone()).await {
            Err(e) => assert!(e.to_string().contains("already"), "{e}"),
            Ok(_) => {
                replaced = true;
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert!(replaced);
    f.running("sup", 0).await;
    assert!(
        f.kernel.get(&admin(), "c").is_err(),
        "the old children went with the old supervisor"
    );
    assert!(
        f.kernel
            .store()
            .specs()
            .unwrap()
            .iter()
            .all(|s| s.spec.name != "c")
    );
}
