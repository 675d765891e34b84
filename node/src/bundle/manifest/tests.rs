//! Manifest parsing: the interface's example, defaults, and a refusal naming its field for
//! every rule.

use super::*;

fn parse(s: &str) -> Result<Manifest, ManifestError> {
    Manifest::parse(s.as_bytes())
}

fn field_of(s: &str) -> String {
    parse(s).expect_err("should be refused").field
}

const BASE: &str = "service = \"voice\"\nversion = \"1.0.0\"\nexec = [\"bin/start\"]\n";

#[test]
fn interface_example_parses() {
    let m = parse(
        r#"
service = "voice"
version = "1.4.2"
exec = ["bin/start", "--port", "5060"]
stop_timeout = "20s"
[env]
LOG_LEVEL = "info"
[health]
alive = "5s"
timeout = "30s"
"#,
    )
    .unwrap();
    assert_eq!(m.service, "voice");
    assert_eq!(m.exec, ["bin/start", "--port", "5060"]);
    assert_eq!(m.stop_timeout, Duration::from_secs(20));
    assert_eq!(m.env["LOG_LEVEL"], "info");
    assert_eq!(m.health.check, HealthCheck::Alive(Duration::from_secs(5)));
}

#[test]
fn defaults_apply() {
    let m = parse(BASE).unwrap();
    assert_eq!(m.stop_timeout, STOP_TIMEOUT_DEFAULT);
    assert_eq!(m.health.check, HealthCheck::Alive(HEALTH_ALIVE_DEFAULT));
    assert_eq!(m.health.timeout, HEALTH_TIMEOUT_DEFAULT);
    assert!(m.env.is_empty());
}

#[test]
fn health_targets_parse() {
    let m = parse(&format!("{BASE}[health]\ntcp = \"127.0.0.1:5060\"\n")).unwrap();
    assert_eq!(
        m.health.check,
        HealthCheck::Tcp {
            host: "127.0.0.1".into(),
            port: 5060
        }
    );
    let m = parse(&format!(
        "{BASE}[health]\nhttp = \"http://localhost:8080/health?x=1\"\ntimeout = \"3s\"\n"
    ))
    .unwrap();
    assert_eq!(
        m.health.check,
        HealthCheck::Http(HttpTarget {
            host: "localhost".into(),
            port: 8080,
            path: "/health?x=1".into()
        })
    );
    assert_eq!(m.health.timeout, Duration::from_secs(3));
    let m = parse(&format!("{BASE}[health]\nhttp = \"http://[::1]\"\n")).unwrap();
    assert_eq!(
        m.health.check,
        HealthCheck::Http(HttpTarget {
            host: "::1".into(),
            port: 80,
            path: "/".into()
        })
    );
}

