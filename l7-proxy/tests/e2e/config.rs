//! Config errors as a user sees them, from the library and from the binary.

use l7_proxy::{Config, ConfigError};

#[test]
fn malformed_config_errors_name_the_field_and_line() {
    let unknown_field = "[[listeners]]\nname = \"web\"\naddress = \"127.0.0.1:0\"\nport = 80\n";
    let msg = Config::from_toml_str(unknown_field)
        .unwrap_err()
        .to_string();
    assert!(msg.contains("line 4"), "{msg}");
    assert!(msg.contains("unknown field `port`"), "{msg}");

    let wrong_type = "[server]\nheader_read_timeout_ms = \"soon\"\n";
    let msg = Config::from_toml_str(wrong_type).unwrap_err().to_string();
    assert!(
        msg.contains("line 2") && msg.contains("header_read_timeout_ms"),
        "{msg}"
    );

    let bad_member =
        "\n[[upstreams]]\nname = \"g\"\nmembers = [\n  { address = \"localhost\" },\n]\n";
    match Config::from_toml_str(bad_member).unwrap_err() {
        ConfigError::Invalid { field, line, .. } => {
            assert_eq!(field, "upstreams[0].members[0].address");
            assert_eq!(line, 5);
        }
        other => panic!("unexpected: {other}"),
    }

    let no_hash = "[[upstreams]]\nname = \"g\"\nalgorithm = \"consistent_hash\"\nmembers = [{ address = \"127.0.0.1:1\" }]\n";
    let msg = Config::from_toml_str(no_hash).unwrap_err().to_string();
    assert!(msg.contains("hash_on"), "{msg}");
}

#[test]
fn example_config_is_valid() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/proxy.toml");
    let config = Config::from_file(path).unwrap();
    assert!(!config.routes.is_empty() && !config.upstreams.is_empty());
}

#[test]
fn binary_check_reports_the_line() {
    let file = crate::support::ConfigFile::new(
        "[[routes]]\nname = \"r\"\naction = { forward = { group = \"nope\" } }\n",
    );
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_l7-proxy"))
        .args(["--check", "--config"])
        .arg(&file.path)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("line 3") && stderr.contains("routes[0].action.forward.group"),
        "{stderr}"
    );
}

