//! A full disk under custodyd's data directory (threat model F8).
//!
//! The data directory is a small tmpfs mounted in a mount namespace the test
//! makes (`unshare -m`), held by a `sleep` process so that it outlives the
//! daemon's restarts; custodyd runs inside it (`nsenter -m`), and the test
//! fills and empties the disk through `/proc/{holder}/root`.

#![allow(
    clippy::unwrap_used,
    reason = "a test fails by panicking on the unexpected"
)]

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use custody_core::dual_control::officer_key::OfficerKey;
use custody_core::identity::Role;
use custody_proto::v1::ceremony_service_client::CeremonyServiceClient;
use custody_proto::v1::key_service_client::KeyServiceClient;
use custody_proto::v1::signing_service_client::SigningServiceClient;
use custody_proto::v1::{
    CreateKeyRequest, Digest, ListCeremoniesRequest, ListKeysRequest, SignRequest, digest,
    sign_request,
};
use custody_proto::v1::{OperationState, operation_spec};
use softhsm_tests::ceremony::Officers;
use softhsm_tests::process::{
    Daemon, Pki, audit_export, connect, free_port, officer_channels, prepare_ceremonies, ready,
    spawn_crashing_at, verify_export,
};
use softhsm_tests::service::reason;
use softhsm_tests::token_test;
use tonic::transport::Channel;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

const CUSTODYD: &str = env!("CARGO_BIN_EXE_custodyd-under-test");
const MIB: u64 = 1024 * 1024;

/// A tmpfs of `size_mib` at `mountpoint`, seen only inside a mount namespace
/// that a `sleep` process holds open; unmounted when the holder is killed.
struct SmallDisk {
    holder: Child,
    mountpoint: PathBuf,
}

