//! A lean HTTP/1.1 client for the hot path: a plain-HTTP endpoint and a
//! request whose body is already in memory (none, or read whole by the proxy
//! under `server.buffer_body_bytes`). The request's own task writes the head
//! and body, reads the response head with httparse and hands the body out as
//! it arrives: no connection task, no channel to it, no oneshot back, no
//! body channel. Pingora and nginx drive their upstream connections the same
//! way.
//!
//! Why not hyper's client: its connection lives in a task of its own, which
//! the request wakes through a channel and which wakes the request back
//! through another; callgrind put that hop at ~13k of a proxied request's
//! ~40k instructions (the task polled three times per request, its
//! dispatcher, the `want` handshake, the body channel), where nginx's whole
//! request costs ~29k. Driving hyper's `Connection` from the request's own
//! future was tried and was worse (README, "Tried and dropped"): the
//! dispatcher's cost is per poll, not per task.
//!
//! What this client does not do stays on hyper's (`pool.rs`, `forward.rs`):
//! streaming request bodies, upgrades, TLS and HTTP/2.
//!
//! Framing follows RFC 9112 §6.3: no body for `HEAD`, 1xx, 204 and 304;
//! `Transfer-Encoding` before `Content-Length` (both present: the connection
//! is not reused); differing `Content-Length` values are refused; otherwise
//! the body runs to the close. 1xx interim responses are skipped; 101 to a
//! request that asked for no upgrade is a broken response.
//!
//! Bounds: a response head of at most [`MAX_HEAD_BYTES`] and
//! [`MAX_HEADERS`] fields, a chunk-size line of at most [`MAX_LINE_BYTES`],
//! trailers (read and dropped, as nginx's proxy drops them) of at most
//! [`MAX_TRAILER_BYTES`]; reads of at most [`MAX_READ`] bytes.

use std::io;
use std::mem::MaybeUninit;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use bytes::{Buf, Bytes, BytesMut};
use http::header::{HeaderMap, HeaderName, HeaderValue, CONNECTION, CONTENT_LENGTH, TRANSFER_ENCODING};
use http::{Method, StatusCode, Version};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

/// The largest response head accepted (hyper's client allowed about 400 KiB;
/// nginx's `proxy_buffer_size` is 4 or 8 KiB).
pub const MAX_HEAD_BYTES: usize = 64 * 1024;
/// The most header fields in a response head (hyper's client: 100).
pub const MAX_HEADERS: usize = 100;
/// The longest chunk-size line, extensions included.
pub const MAX_LINE_BYTES: usize = 4 * 1024;
/// The most trailer bytes of a chunked body.
pub const MAX_TRAILER_BYTES: usize = 16 * 1024;
/// The first read of a connection asks for this much; a read that fills its
/// room doubles the next one, up to [`MAX_READ`] (hyper's adaptive reads).
const FIRST_READ: usize = 8 * 1024;
const MAX_READ: usize = 256 * 1024;
/// A body up to this size is copied behind the head and sent in one write;
/// a larger one is written on its own rather than copied.
const COALESCE_BODY: usize = 16 * 1024;

/// The most fields levee adds to a response on its way to the client.
const ADDED_BY_LEVEE: usize = 3;

