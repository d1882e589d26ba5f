#!/usr/bin/env bash
# The plain manifests in deploy/ are rendered from the Helm chart deploy/charts/meshbpf, never
# edited by hand: deploy/meshbpf.yaml (the default values) and deploy/uninstall.yaml
# (uninstall=true), release "meshbpf" in namespace kube-system. Helm's own engine renders them
# (PyPI's helm-python-sdk, Helm v4's chart engine as a library: no helm binary, no cluster,
# no network), in the virtualenv scripts/deps.sh makes.
#
#   scripts/render-deploy.sh                 rewrite deploy/meshbpf.yaml and deploy/uninstall.yaml
#   scripts/render-deploy.sh --check         exit 1, with a diff, if they differ from the chart's
#   scripts/render-deploy.sh render [JSON]   print the manifests for these values (a JSON object)
#   scripts/render-deploy.sh objects [JSON]  the same as a JSON list of objects
#   scripts/render-deploy.sh lint [JSON]     helm lint's report (JSON)
# Exit codes: 0 done; 1 the manifests differ (--check); 2 the values are refused (the schema,
# or a template's check), with Helm's message naming the value; 3 helm-python-sdk is missing.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
python="${MESHBPF_PYTHON:-/opt/meshbpf-py/bin/python}"
if ! "$python" -c 'import helm_python, yaml' 2>/dev/null; then
    echo "render-deploy: $python cannot import helm_python and yaml: run scripts/deps.sh (it installs helm-python-sdk into /opt/meshbpf-py), or set MESHBPF_PYTHON" >&2
    exit 3
fi
exec "$python" - "$root" "$@" <<'EOF'
import difflib, json, sys
import helm_python as helm
import yaml

root, args = sys.argv[1], sys.argv[2:]
chart_dir = f"{root}/deploy/charts/meshbpf"
HEADER = "# Rendered from deploy/charts/meshbpf by scripts/render-deploy.sh: edit the chart, not this file.\n"
PLAIN = {"meshbpf.yaml": {}, "uninstall.yaml": {"uninstall": True}}


def render(values):
    """The chart's manifests for `values`, one YAML stream in template order."""
    with helm.Chart.load(chart_dir) as chart:
        out = chart.render(values=values, name="meshbpf", namespace="kube-system", is_install=True)
    docs = [out[name].strip() for name in sorted(out) if name.endswith(".yaml") and out[name].strip()]
    return "---\n".join(doc + "\n" for doc in docs)


def values_arg():
    if len(args) < 2:
        return {}
    values = json.loads(args[1])
    if not isinstance(values, dict):
        sys.exit("render-deploy: values must be a JSON object")
    return values


try:
    if not args or args[0] == "--check":
        stale = []
        for name, values in PLAIN.items():
            want = HEADER + render(values)
            path = f"{root}/deploy/{name}"
            try:
                have = open(path).read()
            except FileNotFoundError:
                have = ""
            if have == want:
                continue
            if args:
                stale.append(name)
                sys.stdout.writelines(difflib.unified_diff(
                    have.splitlines(True), want.splitlines(True), f"deploy/{name}", f"chart ({name})"))
            else:
                open(path, "w").write(want)
                print(f"render-deploy: wrote deploy/{name}")
        if stale:
            sys.exit(f"render-deploy: {', '.join(stale)} differ from the chart: run scripts/render-deploy.sh")
    elif args[0] == "render":
        sys.stdout.write(render(values_arg()))
    elif args[0] == "objects":
        print(json.dumps([o for o in yaml.safe_load_all(render(values_arg())) if o]))
    elif args[0] == "lint":
        print(json.dumps(helm.lint(chart_dir, values_arg(), strict=True, namespace="kube-system")))
    else:
        sys.exit(f"render-deploy: unknown command {args[0]!r}: give --check, render, objects or lint")
except (helm.HelmValuesError, helm.HelmRenderError) as err:
    print(f"render-deploy: the chart refused these values: {err}", file=sys.stderr)
    sys.exit(2)
EOF
