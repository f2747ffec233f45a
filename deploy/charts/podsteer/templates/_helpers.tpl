{{/* the image of this release: <hub>/<image>:<tag>, the tag the chart's appVersion unless set */}}
{{- define "podsteer.image" -}}
{{ .Values.hub }}/{{ .Values.image }}:{{ .Values.tag | default .Chart.AppVersion }}
{{- end }}

{{/* labels every object carries (none that name Helm: the plain manifests are rendered from
     this chart and applied with kubectl) */}}
{{- define "podsteer.labels" -}}
{{ include "podsteer.podLabels" . }}
app.kubernetes.io/version: {{ .Values.tag | default .Chart.AppVersion | quote }}
{{- end }}

{{/* the same in pod templates, without the version: a new agent tag must not roll the proxy */}}
{{- define "podsteer.podLabels" -}}
app.kubernetes.io/name: podsteer
app.kubernetes.io/part-of: podsteer
{{- end }}

{{/* podsteer-proxy's image: its own tag if set (so an agent upgrade need not restart it) */}}
{{- define "podsteer.proxyImage" -}}
{{ .Values.hub }}/{{ .Values.image }}:{{ .Values.proxy.tag | default .Values.tag | default .Chart.AppVersion }}
{{- end }}

{{/* the agent's flags that come from values rather than the ConfigMap */}}
{{- define "podsteer.extraFlags" -}}
{{- $f := list -}}
{{- if .Values.ambient.failOpen }}{{ $f = append $f "--fail-open" }}{{ end -}}
{{- if .Values.datapath.hookCgroup }}{{ $f = append $f (printf "--hook-cgroup %s" .Values.datapath.hookCgroup) }}{{ end -}}
{{- range .Values.extraArgs }}{{ $f = append $f . }}{{ end -}}
{{ join " " $f }}
{{- end }}
