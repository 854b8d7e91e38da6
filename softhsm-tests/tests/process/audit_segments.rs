//! The audit log's move out of the database into its segment log (threat
//! model Q7), and the cut of a torn tail, killed with SIGKILL at each of
//! their crash points: the next start finishes the act or does it again,
//! no record is lost or changed, and the act is recorded (Q8).

use custody_core::audit::{MIGRATION_POINTS, TAIL_CUT_POINT};
use custody_core::identity::Role;
use custody_proto::v1::signing_service_client::SigningServiceClient;
use softhsm_tests::audit_files;
use softhsm_tests::process::{Daemon, Pki};
use softhsm_tests::process::{audit_export, connect, free_port, prepare, ready, verify_export};
use softhsm_tests::{TestToken, copy_dir, token_test};
use std::path::PathBuf;
use tonic::transport::Channel;

use super::{
    create_signing_key, killed_at_crash_point, runtime, sign_request, spawn, spawn_crashing_at,
};

/// custodyd on a fresh data directory, ready to serve.
struct Started {
    port: u16,
    pki: Pki,
    config: PathBuf,
    data_dir: PathBuf,
    daemon: Daemon,
    operator: Channel,
}

async fn start(token: &TestToken) -> Started {
    let port = free_port();
    let (pki, config) = prepare(token, port);
    let data_dir = pki.dir.join("data");
    let mut daemon = spawn(&config);
    let operator = ready(&pki, port, &mut daemon).await;
    Started {
        port,
        pki,
        config,
        data_dir,
        daemon,
        operator,
    }
}

token_test!(
    fn the_audit_log_move_killed_at_every_crash_point_ends_whole(token) {
        runtime().block_on(async {
            let Started { port, pki, config, data_dir, mut daemon, operator } = start(token).await;
            create_signing_key(operator, "k").await;
            daemon.kill().unwrap();
            daemon.wait().unwrap();
            let before = audit_files::read(&data_dir);
            audit_files::to_layout_before_segments(&data_dir);
            let old = token.scratch().join("old-layout");
            copy_dir(&data_dir, &old);

            for point in MIGRATION_POINTS {
                std::fs::remove_dir_all(&data_dir).unwrap();
                copy_dir(&old, &data_dir);
                let crashing = spawn_crashing_at(&config, Some(point));
                killed_at_crash_point(crashing, point).await;
                let moved = audit_files::segments_dir(&data_dir).is_dir();
                assert_eq!(moved, point != MIGRATION_POINTS[0], "{point}: renamed only after the copy was checked");

                let mut daemon = spawn(&config);
                ready(&pki, port, &mut daemon).await;
                let (entries, export) = audit_export(&pki, port).await;
                let report = verify_export(&export);
                assert_eq!(report.first_bad, None, "{point}: {report:?}");
                // Killed after the tree was cleared too, the move is
                // recorded, once (Q8).
                let moves = events_of(&entries, "audit_log_moved");
                assert_eq!(moves.len(), 1, "{point}: {moves:?}");
                assert_eq!(moves[0]["records"], before.len(), "{point}");
                daemon.kill().unwrap();
                daemon.wait().unwrap();
                let after = audit_files::read(&data_dir);
                assert_eq!(&after[..before.len()], &before[..], "{point}: every record, unchanged");
                assert_eq!(audit_files::records_in_database(&data_dir), 0, "{point}: the tree was cleared");
                assert!(!data_dir.join("audit.migrating").exists(), "{point}: no copy left behind");
            }
            println!("audit log move: crash points covered {}/{}", MIGRATION_POINTS.len(), MIGRATION_POINTS.len());
        });
    }
);

/// The events of type `kind` among the exported entries.
fn events_of(entries: &[String], kind: &str) -> Vec<serde_json::Value> {
    entries
        .iter()
        .map(|entry| serde_json::from_str::<serde_json::Value>(entry).unwrap()["event"].clone())
        .filter(|event| event["type"] == kind)
        .collect()
}

