//! One memory budget: `store.max_clients` caps every piece of per-client state
//! of the node together (SPEC, "Rules the configuration relies on"), whatever
//! the number of routes.
//!
//! Per-client state lives in [`ClockMap`](super::clock::ClockMap)s: the
//! limiter's one map (every route's buckets), and per route the client table
//! (the storm detector's growth and the auth guard's last 2xx, one entry per
//! client) and the storm detector's request fingerprints. Before, each of those was capped at
//! `max_clients` on its own, so six routes with storm and guard could hold
//! nineteen times the budget.
//!
//! The split is static and proportional, recomputed on every reload: each
//! route map counts one share, the limiter's map one share per route with
//! limits (it holds an entry per route and client), and a share is
//! `max_clients / shares`. A static split is what keeps a flood on one route
//! from evicting another route's state (a shared pool with global eviction
//! would let it), and it costs nothing on the request path: a map past its
//! share evicts one of its own least recently seen entries, as it always did.
//! The maps grow with use and never preallocate their share.
//!
//! Top offenders are not counted here: they are a fixed [`TOP_K`] per route
//! (`stats.rs`), part of the fixed overhead.
//!
//! [`TOP_K`]: crate::stats::TOP_K

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};

use crate::config::RouteConfig;

/// A bounded map of per-client state whose cap the budget sets.
pub trait Tracked: Send + Sync {
    /// Entries held now.
    fn tracked(&self) -> usize;
    /// Bytes its tables hold.
    fn bytes(&self) -> usize;
    /// Sets the cap, evicting past it.
    fn set_capacity(&self, max_entries: usize);
}

/// How `max_clients` is split for one config.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shares {
    /// The cap of each per-route map (storm, auth guard).
    pub per_map: usize,
    /// The cap of the limiter's map (one share per route with limits).
    pub limiter: usize,
}

impl Shares {
    /// The split of `max_clients` over the per-client maps `routes` need.
    pub fn of(max_clients: usize, routes: &[RouteConfig]) -> Shares {
        let limited = routes.iter().filter(|r| !r.limits.is_empty()).count();
        let per_route: usize = routes
            .iter()
            .map(|r| usize::from(r.storm.enabled) + usize::from(r.storm.enabled || r.auth_guard.enabled))
            .sum();
        let shares = (limited + per_route).max(1);
        let per_map = (max_clients / shares).max(1);
        Shares { per_map, limiter: per_map * limited }
    }
}

/// The node's budget: the current split, and every live per-route map (to
/// re-split on reload and to count what the node tracks).
pub struct ClientBudget {
    per_map: AtomicUsize,
    maps: Mutex<Vec<Weak<dyn Tracked>>>,
}

impl ClientBudget {
    pub fn new(max_clients: usize) -> Self {
        ClientBudget { per_map: AtomicUsize::new(max_clients.max(1)), maps: Mutex::new(Vec::new()) }
    }

    /// Applies a new split to every live map (a reload); returns it.
    pub fn plan(&self, max_clients: usize, routes: &[RouteConfig]) -> Shares {
        let shares = Shares::of(max_clients, routes);
        self.per_map.store(shares.per_map, Ordering::Relaxed);
        let mut maps = self.maps.lock().unwrap_or_else(|p| p.into_inner());
        maps.retain(|m| match m.upgrade() {
            Some(m) => {
                m.set_capacity(shares.per_map);
                true
            }
            None => false,
        });
        shares
    }

    /// Counts `map` against the budget (once, however often it is adopted)
    /// and caps it at the current share.
    pub fn adopt(&self, map: &Arc<dyn Tracked>) {
        map.set_capacity(self.per_map.load(Ordering::Relaxed));
        let mut maps = self.maps.lock().unwrap_or_else(|p| p.into_inner());
        let weak = Arc::downgrade(map);
        if !maps.iter().any(|m| Weak::ptr_eq(m, &weak)) {
            maps.retain(|m| m.strong_count() > 0);
            maps.push(weak);
        }
    }

    /// Entries held by the live per-route maps.
    pub fn tracked(&self) -> usize {
        let maps = self.maps.lock().unwrap_or_else(|p| p.into_inner());
        maps.iter().filter_map(Weak::upgrade).map(|m| m.tracked()).sum()
    }

