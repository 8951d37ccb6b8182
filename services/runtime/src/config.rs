//! Settings of every LeadRelay service, read from the environment and an optional TOML file.
//!
//! Every setting has one environment variable (DESIGN §5) and one key in the file named by
//! `LEADRELAY_CONFIG`: the variable name without `LEADRELAY_`, lower-cased, with the first word as
//! the table when it names a system or a listener group (`LEADRELAY_PIPEDRIVE_RATE_LIMIT` is
//! `rate_limit` in `[pipedrive]`). The environment wins over the file. Every value is validated at
//! start-up and a bad one is reported with the variable (or file key) that holds it.

use std::{
    collections::BTreeMap,
    fmt,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    path::{Path, PathBuf},
    str::FromStr,
    time::Duration,
};

use secrecy::{ExposeSecret, SecretString};
use url::Url;

/// A setting that could not be used: names where it came from and what is wrong with it.
#[derive(Debug, thiserror::Error)]
#[error("{source_name}: {message}")]
pub struct ConfigError {
    /// The environment variable or `file:key` the value came from.
    pub source_name: String,
    /// What is wrong, in words a user can act on. Never contains the value of a secret.
    pub message: String,
}

impl ConfigError {
    /// A setting that one service requires but that is not set.
    pub fn required(variable: &'static str, why: &str) -> Self {
        Self::new(variable, format!("required {why}"))
    }

    pub(crate) fn new(source_name: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            source_name: source_name.into(),
            message: message.into(),
        }
    }
}

/// The config file's text, for the tables read with their positions ([`crate::routes`],
/// [`crate::mappings`]): a mistake is reported with the file and line it is on.
#[derive(Clone, Copy, Debug)]
pub(crate) struct ConfigText<'a> {
    pub(crate) path: &'a Path,
    pub(crate) text: &'a str,
}

impl ConfigText<'_> {
    /// "<file> line <n>" for a span of the text.
    pub(crate) fn at(&self, span: std::ops::Range<usize>) -> String {
        let line = self.text[..span.start.min(self.text.len())]
            .matches('\n')
            .count()
            + 1;
        format!("{} line {line}", self.path.display())
    }

    /// The text as `T`; a syntax or type error names its line.
    pub(crate) fn deserialize<T: serde::de::DeserializeOwned>(&self) -> Result<T, ConfigError> {
        toml::from_str(self.text).map_err(|error| {
            let origin = error
                .span()
                .map_or_else(|| self.path.display().to_string(), |span| self.at(span));
            ConfigError::new(origin, error.message().trim_end().replace('\n', " "))
        })
    }
}

/// Where the orchestrator keeps its state.
#[derive(Clone)]
pub enum DatabaseUrl {
    /// An SQLite file (the embedded default); the file and its folder are created when missing.
    Sqlite {
        /// The database file.
        path: PathBuf,
    },
    /// A Postgres server; the URL may hold a password, so it is kept secret.
    Postgres {
        /// The full `postgres://…` URL.
        url: SecretString,
    },
}

impl DatabaseUrl {
    /// Returns the URL to hand to the database driver.
    pub fn connection_string(&self) -> String {
        match self {
            Self::Sqlite { path } => format!("sqlite://{}", path.display()),
            Self::Postgres { url } => url.expose_secret().to_owned(),
        }
    }
}

impl fmt::Debug for DatabaseUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// Shows the database without its password.
impl fmt::Display for DatabaseUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Sqlite { path } => write!(f, "sqlite://{}", path.display()),
            Self::Postgres { url } => match Url::parse(url.expose_secret()) {
                Ok(mut parsed) => {
                    if parsed.password().is_some() {
                        // Cannot fail: a URL with a password has a host.
                        let _ = parsed.set_password(Some("***"));
                    }
                    write!(f, "{parsed}")
                }
                Err(_) => f.write_str("postgres://***"),
            },
        }
    }
}

impl FromStr for DatabaseUrl {
    type Err = String;

    fn from_str(value: &str) -> Result<Self, Self::Err> {
        if let Some(rest) = value.strip_prefix("sqlite:") {
            // Accept `sqlite://path`, `sqlite:path` and drop query options such as `?mode=rwc`:
            // LeadRelay always creates the file and sets WAL itself.
            let path = rest.trim_start_matches("//");
            let path = path.split('?').next().unwrap_or_default();
            if path.is_empty() || path == ":memory:" {
                return Err(
                    "an SQLite URL needs a file path, e.g. sqlite://data/leadrelay.db".to_owned(),
                );
            }
            return Ok(Self::Sqlite {
                path: PathBuf::from(path),
            });
        }
        if value.starts_with("postgres://") || value.starts_with("postgresql://") {
            let parsed =
                Url::parse(value).map_err(|error| format!("not a valid Postgres URL ({error})"))?;
            if parsed.host_str().is_none_or(str::is_empty) {
                return Err(
                    "a Postgres URL needs a host, e.g. postgres://127.0.0.1:5432/leadrelay"
                        .to_owned(),
                );
            }
            return Ok(Self::Postgres {
                url: SecretString::from(value.to_owned()),
            });
        }
        let scheme = value.split(':').next().unwrap_or_default();
        Err(format!(
            "unsupported database '{scheme}'; use sqlite://<file> or postgres://<host>/<database>"
        ))
    }
}

