{{/* Names and labels. */}}

{{- define "moe-cluster.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
The prefix of every object's name. Kept to 40 characters: KubeRay derives longer names (the RayCluster
`<name>-<5 chars>`, its services `<cluster>-head-svc`, pods `<cluster>-<group>-worker-<5 chars>`) and
pod names must stay within 63.
*/}}
{{- define "moe-cluster.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 40 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 40 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 40 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "moe-cluster.selectorLabels" -}}
app.kubernetes.io/name: {{ include "moe-cluster.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "moe-cluster.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "moe-cluster.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{- define "moe-cluster.image" -}}
{{- printf "%s:%s" .Values.image.repository (.Values.image.tag | default .Chart.AppVersion) }}
{{- end }}

{{/* The Secret holding the API keys: an existing one, or the one the chart generates. */}}
{{- define "moe-cluster.apiKeysSecret" -}}
{{- .Values.apiKeys.existingSecret | default (printf "%s-api-keys" (include "moe-cluster.fullname" .)) }}
{{- end }}

{{- define "moe-cluster.modelClaim" -}}
{{- .Values.model.volume.persistentVolumeClaim.claimName | default (printf "%s-model" (include "moe-cluster.fullname" .)) }}
{{- end }}

{{/* The Serve config (spec.serveConfigV2), the same document `moe-cluster serve-config` writes. */}}
{{- define "moe-cluster.serveConfig" -}}
{{- $options := .Values.serve.options }}
{{- if not (hasPrefix (printf "%s/" (trimSuffix "/" .Values.model.mountPath)) (toString $options.model)) }}
{{- fail (printf "serve.options.model (%v) must be a directory under model.mountPath (%s)" $options.model .Values.model.mountPath) }}
{{- end }}
{{- $config := dict
  "proxy_location" .Values.serve.proxyLocation
  "http_options" (dict "host" "0.0.0.0" "port" .Values.serve.port)
  "applications" (list (dict
    "name" .Values.serve.applicationName
    "route_prefix" "/"
    "import_path" "cluster.serve.app:build_app"
    "args" $options)) }}
{{- toYaml $config }}
{{- end }}

{{/*
The environment every Ray container gets: the API keys (read by the ingress, wherever Serve puts it).
*/}}
{{- define "moe-cluster.env" -}}
{{- if .Values.apiKeys.enabled }}
- name: {{ .Values.serve.options.api_keys_env | default "MOE_CLUSTER_API_KEYS" }}
  valueFrom:
    secretKeyRef:
      name: {{ include "moe-cluster.apiKeysSecret" . }}
      key: {{ .Values.apiKeys.secretKey }}
{{- end }}
{{- end }}

{{/* The init container that puts the model on the volume before Ray starts. */}}
{{- define "moe-cluster.fetchContainer" -}}
{{- $fetch := .Values.model.fetch }}
- name: fetch-model
  image: {{ $fetch.image | default (include "moe-cluster.image" .) }}
  imagePullPolicy: {{ .Values.image.pullPolicy }}
  {{- if $fetch.command }}
  command:
    {{- toYaml $fetch.command | nindent 4 }}
  {{- else }}
  # Downloads once: a marker written after a complete download makes later pods skip it.
  command:
    - sh
    - -ec
    - |
      if [ -f "$MODEL_DIR/.moe-cluster-complete" ]; then echo "model already in $MODEL_DIR"; exit 0; fi
      hf download "$MODEL_REPO" --revision "$MODEL_REVISION" --local-dir "$MODEL_DIR"
      touch "$MODEL_DIR/.moe-cluster-complete"
  {{- end }}
  env:
    - name: MODEL_DIR
      value: {{ .Values.serve.options.model | quote }}
    - name: MODEL_REPO
      value: {{ $fetch.repository | quote }}
    - name: MODEL_REVISION
      value: {{ $fetch.revision | quote }}
    - name: HF_HOME
      value: /tmp/hf-home
    {{- with $fetch.tokenSecret }}
    - name: HF_TOKEN
      valueFrom:
        secretKeyRef:
          name: {{ . }}
          key: token
    {{- end }}
  resources:
    {{- toYaml $fetch.resources | nindent 4 }}
  securityContext:
    {{- toYaml .Values.containerSecurityContext | nindent 4 }}
  volumeMounts:
    - name: model
      mountPath: {{ .Values.model.mountPath }}
{{- end }}

{{- define "moe-cluster.modelVolume" -}}
{{- $volume := .Values.model.volume }}
- name: model
{{- if eq $volume.type "persistentVolumeClaim" }}
  persistentVolumeClaim:
    claimName: {{ include "moe-cluster.modelClaim" . }}
{{- else if eq $volume.type "hostPath" }}
  hostPath:
    {{- toYaml $volume.hostPath | nindent 4 }}
{{- else }}
  emptyDir:
    {{- toYaml $volume.emptyDir | nindent 4 }}
{{- end }}
{{- end }}

{{/*
A Ray pod template. Arguments (a dict): root (the chart context), workload (serve or batch), group (a
head or worker group of the values), head (bool), model (mount the model volume, with the fetch init container when it is on),
extraMounts / extraVolumes (lists).
*/}}
{{- define "moe-cluster.podTemplate" -}}
{{- $root := .root }}
{{- $group := .group }}
{{- $values := $root.Values }}
{{- $gpus := int ($group.gpus | default 0) }}
{{- $resources := deepCopy ($group.resources | default dict) }}
{{- if gt $gpus 0 }}
{{- $_ := set $resources "limits" (merge (dict "nvidia.com/gpu" $gpus) ($resources.limits | default dict)) }}
{{- $_ := set $resources "requests" (merge (dict "nvidia.com/gpu" $gpus) ($resources.requests | default dict)) }}
{{- end }}
metadata:
  labels:
    {{- include "moe-cluster.selectorLabels" $root | nindent 4 }}
    app.kubernetes.io/component: {{ ternary "ray-head" "ray-worker" .head }}
    moe-cluster/workload: {{ .workload }}
    {{- with $values.commonLabels }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
    {{- with $group.labels }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  {{- with $group.annotations }}
  annotations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
spec:
  {{- with $values.serviceAccountName }}
  serviceAccountName: {{ . }}
  {{- end }}
  {{- with $values.imagePullSecrets }}
  imagePullSecrets:
    {{- range . }}
    - name: {{ . }}
    {{- end }}
  {{- end }}
  securityContext:
    {{- toYaml $values.podSecurityContext | nindent 4 }}
  {{- with $group.nodeSelector }}
  nodeSelector:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $group.tolerations }}
  tolerations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $group.affinity }}
  affinity:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- if and .model $values.model.fetch.enabled }}
  initContainers:
    {{- include "moe-cluster.fetchContainer" $root | trim | nindent 4 }}
  {{- end }}
  containers:
    - name: {{ ternary "ray-head" "ray-worker" .head }}
      image: {{ include "moe-cluster.image" $root }}
      imagePullPolicy: {{ $values.image.pullPolicy }}
      ports:
        {{- if .head }}
        - {name: gcs, containerPort: 6379, protocol: TCP}
        - {name: dashboard, containerPort: 8265, protocol: TCP}
        - {name: client, containerPort: 10001, protocol: TCP}
        - {name: as-metrics, containerPort: 44217, protocol: TCP}
        - {name: dash-metrics, containerPort: 44227, protocol: TCP}
        {{- end }}
        - {name: serve, containerPort: {{ $values.serve.port }}, protocol: TCP}
        - {name: metrics, containerPort: 8080, protocol: TCP}
      {{- $env := include "moe-cluster.env" $root }}
      {{- if or $env $group.env }}
      env:
        {{- with $env }}
        {{- . | trim | nindent 8 }}
        {{- end }}
        {{- with $group.env }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
      {{- end }}
      resources:
        {{- toYaml $resources | nindent 8 }}
      securityContext:
        {{- toYaml $values.containerSecurityContext | nindent 8 }}
      volumeMounts:
        - name: dshm
          mountPath: /dev/shm
        {{- if .model }}
        - name: model
          mountPath: {{ $values.model.mountPath }}
          readOnly: {{ $values.model.readOnly }}
        {{- end }}
        {{- with .extraMounts }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
  volumes:
    - name: dshm
      emptyDir:
        medium: Memory
        sizeLimit: {{ $group.shmSize }}
    {{- if .model }}
    {{- include "moe-cluster.modelVolume" $root | trim | nindent 4 }}
    {{- end }}
    {{- with .extraVolumes }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
{{- end }}

{{/*
spec.rayClusterConfig of the RayService, spec.rayClusterSpec of the RayJob. Arguments: root, workload,
workers (the worker groups), headModel (mount the model on the head too), headMounts / headVolumes.
*/}}
{{- define "moe-cluster.rayClusterSpec" -}}
{{- $root := .root }}
{{- $values := $root.Values }}
{{- $cluster := $values.rayClusterConfig }}
rayVersion: {{ $cluster.rayVersion | quote }}
enableInTreeAutoscaling: {{ $cluster.enableInTreeAutoscaling }}
{{- if $cluster.enableInTreeAutoscaling }}
autoscalerOptions:
  {{- toYaml $cluster.autoscalerOptions | nindent 2 }}
  imagePullPolicy: {{ $values.image.pullPolicy }}
  securityContext:
    {{- toYaml $values.containerSecurityContext | nindent 4 }}
{{- end }}
{{- if eq $cluster.authOptions.mode "token" }}
authOptions:
  mode: token
  {{- with $cluster.authOptions.secretName }}
  secretName: {{ . }}
  {{- end }}
{{- end }}
headGroupSpec:
  serviceType: {{ $cluster.headGroupSpec.serviceType }}
  rayStartParams:
    {{- range $key, $value := $cluster.headGroupSpec.rayStartParams }}
    {{ $key }}: {{ $value | quote }}
    {{- end }}
  template:
    {{- include "moe-cluster.podTemplate" (dict "root" $root "workload" .workload "group" $cluster.headGroupSpec "head" true "model" .headModel "extraMounts" .headMounts "extraVolumes" .headVolumes) | trim | nindent 4 }}
workerGroupSpecs:
  {{- $workload := .workload }}
  {{- range .workers }}
  {{- $params := deepCopy (.rayStartParams | default dict) }}
  {{- if .gpus }}
  {{- $_ := set $params "num-gpus" (toString .gpus) }}
  {{- end }}
  - groupName: {{ .groupName }}
    replicas: {{ .replicas }}
    minReplicas: {{ .minReplicas }}
    maxReplicas: {{ .maxReplicas }}
    numOfHosts: {{ .numOfHosts | default 1 }}
    rayStartParams:
      {{- range $key, $value := $params }}
      {{ $key }}: {{ $value | quote }}
      {{- else }} {}
      {{- end }}
    template:
      {{- include "moe-cluster.podTemplate" (dict "root" $root "workload" $workload "group" . "head" false "model" true) | trim | nindent 6 }}
  {{- end }}
{{- end }}
