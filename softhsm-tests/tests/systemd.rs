//! custodyd under systemd's protocols, without systemd: the notifications it
//! sends to a `$NOTIFY_SOCKET` the test binds (a real unix datagram socket,
//! as systemd's), and secrets taken from `$CREDENTIALS_DIRECTORY` as a unit's
//! `LoadCredential=` hands them over (threat model O2, O3).

#![allow(
    clippy::unwrap_used,
    reason = "a test fails by panicking on the unexpected"
)]

use std::os::unix::net::UnixDatagram;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use softhsm_tests::audit_files;
use softhsm_tests::process::{Daemon, free_port, prepare, ready};
use softhsm_tests::service::runtime;
use softhsm_tests::token_test;

const CUSTODYD: &str = env!("CARGO_BIN_EXE_custodyd-under-test");

/// The notification socket: bound by the test, read with a bound on each wait.
struct NotifySocket(UnixDatagram);

impl NotifySocket {
    fn bind(path: &Path) -> NotifySocket {
        let socket = UnixDatagram::bind(path).unwrap();
        socket
            .set_read_timeout(Some(Duration::from_secs(60)))
            .unwrap();
        NotifySocket(socket)
    }

    /// Datagrams until one holds the line `want`; all of them, in order.
    fn until(&self, want: &str) -> Vec<String> {
        let mut seen = Vec::new();
        let mut buf = vec![0u8; 4096];
        loop {
            let n = self
                .0
                .recv(&mut buf)
                .unwrap_or_else(|e| panic!("no {want} from custodyd (saw {seen:?}): {e}"));
            let datagram = String::from_utf8(buf[..n].to_vec()).unwrap();
            let found = datagram.lines().any(|line| line == want);
            seen.push(datagram);
            if found {
                return seen;
            }
        }
    }
}