token_test!(
    fn a_torn_tail_cut_by_a_start_killed_before_the_log_opened_is_recorded_by_the_next(token) {
        runtime().block_on(async {
            let Started { port, pki, config, data_dir, mut daemon, .. } = start(token).await;
            daemon.kill().unwrap();
            daemon.wait().unwrap();
            let before = audit_files::read(&data_dir);
            let (last_file, whole) = audit_files::last_file_end(&data_dir);
            let last_seq = audit_files::tear_tail(&data_dir, 120);

            // Killed once the tail is cut, before the log opened: what the
            // cut was is no longer in the files.
            let crashing = spawn_crashing_at(&config, Some(TAIL_CUT_POINT));
            killed_at_crash_point(crashing, TAIL_CUT_POINT).await;
            assert_eq!(std::fs::metadata(&last_file).unwrap().len(), whole, "the torn tail was cut");
            assert_eq!(audit_files::read(&data_dir), before, "and nothing else");

            let mut daemon = spawn(&config);
            ready(&pki, port, &mut daemon).await;
            let (entries, export) = audit_export(&pki, port).await;
            assert_eq!(verify_export(&export).first_bad, None);
            let cuts = events_of(&entries, "audit_tail_cut");
            assert_eq!(cuts.len(), 1, "{cuts:?}");
            assert_eq!(cuts[0]["after_record"], last_seq);
            assert_eq!(cuts[0]["bytes"], 120);
            daemon.kill().unwrap();
            daemon.wait().unwrap();
        });
    }
);

/// The record the head stored in the stopped database names.
fn stored_head_seq(data_dir: &std::path::Path) -> u64 {
    let db = audit_files::open_stopped_db(data_dir);
    let head = db
        .open_tree("audit_head")
        .unwrap()
        .get("head")
        .unwrap()
        .unwrap();
    u64::from_be_bytes(head[..8].try_into().unwrap())
}

token_test!(
    fn the_stored_head_catches_up_with_the_log_once_appends_go_quiet(token) {
        // Threat model Q6: the head lags the log by a bounded time, not
        // until the next append. A burst of signatures, then nothing: killed
        // with SIGKILL a while later, the stored head names the last record.
        // (Each try waits longer, so a loaded machine gets a later chance;
        // a head that never catches up fails every try.)
        runtime().block_on(async {
            let Started { port, pki, config, data_dir, mut daemon, operator } = start(token).await;
            create_signing_key(operator, "k").await;
            let mut tries = Vec::new();
            for wait_ms in [1_500, 3_000, 6_000] {
                // A burst of 32 at once, so that several group commits land
                // within one head interval.
                let signer = connect(&pki, port, &pki.client("ca", &[Role::Signer])).await.unwrap();
                let burst = (0..32).map(|i| {
                    let mut client = SigningServiceClient::new(signer.clone());
                    async move { client.sign(sign_request(i)).await.unwrap() }
                });
                futures_util::future::join_all(burst).await;
                tokio::time::sleep(std::time::Duration::from_millis(wait_ms)).await;
                daemon.kill().unwrap();
                daemon.wait().unwrap();
                let last = audit_files::read(&data_dir).last().unwrap().0;
                let head = stored_head_seq(&data_dir);
                tries.push((wait_ms, head, last));
                if head == last {
                    println!("the head caught up after a quiet {wait_ms} ms (tries: {tries:?})");
                    return;
                }
                daemon = spawn(&config);
                ready(&pki, port, &mut daemon).await;
            }
            panic!("the stored head never caught up with the log (wait ms, head, last record): {tries:?}");
        });
    }
);

token_test!(
    fn a_custodyd_killed_leaves_zeros_after_its_records_which_the_next_start_reads_and_a_clean_stop_cuts(token) {
        // Threat model Q6: the file being written holds zeros past its
        // last record; a restart after SIGKILL reads them as the log's end
        // and goes on after the last record, and a clean stop leaves the
        // file ending at its last record (what an earlier version and a
        // copy of a stopped directory read).
        runtime().block_on(async {
            let Started { port, pki, config, data_dir, mut daemon, operator } = start(token).await;
            create_signing_key(operator, "k").await;
            daemon.kill().unwrap();
            daemon.wait().unwrap();
            let (last_file, end) = audit_files::last_file_end(&data_dir);
            let len = std::fs::metadata(&last_file).unwrap().len();
            assert!(len > end, "zeros past the last record: {len} bytes, records end at {end}");
            let records = audit_files::read(&data_dir);

            let mut daemon = spawn(&config);
            let operator = ready(&pki, port, &mut daemon).await;
            let ca = connect(&pki, port, &pki.client("ca", &[Role::Signer])).await.unwrap();
            SigningServiceClient::new(ca).sign(sign_request(1)).await.unwrap();
            drop(operator);
            assert!(daemon.terminate().success());
            let (last_file, end) = audit_files::last_file_end(&data_dir);
            assert_eq!(std::fs::metadata(&last_file).unwrap().len(), end, "cut at the clean stop");
            let after = audit_files::read(&data_dir);
            assert_eq!(&after[..records.len()], &records[..], "every record, unchanged");
            assert!(after.len() > records.len(), "the restart went on after the last record");
        });
    }
);
