//! The PROXY protocol, v1 (text) and v2 (binary), as HAProxy specifies it
//! (<https://www.haproxy.org/download/2.9/doc/proxy-protocol.txt>): a load
//! balancer that forwards TCP writes one header before the client's first
//! byte, naming the client's address. With `server.proxy_protocol = true`
//! every connection on the proxy listeners must start with one, read before
//! TLS and before protocol detection, under `header_read_timeout` from accept.
//!
//! The parser is strict and never guesses: a connection whose first bytes are
//! not a valid header is closed, because on a listener that expects one, a
//! connection without it did not come through the load balancer (or the load
//! balancer is misconfigured), and serving it would put every such client in
//! the load balancer's bucket. Accepted:
//!
//! - v1 `TCP4` and `TCP6` with their four fields, single spaces, no leading
//!   zeros in ports, the line at most 107 bytes with its CRLF; `UNKNOWN`
//!   (anything up to the CRLF): the socket's address is kept;
//! - v2 `PROXY` over TCP/IPv4 and TCP/IPv6 (TLVs skipped); `LOCAL`, or the
//!   `UNSPEC` family: the socket's address is kept. UDP and UNIX families are
//!   refused: levee's listeners are TCP, and a path is no client address.
//!
//! A v2 header is bounded to [`MAX_V2_LEN`] bytes, TLVs included, so a peer
//! cannot make levee buffer more than that before the first request.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt};

/// The v2 signature: the first 12 bytes of every v2 header.
const V2_SIGNATURE: &[u8; 12] = b"\r\n\r\n\0\r\nQUIT\n";

/// The longest v1 line, CRLF included (the spec's own bound).
pub const MAX_V1_LEN: usize = 107;

/// The longest v2 header levee accepts, the 16-byte fixed part included. The
/// address block is at most 216 bytes (UNIX); the rest is room for the TLVs
/// cloud load balancers add (AWS's VPC endpoint id, Azure's link id, HAProxy's
/// SSL fields), which are a few dozen bytes each.
pub const MAX_V2_LEN: usize = 1024;

/// What a complete header says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// Its length in bytes: what follows belongs to the client.
    pub len: usize,
    /// The client's address; `None` for v1 `UNKNOWN`, v2 `LOCAL` and the v2
    /// `UNSPEC` family, where the socket's own address stands.
    pub source: Option<SocketAddr>,
}

/// The outcome of looking at the bytes read so far.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Parsed {
    Complete(Header),
    /// A valid beginning, shorter than a whole header: read more.
    Incomplete,
}

/// Why the first bytes of a connection are not a PROXY header.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum HeaderError {
    #[error("not a PROXY protocol header")]
    NotProxy,
    #[error("PROXY v1 line longer than {MAX_V1_LEN} bytes")]
    V1TooLong,
    #[error("malformed PROXY v1 line")]
    V1Malformed,
    #[error("PROXY v2 header longer than {MAX_V2_LEN} bytes")]
    V2TooLong,
    #[error("unsupported PROXY v2 version or command")]
    V2Command,
    #[error("unsupported PROXY v2 address family or transport")]
    V2Family,
    #[error("PROXY v2 address block shorter than its family needs")]
    V2Short,
}

/// Parses the header at the start of `buf`. `Incomplete` only while `buf` is
/// a valid beginning shorter than the bound of its version, so a caller that
/// reads until `Complete` or an error buffers a bounded number of bytes.
pub fn parse(buf: &[u8]) -> Result<Parsed, HeaderError> {
    match buf.first() {
        None => Ok(Parsed::Incomplete),
        Some(b'P') => parse_v1(buf),
        Some(b'\r') => parse_v2(buf),
        Some(_) => Err(HeaderError::NotProxy),
    }
}

