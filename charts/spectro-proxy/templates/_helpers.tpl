{{/*
Macro resolution
================
Every template starts with `include "spectro-proxy.init" .`. The first call
replaces .Values (for this render only) with a copy in which every macro
`<< .spectro.system.X >>` or `{{ .spectro.system.X }}` inside a string value is
resolved against .Values.spectro.system, then checks the resolved values. Later
calls see the marker and do nothing. Helm shares one top-level object between
the templates of a chart, so the work is done once; if it were not shared, each
template would resolve its own copy with the same result.

Helm never templates values by itself: a literal `{{ ... }}` in values.yaml
arrives here as plain text, and `tpl` is what evaluates it.
*/}}
{{- define "spectro-proxy.init" -}}
{{- if not (hasKey . "SpectroProxyResolved") -}}
{{- $vals := deepCopy .Values -}}
{{- $spectro := get $vals "spectro" -}}
{{- if kindIs "map" $spectro -}}
{{- if kindIs "map" $spectro.system -}}
{{- $_ := include "spectro-proxy.dropUnresolved" $spectro.system -}}
{{- end -}}
{{- end -}}
{{- $_ := set . "Values" $vals -}}
{{- $walk := omit $vals "spectro" -}}
{{- $_ := include "spectro-proxy.walk" (dict "root" . "map" $walk "path" "") -}}
{{- $_ := set $walk "spectro" $spectro -}}
{{- $_ := set . "Values" $walk -}}
{{- $_ := set . "SpectroProxyResolved" true -}}
{{- include "spectro-proxy.validate" . -}}
{{- end -}}
{{- end -}}

