{{- define "slurm.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "slurm.fullname" -}}
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

{{- define "slurm.namespace" -}}
{{- default .Release.Namespace .Values.namespaceOverride -}}
{{- end -}}

{{- define "slurm.clusterName" -}}
{{- default .Release.Name .Values.clusterName -}}
{{- end -}}

{{- define "slurm.labels" -}}
app.kubernetes.io/part-of: slurm
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{- end -}}

{{- define "slurm.image" -}}
{{- printf "%s:%s" .repository (toString .tag) -}}
{{- end -}}

{{/* A map as Slurm `Key=Value` words joined by ";" (lists joined by ","), like upstream's _toList. */}}
{{- define "_toList" -}}
{{- $out := list -}}
{{- range $k, $v := . -}}
{{- if kindIs "slice" $v -}}
{{- $out = append $out (printf "%s=%s" $k (join "," $v)) -}}
{{- else -}}
{{- $out = append $out (printf "%s=%v" $k $v) -}}
{{- end -}}
{{- end -}}
{{- join ";" $out -}}
{{- end -}}

{{/* extraConf string of an entry: .extraConf, else .extraConfMap as words, space separated */}}
{{- define "slurm.extraConf" -}}
{{- if .extraConf -}}
{{- .extraConf -}}
{{- else if .extraConfMap -}}
{{- include "_toList" .extraConfMap | splitList ";" | join " " -}}
{{- end -}}
{{- end -}}

{{/*
A nodesets.<name> (or loginsets.<name>) entry with the chart's _defaults underneath. Booleans and replicas are
taken with hasKey, because mergeOverwrite does not let false/0 override a default.
Input: dict defaults=<map> entry=<map>. Output: YAML (pipe through fromYaml).
*/}}
{{- define "slurm.withDefaults" -}}
{{- $entry := .entry | default dict -}}
{{- $out := mustMergeOverwrite (deepCopy (.defaults | default dict)) (deepCopy $entry) -}}
{{- range $k := list "enabled" "replicas" "pinToNode" "taintKubeNodes" "workloadDisruptionProtection" "pruneSlurmNodeRecords" -}}
{{- if hasKey $entry $k -}}
{{- $_ := set $out $k (index $entry $k) -}}
{{- end -}}
{{- end -}}
{{- if and (hasKey $entry "partition") (hasKey ($entry.partition | default dict) "enabled") -}}
{{- $_ := set $out.partition "enabled" $entry.partition.enabled -}}
{{- end -}}
{{- toYaml $out -}}
{{- end -}}

{{/* Enabled NodeSet keys, sorted (range over a map is sorted). Output: JSON list. */}}
{{- define "slurm.nodesetKeys" -}}
{{- $keys := list -}}
{{- range $key, $entry := .Values.nodesets -}}
{{- if ne $key "_defaults" -}}
{{- $ns := include "slurm.withDefaults" (dict "defaults" $.Values.nodesets._defaults "entry" $entry) | fromYaml -}}
{{- if $ns.enabled -}}
{{- $keys = append $keys $key -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- toJson $keys -}}
{{- end -}}

{{/* slurm.conf lines gpuforge and tests read: NodeSets, their own partitions, partitions.<name>. */}}
{{- define "slurm.partitionLines" -}}
{{- $fullname := include "slurm.fullname" . -}}
{{- range $key, $entry := .Values.nodesets -}}
{{- if ne $key "_defaults" -}}
{{- $ns := include "slurm.withDefaults" (dict "defaults" $.Values.nodesets._defaults "entry" $entry) | fromYaml -}}
{{- if $ns.enabled }}
NodeSet={{ $key }} Feature={{ $key }}
{{- if $ns.partition.enabled }}
PartitionName={{ $key }} Nodes={{ $key }}
{{- with $ns.partition.configMap }} {{ include "_toList" . | splitList ";" | join " " }}{{ end }}
{{- end }}
{{- end }}
{{- end }}
{{- end }}
{{- range $name, $p := .Values.partitions }}
{{- if $p.enabled }}
PartitionName={{ $name }} Nodes={{ join "," ($p.nodesets | default (list "ALL")) }}
{{- with $p.configMap }} {{ include "_toList" . | splitList ";" | join " " }}{{ end }}
{{- end }}
{{- end }}
{{- end -}}
