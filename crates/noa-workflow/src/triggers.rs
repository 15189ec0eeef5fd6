//! Triggers of registered workflows: cron schedules and bus subjects start runs by themselves.
//!
//! Schedules are evaluated in UTC. A schedule that came due while the node was down is not fired late;
//! the next due time counts from the start. A message on a trigger subject starts one run; its payload is the
//! input `event` when the workflow declares one (as an object when the payload is JSON and the input's type is
//! `object`).

use crate::def::{self, InputType, Workflow};
use crate::engine::{WorkflowEngine, principal_from_id};
use noa_store::{RegisteredWorkflow, Store};
use serde_json::Value;
use std::collections::BTreeMap;
use std::time::Duration;

/// Every registered workflow with its parsed definition and the principal that registered it.
pub(crate) fn load(
    store: &Store,
) -> noa_store::Result<Vec<(RegisteredWorkflow, Workflow, String)>> {
    let mut out = Vec::new();
    for r in store.wf_registered()? {
        let spec: Value = serde_json::from_str(&r.spec).unwrap_or(Value::Null);
        let includes: BTreeMap<String, String> =
            serde_json::from_value(spec["includes"].clone()).unwrap_or_default();
        let file = spec["file"].as_str().unwrap_or(&r.name).to_owned();
        let source = spec["source"].as_str().unwrap_or_default();
        match def::parse(&file, source, &def::BundleLoader(&includes)) {
            Ok(d) => {
                let by = spec["by"].as_str().unwrap_or("node").to_owned();
                out.push((r, d, by));
            }
            Err(e) => {
                tracing::error!(name = r.name, error = ?e, "A registered workflow no longer parses; its triggers are off.")
            }
        }
    }
    Ok(out)
}

fn event_input(def: &Workflow, payload: &[u8]) -> BTreeMap<String, Value> {
    let mut inputs = BTreeMap::new();
    if let Some(i) = def.inputs.iter().find(|i| i.name == "event") {
        let text = String::from_utf8_lossy(payload).into_owned();
        let v = match i.ty {
            InputType::String => Value::String(text),
            _ => serde_json::from_str(&text).unwrap_or(Value::String(text)),
        };
        inputs.insert("event".to_owned(), v);
    }
    inputs
}

pub(crate) fn start(engine: WorkflowEngine) {
    tokio::spawn(async move {
        let inner = engine.inner().clone();
        let mut shutdown = inner.shutdown.clone();
        loop {
            let regs = match load(inner.kernel.store()) {
                Ok(r) => r,
                Err(e) => {
                    tracing::error!(error = %e, "Cannot read the registered workflows.");
                    Vec::new()
                }
            };
            let mut listeners = Vec::new();
            for (_, def, by) in &regs {
                for pattern in &def.on.subjects {
                    let principal = principal_from_id(by);
                    let mut sub = match inner.kernel.subscribe(&principal, pattern, 1024) {
                        Ok(s) => s,
                        Err(e) => {
                            tracing::error!(workflow = def.name, pattern, error = %e, "A workflow trigger cannot subscribe.");
                            continue;
                        }
                    };
                    let engine = engine.clone();
                    let def = def.clone();
                    let pattern = pattern.clone();
                    listeners.push(tokio::spawn(async move {
                        while let Some(msg) = sub.recv().await {
                            let inputs = event_input(&def, &msg.payload);
                            let trigger = format!("subject:{}", msg.subject);
                            if let Err(e) = engine.start(&principal, def.clone(), inputs, &trigger).await {
                                tracing::warn!(workflow = def.name, pattern, error = %e, "A triggered workflow run did not start.");
                            }
                        }
                    }));
                }
            }
            // Each schedule's next due time; after firing, the next one counts from the time that was due,
            // so schedules due at the same moment all fire, and none fires twice for one time.
            let start = chrono::Utc::now();
            let mut due: Vec<(chrono::DateTime<chrono::Utc>, usize, usize)> = Vec::new();
            for (r, (_, d, _)) in regs.iter().enumerate() {
                for (c, (_, cron)) in d.on.cron.iter().enumerate() {
                    if let Ok(t) = cron.find_next_occurrence(&start, false) {
                        due.push((t, r, c));
                    }
                }
            }
            loop {
                let now = chrono::Utc::now();
                let wait = due
                    .iter()
                    .map(|d| d.0)
                    .min()
                    .map(|t| (t - now).to_std().unwrap_or(Duration::ZERO))
                    .unwrap_or(Duration::from_secs(3600));
                tokio::select! {
                    _ = tokio::time::sleep(wait) => {
                        let now = chrono::Utc::now();
                        for slot in due.iter_mut().filter(|d| d.0 <= now) {
                            let (_, def, by) = &regs[slot.1];
                            let (text, cron) = &def.on.cron[slot.2];
                            let principal = principal_from_id(by);
                            let trigger = format!("cron:{text}");
                            match engine.start(&principal, def.clone(), BTreeMap::new(), &trigger).await {
                                Ok(id) => tracing::info!(workflow = def.name, run = id, "A schedule started a workflow run."),
                                Err(e) => tracing::warn!(workflow = def.name, error = %e, "A scheduled workflow run did not start."),
                            }
                            let state = serde_json::json!({ "last_fire_ms": noa_types::now_ms() }).to_string();
                            let _ = inner.kernel.store().wf_set_registered_state(&def.name, &state).await;
                            // The next time after the one just due (or after now, if the node fell behind).
                            let from = slot.0.max(now - chrono::Duration::seconds(1));
                            match cron.find_next_occurrence(&from, false) {
                                Ok(t) => slot.0 = t.max(slot.0 + chrono::Duration::milliseconds(1)),
                                Err(_) => slot.0 = now + chrono::Duration::days(3650),
                            }
                        }
                    }
                    _ = inner.triggers_changed.notified() => break,
                    _ = shutdown.changed() => {
                        for l in listeners {
                            l.abort();
                        }
                        return;
                    }
                }
            }
            for l in listeners {
                l.abort();
            }
        }
    });
}