/// A call budget: at most `calls` calls in any window of `per`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RateLimit {
    /// Calls allowed per window.
    pub calls: u32,
    /// The window.
    pub per: Duration,
}

impl FromStr for RateLimit {
    type Err = String;

    fn from_str(value: &str) -> Result<Self, Self::Err> {
        let usage = "expected <calls>/<window>, e.g. 100/60s or 80/2s";
        let (calls, window) = value
            .split_once('/')
            .ok_or_else(|| format!("{usage}, got '{value}'"))?;
        let calls: u32 = calls
            .trim()
            .parse()
            .map_err(|_| format!("{usage}, got '{value}'"))?;
        if calls == 0 {
            return Err(format!(
                "the budget must allow at least 1 call, got '{value}'"
            ));
        }
        let per = parse_duration(window.trim()).map_err(|message| format!("{usage}: {message}"))?;
        Ok(Self { calls, per })
    }
}

impl fmt::Display for RateLimit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}s", self.calls, self.per.as_secs_f64())
    }
}

/// Parses `120s`, `2m`, `1h`, `500ms`; a bare number is seconds.
pub fn parse_duration(value: &str) -> Result<Duration, String> {
    let split = value
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(value.len());
    let (number, unit) = value.split_at(split);
    let number: u64 = number
        .parse()
        .map_err(|_| format!("'{value}' is not a duration like 120s, 2m or 500ms"))?;
    let duration = match unit {
        "" | "s" => Duration::from_secs(number),
        "ms" => Duration::from_millis(number),
        "m" => Duration::from_secs(number * 60),
        "h" => Duration::from_secs(number * 3600),
        _ => return Err(format!("'{value}' has an unknown unit; use ms, s, m or h")),
    };
    if duration.is_zero() {
        return Err(format!("'{value}' must be longer than zero"));
    }
    Ok(duration)
}

/// Log line format.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

impl FromStr for LogFormat {
    type Err = String;

    fn from_str(value: &str) -> Result<Self, Self::Err> {
        match value.to_ascii_lowercase().as_str() {
            "text" => Ok(Self::Text),
            "json" => Ok(Self::Json),
            _ => Err(format!("expected 'text' or 'json', got '{value}'")),
        }
    }
}

/// The OTLP transport (`OTEL_EXPORTER_OTLP_PROTOCOL`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OtlpProtocol {
    /// OTLP over gRPC; the collector's port 4317.
    Grpc,
    /// OTLP protobuf over HTTP (`POST {endpoint}/v1/traces`); the collector's port 4318. The
    /// OpenTelemetry specification's default.
    HttpProtobuf,
}

impl FromStr for OtlpProtocol {
    type Err = String;

    fn from_str(value: &str) -> Result<Self, Self::Err> {
        match value {
            "grpc" => Ok(Self::Grpc),
            "http/protobuf" => Ok(Self::HttpProtobuf),
            "http/json" => Err(
                "'http/json' is not supported; use 'http/protobuf' (port 4318) or 'grpc' (port 4317)"
                    .to_owned(),
            ),
            _ => Err(format!(
                "expected 'grpc' or 'http/protobuf', got '{value}'"
            )),
        }
    }
}

/// A listen address; `:50051` means every interface.
fn parse_listen(value: &str) -> Result<SocketAddr, String> {
    if let Some(port) = value.strip_prefix(':') {
        let port: u16 = port
            .parse()
            .map_err(|_| format!("'{value}' is not a port"))?;
        return Ok(SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), port));
    }
    value
        .parse()
        .map_err(|_| format!("expected host:port such as 0.0.0.0:8080 or :8080, got '{value}'"))
}

fn parse_http_url(value: &str) -> Result<Url, String> {
    let url = Url::parse(value).map_err(|error| format!("not a valid URL ({error})"))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(format!(
            "expected an http:// or https:// URL, got scheme '{}'",
            url.scheme()
        ));
    }
    Ok(url)
}

fn parse_secret(value: &str) -> Result<SecretString, String> {
    if value.trim().is_empty() {
        return Err("must not be empty".to_owned());
    }
    Ok(SecretString::from(value.to_owned()))
}

/// A comma-separated list; blanks around items are ignored, empty items are not allowed.
fn parse_list(value: &str) -> Result<Vec<String>, String> {
    let items: Vec<String> = value
        .split(',')
        .map(|item| item.trim().to_owned())
        .collect();
    if items.iter().any(String::is_empty) {
        return Err(format!(
            "expected a comma-separated list without empty items, got '{value}'"
        ));
    }
    Ok(items)
}

