//! custodyd as a process: what must hold across SIGKILL, SIGHUP and SIGTERM.

#![allow(
    clippy::unwrap_used,
    reason = "a test fails by panicking on the unexpected"
)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use custody_daemon::devpki::{Ca, Issued, Validity};
use custody_daemon::identity::Role;
use custody_proto::v1::key_service_client::KeyServiceClient;
use custody_proto::v1::signing_service_client::SigningServiceClient;
use custody_proto::v1::{
    CreateKeyRequest, Digest, ListKeysRequest, SignRequest, digest, sign_request,
};
use softhsm_tests::{TestToken, token_test};
use tonic::transport::Channel;

struct Pki {
    ca: Ca,
    dir: PathBuf,
}

impl Pki {
    fn client(&self, principal: &str, roles: &[Role]) -> Issued {
        self.ca
            .issue_client(principal, roles, Validity::days(1))
            .unwrap()
    }
}

/// Writes a PKI and a config for a daemon on `port`; returns the config path.
fn prepare(token: &TestToken, port: u16) -> (Pki, PathBuf) {
    let dir = token.scratch().join("daemon");
    std::fs::create_dir_all(&dir).unwrap();
    let ca = Ca::new("process test CA").unwrap();
    let server = ca.issue_server(&["localhost"]).unwrap();
    let write = |name: &str, text: &str| {
        let path = dir.join(name);
        std::fs::write(&path, text).unwrap();
        path
    };
    write("ca.pem", ca.cert_pem());
    write("crl.pem", &ca.crl(&[]).unwrap());
    write("server.pem", &server.cert_pem);
    write("server.key", &server.key_pem);
    let config = format!(
        r#"listen = "127.0.0.1:{port}"
data_dir = "{dir}/data"
[hsm]
module = "{module}"
token_label = "{label}"
pin_file = "{pin}"
[tls]
cert = "{dir}/server.pem"
key = "{dir}/server.key"
client_ca = "{dir}/ca.pem"
crls = ["{dir}/crl.pem"]
"#,
        dir = dir.display(),
        module = softhsm_tests::module_path().display(),
        label = token.label(),
        pin = token.pin_file().display(),
    );
    let path = write("custodyd.toml", &config);
    (Pki { ca, dir }, path)
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn spawn(config: &Path) -> Child {
    Command::new(env!("CARGO_BIN_EXE_custodyd-under-test"))
        .arg(config)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .spawn()
        .unwrap()
}

async fn connect(pki: &Pki, port: u16, issued: &Issued) -> Result<Channel, String> {
    custody_daemon::client::connect(
        &format!("https://localhost:{port}"),
        pki.ca.cert_pem(),
        &issued.cert_pem,
        &issued.key_pem,
    )
    .await
}

/// Waits until the daemon answers (or panics after ten seconds).
async fn ready(pki: &Pki, port: u16, child: &mut Child) -> Channel {
    let operator = pki.client("operator", &[Role::Operator]);
    for _ in 0..200 {
        if let Some(status) = child.try_wait().unwrap() {
            panic!("custodyd exited early: {status}");
        }
        if let Ok(channel) = connect(pki, port, &operator).await {
            if KeyServiceClient::new(channel.clone())
                .list_keys(ListKeysRequest::default())
                .await
                .is_ok()
            {
                return channel;
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("custodyd did not come up");
}

fn sign_request(i: u32) -> SignRequest {
    SignRequest {
        name: "keys/k".into(),
        input: Some(sign_request::Input::Digest(Digest {
            digest: Some(digest::Digest::Sha256(vec![i as u8; 32])),
        })),
        ..Default::default()
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap()
}

token_test!(
    fn acknowledged_signatures_and_keys_survive_kill_9(token) {
        runtime().block_on(async {
            let port = free_port();
            let (pki, config) = prepare(token, port);
            let mut daemon = spawn(&config);
            let operator = ready(&pki, port, &mut daemon).await;
            KeyServiceClient::new(operator)
                .create_key(CreateKeyRequest {
                    key_id: "k".into(),
                    algorithm: custody_proto::v1::Algorithm::EcSignP256Sha256 as i32,
                    purpose: 1,
                    allowed_signers: vec!["ca".into()],
                    ..Default::default()
                })
                .await
                .unwrap();
            let signer = connect(&pki, port, &pki.client("ca", &[Role::Signer])).await.unwrap();
            let mut client = SigningServiceClient::new(signer);
            let acknowledged = 40;
            for i in 0..acknowledged {
                client.sign(sign_request(i)).await.unwrap();
            }
            // SIGKILL right after the last acknowledgement: nothing gets to flush.
            daemon.kill().unwrap();
            daemon.wait().unwrap();

            let mut daemon = spawn(&config);
            ready(&pki, port, &mut daemon).await;
            let auditor = connect(&pki, port, &pki.client("auditor", &[Role::Auditor])).await.unwrap();
            let mut stream = custody_proto::v1::audit_service_client::AuditServiceClient::new(auditor)
                .read_audit(custody_proto::v1::ReadAuditRequest { start_seq: 1 })
                .await
                .unwrap()
                .into_inner();
            let mut text = String::new();
            let mut signed = 0;
            while let Some(item) = stream.message().await.unwrap() {
                let line = match item.item.unwrap() {
                    custody_proto::v1::read_audit_response::Item::Record(r) => {
                        let entry = String::from_utf8(r.entry).unwrap();
                        if entry.contains("\"method\":\"Sign\"") && entry.contains("\"outcome\":\"ok\"") {
                            signed += 1;
                        }
                        custody_daemon::audit::ExportLine::Record { seq: r.seq, entry, hash: hex::encode(r.hash) }
                    }
                    custody_proto::v1::read_audit_response::Item::Head(h) => custody_daemon::audit::ExportLine::head(
                        &custody_daemon::audit::SignedHead { seq: h.seq, hash: h.hash.try_into().unwrap(), time: h.time, signature: h.signature },
                    ),
                };
                text.push_str(&serde_json::to_string(&line).unwrap());
                text.push('\n');
            }
            assert_eq!(signed, acknowledged, "acknowledged signatures missing from the audit log after SIGKILL");
            let report = custody_daemon::audit::verify_records(
                text.lines()
                    .filter_map(|l| match serde_json::from_str(l).unwrap() {
                        custody_daemon::audit::ExportLine::Record { seq, entry, hash } => Some(Ok(custody_daemon::audit::Record {
                            seq,
                            entry: entry.into_bytes(),
                            hash: hex::decode(hash).unwrap().try_into().unwrap(),
                        })),
                        custody_daemon::audit::ExportLine::Head { .. } => None,
                    }),
                None,
            );
            assert!(report.first_bad.is_none(), "chain broken after SIGKILL: {report:?}");
            // The key is still there and still signs.
            let signer = connect(&pki, port, &pki.client("ca", &[Role::Signer])).await.unwrap();
            SigningServiceClient::new(signer).sign(sign_request(99)).await.unwrap();
            daemon.kill().unwrap();
            daemon.wait().unwrap();
        });
    }
);

token_test!(
    fn sighup_reloads_certificates_and_sigterm_stops_cleanly(token) {
        runtime().block_on(async {
            let port = free_port();
            let (pki, config) = prepare(token, port);
            let mut daemon = spawn(&config);
            ready(&pki, port, &mut daemon).await;

            let new_ca = Ca::new("process test CA 2").unwrap();
            std::fs::write(pki.dir.join("ca.pem"), new_ca.cert_pem()).unwrap();
            std::fs::write(pki.dir.join("crl.pem"), new_ca.crl(&[]).unwrap()).unwrap();
            let status = Command::new("kill").args(["-HUP", &daemon.id().to_string()]).status().unwrap();
            assert!(status.success());
            let newcomer = new_ca.issue_client("operator", &[Role::Operator], Validity::days(1)).unwrap();
            let mut reloaded = false;
            for _ in 0..100 {
                if let Ok(channel) = connect(&pki, port, &newcomer).await {
                    if KeyServiceClient::new(channel).list_keys(ListKeysRequest::default()).await.is_ok() {
                        reloaded = true;
                        break;
                    }
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            assert!(reloaded, "a certificate of the new client CA is not accepted after SIGHUP");
            let old = pki.client("operator", &[Role::Operator]);
            let old_works = match connect(&pki, port, &old).await {
                Ok(channel) => KeyServiceClient::new(channel).list_keys(ListKeysRequest::default()).await.is_ok(),
                Err(_) => false,
            };
            assert!(!old_works, "the replaced client CA is still trusted");

            let status = Command::new("kill").args(["-TERM", &daemon.id().to_string()]).status().unwrap();
            assert!(status.success());
            let exit = tokio::task::spawn_blocking(move || daemon.wait().unwrap()).await.unwrap();
            assert!(exit.success(), "custodyd did not stop cleanly on SIGTERM: {exit}");
        });
    }
);
