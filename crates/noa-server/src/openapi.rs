//! The OpenAPI 3.1 document of the HTTP API, built from the same route table the tests check against the router.

use serde_json::{Value, json};

/// Every route: method, path, summary, whether it needs the token, and the response schema it returns.
pub const ROUTES: &[(&str, &str, &str, bool, &str)] = &[
    (
        "get",
        "/healthz",
        "Liveness: the process answers.",
        false,
        "Health",
    ),
    (
        "get",
        "/readyz",
        "Readiness: the store answers and the node is not shutting down.",
        false,
        "Health",
    ),
    (
        "get",
        "/api/v1/status",
        "Kernel, store and server status, version, uptime, data directory.",
        true,
        "Status",
    ),
    (
        "get",
        "/api/v1/processes",
        "The process table.",
        true,
        "ProcessList",
    ),
    (
        "post",
        "/api/v1/processes",
        "Spawn a process from a spec.",
        true,
        "ProcessInfo",
    ),
    (
        "get",
        "/api/v1/processes/{name}",
        "One process.",
        true,
        "ProcessInfo",
    ),
    (
        "post",
        "/api/v1/processes/{name}/stop",
        "Stop a process (children first) and forget its spec.",
        true,
        "ProcessInfo",
    ),
    (
        "post",
        "/api/v1/processes/{name}/kill",
        "Kill a process now; its supervisor treats it as a crash.",
        true,
        "ProcessInfo",
    ),
    (
        "post",
        "/api/v1/processes/{name}/restart",
        "Stop a process and start it again.",
        true,
        "ProcessInfo",
    ),
    (
        "get",
        "/api/v1/processes/{name}/logs",
        "Last log lines (`tail`), or with `follow=true` a live Server-Sent Events stream.",
        true,
        "LogLines",
    ),
    (
        "post",
        "/api/v1/bus/publish",
        "Publish a message on a subject.",
        true,
        "Published",
    ),
    (
        "post",
        "/api/v1/bus/request",
        "Send a request and wait for the reply (`timeout_ms`).",
        true,
        "BusMessage",
    ),
    (
        "get",
        "/api/v1/events",
        "Journal events (filters: after, name, pid, limit).",
        true,
        "EventList",
    ),
    (
        "get",
        "/api/v1/events/stream",
        "A bus subscription (`subject`, default sys.events.>) as Server-Sent Events.",
        true,
        "BusMessage",
    ),
    (
        "get",
        "/api/v1/events/ws",
        "A bus subscription (`subject`) over WebSocket, one JSON text frame per message.",
        true,
        "BusMessage",
    ),
    (
        "get",
        "/api/v1/fs",
        "The VFS namespaces: agents, host, runs, shared.",
        true,
        "Listing",
    ),
    (
        "get",
        "/api/v1/fs/{path}",
        "A file's contents (streamed; `version=N` for an old one), a folder's listing (`list`), or a file's history (`history`).",
        true,
        "Listing",
    ),
    (
        "put",
        "/api/v1/fs/{path}",
        "Write a file from the raw request body (streamed, encrypted, a new version).",
        true,
        "FileInfo",
    ),
    (
        "delete",
        "/api/v1/fs/{path}",
        "Delete a file (its history stays).",
        true,
        "FileInfo",
    ),
    (
        "post",
        "/api/v1/fs/{path}",
        "Roll a file back: `{\"rollback_to\": N}` makes a new version with the contents of version N.",
        true,
        "FileInfo",
    ),
    (
        "post",
        "/api/v1/fs-txn",
        "Several puts, deletes and rollbacks that commit together or not at all.",
        true,
        "Any",
    ),
    (
        "get",
        "/api/v1/fs-usage",
        "Bytes used and quota per namespace.",
        true,
        "Any",
    ),
    (
        "get",
        "/api/v1/mounts",
        "Host folders mounted under /host.",
        true,
        "Any",
    ),
    (
        "post",
        "/api/v1/mounts",
        "Mount a host folder: `{name, host_path, read_only}`.",
        true,
        "Any",
    ),
    (
        "delete",
        "/api/v1/mounts/{name}",
        "Unmount a host folder.",
        true,
        "Any",
    ),
    (
        "get",
        "/api/v1/secrets",
        "Secret names and when they were set; never values.",
        true,
        "Any",
    ),
    (
        "put",
        "/api/v1/secrets/{name}",
        "Set a secret: `{\"value\": \"...\"}` (encrypted at rest).",
        true,
        "Any",
    ),
    (
        "delete",
        "/api/v1/secrets/{name}",
        "Delete a secret.",
        true,
        "Any",
    ),
    (
        "get",
        "/api/v1/audit",
        "Audit records (filters: after, limit, principal, action or prefix*, since_ms, until_ms).",
        true,
        "Any",
    ),
    (
        "get",
        "/api/v1/audit/verify",
        "Recompute the audit hash chain and check its signed checkpoints.",
        true,
        "Any",
    ),
    (
        "get",
        "/api/v1/backup",
        "A consistent backup of the running store as a tar archive (streamed; `include_keys=true` adds the key files).",
        true,
        "Any",
    ),
    (
        "get",
        "/api/v1/config",
        "The effective configuration, each value with its source.",
        true,
        "Any",
    ),
    (
        "get",
        "/api/v1/models",
        "Installed models (metadata, hashes) and the loaded ones.",
        true,
        "Any",
    ),
    (
        "post",
        "/api/v1/models/{name}/load",
        "Load a model now; `{\"pin\": true}` keeps it loaded.",
        true,
        "Any",
    ),
    (
        "post",
        "/api/v1/models/{name}/unload",
        "Unload a model.",
        true,
        "Any",
    ),
    (
        "get",
        "/v1/models",
        "OpenAI-compatible: the models.",
        true,
        "Any",
    ),
    (
        "post",
        "/v1/chat/completions",
        "OpenAI-compatible chat completion; `stream: true` streams Server-Sent Events.",
        true,
        "Any",
    ),
    (
        "post",
        "/v1/completions",
        "OpenAI-compatible plain completion of a prompt (no chat template); `stream: true` streams.",
        true,
        "Any",
    ),
    (
        "post",
        "/api/v1/workflows/validate",
        "Validate a workflow: `{file, source, includes}`; 422 with `diagnostics` (file, line, column, message, hint).",
        true,
        "Any",
    ),
    (
        "get",
        "/api/v1/workflows/runs",
        "Workflow runs, newest first (filters: status, workflow, limit).",
        true,
        "Any",
    ),
    (
        "post",
        "/api/v1/workflows/runs",
        "Start a run: `{file, source, includes, inputs}`; answers `{id}` once the run is durable.",
        true,
        "Any",
    ),
    (
        "get",
        "/api/v1/workflows/runs/{id}",
        "A run and each of its steps (status, attempts, items, output or output file, error).",
        true,
        "Any",
    ),
    (
        "get",
        "/api/v1/workflows/runs/{id}/events",
        "A run's event history in order (after: a sequence number).",
        true,
        "Any",
    ),
    (
        "post",
        "/api/v1/workflows/runs/{id}/{action}",
        "Control a run: action is cancel, pause, resume or retry (`{from: step}`).",
        true,
        "Any",
    ),
    (
        "get",
        "/api/v1/workflows/runs/{id}/steps/{step}/logs",
        "A step's output and the stderr log of each attempt.",
        true,
        "Any",
    ),
    (
        "post",
        "/api/v1/workflows/runs/{id}/steps/{step}/approve",
        "Approve a step waiting for approval (`{comment}`).",
        true,
        "Any",
    ),
    (
        "get",
        "/api/v1/workflows/registered",
        "Workflows registered for their triggers (cron, subject).",
        true,
        "Any",
    ),
    (
        "post",
        "/api/v1/workflows/registered",
        "Register a workflow for its triggers: `{file, source, includes}`.",
        true,
        "Any",
    ),
    (
        "delete",
        "/api/v1/workflows/registered/{name}",
        "Unregister a workflow; its triggers stop.",
        true,
        "Any",
    ),
    (
        "post",
        "/v1/embeddings",
        "OpenAI-compatible embeddings of a text or a list of texts (mean-pooled, L2-normalized; float or base64).",
        true,
        "Any",
    ),
    ("get", "/api/v1/openapi.json", "This document.", true, "Any"),
    ("get", "/metrics", "Prometheus metrics.", true, "Any"),
];

