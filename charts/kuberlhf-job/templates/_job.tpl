{{/*
Everything a stage chart installs: the stage config as a ConfigMap, the Job, the
headless Service of a multi-node Job, and the `helm test` pod. A stage chart's
templates/stage.yaml is one line: {{ include "kuberlhf-job.all" . }}
*/}}
{{- define "kuberlhf-job.all" -}}
{{- $launch := include "kuberlhf-job.launch" . | fromJson -}}
{{- $fullname := include "kuberlhf-job.fullname" . -}}
{{- $multinode := gt (int .Values.nodes) 1 -}}
apiVersion: v1
kind: ConfigMap
metadata:
  name: {{ $fullname }}-config
  labels:
    {{- include "kuberlhf-job.labels" . | nindent 4 }}
data:
  config.json: {{ .Values.config | toJson | quote }}
{{- if $multinode }}
---
apiVersion: v1
kind: Service
metadata:
  name: {{ include "kuberlhf-job.service" . }}
  labels:
    {{- include "kuberlhf-job.labels" . | nindent 4 }}
spec:
  clusterIP: None
  publishNotReadyAddresses: true
  selector:
    {{- include "kuberlhf-job.selectorLabels" . | nindent 4 }}
    kuberlhf.io/role: stage
  ports:
    - name: rendezvous
      port: {{ .Values.masterPort }}
      targetPort: {{ .Values.masterPort }}
{{- end }}
{{- $policy := $multinode }}
{{- if kindIs "bool" .Values.networkPolicy.enabled }}{{ $policy = .Values.networkPolicy.enabled }}{{ end }}
{{- if $policy }}
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata:
  name: {{ $fullname }}
  labels:
    {{- include "kuberlhf-job.labels" . | nindent 4 }}
