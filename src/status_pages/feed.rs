//! RSS 2.0 and Atom incident feeds: the generic fallback, for pages that
//! publish nothing else a machine can read (every Statuspage has
//! `history.rss`/`history.atom`; incident.io pages `feed.rss`/`feed.atom`).
//!
//! A feed says less than a status API, so the rule is deliberately simple:
//!
//! - an entry (`<item>` or `<entry>`) is **recent** when its date
//!   (`updated`, `published` or `pubDate`) is within [`RECENT`] of now;
//!   undated entries are ignored;
//! - a recent entry is **open** unless its title or text says `resolved`,
//!   `completed` or `postmortem` (Statuspage writes `<strong>Resolved</strong>`,
//!   incident.io `<b>Status: Resolved</b>`);
//! - an open entry concerns a watched component when its title or text
//!   mentions the component's name (without case); with none watched, every
//!   open entry concerns the page;
//! - its state is `down` when the text right after the component's name says
//!   `(Full outage)` or `(Major outage)` (incident.io lists affected
//!   components so), `degraded` for `(Partial outage)`/`(Degraded performance)`,
//!   `operational` for `(Operational)`; otherwise, `down` when the entry
//!   says "major outage" or "full outage" anywhere, else `degraded`.
//!
//! The XML is scanned, not validated: elements are found by name (CDATA and
//! the five XML entities and numeric references decoded), which is all these
//! flat feeds need.

use std::time::{Duration, SystemTime};

use super::{per_component, ReadError, Reading};
use crate::config::StatusFormat;
use crate::health::PageState;

/// How far back an entry counts.
pub const RECENT: Duration = Duration::from_secs(24 * 3600);

/// The name of the first element of an XML document (after the
/// declaration, comments and doctype).
pub fn root_element(text: &str) -> Option<&str> {
    let mut rest = text.trim_start();
    loop {
        if let Some(r) = rest.strip_prefix("<?") {
            rest = r.split_once("?>")?.1.trim_start();
        } else if let Some(r) = rest.strip_prefix("<!--") {
            rest = r.split_once("-->")?.1.trim_start();
        } else if let Some(r) = rest.strip_prefix("<!") {
            rest = r.split_once('>')?.1.trim_start();
        } else {
            let r = rest.strip_prefix('<')?;
            let end = r.find(|c: char| c.is_whitespace() || c == '>' || c == '/')?;
            return Some(&r[..end]);
        }
    }
}

/// One entry of a feed, as text.
#[derive(Debug)]
struct Entry {
    /// Title and body, tags stripped, lower case.
    text: String,
    date: Option<SystemTime>,
}

pub fn read(
    body: &[u8],
    format: StatusFormat,
    components: &[String],
    now: SystemTime,
) -> Result<Reading, ReadError> {
    let (name, root, entry_tag, body_tags, date_tags): (_, _, _, &[&str], &[&str]) = match format {
        StatusFormat::Atom => (
            "Atom feed",
            "feed",
            "entry",
            &["content", "summary"],
            &["updated", "published"],
        ),
        _ => (
            "RSS feed",
            "rss",
            "item",
            &["description", "content:encoded"],
            &["pubDate", "dc:date"],
        ),
    };
    let text = std::str::from_utf8(body).map_err(|_| ReadError::shape(name, "not UTF-8"))?;
    let text = text.trim_start_matches('\u{feff}');
    match root_element(text) {
        Some(r) if r == root || (root == "rss" && r.ends_with("RDF")) => {}
        Some(r) => return Err(ReadError::shape(name, format!("the root element is <{r}>"))),
        None => return Err(ReadError::shape(name, "no root element")),
    }
    let entries: Vec<Entry> = elements(text, entry_tag)
        .map(|block| {
            let title = first_child(block, &["title"]).unwrap_or_default();
            let body = first_child(block, body_tags).unwrap_or_default();
            Entry {
                text: format!("{} \n {}", plain(&title), plain(&body)).to_lowercase(),
                date: first_child(block, date_tags).and_then(|d| parse_date(d.trim())),
            }
        })
        .collect();
    let open: Vec<&Entry> = entries
        .iter()
        .filter(|e| {
            e.date
                .is_some_and(|d| now.duration_since(d).map_or(true, |age| age <= RECENT))
        })
        .filter(|e| {
            !["resolved", "completed", "postmortem"]
                .iter()
                .any(|w| e.text.contains(w))
        })
        .collect();
    if components.is_empty() {
        let worst = open
            .iter()
            .map(|e| entry_state(e, None))
            .max()
            .unwrap_or(PageState::Operational);
        return Ok(Reading::whole(worst));
    }
    let mut found = Vec::new();
    for e in &open {
        for c in components {
            let lower = c.trim().to_lowercase();
            if !lower.is_empty() && e.text.contains(&lower) {
                found.push((c, entry_state(e, Some(&lower))));
            }
        }
    }
    per_component(components, &found, true)
}

