// Package pack reads the Palette packs under packs/ and builds their chart
// tarballs from the chart source.
//
// A pack version directory holds what a pack registry takes: pack.json, whose
// "charts" names the chart tarball inside the pack; values.yaml, with a
// `pack:` section and the chart's values under `charts.<chart>:`; a README.md
// and a logo.png. Every version's tarball is the one chart source
// (charts/spectro-proxy) with the chart version and appVersion set to the pack
// version, so that the chart can gate each parameter on the version that
// introduced it. Build makes that chart; Diff says how a tarball differs from it.
package pack

import (
	"bytes"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"strings"

	"helm.sh/helm/v3/pkg/chart"
	"helm.sh/helm/v3/pkg/chart/loader"
	"sigs.k8s.io/yaml"
)

// Meta is a pack's pack.json.
type Meta struct {
	Name        string            `json:"name"`
	DisplayName string            `json:"displayName"`
	Version     string            `json:"version"`
	Layer       string            `json:"layer"`
	AddonType   string            `json:"addonType"`
	CloudTypes  []string          `json:"cloudTypes"`
	Charts      []string          `json:"charts"`
	Annotations map[string]string `json:"annotations,omitempty"`
}

// Pack is one pack version directory.
type Pack struct {
	Dir    string
	Meta   Meta
	Values []byte // values.yaml as written, macros unresolved
}

// Load reads the pack in dir.
func Load(dir string) (*Pack, error) {
	raw, err := os.ReadFile(filepath.Join(dir, "pack.json"))
	if err != nil {
		return nil, err
	}
	p := &Pack{Dir: dir}
	dec := json.NewDecoder(bytes.NewReader(raw))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&p.Meta); err != nil {
		return nil, fmt.Errorf("reading %s/pack.json: %w", dir, err)
	}
	if len(p.Meta.Charts) != 1 {
		return nil, fmt.Errorf("%s/pack.json: want exactly one chart, have %q", dir, p.Meta.Charts)
	}
	if p.Values, err = os.ReadFile(filepath.Join(dir, "values.yaml")); err != nil {
		return nil, err
	}
	return p, nil
}

// ChartPath is the path of the pack's chart tarball.
func (p *Pack) ChartPath() string { return filepath.Join(p.Dir, filepath.FromSlash(p.Meta.Charts[0])) }

// LoadChart loads the pack's chart tarball.
func (p *Pack) LoadChart() (*chart.Chart, error) { return loader.Load(p.ChartPath()) }

// Values of a pack's values.yaml once its macros are resolved: the `pack:`
// section and the values of each chart under `charts:`.
type Values struct {
	Pack struct {
		Namespace string `json:"namespace"`
		Content   struct {
			Images []struct {
				Image string `json:"image"`
			} `json:"images"`
		} `json:"content"`
	} `json:"pack"`
	Charts map[string]map[string]any `json:"charts"`
}

// ParseValues parses a resolved values.yaml, rejecting unknown top-level keys.
func ParseValues(resolved []byte) (*Values, error) {
	var v Values
	if err := yaml.UnmarshalStrict(resolved, &v); err != nil {
		return nil, err
	}
	return &v, nil
}

// Build loads the chart source in dir as the chart of pack version, with
// the chart version, appVersion and the Artifact Hub image annotation set to it.
func Build(dir, version string) (*chart.Chart, error) {
	ch, err := loader.Load(dir)
	if err != nil {
		return nil, err
	}
	old := ch.Metadata.AppVersion
	ch.Metadata.Version = version
	ch.Metadata.AppVersion = version
	if imgs, ok := ch.Metadata.Annotations["artifacthub.io/images"]; ok && old != "" {
		ch.Metadata.Annotations["artifacthub.io/images"] = strings.ReplaceAll(imgs, ":"+old+"\n", ":"+version+"\n")
	}
	return ch, ch.Validate()
}

// Diff lists how chart got differs from chart want: metadata, values,
// schema, templates and files, compared by content (not by archive bytes,
// which hold timestamps). Empty means the same chart.
func Diff(want, got *chart.Chart) []string {
	var out []string
	wm, _ := json.Marshal(want.Metadata)
	gm, _ := json.Marshal(got.Metadata)
	if !bytes.Equal(wm, gm) {
		out = append(out, fmt.Sprintf("Chart.yaml differs:\n want %s\n got  %s", wm, gm))
	}
	wf, gf := files(want), files(got)
	names := map[string]bool{}
	for n := range wf {
		names[n] = true
	}
	for n := range gf {
		names[n] = true
	}
	sorted := make([]string, 0, len(names))
	for n := range names {
		sorted = append(sorted, n)
	}
	sort.Strings(sorted)
	for _, n := range sorted {
		w, inW := wf[n]
		g, inG := gf[n]
		switch {
		case !inG:
			out = append(out, n+": missing")
		case !inW:
			out = append(out, n+": not in the chart source")
		case !bytes.Equal(w, g):
			out = append(out, n+": content differs")
		}
	}
	return out
}

// files are a chart's files by name, as the chart archive holds them.
func files(c *chart.Chart) map[string][]byte {
	m := map[string][]byte{}
	for _, f := range c.Raw {
		if f.Name == "values.yaml" {
			m[f.Name] = f.Data
		}
	}
	if c.Schema != nil {
		m["values.schema.json"] = c.Schema
	}
	for _, f := range c.Templates {
		m[f.Name] = f.Data
	}
	for _, f := range c.Files {
		m[f.Name] = f.Data
	}
	return m
}
