// Package chartdoc writes a Helm chart's README.md from its Chart.yaml, the
// `# --` comments of its values.yaml and a README.md.gotmpl, in the style of
// helm-docs (github.com/norwoodj/helm-docs), so that the values table cannot
// drift from values.yaml. `make chart-docs` runs it (hack/chartdoc).
//
// The comment syntax is helm-docs's:
//
//	# -- Description of the value, continued
//	# on the next lines.
//	key: value
//
//	# -- (int) Description, with the type given because the default is null.
//	port: null
//
//	# -- Image tag.
//	# @default -- the chart's appVersion
//	tag: ""
//
// A map without a `# --` comment is not a value of its own: its keys are
// listed with dotted names (`image.tag`). A documented map or list is one value
// whose default is shown as JSON. Unlike helm-docs, a value without a `# --`
// comment is an error: every value of a chart is documented.
//
// Template names match helm-docs's (chart.header, chart.description,
// chart.badgesSection, chart.valuesSection, ...), so README.md.gotmpl stays
// usable with helm-docs itself. Values are listed in file order (helm-docs's
// --sort-values-order=file).
package chartdoc

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"text/template"

	"gopkg.in/yaml.v3"
	"helm.sh/helm/v3/pkg/chart"
	sigsyaml "sigs.k8s.io/yaml"
)

// TemplateFile is the README template in a chart directory. Without it the
// README has the header, description and values sections only.
const TemplateFile = "README.md.gotmpl"

// FixCommand is what to run when a README is out of date.
const FixCommand = "make chart-docs"

// Value is one row of the values table.
type Value struct {
	Key         string // dotted name, e.g. image.tag
	Type        string // string, int, float, bool, object, list, or the (type) annotation
	Default     string // Markdown for the Default column
	Description string
}

// Chart is what the templates see: the Chart.yaml metadata and the values.
type Chart struct {
	*chart.Metadata
	Values []Value
}

// Load reads dir/Chart.yaml and dir/values.yaml.
func Load(dir string) (*Chart, error) {
	raw, err := os.ReadFile(filepath.Join(dir, "Chart.yaml"))
	if err != nil {
		return nil, err
	}
	meta := new(chart.Metadata)
	if err := sigsyaml.Unmarshal(raw, meta); err != nil {
		return nil, fmt.Errorf("%s/Chart.yaml: %w", dir, err)
	}
	if meta.Type == "" {
		meta.Type = "application" // Helm's default
	}
	raw, err = os.ReadFile(filepath.Join(dir, "values.yaml"))
	if err != nil {
		return nil, err
	}
	values, err := ParseValues(raw)
	if err != nil {
		return nil, fmt.Errorf("%s/values.yaml: %w", dir, err)
	}
	return &Chart{Metadata: meta, Values: values}, nil
}

// ParseValues lists the documented values of a values.yaml, in file order.
func ParseValues(raw []byte) ([]Value, error) {
	var doc yaml.Node
	if err := yaml.Unmarshal(raw, &doc); err != nil {
		return nil, err
	}
	if len(doc.Content) == 0 {
		return nil, nil
	}
	root := doc.Content[0]
	if root.Kind != yaml.MappingNode {
		return nil, errors.New("not a map")
	}
	var (
		out          []Value
		undocumented []string
	)
	var walk func(prefix string, m *yaml.Node, parentDocumented bool) error
	walk = func(prefix string, m *yaml.Node, parentDocumented bool) error {
		for i := 0; i+1 < len(m.Content); i += 2 {
			k, v := m.Content[i], m.Content[i+1]
			key := prefix + k.Value
			c, documented := parseComment(k.HeadComment)
			isMap := v.Kind == yaml.MappingNode && len(v.Content) > 0
			if documented {
				val, err := row(key, v, c)
				if err != nil {
					return err
				}
				out = append(out, val)
			}
			switch {
			case isMap:
				// A documented map is a value of its own; its keys are listed
				// too when they carry their own comment.
				if err := walk(key+".", v, documented || parentDocumented); err != nil {
					return err
				}
			case !documented && !parentDocumented:
				undocumented = append(undocumented, key)
			}
		}
		return nil
	}
	if err := walk("", root, false); err != nil {
		return nil, err
	}
	if len(undocumented) > 0 {
		return nil, fmt.Errorf("values without a `# --` comment: %s", strings.Join(undocumented, ", "))
	}
	return out, nil
}

// comment is a parsed `# --` comment.
type comment struct {
	typ, description, defaultText string
}

