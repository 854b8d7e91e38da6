//! What custodyctl says when its connection to custodyd fails (threat model
//! O6): every TLS failure named in words, with the certificate at fault,
//! what is wrong with it and the file to fix; never a bare "transport
//! error", never success. Against the real custodyd on SoftHSM2 over real
//! mTLS, through `custody_daemon::client::connect_files`, the function
//! custodyctl connects with.

#![allow(
    clippy::unwrap_used,
    reason = "a test fails by panicking on the unexpected"
)]

use std::path::{Path, PathBuf};

use custody_core::identity::Role;
use custody_daemon::client::{ClientFiles, connect_files};
use custody_daemon::devpki::{Ca, Issued, Validity};
use custody_proto::v1::ListKeysRequest;
use custody_proto::v1::key_service_client::KeyServiceClient;
use softhsm_tests::service::{TestService, runtime};
use softhsm_tests::token_test;

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}

/// The files of `issued` in `dir`, trusting the CA in `ca`.
fn files(dir: &Path, tag: &str, ca: &Path, issued: &Issued) -> ClientFiles {
    ClientFiles {
        ca: ca.to_path_buf(),
        cert: write(dir, &format!("{tag}.pem"), &issued.cert_pem),
        key: write(dir, &format!("{tag}.key"), &issued.key_pem),
    }
}

/// A validity window that ended yesterday.
fn expired() -> Validity {
    let now = time::OffsetDateTime::now_utc();
    Validity {
        not_before: now - time::Duration::days(30),
        not_after: now - time::Duration::days(1),
    }
}

/// The connection's failure, which must be one, in words.
async fn refusal(url: &str, files: &ClientFiles) -> String {
    match connect_files(url, files).await {
        Ok(_) => panic!("connected to {url} with {files:?}"),
        Err(words) => {
            assert!(
                !words.starts_with("cannot connect to"),
                "a bare transport error: {words}"
            );
            words
        }
    }
}

fn assert_says(words: &str, parts: &[&str]) {
    for part in parts {
        assert!(words.contains(part), "{words:?} does not say {part:?}");
    }
}