fn schemas() -> Value {
    json!({
        "Any": {},
        "Error": { "type": "object", "properties": { "error": { "type": "object", "properties": {
            "code": { "type": "string", "example": "NOA-E0500" }, "message": { "type": "string" } }, "required": ["code", "message"] } } },
        "Health": { "type": "object", "properties": { "status": { "type": "string" } } },
        "Status": { "type": "object", "properties": {
            "version": { "type": "string" }, "uptime_ms": { "type": "integer" }, "data_dir": { "type": "string" },
            "kernel": { "type": "object" }, "store": { "type": "object" }, "server": { "type": "object" } } },
        "ProcessSpec": { "type": "object", "required": ["name", "kind"], "additionalProperties": false, "properties": {
            "name": { "type": "string", "pattern": "^[A-Za-z0-9_-]{1,64}$" },
            "kind": { "enum": ["native", "builtin"] },
            "native": { "type": "object", "required": ["command"], "properties": {
                "command": { "type": "string" }, "args": { "type": "array", "items": { "type": "string" } }, "cwd": { "type": "string" } } },
            "builtin": { "enum": ["supervisor", "echo"] },
            "supervisor": { "type": "object", "properties": {
                "strategy": { "enum": ["one_for_one", "one_for_all", "rest_for_one"] }, "max_restarts": { "type": "integer" },
                "within_ms": { "type": "integer" }, "backoff_ms": { "type": "integer" }, "backoff_max_ms": { "type": "integer" } } },
            "restart": { "enum": ["permanent", "transient", "temporary"] },
            "parent": { "type": "string" },
            "env": { "type": "object", "additionalProperties": { "type": "string" } },
            "limits": { "type": "object", "properties": {
                "memory_bytes": { "type": "integer" }, "cpu_seconds": { "type": "integer" }, "open_files": { "type": "integer" },
                "mailbox": { "type": "integer" }, "stop_grace_ms": { "type": "integer" } } },
            "publish": { "type": "array", "items": { "type": "string" } },
            "subscribe": { "type": "array", "items": { "type": "string" } } } },
        "ProcessInfo": { "type": "object", "properties": {
            "pid": { "type": "integer" }, "name": { "type": "string" }, "kind": { "type": "string" }, "state": { "enum": ["starting", "running", "waiting", "stopping", "exited", "failed"] },
            "restart": { "type": "string" }, "restarts": { "type": "integer" }, "os_pid": { "type": ["integer", "null"] },
            "parent": { "type": ["string", "null"] }, "parent_pid": { "type": ["integer", "null"] }, "started_ms": { "type": "integer" },
            "uptime_ms": { "type": "integer" }, "exit": { "type": ["string", "null"] }, "command": { "type": "string" },
            "strategy": { "type": ["string", "null"] }, "children": { "type": "integer" } } },
        "ProcessList": { "type": "array", "items": { "$ref": "#/components/schemas/ProcessInfo" } },
        "LogLines": { "type": "array", "items": { "type": "object", "properties": {
            "ts_ms": { "type": "integer" }, "pid": { "type": "integer" }, "level": { "type": "string" }, "line": { "type": "string" } } } },
        "OutgoingMessage": { "type": "object", "required": ["subject"], "additionalProperties": false, "properties": {
            "subject": { "type": "string" }, "data": {}, "text": { "type": "string" }, "base64": { "type": "string" },
            "headers": { "type": "object", "additionalProperties": { "type": "string" } }, "timeout_ms": { "type": "integer", "minimum": 1, "maximum": 300000 } } },
        "BusMessage": { "type": "object", "properties": {
            "subject": { "type": "string" }, "headers": { "type": "object" }, "data": {}, "text": { "type": "string" }, "base64": { "type": "string" } } },
        "Published": { "type": "object", "properties": { "delivered": { "type": "integer" } } },
        "Event": { "type": "object", "properties": {
            "seq": { "type": "integer" }, "ts_ms": { "type": "integer" }, "pid": { "type": "integer" }, "name": { "type": "string" },
            "event": { "type": "string" }, "detail": {} } },
        "EventList": { "type": "array", "items": { "$ref": "#/components/schemas/Event" } },
        "FileInfo": { "type": "object", "properties": {
            "path": { "type": "string" }, "version": { "type": "integer" }, "size": { "type": "integer" }, "mtime_ms": { "type": "integer" },
            "op": { "enum": ["write", "delete", "rollback"] }, "principal": { "type": "string" } } },
        "Listing": { "type": "object", "properties": { "path": { "type": "string" }, "entries": { "type": "array", "items": { "type": "object", "properties": {
            "name": { "type": "string" }, "dir": { "type": "boolean" }, "size": { "type": "integer" }, "version": { "type": ["integer", "null"] } } } } } },
    })
}