#[test]
fn refusals_name_the_field() {
    assert_eq!(field_of(&format!("{BASE}colour = 1\n")), "colour");
    assert_eq!(field_of("version = \"1\"\nexec = [\"a\"]\n"), "service");
    assert_eq!(field_of(&BASE.replace("voice", "fax")), "service");
    assert_eq!(field_of(&BASE.replace("1.0.0", "")), "version");
    assert_eq!(field_of(&BASE.replace("1.0.0", "1 0")), "version");
    assert_eq!(field_of(&BASE.replace("1.0.0", &"9".repeat(65))), "version");
    assert_eq!(field_of(&BASE.replace("[\"bin/start\"]", "[]")), "exec");
    assert_eq!(field_of(&BASE.replace("[\"bin/start\"]", "\"x\"")), "exec");
    assert_eq!(field_of(&BASE.replace("bin/start", "/bin/sh")), "exec[0]");
    assert_eq!(field_of(&BASE.replace("bin/start", "../x")), "exec[0]");
    assert_eq!(field_of(&BASE.replace("bin/start", "a/../../x")), "exec[0]");
    assert_eq!(
        field_of(&BASE.replace("[\"bin/start\"]", "[\"a\", 3]")),
        "exec[1]"
    );
    assert_eq!(
        field_of(&format!("{BASE}stop_timeout = \"forever\"\n")),
        "stop_timeout"
    );
    assert_eq!(
        field_of(&format!("{BASE}stop_timeout = \"11m\"\n")),
        "stop_timeout"
    );
    assert_eq!(
        field_of(&format!("{BASE}stop_timeout = 5\n")),
        "stop_timeout"
    );
    assert_eq!(
        field_of(&format!("{BASE}[env]\nOUTPOST_TOKEN = \"x\"\n")),
        "env.OUTPOST_TOKEN"
    );
    assert_eq!(
        field_of(&format!("{BASE}[env]\nNOTIFY_SOCKET = \"x\"\n")),
        "env.NOTIFY_SOCKET"
    );
    assert_eq!(
        field_of(&format!("{BASE}[env]\n\"1BAD\" = \"x\"\n")),
        "env.1BAD"
    );
    assert_eq!(field_of(&format!("{BASE}[env]\nA = 1\n")), "env.A");
    assert_eq!(
        field_of(&format!("{BASE}[health]\nalive = \"1s\"\ntcp = \"a:1\"\n")),
        "health"
    );
    assert_eq!(
        field_of(&format!("{BASE}[health]\ntimeout = \"1s\"\n")),
        "health"
    );
    assert_eq!(
        field_of(&format!("{BASE}[health]\nping = 1\n")),
        "health.ping"
    );
    assert_eq!(
        field_of(&format!("{BASE}[health]\ntcp = \"localhost\"\n")),
        "health.tcp"
    );
    assert_eq!(
        field_of(&format!("{BASE}[health]\ntcp = \"::1:80\"\n")),
        "health.tcp"
    );
    assert_eq!(
        field_of(&format!("{BASE}[health]\ntcp = \"h:0\"\n")),
        "health.tcp"
    );
    assert_eq!(
        field_of(&format!("{BASE}[health]\nhttp = \"https://h/x\"\n")),
        "health.http"
    );
    assert_eq!(
        field_of(&format!("{BASE}[health]\nhttp = \"http://h/a b\"\n")),
        "health.http"
    );
    assert!(field_of("service = ").starts_with("line "));
}

#[test]
fn huge_manifest_is_refused_before_parsing() {
    let big = format!("{BASE}# {}\n", "x".repeat(MANIFEST_BYTES_MAX as usize));
    assert_eq!(field_of(&big), "(file)");
}

/// `[config]`: where configuration data goes and how the software is told; each refusal
/// names its field.
#[test]
fn config_section_parses_and_refusals_name_the_field() {
    let m = parse(BASE).unwrap();
    assert_eq!(m.config, ConfigSpec::default());
    let m = parse(&format!(
        "{BASE}[config]\npath = \"/etc/voice/outpost.toml\"\nformat = \"toml\"\nreload = [\"bin/reload\", \"--soft\"]\n"
    ))
    .unwrap();
    assert_eq!(
        m.config,
        ConfigSpec {
            path: Some("/etc/voice/outpost.toml".into()),
            format: ConfigFormat::Toml,
            reload: Some(vec!["bin/reload".into(), "--soft".into()]),
        }
    );
    for (section, field) in [
        ("path = \"relative.json\"", "config.path"),
        ("path = \"/etc/../x\"", "config.path"),
        ("path = \"/etc/dir/\"", "config.path"),
        ("path = 3", "config.path"),
        ("format = \"yaml\"", "config.format"),
        ("reload = []", "config.reload"),
        ("reload = [\"/bin/kill\"]", "config.reload[0]"),
        ("colour = 1", "config.colour"),
    ] {
        assert_eq!(
            field_of(&format!("{BASE}[config]\n{section}\n")),
            field,
            "{section}"
        );
    }
    assert_eq!(field_of(&format!("{BASE}config = 1\n")), "config");
}
