//! The little of Redis's wire protocol (RESP2) that a decision needs: writing
//! an `EVALSHA` and reading its reply, plus a key's cluster slot.
//!
//! Why not the `redis` crate's codec: its reply parser, built on parser
//! combinators, cost ~6,500 instructions per decision's five-integer reply
//! (callgrind, a third of what a shared decision added to a request). Here a
//! reply is read in one pass over the buffer, without allocating except for
//! an array's integers. Everything else levee says to Redis (peeks, deletes,
//! pub/sub, the script's loading, failures) still goes through the crate.
//!
//! Bounds: a reply is at most [`MAX_REPLY`] bytes and an array at most
//! [`MAX_ARRAY`] elements of one level; anything else is a protocol error,
//! after which the connection is closed rather than resynchronised.

/// The largest reply read (an error's text, a bulk string): larger ones end
/// the connection.
pub const MAX_REPLY: usize = 64 * 1024;
/// The most elements an array reply may have (a decision returns five).
pub const MAX_ARRAY: usize = 64;

/// One reply, as far as levee reads it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    /// `+OK` and any other status line.
    Status,
    /// `-CODE message`: the server refused the command.
    Error(String),
    Int(i64),
    /// A bulk string or a null (its content is not needed).
    Bulk,
    /// An array of integers (a null element reads as 0).
    Ints(Vec<i64>),
}

/// The reply could not be read: the connection must be closed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unexpected reply from Redis: {0}")]
pub struct ProtocolError(pub &'static str);

/// Appends `EVALSHA sha numkeys keys... args...` to `out`.
pub fn evalsha(out: &mut Vec<u8>, sha: &str, keys: &[String], args: &[u64]) {
    // Room for all of it at once, not grown while written.
    out.reserve(evalsha_room(sha, keys, args));
    let mut n = itoa::Buffer::new();
    header(out, b'*', 3 + keys.len() + args.len());
    bulk(out, b"EVALSHA");
    bulk(out, sha.as_bytes());
    bulk(out, n.format(keys.len()).as_bytes());
    for k in keys {
        bulk(out, k.as_bytes());
    }
    for &a in args {
        bulk(out, n.format(a).as_bytes());
    }
}

/// An upper bound of an `EVALSHA`'s length: each part is `$<len>\r\n<bytes>\r\n`
/// (at most 16 bytes of framing), a number at most 20 digits.
fn evalsha_room(sha: &str, keys: &[String], args: &[u64]) -> usize {
    let parts = 3 + keys.len() + args.len();
    16 + 16 * parts + sha.len() + keys.iter().map(String::len).sum::<usize>() + 20 * args.len()
}

/// Appends a command of plain words (`AUTH user pass`, `SELECT 2`).
pub fn command(out: &mut Vec<u8>, words: &[&str]) {
    header(out, b'*', words.len());
    for w in words {
        bulk(out, w.as_bytes());
    }
}

fn header(out: &mut Vec<u8>, kind: u8, n: usize) {
    out.push(kind);
    out.extend_from_slice(itoa::Buffer::new().format(n).as_bytes());
    out.extend_from_slice(b"\r\n");
}

fn bulk(out: &mut Vec<u8>, b: &[u8]) {
    header(out, b'$', b.len());
    out.extend_from_slice(b);
    out.extend_from_slice(b"\r\n");
}

/// Reads one reply from the start of `buf`: the reply and the bytes it took,
/// or `None` while it is incomplete.
pub fn parse(buf: &[u8]) -> Result<Option<(Reply, usize)>, ProtocolError> {
    let Some((kind, line, mut at)) = line(buf)? else { return Ok(None) };
    let reply = match kind {
        b'+' => Reply::Status,
        b'-' => Reply::Error(String::from_utf8_lossy(line).into_owned()),
        b':' => Reply::Int(int(line)?),
        b'$' => match skip_bulk(int(line)?, &buf[at..])? {
            Some(used) => {
                at += used;
                Reply::Bulk
            }
            None => return Ok(None),
        },
        b'*' => {
            let n = int(line)?;
            let n = if n < 0 { 0 } else { usize::try_from(n).map_err(|_| ProtocolError("array length"))? };
            if n > MAX_ARRAY {
                return Err(ProtocolError("array too long"));
            }
            let mut ints = Vec::with_capacity(n);
            for _ in 0..n {
                let Some((kind, line, used)) = line_at(buf, at)? else { return Ok(None) };
                at = used;
                match kind {
                    b':' => ints.push(int(line)?),
                    b'$' if int(line)? < 0 => ints.push(0),
                    b'*' if int(line)? < 0 => ints.push(0),
                    _ => return Err(ProtocolError("an array element that is not an integer")),
                }
            }
            Reply::Ints(ints)
        }
        _ => return Err(ProtocolError("unknown reply type")),
    };
    Ok(Some((reply, at)))
}

/// A line of a reply: its type byte, its content, and the offset after its CRLF.
type Line<'a> = (u8, &'a [u8], usize);

