//! The human log format, with the request line written by hand.
//!
//! Every request writes one line, so its cost is paid on every request:
//! through `tracing-subscriber`'s general formatter it took about an eighth
//! of the instructions of a whole proxied request (each field went through
//! `Debug` and a styling wrapper, the timestamp through a calendar
//! conversion). The request line (target `detour::request`, no span) is
//! written here instead, byte for byte as the general formatter writes it:
//!
//! `2026-12-03T12:56:42.990368Z  INFO detour::request: request request_id=req_.. format="openai" status=200 latency_ms=1.004 ...`
//!
//! Every other line, and every line when colours are on, goes through the
//! general formatter unchanged.

use std::cell::RefCell;
use std::fmt::{self, Write as _};
use std::time::{SystemTime, UNIX_EPOCH};

use tracing::field::{Field, Visit};
use tracing::{Event, Subscriber};
use tracing_subscriber::fmt::format::{Format, Full, Writer};
use tracing_subscriber::fmt::time::SystemTime as Timer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::registry::LookupSpan;

/// The target of the request line (`telemetry::RequestRecord::write`).
pub const REQUEST_TARGET: &str = "detour::request";

/// The human format: the request line by hand, the rest as `fallback` does.
pub struct Human {
    fallback: Format<Full, Timer>,
}

impl Human {
    pub fn new(ansi: bool) -> Self {
        Self {
            fallback: Format::default().with_ansi(ansi),
        }
    }
}

impl<S, N> FormatEvent<S, N> for Human
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        let meta = event.metadata();
        if writer.has_ansi_escapes()
            || meta.target() != REQUEST_TARGET
            || ctx.lookup_current().is_some()
        {
            return self.fallback.format_event(ctx, writer, event);
        }
        write_timestamp(&mut writer, SystemTime::now())?;
        write!(writer, " {:>5} {}: ", meta.level(), meta.target())?;
        let mut fields = Fields {
            out: &mut writer,
            result: Ok(()),
        };
        event.record(&mut fields);
        fields.result?;
        writer.write_str("\n")
    }
}

