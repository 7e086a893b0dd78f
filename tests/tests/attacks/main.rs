//! Attacks on the engine by a hostile user or a tampered checkpoint, each
//! tried on the real dev cluster: what they try, and that root refuses.

mod restore;
