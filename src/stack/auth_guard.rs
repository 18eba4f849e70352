//! The 401 guard (response side): a wave of upstream 401s to clients that
//! were authorized moments ago is an upstream fault, not revoked credentials.
//!
//! In the outage behind it, a starved gateway answered 401, paired devices took
//! that for "credentials revoked", re-paired, and tripled the traffic. So:
//! levee remembers which clients got a 2xx within `recently_authorized`
//! (bounded: in the route's client table, [`RouteClients`], beside the storm
//! detector's record of the same client, capped at its share of
//! `store.max_clients`, the node's one budget), to the second: a 2xx within
//! a second of the client's record, as the storm detector saw it on
//! arrival, is counted without a lookup of its own. Over a sliding
//! `window` (ten buckets), it counts the responses to those clients (every 2xx
//! counts, since it makes its client recently authorized) and the 401s among
//! them.
//!
//! The guard needs evidence, so the first 401s of a wave pass before it trips:
//! with `S` successes in the window, about `S · r / (1 - r)` of them for
//! `max_401_ratio = r` (26 after 60 successes at the default 0.3). From then on
//! no recently-authorized client sees a 401. When there were at least `min_responses` and the share of
//! 401s is above `max_401_ratio`, the guard trips: an upstream 401 to a
//! recently-authorized client becomes 503 `upstream_auth_anomaly` with
//! `Retry-After` (the window, jittered), so the device keeps its credentials
//! and comes back later. The guard resets by itself when the share falls.
//! A 401 to a client that never succeeded passes unchanged, and while the
//! guard is quiet every 401 passes unchanged.
//!
//! In `mode = "shadow"` the guard counts and trips exactly as when it
//! enforces, but relays the upstream's 401 unchanged and records the 503 it
//! would have answered ([`super::shadow`]; the request is gone upstream
//! already, so there is no `x-levee-shadow` header). The mode is the live
//! config's: a reload that only switches it keeps the guard's window.

use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures_util::FutureExt;
use http::{Request, StatusCode};
use tokio::time::Instant;

use super::clients::{Authorized, RouteClients};
use super::shadow::Shadow;
use super::{Answer, Next, Stage};
use crate::body::Body;
use crate::config::{AuthGuardConfig, Mode};
use crate::context::{ClientKey, RequestContext};
use crate::metrics as m;
use crate::respond::{jitter, Reason, Shed};
use crate::upstream::window::{Ring, BUCKETS};

pub struct AuthGuard {
    route: Arc<str>,
    pub config: AuthGuardConfig,
    /// Each client's last 2xx (`RouteClient::authorized_ms`).
    clients: Arc<RouteClients>,
    /// The responses to recently-authorized clients over the sliding
    /// `window`, and the 401s among them: lock-free rings (`upstream::window`,
    /// as the breaker counts), because every response of the route, from
    /// every worker, adds to them. Bucketed in milliseconds on the client
    /// table's clock, which `observe` reads anyway.
    bucket_ms: u64,
    responses: Ring,
    unauthorized: Ring,
    tripped: AtomicBool,
}

impl AuthGuard {
    /// A guard for `route`, keeping its clients' last 2xx in the route's `clients` table.
    pub fn new(route: &str, config: &AuthGuardConfig, clients: Arc<RouteClients>) -> Arc<Self> {
        metrics::gauge!(m::AUTH_GUARD_TRIPPED, "route" => route.to_string()).set(0.0);
        clients.guard_keeps_for(u64::try_from(config.recently_authorized.as_millis()).unwrap_or(u64::MAX));
        Arc::new(AuthGuard {
            route: Arc::from(route),
            config: config.clone(),
            clients,
            bucket_ms: (u64::try_from(config.window.as_millis()).unwrap_or(u64::MAX) / BUCKETS as u64).max(1),
            responses: Ring::default(),
            unauthorized: Ring::default(),
            tripped: AtomicBool::new(false),
        })
    }

    pub fn tripped(&self) -> bool {
        self.tripped.load(Ordering::Relaxed)
    }

    /// Looks at one relayed response status for `client`; `true` when this
    /// 401 must become 503 `upstream_auth_anomaly`.
    pub fn observe(&self, client: &ClientKey, status: StatusCode, now: Instant) -> bool {
        self.observe_seen(client, status, now, Authorized::UNKNOWN)
    }