/// One value of the request line, shown as tracing's visitor shows it.
#[derive(Debug, Clone, Copy)]
pub enum Value<'a> {
    /// A string field: quoted (`format="openai"`).
    Str(&'a str),
    /// A field logged with `%`: as it is (`request_id=req_..`).
    Display(&'a str),
    U64(u64),
    /// A duration in whole microseconds, shown in milliseconds as tracing
    /// shows the `f64` `micros / 1e3` (`0.326`, `1.5`, `2.0`).
    Millis(u64),
    Bool(bool),
}

/// The request line, formatted into `out` without tracing: what [`Human`]
/// writes for a `tracing::info!(target: REQUEST_TARGET, ..fields, message)`
/// outside any span. A `None` is left out, as tracing leaves out an
/// `Option`'s `None`. `telemetry::RequestRecord::write` uses it when the
/// human format writes to a file (no colours); tracing's field visitors
/// cost more than the rest of the line.
pub fn request_line(
    out: &mut String,
    now: SystemTime,
    message: &str,
    fields: &[(&str, Option<Value<'_>>)],
) -> fmt::Result {
    write_timestamp(out, now)?;
    out.push_str("  INFO ");
    out.push_str(REQUEST_TARGET);
    out.push_str(": ");
    out.push_str(message);
    for (name, value) in fields {
        let Some(value) = value else { continue };
        out.push(' ');
        out.push_str(name);
        out.push('=');
        match *value {
            Value::Str(v) => write_quoted(out, v)?,
            Value::Display(v) => out.push_str(v),
            Value::U64(v) => out.push_str(itoa::Buffer::new().format(v)),
            Value::Millis(micros) => write_millis(out, micros)?,
            Value::Bool(v) => out.push_str(if v { "true" } else { "false" }),
        }
    }
    out.push('\n');
    Ok(())
}

/// `micros / 1e3` as `f64`'s `Debug` writes it, from the integer: the
/// shortest form that reads back as the same `f64` is the number's three
/// decimals without their trailing zeros (at least one), as long as it has
/// at most 15 significant digits (any such decimal reads back as itself).
/// Past that (31 years), the `f64` is written.
fn write_millis(out: &mut String, micros: u64) -> fmt::Result {
    if micros >= 1_000_000_000_000_000 {
        return write!(out, "{:?}", micros as f64 / 1e3);
    }
    out.push_str(itoa::Buffer::new().format(micros / 1000));
    out.push('.');
    let frac = micros % 1000;
    let digits = [frac / 100, frac / 10 % 10, frac % 10].map(|d| char::from(b'0' + d as u8));
    let shown = match frac {
        _ if frac.is_multiple_of(100) => 1,
        _ if frac.is_multiple_of(10) => 2,
        _ => 3,
    };
    out.extend(&digits[..shown]);
    Ok(())
}

/// Writes the fields as `tracing-subscriber`'s default visitor does: the
/// message as it is, then ` name=value` with values as `Debug` shows them.
struct Fields<'a, 'w> {
    out: &'a mut Writer<'w>,
    result: fmt::Result,
}

impl Fields<'_, '_> {
    // `write_str`, not `write_char`: the writer is a `dyn Write`, whose
    // `write_char` encodes the char and then calls `write_str` anyway.
    fn name(&mut self, field: &Field) -> fmt::Result {
        self.out.write_str(" ")?;
        self.out.write_str(field.name())?;
        self.out.write_str("=")
    }
}

impl Visit for Fields<'_, '_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        if self.result.is_err() {
            return;
        }
        self.result = if field.name() == "message" {
            self.out.write_str(value)
        } else {
            self.name(field)
                .and_then(|()| write_quoted(self.out, value))
        };
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        if self.result.is_err() {
            return;
        }
        self.result = self.name(field).and_then(|()| {
            let mut buf = itoa::Buffer::new();
            self.out.write_str(buf.format(value))
        });
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        if self.result.is_err() {
            return;
        }
        self.result = self.name(field).and_then(|()| {
            let mut buf = itoa::Buffer::new();
            self.out.write_str(buf.format(value))
        });
    }

    fn record_bool(&mut self, field: &Field, value: bool) {
        if self.result.is_err() {
            return;
        }
        self.result = self
            .name(field)
            .and_then(|()| self.out.write_str(if value { "true" } else { "false" }));
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        if self.result.is_err() {
            return;
        }
        self.result = if field.name() == "message" {
            write!(self.out, "{value:?}")
        } else {
            self.name(field)
                .and_then(|()| write!(self.out, "{value:?}"))
        };
    }
}

/// A string as `Debug` writes it: quoted, escaped. Names and ids are plain
/// ASCII, written as they are; anything else goes through `Debug`.
fn write_quoted(out: &mut impl fmt::Write, value: &str) -> fmt::Result {
    let plain = value
        .bytes()
        .all(|b| (0x20..0x7f).contains(&b) && b != b'"' && b != b'\\');
    if !plain {
        return write!(out, "{value:?}");
    }
    out.write_str("\"")?;
    out.write_str(value)?;
    out.write_str("\"")
}

thread_local! {
    /// The last second formatted on this thread and its text
    /// (`2026-12-03T12:56:42`): the calendar is worked out once a second.
    static SECOND: RefCell<(u64, String)> = const { RefCell::new((u64::MAX, String::new())) };
}

/// `2026-12-03T12:56:42.990368Z`, as `tracing-subscriber`'s timer writes it.
fn write_timestamp(out: &mut impl fmt::Write, now: SystemTime) -> fmt::Result {
    let since = now.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = since.as_secs();
    SECOND.with(|cell| {
        let mut cached = cell.borrow_mut();
        if cached.0 != secs {
            cached.1.clear();
            push_date_time(&mut cached.1, secs);
            cached.0 = secs;
        }
        out.write_str(&cached.1)
    })?;
    // `.{:06}Z` by hand: the formatting machinery costs more than the line's
    // other numbers together.
    let mut fraction = *b".000000Z";
    let mut micros = since.subsec_micros();
    for digit in fraction[1..7].iter_mut().rev() {
        *digit = b'0' + (micros % 10) as u8;
        micros /= 10;
    }
    out.write_str(std::str::from_utf8(&fraction).map_err(|_| fmt::Error)?)
}

/// `YYYY-MM-DDTHH:MM:SS` (UTC) for seconds since the epoch: days to a civil
/// date by Howard Hinnant's `civil_from_days`.
fn push_date_time(out: &mut String, secs: u64) {
    let days = secs / 86_400;
    let rem = secs % 86_400;
    let (h, m, s) = (rem / 3600, rem % 3600 / 60, rem % 60);
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + u64::from(month <= 2);
    let _ = write!(out, "{year:04}-{month:02}-{d:02}T{h:02}:{m:02}:{s:02}");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates_are_the_calendars() {
        let cases = [
            (0, "1970-01-01T00:00:00"),
            (951_782_400, "2000-02-29T00:00:00"),
            (1_764_766_602, "2025-12-03T12:56:42"),
            (1_709_251_199, "2024-02-29T23:59:59"),
            (4_102_444_800, "2100-01-01T00:00:00"),
        ];
        for (secs, text) in cases {
            let mut out = String::new();
            push_date_time(&mut out, secs);
            assert_eq!(out, text, "{secs}");
        }
    }

    #[test]
    fn timestamps_carry_six_digits_of_microseconds() {
        for micros in [0, 1, 9, 10, 99_999, 123_456, 999_999] {
            let at = UNIX_EPOCH + std::time::Duration::new(1_764_766_602, micros * 1000 + 999);
            let mut out = String::new();
            write_timestamp(&mut out, at).unwrap();
            assert_eq!(out, format!("2025-12-03T12:56:42.{micros:06}Z"));
        }
    }

    // A test's log sink: a lock is fine here.
    #[allow(clippy::disallowed_types)]
    #[derive(Clone, Default)]
    struct Sink(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

    impl std::io::Write for Sink {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Sink {
        type Writer = Sink;
        fn make_writer(&'a self) -> Sink {
            self.clone()
        }
    }

    /// What `emit` logs, formatted by [`Human`] (`by_hand`) or by the
    /// general formatter, without the timestamp (it differs run to run).
    fn logged(by_hand: bool, emit: impl Fn()) -> String {
        let sink = Sink::default();
        let builder = tracing_subscriber::fmt()
            .with_ansi(false)
            .with_writer(sink.clone());
        if by_hand {
            let sub = builder.event_format(Human::new(false)).finish();
            tracing::subscriber::with_default(sub, emit);
        } else {
            tracing::subscriber::with_default(builder.finish(), emit);
        }
        let text = String::from_utf8(sink.0.lock().unwrap().clone()).unwrap();
        text.split_once('Z').unwrap().1.to_owned()
    }

    /// The request line written by hand is the general formatter's, byte for
    /// byte, apart from the timestamp's digits.
    #[test]
    fn the_request_line_is_what_the_general_formatter_writes() {
        let emit = || {
            tracing::info!(
                target: "detour::request",
                request_id = %"req_1",
                format = "openai",
                tenant = Some("t \"q\" é"),
                route = None::<&str>,
                status = 200u16,
                attempts = 1u32,
                stream = false,
                latency_ms = 1.0f64,
                ttfb_ms = Some(0.25f64),
                delta = -3i64,
                "request"
            );
        };
        let general = logged(false, emit);
        assert!(general.contains("request_id=req_1"), "{general}");
        assert_eq!(logged(true, emit), general);
    }

    /// Milliseconds written from whole microseconds read as the `f64`
    /// tracing would show.
    #[test]
    fn milliseconds_read_as_tracing_shows_them() {
        let mut rng = fastrand::Rng::with_seed(7);
        let edges = [
            0, 1, 9, 10, 99, 100, 101, 110, 999, 1000, 1001, 1010, 1100, 1500, 123_456,
        ];
        let far = [
            999_999_999_999_999,
            1_000_000_000_000_000,
            (1 << 53) - 1,
            u64::MAX,
        ];
        let random = (0..100_000).map(|_| {
            let bits = rng.u32(1..64);
            rng.u64(..1 << bits)
        });
        for micros in edges.into_iter().chain(far).chain(random) {
            let mut out = String::new();
            write_millis(&mut out, micros).unwrap();
            assert_eq!(out, format!("{:?}", micros as f64 / 1e3), "{micros}");
        }
    }

    /// A record's line written straight to the log writer is the line its
    /// tracing event gets from the formatter, field for field.
    #[test]
    fn a_record_written_directly_is_its_tracing_line() {
        use crate::protocol::chat::ClientFormat;
        use crate::telemetry::{Outcome, RequestRecord};

        let mut full = RequestRecord::new("req_9".into(), ClientFormat::Anthropic, "messages");
        full.tenant = Some("acme \"eu\"".into());
        full.route = Some("fast".into());
        full.provider = Some("p1".into());
        full.model = Some("m".into());
        full.status = 200;
        full.attempts = 2;
        full.stream = true;
        full.usage = Some(crate::protocol::openai::Usage {
            prompt_tokens: 12,
            completion_tokens: 34,
            ..Default::default()
        });
        full.outcome = Outcome::Ok;
        full.continued_by = Some("p2".into());
        let bare = RequestRecord::new("req_0".into(), ClientFormat::OpenAi, "chat_completions");
        for (record, ttfb) in [(&full, Some(250)), (&bare, None)] {
            let through_tracing = logged(true, || record.log_line(1500, ttfb));
            let mut direct = String::new();
            let fields = record.line_fields(1500, ttfb);
            request_line(&mut direct, SystemTime::now(), "request", &fields).unwrap();
            let direct = direct.split_once('Z').unwrap().1;
            assert_eq!(direct, through_tracing);
        }
    }
}