fn parse_nonempty(value: &str) -> Result<String, String> {
    if value.trim().is_empty() {
        return Err("must not be empty".to_owned());
    }
    Ok(value.to_owned())
}

/// Hana settings.
#[derive(Clone, Debug, Default)]
pub struct HanaSettings {
    /// Secret Hana must present on webhooks (`?token=` or `X-LeadRelay-Token`).
    pub webhook_token: Option<SecretString>,
    /// The secret it replaces, still accepted while Hana's webhook URL is being changed.
    pub webhook_token_previous: Option<SecretString>,
    /// Hana's update endpoint; unset turns write-back off.
    pub api_url: Option<Url>,
    /// Bearer token for the update endpoint.
    pub access_token: Option<SecretString>,
    /// Hana application ids whose webhooks are accepted; empty accepts every application.
    pub application_ids: Vec<String>,
}

/// Pipedrive settings.
#[derive(Clone, Debug)]
pub struct PipedriveSettings {
    /// Base URL: `https://api.pipedrive.com` or the company domain.
    pub api_url: Url,
    /// API token; unset turns Pipedrive off.
    pub api_token: Option<SecretString>,
    /// Basic-auth user Pipedrive webhooks must present; unset turns the endpoint off.
    pub webhook_user: Option<String>,
    /// Basic-auth password Pipedrive webhooks must present.
    pub webhook_password: Option<SecretString>,
    /// Call budget per API token.
    pub rate_limit: RateLimit,
    /// Search calls' own burst limit (Pipedrive documents 10 per 2 s on every plan).
    pub search_rate_limit: RateLimit,
    /// Trigger polling interval.
    pub poll_interval: Duration,
    /// How long one Pipedrive call may take.
    pub timeout: Duration,
}

/// SalesMan settings.
#[derive(Clone, Debug)]
pub struct SalesmanSettings {
    /// Base URL of the SalesMan installation; unset turns SalesMan off.
    pub api_url: Option<Url>,
    /// Login of the API user.
    pub login: Option<String>,
    /// API key.
    pub api_key: Option<SecretString>,
    /// Trigger polling interval.
    pub poll_interval: Duration,
}

/// Where each service listens.
#[derive(Clone, Copy, Debug)]
pub struct ListenSettings {
    /// Gateway HTTP.
    pub gateway: SocketAddr,
    /// Orchestrator gRPC.
    pub orchestrator: SocketAddr,
    /// Hana adapter gRPC.
    pub hana: SocketAddr,
    /// Pipedrive adapter gRPC.
    pub pipedrive: SocketAddr,
    /// SalesMan adapter gRPC.
    pub salesman: SocketAddr,
    /// Prometheus `/metrics` of the gRPC services.
    pub metrics: SocketAddr,
}

/// Where each peer service is.
#[derive(Clone, Debug)]
pub struct PeerSettings {
    /// The orchestrator, for the gateway and the pollers.
    pub orchestrator: Url,
    /// The Hana adapter, for the orchestrator.
    pub hana_adapter: Url,
    /// The Pipedrive adapter, for the orchestrator.
    pub pipedrive_adapter: Url,
    /// The SalesMan adapter, for the orchestrator.
    pub salesman_adapter: Url,
}

/// Telemetry settings.
#[derive(Clone, Debug)]
pub struct TelemetrySettings {
    /// Log line format.
    pub log_format: LogFormat,
    /// OTLP collector endpoint, when traces should be exported.
    pub otlp_endpoint: Option<Url>,
    /// How spans reach the collector.
    pub otlp_protocol: OtlpProtocol,
    /// Service name reported in traces; unset means the service's own name.
    pub service_name: Option<String>,
}

/// Every setting of every service.
#[derive(Clone, Debug)]
pub struct Settings {
    /// The orchestrator's store.
    pub database_url: DatabaseUrl,
    /// How long a sync runner may stay silent before another runner takes its claimed jobs
    /// again; a live runner renews each lease every third of it.
    pub job_lease: Duration,
    /// Hana.
    pub hana: HanaSettings,
    /// Pipedrive.
    pub pipedrive: PipedriveSettings,
    /// SalesMan.
    pub salesman: SalesmanSettings,
    /// Listen addresses.
    pub listen: ListenSettings,
    /// Peer addresses.
    pub peers: PeerSettings,
    /// Logs and traces.
    pub telemetry: TelemetrySettings,
    /// The configuration file the settings were read from, if any.
    pub config_file: Option<PathBuf>,
    /// Which systems Hana events go to, from the file's `[[routes]]`; empty for the defaults.
    pub routes: crate::routes::Routes,
    /// Which Hana attribute fills which CRM field, from the file's `[mappings]`.
    pub mappings: crate::mappings::Mappings,
}

/// One known setting: its environment variable and its key in the file.
struct Key {
    env: &'static str,
    table: Option<&'static str>,
    name: &'static str,
}

