//! `check`: the running kernel's features, against what meshbpf needs.

use crate::output::print_json;

#[derive(clap::Args)]
pub struct CheckArgs {
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

pub fn run(CheckArgs { json }: CheckArgs) -> anyhow::Result<()> {
    let features = meshbpf::probe();
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
    meshbpf::probe_required()?;
    meshbpf::check_kernel()?;
    Ok(())
}
