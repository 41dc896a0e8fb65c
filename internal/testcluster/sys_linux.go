package testcluster

import "syscall"

// sysProcAttr puts the child in its own process group (so Stop can kill kwok
// together with the commands it runs for exec) and has the kernel SIGKILL it
// when the thread that started it dies, so a crashed or killed test binary
// leaks no processes. (Pdeathsig follows the starting OS thread, which the Go
// runtime keeps alive unless a goroutine exits while locked to it.)
func sysProcAttr() *syscall.SysProcAttr {
	return &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
}

func killGroup(pid int) {
	_ = syscall.Kill(-pid, syscall.SIGKILL)
	_ = syscall.Kill(pid, syscall.SIGKILL)
}