    /// Bytes the live per-route maps' tables hold.
    pub fn bytes(&self) -> usize {
        let maps = self.maps.lock().unwrap_or_else(|p| p.into_inner());
        maps.iter().filter_map(Weak::upgrade).map(|m| m.bytes()).sum()
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use http::{Method, StatusCode, Uri};
    use tokio::time::Instant;

    use super::*;
    use crate::context::ClientKey;
    use crate::stack::auth_guard::AuthGuard;
    use crate::stack::clients::RouteClients;
    use crate::stack::storm::Storm;
    use crate::store::{RouteLimits, Store};

    /// The README's number: six routes with limits, storm detection and the
    /// auth guard, flooded with three times `max_clients` distinct clients per
    /// route. Every per-client entry of the node together stays within
    /// `max_clients`, and the tables (slack included) cost at most
    /// `max_clients × BYTES_PER_CLIENT`.
    #[tokio::test]
    async fn one_budget_over_six_routes_and_the_bytes_per_client() {
        // By construction: the largest slot (the limiter's, 56 bytes) in a
        // table at least 3/8 full (doubling while it grows, at most 3/4 full):
        // 149. Measured here: 44 (80 with power-of-two tables and a padded
        // reference bit).
        const BYTES_PER_CLIENT: usize = 176;
        let max_clients = 60_000;
        let mut toml =
            format!("[store]\nmax_clients = {max_clients}\n[upstreams.u]\nendpoints = [\"127.0.0.1:1\"]\n");
        for r in 0..6 {
            toml += &format!("[[routes]]\nname = \"r{r}\"\npath_prefix = \"/r{r}\"\nupstream = \"u\"\n");
            toml += "[[routes.limits]]\nrate = \"10/s\"\n[[routes.limits]]\nrate = \"100/h\"\n";
        }
        let config = crate::config::parse(&toml, Path::new("."), &|_| None).unwrap();
        let store = Store::start(config.store.clone());
        let shares = store.plan_budget(&config.routes);
        // Six routes, each with its limits, its client table and its storm
        // detector's requests: 18 shares.
        assert_eq!(shares, Shares { per_map: max_clients / 18, limiter: max_clients / 18 * 6 });
        let uri: Uri = "/x".parse().unwrap();
        let now = Instant::now();
        let mut routes = Vec::new();
        for r in &config.routes {
            let clients = RouteClients::new(shares.per_map);
            let storm = Storm::start(&r.name, &r.storm, clients.clone(), shares.per_map);
            let guard = AuthGuard::new(&r.name, &r.auth_guard, clients.clone());
            for m in [storm.budget_map(), clients.budget_map()] {
                store.budget().adopt(&m);
            }
            routes.push((RouteLimits::new(&r.name, &r.limits), storm, guard));
        }
        for i in 0..3 * max_clients {
            let client = ClientKey::from_text(&format!("client-{i}"));
            for (limits, storm, guard) in &routes {
                store.check(limits, &client, now).await.unwrap();
                let fp = storm.fingerprint(&client, &Method::GET, &uri, None);
                let _ = storm.observe(&client, fp, now);
                storm.finish(fp, false);
                guard.observe(&client, StatusCode::OK, now);
            }
        }
        let tracked = store.tracked();
        assert!(tracked <= max_clients, "{tracked} entries > max_clients {max_clients}");
        // A finished request that did not fail leaves no entry in the storm
        // detector's request table (`Storm::finish`): those 6 of the 18 shares
        // stay empty, and every other map fills its share.
        for (_, storm, _) in &routes {
            assert_eq!(storm.budget_map().tracked(), 0, "finished requests hold no entry");
        }
        assert!(tracked >= max_clients * 12 / 18 * 9 / 10, "{tracked}: the shares are used");
        let bytes = store.memory.bytes() + store.budget().bytes();
        let per_client = bytes / max_clients;
        println!("{tracked} entries, {bytes} bytes of tables: {per_client} bytes per tracked client");
        assert!(per_client <= BYTES_PER_CLIENT, "{per_client} bytes per client");
    }
}