/// `l7-proxy --check` on `text`: (success, stdout, stderr).
fn check(text: &str) -> (bool, String, String) {
    let file = crate::support::ConfigFile::new(text);
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_l7-proxy"))
        .args(["--check", "--config"])
        .arg(&file.path)
        .env_remove("RUST_BACKTRACE")
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `--check` builds what a start builds (policies, TLS files), as `nginx -t` does, not only
/// the TOML.
#[test]
fn binary_check_builds_policies_and_tls_as_a_start_would() {
    let base = "[[listeners]]\nname = \"web\"\naddress = \"127.0.0.1:0\"\n\
                [[upstreams]]\nname = \"g\"\nmembers = [{ address = \"127.0.0.1:9\" }]\n\
                [[routes]]\nname = \"api\"\naction = { forward = { group = \"g\" } }\n";
    let (ok, stdout, stderr) = check(base);
    assert!(ok && stdout.contains(": ok"), "{stdout}{stderr}");

    let (ok, _, stderr) = check(&format!(
        "{base}policies = [{{ type = \"rate_limit\", requests = 10 }}, \
         {{ type = \"rate_limit\", requests = 0 }}]\n"
    ));
    assert!(!ok);
    assert!(
        stderr.contains("routes[0].policies[1]")
            && stderr.contains("route `api`: policy rate_limit: requests and period_secs"),
        "{stderr}"
    );

    let (ok, _, stderr) = check(&base.replace(
        "address = \"127.0.0.1:0\"\n",
        "address = \"127.0.0.1:0\"\ntls = { certs = [{ cert = \"/nonexistent/c.pem\", key = \"/nonexistent/k.pem\" }] }\n",
    ));
    assert!(!ok);
    assert!(
        stderr.contains("/nonexistent/c.pem") && stderr.contains("No such file"),
        "{stderr}"
    );

    // A file with no listener would start a proxy that accepts nothing.
    let (ok, _, stderr) =
        check("[[upstreams]]\nname = \"g\"\nmembers = [{ address = \"127.0.0.1:9\" }]\n");
    assert!(!ok && stderr.contains("no [[listeners]]"), "{stderr}");
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Polls `GET /` until the body is `want` (the binary needs a moment to start or reload).
async fn wait_for_body(addr: std::net::SocketAddr, want: &str) {
    let c = crate::support::client();
    for _ in 0..200 {
        let req = http::Request::get(format!("http://{addr}/"))
            .header("host", "h")
            .body(http_body_util::Full::new(bytes::Bytes::new()))
            .unwrap();
        if let Ok(Ok(resp)) =
            tokio::time::timeout(std::time::Duration::from_secs(1), c.request(req)).await
        {
            use http_body_util::BodyExt;
            if let Ok(body) = resp.into_body().collect().await {
                if body.to_bytes() == want.as_bytes() {
                    return;
                }
            }
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    panic!("never got {want:?} from {addr}");
}

#[tokio::test]
async fn binary_reloads_on_sighup_and_exits_on_sigterm() {
    use crate::support::{members, ConfigFile, TestUpstream};
    let (a, b) = (
        TestUpstream::start("a").await,
        TestUpstream::start("b").await,
    );
    let port = free_port();
    let config = |target: &TestUpstream| {
        format!(
            "[[listeners]]\nname = \"web\"\naddress = \"127.0.0.1:{port}\"\n\
             [[upstreams]]\nname = \"g\"\nmembers = {}\n\
             [[routes]]\nname = \"all\"\naction = {{ forward = {{ group = \"g\" }} }}\n",
            members(&[target])
        )
    };
    let file = ConfigFile::new(&config(&a));
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_l7-proxy"))
        .arg("--config")
        .arg(&file.path)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let pid = child.id().unwrap() as libc::pid_t;
    let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    wait_for_body(addr, "a").await;

    file.write(&config(&b));
    // SAFETY: plain kill(2) on the child we spawned.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGHUP) }, 0);
    wait_for_body(addr, "b").await;

    // An invalid file on SIGHUP is rejected; the process keeps serving.
    file.write("this is not toml");
    assert_eq!(unsafe { libc::kill(pid, libc::SIGHUP) }, 0);
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    wait_for_body(addr, "b").await;

    assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
    let status = tokio::time::timeout(std::time::Duration::from_secs(15), child.wait())
        .await
        .expect("exits after SIGTERM")
        .unwrap();
    assert!(status.success(), "{status:?}");
}

#[test]
fn zero_timeouts_are_refused_with_the_field_and_line() {
    // HAProxy reads `timeout ... 0` as "no timeout"; here 0 would fail every request or
    // close every connection at once, so it is a config error that says where.
    let group = "[[upstreams]]\nname = \"g\"\nmembers = [{ address = \"127.0.0.1:1\" }]\n";
    let cases = [
        (
            "[server]\nidle_timeout_ms = 0\n",
            "server.idle_timeout_ms",
            2,
        ),
        (
            "[server]\ndrain_timeout_ms = 5\nheader_read_timeout_ms = 0\n",
            "server.header_read_timeout_ms",
            3,
        ),
        (
            &format!("{group}request_timeout_ms = 0\n"),
            "upstreams[0].request_timeout_ms",
            4,
        ),
        (
            &format!("{group}connect_timeout_ms = 0\n"),
            "upstreams[0].connect_timeout_ms",
            4,
        ),
        (
            &format!("{group}idle_timeout_ms = 0\n"),
            "upstreams[0].idle_timeout_ms",
            4,
        ),
        (
            &format!("{group}health_check = {{ path = \"/\", timeout_ms = 0 }}\n"),
            "upstreams[0].health_check.timeout_ms",
            4,
        ),
    ];
    for (text, want_field, want_line) in cases {
        match Config::from_toml_str(text) {
            Err(ConfigError::Invalid {
                field,
                line,
                message,
            }) => {
                assert_eq!((field.as_str(), line), (want_field, want_line), "{message}");
            }
            other => panic!("{text}: unexpected {other:?}"),
        }
    }
    // Zero stays fine where it means "none": no drain wait, no pooled idle connections
    // (which a pool idle timeout of 0 used to mean, silently: the message says what does).
    Config::from_toml_str(&format!(
        "[server]\ndrain_timeout_ms = 0\n{group}max_idle_per_member = 0\n"
    ))
    .unwrap();
    let text = format!("{group}idle_timeout_ms = 0\n");
    let message = Config::from_toml_str(&text).unwrap_err().to_string();
    assert!(message.contains("max_idle_per_member = 0"), "{message}");
}

#[test]
fn lowercase_standard_methods_are_refused() {
    // Methods are case-sensitive: `get` would never match a GET, and the route would
    // silently answer 404.
    let text = "[[routes]]\nname = \"r\"\nmatch = { methods = [\"GET\",\n  \"post\"] }\naction = { fixed = { status = 200 } }\n";
    match Config::from_toml_str(text) {
        Err(ConfigError::Invalid {
            field,
            line,
            message,
        }) => {
            assert_eq!((field.as_str(), line), ("routes[0].match.methods[1]", 4));
            assert!(message.contains("POST"), "{message}");
        }
        other => panic!("unexpected {other:?}"),
    }
    // Extension methods keep their spelling.
    Config::from_toml_str(&text.replace("\"post\"", "\"PURGE\"")).unwrap();
}

#[test]
fn health_check_path_that_is_not_a_request_target_is_refused() {
    // An unusable path used to stop the member's checks silently, leaving it up for ever.
    let text = "[[upstreams]]\nname = \"g\"\nmembers = [{ address = \"127.0.0.1:1\" }]\nhealth_check = { path = \"/health check\" }\n";
    match Config::from_toml_str(text) {
        Err(ConfigError::Invalid { field, .. }) => {
            assert_eq!(field, "upstreams[0].health_check.path")
        }
        other => panic!("unexpected {other:?}"),
    }
}

#[test]
fn route_hosts_with_a_port_or_brackets_are_refused() {
    // Routes match the request's host without its port, and an IPv6 literal without its
    // brackets: such a pattern could never match, and the route would silently never serve.
    let route = |host: &str| {
        format!(
            "[[routes]]\nname = \"r\"\nmatch = {{ host = \"{host}\" }}\naction = {{ fixed = {{ status = 200 }} }}\n"
        )
    };
    for (host, want) in [
        ("api.example.com:8080", "must not include a port"),
        ("*.example.com:443", "must not include a port"),
        ("[::1]", "without brackets"),
        ("[2001:db8::1]:8080", "without brackets"),
    ] {
        match Config::from_toml_str(&route(host)) {
            Err(ConfigError::Invalid {
                field,
                line,
                message,
            }) => {
                assert_eq!(
                    (field.as_str(), line),
                    ("routes[0].match.host", 3),
                    "{host}"
                );
                assert!(message.contains(want), "{host}: {message}");
            }
            other => panic!("{host}: unexpected {other:?}"),
        }
    }
    for host in [
        "api.example.com",
        "*.example.com",
        "::1",
        "2001:db8::1",
        "127.0.0.1",
    ] {
        Config::from_toml_str(&route(host)).unwrap_or_else(|e| panic!("{host}: {e}"));
    }
}
