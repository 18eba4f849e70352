//! Stage 3a's companion, which `client_id.rs` calls: as soon as a request's
//! client is known, start loading the client's entries in every per-client
//! table the route will read (the limiter's, and the route's table of the
//! storm detector and the auth guard).
//!
//! Why: at a million tracked clients each of those lookups is a cache miss,
//! and they come one after the other, each behind a shard lock (a full
//! fence), so a request paid a miss per table in a row. Prefetched together,
//! the loads overlap and the request pays for about one (`benches/storm.rs`,
//! "all per-client stages"). A prefetch is only a hint: it changes no state
//! and no decision, and a slot that moved meanwhile is simply missed as before.

use std::sync::Arc;

use super::clients::RouteClients;
use crate::context::ClientKey;
use crate::store::{RouteLimits, Store};

/// The per-client tables of one route.
#[derive(Clone)]
pub struct Warm {
    limiter: Option<(Arc<Store>, Arc<str>)>,
    clients: Option<Arc<RouteClients>>,
}

impl std::fmt::Debug for Warm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Warm")
            .field("limiter", &self.limiter.as_ref().map(|(_, route)| route))
            .field("clients", &self.clients.is_some())
            .finish()
    }
}

impl Warm {
    /// The tables the route's stages read: the store's (when the route has
    /// limits whose buckets are not in its client table) and the route's
    /// client table (when it has a storm detector or an auth guard). `None`
    /// when the route reads none: nothing to warm.
    pub fn new(limits: &RouteLimits, store: Arc<Store>, clients: Option<Arc<RouteClients>>) -> Option<Self> {
        let in_store = !limits.is_empty() && !limits.in_client_table();
        let warm = Warm { limiter: in_store.then(|| (store, limits.route.clone())), clients };
        (warm.limiter.is_some() || warm.clients.is_some()).then_some(warm)
    }

    /// Starts loading `client`'s entries.
    pub fn client(&self, client: &ClientKey) {
        if let Some((store, route)) = &self.limiter {
            store.prefetch(route, client);
        }
        if let Some(clients) = &self.clients {
            clients.prefetch(client);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn only_a_route_with_per_client_tables_warms_them() {
        let config = crate::config::parse(
            "[upstreams.u]\nendpoints = [\"127.0.0.1:1\"]\n\
             [[routes]]\nname = \"warm-limited\"\npath_prefix = \"/\"\nupstream = \"u\"\n\
             [routes.storm]\nenabled = false\n[routes.auth_guard]\nenabled = false\n\
             [[routes.limits]]\nrate = \"5/s\"\n",
            std::path::Path::new("."),
            &|_| None,
        )
        .unwrap();
        let store = Store::start(config.store.clone());
        let route = &config.routes[0];
        assert!(Warm::new(&RouteLimits::new(&route.name, &[]), store.clone(), None).is_none());
        let limits = RouteLimits::new(&route.name, &route.limits);
        let warm = Warm::new(&limits, store.clone(), None).expect("a route with limits warms the limiter");
        // A hint changes no state: the client is still untracked.
        warm.client(&ClientKey::from_text("warm-client"));
        assert_eq!(store.tracked_limiter(), 0);
    }
}
