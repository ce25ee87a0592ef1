{{/* Names as upstream: fullname truncated to 26 characters so "<fullname>-prometheus" fits everywhere. */}}
{{- define "kube-prometheus-stack.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 50 | trimSuffix "-" -}}
{{- end -}}

{{- define "kube-prometheus-stack.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 26 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 26 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 26 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "kube-prometheus-stack.namespace" -}}
{{- default .Release.Namespace .Values.namespaceOverride -}}
{{- end -}}

{{- define "kube-prometheus-stack.labels" -}}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.Version | replace "+" "_" | quote }}
app.kubernetes.io/part-of: {{ include "kube-prometheus-stack.name" . }}
chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
release: {{ .Release.Name | quote }}
heritage: {{ .Release.Service | quote }}
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{- define "kube-prometheus-stack.image" -}}
{{- printf "%s/%s:%s" .registry .repository (toString (.tag | default "latest")) -}}
{{- end -}}

{{/* grafana subchart fullname: <release>-grafana unless grafana.fullnameOverride */}}
{{- define "kube-prometheus-stack.grafana.fullname" -}}
{{- if .Values.grafana.fullnameOverride -}}
{{- .Values.grafana.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else if contains "grafana" .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-grafana" .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{/*
A resource selector: `{}` (all) when <kind>SelectorNilUsesHelmValues is false or an explicit selector is given,
else matchLabels release=<release> (upstream's default, the "release label" trap).
Input: dict root=$ kind=serviceMonitor|podMonitor|rule|probe|scrapeConfig
*/}}
{{- define "kube-prometheus-stack.selector" -}}
{{- $spec := .root.Values.prometheus.prometheusSpec -}}
{{- $explicit := index $spec (printf "%sSelector" .kind) -}}
{{- $nilUsesHelm := index $spec (printf "%sSelectorNilUsesHelmValues" .kind) -}}
{{- if $explicit -}}
{{ toYaml $explicit }}
{{- else if $nilUsesHelm -}}
matchLabels:
  release: {{ .root.Release.Name | quote }}
{{- else -}}
{}
{{- end -}}
{{- end -}}
