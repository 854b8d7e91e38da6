//! The module's configuration and its calls to custodyd: one mTLS channel
//! per configured server, made lazily, and the few RPCs a PKCS#11 token
//! needs (find keys, read public keys, sign, verify). Everything here is
//! safe Rust; the async calls run on the module's own runtime.

use std::path::{Path, PathBuf};
use std::time::Duration;

use custody_proto::v1::key_service_client::KeyServiceClient;
use custody_proto::v1::signing_service_client::SigningServiceClient;
use custody_proto::v1::{
    Algorithm, Digest, GetKeyRequest, GetPublicKeyRequest, KeyPurpose, ListKeysRequest,
    SignRequest, SignatureEncoding, VerifyRequest, digest, sign_request, verify_request,
};
use serde::Deserialize;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};
use zeroize::Zeroizing;

/// The environment variable naming the module's configuration file.
pub const CONFIG_ENV: &str = "CUSTODY_PKCS11_CONF";

/// The configuration file (TOML).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Where the module writes its log (appending); standard error if unset.
    #[serde(default)]
    pub log_file: Option<PathBuf>,
    /// One slot per server, in this order (slot ids 0, 1, ...).
    #[serde(rename = "server")]
    pub servers: Vec<ServerConfig>,
}

/// One custodyd (one slot, one token).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerConfig {
    /// The token label (at most 32 bytes).
    pub label: String,
    /// `https://host:port` of custodyd.
    pub address: String,
    /// The CA that issued custodyd's server certificate (PEM).
    pub ca_file: PathBuf,
    /// The client certificate: the caller's custody identity (PEM).
    pub cert_file: PathBuf,
    /// Its private key (PEM).
    pub key_file: PathBuf,
    /// The keys the token shows (key ids). Empty: every signing key
    /// `ListKeys` returns, which needs an operator, officer or auditor role.
    #[serde(default)]
    pub keys: Vec<String>,
    /// The deadline of each call to custodyd.
    #[serde(default = "default_timeout_ms")]
    pub timeout_ms: u64,
    /// How long a list of keys read from custodyd is reused by later
    /// searches (0: every `C_FindObjectsInit` asks again). A rotation shows
    /// its new primary version after at most this long.
    #[serde(default = "default_object_cache_secs")]
    pub object_cache_secs: u64,
}

fn default_timeout_ms() -> u64 {
    30_000
}

fn default_object_cache_secs() -> u64 {
    10
}

impl Config {
    /// Reads the file named by [`CONFIG_ENV`].
    pub fn from_env() -> Result<Config, String> {
        let path = std::env::var_os(CONFIG_ENV)
            .ok_or_else(|| format!("{CONFIG_ENV} is not set: it names the module's config file"))?;
        Self::read(Path::new(&path))
    }

    /// Reads and checks a config file.
    pub fn read(path: &Path) -> Result<Config, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        let config: Config =
            toml::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))?;
        if config.servers.is_empty() {
            return Err(format!("{}: no [[server]] is configured", path.display()));
        }
        for server in &config.servers {
            if server.label.is_empty() || server.label.len() > 32 {
                return Err(format!(
                    "{}: a server label must be 1-32 bytes: {:?}",
                    path.display(),
                    server.label
                ));
            }
        }
        Ok(config)
    }
}

/// A lazily connecting mTLS channel to one custodyd.
#[derive(Clone)]
pub struct Remote {
    channel: Channel,
    timeout: Duration,
}

/// A key the token shows: one version of a custody signing key.
#[derive(Debug, Clone)]
pub struct RemoteKey {
    /// The key id.
    pub key_id: String,
    /// The version (the key's primary version when it was found).
    pub version: u32,
    /// The key's algorithm.
    pub algorithm: Algorithm,
    /// The version's SubjectPublicKeyInfo, DER.
    pub spki_der: Vec<u8>,
}

