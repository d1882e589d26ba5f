//! `check`: the running kernel's features, against what meshbpf needs.

use meshbpf::Mesh;

use super::PinDirArg;
use crate::output::print_json;

#[derive(clap::Args)]
pub struct CheckArgs {
    /// Print JSON.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    pin: PinDirArg,
}

pub fn run(CheckArgs { json, pin }: CheckArgs) -> anyhow::Result<()> {
    let features = meshbpf::probe();
    // Attached here: the other programs on its capture hooks, and their order.
    let mesh = Mesh::open(&pin.pin_dir).ok();
    let others = match &mesh {
        Some(mesh) => Some(mesh.other_programs()?),
        None => None,
    };
    // JSON: the features as before; `status --json` has the other programs.
    if json {
        print_json(&features)?;
    } else {
        out!("{:<52} {:<28} {:<5} HOW", "FEATURE", "MINIMUM KERNEL", "OK");
        for f in &features {
            out!(
                "{:<52} {:<28} {:<5} {}",
                f.name,
                f.min_kernel,
                match (f.available, f.required) {
                    (true, _) => "yes",
                    (false, true) => "NO",
                    (false, false) => "no",
                },
                f.how
            );
        }
    }
    if let (false, Some(others)) = (json, &others) {
        print_other_programs(others)?;
    }
    meshbpf::probe_required()?;
    meshbpf::check_kernel()?;
    if let Some(problem) = mesh.map(|m| m.order_problem()).transpose()?.flatten() {
        anyhow::bail!("{problem}");
    }
    Ok(())
}

/// The other programs on meshbpf's capture hooks, and whether each runs before it.
pub fn print_other_programs(others: &[meshbpf::OtherProgram]) -> anyhow::Result<()> {
    if others.is_empty() {
        out!("other programs on meshbpf's hooks: none (its capture programs run first)");
        return Ok(());
    }
    out!("other programs on meshbpf's hooks (its cgroup and ancestors):");
    for p in others {
        out!(
            "  {:<14} prog {:<6} {:<16} on {}  {}",
            p.hook,
            p.prog_id,
            p.name,
            p.cgroup,
            if p.runs_before_meshbpf {
                "RUNS BEFORE meshbpf: the sidecar may learn a translated destination"
            } else {
                "runs after meshbpf (right)"
            }
        );
    }
    Ok(())
}