fn kill(daemon: &Daemon, signal: &str) {
    let status = Command::new("kill")
        .args([signal, &daemon.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
}

token_test!(
    fn custodyd_tells_systemd_ready_reloading_stopping_status_and_watchdog(token) {
        let port = free_port();
        let (pki, config) = prepare(token, port);
        let socket_path = pki.dir.join("notify.sock");
        let socket = NotifySocket::bind(&socket_path);
        let mut command = Command::new(CUSTODYD);
        command
            .arg(&config)
            .env("RUST_LOG", "warn")
            .env("NOTIFY_SOCKET", &socket_path)
            // 200 ms: custodyd must ping every 100 ms.
            .env("WATCHDOG_USEC", "200000")
            .stdout(Stdio::null());
        let mut daemon = Daemon(command.spawn().unwrap());

        let started = socket.until("READY=1");
        let ready_datagram = started.last().unwrap();
        assert!(
            ready_datagram.contains(&format!("STATUS=serving on 127.0.0.1:{port}")),
            "READY=1 comes with a status naming the listener: {ready_datagram:?}"
        );
        assert!(
            started.iter().any(|d| d.starts_with("STATUS=starting")),
            "a status while starting: {started:?}"
        );
        // READY=1 means served: a client is answered at once.
        runtime().block_on(async { ready(&pki, port, &mut daemon).await });

        let pings = socket.until("WATCHDOG=1");
        assert!(pings.iter().all(|d| !d.contains("STOPPING")), "{pings:?}");
        // And again: the pings go on while custodyd runs.
        socket.until("WATCHDOG=1");

        kill(&daemon, "-HUP");
        let reload = socket.until("RELOADING=1");
        assert!(
            reload.last().unwrap().contains("MONOTONIC_USEC="),
            "RELOADING=1 carries the monotonic time: {reload:?}"
        );
        let reloaded = socket.until("READY=1");
        assert!(
            reloaded.last().unwrap().contains("TLS files reloaded"),
            "{reloaded:?}"
        );

        kill(&daemon, "-TERM");
        let stop = socket.until("STOPPING=1");
        assert!(stop.last().unwrap().contains("STATUS=stopping (SIGTERM)"), "{stop:?}");
        let status = daemon.wait().unwrap();
        assert!(status.success(), "custodyd stopped with {status}");
    }
);

token_test!(
    fn secrets_come_from_the_credentials_directory_and_never_reach_the_logs(token) {
        let port = free_port();
        let (pki, config) = prepare(token, port);
        // What systemd's LoadCredential= makes: a private directory holding
        // a copy of each secret, named in $CREDENTIALS_DIRECTORY.
        let credentials = pki.dir.join("credentials");
        std::fs::create_dir(&credentials).unwrap();
        std::fs::write(credentials.join("hsm.pin"), format!("{}\n", token.user_pin())).unwrap();
        std::fs::rename(pki.dir.join("server.key"), credentials.join("tls.key")).unwrap();
        let text = std::fs::read_to_string(&config).unwrap();
        let text = text
            .replace(
                &format!("pin_file = \"{}\"", token.pin_file().display()),
                "pin_file = \"credential:hsm.pin\"",
            )
            .replace(
                &format!("key = \"{}\"", pki.dir.join("server.key").display()),
                "key = \"credential:tls.key\"",
            );
        assert!(text.contains("credential:hsm.pin") && text.contains("credential:tls.key"));
        std::fs::write(&config, text).unwrap();
        // Without the directory the names mean nothing: custodyd refuses to
        // start and says why, naming the credential.
        let refused = Command::new(CUSTODYD)
            .arg(&config)
            .env_remove("CREDENTIALS_DIRECTORY")
            .output()
            .unwrap();
        assert!(!refused.status.success());
        let said = String::from_utf8_lossy(&refused.stderr);
        assert!(
            said.contains("credential:") && said.contains("CREDENTIALS_DIRECTORY"),
            "{said}"
        );

        let log = pki.dir.join("custodyd.log");
        let mut daemon = Daemon(
            Command::new(CUSTODYD)
                .arg(&config)
                .env("CREDENTIALS_DIRECTORY", &credentials)
                .env("RUST_LOG", "trace")
                .stdout(Stdio::null())
                .stderr(std::fs::File::create(&log).unwrap())
                .spawn()
                .unwrap(),
        );
        runtime().block_on(async { ready(&pki, port, &mut daemon).await });
        assert!(daemon.terminate().success());
        let logged = std::fs::read_to_string(&log).unwrap();
        assert!(logged.contains("custodyd ready"), "the log is the daemon's: {logged}");
        assert!(!logged.contains(token.user_pin()), "the PIN reached the log");
        let key = std::fs::read_to_string(credentials.join("tls.key")).unwrap();
        let key_body = key.lines().nth(1).unwrap();
        assert!(!logged.contains(key_body), "the TLS key reached the log");
        // The offline check reads no secret: it runs outside the unit too.
        let checked = Command::new(CUSTODYD)
            .args([std::ffi::OsStr::new("--check"), config.as_os_str()])
            .env_remove("CREDENTIALS_DIRECTORY")
            .output()
            .unwrap();
        assert!(
            checked.status.success(),
            "custodyd --check: {}",
            String::from_utf8_lossy(&checked.stderr)
        );
    }
);

token_test!(
    fn a_move_of_the_audit_log_at_start_asks_systemd_for_more_time_and_says_why(token) {
        // The first start on a directory written before segments reads
        // every record (threat model Q7): it must not run into the unit's
        // start timeout for as long as it makes progress.
        let port = free_port();
        let (pki, config) = prepare(token, port);
        let data_dir = pki.dir.join("data");
        let spawn = |notify: Option<&Path>| {
            let mut command = Command::new(CUSTODYD);
            command.arg(&config).env("RUST_LOG", "warn").stdout(Stdio::null());
            if let Some(path) = notify {
                command.env("NOTIFY_SOCKET", path);
            }
            Daemon(command.spawn().unwrap())
        };
        let mut daemon = spawn(None);
        runtime().block_on(async { ready(&pki, port, &mut daemon).await });
        assert!(daemon.terminate().success());
        let records = audit_files::to_layout_before_segments(&data_dir);

        let socket_path = pki.dir.join("notify.sock");
        let socket = NotifySocket::bind(&socket_path);
        let mut daemon = spawn(Some(&socket_path));
        let started = socket.until("READY=1");
        let moving = started
            .iter()
            .find(|d| d.contains("moving the audit log"))
            .unwrap_or_else(|| panic!("no status of the move before READY=1: {started:?}"));
        assert!(
            moving.lines().any(|line| line == "EXTEND_TIMEOUT_USEC=30000000"),
            "the move asks for more time: {moving:?}"
        );
        assert!(moving.contains(&format!("of {records} records")), "{moving:?}");
        runtime().block_on(async { ready(&pki, port, &mut daemon).await });
        assert!(daemon.terminate().success());
        assert_eq!(audit_files::records_in_database(&data_dir), 0, "the log was moved");
    }
);
