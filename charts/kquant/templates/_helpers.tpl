{{/* Release full name, at most 63 characters (a DNS label). */}}
{{- define "kquant.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{/* Selector labels (stable across upgrades). */}}
{{- define "kquant.selectorLabels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end -}}

{{/* Common labels. */}}
{{- define "kquant.labels" -}}
{{ include "kquant.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "kquant.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "kquant.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* Rules every scope needs: exactly the API calls of kquant_operator (handlers.py, through
kube.py) and of kopf (watching, progress annotations, events). tests/unit/test_chart.py
checks them against the code. */}}
{{- define "kquant.rules" -}}
- apiGroups: [kquant.io]
  resources: [quantizationjobs]
  verbs: [get, list, watch, patch]
- apiGroups: [kquant.io]
  resources: [quantizationjobs/status]
  verbs: [patch]
# The Job's ownerReference sets blockOwnerDeletion: where the OwnerReferencesPermission-
# Enforcement admission plugin is on (OpenShift), creating it needs update on finalizers.
- apiGroups: [kquant.io]
  resources: [quantizationjobs/finalizers]
  verbs: [update]
- apiGroups: [batch]
  resources: [jobs]
  verbs: [create, get, list, watch, delete]
- apiGroups: [""]
  resources: [pods]
  verbs: [list]
- apiGroups: [""]
  resources: [events]
  verbs: [create]
{{- end -}}
