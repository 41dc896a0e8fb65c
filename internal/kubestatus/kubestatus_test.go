package kubestatus

import (
	"encoding/json"
	"net/http/httptest"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"go.uber.org/goleak"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

func TestWrite(t *testing.T) {
	rec := httptest.NewRecorder()
	Write(rec, 503, "ServiceUnavailable", "spectro-proxy: no agent connected for cluster-a")
	assert.Equal(t, 503, rec.Code)
	assert.Equal(t, "application/json", rec.Header().Get("Content-Type"))
	var st map[string]any
	require.NoError(t, json.Unmarshal(rec.Body.Bytes(), &st))
	assert.Equal(t, "Status", st["kind"])
	assert.Equal(t, "Failure", st["status"])
	assert.Equal(t, "ServiceUnavailable", st["reason"])
	assert.Equal(t, 503.0, st["code"])
	assert.Equal(t, "spectro-proxy: no agent connected for cluster-a", st["message"])
}
