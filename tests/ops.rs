//! Operations: the unit passes `systemd-analyze verify` and its sandboxing
//! passes `systemd-analyze security --threshold`; the install script stages
//! a tree and ships no usable key; `generate` writes the completions and man
//! pages the Debian package ships (`packaging/test-deb` checks the package).
//! The reload sequence itself is tested in `tests/reload.rs`.
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
        "SystemCallFilter=@system-service",
        "ProtectProc=invisible",
        "UMask=0077",
        "RemoveIPC=yes",
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

/// The sandbox scores 2.0 or better (lower is safer; it was 3.4) in
/// `systemd-analyze security`, whose `--threshold` is in tenths.
#[test]
fn the_unit_passes_systemd_analyze_security_at_2_0() {
    let unit = concat!(env!("CARGO_MANIFEST_DIR"), "/systemd/tollgate.service");
    let out = Command::new("systemd-analyze")
        .args(["security", "--offline=yes", "--threshold=20", unit])
        .output()
        .expect("systemd-analyze must be installed (.ci/test installs systemd)");
    let text = String::from_utf8_lossy(&out.stdout);
    let overall = text
        .lines()
        .find(|l| l.contains("Overall exposure level"))
        .unwrap_or("no overall line");
    assert!(out.status.success(), "{overall}\n{text}");
}

#[test]
fn install_script_stages_binary_config_and_unit() {
    let root = env!("CARGO_MANIFEST_DIR");
    let dest = tempfile::tempdir().unwrap();
    // TOLLGATE_BIN relative to where the script is started from (it used to
    // change directory first and then fail with "cannot stat").
    let bin = tollgate_bin();
    let (bin_dir, bin_name) = (bin.parent().unwrap(), bin.file_name().unwrap());
    let install = || {
        let mut c = Command::new(format!("{root}/systemd/install.sh"));
        c.env("DESTDIR", dest.path())
            .env("TOLLGATE_BIN", std::path::Path::new(".").join(bin_name))
            .current_dir(bin_dir);
        c
    };
    let out = install().output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        said.contains("no API keys yet")
            && said.contains(
                "/usr/local/bin/tollgate keys create --name NAME --credits N -c /etc/tollgate/tollgate.yaml"
            ),
        "{said}"
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
    // No key ships: not the README's demo key, not sha256("test").
    let keys_path = d.join("etc/tollgate/keys.yaml");
    let keys = std::fs::read_to_string(&keys_path).unwrap();
    for public in [
        "demo-key-change-me",
        "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08",
    ] {
        assert!(!keys.contains(public), "{keys}");
    }
    // The staged config, pointed at the staged keys file, has no key; the
    // command the installer prints makes the first one.
    let staged = d.join("etc/tollgate/staged.yaml");
    std::fs::write(
        &staged,
        conf.replace(
            "keys_file: /etc/tollgate/keys.yaml",
            &format!("keys_file: {}", keys_path.display()),
        ),
    )
    .unwrap();
    let (code, out, err) = tollgate(&["keys", "list"], &staged);
    assert_eq!(code, 0, "{err}");
    assert_eq!(out.lines().count(), 1, "a header only: {out}");
    let (code, out, err) = tollgate(
        &["keys", "create", "--name", "first", "--credits", "10"],
        &staged,
    );
    assert_eq!(code, 0, "{err}");
    let first = out.lines().next().unwrap();
    let (_, listed, _) = tollgate(&["keys", "list"], &staged);
    assert!(listed.contains("first"), "{listed}");
    assert!(!std::fs::read_to_string(&keys_path).unwrap().contains(first));
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

/// `tollgate generate` (hidden; `packaging/build-deb` runs it) writes the
/// completions and man pages from the CLI definition, without a config, and
/// shows itself in none of them.
#[test]
fn generate_writes_completions_and_man_pages_from_the_cli() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(tollgate_bin())
        .args(["generate", "--out"])
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let read = |f: &str| std::fs::read_to_string(dir.path().join(f)).unwrap();
    let bash = read("completions/tollgate.bash");
    assert!(bash.contains("complete -F _tollgate"), "{bash}");
    assert!(read("completions/_tollgate").starts_with("#compdef tollgate"));
    assert!(read("completions/tollgate.fish").contains("complete -c tollgate"));
    let top = read("man/tollgate.1");
    assert!(top.contains(".TH tollgate 1"), "{top}");
    assert!(top.contains("tollgate\\-keys(1)"), "{top}");
    let create = read("man/tollgate-keys-create.1");
    assert!(create.contains("\\-\\-credits"), "{create}");
    for text in [bash, top] {
        assert!(!text.contains("generate"), "the hidden command shows");
    }
    let help = Command::new(tollgate_bin()).arg("--help").output().unwrap();
    assert!(!String::from_utf8_lossy(&help.stdout).contains("generate"));
}
