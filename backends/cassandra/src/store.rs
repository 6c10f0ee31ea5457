//! The connection shared by the repositories: one driver session (a pool per node),
//! the keyspace and the fencing mode new state repositories use.

use flows_core::backend::{TableMode, missing_table};
use std::fmt;
use std::sync::Arc;

use flows_core::{RepositoryError, TableName};
use scylla::client::session::Session;
use scylla::client::session_builder::SessionBuilder;
use scylla::policies::timestamp_generator::MonotonicTimestampGenerator;
use scylla::statement::prepared::PreparedStatement;

use crate::error::{is_invalid_prepare, map_execution, map_new_session, map_prepare};
use crate::fencing::Fencing;

/// The native protocol port used when a host has none.
pub const DEFAULT_PORT: u16 = 9042;

/// The keyspace used when the URL has no path.
pub const DEFAULT_KEYSPACE: &str = "flows";

/// A session on a Cassandra or ScyllaDB cluster and the keyspace the repositories use.
/// Cheap to clone: clones share the session.
#[derive(Clone)]
pub struct CassandraStore {
    session: Arc<Session>,
    keyspace: TableName,
    fencing: Fencing,
    without_lwt: bool,
}

impl fmt::Debug for CassandraStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CassandraStore")
            .field("keyspace", &self.keyspace.as_str())
            .field("fencing", &self.fencing)
            .finish()
    }
}

/// Where the keyspace's replicas go.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Replication {
    /// `SimpleStrategy` with this replication factor (one data center).
    Simple(u32),
    /// `NetworkTopologyStrategy`: a replication factor per data center.
    NetworkTopology(Vec<(String, u32)>),
}

impl Replication {
    /// The CQL map literal of `CREATE KEYSPACE ... WITH replication = `.
    pub fn to_cql(&self) -> String {
        match self {
            Replication::Simple(rf) => {
                format!("{{'class': 'SimpleStrategy', 'replication_factor': {rf}}}")
            }
            Replication::NetworkTopology(dcs) => {
                let mut map = String::from("{'class': 'NetworkTopologyStrategy'");
                for (dc, rf) in dcs {
                    map.push_str(&format!(", '{dc}': {rf}"));
                }
                map.push('}');
                map
            }
        }
    }
}

/// Everything a `cassandra://` URL says.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CassandraConfig {
    /// Contact points, `host:port`.
    pub hosts: Vec<String>,
    /// The keyspace (validated, lower case: CQL folds unquoted names).
    pub keyspace: String,
    /// Replication of the keyspace if it is created.
    pub replication: Replication,
    /// Data center whose nodes the driver prefers (`local_dc`).
    pub local_dc: Option<String>,
    /// User name and password.
    pub credentials: Option<(String, String)>,
    /// Fencing of the state repositories.
    pub fencing: Fencing,
    /// Whether the driver waits for schema agreement after `CREATE` statements.
    pub await_schema_agreement: bool,
}

