//! Every way `POST /v1/jobs` refuses a submission, through the router with `oneshot`.
//! The producer points at a closed port: nothing here needs a broker, and the 503 path is real.

use axum::body::Body;
use axum::http::{Request, StatusCode, header};
use http_body_util::BodyExt;
use serde_json::{Value, json};
use sluice_ingest::{AppState, Config, router};
use tower::ServiceExt;

async fn app() -> axum::Router {
    let mut config = Config::defaults();
    config.kafka.brokers = "127.0.0.1:1".into();
    config.auth = sluice_common::auth::AuthMode::Off;
    config.publish_timeout = std::time::Duration::from_millis(300);
    config.max_body_bytes = 2_000;
    router(AppState::new(config).await.expect("state"))
}

async fn post(
    body: impl Into<Body>,
    content_type: Option<&str>,
) -> (StatusCode, axum::http::HeaderMap, Value) {
    let mut request = Request::post("/v1/jobs");
    if let Some(content_type) = content_type {
        request = request.header(header::CONTENT_TYPE, content_type);
    }
    let response = app()
        .await
        .oneshot(request.body(body.into()).unwrap())
        .await
        .unwrap();
    let status = response.status();
    let headers = response.headers().clone();
    let bytes = response.into_body().collect().await.unwrap().to_bytes();
    let json = serde_json::from_slice(&bytes)
        .unwrap_or_else(|_| panic!("not JSON: {}", String::from_utf8_lossy(&bytes)));
    (status, headers, json)
}

async fn post_json(body: Value) -> (StatusCode, Value) {
    let (status, _, json) = post(body.to_string(), Some("application/json")).await;
    (status, json)
}

fn valid() -> Value {
    json!({"user_id": "u1", "model": "sim", "messages": [{"role": "user", "content": "hi"}]})
}

fn assert_error(json: &Value, code: &str, mentions: &str) {
    assert_eq!(json["error"]["code"], code, "{json}");
    let message = json["error"]["message"].as_str().unwrap();
    assert!(
        message.contains(mentions),
        "{message:?} should mention {mentions:?}"
    );
}

#[tokio::test]
async fn invalid_json_is_400() {
    let (status, _, json) = post("{\"user_id\": ", Some("application/json")).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_error(&json, "invalid_json", "EOF");
}

/// A change that makes a valid body invalid.
type Mutation = Box<dyn Fn(&mut Value)>;

#[tokio::test]
async fn each_invalid_field_is_422_and_named() {
    let cases: Vec<(Mutation, &str)> = vec![
        (
            Box::new(|body| {
                body.as_object_mut().unwrap().remove("model");
            }),
            "model",
        ),
        (
            Box::new(|body| {
                body.as_object_mut().unwrap().remove("user_id");
            }),
            "user_id",
        ),
        (Box::new(|body| body["user_id"] = json!("")), "user_id"),
        (
            Box::new(|body| body["user_id"] = json!("has spaces")),
            "user_id",
        ),
        (Box::new(|body| body["model"] = json!(" ")), "model"),
        (Box::new(|body| body["messages"] = json!([])), "messages"),
        (Box::new(|body| body["messages"] = json!("hi")), "messages"),
        (
            Box::new(|body| body["messages"][0]["role"] = json!("robot")),
            "messages[0].role",
        ),
        (
            Box::new(|body| body["messages"][0]["content"] = json!("")),
            "messages[0].content",
        ),
        (
            Box::new(|body| {
                body["messages"][0]
                    .as_object_mut()
                    .unwrap()
                    .remove("content");
            }),
            "messages[0].content",
        ),
        (Box::new(|body| body["timeout_ms"] = json!(0)), "timeout_ms"),
        (
            Box::new(|body| body["timeout_ms"] = json!(-5)),
            "timeout_ms",
        ),
        (Box::new(|body| body["params"] = json!([1, 2])), "params"),
        (
            Box::new(|body| body["temprature"] = json!(0.2)),
            "temprature",
        ),
        (
            Box::new(|body| body["input"] = json!("embed this too")),
            "input",
        ),
        (
            Box::new(|body| {
                body.as_object_mut().unwrap().remove("messages");
            }),
            "messages",
        ),
        (
            Box::new(|body| {
                body.as_object_mut().unwrap().remove("messages");
                body["input"] = json!([]);
            }),
            "input",
        ),
        (
            Box::new(|body| {
                body.as_object_mut().unwrap().remove("messages");
                body["input"] = json!(["fine", ""]);
            }),
            "input[1]",
        ),
        (
            Box::new(|body| {
                body.as_object_mut().unwrap().remove("messages");
                body["input"] = json!(42);
            }),
            "input",
        ),
    ];
    for (mutate, field) in cases {
        let mut body = valid();
        mutate(&mut body);
        let (status, json) = post_json(body.clone()).await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body} -> {json}");
        assert_error(&json, "invalid_field", field);
    }
}

