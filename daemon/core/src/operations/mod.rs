//! Operations that wait for M-of-N officer approval: asked for
//! ([`request`]), read ([`read`]), approved or denied ([`vote`]), and once
//! approved run ([`execute`]) through the same domain functions a direct
//! call uses. The rule that counts votes is [`crate::dual_control::quorum`];
//! which quorum governs an operation is [`crate::authz::quorum_for`].

pub mod execute;
pub mod read;
pub mod request;
pub mod vote;
