//! The TOML file as written by the administrator (serde, unknown keys are
//! errors so a typo never silently falls back to a default). Defaults live
//! here; meaning and validation live in `config/mod.rs`. `tern.example.toml`
//! at the repository root documents every key and must stay in step.

use serde::Deserialize;
use std::collections::BTreeMap;
use std::path::PathBuf;

#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    pub hostname: Option<String>,
    pub data_dir: Option<PathBuf>,
    #[serde(default)]
    pub server: super::server::ServerConfig,
    #[serde(default)]
    pub mailbox: super::server::MailboxConfig,
    #[serde(default)]
    pub listener: Vec<ListenerConfig>,
    #[serde(default)]
    pub local: LocalConfig,
    #[serde(default)]
    pub user: Vec<UserConfig>,
    #[serde(default)]
    pub aliases: BTreeMap<String, Vec<String>>,
    #[serde(default)]
    pub relay: RelayConfig,
    #[serde(default)]
    pub limits: LimitsConfig,
    #[serde(default)]
    pub spool: SpoolConfigFile,
    #[serde(default)]
    pub delivery: DeliveryConfig,
    #[serde(default)]
    pub dns: DnsConfig,
    #[serde(default)]
    pub route: RouteConfig,
    #[serde(default)]
    pub outbound: OutboundConfig,
    #[serde(default)]
    pub tls: TlsConfig,
    #[serde(default)]
    pub log: LogConfig,
    #[serde(default)]
    pub dkim: DkimConfig,
    #[serde(default)]
    pub auth: super::auth::AuthConfig,
    #[serde(default)]
    pub submission: super::submission::SubmissionConfig,
    #[serde(default)]
    pub metrics: super::metrics::MetricsConfig,
    #[serde(default)]
    pub sendmail: super::sendmail::SendmailConfig,
}

