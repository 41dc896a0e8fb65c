package chart_test

import (
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"helm.sh/helm/v3/pkg/chart/loader"
	"sigs.k8s.io/yaml"
)

// The Chart.yaml metadata Artifact Hub shows: icon, maintainers and the
// artifacthub.io annotations, which must parse and must name the image the
// chart's defaults run.
func TestChartMetadata(t *testing.T) {
	for _, dir := range []string{agentChart, relayChart} {
		t.Run(filepath.Base(dir), func(t *testing.T) {
			ch, err := loader.Load(dir) // not loadChart: the real versions matter here
			require.NoError(t, err)
			md := ch.Metadata
			require.NoError(t, md.Validate())

			// The icon is a file of this repository, served from main.
			const iconPrefix = "https://raw.githubusercontent.com/spectroproxy/spectro-proxy/main/"
			require.True(t, strings.HasPrefix(md.Icon, iconPrefix), "icon %q", md.Icon)
			_, err = os.Stat(filepath.Join("..", strings.TrimPrefix(md.Icon, iconPrefix)))
			assert.NoError(t, err, "icon file")
			require.NotEmpty(t, md.Maintainers)
			for _, m := range md.Maintainers {
				assert.NotEmpty(t, m.Name)
				assert.True(t, m.Email != "" || m.URL != "", "maintainer %s has no contact", m.Name)
			}

			ann := md.Annotations
			assert.Equal(t, "networking", ann["artifacthub.io/category"])
			var images []struct{ Name, Image string }
			require.NoError(t, yaml.UnmarshalStrict([]byte(ann["artifacthub.io/images"]), &images))
			image := ch.Values["image"].(map[string]any)["repository"].(string)
			assert.Equal(t, []struct{ Name, Image string }{{filepath.Base(image), image + ":" + md.AppVersion}}, images,
				"artifacthub.io/images names the default image at appVersion")
			var links []struct{ Name, URL string }
			require.NoError(t, yaml.UnmarshalStrict([]byte(ann["artifacthub.io/links"]), &links))
			require.NotEmpty(t, links)
			for _, l := range links {
				assert.NotEmpty(t, l.Name)
				assert.True(t, strings.HasPrefix(l.URL, "https://"), l.URL)
				if rest, ok := strings.CutPrefix(l.URL, "https://github.com/spectroproxy/spectro-proxy/blob/main/"); ok {
					_, err := os.Stat(filepath.Join("..", rest))
					assert.NoError(t, err, "link %s", l.Name)
				}
			}
			if c, ok := ann["artifacthub.io/changes"]; ok {
				var changes []struct{ Kind, Description string }
				require.NoError(t, yaml.UnmarshalStrict([]byte(c), &changes))
				for _, ch := range changes {
					assert.Contains(t, []string{"added", "changed", "deprecated", "removed", "fixed", "security"}, ch.Kind)
					assert.NotEmpty(t, ch.Description)
				}
			}
			for _, k := range []string{"artifacthub.io/containsSecurityUpdates", "artifacthub.io/prerelease"} {
				assert.Contains(t, []string{"true", "false"}, ann[k], k)
			}
		})
	}
}
