//! Operations: the unit passes `systemd-analyze verify` and its sandboxing
//! passes `systemd-analyze security --threshold`; the install script stages
//! a tree and ships no usable key. The reload sequence itself is tested in
//! `tests/reload.rs`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::process::Command;

use common::*;

#[test]
fn the_unit_passes_systemd_analyze_verify() {
    let unit = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/systemd/tollgate.service"
    ))
    .unwrap();
    for needed in [
        "Type=forking",
        "PIDFile=/run/tollgate/tollgate.pid",
        "ExecStartPre=/usr/local/bin/tollgate check -c /etc/tollgate/tollgate.yaml",
        "ExecStart=/usr/local/bin/tollgate serve -d -c /etc/tollgate/tollgate.yaml",
        "ExecReload=/usr/local/bin/tollgate reload -c /etc/tollgate/tollgate.yaml --pid $MAINPID",
        "RuntimeDirectory=tollgate",
        "User=tollgate",
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
    ] {
        assert!(unit.contains(needed), "unit lacks {needed}");
    }
    // verify checks that the commands exist: point them at the built binary.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tollgate.service");
    std::fs::write(
        &path,
        unit.replace("/usr/local/bin/tollgate", tollgate_bin().to_str().unwrap()),
    )
    .unwrap();
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&path)
        .output()
        .expect("systemd-analyze must be installed (.ci/test installs systemd)");
    assert!(
        out.status.success() && out.stderr.is_empty(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn install_script_stages_binary_config_and_unit() {
    let root = env!("CARGO_MANIFEST_DIR");
    let dest = tempfile::tempdir().unwrap();
    let install = || {
        let mut c = Command::new(format!("{root}/systemd/install.sh"));
        c.env("DESTDIR", dest.path())
            .env("TOLLGATE_BIN", tollgate_bin());
        c
    };
    let out = install().output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let d = dest.path();
    for f in [
        "usr/local/bin/tollgate",
        "etc/systemd/system/tollgate.service",
        "etc/tollgate/tollgate.yaml",
        "etc/tollgate/keys.yaml",
    ] {
        assert!(d.join(f).exists(), "{f} not installed");
    }
    let conf = std::fs::read_to_string(d.join("etc/tollgate/tollgate.yaml")).unwrap();
    assert!(
        conf.contains("pid_file: /run/tollgate/tollgate.pid"),
        "{conf}"
    );
    assert!(
        conf.contains("upgrade_sock: /run/tollgate/upgrade.sock"),
        "{conf}"
    );
    assert!(
        conf.contains("keys_file: /etc/tollgate/keys.yaml"),
        "{conf}"
    );
    // An existing config is kept on reinstall; uninstall keeps it too.
    std::fs::write(d.join("etc/tollgate/tollgate.yaml"), "# mine\n").unwrap();
    let again = install().output().unwrap();
    assert!(again.status.success());
    assert_eq!(
        std::fs::read_to_string(d.join("etc/tollgate/tollgate.yaml")).unwrap(),
        "# mine\n"
    );
    let gone = install().arg("--uninstall").output().unwrap();
    assert!(gone.status.success());
    assert!(!d.join("usr/local/bin/tollgate").exists());
    assert!(!d.join("etc/systemd/system/tollgate.service").exists());
    assert!(d.join("etc/tollgate/tollgate.yaml").exists());
}