fn parse_v1(buf: &[u8]) -> Result<Parsed, HeaderError> {
    const PREFIX: &[u8] = b"PROXY ";
    let n = buf.len().min(PREFIX.len());
    if buf[..n] != PREFIX[..n] {
        return Err(HeaderError::NotProxy);
    }
    let window = &buf[..buf.len().min(MAX_V1_LEN)];
    let Some(cr) = window.iter().position(|&b| b == b'\r' || b == b'\n') else {
        return if buf.len() >= MAX_V1_LEN { Err(HeaderError::V1TooLong) } else { Ok(Parsed::Incomplete) };
    };
    match window.get(cr..cr + 2) {
        Some(b"\r\n") => {}
        Some(_) => return Err(HeaderError::V1Malformed),
        // A lone CR as the last byte read: the LF may follow, within the bound.
        None if window[cr] == b'\n' => return Err(HeaderError::V1Malformed),
        None if buf.len() < MAX_V1_LEN => return Ok(Parsed::Incomplete),
        None => return Err(HeaderError::V1TooLong),
    }
    let line = std::str::from_utf8(&buf[PREFIX.len().min(cr)..cr]).map_err(|_| HeaderError::V1Malformed)?;
    let len = cr + 2;
    if line == "UNKNOWN" || line.starts_with("UNKNOWN ") {
        return Ok(Parsed::Complete(Header { len, source: None }));
    }
    let mut fields = line.split(' ');
    let (Some(proto), Some(src), Some(dst), Some(sport), Some(dport), None) =
        (fields.next(), fields.next(), fields.next(), fields.next(), fields.next(), fields.next())
    else {
        return Err(HeaderError::V1Malformed);
    };
    let ip = match proto {
        "TCP4" => IpAddr::V4(src.parse::<Ipv4Addr>().map_err(|_| HeaderError::V1Malformed)?),
        "TCP6" => IpAddr::V6(src.parse::<Ipv6Addr>().map_err(|_| HeaderError::V1Malformed)?),
        _ => return Err(HeaderError::V1Malformed),
    };
    // The destination must be of the same family, though levee has no use for it.
    let dst_ok = match proto {
        "TCP4" => dst.parse::<Ipv4Addr>().is_ok(),
        _ => dst.parse::<Ipv6Addr>().is_ok(),
    };
    let (Some(sport), Some(_)) = (v1_port(sport), v1_port(dport)) else {
        return Err(HeaderError::V1Malformed);
    };
    if !dst_ok {
        return Err(HeaderError::V1Malformed);
    }
    Ok(Parsed::Complete(Header { len, source: Some(SocketAddr::new(ip, sport)) }))
}

/// A v1 port: 1 to 5 decimal digits, no sign, no leading zero, at most 65535.
fn v1_port(s: &str) -> Option<u16> {
    let digits = !s.is_empty() && s.len() <= 5 && s.bytes().all(|b| b.is_ascii_digit());
    if !digits || (s.len() > 1 && s.starts_with('0')) {
        return None;
    }
    s.parse().ok()
}

fn parse_v2(buf: &[u8]) -> Result<Parsed, HeaderError> {
    let n = buf.len().min(V2_SIGNATURE.len());
    if buf[..n] != V2_SIGNATURE[..n] {
        return Err(HeaderError::NotProxy);
    }
    if buf.len() < 16 {
        return Ok(Parsed::Incomplete);
    }
    let ver_cmd = buf[12];
    let family = buf[13];
    let block = usize::from(u16::from_be_bytes([buf[14], buf[15]]));
    let len = 16 + block;
    if len > MAX_V2_LEN {
        return Err(HeaderError::V2TooLong);
    }
    let local = match ver_cmd {
        0x20 => true,
        0x21 => false,
        _ => return Err(HeaderError::V2Command),
    };
    // The family is checked before the block arrives: a refused one fails fast.
    let need = match family {
        0x00 => 0,
        0x11 => 12,
        0x21 => 36,
        // LOCAL ignores the family (the spec: "the receiver must ignore" it).
        _ if local => 0,
        _ => return Err(HeaderError::V2Family),
    };
    if block < need {
        return Err(HeaderError::V2Short);
    }
    if buf.len() < len {
        return Ok(Parsed::Incomplete);
    }
    let a = &buf[16..len];
    let source = match family {
        _ if local => None,
        0x11 => {
            let ip = Ipv4Addr::new(a[0], a[1], a[2], a[3]);
            Some(SocketAddr::new(IpAddr::V4(ip), u16::from_be_bytes([a[8], a[9]])))
        }
        0x21 => {
            let mut octets = [0u8; 16];
            octets.copy_from_slice(&a[..16]);
            Some(SocketAddr::new(IpAddr::V6(Ipv6Addr::from(octets)), u16::from_be_bytes([a[32], a[33]])))
        }
        _ => None,
    };
    Ok(Parsed::Complete(Header { len, source }))
}

/// Why reading the header failed.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error("the peer closed the connection before a complete PROXY header")]
    Closed,
    #[error(transparent)]
    Invalid(#[from] HeaderError),
}

