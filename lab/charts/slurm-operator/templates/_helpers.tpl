{{- define "slurm-operator.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "slurm-operator.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "slurm-operator.namespace" -}}
{{- default .Release.Namespace .Values.namespaceOverride -}}
{{- end -}}

{{/* Input: dict root=$ name=<object name> component=operator|webhook values=<component values> */}}
{{- define "slurm-operator.deployment" -}}
{{- $root := .root -}}
{{- $labels := dict "app.kubernetes.io/name" .name "app.kubernetes.io/instance" $root.Release.Name -}}
apiVersion: v1
kind: ServiceAccount
metadata:
  name: {{ .name }}
  namespace: {{ include "slurm-operator.namespace" $root }}
  labels:
    {{- toYaml $labels | nindent 4 }}
---
apiVersion: apps/v1
kind: Deployment
metadata:
  name: {{ .name }}
  namespace: {{ include "slurm-operator.namespace" $root }}
  labels:
    {{- toYaml $labels | nindent 4 }}
    app.kubernetes.io/component: {{ .component }}
    app.kubernetes.io/version: {{ $root.Chart.AppVersion | quote }}
    app.kubernetes.io/managed-by: {{ $root.Release.Service }}
    helm.sh/chart: {{ printf "%s-%s" $root.Chart.Name $root.Chart.Version | replace "+" "_" }}
spec:
  replicas: {{ .values.replicas }}
  selector:
    matchLabels:
      {{- toYaml $labels | nindent 6 }}
  template:
    metadata:
      labels:
        {{- toYaml $labels | nindent 8 }}
        app.kubernetes.io/component: {{ .component }}
    spec:
      serviceAccountName: {{ .name }}
      automountServiceAccountToken: false
      containers:
        - name: manager
          image: {{ printf "%s:%s" .values.image.repository (.values.image.tag | default $root.Chart.AppVersion) }}
          imagePullPolicy: {{ $root.Values.imagePullPolicy }}
          {{- if eq .component "operator" }}
          args:
            - --zap-log-level={{ .values.logLevel }}
            {{- with .values.namespaces }}
            - --namespaces={{ . }}
            {{- end }}
          {{- end }}
          {{- with .values.resources }}
          resources:
            {{- toYaml . | nindent 12 }}
          {{- end }}
{{- end -}}