const fn key(env: &'static str, table: Option<&'static str>, name: &'static str) -> Key {
    Key { env, table, name }
}

/// Every setting LeadRelay reads. `OTEL_*` and `RUST_LOG` keep their standard names.
const KEYS: &[Key] = &[
    key("LEADRELAY_DATABASE_URL", None, "database_url"),
    key("LEADRELAY_JOB_LEASE", None, "job_lease"),
    key(
        "LEADRELAY_HANA_WEBHOOK_TOKEN",
        Some("hana"),
        "webhook_token",
    ),
    key(
        "LEADRELAY_HANA_WEBHOOK_TOKEN_PREVIOUS",
        Some("hana"),
        "webhook_token_previous",
    ),
    key("LEADRELAY_HANA_API_URL", Some("hana"), "api_url"),
    key("LEADRELAY_HANA_ACCESS_TOKEN", Some("hana"), "access_token"),
    key(
        "LEADRELAY_HANA_APPLICATION_IDS",
        Some("hana"),
        "application_ids",
    ),
    key("LEADRELAY_PIPEDRIVE_API_URL", Some("pipedrive"), "api_url"),
    key(
        "LEADRELAY_PIPEDRIVE_API_TOKEN",
        Some("pipedrive"),
        "api_token",
    ),
    key(
        "LEADRELAY_PIPEDRIVE_WEBHOOK_USER",
        Some("pipedrive"),
        "webhook_user",
    ),
    key(
        "LEADRELAY_PIPEDRIVE_WEBHOOK_PASSWORD",
        Some("pipedrive"),
        "webhook_password",
    ),
    key(
        "LEADRELAY_PIPEDRIVE_RATE_LIMIT",
        Some("pipedrive"),
        "rate_limit",
    ),
    key(
        "LEADRELAY_PIPEDRIVE_SEARCH_RATE_LIMIT",
        Some("pipedrive"),
        "search_rate_limit",
    ),
    key(
        "LEADRELAY_PIPEDRIVE_POLL_INTERVAL",
        Some("pipedrive"),
        "poll_interval",
    ),
    key("LEADRELAY_PIPEDRIVE_TIMEOUT", Some("pipedrive"), "timeout"),
    key("LEADRELAY_SALESMAN_API_URL", Some("salesman"), "api_url"),
    key("LEADRELAY_SALESMAN_LOGIN", Some("salesman"), "login"),
    key("LEADRELAY_SALESMAN_API_KEY", Some("salesman"), "api_key"),
    key(
        "LEADRELAY_SALESMAN_POLL_INTERVAL",
        Some("salesman"),
        "poll_interval",
    ),
    key("LEADRELAY_GATEWAY_LISTEN", Some("listen"), "gateway"),
    key(
        "LEADRELAY_ORCHESTRATOR_LISTEN",
        Some("listen"),
        "orchestrator",
    ),
    key("LEADRELAY_HANA_LISTEN", Some("listen"), "hana"),
    key("LEADRELAY_PIPEDRIVE_LISTEN", Some("listen"), "pipedrive"),
    key("LEADRELAY_SALESMAN_LISTEN", Some("listen"), "salesman"),
    key("LEADRELAY_METRICS_LISTEN", Some("listen"), "metrics"),
    key("LEADRELAY_ORCHESTRATOR_URL", Some("peers"), "orchestrator"),
    key("LEADRELAY_HANA_ADAPTER_URL", Some("peers"), "hana_adapter"),
    key(
        "LEADRELAY_PIPEDRIVE_ADAPTER_URL",
        Some("peers"),
        "pipedrive_adapter",
    ),
    key(
        "LEADRELAY_SALESMAN_ADAPTER_URL",
        Some("peers"),
        "salesman_adapter",
    ),
    key("LEADRELAY_LOG_FORMAT", Some("telemetry"), "log_format"),
    key(
        "OTEL_EXPORTER_OTLP_ENDPOINT",
        Some("telemetry"),
        "otlp_endpoint",
    ),
    key(
        "OTEL_EXPORTER_OTLP_PROTOCOL",
        Some("telemetry"),
        "otlp_protocol",
    ),
    key("OTEL_SERVICE_NAME", Some("telemetry"), "service_name"),
];

/// Tables of the file that later parts of LeadRelay read (routes, field mappings); not settings.
const RESERVED_TABLES: &[&str] = &["routes", "mappings"];

/// The variable that names the configuration file.
pub const CONFIG_FILE_VAR: &str = "LEADRELAY_CONFIG";

/// A raw value and where it came from, before validation.
struct RawValue {
    value: String,
    origin: String,
}

/// The raw values of every setting, the environment over the file.
struct RawSettings {
    values: BTreeMap<&'static str, RawValue>,
}

impl RawSettings {
    fn take<T>(
        &mut self,
        env: &'static str,
        parse: impl FnOnce(&str) -> Result<T, String>,
    ) -> Result<Option<T>, ConfigError> {
        match self.values.remove(env) {
            None => Ok(None),
            Some(raw) => parse(&raw.value)
                .map(Some)
                .map_err(|message| ConfigError::new(raw.origin, message)),
        }
    }