    /// [`AuthGuard::observe`], knowing what the client's entry held of its
    /// last 2xx when the request arrived (`seen`): a 2xx within a second of
    /// that record is counted without looking the client up again.
    pub fn observe_seen(
        &self,
        client: &ClientKey,
        status: StatusCode,
        now: Instant,
        seen: Authorized,
    ) -> bool {
        let now_ms = self.clients.ms(now);
        let success = status.is_success();
        // One map operation, or none: read the last 2xx and record this one.
        let authorized = (success && seen.lately(now_ms))
            || self.clients.with(client, |c| {
                let authorized = self.clients.authorized_lately(c, now_ms);
                if success {
                    c.set_authorized(now_ms);
                }
                authorized
            });
        if !success && !authorized {
            // Neither evidence of health nor of an anomaly: a client that
            // never succeeded, or a failure to someone not recently authorized.
            return false;
        }
        let unauthorized = status == StatusCode::UNAUTHORIZED;
        // Ring ticks are 32 bits and wrap, which the ring allows for.
        let tick = (now_ms / self.bucket_ms) as u32;
        self.responses.add(tick, 1);
        if unauthorized {
            self.unauthorized.add(tick, 1);
        } else if !self.tripped() {
            // Only a 401 raises the share of 401s; any other response can
            // trip the guard only by way of older responses leaving the
            // window, and a trip changes nothing but a 401's answer. So an
            // untripped guard sums its window on 401s (the next one trips it
            // as surely), and a tripped one on every response (a 2xx resets
            // it as before): two ring sums fewer on nearly every response.
            return false;
        }
        let (responses, unauthorized_count) = (self.responses.sum(tick), self.unauthorized.sum(tick));
        let trip = responses >= u64::from(self.config.min_responses)
            && unauthorized_count as f64 > self.config.max_401_ratio * responses as f64;
        if super::flipped(&self.tripped, trip) {
            metrics::gauge!(m::AUTH_GUARD_TRIPPED, "route" => self.route.to_string()).set(if trip {
                1.0
            } else {
                0.0
            });
            if trip {
                tracing::warn!(route = %self.route, responses, unauthorized = unauthorized_count, "auth guard tripped: upstream 401s to recently-authorized clients become 503");
            } else {
                tracing::info!(route = %self.route, "auth guard reset: upstream 401s pass unchanged");
            }
        }
        trip && unauthorized
    }
}

/// The stage, on the response side of everything that sheds.
pub struct Guard {
    guard: Arc<AuthGuard>,
    /// The live config's `mode` (the guard may be an older config's).
    mode: Mode,
    report: Arc<Shadow>,
}

impl Guard {
    /// `None` when `[routes.auth_guard] enabled = false`: the stage is then absent.
    pub fn new(guard: Option<Arc<AuthGuard>>, mode: Mode, report: Arc<Shadow>) -> Option<Self> {
        guard.filter(|g| g.config.enabled).map(|guard| Guard { guard, mode, report })
    }
}

