//! The app manifest, `paddock.toml`: parsed and validated once into a [`Manifest`].
//!
//! Unknown keys are refused rather than ignored: a typo such as `rout = "/x"` in a production
//! manifest must fail loudly at upload, not silently route the app somewhere else.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::route::validate_route;

/// Default limit on one linear memory of an app instance.
pub const DEFAULT_MEMORY_MIB: u32 = 64;
/// Largest memory limit a manifest may ask for (the front-end's instance pool is sized for it).
pub const MAX_MEMORY_MIB: u32 = 1024;
/// Default wall-clock limit of one request.
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// Largest wall-clock limit of one request a manifest may ask for.
pub const MAX_REQUEST_TIMEOUT: Duration = Duration::from_secs(3600);
/// Default limit on a request's body.
pub const DEFAULT_REQUEST_BODY_MIB: u32 = 16;
/// Largest request body limit a manifest may ask for.
pub const MAX_REQUEST_BODY_MIB: u32 = 4096;
/// The zone of apps and servers that name none.
pub const DEFAULT_ZONE: &str = "default";

/// A validated app manifest.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    /// `[a-z0-9-]`, 1–63 characters, unique in the farm.
    pub name: String,
    /// The version as written; `None` means "the component's content hash" (see [`Manifest::version_for`]).
    pub version: Option<String>,
    /// File name of the component inside the package, relative to `paddock.toml`.
    pub component: String,
    /// Path prefix the app answers under.
    pub route: String,
    pub zone: String,
    /// Path a deployment requests to check a new version before users see it.
    pub smoke: Option<String>,
    pub limits: Limits,
    pub timers: Vec<Timer>,
    /// Values the app reads at run time, as environment variables.
    pub config: BTreeMap<String, String>,
}

/// Resource limits of every instance of the app.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Limits {
    /// Limit of all the linear memories of an instance together, in MiB.
    pub memory_mib: u32,
    /// Wall-clock limit of one request, from its arrival to the end of its response body.
    #[serde(with = "humantime_serde")]
    pub request_timeout: Duration,
    /// How long a user's session lives unused before it is gone with its values.
    #[serde(default = "default_session_idle", with = "humantime_serde")]
    pub session_idle: Duration,
    /// Largest request body the front-end hands the app, in MiB: a larger one is answered 413
    /// (before the app runs when its `Content-Length` says so; else the app's read past it
    /// fails).
    #[serde(default = "default_request_body_mib")]
    pub request_body_mib: u32,
}

fn default_request_body_mib() -> u32 {
    DEFAULT_REQUEST_BODY_MIB
}

impl Limits {
    /// [`Limits::request_body_mib`] in bytes.
    pub fn request_body_bytes(&self) -> u64 {
        u64::from(self.request_body_mib) << 20
    }
}

fn default_session_idle() -> Duration {
    crate::data::DEFAULT_SESSION_IDLE
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            memory_mib: DEFAULT_MEMORY_MIB,
            request_timeout: DEFAULT_REQUEST_TIMEOUT,
            session_idle: crate::data::DEFAULT_SESSION_IDLE,
            request_body_mib: DEFAULT_REQUEST_BODY_MIB,
        }
    }
}

/// A timer declared by the app (`[[timer]]`): the scheduler invokes `path` on each tick.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Timer {
    pub name: String,
    pub schedule: TimerSchedule,
    pub path: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TimerSchedule {
    /// A cron expression, as written.
    Cron(String),
    #[serde(with = "humantime_serde")]
    Every(Duration),
}

/// Most `[config]` entries an app may have, and their largest total size (keys and values).
pub const MAX_CONFIG_ENTRIES: usize = 100;
pub const MAX_CONFIG_BYTES: usize = 64 * 1024;

/// The longest `every` a timer may have (366 days); a yearly run takes a cron schedule.
pub const LONGEST_EVERY: Duration = Duration::from_secs(366 * 24 * 3600);

