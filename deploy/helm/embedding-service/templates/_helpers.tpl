{{- define "embedding-service.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "embedding-service.fullname" -}}
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

{{- define "embedding-service.selectorLabels" -}}
app.kubernetes.io/name: {{ include "embedding-service.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "embedding-service.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "embedding-service.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "embedding-service.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "embedding-service.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* The settings of both containers (the server and `prepare`): HF_HOME, EMBEDDING_* and the extras. */}}
{{- define "embedding-service.settings" -}}
env:
  - name: HF_HOME
    value: {{ .Values.modelCache.mountPath | quote }}
  {{- range $key, $value := .Values.embedding }}
  - name: {{ printf "EMBEDDING_%s" (upper $key) }}
    value: {{ $value | toString | quote }}
  {{- end }}
  {{- with .Values.extraEnv }}
  {{- toYaml . | nindent 2 }}
  {{- end }}
{{- with .Values.envFrom }}
envFrom:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end }}

{{/* Resources (with the GPU), security context and volume mounts of both containers. The service's own
cache (the openvino engine's exports) is an emptyDir: it outlives container restarts within the pod. */}}
{{- define "embedding-service.runtime" -}}
resources:
  {{- $resources := deepCopy .Values.resources }}
  {{- if .Values.gpu.enabled }}
  {{- $limits := default dict $resources.limits }}
  {{- $_ := set $limits .Values.gpu.resourceName (.Values.gpu.count | toString) }}
  {{- $_ := set $resources "limits" $limits }}
  {{- end }}
  {{- toYaml $resources | nindent 2 }}
securityContext:
  {{- toYaml .Values.securityContext | nindent 2 }}
volumeMounts:
  - name: model-cache
    mountPath: {{ .Values.modelCache.mountPath }}
  - name: service-cache
    mountPath: /home/app/.cache/embedding-service
  - name: tmp
    mountPath: /tmp
{{- end }}
