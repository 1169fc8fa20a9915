//! The JSON Schema files and the Rust types are one contract: the examples validate against the
//! files and decode in Rust, and what Rust writes validates against the files.

use chrono::Utc;
use serde_json::Value;
use sluice_schemas::{
    ErrorCode, JobError, JobId, JobStatus, Message, ModelName, Output, RequestEvent, Role,
    SCHEMA_VERSION, StatusEvent, Task, Timings, UserId,
};
use std::path::PathBuf;

fn schemas_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn read_json(relative: &str) -> Value {
    let path = schemas_dir().join(relative);
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|error| panic!("{}: {error}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|error| panic!("{}: {error}", path.display()))
}

fn validator(schema_file: &str) -> jsonschema::Validator {
    jsonschema::options()
        .should_validate_formats(true)
        .build(&read_json(schema_file))
        .expect("schema file compiles")
}

fn assert_valid(validator: &jsonschema::Validator, instance: &Value) {
    let errors: Vec<String> = validator
        .iter_errors(instance)
        .map(|error| error.to_string())
        .collect();
    assert!(errors.is_empty(), "{instance} is invalid: {errors:?}");
}

fn sample_request() -> RequestEvent {
    let now = Utc::now();
    RequestEvent {
        schema_version: SCHEMA_VERSION,
        job_id: JobId::new(),
        user_id: UserId::parse("user-1").unwrap(),
        model: ModelName::parse("sim").unwrap(),
        task: Task::Chat(vec![Message::text(Role::User, "hi")]),
        params: serde_json::Map::new(),
        submitted_at: now,
        deadline: now + chrono::Duration::seconds(30),
        cache: true,
        stream: false,
        webhook: None,
        tier: None,
        priority: Default::default(),
        key_id: None,
    }
}

#[test]
fn examples_validate_against_the_schema_files_and_decode_in_rust() {
    let request_validator = validator("request.schema.json");
    for name in [
        "request",
        "request-embedding",
        "request-tools",
        "request-batch",
    ] {
        let example = read_json(&format!("examples/{name}.json"));
        assert_valid(&request_validator, &example);
        let decoded = RequestEvent::decode(example.to_string().as_bytes()).expect(name);
        assert_eq!(decoded.task.is_embedding(), name == "request-embedding");
        assert_eq!(
            decoded.priority == sluice_schemas::Priority::Batch,
            name == "request-batch"
        );
        // Encoding gives back the schema file's shape, which decodes to the same event.
        let encoded = decoded.encode();
        assert_valid(
            &request_validator,
            &serde_json::from_slice(&encoded).unwrap(),
        );
        assert_eq!(RequestEvent::decode(&encoded).expect(name), decoded);
    }

    let delta_validator = validator("delta.schema.json");
    let example = read_json("examples/delta.json");
    assert_valid(&delta_validator, &example);
    let delta = sluice_schemas::DeltaEvent::decode(example.to_string().as_bytes())
        .expect("delta example decodes");
    assert_valid(
        &delta_validator,
        &serde_json::from_slice(&delta.encode()).unwrap(),
    );

    let cancel_validator = validator("cancel.schema.json");
    let example = read_json("examples/cancel.json");
    assert_valid(&cancel_validator, &example);
    let cancel = sluice_schemas::CancelEvent::decode(example.to_string().as_bytes())
        .expect("cancel example decodes");
    assert_valid(
        &cancel_validator,
        &serde_json::from_slice(&cancel.encode()).unwrap(),
    );

    let status_validator = validator("status.schema.json");
    for name in [
        "status-running",
        "status-succeeded",
        "status-failed",
        "status-embedding",
        "status-tool-call",
    ] {
        let example = read_json(&format!("examples/{name}.json"));
        assert_valid(&status_validator, &example);
        let decoded = StatusEvent::decode(example.to_string().as_bytes()).expect(name);
        assert_eq!(
            decoded.job_id.to_string(),
            example["job_id"].as_str().unwrap()
        );
    }
}

#[test]
fn every_status_the_rust_side_writes_validates() {
    let request_validator = validator("request.schema.json");
    let status_validator = validator("status.schema.json");
    let request = sample_request();
    assert_valid(
        &request_validator,
        &serde_json::from_slice(&request.encode()).unwrap(),
    );

    for status in JobStatus::ALL {
        let mut event = StatusEvent::queued(&request);
        event.status = status;
        event.attempt = 1;
        event.timings = Timings {
            queued_at: request.submitted_at,
            started_at: Some(Utc::now()),
            finished_at: None,
        };
        if status == JobStatus::Succeeded {
            event.output = Some(Output {
                content: "ok".into(),
                finish_reason: Some("stop".into()),
                ..Output::default()
            });
        } else if status.is_terminal() {
            event.error = Some(JobError {
                code: ErrorCode::BackendError,
                message: "boom".into(),
            });
        }
        let json: Value = serde_json::from_slice(&event.encode()).unwrap();
        assert_valid(&status_validator, &json);
        assert_eq!(StatusEvent::decode(&event.encode()).unwrap(), event);
    }
}

/// A change that makes a valid event invalid.
type Mutation = Box<dyn Fn(&mut Value)>;

#[test]
fn schema_and_rust_reject_the_same_bad_events() {
    let request_validator = validator("request.schema.json");
    let good = read_json("examples/request.json");
    let mutations: Vec<(&str, Mutation)> = vec![
        (
            "missing user_id",
            Box::new(|event| {
                event.as_object_mut().unwrap().remove("user_id");
            }),
        ),
        (
            "empty messages",
            Box::new(|event| event["messages"] = Value::Array(vec![])),
        ),
        (
            "both messages and input",
            Box::new(|event| event["input"] = "embed me too".into()),
        ),
        (
            "neither messages nor input",
            Box::new(|event| {
                event.as_object_mut().unwrap().remove("messages");
            }),
        ),
        (
            "an empty text to embed",
            Box::new(|event| {
                event.as_object_mut().unwrap().remove("messages");
                event["input"] = serde_json::json!(["fine", " "]);
            }),
        ),
        (
            "bad role",
            Box::new(|event| event["messages"][0]["role"] = "robot".into()),
        ),
        (
            "uuid v4 job id",
            Box::new(|event| event["job_id"] = "2f1c1b4e-8a7d-4c3e-9b2a-1d0e5f6a7b8c".into()),
        ),
        (
            "future schema version",
            Box::new(|event| event["schema_version"] = 2.into()),
        ),
        (
            "user id with spaces",
            Box::new(|event| event["user_id"] = "a b".into()),
        ),
    ];
    for (what, mutate) in mutations {
        let mut event = good.clone();
        mutate(&mut event);
        assert!(
            !request_validator.is_valid(&event),
            "schema accepted {what}"
        );
        assert!(
            RequestEvent::decode(event.to_string().as_bytes()).is_err(),
            "rust accepted {what}"
        );
    }

    let status_validator = validator("status.schema.json");
    let mut succeeded_without_output = read_json("examples/status-succeeded.json");
    succeeded_without_output["output"] = Value::Null;
    assert!(!status_validator.is_valid(&succeeded_without_output));
    assert!(StatusEvent::decode(succeeded_without_output.to_string().as_bytes()).is_err());
}

#[test]
fn decode_errors_name_the_field() {
    let mut event = read_json("examples/request.json");
    event["messages"][1]["role"] = "robot".into();
    let error = RequestEvent::decode(event.to_string().as_bytes()).unwrap_err();
    assert_eq!(error.kind(), "invalid_field");
    assert!(error.to_string().starts_with("messages[1].role"), "{error}");

    let error = RequestEvent::decode(b"{not json").unwrap_err();
    assert_eq!(error.kind(), "invalid_json");
}

/// Found by fuzzing (`fuzz/fuzz_targets/request_event.rs`): a parameter or a logprob with more
/// digits than an `f64` holds must pass through the pipeline unchanged, however many times it is
/// decoded and encoded (serde_json's `float_roundtrip`).
#[test]
fn numbers_pass_through_decoding_and_encoding_unchanged() {
    let mut request = sample_request();
    request.params = serde_json::from_str(r#"{"temperature": 3.3333333333333334e85}"#).unwrap();
    let once = RequestEvent::decode(&request.encode()).unwrap();
    let twice = RequestEvent::decode(&once.encode()).unwrap();
    assert_eq!(once.encode(), twice.encode());
    assert_eq!(once.params["temperature"], request.params["temperature"]);
}