impl TimerSchedule {
    /// The first tick strictly after `after_ms` (milliseconds since the Unix epoch, UTC).
    /// `Every` ticks are counted from `anchor_ms` (the timer's first tick). `None` when a cron
    /// expression matches no time to come.
    pub fn next_after(&self, after_ms: i64, anchor_ms: i64) -> Option<i64> {
        match self {
            TimerSchedule::Every(every) => {
                let every = i64::try_from(every.as_millis()).ok()?.max(1);
                if after_ms < anchor_ms {
                    return Some(anchor_ms);
                }
                let periods = after_ms.checked_sub(anchor_ms)? / every + 1;
                anchor_ms.checked_add(periods.checked_mul(every)?)
            }
            TimerSchedule::Cron(expr) => {
                let cron = <croner::Cron as std::str::FromStr>::from_str(expr).ok()?;
                let after = chrono::DateTime::<chrono::Utc>::from_timestamp_millis(after_ms)?;
                let next = cron.find_next_occurrence(&after, false).ok()?;
                Some(next.timestamp_millis())
            }
        }
    }
}

/// Why a manifest was refused. The message names the field and what to write instead.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum ManifestError {
    #[error("paddock.toml is not valid: {0}")]
    Syntax(String),
    #[error("paddock.toml: field `{field}` {problem}")]
    Field {
        field: &'static str,
        problem: String,
    },
}

