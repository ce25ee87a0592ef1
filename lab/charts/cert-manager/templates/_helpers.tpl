{{- define "cert-manager.namespace" -}}
{{- default .Release.Namespace .Values.namespace -}}
{{- end -}}

{{/* Input: dict root=$ component=controller|webhook|cainjector name=<object name> image=<repository> replicas=N */}}
{{- define "cert-manager.deployment" -}}
{{- $root := .root -}}
{{- $app := ternary "cert-manager" .component (eq .component "controller") -}}
apiVersion: v1
kind: ServiceAccount
metadata:
  name: {{ .name }}
  namespace: {{ include "cert-manager.namespace" $root }}
  labels:
    app: {{ $app }}
    app.kubernetes.io/name: {{ $app }}
    app.kubernetes.io/instance: {{ $root.Release.Name }}
    app.kubernetes.io/component: {{ .component }}
---
apiVersion: apps/v1
kind: Deployment
metadata:
  name: {{ .name }}
  namespace: {{ include "cert-manager.namespace" $root }}
  labels:
    app: {{ $app }}
    app.kubernetes.io/name: {{ $app }}
    app.kubernetes.io/instance: {{ $root.Release.Name }}
    app.kubernetes.io/component: {{ .component }}
    app.kubernetes.io/version: {{ $root.Chart.AppVersion | quote }}
spec:
  replicas: {{ .replicas }}
  selector:
    matchLabels:
      app.kubernetes.io/name: {{ $app }}
      app.kubernetes.io/instance: {{ $root.Release.Name }}
      app.kubernetes.io/component: {{ .component }}
  template:
    metadata:
      labels:
        app: {{ $app }}
        app.kubernetes.io/name: {{ $app }}
        app.kubernetes.io/instance: {{ $root.Release.Name }}
        app.kubernetes.io/component: {{ .component }}
    spec:
      serviceAccountName: {{ .name }}
      automountServiceAccountToken: false
      containers:
        - name: {{ ternary "cert-manager-controller" (printf "cert-manager-%s" .component) (eq .component "controller") }}
          image: {{ printf "%s:%s" .image ($root.Values.image.tag | default $root.Chart.AppVersion) }}
{{- end -}}
