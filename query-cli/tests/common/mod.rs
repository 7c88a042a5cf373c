//! What the `query-cli` test binaries share: running the binary as a user would.

use std::process::Output;

/// `query-cli ARGS` with only `env` in its environment.
pub async fn query(env: &[(String, String)], args: &[&str]) -> Output {
    testbed::run_binary(env!("CARGO_BIN_EXE_query-cli"), env, args).await
}

pub fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Runs a command that must succeed (exit 0, nothing on stderr) and returns its stdout.
pub async fn ok(env: &[(String, String)], args: &[&str]) -> String {
    let out = query(env, args).await;
    assert_eq!(
        out.status.code(),
        Some(0),
        "{args:?}: {}",
        text(&out.stderr)
    );
    assert_eq!(text(&out.stderr), "", "{args:?}");
    text(&out.stdout)
}