    fn take_or<T>(
        &mut self,
        env: &'static str,
        default: &str,
        parse: impl Fn(&str) -> Result<T, String>,
    ) -> Result<T, ConfigError> {
        match self.take(env, &parse)? {
            Some(value) => Ok(value),
            None => parse(default).map_err(|message| ConfigError::new(env, message)),
        }
    }
}

impl Settings {
    /// Reads the settings from the process environment and the file it names.
    pub fn from_env() -> Result<Self, ConfigError> {
        Self::from_lookup(|name| std::env::var(name).ok())
    }

    /// Reads the settings through `lookup`, which stands in for the environment (for tests).
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Result<Self, ConfigError> {
        let config_file = lookup(CONFIG_FILE_VAR)
            .filter(|path| !path.is_empty())
            .map(PathBuf::from);
        let (mut values, routes, mappings) = match &config_file {
            Some(path) => read_file(path)?,
            None => Default::default(),
        };
        for key in KEYS {
            if let Some(value) = lookup(key.env) {
                // An empty variable counts as unset, as shells and manifests often leave them so.
                if !value.is_empty() {
                    values.insert(
                        key.env,
                        RawValue {
                            value,
                            origin: key.env.to_owned(),
                        },
                    );
                }
            }
        }
        let mut settings = Self::validate(RawSettings { values }, config_file)?;
        settings.routes = routes;
        settings.mappings = mappings;
        Ok(settings)
    }

    fn validate(mut raw: RawSettings, config_file: Option<PathBuf>) -> Result<Self, ConfigError> {
        let listen = ListenSettings {
            gateway: raw.take_or("LEADRELAY_GATEWAY_LISTEN", "0.0.0.0:8080", parse_listen)?,
            orchestrator: raw.take_or("LEADRELAY_ORCHESTRATOR_LISTEN", ":50051", parse_listen)?,
            hana: raw.take_or("LEADRELAY_HANA_LISTEN", ":50052", parse_listen)?,
            pipedrive: raw.take_or("LEADRELAY_PIPEDRIVE_LISTEN", ":50053", parse_listen)?,
            salesman: raw.take_or("LEADRELAY_SALESMAN_LISTEN", ":50054", parse_listen)?,
            metrics: raw.take_or("LEADRELAY_METRICS_LISTEN", "0.0.0.0:9090", parse_listen)?,
        };
        let peers = PeerSettings {
            orchestrator: raw.take_or(
                "LEADRELAY_ORCHESTRATOR_URL",
                &loopback_url(listen.orchestrator),
                parse_http_url,
            )?,
            hana_adapter: raw.take_or(
                "LEADRELAY_HANA_ADAPTER_URL",
                &loopback_url(listen.hana),
                parse_http_url,
            )?,
            pipedrive_adapter: raw.take_or(
                "LEADRELAY_PIPEDRIVE_ADAPTER_URL",
                &loopback_url(listen.pipedrive),
                parse_http_url,
            )?,
            salesman_adapter: raw.take_or(
                "LEADRELAY_SALESMAN_ADAPTER_URL",
                &loopback_url(listen.salesman),
                parse_http_url,
            )?,
        };
        let settings = Self {
            database_url: raw.take_or(
                "LEADRELAY_DATABASE_URL",
                "sqlite://data/leadrelay.db",
                str::parse,
            )?,
            job_lease: raw.take_or("LEADRELAY_JOB_LEASE", "30s", parse_duration)?,
            hana: HanaSettings {
                webhook_token: raw.take("LEADRELAY_HANA_WEBHOOK_TOKEN", parse_secret)?,
                webhook_token_previous: raw
                    .take("LEADRELAY_HANA_WEBHOOK_TOKEN_PREVIOUS", parse_secret)?,
                api_url: raw.take("LEADRELAY_HANA_API_URL", parse_http_url)?,
                access_token: raw.take("LEADRELAY_HANA_ACCESS_TOKEN", parse_secret)?,
                application_ids: raw
                    .take("LEADRELAY_HANA_APPLICATION_IDS", parse_list)?
                    .unwrap_or_default(),
            },
            pipedrive: PipedriveSettings {
                api_url: raw.take_or(
                    "LEADRELAY_PIPEDRIVE_API_URL",
                    "https://api.pipedrive.com",
                    parse_http_url,
                )?,
                api_token: raw.take("LEADRELAY_PIPEDRIVE_API_TOKEN", parse_secret)?,
                webhook_user: raw.take("LEADRELAY_PIPEDRIVE_WEBHOOK_USER", parse_nonempty)?,
                webhook_password: raw.take("LEADRELAY_PIPEDRIVE_WEBHOOK_PASSWORD", parse_secret)?,
                rate_limit: raw.take_or("LEADRELAY_PIPEDRIVE_RATE_LIMIT", "100/60s", str::parse)?,
                search_rate_limit: raw.take_or(
                    "LEADRELAY_PIPEDRIVE_SEARCH_RATE_LIMIT",
                    "10/2s",
                    str::parse,
                )?,
                poll_interval: raw.take_or(
                    "LEADRELAY_PIPEDRIVE_POLL_INTERVAL",
                    "120s",
                    parse_duration,
                )?,
                timeout: raw.take_or("LEADRELAY_PIPEDRIVE_TIMEOUT", "15s", parse_duration)?,
            },
            salesman: SalesmanSettings {
                api_url: raw.take("LEADRELAY_SALESMAN_API_URL", parse_http_url)?,
                login: raw.take("LEADRELAY_SALESMAN_LOGIN", parse_nonempty)?,
                api_key: raw.take("LEADRELAY_SALESMAN_API_KEY", parse_secret)?,
                poll_interval: raw.take_or(
                    "LEADRELAY_SALESMAN_POLL_INTERVAL",
                    "120s",
                    parse_duration,
                )?,
            },
            listen,
            peers,
            telemetry: TelemetrySettings {
                log_format: raw.take_or("LEADRELAY_LOG_FORMAT", "text", str::parse)?,
                otlp_endpoint: raw.take("OTEL_EXPORTER_OTLP_ENDPOINT", parse_http_url)?,
                otlp_protocol: raw.take_or(
                    "OTEL_EXPORTER_OTLP_PROTOCOL",
                    "http/protobuf",
                    str::parse,
                )?,
                service_name: raw.take("OTEL_SERVICE_NAME", parse_nonempty)?,
            },
            config_file,
            routes: crate::routes::Routes::default(),
            mappings: crate::mappings::Mappings::default(),
        };
        settings.check_pairs()?;
        Ok(settings)
    }

