package sysmon

import (
	"fmt"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

func TestEnviron(t *testing.T) {
	for _, tc := range []struct {
		name string
		in   []string
		want []string // nil: unchanged
	}{
		{"no GODEBUG", []string{"PATH=/bin"}, []string{"PATH=/bin", "GODEBUG=" + Setting}},
		{"empty GODEBUG", []string{"GODEBUG=", "PATH=/bin"}, []string{"GODEBUG=" + Setting, "PATH=/bin"}},
		{"other settings kept", []string{"GODEBUG=http2debug=1,gctrace=1"}, []string{"GODEBUG=http2debug=1,gctrace=1," + Setting}},
		{"operator's schedtrace wins", []string{"GODEBUG=schedtrace=1000"}, nil},
		{"schedtrace=0 turns it off", []string{"GODEBUG=gctrace=1, schedtrace=0"}, nil},
		{"a variable that only ends in GODEBUG", []string{"XGODEBUG=schedtrace=0"}, []string{"XGODEBUG=schedtrace=0", "GODEBUG=" + Setting}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got, add := Environ(tc.in)
			if tc.want == nil {
				assert.False(t, add)
				assert.Equal(t, tc.in, got)
				return
			}
			assert.True(t, add)
			assert.Equal(t, tc.want, got)
		})
	}
}

// TestReexec runs this test binary as a child that calls Reexec: the
// program that then runs is the same process (same pid) with the setting
// in its GODEBUG and its other variables kept, and it does not restart
// again. With schedtrace=0 set by the operator it is not restarted.
func TestReexec(t *testing.T) {
	if os.Getenv("SYSMON_TEST_CHILD") == "1" {
		// Each run of this program counts itself; the one Reexec starts
		// inherits the count.
		starts, _ := strconv.Atoi(os.Getenv("SYSMON_TEST_STARTS"))
		os.Setenv("SYSMON_TEST_STARTS", strconv.Itoa(starts+1))
		if err := Reexec(); err != nil {
			fmt.Println("error:", err)
			os.Exit(1)
		}
		fmt.Printf("pid=%d starts=%s awake=%t godebug=%s keep=%s\n", os.Getpid(), os.Getenv("SYSMON_TEST_STARTS"),
			Awake(), os.Getenv("GODEBUG"), os.Getenv("SYSMON_TEST_KEEP"))
		os.Exit(0)
	}
	for _, tc := range []struct {
		name       string
		godebug    string
		wantStarts int
		wantAwake  bool
		wantDebug  string
	}{
		{"restarted once with the setting", "gctrace=0", 2, true, "gctrace=0," + Setting},
		{"operator turned it off", "schedtrace=0", 1, false, "schedtrace=0"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			cmd := exec.Command(os.Args[0], "-test.run=^TestReexec$", "-test.count=1")
			cmd.Env = append(os.Environ(), "SYSMON_TEST_CHILD=1", "SYSMON_TEST_KEEP=kept", "GODEBUG="+tc.godebug)
			out, err := cmd.Output()
			require.NoError(t, err, "child output: %s", out)
			line := strings.TrimSpace(string(out))
			assert.Equal(t, fmt.Sprintf("pid=%d starts=%d awake=%t godebug=%s keep=kept", cmd.Process.Pid, tc.wantStarts, tc.wantAwake, tc.wantDebug), line)
		})
	}
}