#[tokio::test]
async fn a_body_over_the_limit_is_413() {
    let mut body = valid();
    body["messages"][0]["content"] = json!("x".repeat(5_000));
    let (status, json) = post_json(body).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
    assert_error(&json, "payload_too_large", "2000");
}

#[tokio::test]
async fn a_non_json_content_type_is_415() {
    let (status, _, json) = post(valid().to_string(), Some("text/plain")).await;
    assert_eq!(status, StatusCode::UNSUPPORTED_MEDIA_TYPE);
    assert_error(&json, "unsupported_media_type", "application/json");
}

#[tokio::test]
async fn an_unreachable_broker_is_a_prompt_503_with_retry_after() {
    let started = std::time::Instant::now();
    let (status, headers, json) =
        post(valid().to_string(), Some("application/json; charset=utf-8")).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_error(&json, "unavailable", "");
    let retry_after: u32 = headers[header::RETRY_AFTER]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(retry_after >= 1);
    assert!(
        started.elapsed() < std::time::Duration::from_secs(5),
        "never a hang: {:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn unknown_paths_and_methods_answer_json_errors() {
    for (request, status, code) in [
        (
            Request::get("/v2/nothing?token=secret"),
            StatusCode::NOT_FOUND,
            "not_found",
        ),
        (
            Request::delete("/healthz"),
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
        ),
    ] {
        let response = app()
            .await
            .oneshot(request.body(Body::empty()).unwrap())
            .await
            .unwrap();
        assert_eq!(response.status(), status);
        let bytes = response.into_body().collect().await.unwrap().to_bytes();
        let json: Value = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(json["error"]["code"], code);
        assert!(
            !json["error"]["message"]
                .as_str()
                .unwrap()
                .contains("secret")
        );
    }
}

#[tokio::test]
async fn health_is_up_and_readiness_is_down_without_a_broker() {
    let response = app()
        .await
        .oneshot(Request::get("/healthz").body(Body::empty()).unwrap())
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let response = app()
        .await
        .oneshot(Request::get("/readyz").body(Body::empty()).unwrap())
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
    let bytes = response.into_body().collect().await.unwrap().to_bytes();
    let json: Value = serde_json::from_slice(&bytes).unwrap();
    assert_eq!(json["status"], "not_ready");
}

#[test]
fn timeouts_default_and_are_capped() {
    use chrono::Utc;
    use sluice_ingest::{Limits, SubmitBody, to_request_event};
    use sluice_schemas::UserId;
    let limits = Limits {
        default_timeout: std::time::Duration::from_secs(1),
        max_timeout: std::time::Duration::from_secs(5),
    };
    let body = |timeout_ms| -> SubmitBody {
        let mut value = valid();
        if let Some(timeout_ms) = timeout_ms {
            value["timeout_ms"] = json!(timeout_ms);
        }
        serde_json::from_value(value).unwrap()
    };
    let user = || UserId::parse("u-1").unwrap();
    let now = Utc::now();
    let default = to_request_event(body(None), user(), limits, now).unwrap();
    assert_eq!((default.deadline - now).num_milliseconds(), 1_000);
    let capped = to_request_event(body(Some(60_000)), user(), limits, now).unwrap();
    assert_eq!((capped.deadline - now).num_milliseconds(), 5_000);
    let asked = to_request_event(body(Some(2_500)), user(), limits, now).unwrap();
    assert_eq!((asked.deadline - now).num_milliseconds(), 2_500);
    assert_eq!(asked.job_id.as_uuid().get_version_num(), 7);
}

#[test]
fn config_refuses_a_body_limit_above_the_broker_message_size() {
    let mut config = Config::defaults();
    config.max_body_bytes = 2_000_000;
    assert!(
        config
            .validate()
            .unwrap_err()
            .to_string()
            .contains("SLUICE_MAX_BODY_BYTES")
    );
    assert!(Config::defaults().validate().is_ok());
}
