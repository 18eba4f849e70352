//! What levee knows about a request besides the request itself. The proxy
//! creates a [`RequestContext`] when it routes the request and lends it to
//! every stage beside the request (`stack::Next::run`); the client-id stage
//! leaves the client's [`Identity`] in it, and the request's parts tell each
//! other what happened through its [`Exchange`].

use std::fmt;
use std::hash::BuildHasher;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, LazyLock};
use std::time::Duration;

use http::HeaderMap;
use sha2::{Digest, Sha256};
use tokio::time::Instant;

use http::header::HeaderName;

use crate::body::{BodyFault, Fault};
use crate::config::TrustedProxies;

pub const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
pub const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
pub const X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// Longer keys are hashed: state and logs stay small whatever the client sends.
pub const MAX_KEY_BYTES: usize = 128;

/// The seed of every [`ClientKey::hash64`]: random per process, so a client
/// cannot choose keys that meet in one slot of a per-client table.
static KEY_SEED: LazyLock<foldhash::fast::RandomState> = LazyLock::new(Default::default);

/// A client's identity on a route, as extracted; what the admin API shows.
///
/// It carries its 64-bit hash, computed once when the key is made: the
/// per-client tables (the limiter's, the storm detector's, the auth guard's)
/// each derive their own key from it with one multiply, where each used to
/// hash the text again.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ClientKey {
    text: Arc<str>,
    hash: u64,
}

impl ClientKey {
    fn new(text: Arc<str>) -> Self {
        let hash = KEY_SEED.hash_one(text.as_bytes());
        ClientKey { text, hash }
    }

    /// A key from raw bytes: kept as is when short printable ASCII, else hashed.
    pub fn from_bytes(raw: &[u8]) -> Self {
        let printable = raw.iter().all(|b| (0x21..0x7f).contains(b));
        if printable && raw.len() <= MAX_KEY_BYTES {
            // Printable ASCII is valid UTF-8.
            ClientKey::new(Arc::from(std::str::from_utf8(raw).unwrap_or_default()))
        } else {
            ClientKey::hashed("h", raw)
        }
    }

    /// A key as levee shows it (the admin API's, a reset announced by
    /// another replica): the same key, and hash, as the request path made.
    pub fn from_text(text: &str) -> Self {
        ClientKey::new(Arc::from(text))
    }

    /// `prefix:` and the first 128 bits of the SHA-256 of `raw`, in hex.
    pub(crate) fn hashed(prefix: &str, raw: &[u8]) -> Self {
        let digest = Sha256::digest(raw);
        let hex: String = digest[..16].iter().map(|b| format!("{b:02x}")).collect();
        ClientKey::new(Arc::from(format!("{prefix}:{hex}")))
    }

    /// A client address as a key.
    pub(crate) fn from_ip(ip: IpAddr) -> Self {
        let mut buf = [0u8; IP_TEXT_BYTES];
        ClientKey::new(Arc::from(ip_text(ip, &mut buf)))
    }

    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// The key's 64-bit hash under the process's random seed.
    pub fn hash64(&self) -> u64 {
        self.hash
    }
}

impl fmt::Display for ClientKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

impl fmt::Debug for ClientKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ClientKey({})", self.text)
    }
}

/// Room for the longest IP address text (IPv6, 45 bytes).
pub(crate) const IP_TEXT_BYTES: usize = 48;

/// An IP address as a header value, formatted on the stack ([`ip_text`]).
/// Its bytes are shared from the start, so that each request's copy is a
/// reference count, not an allocation.
pub(crate) fn ip_header(ip: IpAddr) -> http::HeaderValue {
    let mut buf = [0u8; IP_TEXT_BYTES];
    let text = ip_text(ip, &mut buf);
    http::HeaderValue::from_maybe_shared(bytes::Bytes::from_owner(text.to_string()))
        .unwrap_or(http::HeaderValue::from_static("unknown"))
}

