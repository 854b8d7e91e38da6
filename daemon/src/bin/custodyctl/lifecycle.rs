//! `custodyctl keys update|cancel-destroy|legal-hold`: a key's cryptoperiod
//! and minimum version, cancelling a scheduled destruction, legal holds.
//! Also durations and times as the command line writes them, for `keys`
//! and `request` too.

use std::time::Duration;

use clap::Subcommand;
use custody_proto::v1::key_service_client::KeyServiceClient;
use custody_proto::v1::{SetLegalHoldRequest, UpdateKeyRequest, VersionRef};
use tonic::transport::Channel;

use crate::keys::print_key;
use crate::shared::{key_name, shown, status};

#[derive(Subcommand)]
pub(crate) enum LifecycleCommand {
    /// Change a key's cryptoperiod (0s removes it) or minimum version.
    Update {
        /// keys/{key_id} or just the key id.
        name: String,
        /// e.g. 90d, 12h, 3600s; 0s for none.
        #[arg(long, value_parser = parse_duration)]
        cryptoperiod: Option<Duration>,
        /// Versions below this are refused for verify, decrypt and rewrap.
        #[arg(long)]
        min_version: Option<u32>,
    },
    /// Cancel a scheduled destruction within its cancel window.
    CancelDestroy {
        /// keys/{key_id}/versions/{version}.
        name: String,
    },
    /// Place a legal hold: the version cannot be destroyed until officers
    /// approve its release (`custodyctl request release-hold`).
    LegalHold {
        /// keys/{key_id}/versions/{version}.
        name: String,
        /// Why (a case reference, say).
        #[arg(long)]
        reason: String,
    },
}

/// `90d`, `12h`, `30m`, `3600s` or a bare number of seconds.
pub(crate) fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let (number, unit) = match text.char_indices().find(|(_, c)| !c.is_ascii_digit()) {
        Some((at, _)) => text.split_at(at),
        None => (text, "s"),
    };
    let number: u64 = number
        .parse()
        .map_err(|_| format!("{text:?} is not a duration like 90d, 12h, 30m or 3600s"))?;
    let seconds = match unit {
        "s" => Some(number),
        "m" => number.checked_mul(60),
        "h" => number.checked_mul(3600),
        "d" => number.checked_mul(86_400),
        _ => None,
    }
    .ok_or_else(|| format!("{text:?} is not a duration like 90d, 12h, 30m or 3600s"))?;
    Ok(Duration::from_secs(seconds))
}

/// A duration as the API takes it.
pub(crate) fn duration_message(duration: Duration) -> prost_types::Duration {
    prost_types::Duration {
        seconds: i64::try_from(duration.as_secs()).unwrap_or(i64::MAX),
        nanos: 0,
    }
}

/// A timestamp as RFC 3339.
pub(crate) fn time_text(time: &prost_types::Timestamp) -> String {
    custody_core::audit::rfc3339_ms(time.seconds.saturating_mul(1000))
}

pub(crate) async fn run(
    keys: &mut KeyServiceClient<Channel>,
    command: LifecycleCommand,
) -> Result<(), String> {
    match command {
        LifecycleCommand::Update {
            name,
            cryptoperiod,
            min_version,
        } => {
            let key = keys
                .update_key(UpdateKeyRequest {
                    name: key_name(&name),
                    cryptoperiod: cryptoperiod.map(duration_message),
                    min_version,
                })
                .await
                .map_err(status)?
                .into_inner();
            print_key(&key);
        }
        LifecycleCommand::CancelDestroy { name } => {
            let version = keys
                .cancel_destroy(VersionRef {
                    name: key_name(&name),
                })
                .await
                .map_err(status)?
                .into_inner();
            outln!("the destruction of {} is cancelled", shown(&version.name));
        }
        LifecycleCommand::LegalHold { name, reason } => {
            let version = keys
                .set_legal_hold(SetLegalHoldRequest {
                    name: key_name(&name),
                    reason,
                })
                .await
                .map_err(status)?
                .into_inner();
            outln!(
                "{} is under a legal hold; releasing it needs officer approval",
                shown(&version.name)
            );
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse_with_units_and_refuse_the_rest() {
        assert_eq!(parse_duration("90d"), Ok(Duration::from_secs(90 * 86_400)));
        assert_eq!(parse_duration("12h"), Ok(Duration::from_secs(12 * 3600)));
        assert_eq!(parse_duration("3600"), Ok(Duration::from_secs(3600)));
        assert_eq!(parse_duration("0s"), Ok(Duration::ZERO));
        for bad in ["", "d", "1w", "-5s", "1.5h", "99999999999999999999d"] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
    }
}