impl SmallDisk {
    fn mount(mountpoint: &Path, size_mib: u64) -> SmallDisk {
        std::fs::create_dir_all(mountpoint).unwrap();
        let holder = Command::new("unshare")
            .args(["--mount", "--propagation", "private", "sh", "-c"])
            .arg(r#"mount -t tmpfs -o "size=$1m,mode=0700" custody-test "$2" && exec sleep 3600"#)
            .args(["sh", &size_mib.to_string()])
            .arg(mountpoint)
            .stdin(Stdio::null())
            .spawn()
            .unwrap();
        let disk = SmallDisk {
            holder,
            mountpoint: mountpoint.to_path_buf(),
        };
        let mountinfo = format!("/proc/{}/mountinfo", disk.holder.id());
        let mounted = (0..200).any(|_| {
            let seen = std::fs::read_to_string(&mountinfo).unwrap_or_default();
            let found = seen.lines().any(|l| {
                l.contains(" custody-test ") && l.contains(&*mountpoint.to_string_lossy())
            });
            if !found {
                std::thread::sleep(Duration::from_millis(25));
            }
            found
        });
        assert!(
            mounted,
            "the test's tmpfs was not mounted (unshare -m needs root)"
        );
        disk
    }

    /// `path` (under the mountpoint) as the test sees it from outside.
    fn outside(&self, path: &Path) -> PathBuf {
        let inside = path.strip_prefix("/").unwrap();
        PathBuf::from(format!("/proc/{}/root", self.holder.id())).join(inside)
    }

    /// Starts custodyd inside the namespace.
    fn spawn(&self, config: &Path) -> Daemon {
        let mut command = Command::new("nsenter");
        command
            .args(["--mount", "--target", &self.holder.id().to_string(), "--"])
            .arg(CUSTODYD);
        spawn_crashing_at(command, config, None)
    }

    fn free_bytes(&self) -> u64 {
        let out = Command::new("stat")
            .args(["-f", "-c", "%a %S"])
            .arg(self.outside(&self.mountpoint))
            .output()
            .unwrap();
        let text = String::from_utf8(out.stdout).unwrap();
        let mut fields = text.split_whitespace().map(|f| f.parse::<u64>().unwrap());
        fields.next().unwrap() * fields.next().unwrap()
    }

    /// Writes a filler file until at most `leave` bytes are free (0: until
    /// the disk refuses).
    fn fill(&self, leave: u64) {
        let mut file =
            std::fs::File::create(self.outside(&self.mountpoint.join("filler"))).unwrap();
        let chunk = vec![0x5a_u8; 64 * 1024];
        loop {
            let free = self.free_bytes();
            if free <= leave {
                return;
            }
            let take = usize::try_from((free - leave).min(chunk.len() as u64)).unwrap();
            match file
                .write_all(&chunk[..take])
                .and_then(|()| file.sync_all())
            {
                Ok(()) => {}
                Err(e) if e.raw_os_error() == Some(28) => return,
                Err(e) => panic!("filling the disk: {e}"),
            }
        }
    }

    fn empty(&self) {
        std::fs::remove_file(self.outside(&self.mountpoint.join("filler"))).unwrap();
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = self.holder.kill();
        let _ = self.holder.wait();
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap()
}

fn digest_request(i: u32) -> SignRequest {
    SignRequest {
        name: "keys/k".into(),
        input: Some(sign_request::Input::Digest(Digest {
            digest: Some(digest::Digest::Sha256(vec![(i % 251) as u8; 32])),
        })),
        ..Default::default()
    }
}

async fn create_key(operator: Channel, id: &str) -> Result<(), tonic::Status> {
    KeyServiceClient::new(operator)
        .create_key(CreateKeyRequest {
            key_id: id.into(),
            algorithm: custody_proto::v1::Algorithm::EcSignP256Sha256 as i32,
            purpose: 1,
            allowed_signers: vec!["ca".into()],
            ..Default::default()
        })
        .await
        .map(drop)
}

async fn health(channel: Channel) -> i32 {
    HealthClient::new(channel)
        .check(HealthCheckRequest {
            // Readiness of signing; the empty name (liveness) stays
            // SERVING while custodyd answers.
            service: "custody.v1.SigningService".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .status
}

/// Waits (bounded) until health reports `want`.
async fn health_becomes(channel: &Channel, want: ServingStatus) {
    for _ in 0..100 {
        if health(channel.clone()).await == want as i32 {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("health never became {want:?}");
}

async fn scrape(port: u16) -> String {
    tokio::task::spawn_blocking(move || softhsm_tests::service::scrape_metrics(port))
        .await
        .unwrap()
}

/// The Sign records of the log with outcome `ok`.
fn acknowledged_in(entries: &[String]) -> usize {
    entries
        .iter()
        .filter(|e| e.contains("\"method\":\"Sign\"") && e.contains("\"outcome\":\"ok\""))
        .count()
}

struct Setup {
    pki: Pki,
    port: u16,
    config: PathBuf,
    disk: SmallDisk,
    keys: Vec<OfficerKey>,
}

/// Officers alice, bob and carol (2 of 3), and `extra` config sections.
fn setup(token: &softhsm_tests::TestToken, extra: &str) -> Setup {
    let port = free_port();
    let (pki, config, keys) = prepare_ceremonies(token, port);
    let mut text = std::fs::read_to_string(&config).unwrap();
    text.push_str(extra);
    std::fs::write(&config, text).unwrap();
    let disk = SmallDisk::mount(&pki.dir.join("data"), 48);
    Setup {
        pki,
        port,
        config,
        disk,
        keys,
    }
}

token_test!(
    fn below_the_reserve_only_reads_are_served_and_service_resumes_when_space_returns(token) {
        runtime().block_on(async {
            let metrics_port = free_port();
            let s = setup(
                token,
                &format!("[storage]\nreserve_mib = 16\n[metrics]\nlisten = \"127.0.0.1:{metrics_port}\"\n"),
            );
            let mut daemon = s.disk.spawn(&s.config);
            let operator = ready(&s.pki, s.port, &mut daemon).await;
            create_key(operator.clone(), "k").await.unwrap();
            let ca = connect(&s.pki, s.port, &s.pki.client("ca", &[Role::Signer])).await.unwrap();
            let mut signer = SigningServiceClient::new(ca);
            signer.sign(digest_request(0)).await.unwrap();
            health_becomes(&operator, ServingStatus::Serving).await;
            // An operation waiting for officers when the disk fills.
            let officers = Officers::new(&s.keys, officer_channels(&s.pki, s.port).await);
            let gate = softhsm_tests::service::request_operation(
                &operator,
                operation_spec::Spec::SetPolicy(custody_proto::v1::SetPolicySpec {
                    name: "keys/k".into(),
                    operation: custody_proto::v1::OperationKind::Rotate as i32,
                    officers: vec!["alice".into(), "bob".into(), "carol".into()],
                    required: 2,
                }),
            )
            .await
            .unwrap();

            // 8 MiB left: under the 16 MiB reserve, with room to spare.
            s.disk.fill(8 * MIB);
            health_becomes(&operator, ServingStatus::NotServing).await;
            let refused = signer.sign(digest_request(1)).await.unwrap_err();
            assert_eq!(refused.code(), tonic::Code::Unavailable);
            assert_eq!(reason(&refused), "STORAGE_LOW", "{refused:?}");
            assert!(refused.message().contains("below its reserve of 16 MiB"), "{}", refused.message());
            let refused = create_key(operator.clone(), "k2").await.unwrap_err();
            assert_eq!(reason(&refused), "STORAGE_LOW");
            // A vote, which may run the operation, waits for room too.
            let refused = officers.approve("alice", &gate).await.unwrap_err();
            assert_eq!(reason(&refused), "STORAGE_LOW", "{refused:?}");
            // Reads are still served.
            let keys = KeyServiceClient::new(operator.clone())
                .list_keys(ListKeysRequest::default())
                .await
                .unwrap()
                .into_inner();
            assert_eq!(keys.keys.len(), 1);
            let officer = connect(&s.pki, s.port, &s.pki.client("alice", &[Role::Officer])).await.unwrap();
            CeremonyServiceClient::new(officer)
                .list_ceremonies(ListCeremoniesRequest::default())
                .await
                .unwrap();
            let text = scrape(metrics_port).await;
            assert!(text.contains("custody_storage_below_reserve 1"), "{text}");
            assert!(text.contains("custody_serving 0"), "{text}");

            // Space returns: service resumes without a restart.
            s.disk.empty();
            health_becomes(&operator, ServingStatus::Serving).await;
            signer.sign(digest_request(2)).await.unwrap();
            create_key(operator.clone(), "k2").await.unwrap();
            officers.approve("alice", &gate).await.unwrap();
            let done = officers.approve("bob", &gate).await.unwrap();
            assert_eq!(done.state, OperationState::Succeeded as i32, "{}", done.error);
            let text = scrape(metrics_port).await;
            assert!(text.contains("custody_storage_below_reserve 0"), "{text}");
            assert!(text.contains("custody_serving 1"), "{text}");

            // The log holds every request, the refusals too, with no gap.
            let (entries, export) = audit_export(&s.pki, s.port).await;
            let report = verify_export(&export);
            assert!(report.first_bad.is_none(), "{report:?}");
            assert_eq!(acknowledged_in(&entries), 2);
            let low = entries.iter().filter(|e| e.contains("\"outcome\":\"STORAGE_LOW\"")).count();
            assert_eq!(low, 3, "each refusal has its record");
            assert!(daemon.try_wait().unwrap().is_none(), "custodyd stopped");
        });
    }
);

token_test!(
    fn a_disk_that_fills_completely_acknowledges_nothing_it_did_not_record_and_a_restart_resumes(token) {
        runtime().block_on(async {
            // No reserve: the writes themselves meet the full disk.
            let s = setup(token, "[storage]\nreserve_mib = 0\n");
            let mut daemon = s.disk.spawn(&s.config);
            let operator = ready(&s.pki, s.port, &mut daemon).await;
            create_key(operator.clone(), "k").await.unwrap();
            let ca = connect(&s.pki, s.port, &s.pki.client("ca", &[Role::Signer])).await.unwrap();
            let signer = SigningServiceClient::new(ca);

            // Signers keep signing while the disk fills up under them.
            let mut signers = Vec::new();
            for worker in 0..4_u32 {
                let mut signer = signer.clone();
                signers.push(tokio::spawn(async move {
                    let mut acknowledged = 0;
                    let mut refusals = Vec::new();
                    // Until the full disk refuses them (bounded: the disk
                    // fills within seconds, so a cap this large means it
                    // never refused).
                    for i in 0..50_000 {
                        match signer.sign(digest_request(worker * 100_000 + i)).await {
                            Ok(_) => acknowledged += 1,
                            Err(status) => {
                                refusals.push((status.code(), reason(&status)));
                                if refusals.len() >= 5 {
                                    break;
                                }
                            }
                        }
                    }
                    (acknowledged, refusals)
                }));
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
            s.disk.fill(0);
            let mut acknowledged = 0;
            for signer in signers {
                let (count, refusals) = signer.await.unwrap();
                acknowledged += count;
                assert!(!refusals.is_empty(), "a signer was never refused on a full disk");
                for (code, reason) in refusals {
                    assert_eq!(code, tonic::Code::Unavailable, "{reason}");
                }
            }
            eprintln!("acknowledged before the disk refused: {acknowledged}");
            health_becomes(&operator, ServingStatus::NotServing).await;
            assert!(daemon.try_wait().unwrap().is_none(), "custodyd died on a full disk");

            // Space returns. sled latched its write error, so custodyd keeps
            // refusing until it is restarted; it says so.
            s.disk.empty();
            let mut signer = signer.clone();
            let refused = signer.sign(digest_request(7)).await.unwrap_err();
            assert_eq!(refused.code(), tonic::Code::Unavailable);
            assert_eq!(health(operator.clone()).await, ServingStatus::NotServing as i32);
            let _ = daemon.terminate();

            let mut daemon = s.disk.spawn(&s.config);
            let operator = ready(&s.pki, s.port, &mut daemon).await;
            health_becomes(&operator, ServingStatus::Serving).await;
            let (entries, export) = audit_export(&s.pki, s.port).await;
            let report = verify_export(&export);
            eprintln!("{} records, {} Sign ok", entries.len(), acknowledged_in(&entries));
            assert!(report.first_bad.is_none(), "the chain breaks after the full disk: {report:?}");
            // Every signature a caller received has its record. (A record
            // whose flush failed may also have reached the disk: its caller
            // was answered UNAVAILABLE and got no signature.)
            assert!(
                acknowledged_in(&entries) >= acknowledged,
                "{} Sign records for {acknowledged} acknowledged signatures",
                acknowledged_in(&entries)
            );
            let ca = connect(&s.pki, s.port, &s.pki.client("ca", &[Role::Signer])).await.unwrap();
            SigningServiceClient::new(ca).sign(digest_request(8)).await.unwrap();
        });
    }
);
