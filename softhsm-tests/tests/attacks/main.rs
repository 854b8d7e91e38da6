//! Attacks on custody's promise (issue 12): fewer officers than the
//! administrative quorum can never use, export or destroy a protected key,
//! by any path.
//!
//! Each test is written from the attacker's side: two officers (or one
//! operator) carry out one attack through the real gRPC server with real
//! mTLS on SoftHSM2, as far as custodyd lets them, and the test then asserts
//! the safe outcome: the attack refused, nothing extracted, destroyed or
//! weakened. Every one of them fails on the code the issue was filed
//! against, and is ignored until the fix of its invariant lands (I1's and I4's have).
//! Two controls run beside the I4 tests: the forged bundle is sound but for
//! who signed it, and the same kind of bundle restores once its audit key is
//! pinned.
//!
//! | module | invariant | scenario of issue 12 |
//! |---|---|---|
//! | `export` | I1 export needs the quorum | 1: a 2-of-2 KEK ceremony and a lone backup |
//! | `restores` | I2 nothing destroys what it did not make | 2a, 2b, 2c: restores racing keys and restores |
//! | `protections` | I3 protections travel with the key | 3: a restore drops every policy |
//! | `forgery` | I4 bundles are trusted by pinned keys only | 4: a bundle that names its own audit key |
//! | `ceremonies` | I5 ceremony keys carry a quorum; I6 components are distinct | 5, 6 |
//! | `officer_reuse` | D6 a vote stands only while the enrollment that cast it does | a removed officer's id enrolled for someone else |
//! | `policy_loosening` | R7 a policy is changed only by a quorum that covers it | a SIGN policy of 3 loosened by the administrative 2 |
//! | `destruction` | C21-C25 a key-destruction ceremony witnesses only an approved, due, unheld destruction | issue 16 |

#![allow(
    clippy::unwrap_used,
    reason = "a test fails by panicking on the unexpected"
)]

mod ceremonies;
mod common;
mod crl_policy;
mod destruction;
mod export;
mod forgery;
mod officer_reuse;
mod policy_loosening;
mod protections;
mod restores;
mod staged;
