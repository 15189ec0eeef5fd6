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
        let path = path.replace("{name}", "root");
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
    assert_eq!(v["store"]["schema_version"], 1);
    let (_, text) = f.call(Method::GET, "/metrics", Some(TOKEN), None).await;
    let text = text.as_str().unwrap();
    assert!(
        text.contains("noa_kernel_processes{state=\"running\"} 1"),
        "{text}"
    );
    assert!(text.contains("# TYPE noa_bus_published_total counter"));
}
