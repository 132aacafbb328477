//! Fetchable URL arguments (docs/configuration.md, "URL arguments"): a URL
//! a client asks the upstream to fetch must be an absolute `http`/`https`
//! URL without credentials whose host is, and resolves only to, public
//! addresses. Parsing is the WHATWG URL standard's (the `url` crate), so
//! every numeric spelling of an address a browser or fetch library would
//! accept (`2130706433`, `0x7f.1`, `0177.0.0.1`, `127.1`) is read as the
//! address it means before it is judged.

use std::future::Future;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::pin::Pin;
use std::time::Duration;

use serde_json::Value;
use url::{Host, Url};

/// `url_args = [{ pointers = [...] }]` on a route.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UrlArg {
    /// RFC 6901 pointers into the JSON body: each a string or an array of strings.
    pub pointers: Vec<String>,
}

/// Looks up the addresses of a name (the system resolver, or a fake in tests).
pub trait Resolve: Send + Sync {
    /// Every address `host` resolves to.
    fn resolve<'a>(
        &'a self,
        host: &'a str,
        port: u16,
    ) -> Pin<Box<dyn Future<Output = std::io::Result<Vec<IpAddr>>> + Send + 'a>>;
}

/// The system resolver (`getaddrinfo`, through tokio's blocking pool).
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemResolver;

impl Resolve for SystemResolver {
    fn resolve<'a>(
        &'a self,
        host: &'a str,
        port: u16,
    ) -> Pin<Box<dyn Future<Output = std::io::Result<Vec<IpAddr>>> + Send + 'a>> {
        Box::pin(async move {
            let addrs = tokio::net::lookup_host((host, port)).await?;
            Ok(addrs.map(|a: SocketAddr| a.ip()).collect())
        })
    }
}

/// Why an address is not public, if it is not.
pub fn not_public(ip: IpAddr) -> Option<&'static str> {
    match ip {
        IpAddr::V4(v4) => v4_not_public(v4),
        IpAddr::V6(v6) => v6_not_public(v6),
    }
}

fn v4_not_public(ip: Ipv4Addr) -> Option<&'static str> {
    let [a, b, c, _] = ip.octets();
    let why = match (a, b, c) {
        (0, _, _) => "unspecified (0.0.0.0/8)",
        (10, _, _) => "private (10.0.0.0/8)",
        (100, 64..=127, _) => "shared address space (100.64.0.0/10)",
        (127, _, _) => "loopback (127.0.0.0/8)",
        (169, 254, _) => "link-local (169.254.0.0/16, cloud metadata)",
        (172, 16..=31, _) => "private (172.16.0.0/12)",
        (192, 0, 0) => "IETF protocol assignments (192.0.0.0/24)",
        (192, 0, 2) | (198, 51, 100) | (203, 0, 113) => "documentation",
        (192, 88, 99) => "6to4 relay anycast (192.88.99.0/24)",
        (192, 168, _) => "private (192.168.0.0/16)",
        (198, 18..=19, _) => "benchmarking (198.18.0.0/15)",
        (224..=239, _, _) => "multicast (224.0.0.0/4)",
        (240..=255, _, _) => "reserved (240.0.0.0/4, broadcast)",
        _ => return None,
    };
    Some(why)
}

fn v6_not_public(ip: Ipv6Addr) -> Option<&'static str> {
    if let Some(v4) = embedded_v4(ip) {
        return v4_not_public(v4);
    }
    let s = ip.segments();
    let why = match s[0] {
        _ if ip.is_unspecified() => "unspecified (::)",
        _ if ip.is_loopback() => "loopback (::1)",
        0xfc00..=0xfdff => "unique local (fc00::/7)",
        0xfe80..=0xfebf => "link-local (fe80::/10)",
        0xfec0..=0xfeff => "site-local (fec0::/10)",
        0xff00..=0xffff => "multicast (ff00::/8)",
        0x2001 if s[1] == 0x0db8 => "documentation (2001:db8::/32)",
        0x3fff if s[1] < 0x1000 => "documentation (3fff::/20)",
        0x2001 if s[1] < 0x0200 => "IETF protocol assignments (2001::/23, Teredo)",
        0x0100 if s[1..4] == [0, 0, 0] => "discard (100::/64)",
        0x2000..=0x3fff => return None,
        _ => "not global unicast (outside 2000::/3)",
    };
    Some(why)
}

/// The IPv4 address inside an IPv6 one that carries it: IPv4-mapped
/// (`::ffff:a.b.c.d`), IPv4-compatible (`::a.b.c.d`, deprecated), NAT64
/// (`64:ff9b::a.b.c.d`) and 6to4 (`2002:AABB:CCDD::`).
fn embedded_v4(ip: Ipv6Addr) -> Option<Ipv4Addr> {
    let s = ip.segments();
    let tail = Ipv4Addr::new((s[6] >> 8) as u8, s[6] as u8, (s[7] >> 8) as u8, s[7] as u8);
    match s {
        [0, 0, 0, 0, 0, 0xffff, _, _] => Some(tail),
        // `::` and `::1` are judged as IPv6.
        [0, 0, 0, 0, 0, 0, hi, _] if hi != 0 => Some(tail),
        [0x64, 0xff9b, 0, 0, 0, 0, _, _] => Some(tail),
        [0x2002, hi, lo, ..] => Some(Ipv4Addr::new(
            (hi >> 8) as u8,
            hi as u8,
            (lo >> 8) as u8,
            lo as u8,
        )),
        _ => None,
    }
}

