//! `${NAME}` and `${NAME:-default}` in config strings.
//!
//! Substitution runs on parsed string values, not on the file's text, so a
//! value can never break the TOML around it and a missing variable is reported
//! with the key path of the string that asked for it. A missing variable without
//! an explicit default is an error: a silent empty secret is how the outage in the
//! SPEC's table began.

/// Replaces every `${NAME}` / `${NAME:-default}` in `s` using `lookup`.
/// Returns the name of the first variable that is not set and has no default.
pub fn substitute(s: &str, lookup: impl Fn(&str) -> Option<String>) -> Result<String, String> {
    if !s.contains("${") {
        return Ok(s.to_string());
    }
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(start) = rest.find("${") {
        out.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        let Some(end) = after.find('}') else {
            // An unterminated `${` is literal text.
            out.push_str(&rest[start..]);
            return Ok(out);
        };
        let expr = &after[..end];
        let (name, default) = match expr.split_once(":-") {
            Some((n, d)) => (n, Some(d)),
            None => (expr, None),
        };
        match (lookup(name), default) {
            (Some(v), _) => out.push_str(&v),
            (None, Some(d)) => out.push_str(d),
            (None, None) => return Err(name.to_string()),
        }
        rest = &after[end + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::substitute;

    fn env(name: &str) -> Option<String> {
        (name == "TOKEN").then(|| "s3cret".to_string())
    }

    #[test]
    fn replaces_and_defaults() {
        assert_eq!(substitute("Bearer ${TOKEN}", env).unwrap(), "Bearer s3cret");
        assert_eq!(substitute("${PORT:-8080}", env).unwrap(), "8080");
        assert_eq!(substitute("${TOKEN:-x}/${PORT:-1}", env).unwrap(), "s3cret/1");
        assert_eq!(substitute("no vars", env).unwrap(), "no vars");
        assert_eq!(substitute("${open", env).unwrap(), "${open");
    }

    #[test]
    fn missing_without_default_is_an_error() {
        assert_eq!(substitute("${NOPE}", env).unwrap_err(), "NOPE");
    }
}
