//! One path, one meaning (SPEC: "Rules the configuration relies on").
//!
//! Routing, limits and storm fingerprints see the normalized path, and the
//! upstream receives that same path. Without this, `//v1/device/x`,
//! `/v1/%64evice/x` and `/v1/device/../device/x` each miss the `/v1/device`
//! prefix and fall to an unlimited route while most backends serve them as
//! `/v1/device/x`: a limit anyone can spell their way around.
//!
//! Normalization, in one pass over the bytes:
//! - percent-encoded unreserved characters (RFC 3986 §2.3) are decoded, other
//!   escapes keep their encoding with upper-case hex (§6.2.2.1);
//! - repeated slashes are merged;
//! - dot-segments are removed (§5.2.4).
//!
//! Refused with 400, because backends disagree on what they mean and one of
//! those meanings is always another route: an encoded `/`, `\` or NUL
//! (`%2F`, `%5C`, `%00`), a raw `\`, a dot-segment spelled with escapes
//! (`%2E%2E`), a `..;`/`.;` segment (Tomcat reads it as a dot-segment), and a
//! path that climbs above the root.

use std::borrow::Cow;

/// Why a path was refused; the text goes into the 400's `detail`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    #[error("the path contains an encoded '/', '\\' or NUL")]
    EncodedSeparator,
    #[error("the path contains a backslash")]
    Backslash,
    #[error("the path contains an encoded or ';'-suffixed dot-segment")]
    DisguisedDotSegment,
    #[error("the path climbs above the root")]
    AboveRoot,
    #[error("the path contains an invalid percent-escape")]
    BadEscape,
    #[error("the path does not start with '/'")]
    NotAbsolute,
}

/// The normalized form of `path` (the path component only, no query).
/// Borrows when `path` is already normal, which is the common case.
pub fn normalize(path: &str) -> Result<Cow<'_, str>, PathError> {
    if !path.starts_with('/') {
        // `*` (OPTIONS) and authority-form (CONNECT) never reach routing.
        return Err(PathError::NotAbsolute);
    }
    if is_normal(path.as_bytes()) {
        return Ok(Cow::Borrowed(path));
    }
    let mut out = String::with_capacity(path.len());
    // Segments between slashes, decoded where allowed; `encoded` tells whether
    // the segment held an escape (an encoded dot-segment is refused).
    for raw in path.split('/').skip(1) {
        let (segment, encoded) = decode_segment(raw)?;
        let bare = segment.split(';').next().unwrap_or("");
        let dotted = bare == "." || bare == "..";
        if dotted && (encoded || bare.len() != segment.len()) {
            return Err(PathError::DisguisedDotSegment);
        }
        match segment.as_str() {
            "" | "." => {
                // An empty segment (a repeated or final slash) or `.`: nothing to add,
                // but a final one keeps the trailing slash below.
            }
            ".." => {
                if out.is_empty() {
                    return Err(PathError::AboveRoot);
                }
                let cut = out.rfind('/').unwrap_or(0);
                out.truncate(cut);
            }
            s => {
                out.push('/');
                out.push_str(s);
            }
        }
    }
    // A path ending in `/`, `/.` or `/..` names a directory: keep its slash.
    let last = path.rsplit('/').next().unwrap_or("");
    if out.is_empty() || matches!(last, "" | "." | "..") {
        out.push('/');
    }
    Ok(Cow::Owned(out))
}

/// The fast path: no escape, no backslash, no empty or dot segment.
fn is_normal(path: &[u8]) -> bool {
    let mut prev_slash = false;
    for (i, &b) in path.iter().enumerate() {
        match b {
            b'%' | b'\\' => return false,
            b'/' => {
                if prev_slash {
                    return false;
                }
                prev_slash = true;
            }
            b'.' if prev_slash => {
                // `/.` followed by `/`, `.`, `;` or the end is (or may be) a dot-segment.
                if matches!(path.get(i + 1), None | Some(b'/' | b'.' | b';')) {
                    return false;
                }
                prev_slash = false;
            }
            _ => prev_slash = false,
        }
    }
    true
}

/// Decodes the escapes of one segment that RFC 3986 says are equivalent to
/// their character (unreserved), upper-cases the hex of the others, and
/// refuses the ones that would change the path's structure.
fn decode_segment(raw: &str) -> Result<(String, bool), PathError> {
    let bytes = raw.as_bytes();
    let mut out = String::with_capacity(raw.len());
    let mut encoded = false;
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        match b {
            b'\\' => return Err(PathError::Backslash),
            b'%' => {
                let hex = bytes.get(i + 1..i + 3).ok_or(PathError::BadEscape)?;
                let (hi, lo) = (hex_value(hex[0])?, hex_value(hex[1])?);
                let c = hi << 4 | lo;
                match c {
                    b'/' | b'\\' | 0 => return Err(PathError::EncodedSeparator),
                    c if is_unreserved(c) => {
                        encoded = true;
                        out.push(char::from(c));
                    }
                    _ => {
                        out.push('%');
                        out.push(char::from(hex[0].to_ascii_uppercase()));
                        out.push(char::from(hex[1].to_ascii_uppercase()));
                    }
                }
                i += 3;
            }
            _ => {
                // The URI parser admits only ASCII here; anything else is kept as is.
                let ch_len = utf8_len(b);
                out.push_str(raw.get(i..i + ch_len).unwrap_or(""));
                i += ch_len;
            }
        }
    }
    Ok((out, encoded))
}

fn utf8_len(first: u8) -> usize {
    match first {
        0xF0..=0xFF => 4,
        0xE0..=0xEF => 3,
        0xC0..=0xDF => 2,
        _ => 1,
    }
}

