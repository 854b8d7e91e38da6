//! The named crash points of every journaled step: where the SIGKILL tests
//! kill custodyd, between each move of the step protocol (see the engine's
//! module doc).

/// The crash points of one journaled step.
pub(super) struct Points {
    pub(super) before_intent: &'static str,
    pub(super) after_intent: &'static str,
    pub(super) after_hsm: &'static str,
    pub(super) after_result: &'static str,
}

macro_rules! points {
    ($step:literal) => {
        Points {
            before_intent: concat!("ceremony.", $step, ".before_intent"),
            after_intent: concat!("ceremony.", $step, ".after_intent"),
            after_hsm: concat!("ceremony.", $step, ".after_hsm"),
            after_result: concat!("ceremony.", $step, ".after_result"),
        }
    };
}

/// After the sign-in that completes the quorum is journaled, before the
/// HSM steps it sets off: a restart must carry on from there.
pub(super) const QUORUM_MET: &str = "ceremony.sign_in.quorum_met";

pub(super) const GENERATE: Points = points!("generate");
pub(super) const CERTIFICATE: Points = points!("certificate");
pub(super) const BACKUP_KEK: Points = points!("backup_kek");
pub(super) const BACKUP: Points = points!("backup");
pub(super) const IMPORT: Points = points!("import");
pub(super) const RESTORE: Points = points!("restore");
pub(super) const COMMIT: Points = points!("commit");
pub(super) const TBS: Points = points!("tbs");
pub(super) const CERTIFY: Points = points!("certify");
pub(super) const STAGE: Points = points!("stage");
/// A cross-sign ceremony's TBS and its signature (the intermediate steps,
/// their own points so that the SIGKILL test drives a cross-sign to them).
pub(super) const CROSS_TBS: Points = points!("cross_tbs");
pub(super) const CROSS_CERTIFY: Points = points!("cross_certify");
/// A crl ceremony's TBS (no HSM call: `after_hsm` is after the TBS is
/// built and linted) and its signature.
pub(super) const CRL_TBS: Points = points!("crl_tbs");
pub(super) const SIGN_CRL: Points = points!("sign_crl");
/// A key-destruction ceremony's manifest (no HSM call: `after_hsm` is
/// after the manifest is built) and its destroy step (`after_intent` and
/// `after_hsm` are passed once per object).
pub(super) const MANIFEST: Points = points!("destruction_manifest");
pub(super) const DESTROY: Points = points!("destroy_versions");

/// Every crash point of the engine, by the step it belongs to (the SIGKILL
/// tests iterate over this list: a point added in code but not here is a
/// test gap).
pub const CRASH_POINTS: [&str; 67] = [
    "ceremony.open.after_journal",
    "ceremony.sign_in.after_journal",
    QUORUM_MET,
    GENERATE.before_intent,
    GENERATE.after_intent,
    GENERATE.after_hsm,
    GENERATE.after_result,
    CERTIFICATE.before_intent,
    CERTIFICATE.after_intent,
    CERTIFICATE.after_hsm,
    CERTIFICATE.after_result,
    BACKUP_KEK.before_intent,
    BACKUP_KEK.after_intent,
    BACKUP_KEK.after_hsm,
    BACKUP_KEK.after_result,
    BACKUP.before_intent,
    BACKUP.after_intent,
    BACKUP.after_hsm,
    BACKUP.after_result,
    IMPORT.before_intent,
    IMPORT.after_intent,
    IMPORT.after_hsm,
    IMPORT.after_result,
    RESTORE.before_intent,
    RESTORE.after_intent,
    RESTORE.after_hsm,
    RESTORE.after_result,
    COMMIT.before_intent,
    COMMIT.after_intent,
    COMMIT.after_hsm,
    COMMIT.after_result,
    TBS.before_intent,
    TBS.after_intent,
    TBS.after_hsm,
    TBS.after_result,
    CERTIFY.before_intent,
    CERTIFY.after_intent,
    CERTIFY.after_hsm,
    CERTIFY.after_result,
    STAGE.before_intent,
    STAGE.after_intent,
    STAGE.after_hsm,
    STAGE.after_result,
    CROSS_TBS.before_intent,
    CROSS_TBS.after_intent,
    CROSS_TBS.after_hsm,
    CROSS_TBS.after_result,
    CROSS_CERTIFY.before_intent,
    CROSS_CERTIFY.after_intent,
    CROSS_CERTIFY.after_hsm,
    CROSS_CERTIFY.after_result,
    CRL_TBS.before_intent,
    CRL_TBS.after_intent,
    CRL_TBS.after_hsm,
    CRL_TBS.after_result,
    SIGN_CRL.before_intent,
    SIGN_CRL.after_intent,
    SIGN_CRL.after_hsm,
    SIGN_CRL.after_result,
    MANIFEST.before_intent,
    MANIFEST.after_intent,
    MANIFEST.after_hsm,
    MANIFEST.after_result,
    DESTROY.before_intent,
    DESTROY.after_intent,
    DESTROY.after_hsm,
    DESTROY.after_result,
];
