//! Harness for tests that drive the dev cluster.