fn hex_value(b: u8) -> Result<u8, PathError> {
    match b {
        b'0'..=b'9' => Ok(b - b'0'),
        b'a'..=b'f' => Ok(b - b'a' + 10),
        b'A'..=b'F' => Ok(b - b'A' + 10),
        _ => Err(PathError::BadEscape),
    }
}

fn is_unreserved(c: u8) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, b'-' | b'.' | b'_' | b'~')
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn n(p: &str) -> Result<String, PathError> {
        normalize(p).map(Cow::into_owned)
    }

    #[test]
    fn spellings_of_one_path_are_one_path() {
        for p in [
            "/v1/device/x",
            "//v1/device/x",
            "/v1//device///x",
            "/v1/%64evice/x",
            "/v1/%64%65vice/x",
            "/v1/device/../device/x",
            "/v1/./device/x",
            "/v1/other/../device/./x",
            "/%76%31/device/x",
        ] {
            assert_eq!(n(p).as_deref(), Ok("/v1/device/x"), "{p}");
        }
    }

    #[test]
    fn normal_paths_are_borrowed() {
        for p in ["/", "/v1/device/x", "/a.b/c..d/.e", "/a/b/"] {
            assert!(matches!(normalize(p), Ok(Cow::Borrowed(_))), "{p}");
        }
    }

    #[test]
    fn directories_keep_their_slash() {
        assert_eq!(n("/a/b/").as_deref(), Ok("/a/b/"));
        assert_eq!(n("/a/b/.").as_deref(), Ok("/a/b/"));
        assert_eq!(n("/a/b/..").as_deref(), Ok("/a/"));
        assert_eq!(n("/a/..").as_deref(), Ok("/"));
        assert_eq!(n("//").as_deref(), Ok("/"));
    }

    #[test]
    fn other_escapes_keep_their_meaning_in_upper_case() {
        assert_eq!(n("/a%3ab/%20x").as_deref(), Ok("/a%3Ab/%20x"));
    }

    #[test]
    fn structure_changing_spellings_are_refused() {
        assert_eq!(n("/v1%2Fdevice/x"), Err(PathError::EncodedSeparator));
        assert_eq!(n("/v1%2fdevice/x"), Err(PathError::EncodedSeparator));
        assert_eq!(n("/v1%5Cdevice"), Err(PathError::EncodedSeparator));
        assert_eq!(n("/v1/%00"), Err(PathError::EncodedSeparator));
        assert_eq!(n("/v1\\device"), Err(PathError::Backslash));
        assert_eq!(n("/v1/%2E%2E/admin"), Err(PathError::DisguisedDotSegment));
        assert_eq!(n("/v1/%2e/x"), Err(PathError::DisguisedDotSegment));
        assert_eq!(n("/v1/..;/admin"), Err(PathError::DisguisedDotSegment));
        assert_eq!(n("/.."), Err(PathError::AboveRoot));
        assert_eq!(n("/a/../../b"), Err(PathError::AboveRoot));
        assert_eq!(n("/a%zz"), Err(PathError::BadEscape));
        assert_eq!(n("/a%4"), Err(PathError::BadEscape));
        assert_eq!(n("*"), Err(PathError::NotAbsolute));
    }

    /// A segment of a plain path: unreserved characters and a few sub-delims.
    fn segment() -> impl Strategy<Value = String> {
        "[a-zA-Z0-9._~!$&'()*+,;=:@-]{1,8}".prop_filter("not a dot-segment", |s| {
            let bare = s.split(';').next().unwrap_or("");
            bare != "." && bare != ".."
        })
    }

    /// One way to write `segment` that a backend would read as the same segment.
    fn respell(seg: &str, choice: &[u8]) -> String {
        let mut out = String::new();
        for (i, c) in seg.bytes().enumerate() {
            if choice.get(i).copied().unwrap_or(0) % 3 == 0 && is_unreserved(c) && c != b'.' {
                out.push_str(&format!("%{c:02x}"));
            } else {
                out.push(char::from(c));
            }
        }
        out
    }

    proptest! {
        #[test]
        fn normalized_is_stable_and_never_climbs(path in "(/[a-zA-Z0-9.%/~_-]{0,6}){0,6}") {
            let path = if path.is_empty() { "/".to_string() } else { path };
            if let Ok(once) = normalize(&path) {
                let twice = normalize(&once).expect("a normalized path normalizes");
                prop_assert_eq!(&*twice, &*once);
                prop_assert!(once.starts_with('/'));
                prop_assert!(!once.contains("//"));
                prop_assert!(once.split('/').all(|s| s != ".." && s != "."));
            }
        }

        #[test]
        fn no_spelling_of_a_path_is_another_path(
            segs in proptest::collection::vec(segment(), 1..6),
            detours in proptest::collection::vec((0usize..6, segment(), any::<bool>()), 0..4),
            choice in proptest::collection::vec(any::<u8>(), 64),
        ) {
            let plain = format!("/{}", segs.join("/"));
            // Respell: escapes, doubled slashes, `./` and `x/../` detours.
            let mut spelled = String::new();
            for (i, s) in segs.iter().enumerate() {
                spelled.push('/');
                for (at, detour, dot) in &detours {
                    if *at == i {
                        if *dot { spelled.push_str("./"); } else { spelled.push_str(&format!("{detour}/../")); }
                    }
                }
                if choice[i] % 4 == 0 { spelled.push('/'); }
                spelled.push_str(&respell(s, &choice[i..]));
            }
            prop_assert_eq!(n(&spelled), n(&plain), "{}", spelled);
        }
    }
}