/// Why an exchange failed.
#[derive(Debug, thiserror::Error)]
pub enum H1Error {
    #[error("upstream i/o: {0}")]
    Io(#[from] io::Error),
    #[error("the upstream closed the connection before a complete response head")]
    ClosedBeforeHead,
    #[error("invalid response head: {0}")]
    Parse(httparse::Error),
    #[error("invalid response: {0}")]
    Invalid(&'static str),
    #[error("response head larger than {MAX_HEAD_BYTES} bytes")]
    HeadTooLarge,
}

/// One keep-alive connection to an endpoint and what has been read from it
/// but not consumed.
pub struct Conn {
    stream: TcpStream,
    buf: BytesMut,
    read_size: usize,
}

impl Conn {
    pub fn new(stream: TcpStream) -> Conn {
        Conn { stream, buf: BytesMut::new(), read_size: FIRST_READ }
    }

    /// Whether an idle connection can take a request: nothing unread, and
    /// the upstream has not closed it. Asks the runtime's last word on the
    /// socket's readiness, so an idle socket with nothing to read costs no
    /// system call; a close the reactor has not seen yet shows when the
    /// request is sent (see [`crate::upstream::pool`]).
    pub fn is_reusable(&self) -> bool {
        if !self.drained() {
            return false;
        }
        let mut probe = [0u8; 1];
        matches!(self.stream.try_read(&mut probe), Err(e) if e.kind() == io::ErrorKind::WouldBlock)
    }

    /// Whether everything read has been consumed: a response that ended
    /// with bytes after it (an upstream that sent more than it framed) leaves
    /// the connection unusable.
    pub fn drained(&self) -> bool {
        self.buf.is_empty()
    }

    /// Ready to wait in the pool: a read buffer grown for a large body is
    /// let go (and the reads start small again), so an idle connection holds
    /// at most a small one, not the largest body it ever carried.
    pub fn settle(&mut self) {
        if self.buf.capacity() > 4 * FIRST_READ {
            self.buf = BytesMut::new();
            self.read_size = FIRST_READ;
        }
    }

    /// Reads once more into the buffer; `Ok(0)` is the end of the stream.
    /// `left`: how much of a body with a known length is still to come, so
    /// that a large one is read in few large reads from the first (and a
    /// small one allocates no more than it needs); otherwise the reads grow
    /// as they fill.
    fn poll_fill(&mut self, cx: &mut Context<'_>, left: Option<u64>) -> Poll<io::Result<usize>> {
        let want = match left {
            Some(left) => usize::try_from(left).unwrap_or(MAX_READ).clamp(1024, MAX_READ),
            None => self.read_size,
        };
        if self.buf.capacity() - self.buf.len() < want / 2 {
            self.buf.reserve(want);
        }
        let room = self.buf.capacity() - self.buf.len();
        // `AsyncRead`, not `try_read_buf`: a read that leaves room tells
        // tokio the socket is drained, so the next read (or the pool's
        // check) waits for epoll instead of trying `recvfrom` for an
        // `EAGAIN`, one system call per request.
        let n = ready!(tokio_util::io::poll_read_buf(Pin::new(&mut self.stream), cx, &mut self.buf))?;
        if n == room && self.read_size < MAX_READ {
            self.read_size *= 2;
        }
        Poll::Ready(Ok(n))
    }

    async fn fill(&mut self) -> io::Result<usize> {
        std::future::poll_fn(|cx| self.poll_fill(cx, None)).await
    }

    /// Sends a request (`head` from [`write_head`], then `body`) and reads
    /// the response head. `Err` tells whether any of the response arrived:
    /// an exchange that got nothing back on a reused connection may be the
    /// upstream's keep-alive close racing the reuse.
    pub async fn exchange(
        &mut self,
        head: &[u8],
        body: &Bytes,
        method: &Method,
    ) -> Result<Head, (H1Error, bool)> {
        let nothing = |e: io::Error| (H1Error::Io(e), false);
        if body.is_empty() {
            self.stream.write_all(head).await.map_err(nothing)?;
        } else if body.len() <= COALESCE_BODY {
            let mut one = Vec::with_capacity(head.len() + body.len());
            one.extend_from_slice(head);
            one.extend_from_slice(body);
            self.stream.write_all(&one).await.map_err(nothing)?;
        } else {
            self.stream.write_all(head).await.map_err(nothing)?;
            if let Err(e) = self.stream.write_all(body).await {
                // The upstream may have answered on the head (a 413, a 401)
                // and closed with the body unread: its answer came before the
                // reset that failed the write, and is still in the socket to
                // read. The connection is done either way.
                return match self.read_head(method).await {
                    Ok(head) => Ok(Head { reuse: false, ..head }),
                    Err((_, received)) => Err((H1Error::Io(e), received)),
                };
            }
        }
        self.read_head(method).await
    }

    /// Reads the response head (skipping 1xx); `Err` as [`Conn::exchange`]'s.
    async fn read_head(&mut self, method: &Method) -> Result<Head, (H1Error, bool)> {
        let mut received = false;
        loop {
            if !self.buf.is_empty() {
                match parse_head(&mut self.buf, method) {
                    Ok(Some(Parsed::Final(head))) => return Ok(head),
                    Ok(Some(Parsed::Interim)) => continue,
                    Ok(None) => {}
                    Err(e) => return Err((e, true)),
                }
            }
            match self.fill().await {
                Ok(0) if received || !self.buf.is_empty() => return Err((H1Error::ClosedBeforeHead, true)),
                Ok(0) => return Err((H1Error::ClosedBeforeHead, false)),
                Ok(_) => received = true,
                Err(e) => return Err((e.into(), received)),
            }
        }
    }
}

/// Writes the request line and headers of a request for the origin-form
/// `target`, and a `Content-Length` that is the body's: a client's own is
/// never passed on, so the head cannot say one length and the body carry
/// another. An empty body gets `Content-Length: 0` where the method means
/// to carry one (RFC 9110 §8.6) or the client sent one.
pub fn write_head(method: &Method, target: &str, headers: &HeaderMap, body_len: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(64 + target.len() + 32 * headers.len());
    out.extend_from_slice(method.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(target.as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\n");
    let mut had_length = false;
    for (name, value) in headers {
        if name == CONTENT_LENGTH {
            had_length = true;
            continue;
        }
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    if body_len > 0 || had_length || matches!(*method, Method::POST | Method::PUT | Method::PATCH) {
        out.extend_from_slice(b"content-length: ");
        out.extend_from_slice(itoa::Buffer::new().format(body_len).as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"\r\n");
    out
}

/// A response head and how its body is framed.
#[derive(Debug)]
pub struct Head {
    pub status: StatusCode,
    pub version: Version,
    pub headers: HeaderMap,
    pub framing: Framing,
    /// Whether the connection can take another request once the body is read.
    pub reuse: bool,
}

/// How much of a body is left, and how it ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    /// No body, or the body has been read.
    Done,
    /// `Content-Length`: this many bytes left.
    Length(u64),
    Chunked(Chunk),
    /// To the end of the connection (HTTP/1.0 style); never reused.
    Close,
}

enum Parsed {
    Final(Head),
    /// A 1xx interim response, consumed.
    Interim,
}

/// Parses a response head at the start of `buf` and takes it out; `None`
/// when more bytes are needed.
fn parse_head(buf: &mut BytesMut, method: &Method) -> Result<Option<Parsed>, H1Error> {
    let mut slots = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
    let mut rsp = httparse::Response::new(&mut []);
    let len = match httparse::ParserConfig::default().parse_response_with_uninit_headers(
        &mut rsp,
        &buf[..],
        &mut slots,
    ) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) if buf.len() > MAX_HEAD_BYTES => return Err(H1Error::HeadTooLarge),
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => return Err(H1Error::Invalid("more than 100 header fields")),
        Err(e) => return Err(H1Error::Parse(e)),
    };
    if len > MAX_HEAD_BYTES {
        return Err(H1Error::HeadTooLarge);
    }
    let code = rsp.code.unwrap_or(0);
    let status = StatusCode::from_u16(code).map_err(|_| H1Error::Invalid("status code"))?;
    if status == StatusCode::SWITCHING_PROTOCOLS {
        return Err(H1Error::Invalid("101 to a request that asked for no upgrade"));
    }
    if status.is_informational() {
        buf.advance(len);
        return Ok(Some(Parsed::Interim));
    }
    let version = if rsp.version == Some(0) { Version::HTTP_10 } else { Version::HTTP_11 };
    // Names now (borrowing the buffer), values after the head is frozen, as
    // slices of it: no copy per header.
    let base = buf.as_ptr() as usize;
    let mut fields = Vec::with_capacity(rsp.headers.len());
    for h in rsp.headers.iter() {
        let name = HeaderName::from_bytes(h.name.as_bytes()).map_err(|_| H1Error::Invalid("header name"))?;
        // httparse's values are slices of the head; anything else (an empty
        // value may be a slice of nothing) is taken as empty.
        let start = (h.value.as_ptr() as usize).checked_sub(base).filter(|s| s + h.value.len() <= len);
        let range = start.map_or((0, 0), |s| (s, s + h.value.len()));
        fields.push((name, range.0, range.1));
    }
    let head = buf.split_to(len).freeze();
    // Room for the fields levee adds to a response (`x-request-id`, and a
    // limited route's `RateLimit-Policy` and `RateLimit`): a map filled to
    // its capacity grows (every index rehashed) on the first of them.
    let mut headers = HeaderMap::with_capacity(fields.len() + ADDED_BY_LEVEE);
    let (mut length, mut chunked, mut encoded, mut close, mut keep_alive) =
        (None, false, false, false, false);
    for (name, start, end) in fields {
        let value = HeaderValue::from_maybe_shared(head.slice(start..end))
            .map_err(|_| H1Error::Invalid("header value"))?;
        if name == CONTENT_LENGTH {
            let n = parse_length(value.as_bytes()).ok_or(H1Error::Invalid("Content-Length"))?;
            if length.is_some_and(|l| l != n) {
                return Err(H1Error::Invalid("differing Content-Length values"));
            }
            length = Some(n);
        } else if name == TRANSFER_ENCODING {
            encoded = true;
            // The last coding of the last field decides (RFC 9112 §6.3).
            chunked = value
                .to_str()
                .ok()
                .and_then(|v| v.rsplit(',').next())
                .is_some_and(|last| last.trim().eq_ignore_ascii_case("chunked"));
            // The framing is this client's to undo, and hop-by-hop: the
            // client's framing is hyper's server's to choose.
            continue;
        } else if name == CONNECTION {
            let mut names_others = false;
            for token in value.to_str().unwrap_or("").split(',').map(str::trim) {
                let (c, k) = (token.eq_ignore_ascii_case("close"), token.eq_ignore_ascii_case("keep-alive"));
                (close, keep_alive) = (close | c, keep_alive | k);
                names_others |= !c && !k && !token.is_empty();
            }
            // Hop-by-hop, and `forward.rs` would remove it (and what it
            // names) from the map: a field with only `close` or
            // `keep-alive` is not put in (one insert and one removal fewer on
            // nearly every response); one naming other fields is, for the
            // removal to find them.
            if !names_others {
                continue;
            }
        } else if name.as_str() == "keep-alive" {
            continue;
        }
        headers.append(name, value);
    }
    let mut reuse = !close && (version == Version::HTTP_11 || keep_alive);
    let framing = if *method == Method::HEAD
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED
    {
        Framing::Done
    } else if encoded {
        // Both framings given: this one wins, and the connection goes.
        reuse &= length.is_none();
        if chunked {
            Framing::Chunked(Chunk::Size)
        } else {
            Framing::Close
        }
    } else {
        match length {
            Some(0) => Framing::Done,
            Some(n) => Framing::Length(n),
            None => Framing::Close,
        }
    };
    if framing == Framing::Close {
        reuse = false;
    }
    Ok(Some(Parsed::Final(Head { status, version, headers, framing, reuse })))
}

/// A `Content-Length` value: decimal digits only, no sign, no spaces.
fn parse_length(v: &[u8]) -> Option<u64> {
    if v.is_empty() || v.len() > 19 || !v.iter().all(u8::is_ascii_digit) {
        return None;
    }
    v.iter().try_fold(0u64, |n, d| n.checked_mul(10)?.checked_add(u64::from(d - b'0')))
}

/// Where a chunked body's decoder stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Chunk {
    /// Expecting a chunk-size line.
    Size,
    /// Inside a chunk's data: this many bytes left.
    Data(u64),
    /// Expecting the CRLF after a chunk's data.
    DataEnd,
    /// After the last chunk: trailer lines, this many bytes of them so far.
    Trailers(usize),
}

/// What one step of decoding gave.
#[derive(Debug, PartialEq, Eq)]
pub enum Step {
    Data(Bytes),
    /// More bytes needed.
    More,
    /// The body's end (trailers read and dropped).
    End,
}

/// Decodes from the front of `buf`, consuming what it used.
pub fn decode_chunked(state: &mut Chunk, buf: &mut BytesMut) -> Result<Step, H1Error> {
    loop {
        match *state {
            Chunk::Size => {
                let Some(end) = find_crlf(buf) else {
                    return if buf.len() > MAX_LINE_BYTES {
                        Err(H1Error::Invalid("chunk-size line too long"))
                    } else {
                        Ok(Step::More)
                    };
                };
                if end > MAX_LINE_BYTES {
                    return Err(H1Error::Invalid("chunk-size line too long"));
                }
                let line = &buf[..end];
                let digits = line.iter().position(|b| !b.is_ascii_hexdigit()).unwrap_or(line.len());
                // After the digits: nothing, or optional whitespace and `;` extensions.
                let rest = &line[digits..];
                let rest_ok = rest.iter().find(|b| **b != b' ' && **b != b'\t').is_none_or(|b| *b == b';');
                if digits == 0 || digits > 15 || !rest_ok {
                    return Err(H1Error::Invalid("chunk size"));
                }
                let size = line[..digits]
                    .iter()
                    .fold(0u64, |n, d| n << 4 | u64::from(char::from(*d).to_digit(16).unwrap_or(0)));
                buf.advance(end + 2);
                *state = if size == 0 { Chunk::Trailers(0) } else { Chunk::Data(size) };
            }
            Chunk::Data(left) => {
                if buf.is_empty() {
                    return Ok(Step::More);
                }
                let take = usize::try_from(left).unwrap_or(usize::MAX).min(buf.len());
                let data = buf.split_to(take).freeze();
                let left = left - take as u64;
                *state = if left == 0 { Chunk::DataEnd } else { Chunk::Data(left) };
                return Ok(Step::Data(data));
            }
            Chunk::DataEnd => {
                if buf.len() < 2 {
                    return Ok(Step::More);
                }
                if &buf[..2] != b"\r\n" {
                    return Err(H1Error::Invalid("chunk data longer than its size"));
                }
                buf.advance(2);
                *state = Chunk::Size;
            }
            Chunk::Trailers(seen) => {
                let Some(end) = find_crlf(buf) else {
                    return if seen + buf.len() > MAX_TRAILER_BYTES {
                        Err(H1Error::Invalid("trailers too large"))
                    } else {
                        Ok(Step::More)
                    };
                };
                buf.advance(end + 2);
                if end == 0 {
                    return Ok(Step::End);
                }
                let seen = seen + end + 2;
                if seen > MAX_TRAILER_BYTES {
                    return Err(H1Error::Invalid("trailers too large"));
                }
                *state = Chunk::Trailers(seen);
            }
        }
    }
}

fn find_crlf(buf: &[u8]) -> Option<usize> {
    buf.windows(2).position(|w| w == b"\r\n")
}

/// The next piece of a body framed by `framing`, read from `conn`; `None`
/// at its end (`framing` is then [`Framing::Done`]).
pub fn poll_body(
    conn: &mut Conn,
    framing: &mut Framing,
    cx: &mut Context<'_>,
) -> Poll<Result<Option<Bytes>, H1Error>> {
    loop {
        match framing {
            Framing::Done => return Poll::Ready(Ok(None)),
            Framing::Length(left) => {
                if !conn.buf.is_empty() {
                    let take = usize::try_from(*left).unwrap_or(usize::MAX).min(conn.buf.len());
                    let data = conn.buf.split_to(take).freeze();
                    *left -= take as u64;
                    if *left == 0 {
                        *framing = Framing::Done;
                    }
                    return Poll::Ready(Ok(Some(data)));
                }
            }
            Framing::Chunked(state) => match decode_chunked(state, &mut conn.buf)? {
                Step::Data(data) => return Poll::Ready(Ok(Some(data))),
                Step::End => {
                    *framing = Framing::Done;
                    return Poll::Ready(Ok(None));
                }
                Step::More => {}
            },
            Framing::Close => {
                if !conn.buf.is_empty() {
                    return Poll::Ready(Ok(Some(conn.buf.split().freeze())));
                }
            }
        }
        let left = match framing {
            Framing::Length(left) => Some(*left),
            _ => None,
        };
        match ready!(conn.poll_fill(cx, left)) {
            Ok(0) if *framing == Framing::Close => {
                *framing = Framing::Done;
                return Poll::Ready(Ok(None));
            }
            Ok(0) => {
                return Poll::Ready(Err(H1Error::Invalid("the upstream closed the connection mid-body")))
            }
            Ok(_) => {}
            Err(e) => return Poll::Ready(Err(e.into())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(bytes: &[u8], method: Method) -> Result<Option<Head>, H1Error> {
        let mut buf = BytesMut::from(bytes);
        loop {
            match parse_head(&mut buf, &method)? {
                Some(Parsed::Final(head)) => return Ok(Some(head)),
                Some(Parsed::Interim) => continue,
                None => return Ok(None),
            }
        }
    }

    #[test]
    fn the_request_head_carries_the_bodys_length_and_never_the_clients() {
        let mut h = HeaderMap::new();
        h.insert("host", HeaderValue::from_static("up"));
        h.insert(CONTENT_LENGTH, HeaderValue::from_static("999"));
        h.append("x-a", HeaderValue::from_static("1"));
        h.append("x-a", HeaderValue::from_static("2"));
        let head = write_head(&Method::POST, "/p?q=1", &h, 3);
        assert_eq!(
            String::from_utf8(head).unwrap(),
            "POST /p?q=1 HTTP/1.1\r\nhost: up\r\nx-a: 1\r\nx-a: 2\r\ncontent-length: 3\r\n\r\n"
        );
        let get = write_head(&Method::GET, "/", &HeaderMap::new(), 0);
        assert_eq!(get, b"GET / HTTP/1.1\r\n\r\n", "no body, no length");
        let put = write_head(&Method::PUT, "/", &HeaderMap::new(), 0);
        assert!(put.ends_with(b"content-length: 0\r\n\r\n"), "a PUT says it has none");
    }

    #[test]
    fn framing_follows_rfc_9112() {
        let head = |raw: &str, method| parse(raw.as_bytes(), method).unwrap().unwrap();
        let h = head("HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nhello", Method::GET);
        assert_eq!((h.framing, h.reuse), (Framing::Length(5), true));
        let h = head("HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\n", Method::HEAD);
        assert_eq!(h.framing, Framing::Done, "HEAD: no body, whatever the length says");
        assert_eq!(h.headers[CONTENT_LENGTH], "5", "the length is relayed");
        let h = head("HTTP/1.1 304 Not Modified\r\ncontent-length: 5\r\n\r\n", Method::GET);
        assert_eq!(h.framing, Framing::Done);
        let h = head("HTTP/1.1 200 OK\r\ntransfer-encoding: gzip, chunked\r\n\r\n", Method::GET);
        assert_eq!((h.framing, h.reuse), (Framing::Chunked(Chunk::Size), true));
        let h =
            head("HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\ncontent-length: 3\r\n\r\n", Method::GET);
        assert_eq!((h.framing, h.reuse), (Framing::Chunked(Chunk::Size), false), "both: chunked, then close");
        let h = head("HTTP/1.1 200 OK\r\ntransfer-encoding: gzip\r\n\r\n", Method::GET);
        assert_eq!((h.framing, h.reuse), (Framing::Close, false), "not chunked last: to the close");
        let h = head("HTTP/1.1 200 OK\r\n\r\n", Method::GET);
        assert_eq!((h.framing, h.reuse), (Framing::Close, false), "no length: to the close");
        let h = head("HTTP/1.1 200 OK\r\nConnection: Close\r\ncontent-length: 0\r\n\r\n", Method::GET);
        assert_eq!((h.framing, h.reuse), (Framing::Done, false));
        assert!(h.headers.get(CONNECTION).is_none(), "hop-by-hop, and nothing for forward.rs to remove");
        let h = head("HTTP/1.1 200 OK\r\nconnection: keep-alive, x-hop\r\nkeep-alive: timeout=5\r\nx-hop: 1\r\ncontent-length: 0\r\n\r\n", Method::GET);
        assert_eq!(h.headers[CONNECTION], "keep-alive, x-hop", "kept: forward.rs removes what it names");
        assert!(h.headers.get("keep-alive").is_none());
        let h = head("HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n", Method::GET);
        assert!(h.headers.get(TRANSFER_ENCODING).is_none(), "the framing is undone here");
        let h = head("HTTP/1.0 200 OK\r\ncontent-length: 1\r\n\r\n", Method::GET);
        assert_eq!((h.version, h.reuse), (Version::HTTP_10, false), "HTTP/1.0 closes by default");
        let h = head("HTTP/1.0 200 OK\r\nconnection: keep-alive\r\ncontent-length: 1\r\n\r\n", Method::GET);
        assert!(h.reuse);
        let h = head(
            "HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 201 Created\r\ncontent-length: 0\r\n\r\n",
            Method::PUT,
        );
        assert_eq!(h.status, StatusCode::CREATED, "interim responses are skipped");
    }

    #[test]
    fn header_values_are_kept_as_sent_empty_ones_included() {
        let raw = b"HTTP/1.1 200 OK\r\nx-empty:\r\nx-blank: \r\nX-Case: Some Value\r\nx-a: 1\r\nx-a: 2\r\ncontent-length: 0\r\n\r\n";
        let h = parse(raw, Method::GET).unwrap().unwrap();
        assert_eq!(h.headers["x-empty"], "");
        assert_eq!(h.headers["x-blank"], "");
        assert_eq!(h.headers["x-case"], "Some Value", "names lowercased, values as sent");
        let all: Vec<_> = h.headers.get_all("x-a").iter().collect();
        assert_eq!(all, ["1", "2"], "repeated fields kept in order");
    }

    #[test]
    fn broken_heads_are_refused_with_a_reason() {
        let err = |raw: &str| parse(raw.as_bytes(), Method::GET).unwrap_err().to_string();
        assert!(
            err("HTTP/1.1 200 OK\r\ncontent-length: 1\r\ncontent-length: 2\r\n\r\n").contains("differing")
        );
        assert!(err("HTTP/1.1 200 OK\r\ncontent-length: -1\r\n\r\n").contains("Content-Length"));
        assert!(err("HTTP/1.1 200 OK\r\ncontent-length: 1 2\r\n\r\n").contains("Content-Length"));
        assert!(err("HTTP/1.1 101 Switching Protocols\r\n\r\n").contains("101"));
        assert!(err("HTTX/1.1 200 OK\r\n\r\n").contains("invalid response head"));
        let many: String = (0..101).map(|i| format!("x-{i}: 1\r\n")).collect();
        assert!(err(&format!("HTTP/1.1 200 OK\r\n{many}\r\n")).contains("100 header fields"));
        let huge = format!("HTTP/1.1 200 OK\r\nx: {}", "a".repeat(MAX_HEAD_BYTES + 1));
        assert!(err(&huge).contains("larger than"));
        assert!(parse(b"HTTP/1.1 200 OK\r\nx: 1\r\n", Method::GET).unwrap().is_none(), "partial: more");
    }

    /// A chunked body decodes the same whatever the reads split it into.
    #[test]
    fn chunked_bodies_decode_across_any_split() {
        let wire = b"5;ext=1\r\nhello\r\n1\r\n \r\nA\r\n0123456789\r\n0\r\ntrailer: x\r\n\r\n";
        for cut in 0..wire.len() {
            let mut buf = BytesMut::new();
            let mut state = Chunk::Size;
            let mut out = Vec::new();
            let mut ended = false;
            for piece in [&wire[..cut], &wire[cut..]] {
                buf.extend_from_slice(piece);
                loop {
                    match decode_chunked(&mut state, &mut buf).unwrap() {
                        Step::Data(d) => out.extend_from_slice(&d),
                        Step::More => break,
                        Step::End => {
                            ended = true;
                            break;
                        }
                    }
                }
            }
            assert!(ended, "cut at {cut}");
            assert_eq!(out, b"hello 0123456789", "cut at {cut}");
            assert!(buf.is_empty(), "cut at {cut}");
        }
    }

    #[test]
    fn broken_chunked_bodies_are_refused() {
        for wire in [&b"x\r\n"[..], b"5\r\nhello!!\r\n", b"5 x\r\n", b"1234567890123456\r\n"] {
            let mut buf = BytesMut::from(wire);
            let mut state = Chunk::Size;
            let mut result = Ok(Step::More);
            for _ in 0..4 {
                result = decode_chunked(&mut state, &mut buf);
                if !matches!(result, Ok(Step::Data(_))) {
                    break;
                }
            }
            assert!(result.is_err(), "{:?}", String::from_utf8_lossy(wire));
        }
        let mut long = BytesMut::from(&vec![b'1'; MAX_LINE_BYTES + 1][..]);
        assert!(decode_chunked(&mut Chunk::Size, &mut long).is_err(), "a size line without end is bounded");
        let mut trailers = BytesMut::from(&b"0\r\n"[..]);
        trailers.extend_from_slice(&vec![b'x'; MAX_TRAILER_BYTES + 1]);
        assert!(decode_chunked(&mut Chunk::Size, &mut trailers).is_err(), "trailers are bounded");
    }

    proptest::proptest! {
        /// Whatever an upstream sends after a status line, the head parser
        /// answers (a head, more, or an error) without panicking, and what it
        /// takes out of the buffer is never more than was there.
        #[test]
        fn any_head_an_upstream_sends_is_answered_without_a_panic(
            fields in "([ -~]{0,40}(\r\n|\n|\r)?){0,12}",
            status in 0u16..1000,
            head_method in proptest::bool::ANY,
        ) {
            let raw = format!("HTTP/1.1 {status} X\r\n{fields}\r\n\r\nbody");
            let mut buf = BytesMut::from(raw.as_bytes());
            let method = if head_method { Method::HEAD } else { Method::GET };
            let before = buf.len();
            if let Ok(Some(_)) = parse_head(&mut buf, &method) {
                proptest::prop_assert!(buf.len() < before);
            }
        }

        /// Any chunked body, cut into any two reads, with extensions and
        /// trailers, decodes to its data; arbitrary bytes in its place end in
        /// an error or a wait, never a panic.
        #[test]
        fn chunked_bodies_round_trip_and_garbage_never_panics(
            chunks in proptest::collection::vec(proptest::collection::vec(proptest::num::u8::ANY, 1..300), 0..6),
            ext in proptest::bool::ANY,
            trailer in proptest::bool::ANY,
            cut in 0usize..4000,
            garbage in proptest::collection::vec(proptest::num::u8::ANY, 0..200),
        ) {
            let mut wire = Vec::new();
            for c in &chunks {
                wire.extend_from_slice(format!("{:X}{}\r\n", c.len(), if ext { ";a=b" } else { "" }).as_bytes());
                wire.extend_from_slice(c);
                wire.extend_from_slice(b"\r\n");
            }
            wire.extend_from_slice(b"0\r\n");
            if trailer {
                wire.extend_from_slice(b"x-t: 1\r\n");
            }
            wire.extend_from_slice(b"\r\n");
            let cut = cut.min(wire.len());
            let (mut buf, mut state, mut out, mut ended) = (BytesMut::new(), Chunk::Size, Vec::new(), false);
            for piece in [&wire[..cut], &wire[cut..]] {
                buf.extend_from_slice(piece);
                loop {
                    match decode_chunked(&mut state, &mut buf) {
                        Ok(Step::Data(d)) => out.extend_from_slice(&d),
                        Ok(Step::More) => break,
                        Ok(Step::End) => {
                            ended = true;
                            break;
                        }
                        Err(e) => proptest::prop_assert!(false, "{e}"),
                    }
                }
            }
            proptest::prop_assert!(ended);
            proptest::prop_assert_eq!(out, chunks.concat());

            let (mut buf, mut state) = (BytesMut::from(&garbage[..]), Chunk::Size);
            for _ in 0..garbage.len() + 2 {
                match decode_chunked(&mut state, &mut buf) {
                    Ok(Step::Data(_)) => {}
                    _ => break,
                }
            }
        }
    }
}
