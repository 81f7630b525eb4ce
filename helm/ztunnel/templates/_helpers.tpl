{{/* Name of the DaemonSet, ServiceAccount and related objects (upstream "ztunnel.release-name"). */}}
{{- define "ztunnel.release-name" -}}
{{ .Values.resourceName | default "ztunnel" }}
{{- end }}

{{/* The platform: `platform`, else `global.platform`. */}}
{{- define "ztunnel.platform" -}}
{{ .Values.platform | default (.Values.global).platform | default "" }}
{{- end }}

{{/* Whether namespace-scoped ("true") or cluster-scoped objects are rendered (resourceScope). */}}
{{- define "ztunnel.namespaced" -}}
{{ or (eq .Values.resourceScope "all") (eq .Values.resourceScope "namespace") }}
{{- end }}
{{- define "ztunnel.clustered" -}}
{{ or (eq .Values.resourceScope "all") (eq .Values.resourceScope "cluster") }}
{{- end }}

{{/* Labels on every object (upstream "istio.labels"). */}}
{{- define "istio.labels" -}}
app.kubernetes.io/managed-by: {{ .Release.Service | quote }}
app.kubernetes.io/instance: {{ .Release.Name | quote }}
app.kubernetes.io/part-of: "istio"
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | quote }}
{{- end }}

{{/* A map of labels or annotations, one `key: "value"` line each (values must be strings);
null entries (removed defaults) are dropped. Call as
`{{- with include "ztunnel.stringMap" .Values.x }}{{ . | nindent N }}{{ end }}`. */}}
{{- define "ztunnel.stringMap" -}}
{{- $lines := list }}
{{- range $key, $value := . }}
{{- if not (kindIs "invalid" $value) }}
{{- $lines = append $lines (printf "%s: %s" $key ($value | toString | quote)) }}
{{- end }}
{{- end }}
{{- join "\n" $lines }}
{{- end }}

{{/* The image reference: `image` when it contains "/", else hub/image:tag[-variant]. */}}
{{- define "ztunnel.image" -}}
{{- if contains "/" .Values.image -}}
{{ .Values.image }}
{{- else -}}
{{- $tag := .Values.tag | toString | default .Chart.AppVersion -}}
{{- with .Values.hub }}{{ . }}/{{ end }}{{ .Values.image }}:{{ $tag }}{{ with .Values.variant }}-{{ . }}{{ end }}
{{- end -}}
{{- end }}

{{/* istiod's address for revision `revision` (CA_ADDRESS / XDS_ADDRESS default). */}}
{{- define "ztunnel.istiod" -}}
istiod{{ with .Values.revision }}-{{ . }}{{ end }}.{{ .Values.istioNamespace }}.svc:15012
{{- end }}

{{/* Pod resources (upstream "ztunnel.resources"): empty and null entries are dropped. */}}
{{- define "ztunnel.resources" -}}
{{- $out := dict }}
{{- range $section := list "requests" "limits" }}
{{- $entries := dict }}
{{- range $name, $value := (index ($.Values.resources | default dict) $section) | default dict }}
{{- if and (not (kindIs "invalid" $value)) (ne (toString $value) "") }}
{{- $_ := set $entries $name $value }}
{{- end }}
{{- end }}
{{- if $entries }}
{{- $_ := set $out $section $entries }}
{{- end }}
{{- end }}
{{- with ($.Values.resources).claims }}
{{- $_ := set $out "claims" . }}
{{- end }}
{{- if $out }}
{{- toYaml $out }}
{{- end }}
{{- end }}

{{/* True when env ENABLE_CLUSTER_TRUST_BUNDLE_API is true (a bool or the string "true"). */}}
{{- define "ztunnel.clusterTrustBundle" -}}
{{- if eq (toString (.Values.env).ENABLE_CLUSTER_TRUST_BUNDLE_API) "true" }}true{{ end }}
{{- end }}