impl Stage for Guard {
    fn call<'a, N: Next>(
        &'a self,
        req: Request<Body>,
        cx: &'a RequestContext,
        next: &'a N,
    ) -> impl Future<Output = Answer> + Send + 'a {
        // `map`, not an async block: the block would hold the request beside
        // the next stage's future, which holds it too.
        next.run(req, cx).map(move |answer| {
            let rsp = answer?;
            let Ok(identity) = super::identity(cx) else { return Ok(rsp) };
            let client = &identity.client;
            // When the upstream's answer came, which it read anyway (`context::Exchange`).
            let exchange = &cx.exchange;
            let at = exchange.answered().unwrap_or_else(Instant::now);
            let seen = Authorized::from_raw(exchange.authorized_seen());
            if self.guard.observe_seen(client, rsp.status(), at, seen) {
                let retry = jitter(self.guard.config.window.max(Duration::from_secs(1)), 0.5);
                let shed = Shed::new(Reason::UpstreamAuthAnomaly)
                    .retry_after(retry)
                    .detail("the upstream is refusing clients it accepted moments ago; keep your credentials and retry later");
                if self.mode == Mode::Enforce {
                    return Err(shed.client(client.clone()));
                }
                self.report.record(&shed, client.as_str(), None);
            }
            Ok(rsp)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn guard() -> Arc<AuthGuard> {
        let config = AuthGuardConfig {
            enabled: true,
            mode: Mode::Enforce,
            window: Duration::from_secs(10),
            min_responses: 50,
            max_401_ratio: 0.3,
            recently_authorized: Duration::from_secs(600),
        };
        AuthGuard::new("t", &config, RouteClients::new(1000))
    }

    #[tokio::test(start_paused = true)]
    async fn a_401_wave_to_authorized_clients_trips_and_heals() {
        let g = guard();
        let now = Instant::now();
        for c in 0..60 {
            assert!(!g.observe(&ClientKey::from_text(&format!("c{c}")), StatusCode::OK, now));
        }
        let rewritten = (0..60)
            .filter(|c| g.observe(&ClientKey::from_text(&format!("c{c}")), StatusCode::UNAUTHORIZED, now))
            .count();
        assert!(g.tripped());
        assert!(rewritten > 30, "{rewritten}");
        // A client that never succeeded gets its 401 unchanged.
        assert!(!g.observe(&ClientKey::from_text("stranger"), StatusCode::UNAUTHORIZED, now));
        // The upstream heals: successes push the share down, the guard resets.
        let later = now + Duration::from_secs(11);
        for c in 0..60 {
            g.observe(&ClientKey::from_text(&format!("c{c}")), StatusCode::OK, later);
        }
        assert!(!g.tripped());
        assert!(!g.observe(&ClientKey::from_text("c1"), StatusCode::UNAUTHORIZED, later));
    }

    /// A 2xx within a second of the record its request saw on arrival is
    /// counted and leaves the entry as it is; a later one, or one whose
    /// request saw nothing, records its time. Either way the client stays
    /// recently authorized, and its 401s in a wave are rewritten as before.
    #[tokio::test(start_paused = true)]
    async fn a_2xx_right_after_the_last_one_is_counted_without_a_new_record() {
        let g = guard();
        let client = ClientKey::from_text("seen-ok");
        let start = Instant::now();
        let record = || g.clients.peek(&client).map(|c| c.authorized_ms());
        g.observe(&client, StatusCode::OK, start);
        let first = record().expect("recorded");
        let seen = g.clients.peek(&client).map(|c| c.authorized()).expect("tracked");

        let soon = start + Duration::from_millis(800);
        g.observe_seen(&client, StatusCode::OK, soon, seen);
        assert_eq!(record(), Some(first), "within a second of the record: not rewritten");
        let tick = (g.clients.ms(soon) / g.bucket_ms) as u32;
        assert_eq!(g.responses.sum(tick), 2, "both 2xx counted");

        let later = start + Duration::from_millis(1500);
        g.observe_seen(&client, StatusCode::OK, later, seen);
        assert!(record().is_some_and(|ms| ms > first), "a second on: recorded again");
        let again = record();
        let after = start + Duration::from_millis(1600);
        g.observe_seen(&client, StatusCode::OK, after, Authorized::UNKNOWN);
        assert!(record() > again, "nothing seen on arrival: recorded");

        // Still recently authorized: in a wave, its 401 is rewritten.
        for c in 0..60 {
            g.observe(&ClientKey::from_text(&format!("seen{c}")), StatusCode::OK, after);
        }
        let wave = (0..60)
            .filter(|c| {
                g.observe(&ClientKey::from_text(&format!("seen{c}")), StatusCode::UNAUTHORIZED, after)
            })
            .count();
        assert!(g.tripped() && wave > 0, "{wave} rewritten");
        assert!(g.observe(&client, StatusCode::UNAUTHORIZED, after));
    }

    /// Responses from many threads at once all count: every worker of the
    /// route writes the window, without a lock.
    #[tokio::test(start_paused = true)]
    async fn responses_from_many_threads_all_count() {
        let g = guard();
        let now = Instant::now();
        let clients: Vec<ClientKey> = (0..100).map(|c| ClientKey::from_text(&format!("t{c}"))).collect();
        let (threads, each) = (4u64, 5_000u64);
        std::thread::scope(|s| {
            for t in 0..threads {
                let (g, clients) = (&g, &clients);
                s.spawn(move || {
                    for k in 0..each {
                        let client = &clients[((t * each + k) % 100) as usize];
                        g.observe(client, StatusCode::OK, now);
                    }
                });
            }
        });
        let tick = (g.clients.ms(now) / g.bucket_ms) as u32;
        assert_eq!(g.responses.sum(tick), threads * each);
        assert_eq!(g.unauthorized.sum(tick), 0);
    }

    /// The share of 401s can also rise by the 2xx leaving the window; a
    /// 2xx then does not trip the guard (only a 401 sums the window while it
    /// is not tripped), and the next 401 to an authorized client is rewritten
    /// all the same.
    #[tokio::test(start_paused = true)]
    async fn a_share_raised_by_the_window_sliding_trips_at_the_next_401() {
        let g = guard();
        let client = |c: usize| ClientKey::from_text(&format!("slide{c}"));
        let start = Instant::now();
        for c in 0..200 {
            g.observe(&client(c), StatusCode::OK, start);
        }
        // 60 of 260 responses are 401s: 23%, under the 30% that trips.
        let five = start + Duration::from_secs(5);
        assert!((0..60).all(|c| !g.observe(&client(c), StatusCode::UNAUTHORIZED, five)));
        assert!(!g.tripped());
        // The first second's 200 2xx leave the window: the 401s are now
        // nearly all of it.
        let later = start + Duration::from_millis(10_500);
        assert!(!g.observe(&client(100), StatusCode::OK, later));
        assert!(g.observe(&client(60), StatusCode::UNAUTHORIZED, later), "the next 401 is rewritten");
        assert!(g.tripped());
    }

    #[tokio::test(start_paused = true)]
    async fn a_lone_401_with_a_healthy_upstream_passes() {
        let g = guard();
        let now = Instant::now();
        for c in 0..100 {
            g.observe(&ClientKey::from_text(&format!("c{c}")), StatusCode::OK, now);
        }
        assert!(!g.observe(&ClientKey::from_text("c3"), StatusCode::UNAUTHORIZED, now));
        assert!(!g.tripped());
    }
}
