{{/* Input: dict root=$ role=<role> image=<image values> port=<container port> */}}
{{- define "kubernetes-dashboard.component" -}}
{{- $root := .root -}}
{{- $name := printf "%s-%s" $root.Release.Name .role -}}
{{- $labels := dict "app.kubernetes.io/name" $name "app.kubernetes.io/instance" $root.Release.Name "app.kubernetes.io/part-of" "kubernetes-dashboard" -}}
apiVersion: v1
kind: ServiceAccount
metadata:
  name: {{ $name }}
  namespace: {{ $root.Release.Namespace }}
  labels:
    {{- toYaml $labels | nindent 4 }}
---
apiVersion: apps/v1
kind: Deployment
metadata:
  name: {{ $name }}
  namespace: {{ $root.Release.Namespace }}
  labels:
    {{- toYaml $labels | nindent 4 }}
    app.kubernetes.io/component: {{ .role }}
    app.kubernetes.io/version: {{ .image.tag | toString | quote }}
    app.kubernetes.io/managed-by: {{ $root.Release.Service }}
    helm.sh/chart: {{ printf "%s-%s" $root.Chart.Name $root.Chart.Version | replace "+" "_" }}
spec:
  replicas: 1
  selector:
    matchLabels:
      {{- toYaml $labels | nindent 6 }}
  template:
    metadata:
      labels:
        {{- toYaml $labels | nindent 8 }}
        app.kubernetes.io/component: {{ .role }}
    spec:
      serviceAccountName: {{ $name }}
      automountServiceAccountToken: false
      containers:
        - name: {{ $name }}
          image: {{ printf "%s:%s" .image.repository (toString .image.tag) }}
          ports:
            - name: {{ .portName | default (printf "%s" .role) | trunc 15 }}
              containerPort: {{ .port }}
---
apiVersion: v1
kind: Service
metadata:
  name: {{ .serviceName | default $name }}
  namespace: {{ $root.Release.Namespace }}
  labels:
    {{- toYaml $labels | nindent 4 }}
spec:
  type: {{ .serviceType | default "ClusterIP" }}
  ports:
    - name: {{ .portName | default (printf "%s" .role) | trunc 15 }}
      port: {{ .servicePort | default .port }}
      targetPort: {{ .port }}
      protocol: TCP
  selector:
    {{- toYaml $labels | nindent 4 }}
{{- end -}}
