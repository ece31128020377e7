//! The server around the services: health, reflection, the surface not built
//! yet, and health following the database.

use tokio_stream::StreamExt;
use tonic::Code;
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};

use crate::helpers::spawn_app;
use identity::proto::identity::v1 as pb;

/// Every service the port serves (as reflection lists them), but health and
/// reflection themselves, has a health name, and the operator docs list
/// exactly those.
#[tokio::test]
async fn health_is_serving_for_the_server_and_each_service() {
    let app = spawn_app().await;
    let mut names: Vec<String> = listed_services(&app)
        .await
        .into_iter()
        .filter(|n| !n.starts_with("grpc.health.") && !n.starts_with("grpc.reflection."))
        .collect();
    names.sort();
    assert!(names.len() >= 7, "{names:?}");
    for doc in ["docs/operations.md", "docs/deployment.md"] {
        let text = std::fs::read_to_string(doc).unwrap();
        for name in &names {
            assert!(text.contains(&format!("`{name}`")), "{doc} lists {name}");
        }
    }
    let mut health = HealthClient::new(app.channel.clone());
    let unknown = health
        .check(HealthCheckRequest {
            service: "identity.v1.NoSuchService".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(unknown.code(), tonic::Code::NotFound);
    for service in std::iter::once("").chain(names.iter().map(String::as_str)) {
        let mut watch = health
            .watch(HealthCheckRequest {
                service: service.into(),
            })
            .await
            .unwrap()
            .into_inner();
        // Wait for the first database check rather than sleeping.
        loop {
            let status = watch.next().await.unwrap().unwrap().status;
            if status == ServingStatus::Serving as i32 {
                break;
            }
        }
    }
}

#[tokio::test]
async fn health_turns_not_serving_while_the_database_is_away_and_back() {
    let app = spawn_app().await;
    let mut health = HealthClient::new(app.channel.clone());
    let mut watch = health
        .watch(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    let mut next_status = async || -> i32 { watch.next().await.unwrap().unwrap().status };
    while next_status().await != ServingStatus::Serving as i32 {}

    let db = &app.db.name;
    app.db
        .admin(&format!(
            "ALTER DATABASE {db} ALLOW_CONNECTIONS false; \
             SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '{db}'"
        ))
        .await;
    while next_status().await != ServingStatus::NotServing as i32 {}

    // Calls meanwhile are UNAVAILABLE, not INTERNAL.
    let status = app
        .users
        .clone()
        .get_user(pb::GetUserRequest {
            lookup: Some(pb::get_user_request::Lookup::Username("nobody".into())),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");

    app.db
        .admin(&format!("ALTER DATABASE {db} ALLOW_CONNECTIONS true"))
        .await;
    while next_status().await != ServingStatus::Serving as i32 {}
    app.create_user("back").await;
}

#[tokio::test]
async fn reflection_lists_every_service_in_both_versions() {
    use tonic_reflection::pb::v1alpha;
    let app = spawn_app().await;
    let names = listed_services(&app).await;
    for expected in [
        "identity.v1.UserService",
        "identity.v1.GroupService",
        "identity.v1.AuthService",
        "identity.v1.ChangeService",
        "envoy.service.auth.v3.Authorization",
        "grpc.health.v1.Health",
    ] {
        assert!(
            names.iter().any(|n| n == expected),
            "{expected} in {names:?}"
        );
    }

    let mut client =
        v1alpha::server_reflection_client::ServerReflectionClient::new(app.channel.clone());
    let req = v1alpha::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(
            v1alpha::server_reflection_request::MessageRequest::FileContainingSymbol(
                "identity.v1.UserService".into(),
            ),
        ),
    };
    let mut stream = client
        .server_reflection_info(tokio_stream::once(req))
        .await
        .unwrap()
        .into_inner();
    let resp = stream.next().await.unwrap().unwrap();
    assert!(matches!(
        resp.message_response,
        Some(v1alpha::server_reflection_response::MessageResponse::FileDescriptorResponse(_))
    ));
}

/// One reflection (v1) request and its answer.
async fn reflect(
    app: &crate::helpers::TestApp,
    request: tonic_reflection::pb::v1::server_reflection_request::MessageRequest,
) -> Option<tonic_reflection::pb::v1::server_reflection_response::MessageResponse> {
    use tonic_reflection::pb::v1;
    let mut client = v1::server_reflection_client::ServerReflectionClient::new(app.channel.clone());
    let req = v1::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(request),
    };
    let mut stream = client
        .server_reflection_info(tokio_stream::once(req))
        .await
        .unwrap()
        .into_inner();
    stream.next().await.unwrap().unwrap().message_response
}

/// The proto's comments travel with the descriptors served by reflection,
/// so `buf curl --list-methods` users and code generators can read them.
#[tokio::test]
async fn reflection_serves_the_proto_comments() {
    use prost::Message as _;
    use tonic_reflection::pb::v1;
    let app = spawn_app().await;
    let Some(v1::server_reflection_response::MessageResponse::FileDescriptorResponse(files)) =
        reflect(
            &app,
            v1::server_reflection_request::MessageRequest::FileContainingSymbol(
                "identity.v1.AuthService".into(),
            ),
        )
        .await
    else {
        panic!("unexpected reflection answer");
    };
    let auth = files
        .file_descriptor_proto
        .iter()
        .map(|bytes| prost_types::FileDescriptorProto::decode(bytes.as_slice()).unwrap())
        .find(|f| f.name() == "identity/v1/auth.proto")
        .expect("auth.proto served");
    let comments: Vec<String> = auth
        .source_code_info
        .expect("source info kept")
        .location
        .into_iter()
        .filter_map(|l| l.leading_comments)
        .collect();
    assert!(
        comments
            .iter()
            .any(|c| c.contains("Verifies an access token and returns the user's current state")),
        "comments: {comments:?}"
    );
    assert!(
        comments.len() > 20,
        "every element is commented: {}",
        comments.len()
    );
}

#[tokio::test]
async fn stopping_lets_the_server_finish_and_refuses_new_calls() {
    let app = spawn_app().await;
    let user = app.create_user("stopper").await;
    assert!(!user.id.is_empty());
    let addr = app.addr;
    app.stop().await;
    let refused = tonic::transport::Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await;
    assert!(refused.is_err(), "the listener is closed after shutdown");
}

/// The services reflection (v1) lists.
async fn listed_services(app: &crate::helpers::TestApp) -> Vec<String> {
    use tonic_reflection::pb::v1;
    let Some(v1::server_reflection_response::MessageResponse::ListServicesResponse(list)) =
        reflect(
            app,
            v1::server_reflection_request::MessageRequest::ListServices(String::new()),
        )
        .await
    else {
        panic!("unexpected reflection answer");
    };
    list.service.into_iter().map(|s| s.name).collect()
}
