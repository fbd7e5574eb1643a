{{/* Common names and labels. */}}
{{- define "v4d.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "v4d.operatorName" -}}
{{- printf "%s-operator" (include "v4d.fullname" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "v4d.selectorLabels" -}}
app.kubernetes.io/name: v4d-operator
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "v4d.labels" -}}
{{ include "v4d.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}