#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct TlsConfig {
    pub certificates: Vec<CertificateConfig>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CertificateConfig {
    pub cert: PathBuf,
    pub key: PathBuf,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListenerConfig {
    pub address: String,
    #[serde(default = "default_role")]
    pub role: String,
}

fn default_role() -> String {
    "mx".into()
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LocalConfig {
    pub domains: Vec<String>,
    pub subaddress_separator: String,
    pub postmaster: Option<String>,
    pub catch_all: BTreeMap<String, String>,
}

impl Default for LocalConfig {
    fn default() -> Self {
        LocalConfig {
            domains: Vec::new(),
            subaddress_separator: "+".into(),
            postmaster: None,
            catch_all: BTreeMap::new(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UserConfig {
    pub name: String,
    #[serde(default)]
    pub addresses: Vec<String>,
    pub maildir: Option<PathBuf>,
    /// Overrides `mailbox.owner` / `mailbox.group` for this user's Maildir.
    pub owner: Option<String>,
    pub group: Option<String>,
}

#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct RelayConfig {
    pub trusted_networks: Vec<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    pub max_command_line: usize,
    pub max_text_line: usize,
    pub max_message_size: u64,
    pub max_recipients: usize,
    pub max_errors: usize,
    pub max_rejected_recipients: usize,
    pub max_junk_commands: usize,
    pub max_received_headers: usize,
    pub command_timeout: String,
    pub data_timeout: String,
    pub greeting_delay: String,
    pub max_connections: usize,
    pub max_connections_per_ip: usize,
    pub min_free_space: Option<u64>,
    pub bare_lf: String,
    pub nul: String,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        LimitsConfig {
            max_command_line: 4096,
            // No limit: real senders write longer lines (swaks puts 150
            // recipients on one 3.5 KB To: line) and refusing them loses
            // their mail; memory is bounded by max_message_size either way,
            // and relaying folds what it sends (tern_proto::client).
            max_text_line: 0,
            max_message_size: 25 * 1024 * 1024,
            max_recipients: 100,
            max_errors: 20,
            max_rejected_recipients: 100,
            // Postfix's smtpd_junk_command_limit.
            max_junk_commands: 100,
            max_received_headers: 100,
            // RFC 5321 §4.5.3.2.7: the server timeout should be at least 5 minutes.
            command_timeout: "5m".into(),
            // §4.5.3.2.5/6: 3 min per data block, 10 min for the terminating dot.
            data_timeout: "10m".into(),
            greeting_delay: "300ms".into(),
            max_connections: 1000,
            max_connections_per_ip: 50,
            min_free_space: None,
            bare_lf: "reject".into(),
            nul: "reject".into(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SpoolConfigFile {
    pub dir: Option<PathBuf>,
    pub segment_size: u64,
    pub draft_memory_limit: usize,
    pub commit_wait: String,
}

impl Default for SpoolConfigFile {
    fn default() -> Self {
        SpoolConfigFile {
            dir: None,
            segment_size: 64 * 1024 * 1024,
            draft_memory_limit: 256 * 1024,
            commit_wait: humantime::format_duration(crate::spool::SpoolConfig::COMMIT_WAIT)
                .to_string(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DeliveryConfig {
    pub batch_size: usize,
    pub retry_initial: String,
    pub retry_max: String,
    pub give_up: String,
    pub delay_notice: String,
}

impl Default for DeliveryConfig {
    fn default() -> Self {
        // Postfix's minimal_backoff_time / maximal_backoff_time /
        // maximal_queue_lifetime; the delay notice after 4 h as its
        // delay_warning_time is usually set.
        DeliveryConfig {
            batch_size: 1024,
            retry_initial: "5m".into(),
            retry_max: "67m".into(),
            give_up: "5d".into(),
            delay_notice: "4h".into(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DnsConfig {
    pub nameservers: Vec<String>,
    pub timeout: String,
    pub attempts: usize,
}

impl Default for DnsConfig {
    fn default() -> Self {
        DnsConfig {
            nameservers: Vec::new(),
            timeout: "5s".into(),
            attempts: 2,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RouteConfig {
    pub relay: Option<String>,
    pub relay_tls: Option<String>,
    pub relay_username: Option<String>,
    pub relay_password: Option<String>,
    pub relay_password_file: Option<PathBuf>,
    pub relay_auth_without_tls: bool,
    pub transports: BTreeMap<String, String>,
    pub fallback_relay: Option<String>,
    pub address_families: String,
    pub mx_port: u16,
}

impl Default for RouteConfig {
    fn default() -> Self {
        RouteConfig {
            relay: None,
            relay_tls: None,
            relay_username: None,
            relay_password: None,
            relay_password_file: None,
            relay_auth_without_tls: false,
            transports: BTreeMap::new(),
            fallback_relay: None,
            address_families: "ipv4-first".into(),
            mx_port: 25,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OutboundConfig {
    pub tls: String,
    pub tls_ca_file: Option<PathBuf>,
    pub max_connections: usize,
    pub window_initial: u32,
    pub window_max: u32,
    pub max_recipients_per_job: usize,
    pub max_messages_per_connection: usize,
    pub connect_timeout: String,
    pub dead_after: u32,
}

impl Default for OutboundConfig {
    fn default() -> Self {
        // Postfix's default_process_limit, initial_destination_concurrency,
        // default_destination_concurrency_limit and
        // default_destination_recipient_limit; Postfix reuses a connection
        // without a count limit (for 300 s), a busy destination here
        // gets a new handshake every 1000 messages.
        OutboundConfig {
            tls: "opportunistic".into(),
            tls_ca_file: None,
            max_connections: 100,
            window_initial: 5,
            window_max: 20,
            max_recipients_per_job: 50,
            max_messages_per_connection: 1000,
            connect_timeout: "30s".into(),
            dead_after: 5,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    pub level: String,
    pub format: String,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            level: "info".into(),
            format: "text".into(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DkimConfig {
    /// Default: `<data_dir>/dkim`.
    pub dir: Option<PathBuf>,
    pub discover: bool,
    /// `x=` is `t=` plus this; "0s": no `x=`.
    pub signature_lifetime: String,
    pub key: Vec<DkimKeyConfig>,
}

impl Default for DkimConfig {
    fn default() -> Self {
        DkimConfig {
            dir: None,
            discover: true,
            signature_lifetime: "0s".into(),
            key: Vec::new(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DkimKeyConfig {
    pub domain: String,
    pub selector: String,
    /// "rsa-sha256" or "ed25519-sha256"; default: what the file holds.
    pub algorithm: Option<String>,
    /// Default: `<dkim.dir>/<domain>/<selector>.key`.
    pub file: Option<PathBuf>,
}
