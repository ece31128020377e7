//! KEYS_CHANGED: a key reload that changed a replica's set of signing keys
//! is a change in the feed, so that verifiers know to re-read the keys.

use std::time::Duration;

use crate::changes::{open_watch, read_changes};
use crate::helpers::*;
use identity::proto::identity::v1 as pb;

#[tokio::test]
async fn a_rotation_picked_up_by_the_reloader_is_recorded_as_keys_changed() {
    let db = TestDb::migrated().await;
    let app = spawn_app_on(db, |c| c.keys_reload_interval = Duration::from_secs(1)).await;
    let mut stream = open_watch(&app.admin, "", &[pb::ChangeKind::KeysChanged])
        .await
        .unwrap();

    let out = std::process::Command::new(env!("CARGO_BIN_EXE_identity"))
        .args(["keys", "rotate"])
        .env("KEYS_DIR", &app.keys_dir.0)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // The reloader runs every second; read_changes waits up to its deadline.
    let (changes, _) = read_changes(&mut stream, 1).await;
    let change = &changes[0];
    assert_eq!(change.kind(), pb::ChangeKind::KeysChanged);
    assert!(change.user_id.is_empty() && change.actor_id.is_empty());
}
