{{/* Lab stand-in helpers. Names and labels follow upstream gpu-operator v26.7.0. */}}

{{- define "gpu-operator.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "gpu-operator.labels" -}}
app.kubernetes.io/name: {{ include "gpu-operator.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{- end -}}

{{/* image: "<repository>/<image>:<version>" from a component's values */}}
{{- define "gpu-operator.image" -}}
{{- printf "%s/%s:%s" .repository .image (toString .version) -}}
{{- end -}}

{{/*
One operand DaemonSet. Input: dict root=$ name=<DaemonSet name> component=<values dict> deploy=<label suffix>
container=<container name> sa=<ServiceAccount name> extra=<dict with optional ports, env, volumeMounts, volumes>.
Operands run only on GPU nodes: nvidia.com/gpu.present=true and the operator's nvidia.com/gpu.deploy.<operand>.
*/}}
{{- define "gpu-operator.operand" -}}
{{- $root := .root -}}
{{- $c := .component -}}
apiVersion: v1
kind: ServiceAccount
metadata:
  name: {{ .sa }}
  namespace: {{ $root.Release.Namespace }}
  labels:
    app.kubernetes.io/part-of: gpu-operator
---
apiVersion: apps/v1
kind: DaemonSet
metadata:
  name: {{ .name }}
  namespace: {{ $root.Release.Namespace }}
  labels:
    app: {{ .name }}
    app.kubernetes.io/component: {{ .deploy }}
    app.kubernetes.io/part-of: gpu-operator
    app.kubernetes.io/managed-by: gpu-operator
    helm.sh/chart: {{ printf "%s-%s" $root.Chart.Name $root.Chart.Version | replace "+" "_" }}
    {{- with $root.Values.daemonsets.labels }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  {{- with $root.Values.daemonsets.annotations }}
  annotations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
spec:
  selector:
    matchLabels:
      app: {{ .name }}
  updateStrategy:
    type: {{ $root.Values.daemonsets.updateStrategy }}
    {{- if eq $root.Values.daemonsets.updateStrategy "RollingUpdate" }}
    rollingUpdate:
      maxUnavailable: {{ $root.Values.daemonsets.rollingUpdate.maxUnavailable }}
    {{- end }}
  template:
    metadata:
      labels:
        app: {{ .name }}
        app.kubernetes.io/component: {{ .deploy }}
        app.kubernetes.io/part-of: gpu-operator
        {{- with $root.Values.daemonsets.labels }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
    spec:
      nodeSelector:
        nvidia.com/gpu.present: "true"
        nvidia.com/gpu.deploy.{{ .deploy }}: "true"
      {{- with $root.Values.daemonsets.tolerations }}
      tolerations:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      priorityClassName: {{ $root.Values.daemonsets.priorityClassName }}
      serviceAccountName: {{ .sa }}
      automountServiceAccountToken: false
      containers:
        - name: {{ .container }}
          image: {{ include "gpu-operator.image" $c }}
          imagePullPolicy: {{ $c.imagePullPolicy | default "IfNotPresent" }}
          {{- $env := concat (($c.env) | default list) (.extra.env | default list) }}
          {{- with $env }}
          env:
            {{- toYaml . | nindent 12 }}
          {{- end }}
          {{- with .extra.ports }}
          ports:
            {{- toYaml . | nindent 12 }}
          {{- end }}
          {{- with $c.resources }}
          resources:
            {{- toYaml . | nindent 12 }}
          {{- end }}
          {{- with .extra.volumeMounts }}
          volumeMounts:
            {{- toYaml . | nindent 12 }}
          {{- end }}
      {{- with .extra.volumes }}
      volumes:
        {{- toYaml . | nindent 8 }}
      {{- end }}
{{- end -}}