spec:
  podSelector:
    matchLabels:
      {{- include "kuberlhf-job.selectorLabels" . | nindent 6 }}
      kuberlhf.io/role: stage
  policyTypes: ["Ingress"{{ if .Values.networkPolicy.s3 }}, "Egress"{{ end }}]
  ingress:
    {{- /* Only the gang's own pods: the rendezvous port and the ports NCCL and gloo open. */}}
    - from:
        - podSelector:
            matchLabels:
              {{- include "kuberlhf-job.selectorLabels" . | nindent 14 }}
              kuberlhf.io/role: stage
  {{- with .Values.networkPolicy.s3 }}
  egress:
    - to:
        - podSelector:
            matchLabels:
              {{- include "kuberlhf-job.selectorLabels" $ | nindent 14 }}
              kuberlhf.io/role: stage
    - to:
        {{- toYaml . | nindent 8 }}
      ports:
        {{- range $.Values.networkPolicy.s3Ports }}
        - protocol: TCP
          port: {{ . }}
        {{- end }}
    - to:
        - namespaceSelector:
            matchLabels:
              kubernetes.io/metadata.name: {{ $.Values.networkPolicy.dnsNamespace | quote }}
      ports:
        - protocol: UDP
          port: 53
        - protocol: TCP
          port: 53
    {{- with $.Values.networkPolicy.extraEgress }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  {{- end }}
{{- end }}
---
apiVersion: batch/v1
kind: Job
metadata:
  name: {{ $fullname }}
  labels:
    {{- include "kuberlhf-job.labels" . | nindent 4 }}
    {{- with .Values.kueue.queueName }}
    kueue.x-k8s.io/queue-name: {{ . | quote }}
    {{- end }}
  annotations:
    {{- /* A second `rlhf run` follows a running Job whose config is the same */}}
    kuberlhf.io/config-sha256: {{ .Values.config | toJson | sha256sum | quote }}
spec:
  suspend: {{ .Values.suspend }}
  completionMode: {{ ternary "Indexed" "NonIndexed" $multinode }}
  completions: {{ .Values.nodes }}
  parallelism: {{ .Values.nodes }}
  {{- /* A training gang restarts whole: one lost rank fails the Job, the submitter re-creates it. */}}
  backoffLimit: {{ ternary 0 .Values.backoffLimit $multinode }}
  podFailurePolicy:
    rules:
      - action: FailJob
        onExitCodes:
          containerName: stage
          operator: In
          values: [65]
      - action: Ignore
        onPodConditions:
          - type: DisruptionTarget
            status: "True"
  {{- with .Values.activeDeadlineSeconds }}
  activeDeadlineSeconds: {{ . }}
  {{- end }}
  {{- if not (kindIs "invalid" .Values.ttlSecondsAfterFinished) }}
  ttlSecondsAfterFinished: {{ .Values.ttlSecondsAfterFinished }}
  {{- end }}
  template:
    metadata:
      labels:
        {{- include "kuberlhf-job.selectorLabels" . | nindent 8 }}
        kuberlhf.io/role: stage
        {{- with .Values.podLabels }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
      annotations:
        kuberlhf.io/launch: {{ $launch | toJson | quote }}
        {{- with .Values.podAnnotations }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
    spec:
      restartPolicy: Never
      terminationGracePeriodSeconds: {{ .Values.terminationGracePeriodSeconds }}
      {{- if $multinode }}
      subdomain: {{ include "kuberlhf-job.service" . }}
      {{- end }}
      {{- with .Values.serviceAccountName }}
      serviceAccountName: {{ . }}
      {{- end }}
      automountServiceAccountToken: {{ .Values.automountServiceAccountToken }}
      {{- with .Values.imagePullSecrets }}
      imagePullSecrets:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with .Values.priorityClassName }}
      priorityClassName: {{ . }}
      {{- end }}
      {{- with .Values.schedulerName }}
      schedulerName: {{ . }}
      {{- end }}
      {{- with .Values.nodeSelector }}
      nodeSelector:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with .Values.tolerations }}
      tolerations:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with .Values.affinity }}
      affinity:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      securityContext:
        runAsNonRoot: true
        {{- range $key := list "runAsUser" "runAsGroup" "fsGroup" }}
        {{- $id := index ($.Values.podSecurityContext | default dict) $key }}
        {{- if not (kindIs "invalid" $id) }}
        {{ $key }}: {{ $id | int64 }}
        {{- end }}
        {{- end }}
        seccompProfile:
          type: RuntimeDefault
      containers:
        - name: stage
          image: {{ include "kuberlhf-job.image" . }}
          imagePullPolicy: {{ .Values.image.pullPolicy }}
          command:
            {{- toYaml $launch.command | nindent 12 }}
          env:
            {{- range $name, $value := $launch.env }}
            - name: {{ $name }}
              value: {{ $value | quote }}
            {{- end }}
            {{- if $multinode }}
            - name: PET_NODE_RANK
              valueFrom:
                fieldRef:
                  fieldPath: metadata.annotations['batch.kubernetes.io/job-completion-index']
            {{- end }}
            - name: KUBERLHF_CONFIG
              value: /etc/kuberlhf/config.json
            - name: KUBERLHF_IMAGE
              value: {{ include "kuberlhf-job.image" . | quote }}
            {{- include "kuberlhf-job.podEnv" . | nindent 12 }}
          {{- if or .Values.resources .Values.gpus }}
          resources:
            {{- $resources := deepCopy .Values.resources }}
            {{- if .Values.gpus }}
            {{- $limits := get $resources "limits" | default dict }}
            {{- $_ := set $limits .Values.gpuResource .Values.gpus }}
            {{- $_ := set $resources "limits" $limits }}
            {{- end }}
            {{- /* Quantities as strings: the API server takes 1 or "1", the Python client only "1" */}}
            {{- range $kind, $quantities := $resources }}
            {{- if ne $kind "claims" }}{{- /* a list of DRA claims, no quantities */}}
            {{- range $name, $quantity := $quantities }}
            {{- $_ := set $quantities $name (toString $quantity) }}
            {{- end }}
            {{- end }}
            {{- end }}
            {{- toYaml $resources | nindent 12 }}
          {{- end }}
          securityContext:
            allowPrivilegeEscalation: false
            readOnlyRootFilesystem: {{ .Values.readOnlyRootFilesystem }}
            capabilities:
              drop: ["ALL"]
          volumeMounts:
            - name: config
              mountPath: /etc/kuberlhf
              readOnly: true
            - name: dshm
              mountPath: /dev/shm
            - name: scratch
              mountPath: /scratch
            {{- include "kuberlhf-job.checkVolumes" . }}
            {{- with .Values.extraVolumeMounts }}
            {{- toYaml . | nindent 12 }}
            {{- end }}
      volumes:
        - name: config
          configMap:
            name: {{ $fullname }}-config
        - name: dshm
          emptyDir:
            medium: Memory
            sizeLimit: {{ .Values.shm.sizeLimit | quote }}
        - name: scratch
          {{- if .Values.scratch.storageClassName }}
          ephemeral:
            volumeClaimTemplate:
              spec:
                accessModes: ["ReadWriteOnce"]
                storageClassName: {{ .Values.scratch.storageClassName }}
                resources:
                  requests:
                    storage: {{ .Values.scratch.sizeLimit | quote }}
          {{- else }}
          emptyDir:
            sizeLimit: {{ .Values.scratch.sizeLimit | quote }}
          {{- end }}
        {{- with .Values.extraVolumes }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
{{- if .Values.tests.enabled }}
---
apiVersion: v1
kind: Pod
metadata:
  name: {{ $fullname }}-test
  labels:
    {{- include "kuberlhf-job.labels" . | nindent 4 }}
    kuberlhf.io/role: test
  annotations:
    helm.sh/hook: test
    helm.sh/hook-delete-policy: before-hook-creation,hook-succeeded
spec:
  restartPolicy: Never
  {{- with .Values.serviceAccountName }}
  serviceAccountName: {{ . }}
  {{- end }}
  automountServiceAccountToken: {{ .Values.automountServiceAccountToken }}
  {{- with .Values.imagePullSecrets }}
  imagePullSecrets:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  securityContext:
    runAsNonRoot: true
    {{- range $key := list "runAsUser" "runAsGroup" }}
    {{- $id := index ($.Values.podSecurityContext | default dict) $key }}
    {{- if not (kindIs "invalid" $id) }}
    {{ $key }}: {{ $id | int64 }}
    {{- end }}
    {{- end }}
    seccompProfile:
      type: RuntimeDefault
  containers:
    - name: verify
      image: {{ include "kuberlhf-job.image" . }}
      imagePullPolicy: {{ .Values.image.pullPolicy }}
      {{- /* Passes when the stage's output is finished: manifest present, every file in place. */}}
      command: ["python", "-m", "jobs.verify", {{ .Values.output | default (get .Values.config "output") | default "" | quote }}]
      env:
        {{- include "kuberlhf-job.podEnv" . | nindent 8 }}
      securityContext:
        allowPrivilegeEscalation: false
        readOnlyRootFilesystem: {{ .Values.readOnlyRootFilesystem }}
        capabilities:
          drop: ["ALL"]
      volumeMounts:
        - name: scratch
          mountPath: /scratch
        {{- /* the stage's extra mounts too: an env entry may point into one (a CA bundle) */}}
        {{- with .Values.extraVolumeMounts }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
  volumes:
    - name: scratch
      emptyDir: {}
    {{- with .Values.extraVolumes }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
{{- end }}
{{- end }}

{{/* Environment every container of a stage gets: writable paths and the S3 endpoint. */}}
{{- define "kuberlhf-job.podEnv" -}}
- name: HOME
  value: /scratch
- name: TMPDIR
  value: /scratch
- name: HF_HOME
  value: /scratch/.cache/huggingface
- name: KUBERLHF_WORKDIR
  value: /scratch/work
{{- with .Values.s3.endpoint }}
- name: AWS_ENDPOINT_URL
  value: {{ . | quote }}
{{- end }}
- name: AWS_REGION
  value: {{ .Values.s3.region | quote }}
- name: KUBERLHF_S3_ADDRESSING_STYLE
  value: {{ .Values.s3.addressingStyle | quote }}
{{- with .Values.s3.existingSecret }}
- name: AWS_ACCESS_KEY_ID
  valueFrom:
    secretKeyRef:
      name: {{ . }}
      key: AWS_ACCESS_KEY_ID
- name: AWS_SECRET_ACCESS_KEY
  valueFrom:
    secretKeyRef:
      name: {{ . }}
      key: AWS_SECRET_ACCESS_KEY
{{- end }}
{{- $keys := splitList "\n" (include "kuberlhf-job.keyEnvNames" .Values.config) }}
{{- range .Values.env }}
{{- if and (has .name $keys) (not (hasKey (.valueFrom | default dict) "secretKeyRef")) }}
{{- fail (printf "env %s: the stage config names it as a key; give it with valueFrom.secretKeyRef (a Secret)" .name) }}
{{- end }}
{{- end }}
{{- with .Values.env }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* NOTES.txt of every stage chart. */}}
{{- define "kuberlhf-job.notes" -}}
{{- $fullname := include "kuberlhf-job.fullname" . -}}
The {{ .Values.stage }} stage of run {{ .Values.run | default .Release.Name }} is a Job: {{ $fullname }} ({{ .Values.nodes }} pod{{ if gt (int .Values.nodes) 1 }}s{{ end }}).

Watch it:
  kubectl -n {{ .Release.Namespace }} get jobs,pods -l kuberlhf.io/run={{ .Values.run | default .Release.Name }},kuberlhf.io/stage={{ include "kuberlhf-job.stageName" . }}
  kubectl -n {{ .Release.Namespace }} logs -f -l kuberlhf.io/run={{ .Values.run | default .Release.Name }},kuberlhf.io/stage={{ include "kuberlhf-job.stageName" . }} --max-log-requests {{ .Values.nodes }}
{{- if .Values.suspend }}

It was created suspended{{ with .Values.kueue.queueName }} in Kueue queue {{ . }}{{ end }}: it starts when admitted.
{{- end }}

Outputs land at {{ .Values.output | default (get .Values.config "output") | default "<config.output>" }}
(files, metrics.jsonl, and manifest.json last: the stage is finished when it is there).
Check it:
  helm test {{ .Release.Name }} -n {{ .Release.Namespace }}
{{- end }}
