//! Test harness shared by the integration tests (filled by the lead).
