//! The audit log's move out of the database into its segment log (threat
//! model Q7), killed with SIGKILL at each of its crash points: the next
//! start finishes it or does it again, and no record is lost or changed.

use custody_core::audit::MIGRATION_POINTS;
use softhsm_tests::audit_files;
use softhsm_tests::process::{audit_export, free_port, prepare, ready, verify_export};
use softhsm_tests::{copy_dir, token_test};

use super::{create_signing_key, killed_at_crash_point, runtime, spawn, spawn_crashing_at};

token_test!(
    fn the_audit_log_move_killed_at_every_crash_point_ends_whole(token) {
        runtime().block_on(async {
            let port = free_port();
            let (pki, config) = prepare(token, port);
            let data_dir = pki.dir.join("data");
            let mut daemon = spawn(&config);
            let operator = ready(&pki, port, &mut daemon).await;
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
                let (_, export) = audit_export(&pki, port).await;
                let report = verify_export(&export);
                assert_eq!(report.first_bad, None, "{point}: {report:?}");
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
