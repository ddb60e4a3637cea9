//! What `[[keys]]`/`[[tenants]]` `models` lists and `[server] trusted_proxies`
//! hold once parsed: model patterns (an alias, or a glob of `*` and `?`) and
//! the set of proxy addresses whose `x-forwarded-for` is believed.

use std::net::IpAddr;

/// One entry of a `models` list: a route alias as clients send it, or a
/// glob over aliases (`*`: any run of characters, `?`: one character).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ModelPattern {
    text: String,
    glob: bool,
}

impl ModelPattern {
    pub fn new(text: String) -> Self {
        let glob = text.contains(['*', '?']);
        Self { text, glob }
    }

    /// As written in the config.
    pub fn as_str(&self) -> &str {
        &self.text
    }

    pub fn matches(&self, alias: &str) -> bool {
        if self.glob {
            glob_matches(&self.text, alias)
        } else {
            self.text == alias
        }
    }
}

/// Whether `text` matches `pattern`, where `*` matches any run of characters
/// (none included) and `?` exactly one; every other character stands for
/// itself. The classic linear-space matcher: on a mismatch, the last `*`
/// takes one more character and matching resumes after it. Worst case
/// O(pattern × text), on strings a config and a model name bound.
pub fn glob_matches(pattern: &str, text: &str) -> bool {
    let (p, t) = (pattern.as_bytes(), text.as_bytes());
    let (mut pi, mut ti) = (0, 0);
    // After the last `*` seen: where the pattern resumes, and the text
    // position the star's match ends at so far.
    let mut star: Option<(usize, usize)> = None;
    while let Some(&tc) = t.get(ti) {
        match p.get(pi) {
            Some(b'*') => {
                pi += 1;
                star = Some((pi, ti));
            }
            Some(b'?') => {
                pi += 1;
                ti += char_len(tc);
            }
            Some(&pc) if pc == tc => {
                pi += 1;
                ti += 1;
            }
            _ => match star {
                Some((resume, end)) => {
                    let end = end + t.get(end).map_or(1, |&b| char_len(b));
                    star = Some((resume, end));
                    (pi, ti) = (resume, end);
                }
                None => return false,
            },
        }
    }
    p.get(pi..).unwrap_or_default().iter().all(|&c| c == b'*')
}

/// The length of the UTF-8 character that starts with `lead`. Positions
/// the matcher steps by character from are character starts: a literal
/// pattern character is matched whole before a `?` or `*` is reached.
fn char_len(lead: u8) -> usize {
    match lead {
        0xF0..=0xFF => 4,
        0xE0..=0xEF => 3,
        0xC0..=0xDF => 2,
        _ => 1,
    }
}

/// `[server] trusted_proxies`: the peers whose `x-forwarded-for` names the
/// client (each a network: a bare address is a network of one).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TrustedProxies(Vec<ipnet::IpNet>);

impl TrustedProxies {
    pub fn new(nets: Vec<ipnet::IpNet>) -> Self {
        Self(nets)
    }

    /// Parses `10.0.0.0/8`, `fd00::/8`, or a bare address (`127.0.0.1`,
    /// `::1`). Host bits under the prefix are ignored.
    pub fn parse_entry(text: &str) -> Option<ipnet::IpNet> {
        let text = text.trim();
        match text.parse::<ipnet::IpNet>() {
            Ok(net) => Some(net.trunc()),
            Err(_) => text.parse::<IpAddr>().ok().map(ipnet::IpNet::from),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        // A v4 client seen on a dual-stack socket is `::ffff:a.b.c.d`.
        let ip = ip.to_canonical();
        self.0.iter().any(|net| net.contains(&ip))
    }

    pub fn nets(&self) -> &[ipnet::IpNet] {
        &self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs() {
        #[rustfmt::skip]
        let table = [
            ("claude-*", "claude-3-opus", true),
            ("claude-*", "claude-", true),
            ("claude-*", "claude", false),
            ("claude-*", "my-claude-x", false),
            ("*", "", true),
            ("*", "anything", true),
            ("", "", true),
            ("", "x", false),
            ("gpt-?", "gpt-4", true),
            ("gpt-?", "gpt-40", false),
            ("gpt-?", "gpt-", false),
            ("*-mini", "gpt-4o-mini", true),
            ("*-mini", "gpt-4o-mini-2", false),
            ("a*b*c", "aXbYbZc", true),
            ("a*b*c", "aXbYbZ", false),
            ("a**c", "ac", true),
            ("*a*a*a*a*b", "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa", false),
            ("?", "é", true),
            ("??", "é", false),
            ("é*", "éclair", true),
            ("*é", "café", true),
            ("x?z", "x€z", true),
            ("fast", "fast", true),
            ("fast", "Fast", false),
        ];
        for (pattern, text, want) in table {
            assert_eq!(glob_matches(pattern, text), want, "{pattern:?} ~ {text:?}");
        }
    }

    #[test]
    fn exact_entries_do_not_glob() {
        let p = ModelPattern::new("fast".into());
        assert!(p.matches("fast"));
        assert!(!p.matches("faster"));
        let g = ModelPattern::new("fast*".into());
        assert!(g.matches("faster"));
    }

    #[test]
    fn trusted_proxies() {
        let nets = ["10.0.0.0/8", "127.0.0.1", "::1", "192.168.1.7/24"]
            .iter()
            .map(|t| TrustedProxies::parse_entry(t).unwrap())
            .collect();
        let t = TrustedProxies::new(nets);
        let has = |ip: &str| t.contains(ip.parse().unwrap());
        assert!(has("10.1.2.3"));
        assert!(has("127.0.0.1"));
        assert!(!has("127.0.0.2"));
        assert!(has("::1"));
        assert!(has("::ffff:10.9.9.9"), "v4-mapped peers are v4");
        assert!(has("192.168.1.200"), "host bits are ignored");
        assert!(!has("11.0.0.1"));
        for bad in ["10.0.0.0/33", "localhost", "", "10.0.0/8", "1.2.3.4:80"] {
            assert_eq!(TrustedProxies::parse_entry(bad), None, "{bad}");
        }
    }
}
