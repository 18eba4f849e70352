//! The files levee ships for its ecosystem (Grafana dashboard, Prometheus
//! alerts) parse, and name only metrics levee exports.

use std::collections::BTreeSet;

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

fn read(path: &str) -> String {
    std::fs::read_to_string(format!("{ROOT}/{path}")).unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// The values of `pub const NAME: &str = "levee_...";` in src/metrics.rs.
fn exported_metrics() -> BTreeSet<String> {
    let names: BTreeSet<String> = read("src/metrics.rs")
        .lines()
        .filter(|l| l.trim_start().starts_with("pub const") && l.contains(": &str"))
        .filter_map(|l| l.split('"').nth(1))
        .filter(|n| n.starts_with("levee_"))
        .map(str::to_string)
        .collect();
    assert!(names.len() > 10, "{names:?}");
    names
}

/// Every `levee_*` identifier in `text`.
fn metric_names(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let mut rest = text;
    while let Some(i) = rest.find("levee_") {
        let preceded = rest[..i].chars().next_back().is_some_and(|c| c.is_ascii_alphanumeric() || c == '_');
        let len =
            rest[i..].find(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).unwrap_or(rest.len() - i);
        if !preceded {
            names.insert(rest[i..i + len].to_string());
        }
        rest = &rest[i + len..];
    }
    names
}

/// Checks each name is an exported metric (histogram series by their base name).
fn assert_exported(file: &str, used: &BTreeSet<String>) {
    let exported = exported_metrics();
    for name in used {
        let base = ["_bucket", "_count", "_sum"]
            .iter()
            .find_map(|s| name.strip_suffix(s).filter(|b| exported.contains(*b)))
            .unwrap_or(name);
        assert!(exported.contains(base), "{file} uses {name}, which src/metrics.rs does not define");
    }
}

#[test]
fn grafana_dashboard_parses_and_uses_only_exported_metrics() {
    let text = read("config/grafana/levee.json");
    let dash: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(dash["__inputs"][0]["name"], "DS_PROMETHEUS");
    let panels = dash["panels"].as_array().unwrap();
    let mut exprs = Vec::new();
    for p in panels {
        let targets =
            p["targets"].as_array().unwrap_or_else(|| panic!("panel {} has no targets", p["title"]));
        for t in targets {
            let expr = t["expr"].as_str().unwrap_or_default();
            assert!(!expr.trim().is_empty(), "panel {} has an empty query", p["title"]);
            exprs.push(expr.to_string());
        }
    }
    let used = metric_names(&exprs.join("\n"));
    assert_exported("config/grafana/levee.json", &used);
    for needed in [
        "levee_requests_total",
        "levee_shed_total",
        "levee_request_duration_seconds_bucket",
        "levee_route_stale",
        "levee_tls_cert_not_after_timestamp_seconds",
        "levee_circuit_state",
        "levee_store_up",
    ] {
        assert!(used.contains(needed), "the dashboard does not show {needed}");
    }
}

#[test]
fn prometheus_alerts_parse_with_required_rules_and_exported_metrics() {
    let text = read("config/prometheus/alerts.yml");
    let doc: serde_yaml_ng::Value = serde_yaml_ng::from_str(&text).unwrap();
    let mut alerts = BTreeSet::new();
    let mut exprs = Vec::new();
    for group in doc["groups"].as_sequence().expect("groups") {
        for rule in group["rules"].as_sequence().expect("rules") {
            let name = rule["alert"].as_str().expect("every rule is an alert").to_string();
            let expr = rule["expr"].as_str().unwrap_or_default();
            assert!(!expr.trim().is_empty(), "{name}: empty expr");
            assert!(
                rule["labels"]["severity"].as_str().is_some_and(|s| !s.is_empty()),
                "{name}: no severity"
            );
            assert!(
                rule["annotations"]["summary"].as_str().is_some_and(|s| !s.is_empty()),
                "{name}: no summary"
            );
            assert!(rule["annotations"]["description"].as_str().is_some(), "{name}: no description");
            exprs.push(expr.to_string());
            alerts.insert(name);
        }
    }
    for needed in [
        "LeveeRouteStale",
        "LeveeCircuitOpen",
        "LeveeStoreDown",
        "LeveeCertificateExpiring",
        "LeveeConfigReloadRejected",
        "LeveeAuthGuardTripped",
        "LeveeWatchdog",
    ] {
        assert!(alerts.contains(needed), "alerts.yml has no {needed}");
    }
    assert_exported("config/prometheus/alerts.yml", &metric_names(&exprs.join("\n")));
}

#[test]
fn metric_names_are_found_in_queries() {
    let names = metric_names("rate(levee_shed_total{reason=\"x\"}[5m]) / levee_up + not_levee_x");
    assert_eq!(names.into_iter().collect::<Vec<_>>(), ["levee_shed_total", "levee_up"]);
}
