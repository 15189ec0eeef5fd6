//! In-process tests of the HTTP layer with `Router::oneshot` over a real kernel and store.

use super::*;
use axum::body::Body;
use axum::http::{Method, Request as HttpRequest};
use http_body_util::BodyExt;
use noa_bus::Bus;
use noa_kernel::{BuiltinRuntime, KernelOptions};
use noa_store::Store;
use serde_json::{Value, json};
use tower::ServiceExt;

const TOKEN: &str = "test-token";

struct Fx {
    app: Router,
    _dir: tempfile::TempDir,
    _shutdown: watch::Sender<bool>,
}

fn fixture() -> Fx {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&dir.path().join("noa.db")).unwrap();
    let kernel = Kernel::new(
        KernelOptions::new(dir.path().join("logs")),
        Bus::local(),
        store,
        noa_policy::Policy::default_policy(),
        vec![Arc::new(BuiltinRuntime)],
    );
    let (tx, rx) = watch::channel(false);
    let state = AppState::new(
        kernel,
        TOKEN,
        ServerOptions::default(),
        "127.0.0.1:0".parse().unwrap(),
        rx,
    );
    Fx {
        app: router(state),
        _dir: dir,
        _shutdown: tx,
    }
}

impl Fx {
    async fn call(
        &self,
        method: Method,
        path: &str,
        token: Option<&str>,
        body: Option<Value>,
    ) -> (StatusCode, Value) {
        let mut req = HttpRequest::builder().method(method).uri(path);
        if let Some(t) = token {
            req = req.header("authorization", format!("Bearer {t}"));
        }
        let req = req
            .header("content-type", "application/json")
            .body(
                body.map(|b| Body::from(b.to_string()))
                    .unwrap_or_else(Body::empty),
            )
            .unwrap();
        let res = self.app.clone().oneshot(req).await.unwrap();
        let status = res.status();
        if res
            .headers()
            .get("content-type")
            .is_some_and(|c| c.as_bytes().starts_with(b"text/event-stream"))
        {
            // An endless stream: the status is all there is to check here.
            return (status, Value::Null);
        }
        let bytes = res.into_body().collect().await.unwrap().to_bytes();
        let v = serde_json::from_slice(&bytes)
            .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into_owned()));
        (status, v)
    }
}

impl Fx {
    /// A request with a raw body; returns the status, the raw response bytes and the headers.
    async fn raw(
        &self,
        method: Method,
        path: &str,
        body: Vec<u8>,
    ) -> (StatusCode, Vec<u8>, axum::http::HeaderMap) {
        let req = HttpRequest::builder()
            .method(method)
            .uri(path)
            .header("authorization", format!("Bearer {TOKEN}"))
            .body(Body::from(body))
            .unwrap();
        let res = self.app.clone().oneshot(req).await.unwrap();
        let status = res.status();
        let headers = res.headers().clone();
        let bytes = res.into_body().collect().await.unwrap().to_bytes().to_vec();
        (status, bytes, headers)
    }
}