    /// Settings that only make sense together must be given together.
    fn check_pairs(&self) -> Result<(), ConfigError> {
        let pairs = [
            (
                self.pipedrive.webhook_user.is_some(),
                "LEADRELAY_PIPEDRIVE_WEBHOOK_USER",
                self.pipedrive.webhook_password.is_some(),
                "LEADRELAY_PIPEDRIVE_WEBHOOK_PASSWORD",
            ),
            (
                self.hana.api_url.is_some(),
                "LEADRELAY_HANA_API_URL",
                self.hana.access_token.is_some(),
                "LEADRELAY_HANA_ACCESS_TOKEN",
            ),
        ];
        for (has_first, first, has_second, second) in pairs {
            if has_first && !has_second {
                return Err(ConfigError::new(
                    second,
                    format!("must be set when {first} is set"),
                ));
            }
            if has_second && !has_first {
                return Err(ConfigError::new(
                    first,
                    format!("must be set when {second} is set"),
                ));
            }
        }
        Ok(())
    }

    /// The SalesMan variables still missing, empty when SalesMan is fully configured.
    pub fn salesman_missing(&self) -> Vec<&'static str> {
        let mut missing = Vec::new();
        if self.salesman.api_url.is_none() {
            missing.push("LEADRELAY_SALESMAN_API_URL");
        }
        if self.salesman.login.is_none() {
            missing.push("LEADRELAY_SALESMAN_LOGIN");
        }
        if self.salesman.api_key.is_none() {
            missing.push("LEADRELAY_SALESMAN_API_KEY");
        }
        missing
    }

    /// The Pipedrive variables still missing, empty when Pipedrive is configured.
    pub fn pipedrive_missing(&self) -> Vec<&'static str> {
        if self.pipedrive.api_token.is_none() {
            vec!["LEADRELAY_PIPEDRIVE_API_TOKEN"]
        } else {
            Vec::new()
        }
    }

    /// The Hana write-back variables still missing, empty when write-back is configured.
    pub fn hana_missing(&self) -> Vec<&'static str> {
        let mut missing = Vec::new();
        if self.hana.api_url.is_none() {
            missing.push("LEADRELAY_HANA_API_URL");
        }
        if self.hana.access_token.is_none() {
            missing.push("LEADRELAY_HANA_ACCESS_TOKEN");
        }
        missing
    }
}

/// The URL a peer in the same process or pod reaches a listener at.
pub fn loopback_url(listen: SocketAddr) -> String {
    let host = if listen.ip().is_unspecified() {
        match listen.ip() {
            IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::LOCALHOST),
            IpAddr::V6(_) => IpAddr::V6(std::net::Ipv6Addr::LOCALHOST),
        }
    } else {
        listen.ip()
    };
    format!("http://{}", SocketAddr::new(host, listen.port()))
}

/// Reads the file's settings as raw strings, rejecting keys LeadRelay does not know.
/// The settings in the file, and its routes.
type FileSettings = (
    BTreeMap<&'static str, RawValue>,
    crate::routes::Routes,
    crate::mappings::Mappings,
);