/// Why a URL may not be fetched, for the 400's message.
fn refuse(url: &str, why: &str) -> String {
    format!("{url:?} is not a fetchable URL: {why}")
}

/// Checks one URL: scheme, credentials, and every address its host is or
/// resolves to (within `timeout`). The message names the URL.
pub async fn check_url(
    text: &str,
    resolver: &dyn Resolve,
    timeout: Duration,
) -> Result<(), String> {
    let url =
        Url::parse(text.trim()).map_err(|e| refuse(text, &format!("not an absolute URL ({e})")))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(refuse(
            text,
            &format!("scheme {:?} (only http and https)", url.scheme()),
        ));
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err(refuse(text, "it carries credentials"));
    }
    let port = url.port_or_known_default().unwrap_or(80);
    let name = match url.host() {
        Some(Host::Ipv4(ip)) => return judge(text, IpAddr::V4(ip)),
        Some(Host::Ipv6(ip)) => return judge(text, IpAddr::V6(ip)),
        Some(Host::Domain(name)) => name.trim_end_matches('.').to_ascii_lowercase(),
        None => return Err(refuse(text, "no host")),
    };
    if name == "localhost" || name.ends_with(".localhost") {
        return Err(refuse(text, "localhost"));
    }
    let addrs = match tokio::time::timeout(timeout, resolver.resolve(&name, port)).await {
        Err(_) => {
            return Err(refuse(
                text,
                &format!("{name} did not resolve within {} ms", timeout.as_millis()),
            ))
        }
        Ok(Err(e)) => return Err(refuse(text, &format!("{name} does not resolve ({e})"))),
        Ok(Ok(addrs)) => addrs,
    };
    if addrs.is_empty() {
        return Err(refuse(text, &format!("{name} resolves to no address")));
    }
    for ip in addrs {
        if let Some(why) = not_public(ip) {
            return Err(refuse(text, &format!("{name} resolves to {ip}, {why}")));
        }
    }
    Ok(())
}

fn judge(text: &str, ip: IpAddr) -> Result<(), String> {
    match not_public(ip) {
        Some(why) => Err(refuse(text, &format!("{ip} is {why}"))),
        None => Ok(()),
    }
}

