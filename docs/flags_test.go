// Package docs_test checks docs/design.md against the code it describes.
package docs_test

import (
	"bufio"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// TestFlagTables holds design.md's flag tables to the binaries' own flags:
// every flag is listed, nothing else is, and each default is the one the
// binary has (a default the binary computes at run time, shown in the
// table as words such as "(required)" or "cluster-<uid>", stands for an
// empty default in the flag).
func TestFlagTables(t *testing.T) {
	doc, err := os.ReadFile("design.md")
	require.NoError(t, err)
	for _, bin := range []struct{ name, pkg, section string }{
		{"spectro-proxy-server", "../server/cmd/spectro-proxy-server", "## Relay flags"},
		{"spectro-proxy-client", "../client/cmd/spectro-proxy-client", "## Agent flags"},
	} {
		t.Run(bin.name, func(t *testing.T) {
			table := flagTable(t, string(doc), bin.section)
			flags := binaryFlags(t, bin.name, bin.pkg)
			for name, def := range flags {
				row, ok := table[name]
				if !assert.True(t, ok, "--%s is missing from design.md's %q table", name, bin.section) {
					continue
				}
				assert.True(t, sameDefault(row, def), "--%s: design.md says %q, the binary's default is %q", name, row, def)
			}
			for name := range table {
				_, ok := flags[name]
				assert.True(t, ok, "design.md's %q table lists --%s, which %s does not have", bin.section, name, bin.name)
			}
		})
	}
}

// flagTable reads the markdown table under section: flag name → default cell.
func flagTable(t *testing.T, doc, section string) map[string]string {
	t.Helper()
	_, rest, ok := strings.Cut(doc, "\n"+section)
	require.True(t, ok, "design.md has no section %q", section)
	row := regexp.MustCompile("^\\| `--([a-z0-9-]+)` \\| ([^|]*) \\|")
	table := map[string]string{}
	started := false
	for _, line := range strings.Split(rest, "\n")[1:] {
		if strings.HasPrefix(line, "## ") {
			break
		}
		if !strings.HasPrefix(line, "|") {
			if started {
				break
			}
			continue
		}
		started = true
		if m := row.FindStringSubmatch(line); m != nil {
			table[m[1]] = strings.TrimSpace(m[2])
		}
	}
	require.NotEmpty(t, table, "no flag rows under %q", section)
	return table
}

// binaryFlags builds the command and reads its flags and defaults from -h.
func binaryFlags(t *testing.T, name, pkg string) map[string]string {
	t.Helper()
	bin := filepath.Join(t.TempDir(), name)
	out, err := exec.Command("go", "build", "-o", bin, pkg).CombinedOutput()
	require.NoError(t, err, "%s", out)
	help, _ := exec.Command(bin, "-h").CombinedOutput() // exits 2 after printing usage
	flags := map[string]string{}
	flagLine := regexp.MustCompile(`^  -([a-z0-9-]+)`)
	defaultIn := regexp.MustCompile(`\(default (.*)\)$`)
	var current string
	s := bufio.NewScanner(strings.NewReader(string(help)))
	for s.Scan() {
		line := s.Text()
		if m := flagLine.FindStringSubmatch(line); m != nil {
			current = m[1]
			flags[current] = ""
			continue
		}
		if m := defaultIn.FindStringSubmatch(line); m != nil && current != "" {
			def := m[1]
			if u, err := strconv.Unquote(def); err == nil {
				def = u
			}
			flags[current] = def
		}
	}
	require.NotEmpty(t, flags, "no flags in %s -h:\n%s", name, help)
	return flags
}

func sameDefault(cell, def string) bool {
	cell = strings.ReplaceAll(cell, "`", "")
	if cell == `""` {
		cell = ""
	}
	if def == "" {
		// Zero in the flag: the table shows it empty, as a zero, or in
		// words for a default computed at run time.
		return cell == "" || cell == "0" || cell == "0s" || cell == "false" || strings.ContainsAny(cell, "( $<")
	}
	if cell == def {
		return true
	}
	a, errA := time.ParseDuration(cell)
	b, errB := time.ParseDuration(def)
	return errA == nil && errB == nil && a == b
}
