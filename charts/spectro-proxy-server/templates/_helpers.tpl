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
{{- if and .Values.serviceMonitor.enabled (not .Values.metrics.enabled) -}}
{{- fail "spectro-proxy-server: serviceMonitor.enabled needs metrics.enabled (the ServiceMonitor scrapes the metrics Service)" -}}
{{- end -}}
{{- $missing := list -}}
{{- if not .Values.etcd.endpoints -}}{{- $missing = append $missing "etcd.endpoints" -}}{{- end -}}
{{- if not .Values.etcd.tls.existingSecret -}}{{- $missing = append $missing "etcd.tls.existingSecret" -}}{{- end -}}
{{- if and (gt (int .Values.replicas) 1) $missing -}}
{{- fail (printf "spectro-proxy-server: replicas=%v needs etcd.endpoints and etcd.tls.existingSecret (missing: %s): the replicas share their agent registry through etcd, over client TLS from a Secret with ca.crt, tls.crt and tls.key. See docs/scale-out.md (https://github.com/spectroproxy/spectro-proxy/blob/main/docs/scale-out.md), or set replicas=1" (int .Values.replicas) (join ", " $missing)) -}}
{{- end -}}
{{- if and .Values.etcd.tls.existingSecret (not .Values.etcd.endpoints) -}}
{{- fail "spectro-proxy-server: etcd.tls.existingSecret is set but etcd.endpoints is empty: set the etcd client URLs too (or drop the Secret for a single relay without etcd)" -}}
{{- end -}}
{{- if and .Values.peer.ca.existingSecret (not .Values.etcd.endpoints) -}}
{{- fail "spectro-proxy-server: peer.ca.existingSecret is set but etcd.endpoints is empty: the peer listener runs only for a fleet on etcd" -}}
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

{{- define "spectro-proxy-server.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- .Values.serviceAccount.name | default (include "spectro-proxy-server.fullname" .) -}}
{{- else -}}
{{- .Values.serviceAccount.name | default "default" -}}
{{- end -}}
{{- end -}}

{{/*
The signing key the chart renders into <fullname>-signing-key, when neither
signingKey.value nor signingKey.existingSecret is set: the key already in that
Secret (so upgrades keep every token valid), else a new one when the render
runs against a cluster (helm install). Without a cluster (helm template,
--dry-run=client) lookup finds nothing; a fresh random key there would change
on every render and, applied by a GitOps tool, invalidate every token, so the
render fails. The release namespace tells a cluster apart from none; with
--create-namespace it does not exist yet at render time, so kube-system is
asked next (whoever may create namespaces may normally read them).
*/}}
{{- define "spectro-proxy-server.generatedSigningKey" -}}
{{- $name := include "spectro-proxy-server.signingKeySecretName" . -}}
{{- $existing := lookup "v1" "Secret" .Release.Namespace $name -}}
{{- $data := (get ($existing | default dict) "data") | default dict -}}
{{- if hasKey $data .Values.signingKey.key -}}
{{- index $data .Values.signingKey.key | b64dec -}}
{{- else if or (lookup "v1" "Namespace" "" .Release.Namespace) (lookup "v1" "Namespace" "" "kube-system") -}}
{{- randAlphaNum 64 -}}
{{- else -}}
{{- fail (printf "spectro-proxy-server: no signing key: rendered without a cluster (helm template or a GitOps tool), the chart cannot generate a key that stays the same on the next render. Create a Secret once, for example `kubectl -n %s create secret generic spectro-proxy-signing-key --from-literal=signing.key=$(openssl rand -hex 32)`, and set signingKey.existingSecret=spectro-proxy-signing-key (or set signingKey.value)" .Release.Namespace) -}}
{{- end -}}
{{- end -}}

{{/* "true" when the relay runs as a fleet member: etcd registry and peer listener. */}}
{{- define "spectro-proxy-server.fleet" -}}
{{- if .Values.etcd.endpoints -}}true{{- end -}}
{{- end -}}

{{- define "spectro-proxy-server.peerCASecretName" -}}
{{- .Values.peer.ca.existingSecret | default (include "spectro-proxy-server.name" (dict "root" . "suffix" "peer-ca")) -}}
{{- end -}}

{{/*
terminationGracePeriodSeconds: what the relay may take after SIGTERM. It
moves its agents (at most half the drain timeout) while the shutdown delay
runs, both counted from SIGTERM; once both are over it stops accepting and
lets requests in flight finish within the drain timeout. 5 seconds of margin
on top, so kubelet's SIGKILL never cuts a drain that keeps to its bounds.
*/}}
{{- define "spectro-proxy-server.terminationGracePeriod" -}}
{{- $t := int .Values.drain.timeoutSeconds -}}
{{- add (max (int .Values.drain.shutdownDelaySeconds) (div (add $t 1) 2)) $t 5 -}}
{{- end -}}

{{/*
The peer CA's ca.crt and ca.key, base64, as YAML, when the chart keeps it
(peer.ca.existingSecret empty): the pair already in <fullname>-peer-ca (so
every replica, and every upgrade, issues from the same CA), else a new ECDSA
CA when the render runs against a cluster. Without a cluster it fails, for
the reason given at generatedSigningKey.
*/}}
{{- define "spectro-proxy-server.generatedPeerCA" -}}
{{- $name := include "spectro-proxy-server.peerCASecretName" . -}}
{{- $existing := lookup "v1" "Secret" .Release.Namespace $name -}}
{{- $data := (get ($existing | default dict) "data") | default dict -}}
{{- if and (hasKey $data "ca.crt") (hasKey $data "ca.key") -}}
ca.crt: {{ index $data "ca.crt" | quote }}
ca.key: {{ index $data "ca.key" | quote }}
{{- else if or (lookup "v1" "Namespace" "" .Release.Namespace) (lookup "v1" "Namespace" "" "kube-system") -}}
{{- $ca := genCAWithKey "spectro-proxy-peer-ca" 3650 (genPrivateKey "ecdsa") -}}
ca.crt: {{ $ca.Cert | b64enc | quote }}
ca.key: {{ $ca.Key | b64enc | quote }}
{{- else -}}
{{- fail (printf "spectro-proxy-server: no peer CA: rendered without a cluster (helm template or a GitOps tool), the chart cannot generate a CA that stays the same on the next render, and every replica must share one. Create it once, for example `openssl ecparam -name prime256v1 -genkey -noout -out ca.key && openssl req -x509 -new -key ca.key -subj /CN=spectro-proxy-peer-ca -days 3650 -addext basicConstraints=critical,CA:TRUE -addext keyUsage=critical,keyCertSign -out ca.crt && kubectl -n %s create secret generic spectro-proxy-peer-ca --from-file=ca.crt --from-file=ca.key`, and set peer.ca.existingSecret=spectro-proxy-peer-ca (see docs/scale-out.md)" .Release.Namespace) -}}
{{- end -}}
{{- end -}}
