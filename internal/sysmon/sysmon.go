// Package sysmon keeps the Go runtime's system monitor thread out of its
// deep sleep, where it goes whenever every processor is idle: between two
// requests at one request at a time, that is after every hop. The first
// system call after that wakes it again (runtime.entersyscall, a futex
// wake), so each request through relay and agent paid a thread wake-up on
// its way, in the critical path, and the monitor's own short naps after it:
// 9-14% of the agent's CPU and 5-8% of the relay's at one request at a
// time, and about half of their 6-17 context switches per request
// (docs/performance.md, eighth pass).
//
// The runtime has no setting for this alone. Its scheduler trace does keep
// the monitor awake (runtime/proc.go, sysmon), and with the longest period
// it takes, 2^31-1 ms (24.8 days), it prints nothing for that long after
// the host started, and then once every 24.8 days: on a host up longer than
// that, one line starting with "SCHED" on stderr at start and then every
// 24.8 days, which is harmless; and a crash prints the scheduler's state
// before its stack traces. An awake monitor naps at most 10 ms at a
// time when the process is idle: about a hundred wake-ups and 3 ms of CPU
// a second (an idle forwarder, 20 s, measured with /proc).
//
// GODEBUG is read when the runtime starts, so Reexec starts the program
// again in place of itself with it set.
package sysmon

import (
	"fmt"
	"log/slog"
	"os"
	"strconv"
	"strings"
	"syscall"
)

// Setting is what GODEBUG gets.
const Setting = "schedtrace=2147483647"

// Environ returns environ with GODEBUG extended by Setting, and false
// when there is nothing to add: GODEBUG already sets schedtrace, whatever
// the value (an operator's GODEBUG wins; schedtrace=0 turns this off).
func Environ(environ []string) ([]string, bool) {
	out := make([]string, 0, len(environ)+1)
	found := false
	for _, kv := range environ {
		v, ok := strings.CutPrefix(kv, "GODEBUG=")
		if !ok {
			out = append(out, kv)
			continue
		}
		if _, set := schedtrace(v); set {
			return environ, false
		}
		found = true
		if v == "" {
			kv = "GODEBUG=" + Setting
		} else {
			kv = "GODEBUG=" + v + "," + Setting
		}
		out = append(out, kv)
	}
	if !found {
		out = append(out, "GODEBUG="+Setting)
	}
	return out, true
}

// schedtrace is the schedtrace period a GODEBUG value sets (the last one
// counts, as for the runtime), and whether it sets one.
func schedtrace(godebug string) (ms int64, set bool) {
	for _, f := range strings.Split(godebug, ",") {
		k, v, _ := strings.Cut(strings.TrimSpace(f), "=")
		if k == "schedtrace" {
			ms, _ = strconv.ParseInt(v, 10, 32)
			set = true
		}
	}
	return ms, set
}

// Awake reports whether this process runs with the monitor kept awake.
func Awake() bool {
	ms, _ := schedtrace(os.Getenv("GODEBUG"))
	return ms > 0
}

// Keep calls Reexec when on (the programs' --keep-sysmon-awake) and
// returns its error, for Report.
func Keep(on bool) error {
	if !on {
		return nil
	}
	return Reexec()
}

// Reexec replaces the process with the same program (same pid, arguments
// and environment, GODEBUG extended by Environ) when Environ adds
// something; it returns only if it did not: nil when there was nothing to
// add, else why exec failed, and the process runs on as it is. Call it
// first thing, before other goroutines do work.
func Reexec() error {
	env, add := Environ(os.Environ())
	if !add {
		return nil
	}
	exe, err := os.Executable()
	if err != nil {
		return fmt.Errorf("finding this program to restart it with GODEBUG=%s: %w", Setting, err)
	}
	if err := syscall.Exec(exe, os.Args, env); err != nil {
		return fmt.Errorf("restarting %s with GODEBUG=%s: %w", exe, Setting, err)
	}
	return nil // not reached: Exec returns only on failure
}

// FlagUsage is the help of the programs' --keep-sysmon-awake flag.
const FlagUsage = "Keep the Go runtime's system monitor thread out of its deep sleep (the program restarts itself once at start with GODEBUG=" + Setting + "): otherwise every request wakes it, a thread wake-up per hop. A GODEBUG that sets schedtrace wins."

// Report logs, once the program has a logger, how the monitor runs; err
// is Reexec's.
func Report(log *slog.Logger, err error) {
	switch {
	case err != nil:
		log.Warn("the Go runtime's system monitor sleeps as usual: each request costs a thread wake-up more", "error", err)
	case Awake():
		log.Info("Go runtime's system monitor kept awake", "godebug", os.Getenv("GODEBUG"),
			"note", "on a host up for more than 24.8 days the runtime prints one line starting with SCHED at start and every 24.8 days")
	}
}