/// Reads the header at the start of `io` (the caller bounds the time). Returns
/// what it says and the bytes read past it, which belong to the client (a TLS
/// ClientHello, an HTTP request) and must be replayed before `io`.
pub async fn read<I: AsyncRead + Unpin>(io: &mut I) -> Result<(Header, Bytes), ReadError> {
    let mut buf = BytesMut::with_capacity(MAX_V2_LEN);
    loop {
        match io.read_buf(&mut buf).await {
            Ok(0) | Err(_) => return Err(ReadError::Closed),
            Ok(_) => {}
        }
        if let Parsed::Complete(header) = parse(&buf)? {
            let rest = buf.split_off(header.len);
            return Ok((header, rest.freeze()));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn complete(buf: &[u8]) -> Header {
        match parse(buf) {
            Ok(Parsed::Complete(h)) => h,
            other => panic!("{other:?} for {buf:?}"),
        }
    }

    fn v2(ver_cmd: u8, family: u8, block: &[u8]) -> Vec<u8> {
        let mut h = V2_SIGNATURE.to_vec();
        h.extend([ver_cmd, family]);
        h.extend(u16::try_from(block.len()).unwrap().to_be_bytes());
        h.extend(block);
        h
    }

    fn v4_block(src: [u8; 4], sport: u16) -> Vec<u8> {
        let mut b = src.to_vec();
        b.extend([10, 0, 0, 1]);
        b.extend(sport.to_be_bytes());
        b.extend(443u16.to_be_bytes());
        b
    }

    #[test]
    fn v1_tcp4_and_tcp6_give_the_source_and_the_length() {
        let line = b"PROXY TCP4 203.0.113.7 10.0.0.1 51234 443\r\nGET / HTTP/1.1\r\n";
        let h = complete(line);
        assert_eq!(h.source, Some("203.0.113.7:51234".parse().unwrap()));
        assert_eq!(&line[h.len..h.len + 3], b"GET");
        let h = complete(b"PROXY TCP6 2001:db8::7 2001:db8::1 65535 0\r\n");
        assert_eq!(h.source, Some("[2001:db8::7]:65535".parse().unwrap()));
    }

    #[test]
    fn v1_unknown_keeps_the_socket_address() {
        assert_eq!(complete(b"PROXY UNKNOWN\r\n").source, None);
        let h = complete(b"PROXY UNKNOWN ffff:f...f:ffff ffff:f...f:ffff 65535 65535\r\nx");
        assert_eq!(h.source, None);
        assert_eq!(h.len, 59);
    }

    #[test]
    fn v1_is_parsed_strictly() {
        for bad in [
            &b"PROXY TCP4 203.0.113.7 10.0.0.1 51234\r\n"[..],
            b"PROXY TCP4 203.0.113.7 10.0.0.1 51234 443 9\r\n",
            b"PROXY TCP4  203.0.113.7 10.0.0.1 51234 443\r\n",
            b"PROXY TCP4 2001:db8::7 10.0.0.1 51234 443\r\n",
            b"PROXY TCP6 203.0.113.7 2001:db8::1 51234 443\r\n",
            b"PROXY TCP4 203.0.113.7 10.0.0.1 051234 443\r\n",
            b"PROXY TCP4 203.0.113.7 10.0.0.1 65536 443\r\n",
            b"PROXY TCP4 203.0.113.7 10.0.0.1 +80 443\r\n",
            b"PROXY TCP4 203.0.113.7 10.0.0.1 80 443\n",
            b"PROXY TCP4 203.0.113.7 10.0.0.1 80 443\rX",
            b"PROXY UDP4 203.0.113.7 10.0.0.1 80 443\r\n",
            b"PROXY tcp4 203.0.113.7 10.0.0.1 80 443\r\n",
            b"PROXY \r\n",
        ] {
            assert_eq!(parse(bad), Err(HeaderError::V1Malformed), "{}", String::from_utf8_lossy(bad));
        }
    }

    #[test]
    fn truncated_headers_are_incomplete_until_their_bound() {
        let line = b"PROXY TCP4 203.0.113.7 10.0.0.1 51234 443\r\n";
        for n in 0..line.len() {
            assert_eq!(parse(&line[..n]), Ok(Parsed::Incomplete), "v1 prefix of {n}");
        }
        let header = v2(0x21, 0x11, &v4_block([203, 0, 113, 7], 51234));
        for n in 0..header.len() {
            assert_eq!(parse(&header[..n]), Ok(Parsed::Incomplete), "v2 prefix of {n}");
        }
    }

    #[test]
    fn garbage_and_plain_requests_are_not_headers() {
        assert_eq!(parse(b"GET / HTTP/1.1\r\n"), Err(HeaderError::NotProxy));
        assert_eq!(parse(b"\x16\x03\x01\x02\x00"), Err(HeaderError::NotProxy));
        assert_eq!(parse(b"PRI * HTTP/2.0"), Err(HeaderError::NotProxy));
        assert_eq!(parse(b"PROXX"), Err(HeaderError::NotProxy));
        assert_eq!(parse(b"\r\n\r\n\0\r\nQUIZ"), Err(HeaderError::NotProxy));
    }

    #[test]
    fn oversized_headers_are_refused_without_waiting_for_them() {
        let mut long = b"PROXY UNKNOWN ".to_vec();
        long.resize(MAX_V1_LEN, b'a');
        assert_eq!(parse(&long), Err(HeaderError::V1TooLong));
        // The bound is the whole line: 105 bytes and a CRLF is the longest accepted.
        let mut longest = b"PROXY UNKNOWN ".to_vec();
        longest.resize(MAX_V1_LEN - 2, b'a');
        longest.extend(b"\r\n");
        assert_eq!(complete(&longest).len, MAX_V1_LEN);
        // v2: the declared length is refused from the 16-byte fixed part.
        let mut big = v2(0x21, 0x11, &[]);
        big[14..16].copy_from_slice(&u16::try_from(MAX_V2_LEN - 15).unwrap().to_be_bytes());
        assert_eq!(parse(&big), Err(HeaderError::V2TooLong));
    }

    #[test]
    fn v2_proxy_gives_the_source_and_skips_the_tlvs() {
        let mut block = v4_block([198, 51, 100, 9], 40000);
        block.extend([0xEA, 0x00, 0x03, b'v', b'p', b'c']); // a TLV
        let mut bytes = v2(0x21, 0x11, &block);
        bytes.extend(b"GET");
        let h = complete(&bytes);
        assert_eq!(h.source, Some("198.51.100.9:40000".parse().unwrap()));
        assert_eq!(&bytes[h.len..], b"GET");

        let mut block6 = "2001:db8::9".parse::<Ipv6Addr>().unwrap().octets().to_vec();
        block6.extend(Ipv6Addr::LOCALHOST.octets());
        block6.extend(1234u16.to_be_bytes());
        block6.extend(443u16.to_be_bytes());
        let h = complete(&v2(0x21, 0x21, &block6));
        assert_eq!(h.source, Some("[2001:db8::9]:1234".parse().unwrap()));
    }

    #[test]
    fn v2_local_and_unspec_keep_the_socket_address() {
        assert_eq!(complete(&v2(0x20, 0x00, &[])), Header { len: 16, source: None });
        // LOCAL with an address block (a health check): the block is skipped, not believed.
        let h = complete(&v2(0x20, 0x11, &v4_block([1, 2, 3, 4], 1)));
        assert_eq!(h, Header { len: 28, source: None });
        assert_eq!(complete(&v2(0x21, 0x00, &[])).source, None);
    }

    #[test]
    fn v2_is_parsed_strictly() {
        let block = v4_block([1, 2, 3, 4], 1);
        assert_eq!(parse(&v2(0x11, 0x11, &block)), Err(HeaderError::V2Command)); // version 1
        assert_eq!(parse(&v2(0x22, 0x11, &block)), Err(HeaderError::V2Command)); // command 2
        assert_eq!(parse(&v2(0x21, 0x12, &block)), Err(HeaderError::V2Family)); // UDP
        assert_eq!(parse(&v2(0x21, 0x31, &[0; 216])), Err(HeaderError::V2Family)); // UNIX
        assert_eq!(parse(&v2(0x21, 0x11, &block[..11])), Err(HeaderError::V2Short));
        assert_eq!(parse(&v2(0x21, 0x21, &block)), Err(HeaderError::V2Short));
    }

    #[tokio::test]
    async fn read_hands_back_the_bytes_past_the_header() {
        let mut input: &[u8] = b"PROXY TCP4 203.0.113.7 10.0.0.1 5 443\r\nGET / HTTP/1.1\r\n\r\n";
        let (h, rest) = read(&mut input).await.unwrap();
        assert_eq!(h.source, Some("203.0.113.7:5".parse().unwrap()));
        assert_eq!(&rest[..], b"GET / HTTP/1.1\r\n\r\n");
        let mut cut: &[u8] = b"PROXY TCP4 203.0.11";
        assert!(matches!(read(&mut cut).await, Err(ReadError::Closed)));
        let mut garbage: &[u8] = b"GET / HTTP/1.1\r\n\r\n";
        assert!(matches!(read(&mut garbage).await, Err(ReadError::Invalid(HeaderError::NotProxy))));
    }
}
