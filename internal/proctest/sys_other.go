//go:build !linux

package proctest

import "syscall"

// Outside Linux there is no Pdeathsig: Stop ends the processes, but a test
// binary that dies without running Stop leaves them behind.
func sysProcAttr(bool) *syscall.SysProcAttr { return nil }

// SysProcAttr is what Start sets for a process in its own group.
func SysProcAttr() *syscall.SysProcAttr { return nil }

// signalGroup leaves it to Process.Signal to signal the process alone.
func signalGroup(int, syscall.Signal) {}
