//! The client shared by the repositories of one DynamoDB endpoint, URL parsing and
//! table management.

use std::fmt;
use std::time::{Duration, Instant};

use aws_config::BehaviorVersion;
use aws_config::meta::region::RegionProviderChain;
use aws_sdk_dynamodb::Client;
use aws_sdk_dynamodb::config::{Credentials, Region};
use aws_sdk_dynamodb::error::ProvideErrorMetadata;
use aws_sdk_dynamodb::types::{
    AttributeDefinition, BillingMode, KeySchemaElement, KeyType, ScalarAttributeType,
    TableDescription, TableStatus,
};
use flows_core::{RepositoryError, TableName};

use crate::error::{build_err, map_sdk_err};

/// Region used with an explicit endpoint when the AWS configuration names none: local
/// servers accept any region.
const LOCAL_REGION: &str = "us-east-1";

/// How long to wait for a new table to become `ACTIVE`.
const TABLE_ACTIVE_TIMEOUT: Duration = Duration::from_secs(300);

pub use flows_core::backend::TableMode;

/// Where to connect, parsed from a `dynamodb://` URL.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct ConnectOptions {
    /// Explicit endpoint (`http://localhost:8000`), or `None` for the AWS chain's.
    pub(crate) endpoint: Option<String>,
    /// Explicit region, or `None` for the AWS chain's.
    pub(crate) region: Option<String>,
}

impl ConnectOptions {
    /// Parses `dynamodb://[host[:port]][?region=REGION][&tls=true|false]`.
    ///
    /// Errors never repeat the URL: it is configuration and might hold a secret.
    pub(crate) fn parse(url: &str) -> Result<Self, RepositoryError> {
        let invalid =
            |why: &str| RepositoryError::Configuration(format!("invalid DynamoDB URL: {why}"));
        let parsed = url::Url::parse(url).map_err(|e| invalid(&e.to_string()))?;
        if parsed.scheme() != "dynamodb" {
            return Err(invalid("the scheme must be dynamodb://"));
        }
        if !parsed.username().is_empty() || parsed.password().is_some() {
            return Err(invalid(
                "credentials do not belong in the URL; they come from the AWS configuration \
                 chain (environment, profile, instance or task role)",
            ));
        }
        if !matches!(parsed.path(), "" | "/") || parsed.fragment().is_some() {
            return Err(invalid("only a host, a port and query options are allowed"));
        }
        let mut region = None;
        let mut tls = None;
        for (key, value) in parsed.query_pairs() {
            match key.as_ref() {
                "region" if !value.is_empty() => region = Some(value.into_owned()),
                "tls" => {
                    tls = Some(match value.as_ref() {
                        "true" => true,
                        "false" => false,
                        _ => return Err(invalid("tls must be true or false")),
                    })
                }
                other => return Err(invalid(&format!("unknown option {other:?}"))),
            }
        }
        let endpoint = match parsed.host_str().filter(|h| !h.is_empty()) {
            Some(host) => {
                let scheme = if tls.unwrap_or(true) { "https" } else { "http" };
                Some(match parsed.port() {
                    Some(port) => format!("{scheme}://{host}:{port}"),
                    None => format!("{scheme}://{host}"),
                })
            }
            None if tls.is_some() => {
                return Err(invalid("tls applies only to an explicit host"));
            }
            None => None,
        };
        Ok(Self { endpoint, region })
    }
}

/// A DynamoDB endpoint opened for flows. Cheap to clone (the SDK client is shared).
///
/// Its `Debug` output names the endpoint and region only; credentials are never printed.
#[derive(Clone)]
pub struct DynamoDbStore {
    client: Client,
    display: String,
}

impl fmt::Debug for DynamoDbStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DynamoDbStore")
            .field("endpoint", &self.display)
            .finish()
    }
}