/// The line starting at `at`.
fn line_at(buf: &[u8], at: usize) -> Result<Option<Line<'_>>, ProtocolError> {
    Ok(line(&buf[at..])?.map(|(kind, l, used)| (kind, l, at + used)))
}

/// The first line of `buf`.
fn line(buf: &[u8]) -> Result<Option<Line<'_>>, ProtocolError> {
    let window = &buf[..buf.len().min(MAX_REPLY)];
    match window.iter().position(|&b| b == b'\n') {
        Some(end) if end >= 2 && window[end - 1] == b'\r' => Ok(Some((buf[0], &buf[1..end - 1], end + 1))),
        Some(_) => Err(ProtocolError("a line without CRLF")),
        None if buf.len() >= MAX_REPLY => Err(ProtocolError("a line too long")),
        None => Ok(None),
    }
}

/// Skips a bulk string of `len` bytes (-1: null); the bytes it took.
fn skip_bulk(len: i64, rest: &[u8]) -> Result<Option<usize>, ProtocolError> {
    if len < 0 {
        return Ok(Some(0));
    }
    let len = usize::try_from(len).map_err(|_| ProtocolError("bulk length"))?;
    if len > MAX_REPLY {
        return Err(ProtocolError("bulk string too long"));
    }
    if rest.len() < len + 2 {
        return Ok(None);
    }
    if &rest[len..len + 2] != b"\r\n" {
        return Err(ProtocolError("a bulk string without CRLF"));
    }
    Ok(Some(len + 2))
}

/// A decimal integer (`-` allowed), by hand: `str::parse` after a UTF-8
/// check cost three times as much, on each of a decision's six integers.
fn int(line: &[u8]) -> Result<i64, ProtocolError> {
    const BAD: ProtocolError = ProtocolError("not an integer");
    let (negative, digits) = match line {
        [b'-', rest @ ..] => (true, rest),
        _ => (false, line),
    };
    if digits.is_empty() {
        return Err(BAD);
    }
    // Accumulated negative, so that i64::MIN fits.
    let mut v: i64 = 0;
    for &d in digits {
        if !d.is_ascii_digit() {
            return Err(BAD);
        }
        v = v.checked_mul(10).and_then(|v| v.checked_sub(i64::from(d - b'0'))).ok_or(BAD)?;
    }
    if negative {
        Ok(v)
    } else {
        v.checked_neg().ok_or(BAD)
    }
}

/// The hash tag of `key`: the text between its first `{` and the next `}`,
/// when not empty (Redis Cluster's rule: only the tag decides the slot).
pub fn hash_tag(key: &str) -> Option<&str> {
    // Byte scans, not `str::find`'s general pattern search (~350 instructions
    // per decision for a brace at the 7th byte). The braces are ASCII, so the
    // offsets are character boundaries.
    let open = key.bytes().position(|b| b == b'{')?;
    let rest = &key[open + 1..];
    rest.bytes().position(|b| b == b'}').filter(|&close| close > 0).map(|close| &rest[..close])
}