#[tokio::test]
async fn files_over_rest() {
    let f = fixture();
    let big: Vec<u8> = (0..20_000_000u32).map(|i| (i % 251) as u8).collect();
    let (s, b, _) = f
        .raw(Method::PUT, "/api/v1/fs/shared/big.bin", big.clone())
        .await;
    assert_eq!(s, StatusCode::OK, "{}", String::from_utf8_lossy(&b));
    let (s, b, h) = f
        .raw(Method::GET, "/api/v1/fs/shared/big.bin", vec![])
        .await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(h["x-noa-version"], "1");
    assert!(b == big, "the 20 MB file came back different");
    f.raw(Method::PUT, "/api/v1/fs/shared/n.md", b"v1".to_vec())
        .await;
    f.raw(Method::PUT, "/api/v1/fs/shared/n.md", b"v2".to_vec())
        .await;
    let (s, v) = f
        .call(
            Method::POST,
            "/api/v1/fs/shared/n.md",
            Some(TOKEN),
            Some(json!({"rollback_to": 1})),
        )
        .await;
    assert_eq!((s, v["version"].as_u64()), (StatusCode::OK, Some(3)), "{v}");
    let (_, b, _) = f.raw(Method::GET, "/api/v1/fs/shared/n.md", vec![]).await;
    assert_eq!(b, b"v1");
    let (_, v) = f
        .call(
            Method::GET,
            "/api/v1/fs/shared/n.md?history",
            Some(TOKEN),
            None,
        )
        .await;
    assert_eq!(v["versions"].as_array().unwrap().len(), 3);
    let (_, v) = f
        .call(Method::GET, "/api/v1/fs/shared", Some(TOKEN), None)
        .await;
    assert_eq!(v["entries"].as_array().unwrap().len(), 2, "{v}");
    // Bad paths, missing files, bad transactions.
    let (s, v) = f
        .call(Method::GET, "/api/v1/fs/etc/passwd", Some(TOKEN), None)
        .await;
    assert_eq!(
        (s, v["error"]["code"].as_str()),
        (StatusCode::BAD_REQUEST, Some("NOA-E0309"))
    );
    let (s, v) = f
        .call(Method::GET, "/api/v1/fs/shared/nope", Some(TOKEN), None)
        .await;
    assert_eq!(
        (s, v["error"]["code"].as_str()),
        (StatusCode::NOT_FOUND, Some("NOA-E0310")),
        "{v}"
    );
    let (s, v) = f
        .call(
            Method::POST,
            "/api/v1/fs-txn",
            Some(TOKEN),
            Some(json!({"ops": [{"op": "put", "path": "/shared/t1", "content": "a"}, {"op": "delete", "path": "/shared/none"}]})),
        )
        .await;
    assert_eq!(s, StatusCode::NOT_FOUND, "{v}");
    assert_eq!(
        f.call(Method::GET, "/api/v1/fs/shared/t1", Some(TOKEN), None)
            .await
            .0,
        StatusCode::NOT_FOUND
    );
    let (s, v) = f
        .call(
            Method::POST,
            "/api/v1/fs-txn",
            Some(TOKEN),
            Some(json!({"ops": [{"op": "put", "path": "/shared/t1", "content": "a"}, {"op": "put", "path": "/shared/t2", "content_base64": "Yg=="}]})),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let (s, v) = f
        .call(
            Method::POST,
            "/api/v1/fs-txn",
            Some(TOKEN),
            Some(json!({"ops": [{"op": "put", "path": "/x/y", "content": "a"}]})),
        )
        .await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .starts_with("ops[0]: "),
        "{v}"
    );
}

#[tokio::test]
async fn host_mounts_stay_inside() {
    let f = fixture();
    let host = tempfile::tempdir().unwrap();
    std::fs::write(host.path().join("a.txt"), "hello").unwrap();
    std::os::unix::fs::symlink("/etc/passwd", host.path().join("pw")).unwrap();
    let (s, v) = f
        .call(
            Method::POST,
            "/api/v1/mounts",
            Some(TOKEN),
            Some(json!({"name": "docs", "host_path": host.path(), "read_only": true})),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    let (s, b, _) = f
        .raw(Method::GET, "/api/v1/fs/host/docs/a.txt", vec![])
        .await;
    assert_eq!((s, b.as_slice()), (StatusCode::OK, &b"hello"[..]));
    let (s, v) = f
        .call(Method::GET, "/api/v1/fs/host/docs/pw", Some(TOKEN), None)
        .await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY, "{v}");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("symbolic link"),
        "{v}"
    );
    let (s, _, _) = f
        .raw(
            Method::GET,
            "/api/v1/fs/host/docs/..%2F..%2Fetc%2Fpasswd",
            vec![],
        )
        .await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    let (s, b, _) = f
        .raw(Method::PUT, "/api/v1/fs/host/docs/new.txt", b"x".to_vec())
        .await;
    assert_eq!(s, StatusCode::FORBIDDEN, "{}", String::from_utf8_lossy(&b));
    let (_, v) = f
        .call(Method::GET, "/api/v1/fs/host/docs", Some(TOKEN), None)
        .await;
    let names: Vec<_> = v["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["a.txt"], "symlinks are not listed");
}

