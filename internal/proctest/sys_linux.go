package proctest

import "syscall"

// sysProcAttr has the kernel SIGKILL the child when the thread that started
// it dies, so a crashed or killed test binary leaks no processes, and with
// group puts it in its own process group. (Pdeathsig follows the starting
// OS thread, which the Go runtime keeps alive unless a goroutine exits
// while locked to it.)
func sysProcAttr(group bool) *syscall.SysProcAttr {
	return &syscall.SysProcAttr{Setpgid: group, Pdeathsig: syscall.SIGKILL}
}

// SysProcAttr is what Start sets for a process in its own group, for a
// command run otherwise (such as a streaming kubectl).
func SysProcAttr() *syscall.SysProcAttr { return sysProcAttr(true) }

func signalGroup(pid int, sig syscall.Signal) { _ = syscall.Kill(-pid, sig) }
