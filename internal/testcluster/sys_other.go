//go:build !linux

package testcluster

import (
	"os"
	"syscall"
)

// Outside Linux there is no Pdeathsig: Stop kills the processes, but a test
// binary that dies without running Stop leaves them behind.
func sysProcAttr() *syscall.SysProcAttr { return nil }

func killGroup(pid int) {
	if p, err := os.FindProcess(pid); err == nil {
		_ = p.Kill()
	}
}