impl CassandraConfig {
    /// Parses `cassandra://[user:password@]host[:port][,host[:port]...][/keyspace][?options]`.
    ///
    /// Options: `replication_factor=N` (default 1); `dc=NAME` or `dc=NAME:N`, repeated,
    /// for `NetworkTopologyStrategy` (each data center gets `N`, or `replication_factor`);
    /// `local_dc=NAME`; `fencing=lwt|timestamps` (default `lwt`);
    /// `await_schema_agreement=true|false` (default `true`).
    pub fn parse(url: &str) -> Result<Self, RepositoryError> {
        let bad = |why: &str| RepositoryError::Configuration(format!("cassandra URL: {why}"));
        let rest = url
            .strip_prefix("cassandra://")
            .ok_or_else(|| bad("must start with cassandra://"))?;
        let (rest, query) = rest.split_once('?').unwrap_or((rest, ""));
        let (authority, path) = rest.split_once('/').unwrap_or((rest, ""));
        // The host list may contain `,` and `:`, which a URL parser does not accept in
        // a host, so the authority is split by hand.
        let (credentials, hosts) = match authority.rsplit_once('@') {
            Some((userinfo, hosts)) => {
                let (user, password) = userinfo.split_once(':').unwrap_or((userinfo, ""));
                let decode = |s: &str| {
                    url::form_urlencoded::parse(format!("x={s}").as_bytes())
                        .next()
                        .map(|(_, v)| v.into_owned())
                        .unwrap_or_default()
                };
                (Some((decode(user), decode(password))), hosts)
            }
            None => (None, authority),
        };
        let hosts: Vec<String> = hosts
            .split(',')
            .filter(|h| !h.is_empty())
            .map(|h| {
                let has_port = h
                    .rsplit_once(':')
                    .is_some_and(|(_, p)| p.parse::<u16>().is_ok() && !h.ends_with(']'));
                if has_port {
                    h.to_owned()
                } else {
                    format!("{h}:{DEFAULT_PORT}")
                }
            })
            .collect();
        if hosts.is_empty() {
            return Err(bad("no host"));
        }
        let keyspace = match path.trim_end_matches('/') {
            "" => DEFAULT_KEYSPACE.to_owned(),
            name => TableName::new(name)?.as_str().to_ascii_lowercase(),
        };
        let mut replication_factor = 1u32;
        let mut dcs: Vec<(String, Option<u32>)> = Vec::new();
        let mut local_dc = None;
        let mut fencing = Fencing::default();
        let mut await_schema_agreement = true;
        for (key, value) in url::form_urlencoded::parse(query.as_bytes()) {
            match key.as_ref() {
                "replication_factor" => {
                    replication_factor = value
                        .parse()
                        .ok()
                        .filter(|rf| *rf > 0)
                        .ok_or_else(|| bad("replication_factor must be a positive integer"))?;
                }
                "dc" => {
                    let (name, rf) = match value.split_once(':') {
                        Some((name, rf)) => (
                            name,
                            Some(
                                rf.parse()
                                    .map_err(|_| bad("dc=NAME:N needs a number after `:`"))?,
                            ),
                        ),
                        None => (value.as_ref(), None),
                    };
                    // Data center names go into a CQL string literal: keep them plain.
                    if name.is_empty()
                        || !name
                            .chars()
                            .all(|c| c.is_ascii_alphanumeric() || "_-.".contains(c))
                    {
                        return Err(bad("dc names are letters, digits, `_`, `-` and `.`"));
                    }
                    dcs.push((name.to_owned(), rf));
                }
                "local_dc" => local_dc = Some(value.into_owned()),
                "fencing" => {
                    fencing = Fencing::parse(&value)
                        .ok_or_else(|| bad("fencing must be `lwt` or `timestamps`"))?;
                }
                "await_schema_agreement" => {
                    await_schema_agreement = value
                        .parse()
                        .map_err(|_| bad("await_schema_agreement must be true or false"))?;
                }
                other => return Err(bad(&format!("unknown option `{other}`"))),
            }
        }
        let replication = if dcs.is_empty() {
            Replication::Simple(replication_factor)
        } else {
            Replication::NetworkTopology(
                dcs.into_iter()
                    .map(|(dc, rf)| (dc, rf.unwrap_or(replication_factor)))
                    .collect(),
            )
        };
        Ok(Self {
            hosts,
            keyspace,
            replication,
            local_dc,
            credentials,
            fencing,
            await_schema_agreement,
        })
    }
}

impl CassandraStore {
    /// Connects to the cluster of a `cassandra://` URL (see [`CassandraConfig::parse`])
    /// and creates its keyspace if missing.
    pub async fn connect(url: &str) -> Result<Self, RepositoryError> {
        Self::connect_with(CassandraConfig::parse(url)?).await
    }

    /// Connects with a parsed configuration and creates the keyspace if missing.
    pub async fn connect_with(config: CassandraConfig) -> Result<Self, RepositoryError> {
        let mut builder = SessionBuilder::new()
            .known_nodes(&config.hosts)
            // Client-side timestamps that never go backwards within this process, so
            // that a row delete and a later upsert of the same key keep their order
            // whichever coordinators (with whatever clocks) handle them.
            .timestamp_generator(Arc::new(MonotonicTimestampGenerator::new()))
            .auto_await_schema_agreement(config.await_schema_agreement);
        if let Some((user, password)) = &config.credentials {
            builder = builder.user(user, password);
        }
        if let Some(dc) = &config.local_dc {
            builder = builder.prefer_datacenter(dc.clone());
        }
        let session = builder.build().await.map_err(map_new_session)?;
        let keyspace = TableName::new(&config.keyspace)?;
        let store = Self {
            session: Arc::new(session),
            keyspace,
            fencing: config.fencing,
            without_lwt: false,
        };
        store
            .execute_ddl(&format!(
                "CREATE KEYSPACE IF NOT EXISTS {} WITH replication = {}",
                store.keyspace.as_str(),
                config.replication.to_cql()
            ))
            .await?;
        Ok(store)
    }

    /// The fencing mode of state repositories opened on this store from now on
    /// (default: the URL's `fencing`, else [`Fencing::LightweightTransactions`]).
    pub fn with_fencing(mut self, fencing: Fencing) -> Self {
        self.fencing = fencing;
        self
    }

    /// The fencing mode new state repositories get.
    pub fn fencing(&self) -> Fencing {
        self.fencing
    }

