{{/* Base name of the chart's objects. */}}
{{- define "spectro-proxy-server.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{/* Name suffixed with .suffix, kept within 63 characters. Input: dict "root" $ "suffix" "x". */}}
{{- define "spectro-proxy-server.name" -}}
{{- $base := include "spectro-proxy-server.fullname" .root -}}
{{- printf "%s-%s" ($base | trunc (int (sub 62 (len .suffix))) | trimSuffix "-") .suffix -}}
{{- end -}}

{{- define "spectro-proxy-server.selectorLabels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: relay
{{- end -}}

{{- define "spectro-proxy-server.labels" -}}
{{ include "spectro-proxy-server.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/part-of: spectro-proxy
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- with .Values.labels }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{- define "spectro-proxy-server.metadata" -}}
labels:
  {{- include "spectro-proxy-server.labels" . | nindent 2 }}
{{- with .Values.annotations }}
annotations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end -}}

{{/* Checks of values that the schema cannot express. */}}
{{- define "spectro-proxy-server.validate" -}}
{{- if not .Values.domain -}}
{{- fail "spectro-proxy-server: domain is empty: set it to the relay's DNS name (for example proxy.example.com)" -}}
{{- end -}}
{{- if and .Values.tls.existingSecret .Values.certManager.enabled -}}
{{- fail "spectro-proxy-server: set either tls.existingSecret or certManager.enabled, not both" -}}
{{- end -}}
{{- if not (or .Values.tls.existingSecret .Values.certManager.enabled) -}}
{{- fail (printf "spectro-proxy-server: no TLS certificate: set tls.existingSecret to a kubernetes.io/tls Secret for %s and *.%s, or enable certManager" .Values.domain .Values.domain) -}}
{{- end -}}
{{- if and .Values.certManager.enabled (not .Values.certManager.issuerRef.name) -}}
{{- fail "spectro-proxy-server: certManager.enabled needs certManager.issuerRef.name (an issuer that can sign a wildcard, i.e. DNS-01)" -}}
{{- end -}}
{{- end -}}

{{- define "spectro-proxy-server.tlsSecretName" -}}
{{- .Values.tls.existingSecret | default (include "spectro-proxy-server.name" (dict "root" . "suffix" "tls")) -}}
{{- end -}}

{{- define "spectro-proxy-server.signingKeySecretName" -}}
{{- .Values.signingKey.existingSecret | default (include "spectro-proxy-server.name" (dict "root" . "suffix" "signing-key")) -}}
{{- end -}}

{{- define "spectro-proxy-server.image" -}}
{{- if .Values.image.digest -}}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest -}}
{{- else -}}
{{- printf "%s:%s" .Values.image.repository (.Values.image.tag | default .Chart.AppVersion) -}}
{{- end -}}
{{- end -}}