{{/*
spectro-proxy.dropUnresolved removes, in place, the strings of a
spectro.system map that carry no value: a macro left unresolved (a pack's
values.yaml installed with plain Helm passes `{{ .spectro.system.X }}` on
as text) and Go templates' `<no value>` for a key the platform lacks. Such
a value then counts as unset, so the chart's own fallbacks apply.
*/}}
{{- define "spectro-proxy.dropUnresolved" -}}
{{- $m := . -}}
{{- range $k, $v := $m -}}
{{- if kindIs "string" $v -}}
{{- if or (contains "{{" $v) (contains "<<" $v) (eq (trim $v) "<no value>") -}}
{{- $_ := unset $m $k -}}
{{- end -}}
{{- else if kindIs "map" $v -}}
{{- $_ := include "spectro-proxy.dropUnresolved" $v -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/*
spectro-proxy.walk resolves, in place, the macros of every string under .map
(maps and lists, at any depth). .path is the value path used in messages.
Lists are walked through a map keyed by index, then rebuilt in order.
*/}}
{{- define "spectro-proxy.walk" -}}
{{- $m := .map -}}
{{- range $k, $v := $m -}}
{{- $path := ternary $k (printf "%s.%s" $.path $k) (eq $.path "") -}}
{{- if kindIs "string" $v -}}
{{- if or (contains "<<" $v) (contains "{{" $v) -}}
{{- $_ := set $m $k (include "spectro-proxy.resolveString" (dict "root" $.root "value" $v "path" $path)) -}}
{{- end -}}
{{- else if kindIs "map" $v -}}
{{- $_ := include "spectro-proxy.walk" (dict "root" $.root "map" $v "path" $path) -}}
{{- else if kindIs "slice" $v -}}
{{- $h := dict -}}
{{- range $i, $e := $v -}}
{{- $_ := set $h (toString $i) $e -}}
{{- end -}}
{{- $_ := include "spectro-proxy.walk" (dict "root" $.root "map" $h "path" $path) -}}
{{- $l := list -}}
{{- range $i, $e := $v -}}
{{- $l = append $l (get $h (toString $i)) -}}
{{- end -}}
{{- $_ := set $m $k $l -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/*
spectro-proxy.resolveString resolves the macros of one string .value and
returns the result. Each macro is evaluated on its own with `tpl`, against a
copy of spectro.system in which every `.spectro.system.a.b` the macro names
exists (missing keys become ""), so that pipelines such as `| default "x"`
work and a missing key never stops the render with a nil-pointer error. A macro
that still yields an empty string fails the render, naming the macro and the
value to set: nothing renders half-resolved.
*/}}
{{- define "spectro-proxy.resolveString" -}}
{{- $s := .value -}}
{{- $system := dict -}}
{{- $spectro := .root.Values.spectro -}}
{{- if kindIs "map" $spectro -}}
{{- if kindIs "map" $spectro.system -}}
{{- $system = $spectro.system -}}
{{- end -}}
{{- end -}}
{{- $macros := concat (regexFindAll "<<.*?>>" $s -1) (regexFindAll "\\{\\{.*?\\}\\}" $s -1) -}}
{{- range $m := $macros -}}
{{- $expr := $m | trimPrefix "<<" | trimPrefix "{{" | trimSuffix ">>" | trimSuffix "}}" | trim | trimPrefix "-" | trimSuffix "-" | trim -}}
{{- range $ref := regexFindAll "(^|[\\s(|,])\\.[A-Za-z_][A-Za-z0-9_]*(\\.[A-Za-z_][A-Za-z0-9_]*)*" $expr -1 -}}
{{- $field := regexReplaceAll "^[^.]*" $ref "" -}}
{{- if not (hasPrefix ".spectro.system." $field) -}}
{{- fail (printf "spectro-proxy: value %q uses the macro %q, which reads %s: macros can only read .spectro.system" $.path $m $field) -}}
{{- end -}}
{{- end -}}
{{- $paths := regexFindAll "\\.spectro\\.system(\\.[A-Za-z0-9_]+)+" $expr -1 | uniq -}}
{{- $sys := deepCopy $system -}}
{{- range $p := $paths -}}
{{- $cur := $sys -}}
{{- $segs := splitList "." (trimPrefix ".spectro.system." $p) -}}
{{- range $i, $seg := $segs -}}
{{- if kindIs "map" $cur -}}
{{- if or (not (hasKey $cur $seg)) (kindIs "invalid" (get $cur $seg)) -}}
{{- $_ := set $cur $seg (ternary "" (dict) (eq (add1 $i) (len $segs))) -}}
{{- end -}}
{{- $cur = get $cur $seg -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- $out := tpl (printf "{{ %s }}" $expr) (dict "spectro" (dict "system" $sys)) -}}
{{- if eq (trim $out) "" -}}
{{- $names := list -}}
{{- range $paths -}}
{{- $names = append $names (trimPrefix "." .) -}}
{{- end -}}
{{- if $names -}}
{{- fail (printf "spectro-proxy: value %q uses the macro %q, which resolves to an empty value: set %s (for example --set %s=...)" $.path $m (join " and " $names) (first $names)) -}}
{{- else -}}
{{- fail (printf "spectro-proxy: value %q uses the macro %q, which resolves to an empty value" $.path $m) -}}
{{- end -}}
{{- end -}}
{{- $s = replace $m $out $s -}}
{{- end -}}
{{- $s -}}
{{- end -}}

{{/*
spectro-proxy.validate checks what the schema cannot: values.schema.json sees
the values before their macros are resolved.
*/}}
{{- define "spectro-proxy.validate" -}}
{{- $v := .Values -}}
{{- $label := "^[a-z0-9]([-a-z0-9]*[a-z0-9])?$" -}}
{{- if not (regexMatch $label $v.namespace) -}}
{{- fail (printf "spectro-proxy: namespace %q is not a valid namespace name (a DNS label: lowercase letters, digits and '-', at most 63 characters)" $v.namespace) -}}
{{- end -}}
{{- if gt (len $v.namespace) 63 -}}
{{- fail (printf "spectro-proxy: namespace %q is longer than 63 characters" $v.namespace) -}}
{{- end -}}
{{- $server := trim (toString $v.server) -}}
{{- if eq $server "" -}}
{{- fail "spectro-proxy: server is empty: set it to the relay domain (for example proxy.example.com), or set spectro.system.reverseproxy.server" -}}
{{- end -}}
{{- if regexMatch "[:/]" $server -}}
{{- fail (printf "spectro-proxy: server %q must be a bare DNS name (no scheme, port or path); set the port with the port value" $server) -}}
{{- end -}}
{{- if or (not (regexMatch "^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$" $server)) (gt (len $server) 253) -}}
{{- fail (printf "spectro-proxy: server %q is not a valid DNS name (lowercase letters, digits, '-' and '.')" $server) -}}
{{- end -}}
{{- $port := trim (toString $v.port) -}}
{{- if not (regexMatch "^[0-9]{1,5}$" $port) -}}
{{- fail (printf "spectro-proxy: port %q is not a number" $port) -}}
{{- end -}}
{{- if or (lt (atoi $port) 1) (gt (atoi $port) 65535) -}}
{{- fail (printf "spectro-proxy: port %s is out of range (1-65535)" $port) -}}
{{- end -}}
{{- if eq (trim (toString $v.clusterUid)) "" -}}
{{- fail "spectro-proxy: clusterUid is empty" -}}
{{- end -}}
{{- $sub := toString $v.subdomain -}}
{{- if not (regexMatch $label $sub) -}}
{{- fail (printf "spectro-proxy: subdomain %q is not a single DNS label (lowercase letters, digits and '-', no dots, starting and ending with a letter or digit)" $sub) -}}
{{- end -}}
{{- $longest := $sub -}}
{{- if $v.k8sDashboardIntegration.enabled -}}
{{- $longest = printf "%s-dashboard" $sub -}}
{{- end -}}
{{- if include "spectro-proxy.vmDashboardEnabled" . -}}
{{- $longest = printf "%s-vmdashboard" $sub -}}
{{- end -}}
{{- if gt (len $longest) 63 -}}
{{- fail (printf "spectro-proxy: subdomain %q is too long: the label %q must fit in 63 characters" $sub $longest) -}}
{{- end -}}
{{- include "spectro-proxy.checkVersion" . -}}
{{- include "spectro-proxy.checkToken" . -}}
{{- include "spectro-proxy.checkNamespace" . -}}
{{- end -}}

