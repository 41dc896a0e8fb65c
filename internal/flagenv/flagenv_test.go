package flagenv

import (
	"flag"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"go.uber.org/goleak"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

func TestApply(t *testing.T) {
	fs := flag.NewFlagSet("x", flag.ContinueOnError)
	server := fs.String("server", "", "")
	port := fs.Int("port", 443, "")
	uid := fs.String("cluster-uid", "", "")
	t.Setenv("SP_SERVER", "from-env")
	t.Setenv("SP_PORT", "8443")
	t.Setenv("SP_CLUSTER_UID", "env-uid")
	require.NoError(t, Parse(fs, []string{"--cluster-uid", "flag-uid"}, "SP_"))
	assert.Equal(t, "from-env", *server)
	assert.Equal(t, 8443, *port)
	assert.Equal(t, "flag-uid", *uid, "a flag on the command line wins over the environment")
}

func TestApplyBadValue(t *testing.T) {
	fs := flag.NewFlagSet("x", flag.ContinueOnError)
	fs.Int("port", 443, "")
	t.Setenv("SP_PORT", "many")
	require.NoError(t, fs.Parse(nil))
	require.ErrorContains(t, Apply(fs, "SP_"), `SP_PORT="many"`)
}