#[tokio::test]
async fn secrets_audit_and_backup_over_rest() {
    let f = fixture();
    let (s, _) = f
        .call(
            Method::PUT,
            "/api/v1/secrets/api_key",
            Some(TOKEN),
            Some(json!({"value": "sk-HIDDEN"})),
        )
        .await;
    assert_eq!(s, StatusCode::OK);
    let (_, v) = f
        .call(Method::GET, "/api/v1/secrets", Some(TOKEN), None)
        .await;
    assert_eq!(v["secrets"][0]["name"], "api_key");
    assert!(!v.to_string().contains("sk-HIDDEN"));
    let (s, v) = f
        .call(
            Method::PUT,
            "/api/v1/secrets/bad%20name",
            Some(TOKEN),
            Some(json!({"value": "x"})),
        )
        .await;
    assert_eq!(
        (s, v["error"]["code"].as_str()),
        (StatusCode::BAD_REQUEST, Some("NOA-E0315"))
    );
    // A wrong token is audited as a failed login (appended without waiting: poll until it is committed).
    f.call(Method::GET, "/api/v1/status", Some("wrong"), None)
        .await;
    let mut outcomes = Vec::new();
    for _ in 0..100 {
        let (_, v) = f
            .call(
                Method::GET,
                "/api/v1/audit?action=auth.*",
                Some(TOKEN),
                None,
            )
            .await;
        outcomes = v["records"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["outcome"].as_str().unwrap().to_owned())
            .collect();
        if outcomes.iter().any(|o| o == "failed") {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert!(
        outcomes.iter().any(|o| o == "failed") && outcomes.iter().any(|o| o == "ok"),
        "{outcomes:?}"
    );
    let (_, v) = f
        .call(Method::GET, "/api/v1/audit", Some(TOKEN), None)
        .await;
    assert!(!v.to_string().contains("sk-HIDDEN"));
    let (_, v) = f
        .call(Method::GET, "/api/v1/audit/verify", Some(TOKEN), None)
        .await;
    assert_eq!(v["problem"], Value::Null, "{v}");
    assert!(v["records"].as_u64().unwrap() >= 3, "{v}");
    let (s, b, h) = f.raw(Method::GET, "/api/v1/backup", vec![]).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(h["content-type"], "application/x-tar");
    let dir = tempfile::tempdir().unwrap();
    let archive = dir.path().join("b.noabak");
    std::fs::write(&archive, &b).unwrap();
    let m = noa_store::backup::verify(&archive, &mut |_, _| {}).unwrap();
    assert!(m.entries.iter().any(|e| e.path == "noa.db"));
    assert!(!b.windows(9).any(|w| w == b"sk-HIDDEN"));
}

#[tokio::test]
async fn health_is_open_and_everything_else_needs_the_token() {
    let f = fixture();
    assert_eq!(
        f.call(Method::GET, "/healthz", None, None).await.0,
        StatusCode::OK
    );
    assert_eq!(
        f.call(Method::GET, "/readyz", None, None).await.0,
        StatusCode::OK
    );
    let (s, v) = f.call(Method::GET, "/api/v1/processes", None, None).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    assert_eq!(v["error"]["code"], "NOA-E0601");
    let (s, v) = f.call(Method::GET, "/metrics", Some("wrong"), None).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    assert_eq!(v["error"]["code"], "NOA-E0600");
    assert_eq!(
        f.call(Method::GET, "/api/v1/processes", Some(TOKEN), None)
            .await
            .0,
        StatusCode::OK
    );
}

#[tokio::test]
async fn every_documented_route_exists() {
    let f = fixture();
    for (method, path, _, _, _) in ROUTES {
        let path = path
            .replace("{name}", "root")
            .replace("{path}", "shared/x")
            .replace("{id}", "r1")
            .replace("{step}", "s1")
            .replace("{action}", "cancel");
        let method = Method::from_bytes(method.to_uppercase().as_bytes()).unwrap();
        let (s, v) = f
            .call(method.clone(), &path, Some(TOKEN), Some(json!({})))
            .await;
        assert!(
            s != StatusCode::NOT_FOUND || v["error"]["code"] != "NOA-E0602",
            "{method} {path} is not routed"
        );
        assert_ne!(s, StatusCode::METHOD_NOT_ALLOWED, "{method} {path}");
    }
    let (s, v) = f.call(Method::GET, "/api/v1/nope", Some(TOKEN), None).await;
    assert_eq!(
        (s, v["error"]["code"].as_str()),
        (StatusCode::NOT_FOUND, Some("NOA-E0602"))
    );
    let (_, doc) = f
        .call(Method::GET, "/api/v1/openapi.json", Some(TOKEN), None)
        .await;
    assert_eq!(doc["openapi"], "3.1.0");
    assert!(doc["paths"]["/api/v1/processes"]["post"]["requestBody"].is_object());
}

#[tokio::test]
async fn processes_over_rest() {
    let f = fixture();
    let spec = json!({"name": "e", "kind": "builtin", "builtin": "echo", "restart": "permanent"});
    let (s, v) = f
        .call(
            Method::POST,
            "/api/v1/processes",
            Some(TOKEN),
            Some(spec.clone()),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    assert_eq!(v["name"], "e");
    let (s, v) = f
        .call(Method::POST, "/api/v1/processes", Some(TOKEN), Some(spec))
        .await;
    assert_eq!(s, StatusCode::CONFLICT, "{v}");
    assert_eq!(v["error"]["code"], "NOA-E0501");
    let (s, v) = f
        .call(
            Method::POST,
            "/api/v1/processes",
            Some(TOKEN),
            Some(json!({"name": "x", "kind": "native", "restart": "forever"})),
        )
        .await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("unknown variant `forever`"),
        "{v}"
    );
    let (s, v) = f
        .call(Method::GET, "/api/v1/processes/nope", Some(TOKEN), None)
        .await;
    assert_eq!(
        (s, v["error"]["code"].as_str()),
        (StatusCode::NOT_FOUND, Some("NOA-E0500"))
    );
    // Wait until the echo process runs, then talk to it.
    for _ in 0..200 {
        if f.call(Method::GET, "/api/v1/processes/e", Some(TOKEN), None)
            .await
            .1["state"]
            == "running"
        {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    let (s, v) = f
        .call(
            Method::POST,
            "/api/v1/bus/request",
            Some(TOKEN),
            Some(json!({"subject": "agent.e.inbox", "data": {"text": "hi"}})),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["data"], json!({"text": "hi"}));
    let (s, v) = f
        .call(
            Method::POST,
            "/api/v1/bus/request",
            Some(TOKEN),
            Some(json!({"subject": "nobody", "text": "x"})),
        )
        .await;
    assert_eq!(
        (s, v["error"]["code"].as_str()),
        (StatusCode::SERVICE_UNAVAILABLE, Some("NOA-E0201"))
    );
    let (s, v) = f
        .call(
            Method::POST,
            "/api/v1/bus/publish",
            Some(TOKEN),
            Some(json!({"subject": "a..b"})),
        )
        .await;
    assert_eq!(
        (s, v["error"]["code"].as_str()),
        (StatusCode::BAD_REQUEST, Some("NOA-E0200"))
    );
    let (s, v) = f
        .call(
            Method::POST,
            "/api/v1/bus/publish",
            Some(TOKEN),
            Some(json!({"subject": "a", "bogus": 1})),
        )
        .await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("unknown field `bogus`")
    );
    let (s, v) = f
        .call(Method::POST, "/api/v1/processes/e/stop", Some(TOKEN), None)
        .await;
    assert_eq!((s, v["state"].as_str()), (StatusCode::OK, Some("exited")));
    let (_, v) = f
        .call(Method::GET, "/api/v1/events?name=e", Some(TOKEN), None)
        .await;
    let kinds: Vec<&str> = v
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["event"].as_str().unwrap())
        .collect();
    assert!(
        kinds.starts_with(&["starting", "running"]) && kinds.ends_with(&["stopping", "exited"]),
        "{kinds:?}"
    );
    let (s, v) = f
        .call(Method::GET, "/api/v1/events?bogus=1", Some(TOKEN), None)
        .await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{v}");
}

#[tokio::test]
async fn metrics_and_status() {
    let f = fixture();
    let (s, v) = f
        .call(Method::GET, "/api/v1/status", Some(TOKEN), None)
        .await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(v["kernel"]["processes"], 1);
    assert_eq!(v["store"]["schema_version"], 3);
    let (_, text) = f.call(Method::GET, "/metrics", Some(TOKEN), None).await;
    let text = text.as_str().unwrap();
    assert!(
        text.contains("noa_kernel_processes{state=\"running\"} 1"),
        "{text}"
    );
    assert!(text.contains("# TYPE noa_bus_published_total counter"));
}
