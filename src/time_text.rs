//! Time text in configs: RFC 3339, or a date meaning midnight UTC.

use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

/// RFC 3339 text of a time (UTC).
pub fn format_time(t: OffsetDateTime) -> String {
    t.to_offset(time::UtcOffset::UTC)
        .format(&Rfc3339)
        .unwrap_or_else(|_| t.unix_timestamp().to_string())
}

/// Parse an RFC 3339 time (`2026-02-09T00:00:00Z`) or a date (`2026-02-09`,
/// meaning midnight UTC).
///
/// # Errors
/// A message naming the accepted forms.
pub fn parse_time(text: &str) -> Result<OffsetDateTime, String> {
    if let Ok(t) = OffsetDateTime::parse(text, &Rfc3339) {
        return Ok(t);
    }
    let date_fmt = time::macros::format_description!("[year]-[month]-[day]");
    time::Date::parse(text, &date_fmt)
        .map(|d| d.midnight().assume_utc())
        .map_err(|_| format!("{text:?} is not an RFC 3339 time (2026-02-09T00:00:00Z) or a date (2026-02-09)"))
}
