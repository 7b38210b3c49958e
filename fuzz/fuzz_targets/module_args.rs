//! Module arguments: `Settings::from_module_args` on NUL- or
//! whitespace-separated tokens never panics; when it accepts them, every
//! setting's `get` goes back through `set` unchanged, no `get` depends on
//! the password, and `redact_url` hides the password that tokio-postgres
//! (which crates/pg hands `pg_url` to) would read from a URL.
//!
//! Inputs naming `pg_password_file` are skipped: setting it reads a file.
#![no_main]

use libfuzzer_sys::fuzz_target;
use pgcache_core::settings::{redact_url, NAMES, REDACTED};
use pgcache_core::Settings;

/// `redact_url` never panics, is idempotent, and leaves no password in
/// the URLs `pg_url` accepts.
fn check_url(url: &str) {
    let shown = redact_url(url);
    assert_eq!(redact_url(&shown), shown, "not idempotent for {url:?}");
    if !(url.starts_with("postgresql://") || url.starts_with("postgres://")) {
        return;
    }
    // What the consumer reads from the redacted text is no password.
    if let Ok(cfg) = shown.parse::<tokio_postgres::Config>() {
        if let Some(pw) = cfg.get_password() {
            assert!(
                pw == REDACTED.as_bytes() || pw.is_empty(),
                "{url:?} shown as {shown:?}, which carries password {:?}",
                String::from_utf8_lossy(pw)
            );
        }
    }
    // And the password the consumer reads from the original is gone.
    let Ok(cfg) = url.parse::<tokio_postgres::Config>() else {
        return;
    };
    let Some(pw) = cfg.get_password().and_then(|p| std::str::from_utf8(p).ok()) else {
        return;
    };
    // Only a password that occurs once, as typed (no percent-encoding), is
    // surely the password wherever it occurs; short ones occur by chance.
    if pw.chars().count() < 4
        || pw.contains('\0')
        || url.contains('%')
        || url.matches(pw).count() != 1
    {
        return;
    }
    let shown_parts = shown.replace(REDACTED, "\0");
    assert!(
        !shown_parts.contains(pw),
        "{url:?} shown as {shown:?} still holds password {pw:?}"
    );
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if text.contains("pg_password_file") {
        return;
    }
    let tokens: Vec<&str> = if text.contains('\0') {
        text.split('\0').collect()
    } else {
        text.split_whitespace().collect()
    };
    check_url(text);
    for t in &tokens {
        check_url(t);
    }

    let Ok(s) = Settings::from_module_args(&tokens) else {
        return;
    };
    // The same settings with another password.
    let mut other = s.clone();
    let pw = if s.pg_password == "fuzz-a" {
        "fuzz-b"
    } else {
        "fuzz-a"
    };
    other.set("pg_password", pw).unwrap();

    for &name in NAMES {
        let shown = s
            .get(name)
            .unwrap_or_else(|| panic!("{name} has no getter"));
        if name == "pg_password" {
            let want = if s.pg_password.is_empty() {
                ""
            } else {
                REDACTED
            };
            assert_eq!(shown, want);
        } else {
            assert_eq!(
                other.get(name).as_deref(),
                Some(shown.as_str()),
                "{name} shows the password"
            );
        }
        // CONFIG GET's answer is a valid CONFIG SET, which changes nothing.
        let mut t = s.clone();
        t.set(name, &shown)
            .unwrap_or_else(|e| panic!("{name}: get gave {shown:?}, set refuses it: {e}"));
        assert_eq!(
            t.get(name).as_deref(),
            Some(shown.as_str()),
            "{name} does not round-trip"
        );
        let redacted = (name == "pg_password" && !s.pg_password.is_empty())
            || (name == "pg_url" && shown != s.pg_url);
        if !redacted {
            assert_eq!(t, s, "{name}: set(get()) changed the settings");
        }
    }
});
