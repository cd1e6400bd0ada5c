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
