//! The server kit's health and shutdown sequence, over a real socket.

use std::time::{Duration, Instant};

use tandem_server::{Server, ServerOptions};
use tandem_telemetry::{Registry, Service};
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

async fn status(c: &mut HealthClient<tonic::transport::Channel>, service: &str) -> ServingStatus {
    let r = c
        .check(HealthCheckRequest {
            service: service.into(),
        })
        .await
        .expect("health check")
        .into_inner();
    ServingStatus::try_from(r.status).expect("a known status")
}

#[tokio::test]
async fn health_follows_readiness_and_shutdown_keeps_serving_through_the_grace_period() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    // Any named service will do as the "main" one; reflection is at hand.
    let main = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(tandem_proto::FILE_DESCRIPTOR_SET)
        .build_v1alpha()
        .unwrap();
    let grace = Duration::from_millis(600);
    let server = Server::new(
        Service::Ann,
        Registry::new(),
        ServerOptions {
            grace,
            ..Default::default()
        },
    )
    .add_service(main);
    let health = server.health();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(server.serve(listener, async move {
        let _ = stopped.await;
    }));
    let channel = tonic::transport::Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut c = HealthClient::new(channel);
    let name = "grpc.reflection.v1alpha.ServerReflection";
    // Not ready until told; the overall status ("", what a probe without a service name reads)
    // follows the main service.
    assert_eq!(status(&mut c, "").await, ServingStatus::NotServing);
    assert_eq!(status(&mut c, name).await, ServingStatus::NotServing);
    health.set_serving();
    let deadline = Instant::now() + Duration::from_secs(5);
    while status(&mut c, "").await != ServingStatus::Serving {
        assert!(Instant::now() < deadline, "health never went SERVING");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(status(&mut c, name).await, ServingStatus::Serving);

    // Shutdown: NOT_SERVING at once, but requests are still answered during the grace period.
    let asked = Instant::now();
    stop.send(()).unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(status(&mut c, "").await, ServingStatus::NotServing);
    // A late readiness signal (an index finishing its load) cannot bring it back.
    health.set_serving();
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(status(&mut c, name).await, ServingStatus::NotServing);
    drop(c);
    task.await.unwrap().unwrap();
    assert!(
        asked.elapsed() >= grace,
        "stopped after {:?}, before the grace period",
        asked.elapsed()
    );
}
