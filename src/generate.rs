//! `tollgate generate --out DIR` (hidden): shell completions and man pages
//! written from the clap definition that parses the command line, so they
//! cannot drift from it. `packaging/build-deb` runs it on the binary it
//! packages and ships what it writes.

use std::path::Path;

use clap::Command;
use clap_complete::Shell;

/// Writes `DIR/completions/` (`tollgate.bash`, `_tollgate`, `tollgate.fish`)
/// and `DIR/man/` (`tollgate.1` and one page per subcommand, which
/// `tollgate.1` refers to as `tollgate-serve(1)` and so on). Hidden
/// subcommands, this one included, appear in neither.
pub fn write(cli: Command, dir: &Path) -> std::io::Result<()> {
    let completions = dir.join("completions");
    std::fs::create_dir_all(&completions)?;
    let mut shown = shown(&cli);
    for shell in [Shell::Bash, Shell::Zsh, Shell::Fish] {
        clap_complete::generate_to(shell, &mut shown, "tollgate", &completions)?;
    }
    let man = dir.join("man");
    std::fs::create_dir_all(&man)?;
    clap_mangen::generate_to(cli, &man)
}

/// The command line as its users see it. clap_complete lists hidden
/// subcommands like the others (clap_mangen leaves them out), so the
/// completions are written from this copy without them.
fn shown(cli: &Command) -> Command {
    let shown = Command::new("tollgate")
        .version(env!("CARGO_PKG_VERSION"))
        .args(cli.get_arguments().cloned())
        .subcommands(cli.get_subcommands().filter(|s| !s.is_hide_set()).cloned())
        .subcommand_required(true);
    match cli.get_about() {
        Some(about) => shown.about(about.clone()),
        None => shown,
    }
}