{{/*
spectro-proxy.checkVersion refuses the parameters that the chart's version
(the pack version) does not have: one chart source serves every pack version,
and a parameter is gated on the version that introduced it. Only a value that
turns a feature on counts as set: `false` is every version's behaviour.
*/}}
{{- define "spectro-proxy.checkVersion" -}}
{{- $v := .Values -}}
{{- $gates := list
  (list "k8sDashboardIntegration.enabled" "1.1.0" $v.k8sDashboardIntegration.enabled)
  (list "k8sDashboardIntegration.useInsecurePort" "1.1.0" $v.k8sDashboardIntegration.useInsecurePort)
  (list "vmDashboardIntegration.enabled" "1.3.0" $v.vmDashboardIntegration.enabled)
  (list "vmwareDashboard.enabled" "1.3.0" ($v.vmwareDashboard | default dict).enabled) -}}
{{- range $gates -}}
{{- $name := index . 0 -}}
{{- $since := index . 1 -}}
{{- if and (index . 2) (semverCompare (printf "<%s-0" $since) $.Chart.Version) -}}
{{- fail (printf "spectro-proxy %s: %s is a parameter of pack %s and later, not of %s: use pack %s or later, or remove it" $.Chart.Version $name $since $.Chart.Version $since) -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/*
spectro-proxy.connected is "true" when the render can see the cluster (helm
install/upgrade), "" for helm template and helm lint, where lookup returns
nothing. The release namespace always exists when Helm installs.
*/}}
{{- define "spectro-proxy.connected" -}}
{{- if lookup "v1" "Namespace" "" .Release.Namespace -}}true{{- end -}}
{{- end -}}

