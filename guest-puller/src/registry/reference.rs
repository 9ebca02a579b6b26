//! Image references (`[domain[:port]/]path[:tag][@digest]`), parsed by hand into
//! `oci_client::Reference` with the same results as its parser.
//!
//! Hand-written because `oci_spec`'s `Reference::from_str` compiles one regex whose tag part,
//! `[\w][\w.-]{0,127}`, is Unicode-aware: building it takes a 20 MB heap peak and ~50 ms on
//! the first parse, the largest allocation of a whole pull in the guest (measured with massif;
//! BENCHMARKS.md). The grammar is distribution's `reference` grammar, where `\w` is ASCII.

use oci_client::Reference;

const DOCKER_HUB: &str = "docker.io";
const DOCKER_HUB_LEGACY: &str = "index.docker.io";
const OFFICIAL_NAMESPACE: &str = "library";
const DEFAULT_TAG: &str = "latest";
const NAME_MAX: usize = 255;
const TAG_MAX: usize = 128;

/// Parses `s` like docker's `ParseNormalizedNamed`: a name without a domain is on
/// `docker.io` (under `library/` when it has one component), and `latest` is the tag when
/// neither tag nor digest is given.
pub fn parse(s: &str) -> Result<Reference, String> {
    if s.is_empty() {
        return Err("repository name must have at least one component".into());
    }
    let (rest, digest) = match s.split_once('@') {
        Some((r, d)) => (r, Some(d)),
        None => (s, None),
    };
    // A ':' after the last '/' starts the tag; one before it is a registry port.
    let (name, tag) = match rest.rfind(':') {
        Some(i) if !rest[i..].contains('/') => (&rest[..i], Some(&rest[i + 1..])),
        _ => (rest, None),
    };
    if !valid_name(name) || !tag.is_none_or(valid_tag) || !digest.is_none_or(valid_digest) {
        return Err("invalid reference format".into());
    }
    let (registry, repository) = split_domain(name);
    if repository.len() > NAME_MAX {
        return Err(format!(
            "repository name must not be more than {NAME_MAX} characters"
        ));
    }
    if let Some(d) = digest {
        check_digest_length(d)?;
    }
    Ok(match (tag, digest) {
        (Some(t), Some(d)) => {
            Reference::with_tag_and_digest(registry, repository, t.into(), d.into())
        }
        (None, Some(d)) => Reference::with_digest(registry, repository, d.into()),
        (Some(t), None) => Reference::with_tag(registry, repository, t.into()),
        (None, None) => Reference::with_tag(registry, repository, DEFAULT_TAG.into()),
    })
}

/// `[domain '/'] component ('/' component)*`; the first part is a domain only when it could
/// not be a path component or more components follow (the regex's backtracking, spelt out).
fn valid_name(name: &str) -> bool {
    let mut parts = name.split('/');
    let Some(first) = parts.next() else {
        return false;
    };
    let rest: Vec<&str> = parts.collect();
    let rest_ok = rest.iter().all(|c| valid_component(c));
    (valid_component(first) && rest_ok) || (!rest.is_empty() && valid_domain(first) && rest_ok)
}

/// `[a-z0-9]+ ((. | _ | __ | -+) [a-z0-9]+)*`
fn valid_component(c: &str) -> bool {
    let b = c.as_bytes();
    let alnum = |x: &u8| x.is_ascii_lowercase() || x.is_ascii_digit();
    if b.is_empty() || !alnum(&b[0]) || !alnum(&b[b.len() - 1]) {
        return false;
    }
    let mut i = 0;
    while i < b.len() {
        if alnum(&b[i]) {
            i += 1;
            continue;
        }
        let start = i;
        while i < b.len() && !alnum(&b[i]) {
            i += 1;
        }
        let sep = &b[start..i];
        let ok = matches!(sep, b"." | b"_" | b"__") || sep.iter().all(|x| *x == b'-');
        if !ok {
            return false;
        }
    }
    true
}

/// `label ('.' label)* (':' [0-9]+)?` with `label = [a-zA-Z0-9] | [a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9]`.
fn valid_domain(d: &str) -> bool {
    let (host, port) = match d.split_once(':') {
        Some((h, p)) => (h, Some(p)),
        None => (d, None),
    };
    let label_ok = |l: &str| {
        let b = l.as_bytes();
        !b.is_empty()
            && b[0].is_ascii_alphanumeric()
            && b[b.len() - 1].is_ascii_alphanumeric()
            && b.iter().all(|x| x.is_ascii_alphanumeric() || *x == b'-')
    };
    host.split('.').all(label_ok)
        && port.is_none_or(|p| !p.is_empty() && p.bytes().all(|x| x.is_ascii_digit()))
}

/// `[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}`
fn valid_tag(t: &str) -> bool {
    let b = t.as_bytes();
    let word = |x: &u8| x.is_ascii_alphanumeric() || *x == b'_';
    !b.is_empty()
        && b.len() <= TAG_MAX
        && word(&b[0])
        && b.iter().all(|x| word(x) || *x == b'.' || *x == b'-')
}