fn field(field: &'static str, problem: impl Into<String>) -> ManifestError {
    ManifestError::Field {
        field,
        problem: problem.into(),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawManifest {
    name: String,
    version: Option<String>,
    component: String,
    route: Option<String>,
    zone: Option<String>,
    smoke: Option<String>,
    #[serde(default)]
    limits: RawLimits,
    #[serde(default, rename = "timer")]
    timers: Vec<RawTimer>,
    #[serde(default)]
    config: BTreeMap<String, String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawLimits {
    memory_mib: Option<u32>,
    #[serde(default, with = "humantime_serde")]
    request_timeout: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    session_idle: Option<Duration>,
    request_body_mib: Option<u32>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTimer {
    name: String,
    schedule: Option<String>,
    #[serde(default, with = "humantime_serde")]
    every: Option<Duration>,
    path: String,
}

impl Manifest {
    /// Parses and validates the text of a `paddock.toml`.
    pub fn from_toml(text: &str) -> Result<Manifest, ManifestError> {
        let raw: RawManifest = toml::from_str(text).map_err(|e| syntax_error(text, &e))?;

        if !is_valid_name(&raw.name) {
            return Err(field(
                "name",
                format!(
                    "is {:?}: use 1 to 63 of a-z, 0-9 and '-', not starting or ending with '-'",
                    raw.name
                ),
            ));
        }
        if let Some(version) = &raw.version
            && !is_valid_version(version)
        {
            return Err(field(
                "version",
                format!(
                    "is {version:?}: use 1 to 64 of A-Z, a-z, 0-9, '.', '_', '+' and '-' (e.g. \"1.4.0\")"
                ),
            ));
        }
        if raw.component.is_empty()
            || raw.component.contains(['/', '\\'])
            || raw.component.starts_with('.')
        {
            return Err(field(
                "component",
                format!(
                    "is {:?}: name a file beside paddock.toml, e.g. \"{}.wasm\"",
                    raw.component, raw.name
                ),
            ));
        }
        let route = raw.route.unwrap_or_else(|| format!("/{}", raw.name));
        validate_route(&route).map_err(|p| field("route", format!("is {route:?}: {p}")))?;
        let zone = raw.zone.unwrap_or_else(|| DEFAULT_ZONE.to_string());
        if !is_valid_name(&zone) {
            return Err(field(
                "zone",
                format!("is {zone:?}: use 1 to 63 of a-z, 0-9 and '-'"),
            ));
        }
        if let Some(smoke) = &raw.smoke
            && !crate::route_matches(&route, path_of(smoke))
        {
            return Err(field(
                "smoke",
                format!("is {smoke:?}: it must be a path under the app's route {route:?}"),
            ));
        }

        let limits = Limits {
            memory_mib: raw.limits.memory_mib.unwrap_or(DEFAULT_MEMORY_MIB),
            request_timeout: raw
                .limits
                .request_timeout
                .unwrap_or(DEFAULT_REQUEST_TIMEOUT),
            session_idle: raw
                .limits
                .session_idle
                .unwrap_or(crate::data::DEFAULT_SESSION_IDLE),
            request_body_mib: raw
                .limits
                .request_body_mib
                .unwrap_or(DEFAULT_REQUEST_BODY_MIB),
        };
        if limits.request_body_mib == 0 || limits.request_body_mib > MAX_REQUEST_BODY_MIB {
            return Err(field(
                "limits.request_body_mib",
                format!(
                    "is {}: use 1 to {MAX_REQUEST_BODY_MIB} (MiB)",
                    limits.request_body_mib
                ),
            ));
        }
        if limits.memory_mib == 0 || limits.memory_mib > MAX_MEMORY_MIB {
            return Err(field(
                "limits.memory_mib",
                format!("is {}: use 1 to {MAX_MEMORY_MIB} (MiB)", limits.memory_mib),
            ));
        }
        if limits.request_timeout.is_zero() || limits.request_timeout > MAX_REQUEST_TIMEOUT {
            return Err(field(
                "limits.request_timeout",
                format!(
                    "is {}: use a duration from 1ms to 1h, e.g. \"30s\"",
                    humantime::format_duration(limits.request_timeout)
                ),
            ));
        }
        if limits.session_idle < Duration::from_secs(1)
            || limits.session_idle > Duration::from_secs(366 * 24 * 3600)
        {
            return Err(field(
                "limits.session_idle",
                format!(
                    "is {}: use a duration from 1s to 366 days, e.g. \"30m\"",
                    humantime::format_duration(limits.session_idle)
                ),
            ));
        }

        let mut timers = Vec::with_capacity(raw.timers.len());
        for t in raw.timers {
            if !is_valid_name(&t.name) || timers.iter().any(|x: &Timer| x.name == t.name) {
                return Err(field(
                    "timer.name",
                    format!("is {:?}: use a unique name of a-z, 0-9 and '-'", t.name),
                ));
            }
            let schedule = match (t.schedule, t.every) {
                (Some(cron), None) => {
                    if let Err(e) = <croner::Cron as std::str::FromStr>::from_str(&cron) {
                        return Err(field(
                            "timer.schedule",
                            format!(
                                "of timer {:?} is {cron:?}, not a cron expression ({e}); write e.g. \"0 2 * * *\" (02:00 UTC daily) or use `every = \"30s\"`",
                                t.name
                            ),
                        ));
                    }
                    TimerSchedule::Cron(cron)
                }
                (None, Some(every)) if every > LONGEST_EVERY => {
                    return Err(field(
                        "timer.every",
                        format!(
                            "of timer {:?} is longer than a year (366 days); for a yearly run use a cron `schedule` such as \"0 2 1 1 *\"",
                            t.name
                        ),
                    ));
                }
                (None, Some(every)) if !every.is_zero() => TimerSchedule::Every(every),
                _ => {
                    return Err(field(
                        "timer",
                        format!(
                            "{:?} needs exactly one of `schedule` (cron) or `every` (e.g. \"30s\")",
                            t.name
                        ),
                    ));
                }
            };
            if !t.path.starts_with('/') || !t.path.chars().all(|c| c.is_ascii_graphic()) {
                return Err(field(
                    "timer.path",
                    format!(
                        "of timer {:?} is {:?}: write a URL path starting with '/', without spaces (percent-encode them)",
                        t.name, t.path
                    ),
                ));
            }
            if !crate::route_matches(&route, path_of(&t.path)) {
                return Err(field(
                    "timer.path",
                    format!(
                        "of timer {:?} is {:?}: it must be under the app's route {route:?}",
                        t.name, t.path
                    ),
                ));
            }
            timers.push(Timer {
                name: t.name,
                schedule,
                path: t.path,
            });
        }

        check_config(&raw.config)?;

        Ok(Manifest {
            name: raw.name,
            version: raw.version,
            component: raw.component,
            route,
            zone,
            smoke: raw.smoke,
            limits,
            timers,
            config: raw.config,
        })
    }

    /// The version this manifest gives a component with content hash `component_sha256`: the
    /// declared version, or `sha-` and the first 12 hex digits of the hash.
    pub fn version_for(&self, component_sha256: &str) -> String {
        match &self.version {
            Some(v) => v.clone(),
            None => format!(
                "sha-{}",
                &component_sha256[..12.min(component_sha256.len())]
            ),
        }
    }
}

/// Whether a `[config]` key can be an environment variable of the app: a letter or `_`, then
/// letters, digits and `_`, at most 128, not starting with `PADDOCK_` (Paddock's own).
pub fn is_config_key(key: &str) -> bool {
    is_variable_name(key) && !key.to_ascii_uppercase().starts_with("PADDOCK_")
}

fn is_variable_name(key: &str) -> bool {
    key.len() <= 128
        && key.starts_with(|c: char| c.is_ascii_alphabetic() || c == '_')
        && key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// `[config]` becomes the app's environment: keys are variable names (a letter or `_`, then
/// letters, digits and `_`; `PADDOCK_` is Paddock's own), values are text without NUL.
pub fn check_config(config: &BTreeMap<String, String>) -> Result<(), ManifestError> {
    if config.len() > MAX_CONFIG_ENTRIES {
        return Err(field(
            "config",
            format!(
                "has {} entries: at most {MAX_CONFIG_ENTRIES}; keep larger settings in the app's own store",
                config.len()
            ),
        ));
    }
    let mut bytes = 0;
    for (key, value) in config {
        if !is_variable_name(key) {
            return Err(field(
                "config",
                format!(
                    "key {key:?} is not an environment variable name: use a letter or '_', then letters, digits and '_' (at most 128)"
                ),
            ));
        }
        if key.to_ascii_uppercase().starts_with("PADDOCK_") {
            return Err(field(
                "config",
                format!("key {key:?}: names starting with PADDOCK_ are Paddock's own"),
            ));
        }
        if value.contains('\0') {
            return Err(field(
                "config",
                format!("value of {key:?} contains a NUL character"),
            ));
        }
        bytes += key.len() + value.len();
    }
    if bytes > MAX_CONFIG_BYTES {
        return Err(field(
            "config",
            format!(
                "is {bytes} bytes: at most {} KiB of keys and values",
                MAX_CONFIG_BYTES / 1024
            ),
        ));
    }
    Ok(())
}

/// One line: the parser's message and where it points, e.g. "unknown field `rout`, expected one
/// of ... (line 4, column 1)".
fn syntax_error(text: &str, error: &toml::de::Error) -> ManifestError {
    let message = error.message().trim().replace('\n', " ");
    let at = error.span().map(|span| {
        let before = &text[..span.start.min(text.len())];
        let line = before.matches('\n').count() + 1;
        let column = before.len() - before.rfind('\n').map_or(0, |i| i + 1) + 1;
        format!(" (line {line}, column {column})")
    });
    ManifestError::Syntax(format!("{message}{}", at.unwrap_or_default()))
}

fn path_of(path_with_query: &str) -> &str {
    path_with_query
        .split_once('?')
        .map_or(path_with_query, |(p, _)| p)
}

/// App, zone, timer and server names: `[a-z0-9-]{1,63}`, no leading or trailing '-'.
pub fn is_valid_name(name: &str) -> bool {
    (1..=63).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !name.starts_with('-')
        && !name.ends_with('-')
}

fn is_valid_version(version: &str) -> bool {
    (1..=64).contains(&version.len())
        && version
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._+-".contains(&b))
}

#[cfg(test)]
mod tests {
    #[test]
    fn timer_ticks() {
        use super::TimerSchedule;
        let every = TimerSchedule::Every(std::time::Duration::from_secs(30));
        assert_eq!(every.next_after(999, 1000), Some(1000));
        assert_eq!(every.next_after(1000, 1000), Some(31_000));
        // Missed ticks collapse: the next one after "now", not after the last run.
        assert_eq!(every.next_after(100_500, 1000), Some(121_000));
        // An interval past the end of time has no next tick (and does not overflow).
        let never = TimerSchedule::Every(std::time::Duration::from_millis(1 << 62));
        assert_eq!(never.next_after((1 << 62) + 1, 0), None);
        assert_eq!(every.next_after(i64::MAX - 10, i64::MIN), None);
        let cron = TimerSchedule::Cron("0 2 * * *".into());
        // 2026-11-22T13:00:00Z -> 2026-11-23T02:00:00Z
        assert_eq!(
            cron.next_after(1_795_352_400_000, 0),
            Some(1_795_399_200_000)
        );
        let bad = "name = \"a\"\ncomponent = \"a.wasm\"\n[[timer]]\nname = \"t\"\nschedule = \"every day\"\npath = \"/a/t\"";
        let e = super::Manifest::from_toml(bad).unwrap_err().to_string();
        assert!(
            e.contains("timer.schedule") && e.contains("not a cron expression"),
            "{e}"
        );
    }

    use super::*;

    fn parse(text: &str) -> Result<Manifest, ManifestError> {
        Manifest::from_toml(text)
    }

    #[test]
    fn minimal_manifest_gets_defaults() {
        let m = parse("name = \"orders\"\ncomponent = \"orders.wasm\"\n").unwrap();
        assert_eq!(m.route, "/orders");
        assert_eq!(m.zone, "default");
        assert_eq!(m.limits, Limits::default());
        assert_eq!(m.version_for("abcdef0123456789"), "sha-abcdef012345");
    }

    #[test]
    fn full_manifest_parses() {
        let m = parse(
            r#"
name = "orders"
version = "1.4.0"
component = "orders.wasm"
route = "/shop/orders"
zone = "eu"
smoke = "/shop/orders/health?deep=1"
[limits]
memory_mib = 128
request_timeout = "5s"
session_idle = "30m"
request_body_mib = 2
[[timer]]
name = "nightly-report"
schedule = "0 2 * * *"
path = "/shop/orders/_timers/nightly"
[[timer]]
name = "sweep"
every = "30s"
path = "/shop/orders/_timers/sweep"
[config]
currency = "EUR"
"#,
        )
        .unwrap();
        assert_eq!(m.version.as_deref(), Some("1.4.0"));
        assert_eq!(m.limits.memory_mib, 128);
        assert_eq!(m.limits.request_timeout, Duration::from_secs(5));
        assert_eq!(m.limits.session_idle, Duration::from_secs(1800));
        assert_eq!(m.limits.request_body_bytes(), 2 << 20);
        assert_eq!(
            m.timers[1].schedule,
            TimerSchedule::Every(Duration::from_secs(30))
        );
        assert_eq!(m.config["currency"], "EUR");
    }

    #[test]
    fn errors_name_the_field() {
        let cases = [
            ("name = \"Orders\"\ncomponent = \"a.wasm\"", "`name`"),
            ("name = \"a\"\ncomponent = \"../a.wasm\"", "`component`"),
            (
                "name = \"a\"\ncomponent = \"a.wasm\"\nroute = \"a\"",
                "`route`",
            ),
            (
                "name = \"a\"\ncomponent = \"a.wasm\"\nroute = \"/_paddock\"",
                "reserved",
            ),
            (
                "name = \"a\"\ncomponent = \"a.wasm\"\nversion = \"1 0\"",
                "`version`",
            ),
            (
                "name = \"a\"\ncomponent = \"a.wasm\"\nsmoke = \"/b/health\"",
                "`smoke`",
            ),
            (
                "name = \"a\"\ncomponent = \"a.wasm\"\n[limits]\nmemory_mib = 0",
                "limits.memory_mib",
            ),
            (
                "name = \"a\"\ncomponent = \"a.wasm\"\n[limits]\nrequest_timeout = \"2h\"",
                "limits.request_timeout",
            ),
            (
                "name = \"a\"\ncomponent = \"a.wasm\"\n[limits]\nsession_idle = \"0s\"",
                "limits.session_idle",
            ),
            (
                "name = \"a\"\ncomponent = \"a.wasm\"\n[limits]\nrequest_body_mib = 5000",
                "limits.request_body_mib",
            ),
            (
                "name = \"a\"\ncomponent = \"a.wasm\"\n[config]\n\"my-key\" = \"x\"",
                "key \"my-key\" is not an environment variable name",
            ),
            (
                "name = \"a\"\ncomponent = \"a.wasm\"\n[config]\nPADDOCK_APP = \"x\"",
                "Paddock's own",
            ),
            (
                "name = \"a\"\ncomponent = \"a.wasm\"\nrout = \"/x\"",
                "unknown field `rout`",
            ),
            ("component = \"a.wasm\"", "missing field `name`"),
            (
                "name = \"a\"\ncomponent = \"a.wasm\"\n[[timer]]\nname = \"t\"\npath = \"/a/t\"",
                "exactly one of",
            ),
            (
                "name = \"a\"\ncomponent = \"a.wasm\"\n[[timer]]\nname = \"t\"\nevery = \"1s\"\npath = \"/b\"",
                "timer.path",
            ),
            (
                "name = \"a\"\ncomponent = \"a.wasm\"\n[[timer]]\nname = \"t\"\nevery = \"1000years\"\npath = \"/a/t\"",
                "longer than a year",
            ),
            ("name = = ", "not valid"),
        ];
        for (text, expected) in cases {
            let err = parse(text).unwrap_err().to_string();
            assert!(
                err.contains(expected),
                "{text:?}: {err:?} should mention {expected:?}"
            );
        }
    }

    #[test]
    fn names() {
        assert!(is_valid_name("a"));
        assert!(is_valid_name("orders-2"));
        assert!(!is_valid_name(""));
        assert!(!is_valid_name("-a"));
        assert!(!is_valid_name("a_b"));
        assert!(!is_valid_name(&"a".repeat(64)));
    }
}