/// The state an open entry gives `component` (lower case), or the page.
fn entry_state(e: &Entry, component: Option<&str>) -> PageState {
    if let Some(c) = component {
        for (at, _) in e.text.match_indices(c) {
            let after = e.text[at + c.len()..].trim_start();
            let Some(inner) = after.strip_prefix('(') else {
                continue;
            };
            let said = inner.split(')').next().unwrap_or_default();
            let state = match said.trim() {
                "full outage" | "major outage" => PageState::Down,
                "partial outage" | "degraded performance" => PageState::Degraded,
                "operational" => PageState::Operational,
                _ => continue,
            };
            return state;
        }
    }
    if e.text.contains("major outage") || e.text.contains("full outage") {
        PageState::Down
    } else {
        PageState::Degraded
    }
}

/// The contents of every `<tag …>…</tag>` in `text`, in order.
fn elements<'a>(text: &'a str, tag: &'a str) -> impl Iterator<Item = &'a str> + 'a {
    let open = format!("<{tag}");
    let close = format!("</{tag}>");
    let mut rest = text;
    std::iter::from_fn(move || loop {
        let at = rest.find(&open)?;
        let after = &rest[at + open.len()..];
        // `<item>` or `<item attr…>`, not `<itemFoo>`.
        if !after.starts_with(|c: char| c == '>' || c == '/' || c.is_whitespace()) {
            rest = after;
            continue;
        }
        let tag_end = after.find('>')?;
        if after[..tag_end].ends_with('/') {
            rest = &after[tag_end + 1..];
            return Some("");
        }
        let content = &after[tag_end + 1..];
        let end = content.find(&close)?;
        rest = &content[end + close.len()..];
        return Some(&content[..end]);
    })
}

/// The decoded text of the first child named one of `tags` (in that order
/// of preference).
fn first_child(block: &str, tags: &[&str]) -> Option<String> {
    tags.iter()
        .find_map(|t| elements(block, t).next())
        .map(decode)
}

/// XML character data: CDATA sections as they are, entities decoded.
fn decode(raw: &str) -> String {
    let mut out = String::with_capacity(raw.len());
    let mut rest = raw;
    while let Some(at) = rest.find("<![CDATA[") {
        out.push_str(&unescape(&rest[..at]));
        let inner = &rest[at + 9..];
        let end = inner.find("]]>").unwrap_or(inner.len());
        out.push_str(&inner[..end]);
        rest = inner.get(end + 3..).unwrap_or_default();
    }
    out.push_str(&unescape(rest));
    out
}

/// The five XML entities and numeric character references (also HTML's
/// `&nbsp;`); anything else is kept as written.
fn unescape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(at) = rest.find('&') {
        out.push_str(&rest[..at]);
        let after = &rest[at + 1..];
        let Some(end) = after.find(';').filter(|e| *e <= 10) else {
            out.push('&');
            rest = after;
            continue;
        };
        let entity = &after[..end];
        let ch = match entity {
            "amp" => Some('&'),
            "lt" => Some('<'),
            "gt" => Some('>'),
            "quot" => Some('"'),
            "apos" => Some('\''),
            "nbsp" => Some(' '),
            _ => entity
                .strip_prefix("#x")
                .and_then(|h| u32::from_str_radix(h, 16).ok())
                .or_else(|| entity.strip_prefix('#').and_then(|d| d.parse().ok()))
                .and_then(char::from_u32),
        };
        match ch {
            Some(c) => {
                out.push(c);
                rest = &after[end + 1..];
            }
            None => {
                out.push('&');
                rest = after;
            }
        }
    }
    out.push_str(rest);
    out
}