/// `algorithm ':' [0-9a-fA-F]{32,}` with `algorithm = [A-Za-z][A-Za-z0-9]* ([-_+.][A-Za-z][A-Za-z0-9]*)*`.
fn valid_digest(d: &str) -> bool {
    let Some((alg, hex)) = d.split_once(':') else {
        return false;
    };
    let alg_ok = alg.split(['-', '_', '+', '.']).all(|p| {
        let b = p.as_bytes();
        !b.is_empty() && b[0].is_ascii_alphabetic() && b.iter().all(u8::is_ascii_alphanumeric)
    });
    alg_ok && hex.len() >= 32 && hex.bytes().all(|x| x.is_ascii_hexdigit())
}

fn check_digest_length(d: &str) -> Result<(), String> {
    let (alg, hex) = d.split_once(':').unwrap_or((d, ""));
    let want = match alg {
        "sha256" => 64,
        "sha384" => 96,
        "sha512" => 128,
        _ => return Err("unsupported digest algorithm".into()),
    };
    if hex.len() != want {
        return Err("invalid checksum digest length".into());
    }
    Ok(())
}

/// docker's `splitDockerDomain`.
fn split_domain(name: &str) -> (String, String) {
    let (mut domain, mut rest) = match name.split_once('/') {
        Some((left, right)) if left.contains(['.', ':']) || left == "localhost" => {
            (left.to_string(), right.to_string())
        }
        _ => (DOCKER_HUB.to_string(), name.to_string()),
    };
    if domain == DOCKER_HUB_LEGACY {
        domain = DOCKER_HUB.into();
    }
    if domain == DOCKER_HUB && !rest.contains('/') {
        rest = format!("{OFFICIAL_NAMESPACE}/{rest}");
    }
    (domain, rest)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// oci_spec's regex parser is the oracle: every case must give the same reference or
    /// fail in both.
    #[test]
    fn agrees_with_the_regex_parser() {
        let h64 = "a".repeat(64);
        let h32 = "b".repeat(32);
        let long_tag = "t".repeat(128);
        let too_long_tag = "t".repeat(129);
        let long_name = format!("a/{}", "b".repeat(260));
        let cases = [
            "busybox".to_string(),
            "busybox:1.36".into(),
            "library/busybox".into(),
            "docker.io/busybox".into(),
            "index.docker.io/busybox:latest".into(),
            "index.docker.io/foo/bar".into(),
            "quay.io/a/b/c:v1.2-rc_3".into(),
            "localhost/x".into(),
            "localhost:5000/x/y:tag".into(),
            "127.0.0.1:5000/bench/enc:v1".into(),
            format!("127.0.0.1:5000/a/b@sha256:{h64}"),
            format!("a/b:t@sha256:{h64}"),
            format!("a@sha512:{}", "c".repeat(128)),
            format!("a@sha384:{}", "d".repeat(96)),
            format!("a@sha256:{h32}"),
            format!("a@md5:{h32}"),
            format!("a@sha256:{}", "g".repeat(64)),
            format!("a@SHA256:{h64}"),
            format!("a@sha256+b64:{h64}"),
            format!("a:{long_tag}"),
            format!("a:{too_long_tag}"),
            long_name,
            "a__b".into(),
            "a___b".into(),
            "a---b/c.d_e".into(),
            "a.-b".into(),
            "a..b".into(),
            "-a".into(),
            "a-".into(),
            "Upper/case".into(),
            "Reg.io/lower".into(),
            "reg-.io/x".into(),
            "my-reg.example.com:443/team/app".into(),
            "reg:port/x".into(),
            "reg:/x".into(),
            "a//b".into(),
            "a/".into(),
            "/a".into(),
            "a/b:".into(),
            ":tag".into(),
            "a:.tag".into(),
            "a:_tag".into(),
            "a:-tag".into(),
            "a@".into(),
            "a@sha256".into(),
            "a b".into(),
            "a:t:u".into(),
            "a:t@b:c".into(),
            "foo:5000".into(),
            "foo:5000/bar".into(),
            "localhost".into(),
            "localhost:5000".into(),
        ];
        for c in &cases {
            let ours = parse(c);
            let theirs = Reference::try_from(c.as_str());
            match (&ours, &theirs) {
                (Ok(a), Ok(b)) => assert_eq!(
                    (a.registry(), a.repository(), a.tag(), a.digest(), a.whole()),
                    (b.registry(), b.repository(), b.tag(), b.digest(), b.whole()),
                    "{c}"
                ),
                (Err(_), Err(_)) => {}
                _ => panic!("{c:?}: ours {ours:?}, oci_spec {theirs:?}"),
            }
        }
    }

    /// The one place the grammars differ: oci_spec's `\w` accepts non-ASCII letters in tags,
    /// distribution's (Go RE2, ASCII) does not, and neither does a registry's tag API.
    #[test]
    fn tags_are_ascii() {
        assert!(Reference::try_from("a:tagé").is_ok());
        assert!(parse("a:tagé").is_err());
    }
}
