{{/*
Names and labels, as `helm create` makes them, plus the run and stage labels that
`kubectl get jobs -l kuberlhf.io/run=RUN` and `kubectl logs -l ...` select on.
*/}}

{{- define "kuberlhf-job.name" -}}
{{- .Chart.Name | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* The stage's name in its pipeline: a run may have several stages of one kind. */}}
{{- define "kuberlhf-job.stageName" -}}
{{- .Values.name | default .Values.stage }}
{{- end }}

{{/* The Job's name: <run>-<stage name> when a run is set, else the release name. */}}
{{- define "kuberlhf-job.fullname" -}}
{{- if .Values.run }}
{{- printf "%s-%s" .Values.run (include "kuberlhf-job.stageName" .) | trunc 52 | trimSuffix "-" }}
{{- else }}
{{- .Release.Name | trunc 52 | trimSuffix "-" }}
{{- end }}
{{- end }}

{{- define "kuberlhf-job.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "kuberlhf-job.selectorLabels" -}}
app.kubernetes.io/name: {{ include "kuberlhf-job.name" . }}
app.kubernetes.io/instance: {{ .Release.Name | trunc 63 | trimSuffix "-" }}
kuberlhf.io/run: {{ .Values.run | default .Release.Name | quote }}
kuberlhf.io/stage: {{ include "kuberlhf-job.stageName" . | quote }}
{{- end }}

{{- define "kuberlhf-job.labels" -}}
helm.sh/chart: {{ include "kuberlhf-job.chart" . }}
{{ include "kuberlhf-job.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: kuberlhf
app.kubernetes.io/component: {{ .Values.stage | quote }}
{{- end }}

{{- define "kuberlhf-job.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (.Values.image.tag | default .Chart.AppVersion) }}
{{- end }}
{{- end }}

{{/* extraVolumes and extraVolumeMounts as the API server would take them, refused here
before anything is created: names and paths once each, mounts of extraVolumes only. */}}
{{- define "kuberlhf-job.checkVolumes" -}}
{{- $volumes := list }}
{{- range .Values.extraVolumes }}
{{- if has .name $volumes }}
{{- fail (printf "extraVolumes: %s is given twice" .name) }}
{{- end }}
{{- $volumes = append $volumes .name }}
{{- end }}
{{- $paths := list }}
{{- range .Values.extraVolumeMounts }}
{{- if not (has .name $volumes) }}
{{- fail (printf "extraVolumeMounts: %s is no volume of extraVolumes" (toString .name)) }}
{{- end }}
{{- $path := trimSuffix "/" .mountPath }}
{{- if has $path $paths }}
{{- fail (printf "extraVolumeMounts: %s is mounted twice" .mountPath) }}
{{- end }}
{{- $paths = append $paths $path }}
{{- end }}
{{- end }}

{{/* The headless Service that gives each pod of a multi-node Job a stable DNS name. */}}
{{- define "kuberlhf-job.service" -}}
{{- $name := include "kuberlhf-job.fullname" . -}}
{{- /* A Service's name is a DNS-1035 label, which starts with a letter; a Job's may start
with a digit (a run "7b-ko", a release "13b-sft"): the API server refused the gang. */ -}}
{{- if regexMatch "^[a-z]" $name }}{{ $name }}{{ else }}{{ printf "svc-%s" $name }}{{ end }}
{{- end }}

{{/*
How the stage is started: command and environment, as JSON. The container uses it,
and so does the submitter's local backend (pipeline/launch.py reads it off the rendered
pod template's kuberlhf.io/launch annotation), so the two cannot drift.
*/}}
{{- define "kuberlhf-job.launch" -}}
{{- $torchrun := or (gt (int .Values.nodes) 1) (gt (int .Values.nprocPerNode) 1) -}}
{{- $env := dict "KUBERLHF_RUN" (.Values.run | default .Release.Name) "KUBERLHF_STAGE" .Values.stage "PYTHONUNBUFFERED" "1" "TOKENIZERS_PARALLELISM" "false" -}}
{{- $command := list "python" "-m" "jobs" .Values.stage -}}
{{- if $torchrun }}
{{- /* torchrun through jobs.launch, which passes a worker's exit code (65, 75) on: torchrun exits 1 */}}
{{- $command = list "python" "-m" "jobs.launch" .Values.stage -}}
{{- $_ := set $env "PET_NNODES" (toString .Values.nodes) -}}
{{- $_ := set $env "PET_NPROC_PER_NODE" (toString .Values.nprocPerNode) -}}
{{- /* On SIGTERM torchrun gives its workers this long to checkpoint before SIGKILL (30 s by
default): the pod's grace period, less a margin for the upload's last steps. */}}
{{- $_ := set $env "TORCH_ELASTIC_SHUTDOWN_TIMEOUT" (toString (max 10 (sub (int .Values.terminationGracePeriodSeconds) 30))) -}}
{{- if gt (int .Values.nodes) 1 }}
{{- $_ := set $env "PET_MASTER_ADDR" (printf "%s-0.%s.%s.svc" (include "kuberlhf-job.fullname" .) (include "kuberlhf-job.service" .) .Release.Namespace) -}}
{{- $_ := set $env "PET_MASTER_PORT" (toString .Values.masterPort) -}}
{{- else }}
{{- $_ := set $env "PET_STANDALONE" "1" -}}
{{- end }}
{{- end }}
{{- dict "command" $command "env" $env | toJson }}
{{- end }}

{{/*
The variables the stage config names as holding a key (the values of its *_env fields, at
any depth, e.g. judge.endpoint.api_key_env), one per line: an env entry by such a name
must come from a Secret, whatever the name looks like.
*/}}
{{- define "kuberlhf-job.keyEnvNames" -}}
{{- range $field, $value := . }}
{{- if kindIs "map" $value }}
{{ include "kuberlhf-job.keyEnvNames" $value }}
{{- else if kindIs "slice" $value }}
{{- range $value }}{{ if kindIs "map" . }}
{{ include "kuberlhf-job.keyEnvNames" . }}
{{- end }}{{ end }}
{{- else if and (hasSuffix "_env" $field) (kindIs "string" $value) }}
{{ $value }}
{{- end }}
{{- end }}
{{- end }}