/// The OpenAPI document.
pub fn openapi() -> Value {
    let mut paths = serde_json::Map::new();
    for (method, path, summary, authed, schema) in ROUTES {
        let mut op = json!({
            "summary": summary,
            "responses": {
                "200": { "description": "OK", "content": { "application/json": { "schema": { "$ref": format!("#/components/schemas/{schema}") } } } },
                "default": { "description": "An error", "content": { "application/json": { "schema": { "$ref": "#/components/schemas/Error" } } } },
            },
        });
        if !authed {
            op["security"] = json!([]);
        }
        if path.contains("{name}") {
            op["parameters"] = json!([{ "name": "name", "in": "path", "required": true, "schema": { "type": "string" } }]);
        }
        if path.contains("{path}") {
            op["parameters"] = json!([{ "name": "path", "in": "path", "required": true, "description": "A VFS path without its leading slash, e.g. shared/notes.md", "schema": { "type": "string" } }]);
        }
        if *path == "/api/v1/processes" && *method == "post" {
            op["requestBody"] = json!({ "required": true, "content": { "application/json": { "schema": { "$ref": "#/components/schemas/ProcessSpec" } } } });
        }
        if path.starts_with("/api/v1/bus/") {
            op["requestBody"] = json!({ "required": true, "content": { "application/json": { "schema": { "$ref": "#/components/schemas/OutgoingMessage" } } } });
        }
        let entry = paths.entry(path.to_string()).or_insert_with(|| json!({}));
        entry[*method] = op;
    }
    json!({
        "openapi": "3.1.0",
        "info": { "title": "NOA ARK OS", "version": env!("CARGO_PKG_VERSION"), "description": "The HTTP API of a NOA node." },
        "servers": [{ "url": "http://127.0.0.1:7070" }],
        "security": [{ "bearer": [] }],
        "components": {
            "securitySchemes": { "bearer": { "type": "http", "scheme": "bearer", "description": "The admin token from <data-dir>/admin.token" } },
            "schemas": schemas(),
        },
        "paths": paths,
    })
}
