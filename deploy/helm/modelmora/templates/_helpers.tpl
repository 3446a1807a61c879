{{- define "modelmora.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "modelmora.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "modelmora.selectorLabels" -}}
app.kubernetes.io/name: {{ include "modelmora.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "modelmora.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "modelmora.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "modelmora.image" -}}
{{- $tag := .Values.image.tag | default (printf "%s%s" .Chart.AppVersion (ternary "-cuda" "" .Values.gpu.enabled)) }}
{{- printf "%s:%s" .Values.image.repository $tag }}
{{- end }}

{{- define "modelmora.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "modelmora.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* The chart's own Secret holds what is set in the values: tokens, TLS files, URLs, keys. */}}
{{- define "modelmora.hasSecret" -}}
{{- if or (and .Values.auth.enabled (not .Values.auth.existingSecret)) (and .Values.tls.enabled (not .Values.tls.existingSecret)) .Values.databaseUrl .Values.redisUrl .Values.resultSecret .Values.callbackSecret }}true{{ end }}
{{- end }}

{{- define "modelmora.scheme" -}}
{{- ternary "HTTPS" "HTTP" .Values.tls.enabled }}
{{- end }}