token_test! {
    fn every_tls_failure_names_the_certificate_the_problem_and_the_file(token) {
        runtime().block_on(async {
            let service = TestService::start(token).await;
            let url = service.url();
            let dir = token.scratch().join("client");
            std::fs::create_dir_all(&dir).unwrap();
            let ca = write(&dir, "ca.pem", service.ca.cert_pem());
            let good = files(&dir, "operator", &ca, &service.ca.issue_client("operator", &[Role::Operator], Validity::days(1)).unwrap());

            // The right files connect, and the channel works.
            let channel = connect_files(&url, &good).await.unwrap();
            KeyServiceClient::new(channel).list_keys(ListKeysRequest::default()).await.unwrap();

            // custodyd's certificate from another CA than the one in --ca.
            let other = Ca::new("another CA").unwrap();
            let other_ca = write(&dir, "other-ca.pem", other.cert_pem());
            let words = refusal(&url, &ClientFiles { ca: other_ca.clone(), ..good.clone() }).await;
            assert_says(&words, &["custodyd's certificate", "not issued by the CA", &other_ca.display().to_string(), "--ca"]);

            // Our certificate expired.
            let stale = files(&dir, "stale", &ca, &service.ca.issue_client("operator", &[Role::Operator], expired()).unwrap());
            let words = refusal(&url, &stale).await;
            assert_says(&words, &["client certificate", &stale.cert.display().to_string(), "expired"]);

            // Our key is not our certificate's.
            let another = service.ca.issue_client("auditor", &[Role::Auditor], Validity::days(1)).unwrap();
            let mismatched = ClientFiles { key: write(&dir, "auditor.key", &another.key_pem), ..good.clone() };
            let words = refusal(&url, &mismatched).await;
            assert_says(&words, &["is not the key of", &mismatched.key.display().to_string(), &good.cert.display().to_string()]);

            // The CA file: missing, unreadable, or not a certificate.
            let missing = dir.join("no-such-ca.pem");
            let words = refusal(&url, &ClientFiles { ca: missing.clone(), ..good.clone() }).await;
            assert_says(&words, &["cannot read the CA file", &missing.display().to_string(), "no such file"]);
            let words = refusal(&url, &ClientFiles { ca: good.key.clone(), ..good.clone() }).await;
            assert_says(&words, &["CA file", &good.key.display().to_string(), "holds no certificate"]);
            std::fs::create_dir_all(dir.join("a-directory")).unwrap();
            let words = refusal(&url, &ClientFiles { ca: dir.join("a-directory"), ..good.clone() }).await;
            assert_says(&words, &["cannot read the CA file", "a-directory"]);

            // A CA file whose only CA expired is named; one that keeps an
            // expired CA beside the current one still connects.
            let mut params = rcgen::CertificateParams::default();
            params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
            params.not_before = expired().not_before;
            params.not_after = expired().not_after;
            let old_ca = params.self_signed(&rcgen::KeyPair::generate().unwrap()).unwrap().pem();
            let stale_ca = write(&dir, "stale-ca.pem", &old_ca);
            let words = refusal(&url, &ClientFiles { ca: stale_ca.clone(), ..good.clone() }).await;
            assert_says(&words, &["the CA certificate in", &stale_ca.display().to_string(), "expired"]);
            let both = write(&dir, "both-ca.pem", &format!("{old_ca}{}", service.ca.cert_pem()));
            connect_files(&url, &ClientFiles { ca: both, ..good.clone() }).await.unwrap();

            // http:// where custodyd speaks TLS.
            let plain = url.replace("https://", "http://");
            let words = refusal(&plain, &good).await;
            assert_says(&words, &["plain http", "custodyd speaks only TLS", &url]);

            // custodyd refuses a client certificate of a CA it does not trust.
            let outsider = files(&dir, "outsider", &ca, &other.issue_client("operator", &[Role::Operator], Validity::days(1)).unwrap());
            let words = refusal(&url, &outsider).await;
            // Its alert, or the connection closed before the alert is read
            // (a race on a busy machine): either way custodyd refused it,
            // and the message names the trust.
            assert_says(&words, &["custodyd refused", &outsider.cert.display().to_string(), "CA", "trust"]);

            // custodyd refuses a revoked client certificate.
            let revoked = files(&dir, "revoked", &ca, &service.revoked);
            let words = refusal(&url, &revoked).await;
            assert_says(&words, &["custodyd refused", &revoked.cert.display().to_string()]);

            // Nobody listening.
            let port = softhsm_tests::process::free_port();
            let words = refusal(&format!("https://localhost:{port}"), &good).await;
            assert_says(&words, &["nothing accepts connections", "is custodyd running"]);
        });
    }
}

token_test! {
    fn a_server_certificate_expired_or_for_another_name_is_named(token) {
        runtime().block_on(async {
            let service = TestService::start(token).await;
            let url = service.url();
            let dir = token.scratch().join("client");
            std::fs::create_dir_all(&dir).unwrap();
            let ca = write(&dir, "ca.pem", service.ca.cert_pem());
            let good = files(&dir, "operator", &ca, &service.ca.issue_client("operator", &[Role::Operator], Validity::days(1)).unwrap());
            let serve = |issued: &Issued| {
                std::fs::write(&service.config.tls.cert, &issued.cert_pem).unwrap();
                std::fs::write(&service.config.tls.key, &issued.key_pem).unwrap();
                service.reload_tls().unwrap();
            };

            // custodyd's certificate names another host, and hidden
            // characters in its names reach the message escaped.
            serve(&service.ca.issue_server(&["custody.example", "evil\u{1b}[2J.example"]).unwrap());
            let words = refusal(&url, &good).await;
            assert_says(&words, &["custodyd's certificate", "not valid for the host name localhost", "custody.example"]);
            assert!(!words.chars().any(custody_core::text::is_hidden), "raw peer text: {words:?}");

            // custodyd's certificate expired: the operator's to fix, not ours.
            serve(&service.ca.issue_server_for(&["localhost"], expired()).unwrap());
            let words = refusal(&url, &good).await;
            assert_says(&words, &["custodyd's certificate", "has expired", "your files are not at fault"]);
        });
    }
}