impl DynamoDbStore {
    /// Opens a client for `url`:
    ///
    /// - `dynamodb://` — endpoint, region and credentials all from the standard AWS
    ///   configuration chain (`AWS_REGION`, `AWS_PROFILE`, `~/.aws/config`, SSO, web
    ///   identity, ECS task and EC2 instance roles).
    /// - `dynamodb://?region=eu-west-1` — the same, with this region.
    /// - `dynamodb://localhost:8000?tls=false` — an explicit endpoint, e.g. DynamoDB
    ///   Local (`tls` defaults to `true`, i.e. `https`). The region defaults to
    ///   `us-east-1` if the chain names none, and when neither `AWS_ACCESS_KEY_ID` nor
    ///   `AWS_PROFILE` is set, static dummy credentials are used (local servers accept
    ///   any).
    ///
    /// No request is sent: an unreachable endpoint shows up on the first call (opening a
    /// repository checks its table, so that is where).
    pub async fn connect(url: &str) -> Result<Self, RepositoryError> {
        let options = ConnectOptions::parse(url)?;
        let mut loader = aws_config::defaults(BehaviorVersion::latest());
        if let Some(endpoint) = &options.endpoint {
            loader = loader.endpoint_url(endpoint);
            if std::env::var_os("AWS_ACCESS_KEY_ID").is_none()
                && std::env::var_os("AWS_PROFILE").is_none()
            {
                // DynamoDB Local 2.0 and later accept only letters and digits here.
                loader = loader.credentials_provider(Credentials::new(
                    "flowslocal",
                    "flowslocal",
                    None,
                    None,
                    "flows-local-endpoint",
                ));
            }
        }
        loader = match (&options.region, &options.endpoint) {
            (Some(region), _) => loader.region(Region::new(region.clone())),
            (None, Some(_)) => {
                loader.region(RegionProviderChain::default_provider().or_else(LOCAL_REGION))
            }
            (None, None) => loader,
        };
        let config = loader.load().await;
        let Some(region) = config.region().map(ToString::to_string) else {
            return Err(RepositoryError::Configuration(
                "no AWS region: set AWS_REGION (or a profile's region) or add ?region= to the \
                 dynamodb:// URL"
                    .into(),
            ));
        };
        let server = format!(
            "{} ({region})",
            options
                .endpoint
                .as_deref()
                .unwrap_or("AWS default endpoint")
        );
        tracing::debug!(%server, "DynamoDB client configured");
        Ok(Self {
            client: Client::new(&config),
            display: server,
        })
    }

    /// Wraps a client built by the caller (custom retry, timeouts, HTTP client).
    pub fn from_client(client: Client) -> Self {
        Self {
            client,
            display: "(external client)".into(),
        }
    }

    /// The underlying SDK client.
    pub fn client(&self) -> &Client {
        &self.client
    }

    /// Makes sure `table` exists with the single hash key `key` of type `key_type`,
    /// creating it under [`TableMode::CreateIfMissing`], and waits until it is active.
    pub(crate) async fn ensure_table(
        &self,
        table: &TableName,
        key: &str,
        key_type: ScalarAttributeType,
        mode: TableMode,
    ) -> Result<(), RepositoryError> {
        if table.as_str().len() < 3 {
            return Err(RepositoryError::Configuration(format!(
                "DynamoDB table names have at least 3 characters: {table}"
            )));
        }
        let description = match self.describe(table).await? {
            Some(description) => description,
            None if mode == TableMode::RequireExisting => {
                return Err(flows_core::backend::missing_table(
                    "DynamoDB",
                    table.as_str(),
                ));
            }
            None => {
                self.create(table, key, key_type.clone()).await?;
                self.wait_active(table).await?
            }
        };
        let description = if description.table_status() == Some(&TableStatus::Active) {
            description
        } else {
            self.wait_active(table).await?
        };
        check_key_schema(table, &description, key, &key_type)
    }

    async fn describe(
        &self,
        table: &TableName,
    ) -> Result<Option<TableDescription>, RepositoryError> {
        match self
            .client
            .describe_table()
            .table_name(table.as_str())
            .send()
            .await
        {
            Ok(output) => Ok(output.table),
            Err(e) if e.code() == Some("ResourceNotFoundException") => Ok(None),
            Err(e) => Err(map_sdk_err("DescribeTable", e)),
        }
    }

