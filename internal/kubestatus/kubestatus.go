// Package kubestatus writes errors as a Kubernetes Status object, the form
// kubectl prints as "Error from server (Reason): message" instead of a bare
// status code. The relay and the agent both answer this way.
package kubestatus

import (
	"encoding/json"
	"net/http"
)

// Write answers with code and a Status carrying reason (a Kubernetes
// StatusReason such as "ServiceUnavailable") and msg.
func Write(w http.ResponseWriter, code int, reason, msg string) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(code)
	_ = json.NewEncoder(w).Encode(map[string]any{
		"kind": "Status", "apiVersion": "v1", "metadata": map[string]any{},
		"status": "Failure", "reason": reason, "code": code, "message": msg,
	})
}
