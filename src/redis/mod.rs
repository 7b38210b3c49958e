//! Thin wrappers over the Redis module API. Nothing here knows about fills,
//! tables or trust: lower layers never call upward.
//!
//! Within this folder, too, calls go one way: `blocked` → `gil` → `keys`,
//! `acl` → `reply`.

pub mod acl;
pub mod blocked;
pub mod cluster;
pub mod gil;
pub mod keys;
pub mod reply;
