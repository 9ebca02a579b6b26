//! CDH's `[image.image_pull_proxy]`: which proxy a registry request goes through.
//!
//! oci-client (tokens, layer blobs) applies the proxy and `no_proxy` with reqwest's own rules,
//! as image-rs does. The manifest client and the lazy path (which hands nydus one proxy URL
//! per registry host) need the same decision outside oci-client, and reqwest keeps its
//! matcher private; so the rules are written here, reqwest's rules exactly, to keep every
//! path of one pull on the same route.

use std::net::IpAddr;

use url::Url;

use crate::cdh_config::ProxyConfig;

/// The proxies of image pulls and the hosts that bypass them.
#[derive(Debug, Clone, Default)]
pub struct PullProxy {
    https: Option<Url>,
    http: Option<Url>,
    no_proxy: Vec<Bypass>,
    /// The configuration with the proxy URLs in full, for oci-client.
    raw: ProxyConfig,
}

/// One `no_proxy` entry.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Bypass {
    /// `*`.
    All,
    /// An address or a subnet (`10.0.0.0/8`).
    Net(IpAddr, u8),
    /// A domain and its subdomains (`example.com` and `.example.com` alike).
    Domain(String),
}

impl PullProxy {
    /// Checks and parses `[image.image_pull_proxy]`; the error names the bad value.
    pub fn from_config(cfg: &ProxyConfig) -> Result<Self, String> {
        let url = |key: &str, v: &Option<String>| -> Result<Option<Url>, String> {
            let Some(v) = v.as_deref().map(str::trim).filter(|v| !v.is_empty()) else {
                return Ok(None);
            };
            // `host:port` without a scheme means an HTTP proxy, as curl and Go read it.
            let full = if v.contains("://") {
                v.to_string()
            } else {
                format!("http://{v}")
            };
            let u = Url::parse(&full)
                .map_err(|e| format!("[image.image_pull_proxy] {key} {v:?}: {e}"))?;
            match u.scheme() {
                "http" | "https" if u.host_str().is_some() => Ok(Some(u)),
                s => Err(format!(
                    "[image.image_pull_proxy] {key} {v:?}: scheme {s:?} is not supported (http or https proxies only)"
                )),
            }
        };
        let no_proxy = cfg
            .no_proxy
            .as_deref()
            .unwrap_or("")
            .split(',')
            .map(str::trim)
            .filter(|e| !e.is_empty())
            .map(Bypass::parse)
            .collect::<Result<_, _>>()?;
        let (https, http) = (
            url("https_proxy", &cfg.https_proxy)?,
            url("http_proxy", &cfg.http_proxy)?,
        );
        let raw = ProxyConfig {
            https_proxy: https.as_ref().map(Url::to_string),
            http_proxy: http.as_ref().map(Url::to_string),
            no_proxy: cfg.no_proxy.clone(),
        };
        Ok(Self {
            https,
            http,
            no_proxy,
            raw,
        })
    }

    /// The configuration with the proxy URLs in full (what oci-client takes).
    pub fn config(&self) -> &ProxyConfig {
        &self.raw
    }

    /// Whether any proxy is set.
    pub fn is_set(&self) -> bool {
        self.https.is_some() || self.http.is_some()
    }

    /// The proxy for a request to `host` (with or without `:port`) over `scheme`, if any.
    pub fn for_target(&self, scheme: &str, host: &str) -> Option<&Url> {
        let proxy = match scheme {
            "https" => self.https.as_ref(),
            "http" => self.http.as_ref(),
            _ => None,
        }?;
        let host = strip_port(host);
        (!self.no_proxy.iter().any(|b| b.matches(host))).then_some(proxy)
    }
}

impl Bypass {
    fn parse(entry: &str) -> Result<Self, String> {
        if entry == "*" {
            return Ok(Bypass::All);
        }
        let (addr, bits) = match entry.split_once('/') {
            Some((a, b)) => (a, Some(b)),
            None => (entry, None),
        };
        match (addr.trim_matches(['[', ']']).parse::<IpAddr>(), bits) {
            (Ok(ip), bits) => {
                let max = if ip.is_ipv4() { 32 } else { 128 };
                let bits = match bits {
                    None => max,
                    Some(b) => b.parse::<u8>().ok().filter(|b| *b <= max).ok_or_else(|| {
                        format!(
                            "[image.image_pull_proxy] no_proxy entry {entry:?}: bad prefix length"
                        )
                    })?,
                };
                Ok(Bypass::Net(ip, bits))
            }
            (Err(_), Some(_)) => Err(format!(
                "[image.image_pull_proxy] no_proxy entry {entry:?}: a subnet needs an IP address"
            )),
            (Err(_), None) => Ok(Bypass::Domain(
                entry.trim_start_matches('.').to_ascii_lowercase(),
            )),
        }
    }

