//! The builtin runtime: processes that are Rust tasks inside the daemon.
//!
//! - `supervisor`: holds a place in the tree; the kernel does the supervising. Ends when stopped.
//! - `echo`: answers every request on its inbox with the request's own payload and headers.

use crate::{ProcessContext, Runtime, StopRequest};
use noa_bus::BoxFuture;
use noa_types::{ExitReason, ProcessKind, ProcessSpec};

/// The built-ins this runtime knows.
pub const BUILTINS: &[&str] = &["supervisor", "echo"];

/// Runs builtin processes.
#[derive(Debug, Default)]
pub struct BuiltinRuntime;

impl Runtime for BuiltinRuntime {
    fn kind(&self) -> ProcessKind {
        ProcessKind::Builtin
    }

    fn check(&self, spec: &ProcessSpec) -> Result<(), String> {
        let name = spec.builtin.as_deref().unwrap_or("");
        if BUILTINS.contains(&name) {
            Ok(())
        } else {
            Err(format!(
                "unknown builtin {name:?}; the builtins are: {}",
                BUILTINS.join(", ")
            ))
        }
    }

    fn run(&self, ctx: ProcessContext) -> BoxFuture<'static, ExitReason> {
        Box::pin(async move {
            match ctx.spec.builtin.as_deref() {
                Some("supervisor") => supervisor(ctx).await,
                Some("echo") => echo(ctx).await,
                other => ExitReason::Error {
                    message: format!("unknown builtin {other:?}"),
                },
            }
        })
    }
}

fn stop_reason(req: StopRequest) -> ExitReason {
    match req {
        StopRequest::Kill => ExitReason::Signal {
            signal: 9,
            name: "SIGKILL".into(),
        },
        _ => ExitReason::Stopped,
    }
}

async fn supervisor(mut ctx: ProcessContext) -> ExitReason {
    ctx.sys.ready();
    loop {
        let req = *ctx.stop.borrow_and_update();
        if req != StopRequest::Run {
            return stop_reason(req);
        }
        if ctx.stop.changed().await.is_err() {
            return ExitReason::Stopped;
        }
    }
}

async fn echo(mut ctx: ProcessContext) -> ExitReason {
    ctx.sys.ready();
    loop {
        let req = *ctx.stop.borrow_and_update();
        if req != StopRequest::Run {
            return stop_reason(req);
        }
        tokio::select! {
            changed = ctx.stop.changed() => if changed.is_err() { return ExitReason::Stopped },
            delivery = ctx.mailbox.recv() => {
                let Some(d) = delivery else { return ExitReason::Stopped };
                if let Some(reply) = d.msg.reply.clone() {
                    let mut msg = noa_bus::Message::new(reply, d.msg.payload.clone());
                    msg.headers = d.msg.headers.clone();
                    if let Err(e) = ctx.sys.reply(msg) {
                        ctx.sys.log("warn", &format!("cannot reply: {e}"));
                    }
                }
            }
        }
    }
}
