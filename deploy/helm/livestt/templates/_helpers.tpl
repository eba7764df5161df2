{{- define "livestt.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "livestt.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{ include "livestt.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{- define "livestt.selectorLabels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{/* The Secret with the API keys and the token secret: the user's own, or the chart's. */}}
{{- define "livestt.authSecret" -}}
{{- .Values.auth.existingSecret | default (printf "%s-auth" (include "livestt.fullname" .)) -}}
{{- end -}}

{{- define "livestt.auth" -}}
{{- or .Values.auth.existingSecret .Values.auth.apiKeys -}}
{{- end -}}
