//! The quorum rule, as pure functions of the votes cast: no I/O, no clock, no
//! signatures checked here (the caller says whether a signature verified).
//! Everything that decides whether an operation may run is in this file, so
//! that the property test below covers exactly what the service runs.

use crate::Reason;
use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

/// M-of-N: which officers may approve, and how many must. Key policies,
/// approved operations and ceremony scripts (who signs in) all use it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Quorum {
    /// The eligible officers (N), by officer id.
    pub members: BTreeSet<String>,
    /// Approvals needed (M).
    pub required: u32,
}

impl Quorum {
    /// `M of a, b, c`.
    pub fn text(&self) -> String {
        let members: Vec<&str> = self.members.iter().map(String::as_str).collect();
        format!("{} of {}", self.required, members.join(", "))
    }

    /// A quorum, refusing impossible or weak ones: M ≥ 2, M ≤ N.
    pub fn new(members: impl IntoIterator<Item = String>, required: u32) -> Result<Quorum, String> {
        let list: Vec<String> = members.into_iter().collect();
        let members: BTreeSet<String> = list.iter().cloned().collect();
        if members.len() != list.len() {
            return Err("an officer is listed twice".into());
        }
        if required < 2 {
            return Err(format!(
                "a quorum needs at least 2 approvals, not {required}"
            ));
        }
        if required as usize > members.len() {
            return Err(format!(
                "{required} approvals can never come from {} officers",
                members.len()
            ));
        }
        Ok(Quorum { members, required })
    }

    /// Whether every set of approvals that meets this quorum also meets
    /// `other`: even the `required` approvals of ours that include the
    /// fewest of `other`'s officers include `other.required` of them.
    pub fn covers(&self, other: &Quorum) -> bool {
        let outside = self.members.difference(&other.members).count();
        (self.required as usize).saturating_sub(outside) >= other.required as usize
    }

    /// Whether `officer` is one of the eligible officers.
    pub fn contains(&self, officer: &str) -> bool {
        self.members.contains(officer)
    }

    /// Whether `count` approvals (of distinct members) meet the quorum.
    pub fn is_met_by(&self, count: usize) -> bool {
        count >= self.required as usize
    }
}

/// An approval or a denial.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum VoteKind {
    /// Approve.
    Approve,
    /// Deny (a veto).
    Deny,
}

/// One recorded vote.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CastVote {
    /// When, Unix milliseconds.
    pub time_ms: i64,
    /// The officer's signature, hex.
    pub signature: String,
    /// The officer's public key the signature verified with when it was
    /// cast, hex (empty in a vote stored before it was kept).
    #[serde(default)]
    pub key: String,
}

/// The votes recorded for one operation, by officer id: one vote per officer.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ballot {
    /// Approvals.
    pub approvals: BTreeMap<String, CastVote>,
    /// Denials.
    pub denials: BTreeMap<String, CastVote>,
}

/// Where an operation stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Standing {
    /// Needs more approvals.
    Pending,
    /// Has its quorum.
    Approved,
    /// Vetoed.
    Denied,
}

/// Why a vote was not counted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// The operation is no longer pending.
    NotPending,
    /// The operation expired.
    Expired,
    /// The signature does not verify with the officer's key over this
    /// operation's digest.
    BadSignature,
    /// The officer is not (or no longer) enrolled.
    NotEnrolled,
    /// The officer is not in this operation's quorum.
    NotEligible,
    /// The officer requested the operation.
    Requester,
    /// The officer already voted on it.
    AlreadyVoted,
}

impl Refusal {
    /// The stable reason reported to callers.
    pub fn reason(self) -> Reason {
        match self {
            Refusal::NotPending => Reason::OperationNotPending,
            Refusal::Expired => Reason::OperationExpired,
            Refusal::BadSignature => Reason::BadApprovalSignature,
            Refusal::NotEnrolled => Reason::OfficerNotEnrolled,
            Refusal::NotEligible => Reason::OfficerNotEligible,
            Refusal::Requester => Reason::RequesterCannotApprove,
            Refusal::AlreadyVoted => Reason::AlreadyVoted,
        }
    }
}

/// The rules of one operation's vote.
#[derive(Debug, Clone)]
pub struct Rules<'a> {
    /// The quorum fixed when the operation was requested.
    pub quorum: &'a Quorum,
    /// The requester's officer id, if the requester is an officer.
    pub requester_officer: Option<&'a str>,
    /// Expiry, Unix milliseconds: votes at or after it are refused.
    pub expires_ms: i64,
    /// Whether one denial vetoes.
    pub denial_vetoes: bool,
}