fn read_file(path: &Path) -> Result<FileSettings, ConfigError> {
    let origin = format!("{CONFIG_FILE_VAR} ({})", path.display());
    let text = std::fs::read_to_string(path)
        .map_err(|error| ConfigError::new(&origin, format!("cannot read the file: {error}")))?;
    let document: toml::Table = text.parse().map_err(|error: toml::de::Error| {
        ConfigError::new(&origin, error.to_string().trim_end().replace('\n', " "))
    })?;

    let mut values = BTreeMap::new();
    let mut read_value = |table: Option<&str>, name: &str, value: &toml::Value| {
        let dotted = match table {
            Some(table) => format!("{table}.{name}"),
            None => name.to_owned(),
        };
        let origin = format!("{} key '{dotted}'", path.display());
        let key = KEYS
            .iter()
            .find(|key| key.table == table && key.name == name)
            .ok_or_else(|| ConfigError::new(&origin, "unknown setting".to_owned()))?;
        let value = match value {
            toml::Value::String(text) => text.clone(),
            toml::Value::Integer(number) => number.to_string(),
            // Lists are written comma-separated, as in the environment.
            toml::Value::Array(items) if items.iter().all(toml::Value::is_str) => items
                .iter()
                .filter_map(toml::Value::as_str)
                .collect::<Vec<_>>()
                .join(","),
            other => {
                return Err(ConfigError::new(
                    &origin,
                    format!("expected a string, got {}", other.type_str()),
                ));
            }
        };
        values.insert(key.env, RawValue { value, origin });
        Ok(())
    };
    for (name, value) in &document {
        match value {
            _ if RESERVED_TABLES.contains(&name.as_str()) => {}
            toml::Value::Table(table) => {
                for (inner, inner_value) in table {
                    read_value(Some(name), inner, inner_value)?;
                }
            }
            _ => read_value(None, name, value)?,
        }
    }
    let routes = crate::routes::parse(path, &text)?;
    let mappings = crate::mappings::parse(path, &text)?;
    Ok((values, routes, mappings))
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    fn settings_from(vars: &[(&str, &str)]) -> Result<Settings, ConfigError> {
        let vars: HashMap<String, String> = vars
            .iter()
            .map(|(name, value)| ((*name).to_owned(), (*value).to_owned()))
            .collect();
        Settings::from_lookup(|name| vars.get(name).cloned())
    }

    #[test]
    fn defaults_follow_the_operator_contract() -> Result<(), ConfigError> {
        let settings = settings_from(&[])?;
        assert_eq!(
            settings.database_url.to_string(),
            "sqlite://data/leadrelay.db"
        );
        assert_eq!(settings.listen.gateway.to_string(), "0.0.0.0:8080");
        assert_eq!(settings.listen.orchestrator.to_string(), "0.0.0.0:50051");
        assert_eq!(settings.listen.salesman.to_string(), "0.0.0.0:50054");
        assert_eq!(
            settings.peers.orchestrator.as_str(),
            "http://127.0.0.1:50051/"
        );
        assert_eq!(
            settings.peers.pipedrive_adapter.as_str(),
            "http://127.0.0.1:50053/"
        );
        assert_eq!(
            settings.pipedrive.api_url.as_str(),
            "https://api.pipedrive.com/"
        );
        assert_eq!(
            settings.pipedrive.rate_limit,
            RateLimit {
                calls: 100,
                per: Duration::from_secs(60)
            }
        );
        assert_eq!(settings.pipedrive.poll_interval, Duration::from_secs(120));
        assert_eq!(settings.pipedrive.timeout, Duration::from_secs(15));
        assert_eq!(settings.telemetry.log_format, LogFormat::Text);
        assert_eq!(
            settings.pipedrive_missing(),
            ["LEADRELAY_PIPEDRIVE_API_TOKEN"]
        );
        assert_eq!(settings.salesman_missing().len(), 3);
        Ok(())
    }

    #[test]
    fn an_unsupported_database_names_the_variable() {
        let error = settings_from(&[("LEADRELAY_DATABASE_URL", "mysql://x")])
            .err()
            .map(|error| error.to_string());
        assert_eq!(
            error.as_deref(),
            Some(
                "LEADRELAY_DATABASE_URL: unsupported database 'mysql'; use sqlite://<file> or postgres://<host>/<database>"
            )
        );
    }

    #[test]
    fn a_bad_rate_limit_names_the_variable() {
        let error = settings_from(&[("LEADRELAY_PIPEDRIVE_RATE_LIMIT", "abc")])
            .err()
            .map(|error| error.to_string())
            .unwrap_or_default();
        assert!(
            error.starts_with("LEADRELAY_PIPEDRIVE_RATE_LIMIT: expected <calls>/<window>"),
            "{error}"
        );
    }

    #[test]
    fn rate_limits_and_durations_parse() {
        assert_eq!(
            "10/2s".parse::<RateLimit>(),
            Ok(RateLimit {
                calls: 10,
                per: Duration::from_secs(2)
            })
        );
        assert_eq!(
            "80/1m".parse::<RateLimit>().map(|limit| limit.per),
            Ok(Duration::from_secs(60))
        );
        assert!("0/60s".parse::<RateLimit>().is_err());
        assert!("100/0s".parse::<RateLimit>().is_err());
        assert!("100/60x".parse::<RateLimit>().is_err());
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("90"), Ok(Duration::from_secs(90)));
    }

    #[test]
    fn listen_addresses_accept_a_bare_port() {
        assert_eq!(
            parse_listen(":9000").map(|a| a.to_string()),
            Ok("0.0.0.0:9000".to_owned())
        );
        assert!(parse_listen("localhost").is_err());
    }

    #[test]
    fn postgres_passwords_never_show() -> Result<(), ConfigError> {
        let settings = settings_from(&[(
            "LEADRELAY_DATABASE_URL",
            "postgres://lead:hunter2@db.internal:5432/leadrelay",
        )])?;
        let shown = format!("{} {:?}", settings.database_url, settings);
        assert!(!shown.contains("hunter2"), "{shown}");
        assert!(shown.contains("db.internal"));
        Ok(())
    }

    #[test]
    fn secrets_never_show_in_debug_output() -> Result<(), ConfigError> {
        let settings = settings_from(&[
            ("LEADRELAY_PIPEDRIVE_API_TOKEN", "pd-token-123"),
            ("LEADRELAY_SALESMAN_API_KEY", "sm-key-456"),
            ("LEADRELAY_HANA_WEBHOOK_TOKEN", "hana-secret-789"),
        ])?;
        let shown = format!("{settings:?}");
        for secret in ["pd-token-123", "sm-key-456", "hana-secret-789"] {
            assert!(!shown.contains(secret), "{secret} leaked: {shown}");
        }
        Ok(())
    }

    #[test]
    fn half_a_credential_pair_is_rejected() {
        let error = settings_from(&[("LEADRELAY_PIPEDRIVE_WEBHOOK_USER", "pipedrive")])
            .err()
            .map(|error| error.source_name);
        assert_eq!(
            error.as_deref(),
            Some("LEADRELAY_PIPEDRIVE_WEBHOOK_PASSWORD")
        );
    }

    #[test]
    fn the_file_is_read_and_the_environment_wins() -> Result<(), Box<dyn std::error::Error>> {
        let dir = std::env::temp_dir().join(format!("leadrelay-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        let path = dir.join("leadrelay.toml");
        std::fs::write(
            &path,
            r#"
database_url = "sqlite://state/lr.db"

[pipedrive]
rate_limit = "50/60s"
poll_interval = "30s"

[listen]
gateway = ":8081"

[[routes]]
events = ["lead.created"]
targets = ["pipedrive"]
"#,
        )?;
        let path_text = path.display().to_string();
        let settings = settings_from(&[
            (CONFIG_FILE_VAR, path_text.as_str()),
            ("LEADRELAY_PIPEDRIVE_POLL_INTERVAL", "45s"),
        ])?;
        assert_eq!(settings.database_url.to_string(), "sqlite://state/lr.db");
        assert_eq!(settings.pipedrive.rate_limit.calls, 50);
        assert_eq!(settings.pipedrive.poll_interval, Duration::from_secs(45));
        assert_eq!(
            settings.routes.targets("any-app", "lead.created"),
            Some(&["pipedrive".to_owned()][..])
        );
        assert_eq!(settings.listen.gateway.port(), 8081);
        std::fs::remove_dir_all(&dir)?;
        Ok(())
    }

    #[test]
    fn a_bad_file_value_names_the_file_key() -> Result<(), Box<dyn std::error::Error>> {
        let dir = std::env::temp_dir().join(format!("leadrelay-config-bad-{}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        let path = dir.join("leadrelay.toml");
        std::fs::write(
            &path,
            "[pipedrive]\nrate_limit = \"fast\"\nratelimit = \"x\"\n",
        )?;
        let path_text = path.display().to_string();
        let error = settings_from(&[(CONFIG_FILE_VAR, path_text.as_str())])
            .err()
            .map(|error| error.to_string())
            .unwrap_or_default();
        // Keys are read in order: `rate_limit` is known and fails validation later, `ratelimit`
        // is unknown and fails at once.
        assert!(
            error.contains("key 'pipedrive.ratelimit': unknown setting"),
            "{error}"
        );

        std::fs::write(&path, "[pipedrive]\nrate_limit = \"fast\"\n")?;
        let error = settings_from(&[(CONFIG_FILE_VAR, path_text.as_str())])
            .err()
            .map(|error| error.to_string())
            .unwrap_or_default();
        assert!(
            error.contains("key 'pipedrive.rate_limit': expected <calls>/<window>"),
            "{error}"
        );
        std::fs::remove_dir_all(&dir)?;
        Ok(())
    }
}