/// HTML as text: tags become spaces, entities are decoded.
fn plain(html: &str) -> String {
    let mut out = String::with_capacity(html.len());
    let mut in_tag = false;
    for c in html.chars() {
        match c {
            '<' => in_tag = true,
            '>' if in_tag => {
                in_tag = false;
                out.push(' ');
            }
            _ if !in_tag => out.push(c),
            _ => {}
        }
    }
    let text = unescape(&out);
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// RFC 3339 (Atom) or RFC 2822 (RSS) date-time.
pub fn parse_date(s: &str) -> Option<SystemTime> {
    rfc3339(s).or_else(|| rfc2822(s))
}

fn rfc3339(s: &str) -> Option<SystemTime> {
    let b = s.as_bytes();
    if b.len() < 19 || b[4] != b'-' || b[7] != b'-' || !matches!(b[10], b'T' | b't' | b' ') {
        return None;
    }
    let num = |r: std::ops::Range<usize>| s.get(r)?.parse::<i64>().ok();
    let (y, mo, d) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let (h, mi, sec) = (num(11..13)?, num(14..16)?, num(17..19)?);
    let mut rest = &s[19..];
    if let Some(frac) = rest.strip_prefix('.') {
        let digits = frac
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(frac.len());
        rest = &frac[digits..];
    }
    let offset = match rest {
        "Z" | "z" => 0,
        _ => zone_offset(&rest.replace(':', ""))?,
    };
    to_time(y, mo, d, h, mi, sec, offset)
}

fn rfc2822(s: &str) -> Option<SystemTime> {
    let s = s.split_once(',').map_or(s, |(_, rest)| rest);
    let mut parts = s.split_whitespace();
    let d: i64 = parts.next()?.parse().ok()?;
    let month = parts.next()?.to_ascii_lowercase();
    let mo = [
        "jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec",
    ]
    .iter()
    .position(|m| month.starts_with(m))? as i64
        + 1;
    let mut y: i64 = parts.next()?.parse().ok()?;
    if y < 100 {
        y += if y < 50 { 2000 } else { 1900 };
    }
    let mut hms = parts.next()?.split(':');
    let h: i64 = hms.next()?.parse().ok()?;
    let mi: i64 = hms.next()?.parse().ok()?;
    let sec: i64 = hms.next().map_or(Some(0), |v| v.parse().ok())?;
    let offset = match parts.next().unwrap_or("GMT") {
        "GMT" | "UT" | "UTC" | "Z" => 0,
        "EST" => -5 * 3600,
        "EDT" => -4 * 3600,
        "CST" => -6 * 3600,
        "CDT" => -5 * 3600,
        "MST" => -7 * 3600,
        "MDT" => -6 * 3600,
        "PST" => -8 * 3600,
        "PDT" => -7 * 3600,
        zone => zone_offset(zone)?,
    };
    to_time(y, mo, d, h, mi, sec, offset)
}

/// `+hhmm` / `-hhmm` in seconds.
fn zone_offset(zone: &str) -> Option<i64> {
    let (sign, digits) = match zone.as_bytes().first()? {
        b'+' => (1, &zone[1..]),
        b'-' => (-1, &zone[1..]),
        _ => return None,
    };
    if digits.len() != 4 {
        return None;
    }
    let h: i64 = digits[..2].parse().ok()?;
    let m: i64 = digits[2..].parse().ok()?;
    Some(sign * (h * 3600 + m * 60))
}

/// A UTC civil time minus `offset` seconds (days from civil: Howard
/// Hinnant's algorithm).
fn to_time(y: i64, mo: i64, d: i64, h: i64, mi: i64, s: i64, offset: i64) -> Option<SystemTime> {
    if !(1..=12).contains(&mo) || !(1..=31).contains(&d) || h > 23 || mi > 59 || s > 60 {
        return None;
    }
    let y = if mo <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (mo + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    let secs = days * 86_400 + h * 3600 + mi * 60 + s - offset;
    let secs = u64::try_from(secs).ok()?;
    SystemTime::UNIX_EPOCH.checked_add(Duration::from_secs(secs))
}

#[cfg(test)]
mod tests {
    use super::*;

    const RSS: &[u8] = include_bytes!("../../tests/fixtures/statuspages/statuspage_history.rss");
    const ATOM: &[u8] = include_bytes!("../../tests/fixtures/statuspages/incident_io_feed.atom");

    fn at(s: &str) -> SystemTime {
        parse_date(s).unwrap()
    }

    fn worst(
        body: &[u8],
        format: StatusFormat,
        c: &[&str],
        now: &str,
    ) -> Result<PageState, ReadError> {
        let c: Vec<String> = c.iter().map(|s| (*s).to_owned()).collect();
        read(body, format, &c, at(now)).map(|r| r.worst())
    }

    #[test]
    fn dates_in_both_formats() {
        let t = at("2025-06-10T12:00:00Z");
        assert_eq!(
            t.duration_since(SystemTime::UNIX_EPOCH).unwrap().as_secs(),
            1_749_556_800
        );
        assert_eq!(at("2025-06-10T14:00:00.123+02:00"), t);
        assert_eq!(at("Tue, 10 Jun 2025 12:00:00 +0000"), t);
        assert_eq!(at("Tue, 10 Jun 2025 12:00:00 GMT"), t);
        assert_eq!(at("10 Jun 2025 05:00:00 PDT"), t);
        assert!(parse_date("yesterday").is_none());
    }

    #[test]
    fn an_open_recent_rss_item_counts_and_resolved_or_old_ones_do_not() {
        // The fixture: an open "Elevated errors on Claude API" (major outage)
        // at 2025-06-10T11:50Z, a resolved one, and an old open one.
        let now = "2025-06-10T12:00:00Z";
        assert_eq!(worst(RSS, StatusFormat::Rss, &[], now), Ok(PageState::Down));
        assert_eq!(
            worst(RSS, StatusFormat::Rss, &["Claude API"], now),
            Ok(PageState::Down)
        );
        assert_eq!(
            worst(RSS, StatusFormat::Rss, &["Console"], now),
            Ok(PageState::Operational),
            "its incident is resolved"
        );
        assert_eq!(
            worst(
                RSS,
                StatusFormat::Rss,
                &["Claude API"],
                "2025-06-12T12:00:00Z"
            ),
            Ok(PageState::Operational),
            "two days later the open entry is out of the window"
        );
    }

    #[test]
    fn atom_reads_incident_io_component_lists() {
        let now = "2025-06-10T12:00:00Z";
        assert_eq!(
            worst(ATOM, StatusFormat::Atom, &["Conversations"], now),
            Ok(PageState::Down)
        );
        assert_eq!(
            worst(ATOM, StatusFormat::Atom, &["Login"], now),
            Ok(PageState::Degraded)
        );
        assert_eq!(
            worst(ATOM, StatusFormat::Atom, &["Files"], now),
            Ok(PageState::Operational),
            "its entry is resolved"
        );
        assert_eq!(
            worst(ATOM, StatusFormat::Atom, &[], now),
            Ok(PageState::Down)
        );
    }

    #[test]
    fn the_wrong_root_is_refused() {
        assert!(worst(ATOM, StatusFormat::Rss, &[], "2025-06-10T12:00:00Z").is_err());
        assert!(worst(RSS, StatusFormat::Atom, &[], "2025-06-10T12:00:00Z").is_err());
        assert!(worst(
            b"<html></html>",
            StatusFormat::Rss,
            &[],
            "2025-06-10T12:00:00Z"
        )
        .is_err());
    }

    #[test]
    fn markup_is_decoded() {
        assert_eq!(
            decode("a &amp; <![CDATA[<b>x</b>]]> &#65;&#x42;"),
            "a & <b>x</b> AB"
        );
        assert_eq!(
            plain("<p><b>Status: Resolved</b><br/>It&apos;s  fine</p>"),
            "Status: Resolved It's fine"
        );
        assert_eq!(
            root_element("<?xml version=\"1.0\"?>\n<!-- c --><rss version=\"2.0\">"),
            Some("rss")
        );
    }
}