    async fn create(
        &self,
        table: &TableName,
        key: &str,
        key_type: ScalarAttributeType,
    ) -> Result<(), RepositoryError> {
        let result = self
            .client
            .create_table()
            .table_name(table.as_str())
            .billing_mode(BillingMode::PayPerRequest)
            .attribute_definitions(
                AttributeDefinition::builder()
                    .attribute_name(key)
                    .attribute_type(key_type)
                    .build()
                    .map_err(build_err)?,
            )
            .key_schema(
                KeySchemaElement::builder()
                    .attribute_name(key)
                    .key_type(KeyType::Hash)
                    .build()
                    .map_err(build_err)?,
            )
            .send()
            .await;
        match result {
            Ok(_) => {
                tracing::info!(%table, "created DynamoDB table");
                Ok(())
            }
            // Another worker created it first: fine, wait for it like our own.
            Err(e) if e.code() == Some("ResourceInUseException") => Ok(()),
            Err(e) => Err(map_sdk_err("CreateTable", e)),
        }
    }

    async fn wait_active(&self, table: &TableName) -> Result<TableDescription, RepositoryError> {
        let started = Instant::now();
        let mut delay = Duration::from_millis(100);
        loop {
            match self.describe(table).await? {
                Some(d) if d.table_status() == Some(&TableStatus::Active) => return Ok(d),
                Some(d)
                    if matches!(
                        d.table_status(),
                        Some(
                            TableStatus::Deleting | TableStatus::Archived | TableStatus::Archiving
                        )
                    ) =>
                {
                    return Err(RepositoryError::Configuration(format!(
                        "DynamoDB table {table} is {:?}",
                        d.table_status()
                    )));
                }
                // Still being created (or just created and not visible yet).
                _ => {}
            }
            if started.elapsed() > TABLE_ACTIVE_TIMEOUT {
                return Err(RepositoryError::Unavailable(
                    format!("DynamoDB table {table} not active after {TABLE_ACTIVE_TIMEOUT:?}")
                        .into(),
                ));
            }
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(Duration::from_secs(2));
        }
    }
}

/// An existing table must have exactly the key this repository writes, or every write
/// would fail with a validation error.
fn check_key_schema(
    table: &TableName,
    description: &TableDescription,
    key: &str,
    key_type: &ScalarAttributeType,
) -> Result<(), RepositoryError> {
    let hash_only = matches!(
        description.key_schema(),
        [element] if element.attribute_name() == key && element.key_type() == &KeyType::Hash
    );
    let typed = description
        .attribute_definitions()
        .iter()
        .any(|d| d.attribute_name() == key && d.attribute_type() == key_type);
    if hash_only && typed {
        Ok(())
    } else {
        Err(RepositoryError::Configuration(format!(
            "DynamoDB table {table} exists with another key schema; flows needs the single \
             partition key {key} of type {key_type}"
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(url: &str) -> ConnectOptions {
        ConnectOptions::parse(url).expect(url)
    }

    #[test]
    fn bare_scheme_uses_the_aws_chain() {
        assert_eq!(
            parse("dynamodb://"),
            ConnectOptions {
                endpoint: None,
                region: None
            }
        );
        assert_eq!(
            parse("dynamodb://?region=eu-west-1").region.as_deref(),
            Some("eu-west-1")
        );
        assert_eq!(parse("dynamodb://?region=eu-west-1").endpoint, None);
    }

    #[test]
    fn host_port_region_and_tls() {
        assert_eq!(
            parse("dynamodb://localhost:8000?region=us-east-1&tls=false"),
            ConnectOptions {
                endpoint: Some("http://localhost:8000".into()),
                region: Some("us-east-1".into())
            }
        );
        assert_eq!(
            parse("dynamodb://dynamodb.internal").endpoint.as_deref(),
            Some("https://dynamodb.internal")
        );
        assert_eq!(
            parse("dynamodb://[::1]:8000/?tls=false")
                .endpoint
                .as_deref(),
            Some("http://[::1]:8000")
        );
    }

    #[test]
    fn mistakes_are_configuration_errors_without_the_url() {
        for url in [
            "postgres://localhost",
            "dynamodb://key:secret@localhost:8000",
            "dynamodb://localhost:8000/table",
            "dynamodb://localhost:8000?tls=maybe",
            "dynamodb://localhost:8000?regoin=x",
            "dynamodb://?tls=false",
            "not a url",
        ] {
            match ConnectOptions::parse(url) {
                Err(RepositoryError::Configuration(message)) => {
                    assert!(!message.contains("secret"), "{message}");
                }
                other => panic!("{url}: {other:?}"),
            }
        }
    }
}
