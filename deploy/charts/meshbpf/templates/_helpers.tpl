{{/* The chart's name. */}}
{{- define "meshbpf.name" -}}
{{- .Chart.Name | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* The objects' name: the release's, with the chart's name unless it holds it already. */}}
{{- define "meshbpf.fullname" -}}
{{- if contains .Chart.Name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}

{{/* The labels of every object. The selector uses only app.kubernetes.io/name, as the plain
manifests always have: a DaemonSet's selector cannot change, so a cluster installed from them
moves to the chart with an upgrade. */}}
{{- define "meshbpf.labels" -}}
app.kubernetes.io/name: {{ include "meshbpf.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end }}

{{/* The platform profile's values (files/platform-NAME.yaml), or none. */}}
{{- define "meshbpf.platform" -}}
{{- with .Values.platform }}
{{- $file := $.Files.Get (printf "files/platform-%s.yaml" .) }}
{{- if not $file }}
{{- fail (printf "platform %q is not one this chart knows: give \"\", gke, k3s or microk8s" .) }}
{{- end }}
{{- $file }}
{{- end }}
{{- end }}

{{/* The node's CNI bin dir: the value given, else the platform's, else /opt/cni/bin. */}}
{{- define "meshbpf.cniBinDir" -}}
{{- $platform := include "meshbpf.platform" . | fromYaml }}
{{- .Values.cni.binDir | default (dig "cni" "binDir" "" $platform) | default "/opt/cni/bin" }}
{{- end }}

{{/* The node's CNI conf dir: the value given, else the platform's, else /etc/cni/net.d. */}}
{{- define "meshbpf.cniConfDir" -}}
{{- $platform := include "meshbpf.platform" . | fromYaml }}
{{- .Values.cni.confDir | default (dig "cni" "confDir" "" $platform) | default "/etc/cni/net.d" }}
{{- end }}

{{/* Whether the ResourceQuota is made: asked for, or the platform's (gke). */}}
{{- define "meshbpf.resourceQuota" -}}
{{- $platform := include "meshbpf.platform" . | fromYaml }}
{{- if or .Values.resourceQuota.enabled (dig "resourceQuota" "enabled" false $platform) }}true{{ end }}
{{- end }}

{{/* The image reference: by digest when given, else by tag (default: appVersion). */}}
{{- define "meshbpf.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (.Values.image.tag | default .Chart.AppVersion) }}
{{- end }}
{{- end }}

{{/* The plugin's conf entry (JSON): the CNI keys, then every register option given, its
camelCase value name in snake_case. */}}
{{- define "meshbpf.pluginConf" -}}
{{- $conf := dict "type" "meshbpf-cni" "pin_dir" .Values.pinDir "state_dir" .Values.cni.stateDir "exclude_namespaces" .Values.cni.excludeNamespaces }}
{{- if .Values.cni.podAnnotations }}
{{- $_ := set $conf "capabilities" (dict "io.kubernetes.cri.pod-annotations" true) }}
{{- end }}
{{- with .Values.cni.logFile }}
{{- $_ := set $conf "log_file" . }}
{{- end }}
{{- range $key, $value := .Values.plugin }}
{{- if and (not (kindIs "invalid" $value)) (or (kindIs "float64" $value) (kindIs "int64" $value) (kindIs "int" $value) $value) }}
{{- $_ := set $conf (snakecase $key) $value }}
{{- end }}
{{- end }}
{{- toPrettyJson $conf }}
{{- end }}

{{/* The agent's listen address as --listen takes it ("none": not served). */}}
{{- define "meshbpf.listen" -}}
{{- $address := .Values.agent.listenAddress }}
{{- if not $address }}none
{{- else if eq $address "node" }}$(NODE_IP):{{ .Values.agent.port }}
{{- else if contains ":" $address }}[{{ $address }}]:{{ .Values.agent.port }}
{{- else }}{{ $address }}:{{ .Values.agent.port }}
{{- end }}
{{- end }}

{{/* The host the kubelet probes: the listen address when it is one address (127.0.0.1,
::1, a fixed IP); none for a wildcard or the node's IP, which the pod's IP is. */}}
{{- define "meshbpf.probeHost" -}}
{{- $address := .Values.agent.listenAddress }}
{{- if not (has $address (list "node" "0.0.0.0" "::")) }}{{ $address }}{{ end }}
{{- end }}

{{/* The security context of the containers that run meshbpf, given the capabilities to add
(the list "caps" of the dict passed, with "Values"): not privileged, root (the node's files
they write are root's) with every other capability dropped, seccomp RuntimeDefault (the
runtimes' default profiles allow bpf(2) and setns(2) to a process holding SYS_ADMIN), a
read-only root filesystem (meshbpf writes only to its volumes), no privilege escalation. */}}
{{- define "meshbpf.securityContext" -}}
privileged: false
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
runAsUser: 0
runAsGroup: 0
runAsNonRoot: false
capabilities:
  drop:
    - ALL
  add:
    {{- toYaml .caps | nindent 4 }}
seccompProfile:
  type: RuntimeDefault
{{- with .Values.appArmorProfile }}
appArmorProfile:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end }}
