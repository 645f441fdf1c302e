{{/*
Chart name, truncated to 63 characters (DNS label limit).
*/}}
{{- define "llm-proxy.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Full resource name: fullnameOverride, or the release name when it already
contains the chart name, or <release>-<chart>.
*/}}
{{- define "llm-proxy.fullname" -}}
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

{{- define "llm-proxy.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "llm-proxy.selectorLabels" -}}
app.kubernetes.io/name: {{ include "llm-proxy.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "llm-proxy.labels" -}}
helm.sh/chart: {{ include "llm-proxy.chart" . }}
{{ include "llm-proxy.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: konveyor
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{- define "llm-proxy.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "llm-proxy.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "llm-proxy.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}
{{- end }}

{{/* Fixed in-container paths (the CLI and Containerfile use the same ones). */}}
{{- define "llm-proxy.configDir" -}}/etc/llm-proxy{{- end }}
{{- define "llm-proxy.configPath" -}}/etc/llm-proxy/config.yaml{{- end }}
{{- define "llm-proxy.dataDir" -}}/var/lib/llm-proxy{{- end }}
{{- define "llm-proxy.caDir" -}}/etc/llm-proxy/ca{{- end }}
{{- define "llm-proxy.mergedCaDir" -}}/etc/llm-proxy/ca-merged{{- end }}

{{/* Path of the mounted CA bundle (empty when no bundle is configured). */}}
{{- define "llm-proxy.caFile" -}}
{{- if .Values.caBundle.configMapName }}
{{- printf "%s/%s" (include "llm-proxy.caDir" .) .Values.caBundle.key }}
{{- end }}
{{- end }}

{{/* Path SSL_CERT_FILE / REQUESTS_CA_BUNDLE point at. */}}
{{- define "llm-proxy.trustFile" -}}
{{- if and .Values.caBundle.configMapName .Values.caBundle.appendSystemRoots }}
{{- printf "%s/ca-bundle.crt" (include "llm-proxy.mergedCaDir" .) }}
{{- else }}
{{- include "llm-proxy.caFile" . }}
{{- end }}
{{- end }}

{{- define "llm-proxy.clientModel" -}}
{{- default .Values.defaultModel .Values.clientConfig.model }}
{{- end }}

{{/* "true" when /var/lib/llm-proxy is a volume only one node can mount. */}}
{{- define "llm-proxy.singleWriterVolume" -}}
{{- if and .Values.persistence.enabled (not (has "ReadWriteMany" .Values.persistence.accessModes)) }}true{{- end }}
{{- end }}

{{- define "llm-proxy.migrationEnabled" -}}
{{- if and .Values.migrationJob.enabled .Values.database.existingSecret.name }}true{{- end }}
{{- end }}

{{/*
Recursively refuse secret-looking values in the generated config: any string
under a key such as api_key/password/secret/token must be an ${env.NAME}
reference (or empty). Called with (list <value> <path>).
*/}}
{{- define "llm-proxy.assertNoSecrets" -}}
{{- $value := index . 0 }}
{{- $path := index . 1 }}
{{- if kindIs "map" $value }}
{{- range $k, $v := $value }}
{{- $child := printf "%s.%s" $path $k }}
{{- if and (kindIs "string" $v) (regexMatch "(?i)(api[_-]?key|secret|passw(or)?d|credential|private[_-]?key|(^|[_-])token$|^authorization$)" $k) }}
{{- if not (or (eq $v "") (regexMatch "^\\$\\{env\\.[A-Za-z_][A-Za-z0-9_]*(:=[^}]*)?\\}$" $v)) }}
{{- fail (printf "config value %s looks like a secret; reference an environment variable instead (${env.NAME}) and put the value in a Secret" $child) }}
{{- end }}
{{- end }}
{{- include "llm-proxy.assertNoSecrets" (list $v $child) }}
{{- end }}
{{- else if kindIs "slice" $value }}
{{- range $i, $v := $value }}
{{- include "llm-proxy.assertNoSecrets" (list $v (printf "%s[%d]" $path $i)) }}
{{- end }}
{{- end }}
{{- end }}

{{/*
The proxy's native config (config.yaml), built as data and serialised with
toYaml so that any value is quoted correctly. Secrets only appear as
${env.NAME} references substituted by the proxy at start.
*/}}
{{- define "llm-proxy.config" -}}
{{- $v := .Values }}
{{- $server := dict
      "port" (int $v.server.port)
      "workers" (int $v.server.workers)
      "max_body_bytes" (int64 $v.server.maxBodyBytes)
      "drain_delay_seconds" (int $v.server.drainDelaySeconds)
      "shutdown_grace_seconds" (int $v.server.shutdownGraceSeconds)
      "metrics" (dict "enabled" $v.metrics.enabled "path" $v.metrics.path) }}
{{- if eq $v.auth.mode "none" }}
{{- /* A pod always listens on a non-loopback address. */}}
{{- $_ := set $server "allow_non_loopback_unauthenticated" true }}
{{- end }}
{{- $providers := list }}
{{- range $v.providers }}
{{- $p := dict "id" .id "type" .type }}
{{- with .baseUrl }}{{ $_ := set $p "base_url" . }}{{ end }}
{{- with .apiKeyEnv }}{{ $_ := set $p "api_key" (printf "${env.%s:=}" .) }}{{ end }}
{{- with .settings }}{{ $p = merge $p (deepCopy .) }}{{ end }}
{{- $providers = append $providers $p }}
{{- end }}
{{- $models := list }}
{{- range $v.models }}
{{- $m := dict "id" .id "provider" .provider "upstream_model" .upstreamModel }}
{{- with .aliases }}{{ $_ := set $m "aliases" . }}{{ end }}
{{- $models = append $models $m }}
{{- end }}
{{- $auth := dict "mode" (include "llm-proxy.authMode" . | fromJson).mode "allow_unauthenticated" (or (eq $v.auth.mode "none") $v.auth.allowUnauthenticated) }}
{{- if eq $v.auth.mode "oidc" }}
{{- $issuers := list }}
{{- range $v.auth.issuers }}
{{- $aud := .audiences | default $v.auth.audiences | default list }}
{{- $issuers = append $issuers (dict "issuer" .issuer "jwks_uri" (.jwksUri | default nil) "audiences" $aud) }}
{{- end }}
{{- $caFile := include "llm-proxy.caFile" . | default nil }}
{{- $_ := set $auth "oidc" (dict "issuers" $issuers "verify_tls" $v.auth.verifyTls "tls_cafile" $caFile) }}
{{- else if eq $v.auth.mode "trusted_header" }}
{{- $th := dict }}
{{- with $v.auth.trustedHeader.secretEnv }}{{ $_ := set $th "secret" (printf "${env.%s}" .) }}{{ end }}
{{- with $v.auth.trustedHeader.trustedNetworks }}{{ $_ := set $th "trusted_networks" . }}{{ end }}
{{- $_ := set $auth "trusted_header" $th }}
{{- end }}
{{- $cfg := dict
      "server" $server
      "providers" $providers
      "models" $models
      "default_model" $v.defaultModel
      "auth" $auth
      "database" (dict "url" (printf "${env.DATABASE_URL:=sqlite+aiosqlite:///%s/usage.db}" (include "llm-proxy.dataDir" .)))
      "usage" (dict "spool_dir" (printf "%s/spool" (include "llm-proxy.dataDir" .))) }}
{{- if $v.ui.enabled }}
{{- $ui := dict "enabled" true }}
{{- with $v.ui.clientId }}{{ $_ := set $ui "client_id" . }}{{ end }}
{{- with $v.ui.redirectUri }}{{ $_ := set $ui "redirect_uri" . }}{{ end }}
{{- with $v.ui.sessionSecretEnv }}{{ $_ := set $ui "session_secret" (printf "${env.%s}" .) }}{{ end }}
{{- $_ := set $cfg "ui" $ui }}
{{- end }}
{{- if or $v.redis.url $v.redis.existingSecret.name }}
{{- $_ := set $cfg "redis_url" "${env.REDIS_URL:=}" }}
{{- end }}
{{- with $v.extraConfig }}
{{- $cfg = mergeOverwrite $cfg (deepCopy .) }}
{{- end }}
{{- include "llm-proxy.assertNoSecrets" (list $cfg "config") }}
{{- $order := list "server" "providers" "models" "default_model" "auth" "database" "usage" -}}
# Generated by the llm-proxy Helm chart; secrets are only referenced as
# environment placeholders, substituted when the proxy starts.
{{- range $order }}
{{ dict . (get $cfg .) | toYaml }}
{{- end }}
{{- range $k, $val := $cfg }}
{{- if not (has $k $order) }}
{{ dict $k $val | toYaml }}
{{- end }}
{{- end }}
{{- end }}

{{/* auth.mode as rendered: the mode, or [api_keys, <mode>] with auth.apiKeys (JSON {"mode": ...}). */}}
{{- define "llm-proxy.authMode" -}}
{{- if .Values.auth.apiKeys }}
{{- dict "mode" (list "api_keys" .Values.auth.mode) | toJson }}
{{- else }}
{{- dict "mode" .Values.auth.mode | toJson }}
{{- end }}
{{- end }}

{{/* The config ConfigMap's data (also used by the migration hook's copy). */}}
{{- define "llm-proxy.configMapData" -}}
config.yaml: |
{{- include "llm-proxy.config" . | nindent 2 }}
{{- end }}

{{/*
Pod-level pieces shared by the Deployment and the migration Job.
*/}}
{{- define "llm-proxy.env" -}}
{{- if .Values.database.existingSecret.name }}
- name: DATABASE_URL
  valueFrom:
    secretKeyRef:
      name: {{ .Values.database.existingSecret.name }}
      key: {{ .Values.database.existingSecret.key }}
{{- end }}
{{- if .Values.redis.existingSecret.name }}
- name: REDIS_URL
  valueFrom:
    secretKeyRef:
      name: {{ .Values.redis.existingSecret.name }}
      key: {{ .Values.redis.existingSecret.key }}
{{- else if .Values.redis.url }}
- name: REDIS_URL
  value: {{ .Values.redis.url | quote }}
{{- end }}
{{- if eq .Values.auth.mode "hub" }}
{{- /* The variables that switch hub mode on for any config (docs/konveyor.md). */}}
- name: LLM_PROXY_AUTH_MODE
  value: {{ ternary "api_keys,hub" "hub" (.Values.auth.apiKeys | default false) | quote }}
- name: LLM_PROXY_HUB_URL
  value: {{ .Values.auth.hub.url | quote }}
- name: LLM_PROXY_HUB_CACHE_TTL
  value: {{ .Values.auth.hub.cacheTtl | toString | quote }}
{{- with .Values.auth.hub.issuers }}
- name: LLM_PROXY_HUB_ISSUERS
  value: {{ join "," . | quote }}
{{- end }}
{{- end }}
{{- with include "llm-proxy.trustFile" . }}
- name: SSL_CERT_FILE
  value: {{ . | quote }}
- name: REQUESTS_CA_BUNDLE
  value: {{ . | quote }}
{{- end }}
{{- with .Values.extraEnv }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{- define "llm-proxy.envFrom" -}}
{{- if .Values.apiKeysSecret.name }}
- secretRef:
    name: {{ .Values.apiKeysSecret.name }}
    optional: true
{{- end }}
{{- with .Values.extraEnvFrom }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* Volume mounts; pass (dict "ctx" $ "configVolume" <name>). */}}
{{- define "llm-proxy.volumeMounts" -}}
- name: config
  mountPath: {{ include "llm-proxy.configDir" .ctx }}/config.yaml
  subPath: config.yaml
  readOnly: true
- name: data
  mountPath: {{ include "llm-proxy.dataDir" .ctx }}
- name: tmp
  mountPath: /tmp
{{- if .ctx.Values.caBundle.configMapName }}
- name: ca-bundle
  mountPath: {{ include "llm-proxy.caDir" .ctx }}
  readOnly: true
{{- if .ctx.Values.caBundle.appendSystemRoots }}
- name: ca-merged
  mountPath: {{ include "llm-proxy.mergedCaDir" .ctx }}
  readOnly: true
{{- end }}
{{- end }}
{{- end }}

{{/* Volumes; pass (dict "ctx" $ "configMap" <name> "persistent" <bool>). */}}
{{- define "llm-proxy.volumes" -}}
- name: config
  configMap:
    name: {{ .configMap }}
    items:
      - key: config.yaml
        path: config.yaml
- name: data
{{- $p := .ctx.Values.persistence }}
{{- if and .persistent $p.enabled }}
  persistentVolumeClaim:
    claimName: {{ $p.existingClaim | default (printf "%s-data" (include "llm-proxy.fullname" .ctx)) }}
{{- else }}
  emptyDir:
    sizeLimit: {{ $p.emptyDirSizeLimit }}
{{- end }}
- name: tmp
  emptyDir:
    sizeLimit: 256Mi
{{- if .ctx.Values.caBundle.configMapName }}
- name: ca-bundle
  configMap:
    name: {{ .ctx.Values.caBundle.configMapName }}
    items:
      - key: {{ .ctx.Values.caBundle.key }}
        path: {{ .ctx.Values.caBundle.key }}
{{- if .ctx.Values.caBundle.appendSystemRoots }}
- name: ca-merged
  emptyDir:
    sizeLimit: 16Mi
{{- end }}
{{- end }}
{{- end }}

{{/*
Init container that writes system roots + the private CA into the ca-merged
emptyDir, using the image's own Python (no shell needed).
*/}}
{{- define "llm-proxy.caMergeInitContainer" -}}
{{- if and .Values.caBundle.configMapName .Values.caBundle.appendSystemRoots }}
- name: merge-ca-bundle
  image: {{ include "llm-proxy.image" . }}
  imagePullPolicy: {{ .Values.image.pullPolicy }}
  command:
    - python
    - -c
    - |
      import os, ssl, sys
      paths = ssl.get_default_verify_paths()
      candidates = [paths.cafile, paths.openssl_cafile, "/etc/ssl/certs/ca-certificates.crt"]
      system = next((c for c in candidates if c and os.path.isfile(c)), None)
      if system is None:
          sys.exit("merge-ca-bundle: no system CA bundle found in the image")
      with open(sys.argv[2], "wb") as dst:
          for src in (system, sys.argv[1]):
              with open(src, "rb") as f:
                  data = f.read()
              dst.write(data if data.endswith(b"\n") else data + b"\n")
    - {{ include "llm-proxy.caFile" . }}
    - {{ include "llm-proxy.mergedCaDir" . }}/ca-bundle.crt
  securityContext:
    {{- toYaml .Values.securityContext | nindent 4 }}
  resources:
    requests:
      cpu: 10m
      memory: 32Mi
    limits:
      memory: 64Mi
  volumeMounts:
    - name: ca-bundle
      mountPath: {{ include "llm-proxy.caDir" . }}
      readOnly: true
    - name: ca-merged
      mountPath: {{ include "llm-proxy.mergedCaDir" . }}
{{- end }}
{{- end }}