/// An IP address as text, written into `buf`, as `Display` writes it. IPv4,
/// on every forwarded request and every request keyed by address, is written
/// by hand: `Display` for an address costs about a thousand instructions, a
/// fortieth of a request.
pub(crate) fn ip_text(ip: IpAddr, buf: &mut [u8; IP_TEXT_BYTES]) -> &str {
    let len = match ip {
        IpAddr::V4(v4) => {
            let mut at = 0;
            for (i, octet) in v4.octets().into_iter().enumerate() {
                if i > 0 {
                    buf[at] = b'.';
                    at += 1;
                }
                if octet >= 100 {
                    buf[at] = b'0' + octet / 100;
                    at += 1;
                }
                if octet >= 10 {
                    buf[at] = b'0' + octet / 10 % 10;
                    at += 1;
                }
                buf[at] = b'0' + octet % 10;
                at += 1;
            }
            at
        }
        IpAddr::V6(v6) => {
            use std::io::Write;
            let mut cursor = std::io::Cursor::new(&mut buf[..]);
            // The buffer holds the longest IPv6 text, so the write cannot fail.
            let _ = write!(cursor, "{v6}");
            usize::try_from(cursor.position()).unwrap_or(0)
        }
    };
    // Digits, dots, hex and colons: always UTF-8.
    std::str::from_utf8(&buf[..len]).unwrap_or_default()
}

/// The scheme the client spoke to levee with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scheme {
    Http,
    Https,
}

impl Scheme {
    pub fn as_str(self) -> &'static str {
        match self {
            Scheme::Http => "http",
            Scheme::Https => "https",
        }
    }
}

/// What levee knows of a request beside its head and body. The proxy holds
/// it for the request's whole trip and lends it to every stage and the
/// upstream call (`stack::Next::run`), next to the request rather than in
/// its extensions: a lookup there is a hash probe and two dynamic calls, and
/// the stages made eight of them per request, besides the map's and the
/// box's allocations.
#[derive(Debug, Clone)]
pub struct RequestContext {
    /// The connection's peer: the socket's address, or the PROXY header's source.
    pub peer: SocketAddr,
    /// The peer's address as header text, for `X-Forwarded-For` (made once
    /// per connection, `listener::ConnInfo`).
    pub peer_header: http::HeaderValue,
    /// The client's address ([`client_ip`]): the peer's, or what a trusted
    /// proxy put in `X-Forwarded-For`. What `client_key = "ip"` keys on and
    /// what logs print.
    pub client_ip: IpAddr,
    /// The peer is in `server.trusted_proxies`: its `X-Forwarded-For` chain is
    /// passed on upstream; anyone else's is replaced.
    pub peer_trusted: bool,
    pub scheme: Scheme,
    /// The `x-request-id` kept from the client or generated.
    pub request_id: http::HeaderValue,
    pub route: Arc<str>,
    pub started: Instant,
    /// When the request was whole: `started`, or, for a body read whole
    /// before the stack (`body_buffered`), when its last byte came. The storm
    /// detector, the limits (`stack::identity`) and the circuit breaker
    /// decide at it, so they read no clock of their own. Not `started`: a body that trickles in for
    /// seconds would have them decide in the past, where a bucket's cap falls
    /// below what later requests left it at and a client's interval rolls back.
    pub whole: Instant,
    /// What the request's parts learn after it has moved down the stack:
    /// its body's fault, the upstream's answer time.
    pub exchange: Arc<Exchange>,
    /// The body is in memory (empty, or read whole before the stack): it can
    /// be hashed by the storm detector and replayed by a retry. A streamed
    /// body is sent once and never waited for inside the stack.
    pub body_buffered: bool,
    /// A WebSocket upgrade levee relays: forwarding keeps its `Upgrade`.
    pub upgrade: bool,
    /// A gRPC call (`respond::is_grpc`): refused in gRPC's terms, forwarded
    /// over HTTP/2. Read once, when the request arrives.
    pub grpc: bool,
    /// Who is asking, as the route's client-id stage (in every stack) found;
    /// empty before it. Set once, through the shared reference every stage
    /// holds.
    pub identity: std::sync::OnceLock<Identity>,
}

