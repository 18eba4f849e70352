//! `GET` and `DELETE /api/v1/clients/{key}?route=NAME`: one client's limiter
//! state on each route (or one), and resetting it. `{key}` is the client key as
//! extracted (header or query value, IP, or the `bearer:`/`h:` hash), percent-encoded.

use std::sync::Arc;

use arc_swap::ArcSwap;
use http::StatusCode;
use serde_json::json;
use tokio::time::Instant;

use super::json_response;
use crate::body::Body;
use crate::context::ClientKey;
use crate::stack::client_id::query_param;
use crate::stack::Registry;

pub const PREFIX: &str = "/api/v1/clients/";

/// The decoded key of a `/api/v1/clients/{key}` path and the `route` query parameter.
pub fn parse(path: &str, query: Option<&str>) -> Option<(String, Option<String>)> {
    let raw = path.strip_prefix(PREFIX)?;
    if raw.is_empty() || raw.contains('/') {
        return None;
    }
    let key = percent_encoding::percent_decode_str(raw).decode_utf8().ok()?.into_owned();
    // The same query rule as a `query:NAME` client key: form-urlencoded, first `route` wins.
    let route = query.and_then(|q| query_param(q, "route"));
    Some((key, route))
}

pub async fn get(registry: &Arc<ArcSwap<Registry>>, key: &str, route: Option<&str>) -> http::Response<Body> {
    let registry = registry.load_full();
    if let Some(r) = route {
        if !registry.routes.iter().any(|s| &*s.name == r) {
            return json_response(StatusCode::NOT_FOUND, json!({"error": "no_such_route", "route": r}));
        }
    }
    let mut routes = Vec::new();
    let now = Instant::now();
    let client = ClientKey::from_text(key);
    for state in registry.routes.iter().filter(|s| route.is_none_or(|r| &*s.name == r)) {
        let limits = match state.limits.is_empty() {
            true => None,
            false => registry.store.peek(&state.limits, &client, now).await,
        };
        let storm = state.storm.as_ref().and_then(|s| s.client_state(&client, now));
        if limits.is_some() || storm.is_some() {
            routes.push(json!({"route": &*state.name, "limits": limits.unwrap_or_default(), "storm": storm}));
        }
    }
    if routes.is_empty() {
        return json_response(StatusCode::NOT_FOUND, json!({"error": "not_tracked", "client": key}));
    }
    json_response(
        StatusCode::OK,
        json!({"client": key, "store": format!("{:?}", registry.store.kind()).to_lowercase(), "routes": routes}),
    )
}

pub async fn delete(
    registry: &Arc<ArcSwap<Registry>>,
    key: &str,
    route: Option<&str>,
) -> http::Response<Body> {
    let registry = registry.load_full();
    let mut reset = Vec::new();
    let client = ClientKey::from_text(key);
    for state in registry.routes.iter().filter(|s| route.is_none_or(|r| &*s.name == r)) {
        let limits = !state.limits.is_empty() && registry.store.reset(&state.limits, &client).await;
        let storm = state.storm.as_ref().is_some_and(|s| s.reset(&client));
        if limits || storm {
            reset.push(state.name.to_string());
        }
    }
    if reset.is_empty() {
        return json_response(StatusCode::NOT_FOUND, json!({"error": "not_tracked", "client": key}));
    }
    json_response(StatusCode::OK, json!({"client": key, "reset": reset}))
}

#[cfg(test)]
mod tests {
    use super::parse;

    #[test]
    fn keys_are_percent_decoded() {
        assert_eq!(
            parse("/api/v1/clients/dev%2F1", Some("route=api")),
            Some(("dev/1".into(), Some("api".into())))
        );
        assert_eq!(parse("/api/v1/clients/10.0.0.1", None), Some(("10.0.0.1".into(), None)));
        assert_eq!(parse("/api/v1/clients/", None), None);
        // Form-urlencoded, first occurrence wins: `+` is a space, `%2B` a plus.
        assert_eq!(parse("/api/v1/clients/k", Some("route=a+b&route=c")).unwrap().1.as_deref(), Some("a b"));
        assert_eq!(parse("/api/v1/clients/k", Some("x=1&route=a%2Bb")).unwrap().1.as_deref(), Some("a+b"));
        assert_eq!(parse("/api/v1/clients/k", Some("myroute=x")).unwrap().1, None);
    }
}
