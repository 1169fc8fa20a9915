//! A job's webhook: where its status changes are delivered, signed, and which ones. Carried by
//! the request event and copied by the worker onto every status event, so the webhooks service
//! reads the status topic alone.

use crate::domain::FieldError;
use crate::events::JobStatus;
use serde::{Deserialize, Serialize};

/// The longest webhook URL accepted.
pub const MAX_WEBHOOK_URL_LEN: usize = 2048;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Webhook {
    /// An absolute `https://` URL (`http://` where the deployment allows it), no credentials.
    pub url: String,
    /// The statuses delivered; by default the terminal ones.
    #[serde(default = "terminal_statuses")]
    pub events: Vec<JobStatus>,
}

fn terminal_statuses() -> Vec<JobStatus> {
    JobStatus::ALL
        .into_iter()
        .filter(|status| status.is_terminal())
        .collect()
}

impl Webhook {
    /// A webhook for the terminal statuses.
    pub fn terminal(url: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            events: terminal_statuses(),
        }
    }

    /// The rules every reader applies (`allow_http`: whether `http://` is accepted, a
    /// deployment's choice; the event schema accepts both).
    pub fn check(&self, allow_http: bool) -> Result<(), FieldError> {
        let field = |name: &str| format!("webhook.{name}");
        if self.url.len() > MAX_WEBHOOK_URL_LEN {
            return Err(FieldError::new(
                field("url"),
                format!("must be at most {MAX_WEBHOOK_URL_LEN} characters"),
            ));
        }
        // The URL is stored and logged as given: no NUL (which Postgres' text refuses) or other
        // control character, which no valid URL has anyway.
        if self.url.chars().any(char::is_control) {
            return Err(FieldError::new(
                field("url"),
                "must not contain control characters",
            ));
        }
        let url = url::Url::parse(&self.url).map_err(|error| {
            FieldError::new(field("url"), format!("is not an absolute URL: {error}"))
        })?;
        match url.scheme() {
            "https" => {}
            "http" if allow_http => {}
            "http" => {
                return Err(FieldError::new(
                    field("url"),
                    "must be https:// (http:// is not allowed by this deployment)",
                ));
            }
            _ => return Err(FieldError::new(field("url"), "must be an https:// URL")),
        }
        if url.host().is_none() {
            return Err(FieldError::new(field("url"), "must name a host"));
        }
        if !url.username().is_empty() || url.password().is_some() {
            return Err(FieldError::new(
                field("url"),
                "must not carry credentials; webhooks are signed instead",
            ));
        }
        if url.fragment().is_some() {
            return Err(FieldError::new(field("url"), "must not have a #fragment"));
        }
        if self.events.is_empty() {
            return Err(FieldError::new(
                field("events"),
                "must name at least one status (or be left out: the terminal ones)",
            ));
        }
        Ok(())
    }

    /// Whether a change to `status` is delivered.
    pub fn wants(&self, status: JobStatus) -> bool {
        self.events.contains(&status)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hook(url: &str) -> Webhook {
        Webhook {
            url: url.into(),
            events: terminal_statuses(),
        }
    }

    #[test]
    fn only_plain_absolute_https_urls_pass_unless_http_is_allowed() {
        assert!(hook("https://example.com/hooks?x=1").check(false).is_ok());
        assert!(hook("http://example.com/").check(true).is_ok());
        for (url, allow_http) in [
            ("http://example.com/", false),
            ("ftp://example.com/", true),
            ("example.com/hook", true),
            ("https://user:pass@example.com/", false),
            ("https://example.com/#part", false),
        ] {
            let error = hook(url).check(allow_http).unwrap_err();
            assert_eq!(error.field, "webhook.url", "{url}");
        }
        let long = format!("https://example.com/{}", "a".repeat(MAX_WEBHOOK_URL_LEN));
        assert!(hook(&long).check(false).is_err());
        let none = Webhook {
            events: vec![],
            ..hook("https://example.com/")
        };
        assert_eq!(none.check(false).unwrap_err().field, "webhook.events");
        let parsed: Webhook = serde_json::from_str(r#"{"url": "https://a.example/"}"#).unwrap();
        assert_eq!(parsed.events.len(), 4);
        assert!(parsed.wants(JobStatus::Failed) && !parsed.wants(JobStatus::Running));
    }
}