/// Who is asking: the client key (and tenant) the route configures, so that
/// every stage keys its state by the same identity (`stack::client_id`).
#[derive(Debug, Clone)]
pub struct Identity {
    pub client: ClientKey,
    pub tenant: Option<ClientKey>,
    pub priority: crate::config::Priority,
}

/// What one request's parts tell each other after the request itself has
/// moved down the stack, where a stage above can no longer read it: why the
/// client's body failed (set by `body::ClientBody`, read when an upstream try
/// fails) and when the upstream last answered (set by `Upstream::forward`,
/// which reads the clock then for its histogram; read on the way back by the
/// circuit breaker and the auth guard, which would each read it again: a
/// clock read costs 20-50 ns here, most of a per-client stage), and what the
/// client's entry in its route's table held of the auth guard's record when
/// the storm detector looked it up (set by the detector, read by the guard,
/// which then need not lock the entry again: `stack::clients::Authorized`).
/// One allocation per request, shared by reference count.
#[derive(Debug)]
pub struct Exchange {
    body_fault: BodyFault,
    started: Instant,
    /// Nanoseconds from `started` to the upstream's last answer, plus one; 0: none yet.
    answered: AtomicU64,
    /// `stack::clients::Authorized`, raw; 0: unknown.
    authorized: AtomicU32,
    /// The endpoint the upstream picked for the last try ([`NO_ENDPOINT`]:
    /// none yet), and the one the retry stage asks the next try to avoid.
    picked: AtomicUsize,
    avoid: AtomicUsize,
}

/// No endpoint, in [`Exchange`]'s endpoint fields.
const NO_ENDPOINT: usize = usize::MAX;

impl Exchange {
    pub fn new(started: Instant) -> Self {
        Exchange {
            body_fault: BodyFault::default(),
            started,
            answered: AtomicU64::new(0),
            authorized: AtomicU32::new(0),
            picked: AtomicUsize::new(NO_ENDPOINT),
            avoid: AtomicUsize::new(NO_ENDPOINT),
        }
    }

    /// The client's entry held `raw` of the auth guard's record on arrival.
    pub fn saw_authorized(&self, raw: u32) {
        self.authorized.store(raw, Ordering::Relaxed);
    }

    /// What [`Exchange::saw_authorized`] left; 0: unknown.
    pub fn authorized_seen(&self) -> u32 {
        self.authorized.load(Ordering::Relaxed)
    }

    /// The client's fault, if its body failed.
    pub fn body_fault(&self) -> Option<Fault> {
        self.body_fault.get()
    }

    /// The upstream answered (or failed) at `at`. A retry's answer replaces the try's before it.
    pub fn answered_at(&self, at: Instant) {
        self.answered.store(crate::nanos_since(self.started, at).saturating_add(1), Ordering::Relaxed);
    }

    /// The upstream picked endpoint `idx` for this try.
    pub fn picked(&self, idx: usize) {
        self.picked.store(idx, Ordering::Relaxed);
    }

    /// The next try should avoid the endpoint of the last one, when another
    /// is usable (the retry stage).
    pub fn avoid_last_picked(&self) {
        self.avoid.store(self.picked.load(Ordering::Relaxed), Ordering::Relaxed);
    }

    /// The endpoint the upstream picked for the last try, if any.
    #[cfg(test)]
    pub fn last_picked(&self) -> Option<usize> {
        Some(self.picked.load(Ordering::Relaxed)).filter(|&idx| idx != NO_ENDPOINT)
    }

    /// The endpoint this try should avoid, if any.
    pub fn to_avoid(&self) -> Option<usize> {
        Some(self.avoid.load(Ordering::Relaxed)).filter(|&idx| idx != NO_ENDPOINT)
    }

    /// When the upstream last answered; `None` when no try has ended (the
    /// answer came from a stage, or the request never reached the upstream).
    pub fn answered(&self) -> Option<Instant> {
        match self.answered.load(Ordering::Relaxed) {
            0 => None,
            n => Some(self.started + Duration::from_nanos(n - 1)),
        }
    }
}

