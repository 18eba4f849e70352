//! The in-flight requests of one upstream, shared by every route that uses it,
//! and the admission decision the `admission` stage takes on them.
//!
//! - **Priority thresholds.** Of `max_concurrency`, `bulk` is admitted while
//!   fewer than 70% are in flight, `normal` below 90%, `critical` up to 100%
//!   (each threshold rounded down, and at least 1). So when the upstream fills
//!   up, bulk is shed first and critical last, and the top 10% is kept for
//!   critical traffic.
//! - **Tenant fair share.** On routes with `tenant_key`, once the upstream is
//!   past the bulk threshold, a tenant may add a request only while it holds less
//!   than its fair share: in-flight / active tenants (tenants with a request in
//!   flight), at least 1. A tenant flooding the upstream is therefore shed while
//!   tenants within their share, above all a newcomer holding nothing, are still
//!   admitted up to their priority's threshold. The price: past the bulk
//!   threshold no tenant grows beyond the mean, so a lone tenant is held near
//!   70% (tenant-less requests are not).
//! - **No queue.** A refusal is immediate: a queue in front of an overloaded
//!   upstream only adds latency to the answers that time out anyway.
//!
//! Bounds: tenant counts live in a map of at most [`MAX_TENANTS`] entries, and
//! an entry is removed as soon as its tenant has nothing in flight, so the map
//! also never holds more entries than requests in flight. A new tenant arriving
//! while the map is full is admitted by priority alone, untracked.
//!
//! Cost: without a tenant, one compare-and-swap to enter and one `fetch_sub` to
//! leave; with a tenant, add a short lock on each.

use std::collections::hash_map::Entry;
use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use crate::config::Priority;
use crate::context::ClientKey;

/// Tenants tracked at most per upstream.
pub const MAX_TENANTS: usize = 10_000;

/// Why admission refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// The upstream is at the threshold of the request's priority.
    Capacity,
    /// The tenant holds its fair share of a busy upstream.
    TenantShare,
}

/// The in-flight count a priority is admitted below.
pub fn threshold(max: usize, priority: Priority) -> usize {
    let tenths: u128 = match priority {
        Priority::Bulk => 7,
        Priority::Normal => 9,
        Priority::Critical => 10,
    };
    ((max as u128 * tenths / 10) as usize).max(1)
}

/// A tenant's standing: what it holds, and how many tenants hold anything.
#[derive(Debug, Clone, Copy)]
pub struct TenantLoad {
    pub held: usize,
    pub active: usize,
}

/// The admission decision, given the upstream's in-flight count before this request.
pub fn decide(
    max: usize,
    priority: Priority,
    in_flight: usize,
    tenant: Option<TenantLoad>,
) -> Result<(), Refusal> {
    if let Some(t) = tenant {
        if in_flight >= threshold(max, Priority::Bulk) {
            let share = (in_flight / t.active.max(1)).max(1);
            if t.held >= share {
                return Err(Refusal::TenantShare);
            }
        }
    }
    if in_flight >= threshold(max, priority) {
        return Err(Refusal::Capacity);
    }
    Ok(())
}

pub struct Concurrency {
    max: usize,
    in_flight: AtomicUsize,
    /// In-flight requests per tenant; see the module doc for the bound.
    tenants: Mutex<HashMap<ClientKey, usize>>,
}