impl Rules<'_> {
    /// Where `ballot` stands, counting only the votes that still stand:
    /// `stands(officer, kind, vote)` says whether the officer's enrollment
    /// now is the one that cast the vote
    /// ([`super::store::DualControlStore::vote_stands`]).
    pub fn standing(
        &self,
        ballot: &Ballot,
        stands: impl Fn(&str, VoteKind, &CastVote) -> bool,
    ) -> Standing {
        let counts = |officer: &String, kind: VoteKind, vote: &CastVote| {
            self.quorum.contains(officer)
                && Some(officer.as_str()) != self.requester_officer
                && stands(officer, kind, vote)
        };
        if self.denial_vetoes
            && ballot
                .denials
                .iter()
                .any(|(officer, vote)| counts(officer, VoteKind::Deny, vote))
        {
            return Standing::Denied;
        }
        let approvals = ballot
            .approvals
            .iter()
            .filter(|(officer, vote)| counts(officer, VoteKind::Approve, vote))
            .count();
        if self.quorum.is_met_by(approvals) {
            Standing::Approved
        } else {
            Standing::Pending
        }
    }

    /// Records `officer`'s vote if every rule allows it, and returns the new
    /// standing (`stands` as for [`Rules::standing`]; a vote that would not
    /// stand, its officer not enrolled with the key that signed it, is
    /// refused as not enrolled). A refused vote changes nothing.
    pub fn cast(
        &self,
        ballot: &mut Ballot,
        officer: &str,
        kind: VoteKind,
        vote: CastVote,
        signature_valid: bool,
        stands: impl Fn(&str, VoteKind, &CastVote) -> bool,
    ) -> Result<Standing, Refusal> {
        if self.standing(ballot, &stands) != Standing::Pending {
            return Err(Refusal::NotPending);
        }
        if vote.time_ms >= self.expires_ms {
            return Err(Refusal::Expired);
        }
        if !signature_valid {
            return Err(Refusal::BadSignature);
        }
        if !stands(officer, kind, &vote) {
            return Err(Refusal::NotEnrolled);
        }
        if !self.quorum.contains(officer) {
            return Err(Refusal::NotEligible);
        }
        if Some(officer) == self.requester_officer {
            return Err(Refusal::Requester);
        }
        if ballot.approvals.contains_key(officer) || ballot.denials.contains_key(officer) {
            return Err(Refusal::AlreadyVoted);
        }
        let votes = match kind {
            VoteKind::Approve => &mut ballot.approvals,
            VoteKind::Deny => &mut ballot.denials,
        };
        votes.insert(officer.to_string(), vote);
        Ok(self.standing(ballot, stands))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Every quorum over four officers, as (members bitmask, quorum).
    fn every_quorum() -> Vec<(u32, Quorum)> {
        let mut all = Vec::new();
        for mask in 0u32..16 {
            let members: Vec<String> = (0..4)
                .filter(|i| mask & (1 << i) != 0)
                .map(|i| format!("o{i}"))
                .collect();
            for required in 2..=members.len() as u32 {
                all.push((mask, Quorum::new(members.clone(), required).unwrap()));
            }
        }
        all
    }

    #[test]
    fn a_quorum_covers_another_exactly_when_every_approving_set_meets_both() {
        let quorums = every_quorum();
        for (a_mask, a) in &quorums {
            for (b_mask, b) in &quorums {
                // Every set of approvals from a's officers that meets a.
                let meets_b = (0u32..16)
                    .filter(|s| s & !a_mask == 0 && s.count_ones() >= a.required)
                    .all(|s| (s & b_mask).count_ones() >= b.required);
                assert_eq!(a.covers(b), meets_b, "{a:?} covers {b:?}");
            }
        }
    }

    #[test]
    fn impossible_or_weak_quorums_are_refused() {
        let names = |n: usize| (0..n).map(|i| format!("o{i}")).collect::<Vec<_>>();
        assert!(Quorum::new(names(3), 2).is_ok());
        assert!(Quorum::new(names(3), 4).is_err());
        assert!(Quorum::new(names(3), 1).is_err());
        assert!(Quorum::new(names(3), 0).is_err());
        assert!(Quorum::new(vec!["a".into(), "a".into(), "b".into()], 2).is_err());
    }

    #[test]
    fn members_and_counts_are_read_from_the_quorum() {
        let quorum = Quorum::new(["alice".to_string(), "bob".into(), "carol".into()], 2).unwrap();
        assert!(quorum.contains("alice") && quorum.contains("carol"));
        assert!(!quorum.contains("dave"));
        assert!(!quorum.contains("Alice"));
        assert!(!quorum.contains(""));
        assert!(!quorum.is_met_by(0));
        assert!(!quorum.is_met_by(1));
        assert!(quorum.is_met_by(2));
        assert!(quorum.is_met_by(3));
        assert!(quorum.is_met_by(usize::MAX));
    }

    #[test]
    fn expiry_boundaries_are_exact() {
        let quorum = Quorum::new(["a".to_string(), "b".into(), "c".into()], 2).unwrap();
        let rules = Rules {
            quorum: &quorum,
            requester_officer: None,
            expires_ms: 10_000,
            denial_vetoes: true,
        };
        let vote = |t| CastVote {
            time_ms: t,
            signature: String::new(),
            key: String::new(),
        };
        let mut ballot = Ballot::default();
        assert_eq!(
            rules.cast(
                &mut ballot,
                "a",
                VoteKind::Approve,
                vote(9_000),
                true,
                |_, _, _| true
            ),
            Ok(Standing::Pending)
        );
        assert_eq!(
            rules.cast(
                &mut ballot,
                "b",
                VoteKind::Approve,
                vote(10_000),
                true,
                |_, _, _| true
            ),
            Err(Refusal::Expired)
        );
        assert_eq!(
            rules.cast(
                &mut ballot,
                "b",
                VoteKind::Approve,
                vote(11_000),
                true,
                |_, _, _| true
            ),
            Err(Refusal::Expired)
        );
        assert_eq!(
            rules.cast(
                &mut ballot,
                "b",
                VoteKind::Approve,
                vote(9_999),
                true,
                |_, _, _| true
            ),
            Ok(Standing::Approved)
        );
    }

    /// One attempted vote in a random sequence.
    #[derive(Debug, Clone)]
    struct Attempt {
        officer: usize,
        deny: bool,
        signature_valid: bool,
        time_ms: i64,
    }

    fn attempts() -> impl Strategy<Value = (usize, u32, usize, Option<usize>, Vec<Attempt>, bool)> {
        (2usize..7).prop_flat_map(|n| {
            (
                Just(n),
                2u32..=(n as u32),
                // Officers 0..n are members; n..n+2 are enrolled non-members.
                proptest::collection::vec(
                    (
                        0..n + 2,
                        proptest::bool::weighted(0.15),
                        proptest::bool::weighted(0.85),
                        0i64..1_200,
                    )
                        .prop_map(
                            |(officer, deny, signature_valid, time_ms)| Attempt {
                                officer,
                                deny,
                                signature_valid,
                                time_ms,
                            },
                        ),
                    0..20,
                ),
                proptest::option::of(0..n + 2),
                0..n + 2,
                any::<bool>(),
            )
                .prop_map(|(n, m, attempts, requester, removed, veto)| {
                    (n, m, removed, requester, attempts, veto)
                })
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(10_000))]

        /// No sequence of votes reaches a quorum without M distinct, eligible,
        /// enrolled officers other than the requester, each with a valid
        /// signature before expiry; and a veto always wins.
        #[test]
        fn no_quorum_without_m_distinct_eligible_officers((n, m, removed, requester, attempts, veto) in attempts()) {
            let name = |i: usize| format!("officer-{i}");
            let quorum = Quorum::new((0..n).map(name), m).unwrap();
            let requester_name = requester.map(name);
            let rules = Rules { quorum: &quorum, requester_officer: requester_name.as_deref(), expires_ms: 1_000, denial_vetoes: veto };
            let removed_name = name(removed);
            // One officer is removed halfway through.
            let mut ballot = Ballot::default();
            let mut standing = Standing::Pending;
            for (step, attempt) in attempts.iter().enumerate() {
                let enrolled = |o: &str, _: VoteKind, _: &CastVote| !(step >= attempts.len() / 2 && o == removed_name);
                let kind = if attempt.deny { VoteKind::Deny } else { VoteKind::Approve };
                let vote = CastVote { time_ms: attempt.time_ms, signature: String::new(), key: String::new() };
                if let Ok(s) = rules.cast(&mut ballot, &name(attempt.officer), kind, vote, attempt.signature_valid, enrolled) {
                    standing = s;
                }
                let terminal = standing != Standing::Pending;
                // The reference model, from the attempts alone.
                let counted: BTreeSet<usize> = attempts[..=step]
                    .iter()
                    .filter(|a| !a.deny && a.signature_valid && a.time_ms < 1_000 && a.officer < n && Some(a.officer) != requester)
                    .filter(|a| !(step >= attempts.len() / 2 && a.officer == removed))
                    .map(|a| a.officer)
                    .collect();
                if standing == Standing::Approved {
                    prop_assert!(counted.len() >= m as usize, "approved with {} distinct eligible approvals of {m}", counted.len());
                }
                for officer in ballot.approvals.keys().chain(ballot.denials.keys()) {
                    prop_assert!(Some(officer.as_str()) != requester_name.as_deref(), "the requester's vote was recorded");
                }
                // The service stores a decided operation as final.
                if terminal {
                    break;
                }
            }
            if veto && !ballot.denials.is_empty() {
                prop_assert_ne!(standing, Standing::Approved, "approved despite a recorded veto");
            }
        }
    }
}
