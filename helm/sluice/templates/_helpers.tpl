{{- define "sluice.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "sluice.labels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{/* Selector labels of one component: (dict "root" $ "component" "ingest") */}}
{{- define "sluice.selector" -}}
app.kubernetes.io/name: {{ .root.Chart.Name }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "sluice.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}

{{- define "sluice.secretName" -}}
{{- printf "%s-secrets" (include "sluice.fullname" .) -}}
{{- end -}}

{{/* The Secret holding DATABASE_URL: the chart's own, or the one given. */}}
{{- define "sluice.databaseSecret" -}}
{{- if .Values.postgres.existingSecret -}}{{ .Values.postgres.existingSecret }}{{- else -}}{{ include "sluice.secretName" . }}{{- end -}}
{{- end -}}

{{- define "sluice.databaseSecretKey" -}}
{{- if .Values.postgres.existingSecret -}}{{ .Values.postgres.existingSecretKey }}{{- else -}}database-url{{- end -}}
{{- end -}}

{{- define "sluice.redisEnabled" -}}
{{- if or .Values.redis.url .Values.redis.existingSecret -}}true{{- end -}}
{{- end -}}

{{/* Environment every service reads: Kafka, topics, logs, traces. */}}
{{- define "sluice.commonEnv" -}}
- name: KAFKA_BROKERS
  value: {{ .Values.kafka.brokers | quote }}
- name: KAFKA_FETCH_WAIT_MAX_MS
  value: {{ .Values.kafka.fetchWaitMaxMs | quote }}
- name: KAFKA_EXTRA_PROPERTIES
  value: {{ .Values.kafka.extraProperties | quote }}
- name: SLUICE_TOPIC_PARTITIONS
  value: {{ .Values.kafka.topicPartitions | quote }}
- name: SLUICE_TOPIC_REPLICATION
  value: {{ .Values.kafka.topicReplication | quote }}
- name: SLUICE_CREATE_TOPICS
  value: {{ .Values.kafka.createTopics | quote }}
- name: SLUICE_REQUESTS_TOPIC
  value: {{ .Values.kafka.topics.requests | quote }}
- name: SLUICE_BATCH_REQUESTS_TOPIC
  value: {{ .Values.kafka.topics.batchRequests | quote }}
- name: SLUICE_STATUS_TOPIC
  value: {{ .Values.kafka.topics.status | quote }}
- name: SLUICE_REQUESTS_DLQ_TOPIC
  value: {{ .Values.kafka.topics.requestsDlq | quote }}
- name: SLUICE_STATUS_DLQ_TOPIC
  value: {{ .Values.kafka.topics.statusDlq | quote }}
- name: SLUICE_CONTROL_TOPIC
  value: {{ .Values.kafka.topics.control | quote }}
- name: SLUICE_LOG_FORMAT
  value: {{ .Values.logFormat | quote }}
- name: RUST_LOG
  value: {{ .Values.logLevel | quote }}
{{- if .Values.otel.endpoint }}
- name: OTEL_EXPORTER_OTLP_ENDPOINT
  value: {{ .Values.otel.endpoint | quote }}
- name: OTEL_EXPORTER_OTLP_PROTOCOL
  value: {{ .Values.otel.protocol | quote }}
{{- end }}
{{- if .Values.otel.resourceAttributes }}
- name: OTEL_RESOURCE_ATTRIBUTES
  value: {{ .Values.otel.resourceAttributes | quote }}
{{- end }}
{{- with .Values.extraEnv }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{- define "sluice.databaseEnv" -}}
- name: DATABASE_URL
  valueFrom:
    secretKeyRef:
      name: {{ include "sluice.databaseSecret" . }}
      key: {{ include "sluice.databaseSecretKey" . }}
{{- end -}}

{{- define "sluice.redisEnv" -}}
{{- if include "sluice.redisEnabled" . }}
- name: REDIS_URL
  valueFrom:
    secretKeyRef:
      name: {{ .Values.redis.existingSecret | default (include "sluice.secretName" .) }}
      key: {{ if .Values.redis.existingSecret }}{{ .Values.redis.existingSecretKey }}{{ else }}redis-url{{ end }}
{{- end }}
{{- end -}}

{{/* A service's own `env` map as name/value pairs. */}}
{{- define "sluice.extraEnvMap" -}}
{{- range $name, $value := . }}
- name: {{ $name }}
  value: {{ $value | quote }}
{{- end }}
{{- end -}}

{{/* Probes on the service's HTTP port: liveness /healthz, readiness /readyz. */}}
{{- define "sluice.probes" -}}
livenessProbe:
  httpGet: {path: /healthz, port: http}
  periodSeconds: 10
  timeoutSeconds: 2
  failureThreshold: 3
readinessProbe:
  httpGet: {path: /readyz, port: http}
  periodSeconds: 5
  timeoutSeconds: 3
  failureThreshold: 2
startupProbe:
  httpGet: {path: /healthz, port: http}
  periodSeconds: 2
  failureThreshold: 60
{{- end -}}

{{- define "sluice.podAnnotations" -}}
{{- if .root.Values.prometheusScrape }}
prometheus.io/scrape: "true"
prometheus.io/port: {{ .port | quote }}
prometheus.io/path: /metrics
{{- end }}
{{- with .root.Values.podAnnotations }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{- define "sluice.podCommon" -}}
{{- with .Values.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
securityContext:
  {{- toYaml .Values.podSecurityContext | nindent 2 }}
{{- with .Values.nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .Values.tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .Values.affinity }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end -}}

{{/* The key webhook signing secrets are sealed with: an existing Secret's, or the chart's. */}}
{{- define "sluice.webhookKeyEnv" -}}
{{- if .Values.webhooks.enabled }}
- name: SLUICE_WEBHOOK_SECRET_KEY
  valueFrom:
    secretKeyRef:
      name: {{ .Values.webhooks.existingSecret | default (include "sluice.secretName" .) }}
      key: {{ if .Values.webhooks.existingSecret }}{{ .Values.webhooks.existingSecretKey }}{{ else }}webhook-secret-key{{ end }}
{{- end }}
{{- end -}}

{{/* Model prices: ingest prices estimates against budgets, results prices the usage it records. */}}
{{- define "sluice.pricesEnv" -}}
- name: SLUICE_MODEL_PRICES
  value: {{ .Values.modelPrices | quote }}
{{- end }}

{{/* What ingest and the workers both read about tiers and token estimates. */}}
{{- define "sluice.tierEnv" -}}
- name: SLUICE_TIERS
  value: {{ .Values.tiers | quote }}
- name: SLUICE_DEFAULT_MAX_TOKENS
  value: {{ .Values.defaultMaxTokens | quote }}
{{- end }}
