//! One memory budget: `store.max_clients` caps every piece of per-client state
//! of the node together (SPEC, "Rules the configuration relies on"), whatever
//! the number of routes.
//!
//! Per-client state lives in [`ClockMap`](super::clock::ClockMap)s: the
//! limiter's one map (every route's buckets), and per route the client table
//! (the storm detector's growth and the auth guard's last 2xx, one entry per
//! client) and the storm detector's request fingerprints. Before, each of
//! those was capped at `max_clients` on its own, so six routes with storm and
//! guard could hold nineteen times the budget.
//!
//! The split is static and proportional, recomputed on every reload: each
//! route map counts one share, the limiter's map one share per route whose
//! buckets it holds (an entry per route and client; a route that keeps them
//! in its client table, `RouteConfig::buckets_in_client_table`, adds none),
//! and a share is
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

use crate::config::{RouteConfig, StoreKind};

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
    /// The cap of the limiter's map (one share per route whose buckets it holds).
    pub limiter: usize,
}

impl Shares {
    /// The split of `max_clients` over the per-client maps `routes` need on `store`.
    pub fn of(max_clients: usize, store: StoreKind, routes: &[RouteConfig]) -> Shares {
        let limited =
            routes.iter().filter(|r| !r.limits.is_empty() && !r.buckets_in_client_table(store)).count();
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
    pub fn plan(&self, max_clients: usize, store: StoreKind, routes: &[RouteConfig]) -> Shares {
        let shares = Shares::of(max_clients, store, routes);
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
