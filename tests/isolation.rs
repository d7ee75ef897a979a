//! Servers built by `app::build_server` in one process are independent: stopping one must not
//! change how another serves (tests run many proxies per process; so may an embedding).

mod common;

use common::*;

#[tokio::test]
async fn stopping_one_server_does_not_drain_another_in_the_same_process() {
    let mock = MockUpstream::start(MockConfig::h1());
    let serving = proxy(&mock.base_url("/api/v3")).start();
    drop(proxy(&mock.base_url("/api/v3")).start());

    let mut client = H1Client::connect(serving.addr).await;
    for i in 0..3 {
        let r = client.request("GET", "/models", &[], b"").await;
        assert_eq!(r.status, 200);
        assert_ne!(
            r.header("connection")
                .map(str::to_ascii_lowercase)
                .as_deref(),
            Some("close"),
            "request {i}: the running server closes keep-alive because another one stopped"
        );
    }
    assert_eq!(mock.request_count(), 3);
}
