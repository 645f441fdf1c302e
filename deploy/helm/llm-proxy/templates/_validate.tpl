{{/*
Cross-field checks the JSON schema cannot express. Rendering fails with a
readable message instead of producing a pod that cannot work.
*/}}
{{- define "llm-proxy.validate" -}}
{{- $v := .Values }}
{{- $needed := add $v.preStopSleepSeconds $v.server.drainDelaySeconds $v.server.shutdownGraceSeconds }}
{{- if le (int $v.terminationGracePeriodSeconds) (int $needed) }}
{{- fail (printf "terminationGracePeriodSeconds (%v) must be greater than preStopSleepSeconds + server.drainDelaySeconds + server.shutdownGraceSeconds (%v)" $v.terminationGracePeriodSeconds $needed) }}
{{- end }}
{{- if eq $v.auth.mode "oidc" }}
{{- if not $v.auth.issuers }}
{{- fail "auth.mode is oidc but auth.issuers is empty" }}
{{- end }}
{{- range $i, $iss := $v.auth.issuers }}
{{- if not ($iss.audiences | default $v.auth.audiences) }}
{{- fail (printf "auth.issuers[%d] (%s) has no audiences: set auth.issuers[%d].audiences or auth.audiences" $i $iss.issuer $i) }}
{{- end }}
{{- end }}
{{- end }}
{{- if and (eq $v.auth.mode "trusted_header") (not (or $v.auth.trustedHeader.secretEnv $v.auth.trustedHeader.trustedNetworks)) }}
{{- fail "auth.mode is trusted_header: set auth.trustedHeader.secretEnv and/or auth.trustedHeader.trustedNetworks" }}
{{- end }}
{{- if and $v.auth.apiKeys (not (has $v.auth.mode (list "oidc" "hub"))) }}
{{- fail (printf "auth.apiKeys goes beside auth.mode oidc or hub, not %s" $v.auth.mode) }}
{{- end }}
{{- $providerIds := list }}
{{- range $v.providers }}
{{- if has .id $providerIds }}
{{- fail (printf "providers: duplicate id %q" .id) }}
{{- end }}
{{- $providerIds = append $providerIds .id }}
{{- end }}
{{- $modelIds := list }}
{{- range $v.models }}
{{- if not (has .provider $providerIds) }}
{{- fail (printf "models: %q uses provider %q, which is not in providers" .id .provider) }}
{{- end }}
{{- $modelIds = append $modelIds .id }}
{{- range .aliases }}
{{- $modelIds = append $modelIds . }}
{{- end }}
{{- end }}
{{- if and $v.defaultModel (not (has $v.defaultModel $modelIds)) }}
{{- fail (printf "defaultModel %q is not the id or alias of a model in models" $v.defaultModel) }}
{{- end }}
{{- if and $v.clientConfig.enabled (not (include "llm-proxy.clientModel" .)) }}
{{- fail "clientConfig is enabled but neither clientConfig.model nor defaultModel is set" }}
{{- end }}
{{- if and (include "llm-proxy.singleWriterVolume" .) (or $v.hpa.enabled (gt (int $v.replicas) 1)) }}
{{- fail "persistence.enabled with a ReadWriteOnce volume allows a single replica: use accessModes [ReadWriteMany], or an external database (database.existingSecret) without persistence" }}
{{- end }}
{{- if and $v.hpa.enabled (lt (int $v.hpa.maxReplicas) (int $v.hpa.minReplicas)) }}
{{- fail "hpa.maxReplicas must be >= hpa.minReplicas" }}
{{- end }}
{{- end }}
