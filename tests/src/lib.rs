//! Cross-service scenario tests (in `tests/`), run against the in-process clusters that
//! `tandem-sandbox` builds.