impl AsRef<BodyFault> for Exchange {
    fn as_ref(&self) -> &BodyFault {
        &self.body_fault
    }
}

/// A new request id: 128 random bits in hex.
pub fn new_request_id() -> http::HeaderValue {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    // Hex by hand: no formatter and no intermediate `String` on every request.
    let mut id = [0u8; 32];
    for (i, byte) in fastrand::u128(..).to_be_bytes().into_iter().enumerate() {
        id[2 * i] = HEX[usize::from(byte >> 4)];
        id[2 * i + 1] = HEX[usize::from(byte & 0xf)];
    }
    http::HeaderValue::from_bytes(&id).unwrap_or(http::HeaderValue::from_static("0"))
}

/// The client's address for a request from `peer`, NGINX's `real_ip` with
/// `real_ip_recursive on`: the peer, unless it is a trusted proxy; then the
/// `X-Forwarded-For` chain (every header line, comma-separated, read right to
/// left) up to the first address that is not a trusted proxy. If every
/// address is trusted, the left-most one. A malformed entry (not an IP, or
/// `ip:port`, or a header that is not text) stops the walk at the address to
/// its right, the last one a trusted proxy vouched for: levee never believes
/// what it cannot read. Empty entries are skipped. IPv4-mapped IPv6 addresses
/// are returned as IPv4, so both spellings share one bucket.
pub fn client_ip(peer: IpAddr, headers: &HeaderMap, trusted: &TrustedProxies) -> IpAddr {
    let mut client = peer.to_canonical();
    if trusted.is_empty() || !trusted.contains(client) {
        return client;
    }
    for line in headers.get_all(X_FORWARDED_FOR).iter().rev() {
        let Ok(line) = line.to_str() else { return client };
        for entry in line.rsplit(',').map(str::trim).filter(|e| !e.is_empty()) {
            let Some(hop) = parse_hop(entry) else { return client };
            client = hop;
            if !trusted.contains(hop) {
                return hop;
            }
        }
    }
    client
}