{{/*
spectro-proxy.checkToken: the tunnel token comes from token.value, else
spectro.system.reverseproxy.token, else an existing Secret: token.existingSecret,
else the documented spectro-proxy-token, looked up when installing.
*/}}
{{- define "spectro-proxy.checkToken" -}}
{{- if not (include "spectro-proxy.tokenValue" .) -}}
{{- $ns := .Values.namespace -}}
{{- $name := include "spectro-proxy.tokenSecretName" . -}}
{{- $how := printf "set spectro.system.reverseproxy.token (Palette sets it for each cluster) or token.value, or create the Secret %s with the key %s in namespace %s (kubectl -n %s create secret generic %s --from-literal=%s=spx1...)" $name .Values.token.key $ns $ns $name .Values.token.key -}}
{{- if include "spectro-proxy.connected" . -}}
{{- $secret := lookup "v1" "Secret" $ns $name -}}
{{- if not $secret -}}
{{- fail (printf "spectro-proxy: no tunnel token: no token value is set and the Secret %s/%s does not exist: %s" $ns $name $how) -}}
{{- else if not (hasKey ($secret.data | default dict) .Values.token.key) -}}
{{- fail (printf "spectro-proxy: no tunnel token: the Secret %s/%s has no key %s (set token.key to the key that holds the token)" $ns $name .Values.token.key) -}}
{{- end -}}
{{- else if not .Values.token.existingSecret -}}
{{- fail (printf "spectro-proxy: no tunnel token: %s, and then set token.existingSecret=%s (helm template cannot look the Secret up)" $how $name) -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/*
spectro-proxy.checkNamespace: `namespace` must exist when the chart does not
create it. Checked only when installing against a cluster.
*/}}
{{- define "spectro-proxy.checkNamespace" -}}
{{- $ns := .Values.namespace -}}
{{- if and (ne $ns .Release.Namespace) (not (include "spectro-proxy.ownsNamespace" .)) (include "spectro-proxy.connected" .) -}}
{{- if not (lookup "v1" "Namespace" "" $ns) -}}
{{- fail (printf "spectro-proxy: namespace %s does not exist: install into it (helm install --namespace %s --create-namespace), create it first (kubectl create namespace %s), or set createNamespace=true" $ns $ns $ns) -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* Base name of the chart's objects. */}}
{{- define "spectro-proxy.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{/* Name suffixed with .suffix, kept within 63 characters. Input: dict "root" $ "suffix" "x". */}}
{{- define "spectro-proxy.name" -}}
{{- $base := include "spectro-proxy.fullname" .root -}}
{{- printf "%s-%s" ($base | trunc (int (sub 62 (len .suffix))) | trimSuffix "-") .suffix -}}
{{- end -}}

{{- define "spectro-proxy.selectorLabels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: agent
{{- end -}}

{{/* Labels of every object. */}}
{{- define "spectro-proxy.labels" -}}
{{ include "spectro-proxy.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/part-of: spectro-proxy
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
spectrocloud.com/connection: proxy
{{- with .Values.labels }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/* metadata.labels and metadata.annotations of every object, indented by .indent. */}}
{{- define "spectro-proxy.metadata" -}}
labels:
  {{- include "spectro-proxy.labels" . | nindent 2 }}
{{- with .Values.annotations }}
annotations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end -}}

{{/* A value of spectro.system (a dotted path), or "". */}}
{{- define "spectro-proxy.system" -}}
{{- $cur := (.root.Values.spectro | default dict).system -}}
{{- range splitList "." .path -}}
{{- if kindIs "map" $cur -}}
{{- $cur = get $cur . -}}
{{- else -}}
{{- $cur = "" -}}
{{- end -}}
{{- end -}}
{{- if not (kindIs "invalid" $cur) }}{{ $cur }}{{ end -}}
{{- end -}}

{{/* The tunnel token given as a value (token.value, else spectro.system.reverseproxy.token), or "". */}}
{{- define "spectro-proxy.tokenValue" -}}
{{- .Values.token.value | default (include "spectro-proxy.system" (dict "root" . "path" "reverseproxy.token")) | trim -}}
{{- end -}}

{{/* The documented name of the existing token Secret. */}}
{{- define "spectro-proxy.defaultTokenSecret" -}}spectro-proxy-token{{- end -}}

{{/* Secret the agent reads its token from: the chart's own when a token value is given. */}}
{{- define "spectro-proxy.tokenSecretName" -}}
{{- if include "spectro-proxy.tokenValue" . -}}
{{- include "spectro-proxy.name" (dict "root" . "suffix" "agent-token") -}}
{{- else -}}
{{- .Values.token.existingSecret | default (include "spectro-proxy.defaultTokenSecret" .) -}}
{{- end -}}
{{- end -}}

{{/* PEM of the relay CA given as a value (relayCA.pem, else spectro.system.reverseproxy.caCert), or "". */}}
{{/*
A PEM substituted into a one-line YAML string by the platform arrives with
its line breaks folded into spaces; Go's PEM reader needs the BEGIN and END
lines on lines of their own, so such a PEM is unfolded.
*/}}
{{- define "spectro-proxy.relayCAPEM" -}}
{{- $pem := .Values.relayCA.pem | default (include "spectro-proxy.system" (dict "root" . "path" "reverseproxy.caCert")) | trim -}}
{{- if and $pem (not (contains "\n" $pem)) -}}
{{- $pem = regexReplaceAll "\\s+" $pem "\n" | replace "BEGIN\nCERTIFICATE" "BEGIN CERTIFICATE" | replace "END\nCERTIFICATE" "END CERTIFICATE" -}}
{{- end -}}
{{- $pem -}}
{{- end -}}

{{- define "spectro-proxy.relayCAConfigMapName" -}}
{{- .Values.relayCA.existingConfigMap | default (include "spectro-proxy.name" (dict "root" . "suffix" "relay-ca")) -}}
{{- end -}}

{{- define "spectro-proxy.hasRelayCA" -}}
{{- if or .Values.relayCA.existingConfigMap (include "spectro-proxy.relayCAPEM" .) -}}true{{- end -}}
{{- end -}}

{{/* Service account of the agent pods. */}}
{{- define "spectro-proxy.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- .Values.serviceAccount.name | default (include "spectro-proxy.fullname" .) -}}
{{- else -}}
{{- .Values.serviceAccount.name | default "default" -}}
{{- end -}}
{{- end -}}

{{/* Name of the kubeconfig ConfigMap, and of the service account whose tokens the terminate-mode kubeconfig uses. */}}
{{- define "spectro-proxy.kubeconfigName" -}}
{{- include "spectro-proxy.name" (dict "root" . "suffix" "kubeconfig") -}}
{{- end -}}

{{/* "true" when the relay may terminate TLS (modes auto and terminate): the kubeconfig service account is rendered. */}}
{{- define "spectro-proxy.mayTerminate" -}}
{{- if ne .Values.mode "passthrough" -}}true{{- end -}}
{{- end -}}

{{/* "true" when the VM dashboard is enabled (vmDashboardIntegration or its alias vmwareDashboard), else "". */}}
{{- define "spectro-proxy.vmDashboardEnabled" -}}
{{- if or (.Values.vmDashboardIntegration | default dict).enabled (.Values.vmwareDashboard | default dict).enabled -}}true{{- end -}}
{{- end -}}

{{/* URL the agent proxies <subdomain>-dashboard to. */}}
{{- define "spectro-proxy.k8sDashboardURL" -}}
{{- $d := .Values.k8sDashboardIntegration -}}
{{- $scheme := ternary "http" "https" (eq (toString $d.useInsecurePort) "true") -}}
{{- $port := $d.port | default (ternary 9090 443 (eq $scheme "http")) -}}
{{- printf "%s://%s.%s.svc:%v" $scheme $d.service $d.namespace $port -}}
{{- end -}}

{{/* URL the agent proxies <subdomain>-vmdashboard to. */}}
{{- define "spectro-proxy.vmDashboardURL" -}}
{{- $d := .Values.vmDashboardIntegration -}}
{{- printf "%s://%s.%s.svc:%v" $d.scheme $d.service $d.namespace $d.port -}}
{{- end -}}

{{- define "spectro-proxy.image" -}}
{{- $tag := .Values.image.tag | default .Chart.AppVersion -}}
{{- if .Values.image.digest -}}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest -}}
{{- else -}}
{{- printf "%s:%s" .Values.image.repository $tag -}}
{{- end -}}
{{- end -}}

{{/* Resolved relay port, as a plain number. */}}
{{- define "spectro-proxy.port" -}}
{{- atoi (trim (toString .Values.port)) -}}
{{- end -}}

{{/*
Whether the chart renders the Namespace object: when createNamespace asks
for a namespace that does not exist yet, and, whatever createNamespace says,
when this release created it before (an upgrade must not drop, and so
delete, a namespace the release owns). Never the release namespace (Helm
needs it to exist) nor a namespace Kubernetes owns; an existing namespace
that the release did not create is left alone.
*/}}
{{- define "spectro-proxy.ownsNamespace" -}}
{{- $ns := .Values.namespace -}}
{{- if and (ne $ns .Release.Namespace) (not (has $ns (list "kube-system" "kube-public" "kube-node-lease" "default"))) -}}
{{- $live := lookup "v1" "Namespace" "" $ns -}}
{{- if $live -}}
{{- $a := dig "metadata" "annotations" dict $live -}}
{{- if and (eq (get $a "meta.helm.sh/release-name") .Release.Name) (eq (get $a "meta.helm.sh/release-namespace") .Release.Namespace) -}}true{{- end -}}
{{- else if .Values.createNamespace -}}true
{{- end -}}
{{- end -}}
{{- end -}}
