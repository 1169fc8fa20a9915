//! The metric catalogue, the Grafana dashboard and the README agree: every series the dashboard
//! queries is one Sluice records, and every metric Sluice records is documented.

use sluice_common::metrics::CATALOGUE;
use std::collections::BTreeSet;

fn repository_file(path: &str) -> String {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    std::fs::read_to_string(root.join(path)).unwrap_or_else(|error| panic!("{path}: {error}"))
}

/// Metric names in a PromQL expression: `sluice_*` and `http_*`, histogram suffixes removed.
fn metric_names(expression: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for word in expression.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')) {
        if word.starts_with("sluice_") || word.starts_with("http_") {
            let base = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|suffix| word.strip_suffix(suffix))
                .unwrap_or(word);
            names.insert(base.to_owned());
        }
    }
    names
}

#[test]
fn every_metric_on_the_dashboard_is_recorded_and_every_recorded_metric_is_documented() {
    let catalogue: BTreeSet<&str> = CATALOGUE.iter().map(|(name, _)| *name).collect();
    let dashboard: serde_json::Value =
        serde_json::from_str(&repository_file("helm/sluice/dashboards/sluice.json")).unwrap();
    let mut queried = BTreeSet::new();
    for panel in dashboard["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().into_iter().flatten() {
            queried.extend(metric_names(target["expr"].as_str().unwrap()));
        }
    }
    let unknown: Vec<&String> = queried
        .iter()
        .filter(|name| !catalogue.contains(name.as_str()))
        .collect();
    assert!(
        unknown.is_empty(),
        "the dashboard queries unknown metrics: {unknown:?}"
    );
    assert!(
        queried.len() >= 20,
        "the dashboard covers the catalogue: {queried:?}"
    );

    let readme = repository_file("README.md");
    let undocumented: Vec<&&str> = catalogue
        .iter()
        .filter(|name| {
            !readme.contains(&format!("`{name}`")) && !readme.contains(&format!("`{name} "))
        })
        .collect();
    assert!(
        undocumented.is_empty(),
        "the README does not list {undocumented:?}"
    );
}