/// One `X-Forwarded-For` entry: an IP address; also `ip:port` and `[ipv6]:port`
/// as some load balancers write them (Azure Application Gateway).
fn parse_hop(entry: &str) -> Option<IpAddr> {
    let ip = entry.parse::<IpAddr>().ok().or_else(|| entry.parse::<SocketAddr>().ok().map(|s| s.ip()))?;
    Some(ip.to_canonical())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_exchange_keeps_the_upstreams_last_answer_time() {
        let started = Instant::now();
        let exchange = Exchange::new(started);
        assert_eq!(exchange.answered(), None, "no try has ended");
        exchange.answered_at(started);
        assert_eq!(exchange.answered(), Some(started), "an answer at the start is an answer");
        let retried = started + Duration::from_millis(1500) + Duration::from_nanos(7);
        exchange.answered_at(retried);
        assert_eq!(
            exchange.answered(),
            Some(retried),
            "the retry's answer replaces the try's, to the nanosecond"
        );
        assert_eq!(exchange.body_fault(), None);
    }

    #[test]
    fn request_ids_are_32_lower_case_hex_digits_and_differ() {
        let (a, b) = (new_request_id(), new_request_id());
        for id in [&a, &b] {
            assert_eq!(id.len(), 32);
            assert!(id.as_bytes().iter().all(|c| c.is_ascii_digit() || (b'a'..=b'f').contains(c)), "{id:?}");
        }
        assert_ne!(a, b);
    }

    /// Both users of it (`X-Forwarded-For`, address keys) depend on it.
    #[test]
    fn ip_text_writes_addresses_as_display_does() {
        let mut addresses: Vec<IpAddr> =
            ["0.0.0.0", "255.255.255.255", "10.0.100.9", "127.0.0.1", "::1", "2001:db8::8a2e:370:7334"]
                .iter()
                .map(|a| a.parse().unwrap())
                .collect();
        for n in (0..u32::MAX).step_by(16_777_259) {
            addresses.push(std::net::Ipv4Addr::from(n).into());
        }
        let mut buf = [0u8; IP_TEXT_BYTES];
        for ip in addresses {
            assert_eq!(ip_text(ip, &mut buf), ip.to_string());
        }
    }
    use crate::config::Cidr;

    fn trusted(blocks: &[&str]) -> TrustedProxies {
        TrustedProxies::new(blocks.iter().map(|b| Cidr::parse(b).unwrap()).collect())
    }

    fn xff(lines: &[&str]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for l in lines {
            h.append(X_FORWARDED_FOR, http::HeaderValue::from_str(l).unwrap());
        }
        h
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn an_untrusted_peer_is_the_client_whatever_it_claims() {
        let t = trusted(&["10.0.0.0/8"]);
        assert_eq!(client_ip(ip("203.0.113.7"), &xff(&["1.2.3.4"]), &t), ip("203.0.113.7"));
        assert_eq!(client_ip(ip("10.0.0.1"), &xff(&["1.2.3.4"]), &TrustedProxies::default()), ip("10.0.0.1"));
        assert_eq!(client_ip(ip("::ffff:203.0.113.7"), &xff(&[]), &t), ip("203.0.113.7"));
    }

    #[test]
    fn the_right_most_untrusted_address_of_the_chain_is_the_client() {
        let t = trusted(&["10.0.0.0/8", "127.0.0.0/8"]);
        let peer = ip("10.0.0.1");
        // The client forged `6.6.6.6`; the proxy appended what it saw.
        assert_eq!(client_ip(peer, &xff(&["6.6.6.6, 203.0.113.7, 127.0.0.5"]), &t), ip("203.0.113.7"));
        // Several header lines are one chain, in order.
        assert_eq!(client_ip(peer, &xff(&["6.6.6.6, 203.0.113.7", "10.9.9.9"]), &t), ip("203.0.113.7"));
        assert_eq!(client_ip(peer, &xff(&["198.51.100.9", "10.9.9.9, 127.0.0.2"]), &t), ip("198.51.100.9"));
        // Only trusted hops: the left-most; no header: the peer.
        assert_eq!(client_ip(peer, &xff(&["10.1.1.1, 10.2.2.2"]), &t), ip("10.1.1.1"));
        assert_eq!(client_ip(peer, &xff(&[]), &t), peer);
        // Ports and IPv6 as load balancers write them; empty entries skipped.
        assert_eq!(client_ip(peer, &xff(&["203.0.113.7:5555"]), &t), ip("203.0.113.7"));
        assert_eq!(client_ip(peer, &xff(&["[2001:db8::7]:443"]), &t), ip("2001:db8::7"));
        assert_eq!(client_ip(peer, &xff(&["2001:db8::7, , 10.0.0.2,"]), &t), ip("2001:db8::7"));
        assert_eq!(client_ip(peer, &xff(&["::ffff:203.0.113.7"]), &t), ip("203.0.113.7"));
    }

    #[test]
    fn a_malformed_entry_stops_the_walk_at_the_last_trusted_hop() {
        let t = trusted(&["10.0.0.0/8"]);
        let peer = ip("10.0.0.1");
        assert_eq!(client_ip(peer, &xff(&["203.0.113.7, unknown, 10.0.0.9"]), &t), ip("10.0.0.9"));
        assert_eq!(client_ip(peer, &xff(&["203.0.113.7, garbage"]), &t), peer);
        // A malformed entry left of the client is never reached.
        assert_eq!(client_ip(peer, &xff(&["garbage, 203.0.113.7"]), &t), ip("203.0.113.7"));
        let mut opaque = HeaderMap::new();
        opaque.append(X_FORWARDED_FOR, http::HeaderValue::from_bytes(b"203.0.113.7\xff").unwrap());
        assert_eq!(client_ip(peer, &opaque, &t), peer);
    }
}