// parseComment reads the last `# --` block of a head comment: helm-docs
// ignores the lines before it (section prose).
func parseComment(head string) (comment, bool) {
	lines := strings.Split(head, "\n")
	start := -1
	for i, l := range lines {
		if strings.HasPrefix(strings.TrimSpace(l), "# --") {
			start = i
		}
	}
	if start < 0 {
		return comment{}, false
	}
	var c comment
	var desc []string
	for i, l := range lines[start:] {
		l = strings.TrimSpace(l)
		if !strings.HasPrefix(l, "#") {
			break // a blank line ends the block
		}
		l = strings.TrimSpace(strings.TrimPrefix(l, "#"))
		if i == 0 {
			l = strings.TrimSpace(strings.TrimPrefix(l, "--"))
			if strings.HasPrefix(l, "(") {
				if end := strings.Index(l, ")"); end > 0 {
					c.typ, l = l[1:end], strings.TrimSpace(l[end+1:])
				}
			}
		}
		if rest, ok := strings.CutPrefix(l, "@default --"); ok {
			c.defaultText = strings.TrimSpace(rest)
			continue
		}
		if l != "" {
			desc = append(desc, l)
		}
	}
	c.description = strings.Join(desc, " ")
	return c, true
}

// row builds the table row of one value.
func row(key string, v *yaml.Node, c comment) (Value, error) {
	var x any
	if err := v.Decode(&x); err != nil {
		return Value{}, fmt.Errorf("%s: %w", key, err)
	}
	val := Value{Key: key, Type: c.typ, Description: c.description}
	if val.Type == "" {
		val.Type = typeOf(x)
	}
	if c.defaultText != "" {
		val.Default = c.defaultText
		return val, nil
	}
	var b bytes.Buffer
	enc := json.NewEncoder(&b)
	enc.SetEscapeHTML(false)
	if err := enc.Encode(jsonable(x)); err != nil {
		return Value{}, fmt.Errorf("%s: %w", key, err)
	}
	d := strings.TrimSpace(b.String())
	if x == nil {
		d = "nil" // as helm-docs shows null
	}
	val.Default = "`" + d + "`"
	return val, nil
}

// typeOf names a decoded YAML value as helm-docs does.
func typeOf(x any) string {
	switch x := x.(type) {
	case bool:
		return "bool"
	case int, int64, uint64:
		return "int"
	case float64:
		if x == float64(int64(x)) {
			return "int"
		}
		return "float"
	case map[string]any:
		return "object"
	case []any:
		return "list"
	}
	return "string" // strings and null
}

// jsonable turns YAML maps with non-string keys into JSON-encodable ones.
func jsonable(x any) any {
	switch x := x.(type) {
	case map[string]any:
		out := make(map[string]any, len(x))
		for k, v := range x {
			out[k] = jsonable(v)
		}
		return out
	case map[any]any:
		out := make(map[string]any, len(x))
		for k, v := range x {
			out[fmt.Sprint(k)] = jsonable(v)
		}
		return out
	case []any:
		out := make([]any, len(x))
		for i, v := range x {
			out[i] = jsonable(v)
		}
		return out
	}
	return x
}

// cell escapes text for a Markdown table cell.
func cell(s string) string {
	return strings.ReplaceAll(strings.ReplaceAll(s, "|", `\|`), "\n", " ")
}