impl Concurrency {
    pub fn new(max: usize) -> Self {
        Concurrency { max, in_flight: AtomicUsize::new(0), tenants: Mutex::new(HashMap::new()) }
    }

    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Acquire)
    }

    /// Tenants with a request in flight.
    pub fn active_tenants(&self) -> usize {
        self.lock().len()
    }

    /// Admits one request, or says why not; the permit releases it when dropped.
    pub fn acquire(
        self: &Arc<Self>,
        priority: Priority,
        tenant: Option<&ClientKey>,
    ) -> Result<Permit, Refusal> {
        let Some(tenant) = tenant else {
            self.enter(priority, None)?;
            return Ok(Permit { concurrency: self.clone(), tenant: None });
        };
        // Tenant admissions are serialised by the lock, so the share they see is exact.
        let mut tenants = self.lock();
        let held = tenants.get(tenant).copied().unwrap_or(0);
        let load = TenantLoad { held, active: tenants.len() };
        self.enter(priority, Some(load))?;
        let tracked = held > 0 || tenants.len() < MAX_TENANTS;
        if tracked {
            *tenants.entry(tenant.clone()).or_insert(0) += 1;
        }
        Ok(Permit { concurrency: self.clone(), tenant: tracked.then(|| tenant.clone()) })
    }

    /// Decides and takes an in-flight slot in one step, so a racing request
    /// cannot push the count past the threshold.
    fn enter(&self, priority: Priority, tenant: Option<TenantLoad>) -> Result<(), Refusal> {
        let mut refusal = Refusal::Capacity;
        self.in_flight
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                match decide(self.max, priority, n, tenant) {
                    Ok(()) => Some(n + 1),
                    Err(r) => {
                        refusal = r;
                        None
                    }
                }
            })
            .map(drop)
            .map_err(|_| refusal)
    }

    fn release(&self, tenant: Option<&ClientKey>) {
        if let Some(t) = tenant {
            if let Entry::Occupied(mut held) = self.lock().entry(t.clone()) {
                *held.get_mut() -= 1;
                if *held.get() == 0 {
                    held.remove();
                }
            }
        }
        self.in_flight.fetch_sub(1, Ordering::AcqRel);
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<ClientKey, usize>> {
        // Plain counts, valid after any panic: a poisoned lock is still usable.
        self.tenants.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// One admitted request; held until the response body is finished.
pub struct Permit {
    concurrency: Arc<Concurrency>,
    tenant: Option<ClientKey>,
}

impl Drop for Permit {
    fn drop(&mut self) {
        self.concurrency.release(self.tenant.as_ref());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thresholds_by_priority() {
        assert_eq!(threshold(100, Priority::Bulk), 70);
        assert_eq!(threshold(100, Priority::Normal), 90);
        assert_eq!(threshold(100, Priority::Critical), 100);
        assert_eq!(threshold(10, Priority::Bulk), 7);
        assert_eq!(threshold(1, Priority::Bulk), 1, "at least one request for everyone");
        assert_eq!(threshold(usize::MAX, Priority::Critical), usize::MAX);
    }

    #[test]
    fn lower_priorities_are_shed_first() {
        assert!(decide(10, Priority::Bulk, 6, None).is_ok());
        assert_eq!(decide(10, Priority::Bulk, 7, None), Err(Refusal::Capacity));
        assert!(decide(10, Priority::Normal, 8, None).is_ok());
        assert_eq!(decide(10, Priority::Normal, 9, None), Err(Refusal::Capacity));
        assert!(decide(10, Priority::Critical, 9, None).is_ok());
        assert_eq!(decide(10, Priority::Critical, 10, None), Err(Refusal::Capacity));
    }

    #[test]
    fn past_the_bulk_threshold_a_tenant_at_its_share_is_shed() {
        let t = |held, active| Some(TenantLoad { held, active });
        // Below the bulk threshold, no fairness: one tenant may hold everything.
        assert!(decide(100, Priority::Normal, 69, t(69, 1)).is_ok());
        // Past it, 80 in flight over 2 tenants: a share is 40.
        assert_eq!(decide(100, Priority::Normal, 80, t(60, 2)), Err(Refusal::TenantShare));
        assert!(decide(100, Priority::Normal, 80, t(20, 2)).is_ok());
        // A newcomer holds nothing: always within its share.
        assert!(decide(100, Priority::Normal, 80, t(0, 2)).is_ok());
        // A lone tenant holds the whole in-flight count, its whole share.
        assert_eq!(decide(100, Priority::Critical, 70, t(70, 1)), Err(Refusal::TenantShare));
    }

    #[test]
    fn permits_count_and_release_tenants() {
        let c = Arc::new(Concurrency::new(10));
        let a = ClientKey::from_bytes(b"a");
        let b = ClientKey::from_bytes(b"b");
        let mut held = Vec::new();
        for _ in 0..7 {
            held.push(c.acquire(Priority::Normal, Some(&a)).unwrap());
        }
        // 7 in flight is the bulk threshold: tenant a holds all of it.
        assert_eq!(c.acquire(Priority::Normal, Some(&a)).err(), Some(Refusal::TenantShare));
        let pb = c.acquire(Priority::Normal, Some(&b)).unwrap();
        assert_eq!((c.in_flight(), c.active_tenants()), (8, 2));
        assert!(c.acquire(Priority::Bulk, None).is_err());
        drop(pb);
        held.clear();
        assert_eq!((c.in_flight(), c.active_tenants()), (0, 0));
    }

    #[test]
    fn a_full_tenant_map_admits_untracked() {
        let c = Arc::new(Concurrency::new(usize::MAX));
        let permits: Vec<_> = (0..MAX_TENANTS)
            .map(|i| {
                c.acquire(Priority::Normal, Some(&ClientKey::from_bytes(i.to_string().as_bytes()))).unwrap()
            })
            .collect();
        let extra = c.acquire(Priority::Normal, Some(&ClientKey::from_bytes(b"one-too-many"))).unwrap();
        assert_eq!(c.active_tenants(), MAX_TENANTS);
        drop(extra);
        drop(permits);
        assert_eq!((c.in_flight(), c.active_tenants()), (0, 0));
    }
}
