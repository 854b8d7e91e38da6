//! One valid script of each kind (and KEK mode), for the tests of every
//! part of the script module to parse, break or render.

pub(super) const ROOT_KEY: &str = r#"
format = 1
id = "root-2026"
kind = "root-key"
description = "Root CA key for Example Corp"

[quorum]
officers = ["alice", "bob", "carol"]
required = 2

[key]
name = "root-ca"
algorithm = "EC_SIGN_P384_SHA384"
backup = true

[certificate]
country = "DE"
common_name = "Example Root CA"
organization = "Example Corp"
validity_days = 3650
"#;

pub(super) const KEK_GENERATE: &str = r#"
format = 1
id = "kek-2026"
kind = "kek"
description = "Data KEK"

[quorum]
officers = ["alice", "bob", "carol"]
required = 2

[key]
name = "data-kek"
algorithm = "AES_256_GCM"

[kek]
mode = "generate"

[shares]
threshold = 2
custodians = ["alice", "bob", "carol"]
encrypt_to_officer_keys = true
"#;

pub(super) const KEK_COMPONENTS: &str = r#"
format = 1
id = "kek-components"
kind = "kek"
description = "Legacy KEK from components"

[quorum]
officers = ["alice", "bob"]
required = 2

[key]
name = "legacy-kek"
algorithm = "AES_256_GCM"
backup = false

[kek]
mode = "components"

[components]
custodians = ["dave", "erin", "frank"]
"#;

pub(super) const RESTORE: &str = r#"
format = 1
id = "restore-drill"
kind = "restore"
description = "Quarterly restore drill"

[quorum]
officers = ["alice", "bob", "carol"]
required = 3

[restore]
bundle = "backups/backup.json"
bundle_sha256 = "00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff"
drill = true
custodians = ["alice", "bob", "carol"]
"#;

/// The reviewed example of `deploy/ceremonies/`.
pub(super) const INTERMEDIATE: &str =
    include_str!("../../../../../deploy/ceremonies/intermediate.toml");

/// The reviewed cross-sign example.
pub(super) const CROSS_SIGN: &str =
    include_str!("../../../../../deploy/ceremonies/cross-sign.toml");

/// The reviewed CRL example.
pub(super) const CRL: &str = include_str!("../../../../../deploy/ceremonies/crl.toml");

pub(super) const KEY_DESTRUCTION: &str =
    include_str!("../../../../../deploy/ceremonies/key-destruction.toml");