    fn matches(&self, host: &str) -> bool {
        match self {
            Bypass::All => true,
            Bypass::Net(net, bits) => match (host.parse::<IpAddr>(), net) {
                (Ok(IpAddr::V4(h)), IpAddr::V4(n)) => {
                    prefix_eq(u32::from(h).into(), u32::from(*n).into(), *bits, 32)
                }
                (Ok(IpAddr::V6(h)), IpAddr::V6(n)) => {
                    prefix_eq(u128::from(h), u128::from(*n), *bits, 128)
                }
                _ => false,
            },
            Bypass::Domain(d) => {
                let h = host.to_ascii_lowercase();
                h == *d || h.strip_suffix(d.as_str()).is_some_and(|p| p.ends_with('.'))
            }
        }
    }
}

fn prefix_eq(a: u128, b: u128, bits: u8, width: u32) -> bool {
    let shift = width - u32::from(bits);
    shift >= width || (a >> shift) == (b >> shift)
}

/// `host` of `host:port`, `[v6]:port` or `[v6]` (brackets dropped); a bare IPv6 as it is.
fn strip_port(host: &str) -> &str {
    if let Some(rest) = host.strip_prefix('[') {
        return rest.split(']').next().unwrap_or(rest);
    }
    match host.rsplit_once(':') {
        Some((h, p)) if !h.contains(':') && p.bytes().all(|b| b.is_ascii_digit()) => h,
        _ => host,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn proxy(https: Option<&str>, http: Option<&str>, no: Option<&str>) -> PullProxy {
        PullProxy::from_config(&ProxyConfig {
            https_proxy: https.map(Into::into),
            http_proxy: http.map(Into::into),
            no_proxy: no.map(Into::into),
        })
        .unwrap()
    }

    #[test]
    fn scheme_picks_the_proxy() {
        let p = proxy(Some("http://p:3128"), None, None);
        assert_eq!(
            p.for_target("https", "r.io").map(Url::as_str),
            Some("http://p:3128/")
        );
        assert_eq!(p.for_target("http", "r.io"), None);
        let p = proxy(None, Some("proxy.test:8080"), None);
        assert_eq!(
            p.for_target("http", "127.0.0.1:5000").map(Url::as_str),
            Some("http://proxy.test:8080/")
        );
    }

    #[test]
    fn no_proxy_follows_reqwest_rules() {
        let p = proxy(
            Some("http://p:1"),
            Some("http://p:1"),
            Some(" example.com, .corp.test,10.0.0.0/8 , ::1, 192.168.1.7"),
        );
        for bypass in [
            "example.com",
            "www.example.com:443",
            "a.corp.test",
            "corp.test",
            "10.2.3.4:5000",
            "[::1]:5000",
            "192.168.1.7",
        ] {
            assert_eq!(p.for_target("https", bypass), None, "{bypass}");
        }
        for proxied in [
            "notexample.com",
            "example.com.evil",
            "11.0.0.1",
            "192.168.1.8:5000",
            "[::2]",
        ] {
            assert!(p.for_target("https", proxied).is_some(), "{proxied}");
        }
        let all = proxy(Some("http://p:1"), None, Some("*"));
        assert_eq!(all.for_target("https", "anything"), None);
    }

    #[test]
    fn bad_values_are_named() {
        for (cfg, needle) in [
            (
                ProxyConfig {
                    https_proxy: Some("socks5://p:1".into()),
                    ..Default::default()
                },
                "https_proxy",
            ),
            (
                ProxyConfig {
                    http_proxy: Some("http://p:1".into()),
                    no_proxy: Some("host/8".into()),
                    ..Default::default()
                },
                "host/8",
            ),
            (
                ProxyConfig {
                    no_proxy: Some("10.0.0.0/33".into()),
                    ..Default::default()
                },
                "10.0.0.0/33",
            ),
        ] {
            let e = PullProxy::from_config(&cfg).unwrap_err();
            assert!(e.contains(needle), "{e}");
        }
    }

    #[test]
    fn ports_are_stripped() {
        assert_eq!(strip_port("h:5000"), "h");
        assert_eq!(strip_port("[::1]:5000"), "::1");
        assert_eq!(strip_port("::1"), "::1");
        assert_eq!(strip_port("h"), "h");
    }
}