    /// Accepts servers that do not implement lightweight transactions: in-memory
    /// imitations of Cassandra used in tests (kassandra), which ignore `IF` clauses
    /// and answer without the `[applied]` column. Such an answer is then taken as
    /// applied, and a condition the server did not declare as a bind marker is not
    /// sent.
    ///
    /// **With this, [`Fencing::LightweightTransactions`] fences nothing.** Never use it
    /// against a real cluster; without it, such a server is refused with a
    /// [`Configuration`](RepositoryError::Configuration) error.
    pub fn accept_servers_without_lwt(mut self, accept: bool) -> Self {
        self.without_lwt = accept;
        self
    }

    pub(crate) fn accepts_servers_without_lwt(&self) -> bool {
        self.without_lwt
    }

    /// The keyspace of the repositories.
    pub fn keyspace(&self) -> &str {
        self.keyspace.as_str()
    }

    /// The driver session, for anything the repositories do not do.
    pub fn session(&self) -> &Session {
        &self.session
    }

    /// `keyspace.table`, lower case (CQL folds unquoted names; kassandra-style servers
    /// do not take quoted ones).
    pub(crate) fn qualified(&self, table: &TableName) -> String {
        format!(
            "{}.{}",
            self.keyspace.as_str(),
            table.as_str().to_ascii_lowercase()
        )
    }

    /// Runs a schema statement (`CREATE ... IF NOT EXISTS`).
    pub(crate) async fn execute_ddl(&self, cql: &str) -> Result<(), RepositoryError> {
        self.session
            .query_unpaged(cql, ())
            .await
            .map_err(map_execution)?;
        Ok(())
    }

    /// Runs `ddl` or, under [`TableMode::RequireExisting`], checks that `table` (in this
    /// store's keyspace) exists: the server finds a statement on a missing table
    /// invalid ("unconfigured table"), reported as the missing table.
    pub(crate) async fn prepare_table(
        &self,
        table: &str,
        ddl: &str,
        mode: TableMode,
    ) -> Result<(), RepositoryError> {
        if mode == TableMode::CreateIfMissing {
            return self.execute_ddl(ddl).await;
        }
        let probe = format!("SELECT * FROM {table} LIMIT 1");
        match self.session.prepare(probe).await {
            Ok(_) => Ok(()),
            Err(error) if is_invalid_prepare(&error) => Err(missing_table("Cassandra", table)),
            Err(error) => Err(map_prepare(error)),
        }
    }

    /// Prepares a statement once; every execution of it is then token-aware.
    pub(crate) async fn prepare(
        &self,
        cql: String,
        idempotent: bool,
    ) -> Result<PreparedStatement, RepositoryError> {
        let mut prepared = self.session.prepare(cql).await.map_err(map_prepare)?;
        // Idempotent statements may be retried and speculatively executed by the driver.
        prepared.set_is_idempotent(idempotent);
        Ok(prepared)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_hosts_keyspace_and_options() {
        let config = CassandraConfig::parse(
            "cassandra://app:p%40ss@h1:9043,h2,[::1]:9044/Flows_Prod?replication_factor=3&dc=dc1&dc=dc2:5&local_dc=dc1&fencing=timestamps&await_schema_agreement=false",
        )
        .unwrap();
        assert_eq!(config.hosts, ["h1:9043", "h2:9042", "[::1]:9044"]);
        assert_eq!(config.keyspace, "flows_prod");
        assert_eq!(
            config.replication,
            Replication::NetworkTopology(vec![("dc1".into(), 3), ("dc2".into(), 5)])
        );
        assert_eq!(
            config.replication.to_cql(),
            "{'class': 'NetworkTopologyStrategy', 'dc1': 3, 'dc2': 5}"
        );
        assert_eq!(config.local_dc.as_deref(), Some("dc1"));
        assert_eq!(config.credentials, Some(("app".into(), "p@ss".into())));
        assert_eq!(config.fencing, Fencing::WriteTimestamps);
        assert!(!config.await_schema_agreement);

        let plain = CassandraConfig::parse("cassandra://localhost").unwrap();
        assert_eq!(plain.hosts, ["localhost:9042"]);
        assert_eq!(plain.keyspace, DEFAULT_KEYSPACE);
        assert_eq!(plain.replication, Replication::Simple(1));
        assert_eq!(plain.fencing, Fencing::LightweightTransactions);
        assert!(plain.await_schema_agreement);
    }

    #[test]
    fn rejects_bad_urls() {
        for url in [
            "postgres://h/ks",
            "cassandra:///ks",
            "cassandra://h/bad-name",
            "cassandra://h/ks?replication_factor=0",
            "cassandra://h/ks?dc=x'y",
            "cassandra://h/ks?fencing=maybe",
            "cassandra://h/ks?colour=blue",
        ] {
            assert!(
                matches!(
                    CassandraConfig::parse(url),
                    Err(RepositoryError::Configuration(_))
                ),
                "{url}"
            );
        }
    }
}
