//! KEYS_CHANGED: a key reload that changed a replica's set of signing keys
//! is a change in the feed, so that verifiers know to re-read the keys.

use std::time::Duration;

use crate::helpers::*;
use identity::proto::identity::v1 as pb;

#[tokio::test]
async fn a_rotation_picked_up_by_the_reloader_is_recorded_as_keys_changed() {
    let db = TestDb::migrated().await;
    let app = spawn_app_on(db, |c| c.keys_reload_interval = Duration::from_secs(1)).await;
    let mut stream = app
        .admin
        .changes
        .clone()
        .watch_changes(pb::WatchChangesRequest {
            after_cursor: String::new(),
            kinds: vec![pb::ChangeKind::KeysChanged as i32],
        })
        .await
        .unwrap()
        .into_inner();
    stream.message().await.unwrap().expect("the first response");

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

    let change = tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            let response = stream.message().await.unwrap().expect("the stream goes on");
            if let Some(change) = response.changes.into_iter().next() {
                return change;
            }
        }
    })
    .await
    .expect("KEYS_CHANGED within 30 s");
    assert_eq!(change.kind(), pb::ChangeKind::KeysChanged);
    assert!(change.user_id.is_empty() && change.actor_id.is_empty());
}
