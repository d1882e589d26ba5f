//! `status`: the attached programs, the registered pods and the counters.

use meshbpf::Mesh;

use super::JsonPinArgs;
use crate::output::print_json;

pub fn run(JsonPinArgs { json, pin }: JsonPinArgs) -> anyhow::Result<()> {
    let status = Mesh::open(&pin.pin_dir)?.status()?;
    if json {
        print_json(&status)?;
        return Ok(());
    }
    out!("attached to  {}", status.cgroup_path);
    out!(
        "pinned under {}  (map layout v{})",
        status.pin_dir.display(),
        status.layout_version
    );
    out!("programs:");
    for p in &status.programs {
        out!("  {:<14} link {:<6} prog {}", p.hook, p.link_id, p.prog_id);
    }
    let sockmap = if status.sockmap {
        "sk_msg on sock_hash"
    } else {
        "off (attach --no-sockmap)"
    };
    out!("  {:<14} {sockmap}", "sockmap");
    match status.runs_first {
        Some(_) => super::check::print_other_programs(&status.other_programs)?,
        None => out!(
            "other programs on meshbpf's hooks: unknown (its cgroup is not reachable from here)"
        ),
    }
    out!("registered pods: {}", status.pods.len());
    out!("counters:");
    for (name, value) in &status.counters {
        out!("  {name:<22} {value}");
    }
    Ok(())
}