impl Remote {
    /// Builds the channel (no connection is made until the first call).
    pub fn new(server: &ServerConfig) -> Result<Remote, String> {
        let read = |path: &Path| {
            std::fs::read(path)
                .map(Zeroizing::new)
                .map_err(|e| format!("cannot read {}: {e}", path.display()))
        };
        let ca = read(&server.ca_file)?;
        let cert = read(&server.cert_file)?;
        let key = read(&server.key_file)?;
        let uri: tonic::transport::Uri = server
            .address
            .parse()
            .map_err(|e| format!("server address {:?}: {e}", server.address))?;
        let host = uri
            .host()
            .ok_or_else(|| format!("server address {:?} has no host", server.address))?
            .to_string();
        let tls = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(&*ca))
            .identity(Identity::from_pem(&*cert, &*key))
            .domain_name(host);
        let timeout = Duration::from_millis(server.timeout_ms);
        // Our own TCP connector, so that the connect timeout bounds the TLS
        // handshake as well (tonic's own bounds only TCP): a custodyd that
        // takes the connection and says nothing cannot hold a PKCS#11 call
        // past its deadline, on the first connection or any later one.
        let mut tcp = hyper_util::client::legacy::connect::HttpConnector::new();
        tcp.enforce_http(false);
        tcp.set_nodelay(true);
        let channel = Channel::from_shared(server.address.clone())
            .map_err(|e| format!("server address {:?}: {e}", server.address))?
            .tls_config(tls)
            .map_err(|e| format!("TLS setup: {e}"))?
            .connect_timeout(timeout)
            .timeout(timeout)
            .connect_with_connector_lazy(tcp);
        Ok(Remote { channel, timeout })
    }

    /// The deadline of each call.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// The key ids to show: `configured`, or every signing key ListKeys
    /// returns.
    pub async fn key_ids(&self, configured: &[String]) -> Result<Vec<String>, tonic::Status> {
        if !configured.is_empty() {
            return Ok(configured.to_vec());
        }
        let mut client = KeyServiceClient::new(self.channel.clone());
        let mut ids = Vec::new();
        let mut page_token = String::new();
        loop {
            let page = client
                .list_keys(ListKeysRequest {
                    page_size: 1000,
                    page_token,
                })
                .await?
                .into_inner();
            ids.extend(
                page.keys
                    .iter()
                    .filter(|k| k.purpose == KeyPurpose::AsymmetricSign as i32)
                    .filter_map(|k| k.name.strip_prefix("keys/").map(str::to_string)),
            );
            if page.next_page_token.is_empty() {
                return Ok(ids);
            }
            page_token = page.next_page_token;
        }
    }

    /// The primary version of `key_id`, its algorithm and public key.
    pub async fn key(&self, key_id: &str) -> Result<RemoteKey, tonic::Status> {
        let mut keys = KeyServiceClient::new(self.channel.clone());
        let key = keys
            .get_key(GetKeyRequest {
                name: format!("keys/{key_id}"),
            })
            .await?
            .into_inner();
        let version = key.primary_version;
        let public = keys
            .get_public_key(GetPublicKeyRequest {
                name: format!("keys/{key_id}/versions/{version}"),
            })
            .await?
            .into_inner();
        Ok(RemoteKey {
            key_id: key_id.to_string(),
            version,
            algorithm: Algorithm::try_from(key.algorithm).unwrap_or(Algorithm::Unspecified),
            spki_der: public.der,
        })
    }

    /// Signs `input` with `keys/{key_id}/versions/{version}`; ECDSA
    /// signatures (`ecdsa`) come back raw (`r‖s`), as PKCS#11 returns them.
    pub async fn sign(
        &self,
        key_id: &str,
        version: u32,
        ecdsa: bool,
        input: Input,
    ) -> Result<Vec<u8>, tonic::Status> {
        let input = match input {
            Input::Digest(d) => sign_request::Input::Digest(d.into_wire()),
            Input::Data(data) => sign_request::Input::Data(data),
        };
        let request = SignRequest {
            name: format!("keys/{key_id}/versions/{version}"),
            input: Some(input),
            encoding: encoding(ecdsa) as i32,
            ..Default::default()
        };
        let response = self
            .while_busy(|| {
                let mut client = SigningServiceClient::new(self.channel.clone());
                let request = request.clone();
                async move { client.sign(request).await }
            })
            .await?;
        Ok(response.into_inner().signature)
    }

    /// Whether `signature` (raw for ECDSA) verifies over `input`.
    pub async fn verify(
        &self,
        key_id: &str,
        version: u32,
        ecdsa: bool,
        input: Input,
        signature: Vec<u8>,
    ) -> Result<bool, tonic::Status> {
        let input = match input {
            Input::Digest(d) => verify_request::Input::Digest(d.into_wire()),
            Input::Data(data) => verify_request::Input::Data(data),
        };
        let request = VerifyRequest {
            name: format!("keys/{key_id}/versions/{version}"),
            input: Some(input),
            signature,
            encoding: encoding(ecdsa) as i32,
        };
        let response = self
            .while_busy(|| {
                let mut client = SigningServiceClient::new(self.channel.clone());
                let request = request.clone();
                async move { client.verify(request).await }
            })
            .await?;
        Ok(response.into_inner().valid)
    }

    /// `call`, made again while custodyd answers `HSM_BUSY` (the HSM queue,
    /// or the caller's share of it, is full: nothing was done), after about
    /// the wait custodyd asks for, as long as the next try starts within the
    /// deadline; all of it, connecting included, within the deadline.
    /// PKCS#11 has no "try again" to give the application, and software
    /// such as OpenSSL takes any error as final: a busy moment is a wait,
    /// not a failure. Each refused try is one audited refusal at custodyd.
    async fn while_busy<T, F, Fut>(&self, mut call: F) -> Result<T, tonic::Status>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<T, tonic::Status>>,
    {
        let until = tokio::time::Instant::now() + self.timeout;
        // The last HSM_BUSY: the answer if the deadline cuts a later try.
        let mut busy = None;
        let tries = async {
            loop {
                let refused = match call().await {
                    Err(status) if custody_proto::reason(&status) == "HSM_BUSY" => status,
                    done => return done,
                };
                let hint = custody_proto::retry_after(&refused).unwrap_or(BUSY_WAIT);
                let wait = jittered(hint.clamp(BUSY_WAIT_LEAST, BUSY_WAIT_MOST));
                if tokio::time::Instant::now() + wait >= until {
                    return Err(refused);
                }
                busy = Some(refused);
                tokio::time::sleep(wait).await;
            }
        };
        let answered = tokio::time::timeout_at(until, tries).await;
        answered.unwrap_or_else(|_| {
            Err(busy.unwrap_or_else(|| {
                tonic::Status::deadline_exceeded(format!(
                    "custodyd did not answer within timeout_ms ({} ms)",
                    self.timeout.as_millis()
                ))
            }))
        })
    }
}

