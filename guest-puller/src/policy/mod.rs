//! Signature policy (containers-policy.json) evaluation.