/// `openssl s_server` on a port of its own: verifies the client certificate
/// against `ca`, agrees on HTTP/2, then never answers it. It serves one
/// connection at a time, so each case gets its own.
struct SilentAfterTls {
    child: std::process::Child,
    url: String,
}

impl SilentAfterTls {
    fn start(cert: &Path, key: &Path, ca: &Path) -> SilentAfterTls {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let child = std::process::Command::new("openssl")
            .args(["s_server", "-quiet", "-alpn", "h2", "-Verify", "1"])
            .args(["-accept", &format!("127.0.0.1:{port}")])
            .arg("-cert")
            .arg(cert)
            .arg("-key")
            .arg(key)
            .arg("-CAfile")
            .arg(ca)
            // Held open: at end of input s_server would close the connection.
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        // Listening within a moment: a bounded wait. The probe's connection
        // ends at once, and s_server goes on to the next.
        for _ in 0..400 {
            if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(25));
        }
        SilentAfterTls {
            child,
            url: format!("https://127.0.0.1:{port}"),
        }
    }
}

impl Drop for SilentAfterTls {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A server that takes the connection and then says nothing, or finishes
/// the TLS handshake and then says nothing (a stopped custodyd, a port that
/// is something else), is reported in words after `CONNECT_WITHIN`; a call
/// already under way when the server stops answering fails on an
/// unanswered ping. Neither holds custodyctl for ever.
#[test]
fn a_server_that_never_answers_is_reported_not_waited_for() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("custody test CA").unwrap();
    let ca_file = write(dir.path(), "ca.pem", ca.cert_pem());
    let server = ca.issue_server(&["localhost", "127.0.0.1"]).unwrap();
    let server_cert = write(dir.path(), "server.pem", &server.cert_pem);
    let server_key = write(dir.path(), "server.key", &server.key_pem);
    let operator = ca
        .issue_client("operator", &[Role::Operator], Validity::days(1))
        .unwrap();
    let good = files(dir.path(), "operator", &ca_file, &operator);

    // Silent from the start: the kernel completes the TCP handshake for a
    // listening socket nobody accepts on.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let silent_url = format!("https://127.0.0.1:{}", silent.local_addr().unwrap().port());
    let for_probe = SilentAfterTls::start(&server_cert, &server_key, &ca_file);
    // Not answering at all: a listener whose accept queue is full drops
    // the next connection's SYN (a backlog of one holds two).
    let full = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let full_addr = full.local_addr().unwrap();
    drop(full);
    let full_socket = runtime().block_on(async {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.bind(full_addr).unwrap();
        socket.listen(1).unwrap()
    });
    let queued: Vec<_> = (0..2)
        .map(|_| std::net::TcpStream::connect(full_addr).unwrap())
        .collect();
    let full_url = format!("https://127.0.0.1:{}", full_addr.port());
    let for_call = SilentAfterTls::start(&server_cert, &server_key, &ca_file);

    runtime().block_on(async {
        // The connection `connect` (no health check) opens is fine; the
        // call on it then meets a server that never answers.
        let call_under_way = async {
            let channel = custody_daemon::client::connect(
                &for_call.url,
                ca.cert_pem(),
                &operator.cert_pem,
                &operator.key_pem,
            )
            .await
            .unwrap();
            KeyServiceClient::new(channel)
                .list_keys(ListKeysRequest::default())
                .await
        };
        let (unanswered, before_tls, after_tls, call) = tokio::join!(
            refusal(&full_url, &good),
            refusal(&silent_url, &good),
            refusal(&for_probe.url, &good),
            call_under_way
        );
        assert_says(
            &unanswered,
            &[&full_url, "did not answer the connection within 5 s"],
        );
        assert_says(
            &before_tls,
            &[
                &silent_url,
                "did not complete the TLS handshake within 10 s",
                "is custodyd running",
            ],
        );
        assert_says(
            &after_tls,
            &[&for_probe.url, "did not answer a health check within 10 s"],
        );
        let error = call.expect_err("no answer came, so the call cannot have succeeded");
        assert_eq!(error.code(), tonic::Code::Unavailable, "{error:?}");
    });
    drop((silent, queued, full_socket));
}
