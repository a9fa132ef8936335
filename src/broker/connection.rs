//! Opening AMQP connections. Consuming and publishing use separate connections: a memory
//! or disk alarm blocks publishing connections, and on a shared one it would also stall
//! the consumer's acks.

use std::time::Duration;

use anyhow::Context;
use lapin::runtime::default_runtime;
use lapin::tcp::OwnedTLSConfig;
use lapin::{Connection, ConnectionProperties};
use secrecy::ExposeSecret;

use crate::config::{BrokerSettings, redacted_url};

/// Opens a connection named `instructd-<role>` (as the management UI shows it).
///
/// Fails after `broker.connect_timeout_secs`; the error shows the URL with its password
/// redacted.
pub async fn connect(settings: &BrokerSettings, role: &str) -> anyhow::Result<Connection> {
    crate::install_crypto_provider();
    let properties = ConnectionProperties::default().with_connection_name(format!("instructd-{role}").into());
    let timeout = Duration::from_secs(settings.connect_timeout_secs);
    // For amqps://, the system's trust store plus `broker.ca_file`'s CAs; the host name in the
    // URL is verified against the certificate.
    let tls = OwnedTLSConfig { identity: None, cert_chain: ca_pem(settings)? };
    let connect = Connection::connect_with_config(settings.url.expose_secret(), properties, tls, default_runtime()?);
    let connection = tokio::time::timeout(timeout, connect)
        .await
        .map_err(|_| anyhow::anyhow!("no answer within {timeout:?}"))
        .and_then(|result| result.map_err(anyhow::Error::from))
        .with_context(|| format!("cannot connect to RabbitMQ at {}", redacted_url(&settings.url)))?;
    Ok(connection)
}

/// The PEM text of `broker.ca_file`, if one is set.
fn ca_pem(settings: &BrokerSettings) -> anyhow::Result<Option<String>> {
    if settings.ca_file.is_empty() {
        return Ok(None);
    }
    std::fs::read_to_string(&settings.ca_file)
        .map(Some)
        .with_context(|| format!("broker.ca_file: cannot read {}", settings.ca_file))
}