/// Checks every URL the rules select in `body`: a string, or each element
/// of an array of strings (anything else there is refused).
pub async fn check_args(
    rules: &[UrlArg],
    body: &Value,
    resolver: &dyn Resolve,
    timeout: Duration,
) -> Result<(), String> {
    for rule in rules {
        for pointer in &rule.pointers {
            let Some(value) = body.pointer(pointer) else {
                continue;
            };
            let urls: Vec<&Value> = match value {
                Value::Array(items) => items.iter().collect(),
                v => vec![v],
            };
            for v in urls {
                let Some(text) = v.as_str() else {
                    return Err(format!("{pointer} must hold URL strings, not {v}"));
                };
                check_url(text, resolver, timeout)
                    .await
                    .map_err(|m| format!("{pointer}: {m}"))?;
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A resolver that knows a few names and nothing else.
    struct Fake;

    impl Resolve for Fake {
        fn resolve<'a>(
            &'a self,
            host: &'a str,
            _port: u16,
        ) -> Pin<Box<dyn Future<Output = std::io::Result<Vec<IpAddr>>> + Send + 'a>> {
            Box::pin(async move {
                let ips: Vec<IpAddr> = match host {
                    "images.example.com" => vec!["93.184.215.14".parse().unwrap()],
                    "v6.example.com" => {
                        vec!["2606:2800:21f:cb07:6820:80da:af6b:8b2c".parse().unwrap()]
                    }
                    "rebind.example.com" => vec![
                        "93.184.215.14".parse().unwrap(),
                        "10.0.0.5".parse().unwrap(),
                    ],
                    "metadata.google.internal" => vec!["169.254.169.254".parse().unwrap()],
                    "127.0.0.1.nip.io" => vec!["127.0.0.1".parse().unwrap()],
                    "slow.example.com" => {
                        tokio::time::sleep(Duration::from_secs(5)).await;
                        vec![]
                    }
                    _ => return Err(std::io::Error::other("no such host")),
                };
                Ok(ips)
            })
        }
    }

    async fn ok(url: &str) -> Result<(), String> {
        check_url(url, &Fake, Duration::from_millis(200)).await
    }

    #[tokio::test]
    async fn public_http_urls_are_fetchable() {
        for url in [
            "https://images.example.com/cat.png",
            "http://images.example.com:8080/a?b=c#frag",
            "https://v6.example.com/",
            "http://93.184.215.14/x",
            "http://[2606:2800:21f:cb07:6820:80da:af6b:8b2c]/",
            "HTTPS://IMAGES.EXAMPLE.COM./x",
            "http://8.8.8.8",
            "http://[2002:808:808::]/",
            "http://[3fff:1000::1]/",
        ] {
            assert_eq!(ok(url).await, Ok(()), "{url}");
        }
    }

    #[tokio::test]
    async fn every_spelling_of_a_non_public_address_is_refused() {
        // OWASP's SSRF cheat sheet forms for literal addresses, and more.
        for url in [
            "http://127.0.0.1/",
            "http://127.1/",
            "http://2130706433/",
            "http://0x7f000001/",
            "http://0x7f.1/",
            "http://0177.0.0.1/",
            "http://0177.0.0.01/",
            "http://017700000001/",
            "http://0x7f.0x0.0x0.0x1/",
            "http://127.000.000.001/",
            "http://0/",
            "http://0.0.0.0:8080/",
            "http://10.1.2.3/",
            "http://172.16.0.1/",
            "http://172.31.255.255/",
            "http://192.168.1.1/",
            "http://169.254.169.254/latest/meta-data/",
            "http://0xa9fea9fe/",
            "http://2852039166/",
            "http://100.64.0.1/",
            "http://224.0.0.1/",
            "http://255.255.255.255/",
            "http://198.18.0.1/",
            "http://[::1]/",
            "http://[::]/",
            "http://[0:0:0:0:0:0:0:1]/",
            "http://[::ffff:127.0.0.1]/",
            "http://[::ffff:7f00:1]/",
            "http://[::ffff:169.254.169.254]/",
            "http://[::127.0.0.1]/",
            "http://[64:ff9b::10.0.0.1]/",
            "http://[2002:7f00:1::]/",
            "http://[fe80::1]/",
            "http://[fd00:ec2::254]/",
            "http://[fc00::1]/",
            "http://[ff02::1]/",
            "http://[2001:db8::1]/",
            "http://[3fff::1]/",
            "http://[3fff:fff::1]/",
            "http://[2001::1]/",
            "http://[64:ff9b:1::1]/",
            "http://[100:0:0:1::1]/",
            "http://[5f00::1]/",
            "http://192.0.0.9/",
            "http://100.127.255.255/",
            "http://255.255.255.255/",
            "http://①②⑦.0.0.1/",
            "http://127。0。0。1/",
        ] {
            let e = ok(url).await.expect_err(url);
            assert!(e.contains("is not a fetchable URL"), "{url}: {e}");
            // Read as the address it spells, not refused for being unreadable.
            assert!(!e.contains("not an absolute URL"), "{url}: {e}");
        }
    }

    #[tokio::test]
    async fn schemes_credentials_names_and_resolution_are_checked() {
        let cases = [
            ("ftp://images.example.com/x", "scheme \"ftp\""),
            ("file:///etc/passwd", "scheme \"file\""),
            ("gopher://127.0.0.1:6379/_", "scheme \"gopher\""),
            ("//images.example.com/x", "not an absolute URL"),
            ("images.example.com/x", "not an absolute URL"),
            ("http://user:pw@images.example.com/", "credentials"),
            ("http://127.0.0.1:80@images.example.com/", "credentials"),
            ("http://[fe80::1%25eth0]/", "not an absolute URL"),
            ("http://localhost/", "localhost"),
            ("http://api.localhost./", "localhost"),
            (
                "http://metadata.google.internal/",
                "169.254.169.254, link-local",
            ),
            ("http://127.0.0.1.nip.io/", "127.0.0.1, loopback"),
            ("http://rebind.example.com/", "10.0.0.5, private"),
            ("http://unknown.example.com/", "does not resolve"),
            ("http://slow.example.com/", "did not resolve within 200 ms"),
        ];
        for (url, why) in cases {
            let e = ok(url).await.expect_err(url);
            assert!(e.contains(why), "{url}: {e}");
        }
    }

    #[tokio::test]
    async fn arguments_are_strings_or_arrays_of_strings() {
        let rules = [UrlArg {
            pointers: vec!["/urls".into(), "/one".into()],
        }];
        let t = Duration::from_millis(200);
        let good = serde_json::json!({"urls": ["https://images.example.com/a", "http://8.8.8.8/"], "one": "https://images.example.com/b"});
        assert_eq!(check_args(&rules, &good, &Fake, t).await, Ok(()));
        let absent = serde_json::json!({"other": "http://127.0.0.1/"});
        assert_eq!(check_args(&rules, &absent, &Fake, t).await, Ok(()));
        let bad =
            serde_json::json!({"urls": ["https://images.example.com/a", "http://127.0.0.1/"]});
        let e = check_args(&rules, &bad, &Fake, t).await.unwrap_err();
        assert!(e.starts_with("/urls: \"http://127.0.0.1/\""), "{e}");
        let wrong = serde_json::json!({"one": {"url": "x"}});
        assert!(check_args(&rules, &wrong, &Fake, t).await.is_err());
    }
}