/// How long to wait after `HSM_BUSY` when custodyd gives no hint (its
/// hint is 500 ms, docs/api.md "Bounded work").
const BUSY_WAIT: Duration = Duration::from_millis(500);

/// The bounds on a hint: none is followed into a tight loop or a long sleep.
const BUSY_WAIT_LEAST: Duration = Duration::from_millis(50);
const BUSY_WAIT_MOST: Duration = Duration::from_secs(5);

/// `wait` times a factor between 0.5 and 1.5 drawn afresh each time, so
/// that callers refused together do not all come back together. std's
/// `RandomState` is keyed at random per thread and changes with each use:
/// enough to spread retries (nothing secret depends on it).
fn jittered(wait: Duration) -> Duration {
    use std::hash::{BuildHasher, Hasher};
    let draw = std::collections::hash_map::RandomState::new()
        .build_hasher()
        .finish();
    wait.mul_f64(0.5 + (draw % 1001) as f64 / 1000.0)
}

/// Raw `r‖s` for ECDSA (PKCS#11's form); the one encoding otherwise.
fn encoding(ecdsa: bool) -> SignatureEncoding {
    if ecdsa {
        SignatureEncoding::Raw
    } else {
        SignatureEncoding::Unspecified
    }
}

/// What custodyd signs or verifies.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Input {
    /// A digest, by hash.
    Digest(HashedDigest),
    /// The message itself (Ed25519).
    Data(Vec<u8>),
}

/// A digest and the hash that made it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HashedDigest {
    /// SHA-256.
    Sha256(Vec<u8>),
    /// SHA-384.
    Sha384(Vec<u8>),
    /// SHA-512.
    Sha512(Vec<u8>),
}

impl HashedDigest {
    /// `--digest <hex> --hash <name>`, as `custodyctl request sign` takes
    /// them.
    pub fn custodyctl_args(&self) -> String {
        let (hash, bytes) = match self {
            HashedDigest::Sha256(d) => ("sha256", d),
            HashedDigest::Sha384(d) => ("sha384", d),
            HashedDigest::Sha512(d) => ("sha512", d),
        };
        format!("--digest {} --hash {hash}", hex::encode(bytes))
    }

    fn into_wire(self) -> Digest {
        Digest {
            digest: Some(match self {
                HashedDigest::Sha256(d) => digest::Digest::Sha256(d),
                HashedDigest::Sha384(d) => digest::Digest::Sha384(d),
                HashedDigest::Sha512(d) => digest::Digest::Sha512(d),
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_busy_wait_is_spread_between_half_and_one_and_a_half_times_the_hint() {
        let hint = Duration::from_millis(500);
        let waits: Vec<Duration> = (0..200).map(|_| jittered(hint)).collect();
        for wait in &waits {
            assert!(
                (hint / 2..=hint * 3 / 2).contains(wait),
                "{wait:?} is outside 250-750 ms"
            );
        }
        // Spread, not one value: callers refused together come back apart.
        let (least, most) = (waits.iter().min().unwrap(), waits.iter().max().unwrap());
        assert!(
            *most - *least >= Duration::from_millis(250),
            "{least:?}..{most:?}"
        );
    }
}
