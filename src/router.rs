//! Host plus longest `path_prefix` → route. A plain function over a table built
//! once per config.
//!
//! Matching rules (Envoy's virtual hosts, NGINX's prefix locations):
//! - routes with an exact `host` are tried before `host = "*"` routes; within a
//!   group the longest prefix wins and ties go to the first declared;
//! - a prefix is a plain string prefix of the path (`/v1/device` also matches
//!   `/v1/devices`), as in NGINX and Envoy; end it with `/` to match a segment;
//! - the host is compared without its port and case-insensitively.
//!
//! Cost: one hash lookup per distinct prefix length in the group (usually a
//! handful), independent of the number of routes; see `benches/router.rs`.
//! The tables hash with foldhash (seeded per process), not SipHash: their keys
//! come from the config, so a client's path can lengthen no probe, and SipHash
//! cost a routed request about 150 instructions.

use std::collections::HashMap;

type Map<K, V> = HashMap<K, V, foldhash::fast::RandomState>;

/// Routes of one host group, indexed by prefix length, longest first.
#[derive(Debug, Default)]
struct Group {
    /// (prefix length, prefix → route index), sorted by length descending.
    by_len: Vec<(usize, Map<Box<str>, usize>)>,
}

impl Group {
    fn insert(&mut self, prefix: &str, idx: usize) {
        let len = prefix.len();
        let pos = match self.by_len.binary_search_by(|(l, _)| len.cmp(l)) {
            Ok(p) => p,
            Err(p) => {
                self.by_len.insert(p, (len, Map::default()));
                p
            }
        };
        // Ties go to the first declared: never overwrite.
        self.by_len[pos].1.entry(prefix.into()).or_insert(idx);
    }

    fn find(&self, path: &str) -> Option<usize> {
        self.by_len.iter().find_map(|(len, map)| path.get(..*len).and_then(|p| map.get(p).copied()))
    }
}

/// A compiled routing table over values of type `T`.
#[derive(Debug)]
pub struct Router<T> {
    by_host: Map<String, Group>,
    any_host: Group,
    routes: Vec<T>,
}

impl<T> Router<T> {
    /// Builds the table from `(host, path_prefix, value)` in declaration order;
    /// a `None` host matches any host.
    pub fn new(entries: impl IntoIterator<Item = (Option<String>, String, T)>) -> Self {
        let mut router = Router { by_host: Map::default(), any_host: Group::default(), routes: Vec::new() };
        for (host, prefix, value) in entries {
            let idx = router.routes.len();
            router.routes.push(value);
            match host {
                Some(h) => router.by_host.entry(h.to_ascii_lowercase()).or_default().insert(&prefix, idx),
                None => router.any_host.insert(&prefix, idx),
            }
        }
        router
    }

    /// The route for `host` (with or without port) and `path`.
    pub fn find(&self, host: Option<&str>, path: &str) -> Option<&T> {
        self.find_index(host, path).and_then(|i| self.routes.get(i))
    }

    /// [`find`](Self::find)'s route as its place in [`routes`](Self::routes):
    /// what a future that owns the table (not a borrow of it) can keep.
    pub fn find_index(&self, host: Option<&str>, path: &str) -> Option<usize> {
        // Most configs route on paths alone: no host to parse then.
        let host = host.filter(|_| !self.by_host.is_empty());
        let exact = host.map(strip_port).and_then(|h| {
            if h.bytes().any(|b| b.is_ascii_uppercase()) {
                self.by_host.get(&h.to_ascii_lowercase())
            } else {
                self.by_host.get(h)
            }
        });
        exact.and_then(|g| g.find(path)).or_else(|| self.any_host.find(path))
    }

    pub fn routes(&self) -> &[T] {
        &self.routes
    }
}

fn strip_port(host: &str) -> &str {
    if host.starts_with('[') {
        // [v6]:port
        return host.split_once(']').map_or(host, |(h, _)| &host[..h.len() + 1]);
    }
    host.rsplit_once(':').map_or(host, |(h, _)| h)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn router() -> Router<&'static str> {
        Router::new([
            (None, "/".to_string(), "root"),
            (None, "/v1/device".to_string(), "device"),
            (None, "/v1/device".to_string(), "device-dup"),
            (None, "/v1/device/ota".to_string(), "ota"),
            (Some("api.example.com".to_string()), "/v1".to_string(), "api-host"),
        ])
    }

    #[test]
    fn longest_prefix_wins() {
        let r = router();
        assert_eq!(r.find(None, "/v1/device/ota/1"), Some(&"ota"));
        assert_eq!(r.find(None, "/v1/device/7"), Some(&"device"));
        assert_eq!(r.find(None, "/other"), Some(&"root"));
    }

    #[test]
    fn ties_go_to_first_declared() {
        assert_eq!(router().find(None, "/v1/device"), Some(&"device"));
    }

    #[test]
    fn exact_host_first_without_port_and_case() {
        let r = router();
        assert_eq!(r.find(Some("API.example.com:8080"), "/v1/device"), Some(&"api-host"));
        assert_eq!(r.find(Some("api.example.com"), "/x"), Some(&"root"));
        assert_eq!(r.find(Some("other.example.com"), "/v1/device"), Some(&"device"));
    }

    #[test]
    fn no_route() {
        let r: Router<&str> = Router::new([(None, "/api".to_string(), "api")]);
        assert_eq!(r.find(None, "/"), None);
        assert_eq!(r.find(None, "/ap"), None);
    }

    #[test]
    fn ipv6_hosts() {
        assert_eq!(strip_port("[::1]:8080"), "[::1]");
        assert_eq!(strip_port("example.com"), "example.com");
    }
}