// builtins are the helm-docs named templates README.md.gotmpl may use.
const builtins = `
{{- define "chart.header" }}# {{ .Name }}{{ end }}
{{- define "chart.description" }}{{ .Description }}{{ end }}
{{- define "chart.version" }}{{ .Version }}{{ end }}
{{- define "chart.appVersion" }}{{ .AppVersion }}{{ end }}
{{- define "chart.type" }}{{ .Type }}{{ end }}
{{- define "chart.versionBadge" }}![Version: {{ .Version }}](https://img.shields.io/badge/Version-{{ .Version | badge }}-informational?style=flat-square){{ end }}
{{- define "chart.typeBadge" }}{{ with .Type }}![Type: {{ . }}](https://img.shields.io/badge/Type-{{ . | badge }}-informational?style=flat-square){{ end }}{{ end }}
{{- define "chart.appVersionBadge" }}{{ with .AppVersion }}![AppVersion: {{ . }}](https://img.shields.io/badge/AppVersion-{{ . | badge }}-informational?style=flat-square){{ end }}{{ end }}
{{- define "chart.badgesSection" }}{{ template "chart.versionBadge" . }} {{ template "chart.typeBadge" . }} {{ template "chart.appVersionBadge" . }}{{ end }}
{{- define "chart.homepage" }}{{ .Home }}{{ end }}
{{- define "chart.homepageLine" }}{{ with .Home }}**Homepage:** <{{ . }}>{{ end }}{{ end }}
{{- define "chart.maintainersHeader" }}## Maintainers{{ end }}
{{- define "chart.maintainersTable" }}| Name | Email | Url |
| ---- | ------ | --- |
{{- range .Maintainers }}
| {{ .Name }} | {{ with .Email }}<{{ . }}>{{ end }} | {{ with .URL }}<{{ . }}>{{ end }} |
{{- end }}{{ end }}
{{- define "chart.maintainersSection" }}{{ with .Maintainers }}{{ template "chart.maintainersHeader" }}

{{ template "chart.maintainersTable" $ }}{{ end }}{{ end }}
{{- define "chart.sourcesHeader" }}## Source Code{{ end }}
{{- define "chart.sourcesList" }}{{ range $i, $s := .Sources }}{{ if $i }}
{{ end }}* <{{ $s }}>{{ end }}{{ end }}
{{- define "chart.sourcesSection" }}{{ with .Sources }}{{ template "chart.sourcesHeader" }}

{{ template "chart.sourcesList" $ }}{{ end }}{{ end }}
{{- define "chart.kubeVersion" }}{{ .KubeVersion }}{{ end }}
{{- define "chart.kubeVersionLine" }}{{ with .KubeVersion }}Kubernetes: ` + "`{{ . }}`" + `{{ end }}{{ end }}
{{- define "chart.requirementsHeader" }}## Requirements{{ end }}
{{- define "chart.requirementsSection" }}{{ if or .KubeVersion .Dependencies }}{{ template "chart.requirementsHeader" }}

{{ template "chart.kubeVersionLine" . }}{{ with .Dependencies }}

| Repository | Name | Version |
|------------|------|---------|
{{- range . }}
| {{ .Repository }} | {{ .Name }} | {{ .Version }} |
{{- end }}{{ end }}{{ end }}{{ end }}
{{- define "chart.valuesHeader" }}## Values{{ end }}
{{- define "chart.valuesTable" }}| Key | Type | Default | Description |
|-----|------|---------|-------------|
{{- range .Values }}
| {{ .Key | cell }} | {{ .Type | cell }} | {{ .Default | cell }} | {{ .Description | cell }} |
{{- end }}{{ end }}
{{- define "chart.valuesSection" }}{{ if .Values }}{{ template "chart.valuesHeader" . }}

{{ template "chart.valuesTable" . }}{{ end }}{{ end }}
`

// defaultTemplate is used when a chart has no README.md.gotmpl.
const defaultTemplate = `{{ template "chart.header" . }}

{{ template "chart.badgesSection" . }}

{{ template "chart.description" . }}

{{ template "chart.valuesSection" . }}
`

// Header starts every generated README.
const Header = "<!-- Generated by hack/chartdoc from Chart.yaml, values.yaml and README.md.gotmpl: edit those and run `" + FixCommand + "`. -->\n\n"

// Render returns the README of the chart in dir.
func Render(dir string) ([]byte, error) {
	c, err := Load(dir)
	if err != nil {
		return nil, err
	}
	text := defaultTemplate
	if raw, err := os.ReadFile(filepath.Join(dir, TemplateFile)); err == nil {
		text = string(raw)
	} else if !errors.Is(err, os.ErrNotExist) {
		return nil, err
	}
	tpl, err := template.New(TemplateFile).Option("missingkey=error").Funcs(template.FuncMap{
		"cell":  cell,
		"badge": func(s string) string { return strings.ReplaceAll(s, "-", "--") },
	}).Parse(builtins)
	if err != nil {
		return nil, err
	}
	if _, err := tpl.Parse(text); err != nil {
		return nil, fmt.Errorf("%s/%s: %w", dir, TemplateFile, err)
	}
	var b bytes.Buffer
	b.WriteString(Header)
	if err := tpl.Execute(&b, c); err != nil {
		return nil, fmt.Errorf("%s/%s: %w", dir, TemplateFile, err)
	}
	out := strings.TrimRight(b.String(), "\n") + "\n"
	return []byte(out), nil
}

// Write regenerates dir/README.md.
func Write(dir string) error {
	out, err := Render(dir)
	if err != nil {
		return err
	}
	return os.WriteFile(filepath.Join(dir, "README.md"), out, 0o644)
}

// Check fails when dir/README.md differs from what Render writes.
func Check(dir string) error {
	want, err := Render(dir)
	if err != nil {
		return err
	}
	got, err := os.ReadFile(filepath.Join(dir, "README.md"))
	if err != nil && !errors.Is(err, os.ErrNotExist) {
		return err
	}
	if !bytes.Equal(got, want) {
		return fmt.Errorf("%s is out of date with its Chart.yaml, values.yaml and %s: run `%s`", filepath.Join(dir, "README.md"), TemplateFile, FixCommand)
	}
	return nil
}
