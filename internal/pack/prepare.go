package pack

import (
	"fmt"
	"regexp"
	"strings"

	"helm.sh/helm/v3/pkg/chart"
	"helm.sh/helm/v3/pkg/chartutil"
)

// macro is the platform's macro syntax in a pack's values.yaml.
var macro = regexp.MustCompile(`\{\{-?\s*(.*?)\s*-?\}\}`)

var systemPath = regexp.MustCompile(`^\.spectro\.system((\.[A-Za-z0-9_]+)+)$`)

// ResolveMacros substitutes each {{ .spectro.system.a.b }} in text with the
// value at a.b of system, as the platform does (as text) before Helm runs;
// a path system lacks gives "<no value>", as Go templates do. Any other
// macro is an error naming it.
func ResolveMacros(text string, system map[string]any) (string, error) {
	var errs []string
	out := macro.ReplaceAllStringFunc(text, func(m string) string {
		expr := macro.FindStringSubmatch(m)[1]
		sm := systemPath.FindStringSubmatch(expr)
		if sm == nil {
			errs = append(errs, fmt.Sprintf("unknown macro %s", m))
			return m
		}
		var cur any = system
		for _, seg := range strings.Split(strings.TrimPrefix(sm[1], "."), ".") {
			mm, ok := cur.(map[string]any)
			if !ok {
				cur = nil
				break
			}
			cur = mm[seg]
		}
		if cur == nil {
			// What Go's text/template prints for a key a map lacks.
			return "<no value>"
		}
		return fmt.Sprint(cur)
	})
	if errs != nil {
		return "", fmt.Errorf("%s", strings.Join(errs, "; "))
	}
	return out, nil
}

// Prepared is a pack version prepared for one cluster, as the platform
// hands it to Helm.
type Prepared struct {
	Version   string
	Namespace string       // pack.namespace, resolved: the release namespace
	Images    []string     // pack.content.images, resolved
	Chart     *chart.Chart // the tarball named in pack.json
	Values    map[string]any
}

// Prepare does what the platform does with the pack in dir for a cluster
// whose system values (spectro.system) are system: resolve the macros of
// values.yaml as text, take charts.<pack name> as the chart's values, apply
// the cluster's overrides in order (later wins), and load the chart tarball
// that pack.json names. Only what values.yaml passes on reaches the chart:
// the platform gives Helm the resolved file, not its system values.
func Prepare(dir string, system map[string]any, overrides ...map[string]any) (*Prepared, error) {
	p, err := Load(dir)
	if err != nil {
		return nil, err
	}
	resolved, err := ResolveMacros(string(p.Values), system)
	if err != nil {
		return nil, fmt.Errorf("%s/values.yaml: %w", dir, err)
	}
	pv, err := ParseValues([]byte(resolved))
	if err != nil {
		return nil, fmt.Errorf("%s/values.yaml, resolved: %w", dir, err)
	}
	all, err := chartutil.ReadValues([]byte(resolved))
	if err != nil {
		return nil, err
	}
	chartVals, err := all.Table("charts." + p.Meta.Name)
	if err != nil {
		return nil, fmt.Errorf("%s/values.yaml: no charts.%s: %w", dir, p.Meta.Name, err)
	}
	ch, err := p.LoadChart()
	if err != nil {
		return nil, fmt.Errorf("the chart tarball %s/pack.json names: %w", dir, err)
	}
	out := &Prepared{Version: p.Meta.Version, Namespace: pv.Pack.Namespace, Chart: ch, Values: chartVals.AsMap()}
	for _, img := range pv.Pack.Content.Images {
		out.Images = append(out.Images, img.Image)
	}
	for _, o := range overrides {
		out.Values = chartutil.MergeTables(clone(o), out.Values)
	}
	return out, nil
}

// clone copies m deeply enough that merging does not change the caller's map.
func clone(m map[string]any) map[string]any {
	out := make(map[string]any, len(m))
	for k, v := range m {
		if sub, ok := v.(map[string]any); ok {
			v = clone(sub)
		}
		out[k] = v
	}
	return out
}
