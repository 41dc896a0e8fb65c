package chartdoc

import (
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

const values = `# File prose, not a value.

# -- (string) Relay domain,
# continued here.
domain: ""

image:
  # -- Image tag.
  # @default -- the chart's appVersion
  tag: ""
  # -- Pull policy.
  pullPolicy: IfNotPresent

# Section prose before the comment.
# -- Requests and limits.
resources:
  limits:
    memory: 512Mi
  # -- Requests, documented on their own.
  requests: {cpu: 50m}

# -- (int) Port; empty means 443.
port: null

# -- Replicas.
replicas: 2

# -- A ratio.
ratio: 0.5

# -- Flags | with a pipe.
extraArgs: ["--a=b|c"]

# -- Enabled.
enabled: false

# -- Unicode and <tags> stay as they are.
macro: "<< .x | default 1 >>"
`

func TestParseValues(t *testing.T) {
	got, err := ParseValues([]byte(values))
	require.NoError(t, err)
	assert.Equal(t, []Value{
		{"domain", "string", "`\"\"`", "Relay domain, continued here."},
		{"image.tag", "string", "the chart's appVersion", "Image tag."},
		{"image.pullPolicy", "string", "`\"IfNotPresent\"`", "Pull policy."},
		{"resources", "object", "`{\"limits\":{\"memory\":\"512Mi\"},\"requests\":{\"cpu\":\"50m\"}}`", "Requests and limits."},
		{"resources.requests", "object", "`{\"cpu\":\"50m\"}`", "Requests, documented on their own."},
		{"port", "int", "`nil`", "Port; empty means 443."},
		{"replicas", "int", "`2`", "Replicas."},
		{"ratio", "float", "`0.5`", "A ratio."},
		{"extraArgs", "list", "`[\"--a=b|c\"]`", "Flags | with a pipe."},
		{"enabled", "bool", "`false`", "Enabled."},
		{"macro", "string", "`\"<< .x | default 1 >>\"`", "Unicode and <tags> stay as they are."},
	}, got)
}

func TestParseValuesUndocumented(t *testing.T) {
	_, err := ParseValues([]byte("# -- Documented.\na: 1\nb:\n  c: 2\n  # -- Documented.\n  d: 3\n# A comment without --.\ne: []\n"))
	require.Error(t, err)
	assert.Equal(t, "values without a `# --` comment: b.c, e", err.Error())
}

func TestRenderAndCheck(t *testing.T) {
	dir := t.TempDir()
	write := func(name, content string) {
		require.NoError(t, os.WriteFile(filepath.Join(dir, name), []byte(content), 0o644))
	}
	write("Chart.yaml", "apiVersion: v2\nname: demo\ndescription: A demo chart.\nversion: 1.2.3-rc.1\nappVersion: \"2.0\"\nkubeVersion: \">=1.25.0-0\"\nmaintainers: [{name: Team, url: https://example.com}]\nsources: [https://example.com/src]\n")
	write("values.yaml", "# -- Flags | piped.\nextraArgs: []\n")

	// Without a template: header, badges, description, values.
	out, err := Render(dir)
	require.NoError(t, err)
	assert.Equal(t, Header+"# demo\n\n"+
		"![Version: 1.2.3-rc.1](https://img.shields.io/badge/Version-1.2.3--rc.1-informational?style=flat-square) "+
		"![Type: application](https://img.shields.io/badge/Type-application-informational?style=flat-square) "+
		"![AppVersion: 2.0](https://img.shields.io/badge/AppVersion-2.0-informational?style=flat-square)\n\n"+
		"A demo chart.\n\n"+
		"## Values\n\n"+
		"| Key | Type | Default | Description |\n"+
		"|-----|------|---------|-------------|\n"+
		"| extraArgs | list | `[]` | Flags \\| piped. |\n", string(out))

	write(TemplateFile, "{{ template \"chart.header\" . }}\n\nProse with a literal {{ \"{{ .x }}\" }}.\n\n{{ template \"chart.requirementsSection\" . }}\n\n{{ template \"chart.maintainersSection\" . }}\n\n{{ template \"chart.sourcesSection\" . }}\n")
	out, err = Render(dir)
	require.NoError(t, err)
	assert.Equal(t, Header+"# demo\n\nProse with a literal {{ .x }}.\n\n"+
		"## Requirements\n\nKubernetes: `>=1.25.0-0`\n\n"+
		"## Maintainers\n\n| Name | Email | Url |\n| ---- | ------ | --- |\n| Team |  | <https://example.com> |\n\n"+
		"## Source Code\n\n* <https://example.com/src>\n", string(out))

	err = Check(dir)
	require.Error(t, err, "no README yet")
	assert.Contains(t, err.Error(), "README.md is out of date")
	assert.True(t, strings.HasSuffix(err.Error(), "run `make chart-docs`"), err.Error())
	require.NoError(t, Write(dir))
	require.NoError(t, Check(dir))
	write("Chart.yaml", "apiVersion: v2\nname: demo\nversion: 1.0.0\nsources: [https://example.com/moved]\n")
	require.Error(t, Check(dir))

	write(TemplateFile, "{{ .Nope }}")
	_, err = Render(dir)
	assert.ErrorContains(t, err, "README.md.gotmpl")
}