/// The Redis Cluster slot of `key`: CRC16 (XMODEM) of its [`hash_tag`] or,
/// without one, of the whole key, modulo 16,384.
pub fn key_slot(key: &str) -> u16 {
    crc16::State::<crc16::XMODEM>::calculate(hash_tag(key).unwrap_or(key).as_bytes()) % 16384
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    /// The command is written into the room reserved for it: never grown
    /// (and copied) halfway, even for the longest one a route can send.
    #[test]
    fn an_evalsha_fits_the_room_reserved_for_it() {
        let sha = "e".repeat(40);
        let keys: Vec<String> =
            (0..4).map(|i| format!("levee:{{{}:{}}}:{i}/s:b{i}", "r".repeat(64), "c".repeat(256))).collect();
        let mut out = Vec::new();
        evalsha(&mut out, &sha, &keys, &[u64::MAX; 8]);
        assert_eq!(out.capacity(), evalsha_room(&sha, &keys, &[u64::MAX; 8]), "grown while written");
        assert!(out.len() <= out.capacity());
    }

    #[test]
    fn an_evalsha_is_written_as_redis_reads_it() {
        let mut out = Vec::new();
        evalsha(&mut out, "abc", &["levee:{r:c}:1/s:b1".to_string()], &[1_000_000, 2_000_000]);
        assert_eq!(
            out,
            b"*6\r\n$7\r\nEVALSHA\r\n$3\r\nabc\r\n$1\r\n1\r\n$18\r\nlevee:{r:c}:1/s:b1\r\n\
              $7\r\n1000000\r\n$7\r\n2000000\r\n"
                .to_vec()
        );
    }

    #[test]
    fn replies_are_read_whole_or_not_at_all() {
        let decision = b":1\r\n*5\r\n:1\r\n:0\r\n:0\r\n:99\r\n:10000\r\n";
        assert_eq!(parse(decision).unwrap(), Some((Reply::Int(1), 4)));
        let rest = &decision[4..];
        assert_eq!(parse(rest).unwrap(), Some((Reply::Ints(vec![1, 0, 0, 99, 10000]), rest.len())));
        for cut in 0..rest.len() {
            assert_eq!(parse(&rest[..cut]).unwrap(), None, "cut at {cut}");
        }
        assert_eq!(parse(b"+OK\r\n").unwrap(), Some((Reply::Status, 5)));
        assert_eq!(
            parse(b"-NOSCRIPT No matching script\r\n").unwrap(),
            Some((Reply::Error("NOSCRIPT No matching script".into()), 30))
        );
        assert_eq!(parse(b"$3\r\nabc\r\n+OK").unwrap(), Some((Reply::Bulk, 9)));
        assert_eq!(parse(b"$-1\r\n").unwrap(), Some((Reply::Bulk, 5)));
        assert_eq!(parse(b":-9223372036854775808\r\n").unwrap(), Some((Reply::Int(i64::MIN), 23)));
        assert_eq!(parse(b"*2\r\n$-1\r\n:7\r\n").unwrap(), Some((Reply::Ints(vec![0, 7]), 13)));
    }

    #[test]
    fn what_is_not_a_reply_levee_reads_is_an_error() {
        assert!(parse(b"!oops\r\n").is_err());
        assert!(parse(b":12x\r\n").is_err());
        assert!(parse(b":\r\n").is_err());
        assert!(parse(b":-\r\n").is_err());
        assert!(parse(b":9223372036854775808\r\n").is_err(), "past i64::MAX");
        assert!(parse(b":1\n").is_err());
        assert!(parse(b"*1\r\n+OK\r\n").is_err(), "an array of statuses");
        assert!(parse(b"*100\r\n").is_err(), "longer than MAX_ARRAY");
        assert!(parse(b"$99999999\r\n").is_err(), "longer than MAX_REPLY");
        assert!(parse(b"$1\r\nab\r\n").is_err(), "a bulk string's length is wrong");
        let endless = vec![b'+'; MAX_REPLY + 1];
        assert!(parse(&endless).is_err(), "a line that never ends");
    }

    /// Values `CLUSTER KEYSLOT` gives (Redis's own documentation and tests).
    #[test]
    fn slots_are_redis_clusters() {
        assert_eq!(key_slot("foo"), 12182);
        assert_eq!(key_slot("bar"), 5061);
        assert_eq!(key_slot("hello"), 866);
        assert_eq!(key_slot("{user1000}.following"), key_slot("user1000"));
        assert_eq!(key_slot("foo{}{bar}"), key_slot("foo{}{bar}"), "an empty tag: the whole key");
        assert_ne!(key_slot("foo{}{bar}"), key_slot("bar"));
        assert_eq!(key_slot("levee:{r:c}:1/s:b1"), key_slot("levee:{r:c}:5000/h:b5000"));
    }

    proptest! {
        /// Any bytes at all: an answer or an error, never a panic, and a
        /// reply never claims more bytes than it was given.
        #[test]
        fn any_bytes_are_read_without_panicking(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
            if let Ok(Some((_, used))) = parse(&bytes) {
                prop_assert!(used <= bytes.len());
            }
        }

        /// A written integer array reads back, however the bytes are split.
        #[test]
        fn integer_arrays_read_back(values in proptest::collection::vec(any::<i64>(), 0..MAX_ARRAY)) {
            let mut out = format!("*{}\r\n", values.len()).into_bytes();
            for v in &values {
                out.extend_from_slice(format!(":{v}\r\n").as_bytes());
            }
            prop_assert_eq!(parse(&out).unwrap(), Some((Reply::Ints(values.clone()), out.len())));
            if !out.is_empty() {
                prop_assert_eq!(parse(&out[..out.len() - 1]).unwrap(), None);
            }
        }
    }
}
